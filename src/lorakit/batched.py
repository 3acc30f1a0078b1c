"""Merging many layers at once: a few kernels per group of same-shaped layers instead of several per layer.

A switch of the adapter mix (``set_adapters``, a call-time scale, a load) re-merges every targeted weight. On an
accelerator the cost of doing that layer by layer is launch overhead and Python (~1000 layers for an SDXL UNet with
its text encoders), not arithmetic. Layers are grouped by weight shape and adapter ranks::

    W[i] = base[i] + sum_j m[i, j] * up_j[i] @ down_j[i]        for every layer i of a group
         = baddbmm(stack(base), cat_j(stack(up_j) * m[:, j]), cat_j(stack(down_j)))

Per adapter, its stacked factors over a group are cached, so a switch costs per group: one multiply per adapter,
one concatenation, and the write; every multiplier of the switch crosses to the device in one transfer. On CUDA in
fp16/bf16 the write is one Triton kernel that reads each backup once and writes each weight once (kernels.py).
Elsewhere (fp32, the CPU, no Triton, or while the kernel compiles) it is BLAS: the backups stacked, one ``baddbmm``
and one multi-tensor copy back; very large layers (Flux's 3072x12288 and up) take one ``addmm`` each there,
straight from the backup into the weight: two passes over the weight fewer than the batched route, which saves more
GPU time than the ~50 us of host time per call costs (benchmarks/profile_switch.py measures both).

On CUDA in fp16/bf16 switch plans merge most layers without any of this: one launch of the group kernel for all of
them, reading the factors where they are (:class:`Segment`, kernels.py); the groups here take the rest (factors off
alignment, ranks that are not multiples of 16, very large layers, fp32, the CPU, and every layer while that kernel
compiles).

Numerics match the per-layer path: each adapter's multiplier is applied to its ``up`` factor in fp32 and rounded
once to the compute dtype; on the GPU the product runs in the weight's dtype (cuBLAS accumulates in fp32).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from . import kernels
from .adapter import WeightDelta
from .layers import Contribution, LayerState, _signature

CHUNK_BYTES = 512 * 1024 * 1024  # compute-dtype temporaries per chunk of small layers: stacked bases
DEVICES = ("cuda",)  # where batching pays off (kernel launches dominate); tests add "cpu" to exercise it
KERNEL_DEVICES = ("cuda",)  # where switch plans lay out segments for the group kernel (tests: "cpu", interpreted)
# From this many elements up, a layer's own addmm beats the batched product (bandwidth, not launches, dominates):
# 2 passes of an 18M-element bf16 weight take ~17 us on an H200, against ~50 us of host time per addmm.
LARGE_ELEMENTS = 16 * 1024 * 1024

# What a layer's ``applied`` says after a switch plan wrote it: equal to no signature, so per-layer paths (and
# state_dict's view of the weights) recompute rather than trust it.
PLAN_WRITTEN: tuple = ("<written by a switch plan>",)

_STACKS: OrderedDict[tuple[int, ...], tuple[list[WeightDelta], torch.Tensor, torch.Tensor]] = OrderedDict()
STACK_CACHE_SIZE = 512


def _stacked(deltas: list[WeightDelta], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked ``(up [n, out, r], down [n, r, in])`` of one adapter over a chunk of layers, cached: switching the
    mix reuses them. The cache holds the deltas themselves, so their ids (the key) cannot be reused while cached."""
    key = (*(id(d) for d in deltas), dtype)
    hit = _STACKS.get(key)
    if hit is not None:
        _STACKS.move_to_end(key)
        return hit[1], hit[2]
    pairs = [d.low_rank() for d in deltas]
    up, down = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]).to(dtype)
    _STACKS[key] = (deltas, up, down)
    if len(_STACKS) > STACK_CACHE_SIZE:
        _STACKS.popitem(last=False)
    return up, down


def clear_cache() -> None:
    """Drop every cached stack."""
    _STACKS.clear()


