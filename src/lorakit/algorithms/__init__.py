"""The algorithms of LoRA files, one small module each, registered in one table.

A module of a file is a set of fields (named by the key grammar in formats/keys.py). :func:`detect` finds the
algorithm those fields make; :func:`check` tests their header shapes against the target layer before anything is
read; :func:`build` makes the :class:`~lorakit.adapter.WeightDelta`. DoRA (``dora_scale`` or PEFT's
``lora_magnitude_vector``) wraps LoRA, LoHa or LoKr.

Example:
    >>> detect({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "dora_scale"})[0].name
    'loha'
    >>> name_of({"w1", "w2_a", "w2_b", "alpha"})
    'lokr'
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..adapter import WeightDelta
from . import dora, full, glora, ia3, loha, lokr, lora, oft
from .base import Algorithm, Shape

ALGORITHMS: tuple[Algorithm, ...] = (lora.ALGORITHM, lokr.ALGORITHM, loha.ALGORITHM, glora.ALGORITHM, full.FULL,
                                     full.NORM, ia3.ALGORITHM, oft.ALGORITHM)
DORA_BASES = {"lora": dora.FIELDS, "loha": {"dora_scale"}, "lokr": {"dora_scale"}}
INCOMPLETE = "incomplete"


def detect(names: set[str]) -> tuple[Algorithm, str | None] | None:
    """(algorithm, DoRA field or None) for a module's field names (``alpha`` excluded), or None if none fits.

    A ``diff_b`` beside another algorithm's fields is that algorithm's bias delta (:func:`with_bias` says so)."""
    if with_bias(names):
        names = names - {"diff_b"}
    mag = names & dora.FIELDS
    rest = names - dora.FIELDS
    if len(mag) > 1 or not rest:
        return None
    for algo in ALGORITHMS:
        if rest <= algo.fields and algo.complete(rest):
            if mag and not mag <= DORA_BASES.get(algo.name, set()):
                return None
            return algo, next(iter(mag), None)
    return None


def with_bias(names: set[str]) -> bool:
    """Whether ``diff_b`` rides along another algorithm (rather than being a full delta on its own)."""
    return "diff_b" in names and bool(names - full.FULL.fields - {"alpha"})


def name_of(names: set[str]) -> str:
    """The algorithm's display name (``lora``, ``loha+dora``, ...) or ``incomplete``."""
    found = detect(set(names) - {"alpha"})
    if found is None:
        return INCOMPLETE
    algo, mag = found
    return algo.name + ("+dora" if mag else "") + ("+diff_b" if with_bias(set(names)) else "")


def check(shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    """Why tensors of these shapes (by field) cannot target ``module``, or None if they fit."""
    shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items() if k != "alpha"}
    found = detect(set(shapes))
    if found is None:
        return f"holds fields {sorted(shapes)}, which are not a known algorithm"
    algo, mag = found
    bias = with_bias(set(shapes))
    problem = algo.check({k: v for k, v in shapes.items() if k not in dora.FIELDS and not (bias and k == "diff_b")},
                         module)
    if problem is None and mag is not None:
        problem = dora.check(mag, shapes[mag], module)
    if problem is None and bias:
        problem = full.check_bias(shapes["diff_b"], module)
    return problem


def build(tensors: dict[str, torch.Tensor], alpha: float | None) -> WeightDelta:
    """The delta of one module from its tensors by field (``alpha`` already read into ``alpha``)."""
    found = detect(set(tensors))
    if found is None:
        raise ValueError(f"fields {sorted(tensors)} are not a known algorithm")
    algo, mag = found
    bias = with_bias(set(tensors))
    delta = algo.build({k: v for k, v in tensors.items() if k not in dora.FIELDS and not (bias and k == "diff_b")},
                       alpha)
    delta = dora.wrap(delta, mag, tensors[mag]) if mag else delta
    return full.BiasAdded(delta, tensors["diff_b"]) if bias else delta


def describe(shapes: Mapping[str, Shape]) -> tuple[str, int | str, tuple[int, int]]:
    """(name, rank, (out, in*kernel) of the changed weight) from header shapes by field, for inspection.

    The name tells OFT from BOFT (4-D blocks), which the field names alone do not."""
    shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items() if k != "alpha"}
    found = detect(set(shapes))
    if found is None:
        return INCOMPLETE, INCOMPLETE, (0, 0)
    algo, mag = found
    name = "boft" if algo.name == "oft" and len(shapes.get("oft_blocks", ())) == 4 else algo.name
    name += ("+dora" if mag else "") + ("+diff_b" if with_bias(set(shapes)) else "")
    shapes = {k: v for k, v in shapes.items() if not (k == "diff_b" and with_bias(set(shapes)))}
    return name, algo.rank(shapes), tuple(int(x) for x in algo.shape(shapes))


__all__ = ["ALGORITHMS", "Algorithm", "build", "check", "describe", "detect", "name_of", "with_bias"]
