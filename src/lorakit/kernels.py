"""GPU kernels for the merge: ``W[i] = base[i] + sum_j m[i, j] * up_j[i] @ down_j[i]`` in one pass over the weights.

Two of them. The group kernel (:func:`merge_group`) re-merges every layer of a switch plan that changed in ONE
launch, whatever their shapes and adapter counts: each layer's weight, backup and adapter factors are rows of a table
of offsets, the factors read where the load put them, each multiplier applied to its ``up`` tile in fp32 and rounded
once. A switch then costs one transfer of multipliers and one launch instead of host work per layer or per group
(~2 ms of host time for ~1000 SDXL layers, from 6-9). The chunk kernel (:func:`try_merge`), for a chunk of
same-shaped layers with stacked factors, serves the batched route of batched.py for the layers the group kernel
cannot take.

The cuBLAS route (batched.py) needs three passes over every weight of a chunk: stack the backups into one tensor,
``baddbmm`` into it, and copy the result back into the parameters, which live in separate allocations. A switch of
an SDXL UNet with its text encoders re-merges ~5 GB of fp16 weights, so the switch is bound by memory traffic. This
kernel reads each backup once and writes each parameter once, wherever they live: their offsets from one of them
are passed in a table, and each program computes one tile of one layer (the low-rank product in fp32, the backup
added in fp32, rounded once to the weight's dtype, as cuBLAS does with ``beta=1``).

It is compiled by Triton the first time it is asked for on a device and dtype, in a background thread: until it is
ready (a second or two on a cold cache), merges take the cuBLAS route, so no switch waits for a compiler. Without
Triton, for dtypes other than fp16/bf16 (fp32 stays on cuBLAS: no TF32 rounding), or with the environment variable
``LORAKIT_TRITON=0``, :func:`try_merge` declines and the cuBLAS route runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Without Triton (a CPU-only torch) the cuBLAS/CPU routes do everything. Only its presence is checked here: the
# kernels (lorakit.triton_kernels) are imported at the first launch.
TRITON = importlib.util.find_spec("triton") is not None

BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS = 64, 128, 32, 4
ENABLED = os.environ.get("LORAKIT_TRITON", "1") != "0"  # LORAKIT_TRITON=0: merges stay on cuBLAS
DTYPES = (torch.float16, torch.bfloat16)
# Per device and dtype: "ready", "compiling" or "failed" (a Triton that cannot build for this GPU); under _LOCK.
_READY: dict[tuple[torch.device, torch.dtype, str], str] = {}
_LOCK = threading.Lock()
ERRORS: dict[tuple[torch.device, torch.dtype, str], str] = {}  # why a kernel failed to compile, for a bug report
_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
TABLE_CACHE_SIZE = 1024

def _jit():
    """The Triton kernels' module, imported at the first launch (absolute: the tests load this file on its own)."""
    from lorakit import triton_kernels
    return triton_kernels