def forget(deltas: Iterable[WeightDelta]) -> None:
    """Drop the cached stacks that hold any of these deltas (an adapter deleted or swapped out: frees their memory,
    while the other adapters' stacks stay ready for the next switch)."""
    if not _STACKS:  # (the group kernel's route keeps none)
        return
    gone = {id(d) for d in deltas}
    for key in [k for k in _STACKS if not gone.isdisjoint(k[:-1])]:
        del _STACKS[key]


@torch.no_grad()
def refresh(swapped: frozenset[int]) -> None:
    """Recompute, in place, the cached stacks that hold any of these deltas (their values changed: a hotswap): one
    multi-tensor copy from every delta's factors into the stacks' rows."""
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    for key, (deltas, up, down) in _STACKS.items():
        if not swapped.isdisjoint(key[:-1]):
            pairs = [d.low_rank() for d in deltas]
            dst += (*up.unbind(0), *down.unbind(0))
            src += [p[0] for p in pairs] + [p[1] for p in pairs]  # (down's stack may be in another dtype)
    if dst:
        torch._foreach_copy_(dst, src)


def batch_key(layer: LayerState, contributions: list[Contribution]) -> tuple | None:
    """The group a layer merges with (same shape, dtype, device, adapter ranks and size class), or None where
    batched merging does not apply: it covers the common case, a weight on a batching device with its backup beside
    it and low-rank adapters only. Plans call this for ~1000 layers per build: what depends on the layer alone is
    cached on it (:func:`_placement`), and the ranks are read off the cached factors."""
    if not contributions:
        return None
    place = _placement(layer)
    if place is None:
        return None
    ranks = []
    for d, _ in contributions:
        factors = d.low_rank() if d.additive else None
        if factors is None:
            return None
        ranks.append(factors[1].shape[0])  # the rank of the stacked factors (that of d.rank, without its Python)
    shape, dtype, device, large = place
    return (shape, dtype, device, tuple(ranks), large)


def _placement(layer: LayerState) -> tuple | None:
    """``(shape, dtype, device, large)`` of a layer batched merging can write (a contiguous weight on a batching
    device, its backup on the same device or to be taken there, no bias backup), else None; kept on the layer until
    its weight's storage or the module's settings change or a backup is taken or dropped (a backup, once taken,
    stays where it is)."""
    token = (layer.weight.data_ptr(), layer.base is None, layer.base_bias is None, layer.backup_device, DEVICES,
             LARGE_ELEMENTS)
    cached = layer._placement
    if cached is not None and cached[0] == token:
        return cached[1]
    shape, dtype, device, compute, contiguous = layer.facts()
    place = None
    if (layer.base_bias is None and device.type in DEVICES and contiguous
            and (layer.base.device if layer.base is not None else layer.backup_device or device) == device):
        place = (shape, dtype, device, shape.numel() >= LARGE_ELEMENTS and dtype == compute)
    layer._placement = (token, place)
    return place


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    # cuBLAS accumulates half-precision products in fp32 and rounds once; elsewhere compute in fp32.
    return w.dtype if w.device.type == "cuda" else torch.float32


@dataclass
class _Chunk:
    members: list[tuple[LayerState, list[Contribution], tuple | None]]  # signature None: written by a switch plan
    large: bool


def can_restore(layer: LayerState) -> bool:
    """Whether the layer's exact restore can go through one multi-tensor copy with others."""
    return layer.base is not None and layer.base.device == layer.weight.device and layer.base_bias is None


@torch.no_grad()
def restore(layers: list[LayerState]) -> None:
    """Copy every layer's backup back into its weight (bit-exact), many tensors per kernel."""
    if not layers:
        return
    # (the parameters themselves, under no_grad: a detached view per layer costs ~2 us each, ~1000 layers)
    torch._foreach_copy_([layer.weight for layer in layers], [layer.base for layer in layers])
    for layer in layers:
        layer.applied = ()


def restore_all(layers: Iterable[LayerState]) -> None:
    """Every layer that holds something back to its base, bit-exactly: many per kernel where :func:`can_restore`,
    the rest one by one."""
    held = [layer for layer in layers if layer.applied != ()]
    restore([layer for layer in held if can_restore(layer)])
    for layer in held:
        if layer.applied != ():  # (those just restored hold nothing now)
            layer.write([])


