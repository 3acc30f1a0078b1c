"""Branch mode's eager fast path for Linear layers: the base GEMM also computes the branch's shrink.

An eager diffusers denoiser on a fast GPU is bound by host time (an SDXL UNet at 1024 px on an H200: the host takes
~60 of a 63 ms step), so a runtime branch costs what it adds in Python and kernel launches per layer. A branch run
as ``linear, shrink, scale, expand`` took an SDXL step with 4 adapters to 1.50-1.75x base; one GEMM against the
weight widened by the scaled down factors, ``[W; s*A]`` (and the bias by zeros), yields the output and the branch's
hidden at once, and one ``addmm_`` adds the expand into the output's columns: 1.29-1.38x, the same two kernels
written by hand 1.26-1.30x (``benchmarks/branch_variants.py``). Layers on :data:`DEVICES` only. Layers that read one
input run as a :mod:`lorakit.fanout` instead (the same two kernels for all of them).

:class:`WideLinear` re-homes the module's weight (and bias) as the first rows of that wider matrix: the parameter
keeps its identity and its values (every write to it lands in the matrix), only its storage moves. The other rows
are rewritten from the branch's factors and per-rank multipliers whenever those change (tracked by identity and
version counters, looked at only when lorakit's count of its own branch writes moved: :func:`changed`). What it
returns is a view of the GEMM's output (the output columns, row stride ``out + rank``): it splits and flattens like
a contiguous tensor except across its last dimension (``.view(-1)`` needs ``.reshape``). Inference only: with grad
enabled, under ``torch.compile``, for Conv2d, subclasses with their own forward, or mismatched dtypes the layer runs
the plain branch.

Memory: ``capacity`` extra rows per widened layer (the layer's factor pool's capacity: the down factors of every
adapter loaded on it, a second time), and one copy of the weight each time it is widened (once, unless the ranks
outgrow the capacity or the module moves).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .layers import LayerState

# Where layers take this path: on CUDA an eager step is bound by host time. On the CPU the arithmetic dominates: an
# SD1.5 step ran as fast on the plain branch, and widening cost its first forward after a load 0.3 s (a copy of
# every targeted weight), so CPU layers keep their parameters' storage. (Tests add "cpu" to run the path.)
# LORAKIT_WIDE=0, or DEVICES = () before the first forward: the plain branch everywhere (outputs contiguous,
# parameters where they were).
DEVICES: tuple[str, ...] = () if os.environ.get("LORAKIT_WIDE", "1") == "0" else ("cuda",)


def _all_zero(scale: torch.Tensor) -> bool:
    """Whether every multiplier of the buffer ``scale`` views (a group's vector, a switch plan's buffer) is 0. Noted
    on the buffer with its version: one host sync per buffer and change, not one per layer."""
    root = scale if scale._base is None else scale._base
    seen = getattr(root, "_lorakit_zero", None)
    if seen is None or seen[0] != root._version:
        seen = root._lorakit_zero = (root._version, not bool(root.any()))
    return seen[1]


# How many times lorakit wrote something a running branch reads (see changed()). A widened layer or a fanout that
# found its branch as its rows hold it at this count checks only its parameters' places until the count moves.
_changes = [0]


def changed() -> None:
    """lorakit wrote something a running branch reads (factors, multipliers, a span) or gave a layer another
    branch: widened layers and fanouts check their branches again at their next forward. Every such write in lorakit
    calls this (lorakit.layers, lorakit.pool, lorakit.plan, lorakit.hotswap); version counters alone would cost a
    few attribute reads per layer and forward (~700 layers per SDXL step, bound by host time)."""
    _changes[0] += 1


# The matrix, its views and the parameters' new storage are made outside inference mode even when the first forward
# runs inside it: inference tensors would turn the parameters into ones that no later in-place write (a fuse, a merge,
# an unload) or autograd may touch.
_normal = torch.inference_mode(False)


class WideLinear:
    """A Linear's weight and bias as the first rows of ``[W; s*A]`` and ``[b; 0]``, with the expand's factor."""

    @_normal
    def __init__(self, module: nn.Linear, capacity: int) -> None:
        w = module._parameters["weight"]
        b = module._parameters["bias"]
        out, k = w.shape
        with torch.no_grad():
            self.matrix = w.new_empty(out + capacity, k)
            self.matrix[:out].copy_(w)
            self.bias = None
            if b is not None:
                self.bias = b.new_zeros(out + capacity)
                self.bias[:out].copy_(b)
        # assigning .data keeps the Parameter object (and anything holding it) and its values: only storage moves
        w.data = self.matrix[:out]
        if b is not None:
            b.data = self.bias[:out]
        self.out, self.capacity, self.dtype = out, capacity, w.dtype
        self.ptrs = (self.matrix.data_ptr(), 0 if b is None else self.bias.data_ptr())
        self.source: tuple = (None, None, -1, -1)  # (down, scale, their versions): what the rows hold
        self.used = self.used_bias = self.up = None
        self.sizes = (out, 0)
        self.idle = False  # every multiplier 0 (a call-time scale of 0): the plain layer runs, bit for bit the base
        self.stamp = -1  # the count of changed() at which run() last found the branch as the rows hold it
        self._by_rank: dict[int, tuple] = {}

    def homed(self, module: nn.Module) -> bool:
        """Whether the module's parameters still live in the matrix (``.to()``/``.half()`` replace their data)."""
        p = module._parameters
        b = p["bias"]
        return p["weight"].data_ptr() == self.ptrs[0] and (0 if b is None else b.data_ptr()) == self.ptrs[1]

    def ready(self, module: nn.Module, x: torch.Tensor, branch: tuple[torch.Tensor, torch.Tensor],
              scale: torch.Tensor) -> bool:
        """Whether it can run ``x`` through this branch now, rewriting the rows when only the factors' or the
        multipliers' values changed; False when the module moved, ``x`` has another dtype, or the branch does not
        fit the matrix (the caller widens afresh or runs the plain branch). The first line is every forward's."""
        if self.fresh(branch, scale) and x.dtype == self.dtype and self.homed(module):
            return True
        down = branch[0]
        if not (x.dtype == self.dtype and self.homed(module) and self.holds(down)):
            return False
        with torch.no_grad():
            torch.mul(down, scale[:, None], out=self._views(down.shape[0])[0])
        self.point(branch, scale)
        return True

    def fresh(self, branch: tuple[torch.Tensor, torch.Tensor], scale: torch.Tensor) -> bool:
        """Whether the rows hold this branch's down factors times these multipliers, as they are now."""
        down = branch[0]
        src = self.source
        return src[0] is down and src[1] is scale and src[2] == down._version and src[3] == scale._version

    def holds(self, down: torch.Tensor) -> bool:
        """Whether these down factors fit the matrix's rows (rank, dtype, device, width)."""
        m = self.matrix
        return (down.shape[0] <= self.capacity and down.dtype == m.dtype and down.device == m.device
                and down.shape[1] == m.shape[1])

    @_normal
    def _views(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(the rows for ``rank`` ranks, the matrix down to them, the bias down to them), made once per rank."""
        views = self._by_rank.get(rank)
        if views is None:
            m, end = self.matrix, self.out + rank
            views = self._by_rank[rank] = (m[self.out:end], m[:end], None if self.bias is None else self.bias[:end])
        return views

    @_normal
    def point(self, branch: tuple[torch.Tensor, torch.Tensor], scale: torch.Tensor) -> None:
        """Run this branch from now on: its rows hold ``down * scale`` already (:meth:`ready` or :func:`rewrite`)."""
        down = branch[0]
        rank = down.shape[0]
        _, self.used, self.used_bias = self._views(rank)
        self.up = branch[1].t()  # [rank, out]
        self.sizes = (self.out, rank)
        self.source = (down, scale, down._version, scale._version)
        self.idle = _all_zero(scale)

    def run(self, layer: LayerState, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Every forward's path once set up: :meth:`__call__` when the rows hold ``layer``'s branch as it is now
        (:meth:`fresh`, :meth:`homed` and ``LayerState.live`` inlined: this runs on ~700 layers per step), else
        None (the caller goes the slow way: :meth:`LayerState.wide_for`). The branch is looked at only when lorakit
        :func:`changed` something since the last look."""
        if self.idle or x.dtype != self.dtype:
            return None
        p = module._parameters
        b = p["bias"]
        if p["weight"].data_ptr() != self.ptrs[0] or (0 if b is None else b.data_ptr()) != self.ptrs[1]:
            return None
        stamp = _changes[0]
        if self.stamp != stamp:
            group = layer.group
            branch = layer.branch
            if branch is None or (group is not None and layer._epoch != group.epoch):
                return None
            down, scale, src = branch[0], layer.branch_scale, self.source
            if not (src[0] is down and src[1] is scale and src[2] == down._version and src[3] == scale._version):
                return None
            self.stamp = stamp
        y, hidden = F.linear(x, self.used, self.used_bias).split_with_sizes(self.sizes, -1)
        y.view(-1, self.out).addmm_(hidden.view(-1, self.sizes[1]), self.up)
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(x, W, b) + ((x @ A^T) * s) @ B^T`` in two kernels (after :meth:`ready`, when not idle)."""
        y, hidden = F.linear(x, self.used, self.used_bias).split_with_sizes(self.sizes, -1)
        y.view(-1, self.out).addmm_(hidden.view(-1, self.sizes[1]), self.up)
        return y

    @_normal
    def release(self, module: nn.Module) -> None:
        """Give the module's parameters storage of their own again (the values stay): the extra rows are freed."""
        if self.homed(module):
            for name in ("weight", "bias"):
                p = module._parameters[name]
                if p is not None:
                    p.data = p.data.clone()


def write_scaled(rows: list[torch.Tensor], downs: list[torch.Tensor], columns: list[torch.Tensor]) -> None:
    """``rows[i] = downs[i] * columns[i]`` (a per-rank multiplier column) for all of them in two multi-tensor
    operations: what a switch rewrites under widened weights (here and in :mod:`lorakit.fanout`)."""
    torch._foreach_copy_(rows, downs)
    torch._foreach_mul_(rows, columns)


@torch.no_grad()
def rewrite(items: list[tuple[WideLinear, tuple[torch.Tensor, torch.Tensor], torch.Tensor]]) -> None:
    """Rewrite many matrices' rows for their branches at once: two multi-tensor operations instead of a few kernels
    per layer (what a switch would cost each layer at its first forward after it, ~60 us of host time per layer on
    an H200's host). ``items``: (matrix, branch, per-rank scale), each branch fitting its matrix (:meth:`holds`)."""
    if not items:
        return
    rows = [wide._views(branch[0].shape[0])[0] for wide, branch, _ in items]
    columns: dict[int, torch.Tensor] = {}  # (layers of a group share their scale vector: one column view each)
    scales = [columns.setdefault(id(scale), scale[:, None]) for _, _, scale in items]
    write_scaled(rows, [branch[0] for _, branch, _ in items], scales)
    for wide, branch, scale in items:
        wide.point(branch, scale)
