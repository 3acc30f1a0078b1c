"""One file module onto several diffusers modules: fused layers (qkv, linear1) split by output rows, and adaLN
halves swapped, exactly.

A LoRA ``up @ down`` restricted to output rows ``[a, b)`` is ``up[a:b] @ down``: each target keeps the file's
``down``, its rank and its alpha, so scale and product are those of the file. Other algorithms (LoKr...) are wrapped
in :class:`RowSliceDelta`, which takes the rows of the full delta.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapter import LoraWeights, WeightDelta, WrappedDelta
from ..algorithms.full import BiasAdded


def fused_module(modules: list[nn.Module]) -> nn.Module:
    """A weightless stand-in for the fused layer the file was made for (outputs of ``modules`` stacked, with a bias
    when every part has one), for shape checks. Every part must be a Linear with the same inputs."""
    ins = {int(m.weight.shape[1]) for m in modules}
    if not all(isinstance(m, nn.Linear) for m in modules) or len(ins) != 1:
        raise ValueError("fused targets must be Linear layers with the same input width")
    rows = sum(int(m.weight.shape[0]) for m in modules)
    return nn.Linear(ins.pop(), rows, bias=all(m.bias is not None for m in modules), device="meta")


def _swap(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], 0)


class RowSliceDelta(WrappedDelta):
    """Rows ``[start, stop)`` of another delta (optionally with its two halves swapped), for non-low-rank algorithms
    on fused layers. Alpha, rank and scale are the inner delta's."""

    def __init__(self, inner: WeightDelta, rows: tuple[int, int] | None, total_rows: int, swap_halves: bool = False):
        self.inner, self.rows, self.total_rows, self.swap_halves = inner, rows, total_rows, swap_halves

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        full = self.inner.unscaled_delta((self.total_rows, *shape[1:]), dtype)
        if self.swap_halves:
            full = _swap(full)
        return full if self.rows is None else full[self.rows[0]:self.rows[1]]

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.inner.tensors()


def split_delta(delta: WeightDelta, rows: tuple[int, int] | None, total_rows: int, swap_halves: bool) -> WeightDelta:
    """The part of ``delta`` (made for a layer with ``total_rows`` outputs) that one target module receives."""
    if rows is None and not swap_halves:
        return delta
    if isinstance(delta, BiasAdded):  # the bias is split like the output rows it adds to
        bias = _swap(delta.diff_b) if swap_halves else delta.diff_b
        bias = bias if rows is None else bias[rows[0]:rows[1]]
        return BiasAdded(split_delta(delta.inner, rows, total_rows, swap_halves), bias, delta.scaled)
    if isinstance(delta, LoraWeights):
        up = _swap(delta.up) if swap_halves else delta.up
        if rows is not None:
            up = up[rows[0]:rows[1]]
        return LoraWeights(down=delta.down, up=up, alpha=delta.alpha, mid=delta.mid)
    return RowSliceDelta(delta, rows, total_rows, swap_halves)