def split(key: tuple, members: list) -> list[list]:
    """Cut a group into chunks whose stacked temporaries fit CHUNK_BYTES (large layers need none: one chunk)."""
    shape, dtype, device, _, large = key
    size = len(members) if large else max(1, CHUNK_BYTES // (shape.numel() * _compute_dtype_size(dtype, device)))
    return [members[start:start + size] for start in range(0, len(members), size)]


@torch.no_grad()
def write_many(items: list[tuple[LayerState, list[Contribution]]]) -> None:
    """``layer.write(contributions)`` for every item, batching what can be batched."""
    groups: dict[tuple, list[tuple[LayerState, list[Contribution], tuple]]] = defaultdict(list)
    restores: list[LayerState] = []
    for layer, contributions in items:
        signature = _signature(contributions)
        if signature == layer.applied:
            continue
        if not contributions and can_restore(layer):
            restores.append(layer)
            continue
        key = batch_key(layer, contributions)
        if key is None:
            layer.write(contributions)
            continue
        layer.take_backup()
        groups[key].append((layer, contributions, signature))
    if restores:
        restore(restores)
    chunks = []
    for key, members in groups.items():
        for part in split(key, members):
            mults = torch.tensor([[m for _, m in contributions] for _, contributions, _ in part], dtype=torch.float64)
            chunks.append((_Chunk(part, key[-1]), mults))
    merge_chunks(chunks)


def factor_addresses(delta: WeightDelta) -> tuple[int, int, int, torch.dtype, torch.device, float] | None:
    """``(up address, down address, rank, dtype, device, scale)`` of a delta whose factors the group kernel can
    read where they are (contiguous views of its fields: see ``WeightDelta.stable_factors``), else None; kept on the
    delta (its fields keep their addresses, a hotswap copies into them and keeps alpha; a move drops this)."""
    known = delta.__dict__.get("_addresses", False)
    if known is False:
        known = None
        factors = delta.stable_factors() if delta.additive else None
        if factors is not None:
            up, down = factors
            if up.is_contiguous() and down.is_contiguous() and up.dtype == down.dtype and up.device == down.device:
                known = (up.data_ptr(), down.data_ptr(), down.shape[0], up.dtype, up.device, delta.scale)
        delta.__dict__["_addresses"] = known
    return known


@dataclass
class Segment:
    """Layers of one device and dtype that ONE launch of the group kernel re-merges (kernels.merge_group), whatever
    their shapes and adapters: a switch plan's merge, with one transfer of multipliers (see plan._KernelPart)."""

    layers: list[LayerState]
    tables: kernels.GroupTables
    addresses: list[int]  # the weights' addresses the tables point at

    def current(self) -> bool:
        """Whether the kernel can run now: compiled, and every weight still where the tables point (a parameter
        replaced, or moved and back, leaves a plan's key as it was)."""
        t = self.tables
        return kernels.ready(t.anchor.device, t.anchor.dtype) and [
            layer.weight.data_ptr() for layer in self.layers] == self.addresses

    def merge(self, mults: torch.Tensor) -> None:
        """Re-merge the layers flagged in ``mults`` (host float32 ``[layers, width + 1]``: each layer's adapter
        multipliers, then its flag) in one launch."""
        kernels.merge_group(self.tables, mults.to(self.tables.anchor.device, non_blocking=True))


def kernel_factor(dtype: torch.dtype, device: torch.device, delta: WeightDelta) -> tuple | None:
    """The delta's :func:`factor_addresses` where the group kernel can merge it into a weight of this dtype on this
    device (ranks of 16k, factors in the weight's dtype beside it, 16 elements aligned), else None. Plans ask this
    for every delta of ~1000 layers: a few lookups each."""
    known = factor_addresses(delta)
    if known is None or known[2] % 16 or known[3] != dtype or known[4] != device:
        return None
    align = 16 * dtype.itemsize  # (the kernel's vector loads; group_tables checks offsets from its anchor again)
    return known if known[0] % align == 0 and known[1] % align == 0 else None


def kernel_devices(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether plans lay out group-kernel segments for weights on this device in this dtype."""
    return kernels.TRITON and kernels.ENABLED and device.type in KERNEL_DEVICES and dtype in kernels.DTYPES


def segment(layers: list[LayerState], rows: list[kernels.Addresses]) -> tuple[Segment | None, list[int]]:
    """``(segment, [])`` over these layers (``rows``: their addresses, see kernels.group_tables), or ``(None,
    misaligned layers)``, or ``(None, [])`` where the kernel cannot take them."""
    tables, bad = kernels.group_tables(rows, layers[0].weight)
    if tables is None:
        return None, bad
    return Segment(layers, tables, [row[2] for row in rows]), []


def merge_chunks(items: list[tuple[_Chunk, torch.Tensor]], mark: tuple = PLAN_WRITTEN) -> None:
    """:func:`merge_chunk` for each ``(chunk, multipliers [n, K] on the host)``; every multiplier bound for one device
    crosses in one transfer (non-blocking: no wait for the GPU's queued work). Chunks differ in K (adapters per
    layer): the rows are zero-padded to the widest, and each chunk reads only its own K columns."""
    by_device: dict[torch.device, list[tuple[_Chunk, torch.Tensor]]] = defaultdict(list)
    for chunk, mults in items:
        by_device[chunk.members[0][0].weight.device].append((chunk, mults))
    for device, group in by_device.items():
        width = max(m.shape[1] for _, m in group)
        host = torch.cat([torch.nn.functional.pad(m.float(), (0, width - m.shape[1])) for _, m in group])
        moved = host.to(device, non_blocking=True)
        offset = 0
        for chunk, mults in group:
            merge_chunk(chunk, moved[offset:offset + len(mults)], mark)
            offset += len(mults)


def _compute_dtype_size(dtype: torch.dtype, device: torch.device) -> int:
    return (dtype if device.type == "cuda" else torch.float32).itemsize


def merge_chunk(chunk: _Chunk, mults: torch.Tensor, mark: tuple = PLAN_WRITTEN) -> None:
    """Write ``base + sum_j mults[:, j] * up_j @ down_j`` into every member's weight; each member's ``applied``
    becomes its signature, or ``mark`` where the chunk has none (a switch plan's, see plan.py)."""
    members = chunk.members
    cdtype = _compute_dtype(members[0][0].weight)
    ups, downs = [], []
    for j in range(len(members[0][1])):
        up, down = _stacked([contributions[j][0] for _, contributions, _ in members], cdtype)
        scaled = torch.empty(up.shape, dtype=cdtype, device=up.device)
        torch.mul(up, mults[:, j, None, None], out=scaled)  # in fp32, rounded once to the compute dtype
        ups.append(scaled)
        downs.append(down)
    up = ups[0] if len(ups) == 1 else torch.cat(ups, 2)
    down = downs[0] if len(downs) == 1 else torch.cat(downs, 1)
    _write(chunk, up, down)
    for layer, _, signature in members:
        layer.applied = signature if signature is not None else mark


def _write(chunk: _Chunk, up: torch.Tensor, down: torch.Tensor) -> None:
    """``weight = base + up @ down`` for every member (``up``/``down`` stacked over the members, compute dtype)."""
    weights = [layer.weight for layer, _, _ in chunk.members]
    bases = [layer.base for layer, _, _ in chunk.members]
    first = weights[0]
    if up.dtype == first.dtype and kernels.try_merge(weights, bases, up, down):
        return  # each backup read once, each weight written once (see kernels.py)
    rows = first.shape[0]
    if chunk.large:  # the weight is in the compute dtype (see batch_key): write it straight from its backup
        for i, (w, base) in enumerate(zip(weights, bases)):
            torch.addmm(base.view(rows, -1), up[i], down[i], out=w.view(rows, -1))
        return
    acc = torch.stack(bases).to(up.dtype)
    acc.view(len(weights), rows, -1).baddbmm_(up, down)
    # Parameters are written in place (sync runs under no_grad); no per-layer view or detach: host time counts
    torch._foreach_copy_(weights, list(acc.to(first.dtype).unbind(0)))
