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


class _ScalesWeight(WeightDelta):
    """What both IA3 flavours share: a per-channel scale of the weight, no rank, no alpha scale, no additive form."""

    additive = False

    @property
    def rank(self) -> int:
        return 1

    @property
    def scale(self) -> float:
        return 1.0

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise TypeError("IA3's delta depends on the weight: use apply(weight, multiplier)")


@dataclass
class Ia3Weights(_ScalesWeight):
    weight: torch.Tensor
    on_input: bool = False
    alpha: float | None = None

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


@dataclass
class PeftIa3Weights(_ScalesWeight):
    """PEFT's (IA)^3 (``<module>.ia3_l``): ``W' = W * l`` along the output axis, the bias too (``l [out, 1]``, convs
    ``[1, out, 1, 1]``), or along the input axis for PEFT's ``feedforward_modules`` (``l [1, in]``, convs
    ``[1, in, 1, 1]``), the bias unchanged. At multiplier m lorakit uses ``1 + m * (l - 1)``: m = 1 is PEFT's
    layer, m = 0 the base, as for LyCORIS IA3. Which axis a conv vector scales is read from the target's shape."""

    ia3_l: torch.Tensor
    on_input: bool | None = None  # None until fit() when the tensor alone does not say (a conv's [1, n, 1, 1])
    alpha: float | None = None

    @property
    def scales_bias(self) -> bool:  # type: ignore[override]
        return not self.on_input

    def fit(self, shape: tuple[int, ...]) -> PeftIa3Weights:
        if self.on_input is None:
            self.on_input = peft_axis(tuple(self.ia3_l.shape), shape) == "input"
        return self

    def _factor(self, multiplier: float) -> torch.Tensor:
        return 1 + multiplier * (self.ia3_l.float().flatten() - 1)

    def apply(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        view = [1] * weight.dim()
        view[1 if self.on_input else 0] = -1
        return weight * self._factor(multiplier).to(weight.device).reshape(view)

    def apply_bias(self, bias: torch.Tensor, multiplier: float) -> torch.Tensor:
        return bias if self.on_input else bias * self._factor(multiplier).to(bias.device)


def peft_axis(vector: Shape, weight: Shape) -> str | None:
    """``"output"``, ``"input"`` or None (does not fit) for a PEFT ``ia3_l`` of shape ``vector`` on ``weight``;
    ``"ambiguous"`` for a conv vector whose length is both the in and out channel count."""
    out, inp = int(weight[0]), int(weight[1])
    if len(vector) == 2 and len(weight) == 2:
        return {(out, 1): "output", (1, inp): "input"}.get(tuple(vector))
    if len(vector) == len(weight) and vector[0] == 1 and all(s == 1 for s in vector[2:]):
        if vector[1] == out == inp:
            return "ambiguous"
        return {out: "output", inp: "input"}.get(int(vector[1]))
    return None


def check_peft(shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    problem = layer_problem(module)
    if problem:
        return problem
    weight = tuple(module.weight.shape)
    axis = peft_axis(shapes["ia3_l"], weight)
    if axis is None:
        out, inp, kernel = weight_dims(module)
        tail = ", 1" * len(kernel)
        want = (f"[{out}, 1] (outputs) or [1, {inp}] (inputs, feedforward)" if not kernel else
                f"[1, {out}{tail}] (outputs) or [1, {inp}{tail}] (inputs, feedforward)")
        return f"PEFT IA3 vector ia3_l has shape {list(shapes['ia3_l'])}, expected {want}"
    if axis == "ambiguous":
        return (f"PEFT IA3 vector ia3_l {list(shapes['ia3_l'])} on a conv with as many inputs as outputs: the file "
                f"does not say whether it scales inputs (PEFT feedforward_modules) or outputs, which lorakit does "
                f"not guess")
    return None


def _build_peft(f: dict[str, torch.Tensor], alpha: float | None) -> PeftIa3Weights:
    shape = tuple(f["ia3_l"].shape)
    on_input = (shape[0] == 1 and shape[1] != 1) if len(shape) == 2 else None  # Linear: the shape says
    return PeftIa3Weights(f["ia3_l"], on_input, alpha)


PEFT = Algorithm(name="ia3", fields=frozenset({"ia3_l"}), complete=lambda names: "ia3_l" in names,
                 check=check_peft, build=_build_peft, rank=lambda shapes: "full",
                 shape=lambda s: (numel(s["ia3_l"]), 0))
