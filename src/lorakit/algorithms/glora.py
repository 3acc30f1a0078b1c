"""LyCORIS GLoRA: ``W' = W + s * (W @ a1 @ a2 + b1 @ b2)``, s = alpha / r; it depends on the weight it changes.

Shapes (LyCORIS ``GLoRAModule``): ``a1 [in, r]``, ``a2 [r, in]`` (1x1 for convs, acting on input channels),
``b1 [out, r(, 1, 1)]``, ``b2 [r, in(, kh, kw)]``, or Tucker ``b2 [r, in, 1, 1]`` + ``bm [r, r, kh, kw]``;
r = ``a2.shape[0]``. The weight used is the one the layer holds when GLoRA is applied (base plus additive
adapters), as in ComfyUI's patch chain.

Older LyCORIS files (ComfyUI's "old GLoRA") store the factors the other way round: ``a1 [r, in]``, ``a2 [in, r]``,
``b1 [r, in]``, ``b2 [out, r]``, r = ``a1.shape[0]``, and ``W' = W + s * (W @ a2 @ a1 + b2 @ b1)`` on the 2-D weight.
Shapes alone can fit both layouts (square weights); then, as ComfyUI decides, the old layout is read when ``a2`` has
as many rows as the square weight, which needs the target's shape (:meth:`GloraWeights.fit`).
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


def _dims(t: Shape) -> tuple[int, int]:
    return int(t[0]), int(math.prod(t[1:]))


def layouts(shapes: Mapping[str, Shape]) -> tuple[bool, bool]:
    """(fits the old layout, fits the new layout) from the factor shapes alone: both on square weights."""
    if "bm" in shapes:
        return False, True
    a1, a2, b1, b2 = (_dims(shapes[k]) for k in ("a1", "a2", "b1", "b2"))
    return b2[1] == b1[0] == a1[0] == a2[1], b2[0] == b1[1] == a1[1] == a2[0]


def is_old(shapes: Mapping[str, Shape], weight_shape: Shape | None = None) -> bool:
    """Whether ``a1, a2, b1, b2`` are in the old layout (ComfyUI's rule; ``weight_shape`` settles square cases)."""
    old, new = layouts(shapes)
    if old and new:
        return weight_shape is not None and _dims(shapes["a2"])[0] == weight_shape[0] == weight_shape[1]
    return old


def file_rank(shapes: Mapping[str, Shape]) -> int | str:
    """The rank inspection reports without a model: ``"8 or 64"`` (new-layout rank, old-layout rank) when the
    shapes fit both layouts with different ranks, which only the target weight's shape settles."""
    old, new = layouts(shapes)
    old_rank, new_rank = int(shapes["a1"][0]), int(shapes["a2"][0])
    if old and new and old_rank != new_rank:
        return f"{new_rank} or {old_rank}"
    return old_rank if old else new_rank


@dataclass
class GloraWeights(WeightDelta):
    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    bm: torch.Tensor | None = None
    alpha: float | None = None
    old: bool = False
    additive = False

    @property
    def rank(self) -> int:
        return int(self.a1.shape[0] if self.old else self.a2.shape[0])

    def fit(self, shape: Shape) -> GloraWeights:
        self.old = is_old({k: tuple(getattr(self, k).shape) for k in ("a1", "a2", "b1", "b2")}, shape)
        return self

    def _b(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        b1, b2 = self.b1.to(dtype).flatten(1), self.b2.to(dtype).flatten(1)
        if self.bm is not None:
            return torch.einsum("mnkl,im,nj->ijkl", self.bm.to(dtype), b1, b2).reshape(shape)
        return (b1 @ b2).reshape(shape)

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise TypeError("GLoRA's delta depends on the weight: use apply(weight, multiplier)")

    def apply(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        if self.old:
            w2d = weight.flatten(1)
            f = [t.float().flatten(1).to(weight.device) for t in (self.a1, self.a2, self.b1, self.b2)]
            return weight + multiplier * (w2d @ f[1] @ f[0] + f[3] @ f[2]).reshape(weight.shape)
        mix = self.a1.float().flatten(1) @ self.a2.float().flatten(1)  # [in, in]
        wa = torch.einsum("oi...,ij->oj...", weight, mix)
        return weight + multiplier * (wa + self._b(tuple(weight.shape), torch.float32))


def check(shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    problem = layer_problem(module)
    if problem:
        return problem
    out, inp, kernel = weight_dims(module)
    a1, a2, b1, b2 = (shapes[k] for k in ("a1", "a2", "b1", "b2"))
    if is_old(shapes, tuple(module.weight.shape)):
        flat, r = inp * math.prod(kernel), a1[0]
        if (_dims(a1), _dims(a2), _dims(b1), _dims(b2)) != ((r, flat), (flat, r), (r, flat), (out, r)):
            return (f"old-layout GLoRA a1 {list(a1)}, a2 {list(a2)}, b1 {list(b1)}, b2 {list(b2)} do not fit weight "
                    f"{list(module.weight.shape)}: expected a1 [r, {flat}], a2 [{flat}, r], b1 [r, {flat}], "
                    f"b2 [{out}, r]")
        return None
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
    build=lambda f, alpha: GloraWeights(f["a1"], f["a2"], f["b1"], f["b2"], f.get("bm"), alpha,
                                        is_old({k: tuple(v.shape) for k, v in f.items()})),
    rank=file_rank,
    shape=lambda s: (s["b1"][0], math.prod(s["b2"][1:]) * (math.prod(s["bm"][2:]) if "bm" in s else 1)),
)
