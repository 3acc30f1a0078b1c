"""OFT and BOFT: a block-diagonal (OFT) or butterfly (BOFT) rotation of the weight's output channels.

Definitions follow LyCORIS (``diag_oft.py``, ``boft.py``):

* ``Q = B - B^T`` per block; if the file's alpha is > 0 and ``||Q|| > alpha * out``, Q is scaled onto that bound
  (alpha is a constraint, not a scale); ``R = (I + Q)(I - Q)^-1``. The old LyCORIS ``oft_diag`` key holds R itself
  (as A1111 reads it).
* At multiplier m each block is ``m * R + (1 - m) * I`` (LyCORIS and kohya ``networks/oft.py``; ComfyUI applies m
  a second time when adding the difference, formats.md #5, which lorakit does not follow).
* OFT ``oft_blocks [n, b, b]``: ``W'[k, j] = sum_i R[k, i, j] W[k, i]`` over the weight viewed as ``[n, b, ...]``
  (LyCORIS' einsum ``"k n m, k n ... -> k m ..."``; kohya's ``x @ R`` on outputs is the same).
* BOFT ``oft_blocks [levels, n, b, b]``: level i permutes the output channels (c, 2, 2^i * b/2) -> (c, 2^i * b/2, 2),
  applies ``R[i]`` per block (``W' = R W``), and permutes back: LyCORIS' forward on outputs. (Its weight-space
  merge unflattens the last axis instead of the output axis; ComfyUI and the forward pass agree with lorakit.)
* The optional ``rescale [out, 1, ...]`` multiplies the result whatever the multiplier, as in LyCORIS.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import WeightDelta
from .base import Algorithm, Shape, layer_problem, numel


def cayley(blocks: torch.Tensor, bound: float | None) -> torch.Tensor:
    """``(I + Q)(I - Q)^-1`` of the skew part ``Q = B - B^T`` of each block, Q first scaled onto ``||Q|| <= bound``."""
    b = blocks.float()
    q = b - b.transpose(-1, -2)
    if bound:
        norm = torch.linalg.vector_norm(q) + 1e-8
        if norm > bound:
            q = q * (bound / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _at(r: torch.Tensor, multiplier: float) -> torch.Tensor:
    if multiplier == 1:
        return r
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return multiplier * r + (1 - multiplier) * eye


@dataclass
class OftWeights(WeightDelta):
    """Diagonal OFT (``oft_blocks [n, b, b]``, or ``oft_diag`` holding R) or BOFT (``oft_blocks [levels, n, b, b]``)."""

    blocks: torch.Tensor
    alpha: float | None = None
    rescale: torch.Tensor | None = None
    is_rotation: bool = False  # old ``oft_diag``: the blocks are R
    additive = False

    @property
    def butterfly(self) -> bool:
        return self.blocks.dim() == 4

    @property
    def rank(self) -> int:
        return int(self.blocks.shape[-3])  # block count: LyCORIS' "equivalent lora_dim"

    @property
    def scale(self) -> float:
        return 1.0  # alpha is the rotation's constraint

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise TypeError("OFT rotates the weight: use apply(weight, multiplier)")

    def rotations(self, out: int) -> torch.Tensor:
        if self.is_rotation:
            return self.blocks.float()
        return cayley(self.blocks, self.alpha * out if self.alpha else None)

    def apply(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        out = weight.shape[0]
        r = _at(self.rotations(out).to(weight.device), multiplier)
        if self.butterfly:
            new = self._butterfly(weight, r)
        else:
            n, b = r.shape[0], r.shape[1]
            new = torch.einsum("kij,ki...->kj...", r, weight.reshape(n, b, *weight.shape[1:])).reshape(weight.shape)
        if self.rescale is not None:
            new = new * self.rescale.float().reshape(out, *[1] * (weight.dim() - 1))
        return new

    @staticmethod
    def _butterfly(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        out, b = weight.shape[0], r.shape[-1]
        idx = torch.arange(out, device=weight.device)
        for level in range(r.shape[0]):
            k = 2 ** level * (b // 2)
            perm = idx.reshape(-1, 2, k).transpose(1, 2).reshape(-1)  # (c, 2, k) -> (c, k, 2)
            blocks = weight[perm].reshape(-1, b, *weight.shape[1:])
            rotated = torch.einsum("nij,nj...->ni...", r[level], blocks).reshape(weight.shape)
            weight = torch.empty_like(rotated).index_copy_(0, perm, rotated)  # undo the permutation
        return weight


def check(shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    problem = layer_problem(module)
    if problem:
        return problem
    out = module.weight.shape[0]
    blocks = shapes.get("oft_blocks", shapes.get("oft_diag"))
    if len(blocks) not in (3, 4) or blocks[-1] != blocks[-2]:
        return f"OFT blocks have shape {list(blocks)}, expected [n, b, b] (OFT) or [levels, n, b, b] (BOFT)"
    if blocks[-3] * blocks[-1] != out:
        return f"OFT blocks {list(blocks)} cover {blocks[-3] * blocks[-1]} channels, the layer has {out} outputs"
    if len(blocks) == 4 and (blocks[-1] % 2 or out % (2 ** (blocks[0] - 1) * blocks[-1])):
        return f"BOFT blocks {list(blocks)} do not give a butterfly over {out} outputs"
    if "rescale" in shapes and numel(shapes["rescale"]) != out:
        return f"rescale has shape {list(shapes['rescale'])}, expected [{out}, 1, ...]"
    return None


def build(f: dict[str, torch.Tensor], alpha: float | None) -> OftWeights:
    if "oft_diag" in f:
        return OftWeights(f["oft_diag"], alpha, f.get("rescale"), is_rotation=True)
    return OftWeights(f["oft_blocks"], alpha, f.get("rescale"))


ALGORITHM = Algorithm(
    name="oft", fields=frozenset({"oft_blocks", "oft_diag", "rescale"}),
    complete=lambda names: ("oft_blocks" in names) != ("oft_diag" in names),
    check=check, build=build,
    rank=lambda shapes: int(shapes.get("oft_blocks", shapes.get("oft_diag"))[-3]),
    shape=lambda s: (numel(s.get("oft_blocks", s.get("oft_diag"))[-3:-1]), 0),
)
