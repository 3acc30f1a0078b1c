"""DoRA: a weight-decomposed variant of any additive algorithm (``dora_scale`` beside LoRA/LoHa/LoKr keys, or
PEFT's ``lora_magnitude_vector``). The delta's direction is renormalised to a learned magnitude, so the result
depends on the weight it changes.

LyCORIS ``dora_scale`` (``apply_weight_decompose``): with ``V = W + s * dW`` (s = alpha / r, NOT times the
multiplier) and ``n = ||V||`` over every axis except the one ``dora_scale`` lies on (``[out, 1, ...]``: per output
channel, LyCORIS' ``wd_on_out``; ``[1, in, ...]``: per input channel, older files) plus fp32 eps,
``W' = V * (1 + m * (dora_scale / n - 1))``. At m = 0 this leaves ``W + s * dW``: LyCORIS' own definition, followed
here; ComfyUI instead blends ``W + m * (DoRA(W) - W)`` and takes the output-axis norm of W alone (formats.md #1, #2).

PEFT ``lora_magnitude_vector`` (PEFT ``DoraLinearLayer``/``DoraConv2dLayer``, what diffusers loads): the
multiplier scales the delta inside the norm, ``V = W + m * s * dW``, ``W' = magnitude * V / ||V||`` per output
channel, no eps. lorakit matches diffusers+PEFT for these files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import WeightDelta, WrappedDelta
from .base import Shape, numel, weight_dims

FIELDS = frozenset({"dora_scale", "magnitude"})
LAYOUTS = ("out", "in", "peft")


def layout_of(field: str, shape: Shape, module: nn.Module) -> str | None:
    """Which axis the magnitude lies on for this layer, or None if it fits none."""
    out, inp, _ = weight_dims(module)
    if field == "magnitude":
        return "peft" if numel(shape) == out else None
    if shape[0] == out and numel(shape) == out:
        return "out"
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == inp and numel(shape) == inp:
        return "in"
    return None


def check(field: str, shape: Shape, module: nn.Module) -> str | None:
    if layout_of(field, shape, module) is None:
        out, inp, _ = weight_dims(module)
        want = f"[{out}]" if field == "magnitude" else f"[{out}, 1, ...] or [1, {inp}, ...]"
        return f"{field} has shape {list(shape)}, expected {want} for weight {list(module.weight.shape)}"
    return None


@dataclass
class DoraWeights(WrappedDelta):
    """Any additive delta (``inner``) with a DoRA magnitude; ``layout`` is one of :data:`LAYOUTS`."""

    inner: WeightDelta
    magnitude: torch.Tensor
    layout: str = "out"
    additive = False

    @property
    def scale(self) -> float:
        # PEFT scales the delta by the multiplier (which the engine builds from this scale); LyCORIS does not.
        return self.inner.scale if self.layout == "peft" else 1.0

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise TypeError("DoRA renormalises the weight: use apply(weight, multiplier)")

    def apply(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        delta = self.inner.unscaled_delta(tuple(weight.shape), torch.float32).to(weight.device)
        axis = 1 if self.layout == "in" else 0
        keep = [1] * weight.dim()
        keep[axis] = -1
        mag = self.magnitude.float().reshape(keep)
        if self.layout == "peft":
            v = weight + multiplier * delta
            return v * (mag / self._norm(v, axis))
        v = weight + self.inner.scale * delta
        factor = mag / (self._norm(v, axis) + torch.finfo(torch.float32).eps)
        return v * (multiplier * (factor - 1) + 1)

    @staticmethod
    def _norm(v: torch.Tensor, axis: int) -> torch.Tensor:
        dims = [d for d in range(v.dim()) if d != axis]
        return torch.linalg.vector_norm(v, dim=dims, keepdim=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"magnitude": self.magnitude, **{f"inner.{k}": v for k, v in self.inner.tensors().items()}}



def wrap(inner: WeightDelta, field: str, magnitude: torch.Tensor) -> DoraWeights:
    """``inner`` with the DoRA magnitude read from ``field`` (``[1, in, ...]`` is the input-axis layout)."""
    if field == "magnitude":
        layout = "peft"
    elif magnitude.dim() >= 2 and magnitude.shape[0] == 1 and magnitude.numel() > 1:
        layout = "in"
    else:
        layout = "out"
    return DoraWeights(inner, magnitude, layout)


def fits(names: set[str]) -> str | None:
    """The DoRA field among a module's fields, if any."""
    found = names & FIELDS
    return next(iter(found)) if len(found) == 1 else None


