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
                                     full.NORM, ia3.ALGORITHM, ia3.PEFT, oft.ALGORITHM)
DORA_BASES = {"lora": dora.FIELDS, "loha": {"dora_scale"}, "lokr": {"dora_scale"}}
INCOMPLETE = "incomplete"
LORA_BIAS = "lora_bias"  # PEFT's lora_B.bias (LoraConfig(lora_bias=True); FLUX Control LoRAs)


def detect(names: set[str]) -> tuple[Algorithm, str | None] | None:
    """(algorithm, DoRA field or None) for a module's field names (``alpha`` excluded), or None if none fits.

    A bias delta beside another algorithm's fields (``diff_b``, PEFT's ``lora_bias``) is that algorithm's
    (:func:`bias_field` says which)."""
    bias = bias_field(names)
    names = names - {bias} if bias else names
    mag = names & dora.FIELDS
    rest = names - dora.FIELDS
    if len(mag) > 1 or not rest:
        return None
    for algo in ALGORITHMS:
        if rest <= algo.fields and algo.complete(rest):
            if mag and not mag <= DORA_BASES.get(algo.name, set()):
                return None
            if bias == LORA_BIAS and (algo.name != "lora" or mag):
                return None  # PEFT's lora_bias exists for plain LoRA only
            return algo, next(iter(mag), None)
    return None


def bias_field(names: set[str]) -> str | None:
    """The field of a bias delta riding along another algorithm, or None: ``diff_b`` beside anything but a full
    delta (LyCORIS/ComfyUI, added at the user's weight), or ``lora_bias`` (PEFT's ``lora_B.bias``, scaled like the
    weight delta)."""
    if LORA_BIAS in names:
        return LORA_BIAS
    if "diff_b" in names and bool(names - full.FULL.fields - {"alpha"}):
        return "diff_b"
    return None


def with_bias(names: set[str]) -> bool:
    """Whether a bias delta (``diff_b``, ``lora_bias``) rides along another algorithm."""
    return bias_field(names) is not None


def _bias_suffix(names: set[str]) -> str:
    return {"diff_b": "+diff_b", LORA_BIAS: "+bias", None: ""}[bias_field(names)]


def name_of(names: set[str]) -> str:
    """The algorithm's display name (``lora``, ``loha+dora``, ``lora+bias``...) or ``incomplete``."""
    found = detect(set(names) - {"alpha"})
    if found is None:
        return INCOMPLETE
    algo, mag = found
    return algo.name + ("+dora" if mag else "") + _bias_suffix(set(names))


def check(shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    """Why tensors of these shapes (by field) cannot target ``module``, or None if they fit."""
    shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items() if k != "alpha"}
    found = detect(set(shapes))
    if found is None:
        return f"holds fields {sorted(shapes)}, which are not a known algorithm"
    algo, mag = found
    bias = bias_field(set(shapes))
    problem = algo.check({k: v for k, v in shapes.items() if k not in dora.FIELDS and k != bias}, module)
    if problem is None and mag is not None:
        problem = dora.check(mag, shapes[mag], module)
    if problem is None and bias:
        problem = full.check_bias(shapes[bias], module, bias)
    return problem


_KINDS: dict[frozenset[str], tuple[Algorithm, str | None, str | None] | None] = {}


def _kind(names: frozenset[str]) -> tuple[Algorithm, str | None, str | None] | None:
    """(algorithm, DoRA field, bias field) of a module's field names, worked out once per set of names (a load
    builds ~1000 modules of a handful of kinds)."""
    if names not in _KINDS:
        found = detect(set(names))
        _KINDS[names] = None if found is None else (*found, bias_field(set(names)))
    return _KINDS[names]


def build(tensors: dict[str, torch.Tensor], alpha: float | None) -> WeightDelta:
    """The delta of one module from its tensors by field (``alpha`` already read into ``alpha``)."""
    found = _kind(frozenset(tensors))
    if found is None:
        raise ValueError(f"fields {sorted(tensors)} are not a known algorithm")
    algo, mag, bias = found
    delta = algo.build({k: v for k, v in tensors.items() if k not in dora.FIELDS and k != bias}, alpha)
    delta = dora.wrap(delta, mag, tensors[mag]) if mag else delta
    return full.BiasAdded(delta, tensors[bias], scaled=bias == LORA_BIAS) if bias else delta


def describe(shapes: Mapping[str, Shape]) -> tuple[str, int | str, tuple[int, int]]:
    """(name, rank, (out, in*kernel) of the changed weight) from header shapes by field, for inspection.

    The name tells OFT from BOFT (4-D blocks), which the field names alone do not."""
    shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items() if k != "alpha"}
    found = detect(set(shapes))
    if found is None:
        return INCOMPLETE, INCOMPLETE, (0, 0)
    algo, mag = found
    name = "boft" if algo.name == "oft" and len(shapes.get("oft_blocks", ())) == 4 else algo.name
    name += ("+dora" if mag else "") + _bias_suffix(set(shapes))
    bias = bias_field(set(shapes))
    shapes = {k: v for k, v in shapes.items() if k != bias}
    return name, algo.rank(shapes), tuple(int(x) for x in algo.shape(shapes))


__all__ = ["ALGORITHMS", "Algorithm", "bias_field", "build", "check", "describe", "detect", "name_of", "with_bias"]
