"""LyCORIS LoHa: the Hadamard product of two low-rank products, ``(w1a @ w1b) * (w2a @ w2b) * alpha / r``.

Shapes: Linear ``w?_a [out, r]``, ``w?_b [r, in]``; Conv ``w?_b [r, in*kh*kw]``; Tucker conv ``t? [r, r, kh, kw]``
with transposed factors ``w?_a [r, out]``, ``w?_b [r, in]``, each side rebuilt as
``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)`` (LyCORIS ``rebuild_tucker``). r = ``w1_b.shape[0]`` (LyCORIS, ComfyUI).
LyCORIS' ``get_diff_weight`` applies alpha/r twice (``get_weight`` already did); lorakit follows its forward
pass, which applies it once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import WeightDelta
from .base import Algorithm, Shape, layer_problem, weight_dims

FIELDS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})


@dataclass
class LohaWeights(WeightDelta):
    """LoHa factors; ``t1``/``t2`` make it the Tucker form for kxk convs."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @staticmethod
    def _side(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, shape: tuple[int, ...],
              dtype: torch.dtype) -> torch.Tensor:
        if t is not None:
            return torch.einsum("ijkl,jr,ip->prkl", t.to(dtype), b.to(dtype), a.to(dtype)).reshape(shape)
        return (a.to(dtype) @ b.to(dtype).flatten(1)).reshape(shape)

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self._side(self.w1_a, self.w1_b, self.t1, shape, dtype)
                * self._side(self.w2_a, self.w2_b, self.t2, shape, dtype))


def complete(names: set[str]) -> bool:
    return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= names and \
        ("hada_t1" in names) == ("hada_t2" in names)


def check(shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    problem = layer_problem(module)
    if problem:
        return problem
    out, inp, kernel = weight_dims(module)
    r = shapes["hada_w1_b"][0]
    for side in ("1", "2"):
        a, b = shapes[f"hada_w{side}_a"], shapes[f"hada_w{side}_b"]
        if f"hada_t{side}" in shapes:
            t = shapes[f"hada_t{side}"]
            ok = len(t) == 4 and tuple(t[2:]) == kernel and a == (t[0], out) and b == (t[1], inp)
            want = f"t [r, r, {', '.join(map(str, kernel))}], w_a [r, {out}], w_b [r, {inp}]"
        else:
            ok = a[0] == out and len(a) == 2 and b[0] == a[1] and math.prod(b[1:]) == inp * math.prod(kernel)
            want = f"w_a [{out}, r], w_b [r, {inp * math.prod(kernel)}]"
        if not ok:
            found = {k: list(v) for k, v in shapes.items() if k.endswith((side, side + "_a", side + "_b"))}
            return f"LoHa factors {found} do not fit weight {list(module.weight.shape)}: expected {want}"
    if shapes["hada_w2_b"][0] != r and "hada_t1" not in shapes:
        return f"LoHa ranks differ: hada_w1_b has {r}, hada_w2_b has {shapes['hada_w2_b'][0]}"
    return None


def build(f: dict[str, torch.Tensor], alpha: float | None) -> LohaWeights:
    return LohaWeights(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"], f.get("hada_t1"),
                       f.get("hada_t2"), alpha)


def shape(s: Mapping[str, Shape]) -> tuple[int, int]:
    if "hada_t1" in s:
        return s["hada_w1_a"][1], s["hada_w1_b"][1] * math.prod(s["hada_t1"][2:])
    return s["hada_w1_a"][0], math.prod(s["hada_w1_b"][1:])


ALGORITHM = Algorithm(name="loha", fields=FIELDS, complete=complete, check=check, build=build,
                      rank=lambda shapes: int(shapes["hada_w1_b"][0]), shape=shape)
