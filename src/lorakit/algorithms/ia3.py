"""(IA)^3: a learned per-channel scale of the weight, ``W' = W * (1 + m * w)`` along the output axis, or the input
axis when the file's ``on_input`` is set (LyCORIS ``IA3Module.make_weight``; at m = 1 this is A1111's
``W + W * w``). It depends on the weight: the one the layer holds when IA3 is applied. No alpha."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import WeightDelta
from .base import Algorithm, Shape, layer_problem, numel, weight_dims


@dataclass
class Ia3Weights(WeightDelta):
    weight: torch.Tensor
    on_input: bool = False
    alpha: float | None = None
    additive = False

    @property
    def rank(self) -> int:
        return 1

    @property
    def scale(self) -> float:
        return 1.0

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise TypeError("IA3's delta depends on the weight: use apply(weight, multiplier)")

    def apply(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        axis = 1 if self.on_input else 0
        view = [1] * weight.dim()
        view[axis] = -1
        return weight * (1 + multiplier * self.weight.float().reshape(view))


def check(shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    problem = layer_problem(module)
    if problem:
        return problem
    out, inp, _ = weight_dims(module)
    n = numel(shapes["ia3"])
    if n not in (out, inp):
        return f"IA3 weight has {n} values, expected {out} (outputs) or {inp} (inputs, with on_input)"
    return None


def build(f: dict[str, torch.Tensor], alpha: float | None) -> Ia3Weights:
    on_input = "on_input" in f and bool(f["on_input"].reshape(-1)[0].item())
    return Ia3Weights(f["ia3"].flatten(), on_input, alpha)


ALGORITHM = Algorithm(name="ia3", fields=frozenset({"ia3", "on_input"}), complete=lambda names: "ia3" in names,
                      check=check, build=build, rank=lambda shapes: "full",
                      shape=lambda s: (numel(s["ia3"]), 0))