def _offsets(tensors: Sequence[torch.Tensor], anchor: int, itemsize: int) -> tuple[int, ...] | None:
    """Element offsets of the tensors from the address ``anchor``, or None unless each is a multiple of 16."""
    out = []
    for t in tensors:
        gap = t.data_ptr() - anchor
        if gap % (16 * itemsize):
            return None
        out.append(gap // itemsize)
    return tuple(out)


def _on_device(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``values`` as int64 on the device, kept for the next switch of the same layers (a few hundred bytes each)."""
    key = (device, *values)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
        if len(_TABLES) > TABLE_CACHE_SIZE:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def try_merge(outs: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], up: torch.Tensor,
              down: torch.Tensor) -> bool:
    """``outs[i] = bases[i] + up[i] @ down[i]`` (2-D views ``[M, N]``) in one launch, where the kernel applies and is
    compiled; False (nothing written) otherwise.

    ``outs``/``bases``: contiguous tensors of ``M * N`` elements in ``up``'s dtype on its device; ``up`` ``[n, M, K]``
    and ``down`` ``[n, K, N]`` contiguous. The kernel applies to fp16/bf16 on CUDA with M, N and K multiples of 16
    and 32-byte aligned weights and backups (the one variant compiled: Triton specialises sizes and addresses on
    divisibility by 16, and another variant would compile on the spot, stalling a switch). The first call for a
    device and dtype starts the compile in the background and returns False."""
    if not ENABLED or not TRITON or up.device.type != "cuda" or up.dtype not in DTYPES:
        return False
    n, m, k = up.shape
    cols = down.shape[2]
    anchor = outs[0]
    if m % 16 or k % 16 or cols % 16 or anchor.data_ptr() % 16 or not _ready(up.device, up.dtype):
        return False
    out_offsets = _offsets(outs, anchor.data_ptr(), anchor.itemsize)
    base_offsets = _offsets(bases, anchor.data_ptr(), anchor.itemsize)
    if out_offsets is None or base_offsets is None:
        return False
    _launch(anchor, _on_device(out_offsets, up.device), _on_device(base_offsets, up.device), up, down)
    return True


def _launching_on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device`` (the CPU only under TRITON_INTERPRET=1: the tests' way to run the kernels)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(anchor: torch.Tensor, out_offsets: torch.Tensor, base_offsets: torch.Tensor, up: torch.Tensor,
            down: torch.Tensor) -> None:
    n, m, k = up.shape
    cols = down.shape[2]
    grid = (-(-m // BLOCK_M), -(-cols // BLOCK_N), n)
    with _launching_on(up.device):
        _jit().merge_kernel[grid](anchor, out_offsets, base_offsets, up, down, m, cols, k, m * k, k * cols,
                                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)


def merge(outs: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], up: torch.Tensor, down: torch.Tensor) -> None:
    """:func:`try_merge`'s write without its checks (sizes and alignment must hold): tests and the compile."""
    anchor = outs[0]
    offsets = [_offsets(ts, anchor.data_ptr(), anchor.itemsize) for ts in (outs, bases)]
    _launch(anchor, *(_on_device(o, up.device) for o in offsets), up, down)


@dataclass
class GroupTables:
    """What :func:`merge_group` needs besides the multipliers, for one group of layers (built once per switch plan):
    per layer ``[first tile, M, N, weight, backup, adapters, (up, down, rank) per adapter]``, addresses as element
    offsets from ``anchor``."""

    anchor: torch.Tensor
    table: torch.Tensor  # int64 [layers, 6 + 3 * width], on the device
    tiles: int
    width: int  # adapters per layer, at most


# One layer: [M, N, weight address, backup address, adapters, (up address, down address, rank) per adapter]
Addresses = list[int]
SEARCH_BITS = 16  # layers per group: fewer than 2**16


def _table(layers: Sequence[Addresses], origin: int) -> tuple[torch.Tensor, int, int]:
    """(int64 table: each layer's first tile, then its addresses row padded to the widest, tiles in all, width)."""
    width = max(row[4] for row in layers)
    full = 5 + 3 * width
    pad = [origin, origin, 16] * width  # (padding: aligned, never read)
    # (through an array: twice as fast as torch.tensor of nested lists, ~1000 rows at every plan layout)
    flat = array("q", itertools.chain.from_iterable(row if len(row) == full else row + pad[:full - len(row)]
                                                    for row in layers))
    table = torch.frombuffer(flat, dtype=torch.int64).view(len(layers), full)
    tiles = (table[:, 0] + BLOCK_M - 1) // BLOCK_M * ((table[:, 1] + BLOCK_N - 1) // BLOCK_N)
    first = torch.cumsum(tiles, 0) - tiles
    return torch.cat([first[:, None], table], 1), int(tiles.sum()), width


def _address_columns(width: int) -> torch.Tensor:
    return torch.tensor([3, 4, *(c for j in range(width) for c in (6 + 3 * j, 7 + 3 * j))])


def group_tables(layers: Sequence[Addresses], anchor: torch.Tensor) -> tuple[GroupTables | None, list[int]]:
    """``(tables, [])`` for ``[M, N, weight address, backup address, adapters, (up address, down address, rank) per
    adapter]`` of each layer (``up`` [M, r] and ``down`` [r, N], every tensor contiguous, in ``anchor``'s dtype, on
    its device: the caller checks); ``(None, the layers at fault)`` where an address is not a multiple of 16
    elements away from ``anchor``'s or a rank not a multiple of 16; ``(None, [])`` where ``N`` is not a multiple of
    16. Alignment lets the kernel vectorise its loads and stores (see :func:`lorakit.triton_kernels.group_kernel`).
    The caller checks :func:`ready` before merging (False off CUDA: tests run the kernel under Triton's
    interpreter)."""
    if not TRITON or not layers or len(layers) >= 1 << SEARCH_BITS or anchor.dtype not in DTYPES \
            or anchor.data_ptr() % 16:
        return None, []
    origin = anchor.data_ptr()
    table, tiles, width = _table(layers, origin)
    where = _address_columns(width)
    offsets = table[:, where] - origin
    ranks = table[:, 8::3]
    sizes = torch.stack([table[:, 1] * table[:, 2], table[:, 1] * ranks.max(1).values,
                         ranks.max(1).values * table[:, 2]], 1)  # (the kernel's index math is 32-bit)
    bad = (offsets % (16 * anchor.itemsize)).any(1) | (ranks % 16).any(1) | (sizes >= 2 ** 31).any(1)
    if bool(bad.any()):
        return None, bad.nonzero().flatten().tolist()
    if bool((table[:, 2] % 16).any()):
        return None, []
    table[:, where] = offsets // anchor.itemsize
    return GroupTables(anchor, table.to(anchor.device, non_blocking=True), tiles, width), []


def merge_group(tables: GroupTables, mults: torch.Tensor) -> None:
    """For every layer ``i`` of the group whose flag ``mults[i, -1]`` is not 0: ``weight = backup + sum_j
    round(mults[i, j] * up_j) @ down_j`` with fp32 accumulation, rounded once, over the adapters whose multiplier is
    not 0 (none: the backup, copied exactly). ``mults``: float32 ``[layers, width + 1]`` on the device."""
    with _launching_on(tables.anchor.device):
        _jit().group_kernel[(tables.tiles,)](
            tables.anchor, tables.table, mults, tables.table.shape[0], tables.table.shape[1], mults.shape[1],
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SEARCH=SEARCH_BITS, num_warps=NUM_WARPS)


def ready(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether both kernels are compiled for this device and dtype (the first ask starts their compile in a
    background thread)."""
    return ENABLED and TRITON and device.type == "cuda" and _ready(device, dtype, "group")


def _ready(device: torch.device, dtype: torch.dtype, kind: str = "chunk") -> bool:
    """Whether a kernel is compiled for this device and dtype (the first ask starts its compile, in a thread)."""
    key = (device, dtype, kind)
    with _LOCK:
        state = _READY.get(key)
        if state is None:
            _READY[key] = "compiling"
            threading.Thread(target=_compile, args=key, name="lorakit-kernel-compile", daemon=True).start()
    return state == "ready"


def _compile(device: torch.device, dtype: torch.dtype, kind: str) -> None:
    """Compile (or load from Triton's cache) by running the kernel once on tiny layers on a side stream."""
    try:
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
            w = torch.zeros(2, 16, 16, dtype=dtype, device=device)  # sizes divisible by 16, as the kernels ask
            up = torch.zeros(2, 16, 16, dtype=dtype, device=device)
            if kind == "group":
                tables, _ = group_tables([[16, 16, w[0].data_ptr(), w[1].data_ptr(), 1, up[0].data_ptr(),
                                           up[1].data_ptr(), 16]], w)
                merge_group(tables, torch.zeros(1, 2, device=device))
            else:
                merge(list(w), list(w), up, up)
            torch.cuda.current_stream().synchronize()
        state = "ready"
    except Exception as exc:  # stay on cuBLAS for good
        state = "failed"
        ERRORS[(device, dtype, kind)] = f"{type(exc).__name__}: {exc}"
    with _LOCK:
        _READY[(device, dtype, kind)] = state
