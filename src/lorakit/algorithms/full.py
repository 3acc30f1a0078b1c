"""Full deltas: ``diff`` (a whole weight delta) and ``diff_b`` (a bias delta) on any layer with a weight, and
``w_norm`` / ``b_norm`` on LayerNorm / GroupNorm. Each is added times the multiplier; alpha does not apply (LyCORIS
``FullModule`` and ``NormModule``, ComfyUI ``diff``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import WeightDelta, WrappedDelta
from .base import NORM_TYPES, Algorithm, Shape, numel

FULL_TYPES = (nn.Linear, nn.Conv2d, *NORM_TYPES)


@dataclass
class FullWeights(WeightDelta):
    """A full weight delta and/or a bias delta (either may be absent)."""

    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return 1  # no rank: alpha is ignored

    @property
    def scale(self) -> float:
        return 1.0

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.diff is None:
            return torch.zeros(shape, dtype=dtype, device=self.diff_b.device)
        return self.diff.to(dtype).reshape(shape)

    def bias_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b.to(dtype)


@dataclass
class BiasAdded(WrappedDelta):
    """Another algorithm's delta with a bias delta on the same layer.

    ``diff_b`` (Wan LoRAs from musubi-tuner and ComfyUI carry one beside ``lora_down``/``lora_up``) is added times the
    user's weight only, as LyCORIS and ComfyUI do: alpha / rank does not apply. PEFT's ``lora_B.bias``
    (``scaled=True``; FLUX Control LoRAs) is part of the LoRA's output, ``scale * lora_B(lora_A(x))``: it is scaled
    like the weight delta."""

    inner: WeightDelta
    diff_b: torch.Tensor
    scaled: bool = False

    @property
    def additive(self) -> bool:  # type: ignore[override]
        return self.inner.additive

    def low_rank(self) -> None:
        return None  # merged layer by layer, so the bias is written with the weight (batched merges weights only)

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.inner.unscaled_delta(shape, dtype)

    def apply(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        return self.inner.apply(weight, multiplier)

    def bias_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        # the engine multiplies by (user weight x scale): right for lora_B.bias; diff_b takes the user weight alone
        return self.diff_b.to(dtype) if self.scaled else self.diff_b.to(dtype) / self.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.tensors(), ("lora_bias" if self.scaled else "diff_b"): self.diff_b}


def check_bias(shape: Shape, module: nn.Module, field: str = "diff_b") -> str | None:
    """Why a bias delta (``diff_b``, ``lora_bias``) of this shape cannot go with another algorithm on ``module``."""
    return _check("diff", field, FULL_TYPES, {field: shape}, module)


def _check(weight_field: str, bias_field: str, types: tuple, shapes: Mapping[str, Shape],
           module: nn.Module) -> str | None:
    if not isinstance(module, types) or getattr(module, "weight", None) is None:
        return f"targets a {type(module).__name__}; {weight_field}/{bias_field} apply to " + \
            ", ".join(t.__name__ for t in types) + " layers with a weight"
    w = module.weight
    if weight_field in shapes:
        got = shapes[weight_field]
        if numel(got) != w.numel() or got[0] != w.shape[0]:
            return f"{weight_field} has shape {list(got)}, expected the weight's {list(w.shape)}"
    if bias_field in shapes:
        if module.bias is None:
            return f"{bias_field} given but the layer has no bias (lorakit writes bias deltas into the layer's own)"
        if numel(shapes[bias_field]) != module.bias.numel():
            return f"{bias_field} has shape {list(shapes[bias_field])}, expected the bias' {list(module.bias.shape)}"
    return None


def _shape(s: Mapping[str, Shape], weight_field: str, bias_field: str) -> tuple[int, int]:
    if weight_field in s:
        return s[weight_field][0], numel(s[weight_field][1:])
    return numel(s[bias_field]), 0


FULL = Algorithm(
    name="full", fields=frozenset({"diff", "diff_b"}),
    complete=lambda names: bool(names),
    check=lambda shapes, module: _check("diff", "diff_b", FULL_TYPES, shapes, module),
    build=lambda f, alpha: FullWeights(f.get("diff"), f.get("diff_b"), alpha),
    rank=lambda shapes: "full",
    shape=lambda s: _shape(s, "diff", "diff_b"),
)
NORM = Algorithm(
    name="norm", fields=frozenset({"w_norm", "b_norm"}),
    complete=lambda names: bool(names),
    check=lambda shapes, module: _check("w_norm", "b_norm", NORM_TYPES, shapes, module),
    build=lambda f, alpha: FullWeights(f.get("w_norm"), f.get("b_norm"), alpha),
    rank=lambda shapes: "full",
    shape=lambda s: _shape(s, "w_norm", "b_norm"),
)
