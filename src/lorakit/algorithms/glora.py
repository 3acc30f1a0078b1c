"""LyCORIS GLoRA: ``W' = W + s * (W @ a1 @ a2 + b1 @ b2)``, s = alpha / r; it depends on the weight it changes.

Shapes (LyCORIS ``GLoRAModule``): ``a1 [in, r]``, ``a2 [r, in]`` (1x1 for convs, acting on input channels),
``b1 [out, r(, 1, 1)]``, ``b2 [r, in(, kh, kw)]``, or Tucker ``b2 [r, in, 1, 1]`` + ``bm [r, r, kh, kw]``;
r = ``a2.shape[0]``. The weight used is the one the layer holds when GLoRA is applied (base plus additive
adapters), as in ComfyUI's patch chain. ComfyUI's "old GLoRA" layout (``b2 @ b1 + W @ a2 @ a1``) is not read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import WeightDelta
from .base import Algorithm, Shape, layer_problem, weight_dims

FIELDS = frozenset({"a1", "a2", "b1", "b2", "bm"})


@dataclass
class GloraWeights(WeightDelta):
    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    bm: torch.Tensor | None = None
    alpha: float | None = None
    additive = False

    @property
    def rank(self) -> int:
        return int(self.a2.shape[0])

    def _b(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        b1, b2 = self.b1.to(dtype).flatten(1), self.b2.to(dtype).flatten(1)
        if self.bm is not None:
            return torch.einsum("mnkl,im,nj->ijkl", self.bm.to(dtype), b1, b2).reshape(shape)
        return (b1 @ b2).reshape(shape)

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise TypeError("GLoRA's delta depends on the weight: use apply(weight, multiplier)")

    def apply(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        mix = self.a1.float().flatten(1) @ self.a2.float().flatten(1)  # [in, in]
        wa = torch.einsum("oi...,ij->oj...", weight, mix)
        return weight + multiplier * (wa + self._b(tuple(weight.shape), torch.float32))


def check(shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    problem = layer_problem(module)
    if problem:
        return problem
    out, inp, kernel = weight_dims(module)
    a1, a2, b1, b2 = (shapes[k] for k in ("a1", "a2", "b1", "b2"))
    r = a2[0]
    b_in = inp if "bm" in shapes else inp * math.prod(kernel)
    ok = (a1[0] == inp and math.prod(a1[1:]) == r and math.prod(a2[1:]) == inp and b1[0] == out
          and math.prod(b1[1:]) == b2[0] and math.prod(b2[1:]) == b_in)
    if ok and "bm" in shapes:
        bm = shapes["bm"]
        ok = len(bm) == 4 and bm[:2] == (b2[0], b2[0]) and tuple(bm[2:]) == kernel
    if not ok:
        return (f"GLoRA a1 {list(a1)}, a2 {list(a2)}, b1 {list(b1)}, b2 {list(b2)} do not fit weight "
                f"{list(module.weight.shape)}: expected a1 [{inp}, r], a2 [r, {inp}], b1 [{out}, r], b2 [r, {b_in}]")
    return None


ALGORITHM = Algorithm(
    name="glora", fields=FIELDS,
    complete=lambda names: {"a1", "a2", "b1", "b2"} <= names,
    check=check,
    build=lambda f, alpha: GloraWeights(f["a1"], f["a2"], f["b1"], f["b2"], f.get("bm"), alpha),
    rank=lambda shapes: int(shapes["a2"][0]),
    shape=lambda s: (s["b1"][0], math.prod(s["b2"][1:]) * (math.prod(s["bm"][2:]) if "bm" in s else 1)),
)
