"""LyCORIS LoKr: ``kron(w1, w2)``; the delta class is :class:`lorakit.adapter.LokrWeights`.

Every combination is read: w1 full ``[a, c]`` or ``w1_a [a, r] @ w1_b [r, c]``; w2 full ``[b, d(, kh, kw)]``,
``w2_a [b, r] @ w2_b [r, d*kh*kw]``, or Tucker ``t2 [r, r, kh, kw]`` with ``w2_a [r, b]``, ``w2_b [r, d]``. For a
conv the product is ``[a*b, c*d*kh*kw]`` reshaped to the weight, which equals LyCORIS' 4-D kron (w1 unsqueezed) and
also reads the 2023 files that fold the kernel into both factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import nn

from ..adapter import LokrWeights
from .base import Algorithm, Shape, flat_in, layer_problem

FIELDS = frozenset({"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"})


def rows_cols(shapes: Mapping[str, Shape]) -> tuple[int, int]:
    """(rows, cols) of kron(w1, w2) in 2-D, from shapes alone."""
    def dims(full: str, a: str, b: str) -> tuple[int, int]:
        if full in shapes:
            return shapes[full][0], math.prod(shapes[full][1:])
        return shapes[a][0], math.prod(shapes[b][1:])

    a, c = dims("w1", "w1_a", "w1_b")
    if "t2" in shapes:
        b, d = shapes["w2_a"][1], shapes["w2_b"][1] * math.prod(shapes["t2"][2:])
    else:
        b, d = dims("w2", "w2_a", "w2_b")
    return a * b, c * d


def complete(names: set[str]) -> bool:
    w1 = "w1" in names or {"w1_a", "w1_b"} <= names
    w2 = "w2" in names or {"w2_a", "w2_b"} <= names
    return w1 and w2 and not ("t2" in names and "w2" in names)


def check(shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    problem = layer_problem(module)
    if problem:
        return problem
    if "t2" in shapes and (len(shapes["w2_a"]) != 2 or len(shapes["w2_b"]) != 2 or len(shapes["t2"]) != 4):
        return f"Tucker LoKr needs t2 [r, r, kh, kw], w2_a [r, b], w2_b [r, d]; found {shapes}"
    rows, cols = rows_cols(shapes)
    out, want = module.weight.shape[0], flat_in(module)
    if (rows, cols) != (out, want):
        return f"LoKr factors give a [{rows}, {cols}] product, expected [{out}, {want}]"
    return None


def rank(shapes: Mapping[str, Shape]) -> int | str:
    for factor in ("w2_b", "w1_b"):  # LyCORIS: w2's rank first (LokrWeights.rank)
        if factor in shapes:
            return int(shapes[factor][0])
    return "full"


ALGORITHM = Algorithm(name="lokr", fields=FIELDS, complete=complete, check=check,
                      build=lambda f, alpha: LokrWeights(alpha=alpha, **f), rank=rank, shape=rows_cols)
