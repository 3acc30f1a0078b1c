"""One GPU kernel for the batched merge: ``W[i] = base[i] + up[i] @ down[i]`` for a chunk of same-shaped layers, in
one pass over the weights.

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
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch: the cuBLAS/CPU routes do everything
    triton = None

BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS = 64, 128, 32, 4
ENABLED = os.environ.get("LORAKIT_TRITON", "1") != "0"  # LORAKIT_TRITON=0: merges stay on cuBLAS
DTYPES = (torch.float16, torch.bfloat16)
# Per device and dtype: "ready", "compiling" or "failed" (a Triton that cannot build for this GPU); under _LOCK.
_READY: dict[tuple[torch.device, torch.dtype], str] = {}
_LOCK = threading.Lock()
_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
TABLE_CACHE_SIZE = 1024

if triton is not None:
    @triton.jit
    def _merge_kernel(anchor, out_offsets, base_offsets, up, down, M, N, K, up_stride, down_stride,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        layer = tl.program_id(2).to(tl.int64)
        # Each layer's weight and backup as element offsets from one aligned tensor, each a multiple of 16 (checked
        # on the host): the compiler then knows every row is 16-byte aligned and vectorises the loads and stores,
        # which addresses read from a table would not allow (1.7-2.2x the bandwidth, benchmarks/merge_bandwidth.py).
        out = anchor + tl.multiple_of(tl.load(out_offsets + layer), 16)
        base = anchor + tl.multiple_of(tl.load(base_offsets + layer), 16)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        at = rows[:, None].to(tl.int64) * N + cols[None, :]
        held = tl.load(base + at, mask=inside, other=0.0)  # issued first: in flight during the product
        up_tile = up + layer * up_stride + rows[:, None] * K
        down_tile = down + layer * down_stride + cols[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + tl.arange(0, BLOCK_K)
            a = tl.load(up_tile + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(down_tile + kk[:, None] * N, mask=(kk[:, None] < K) & (cols[None, :] < N), other=0.0)
            acc += tl.dot(a, b)
        acc += held.to(tl.float32)
        tl.store(out + at, acc.to(anchor.dtype.element_ty), mask=inside)


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
    if not ENABLED or triton is None or up.device.type != "cuda" or up.dtype not in DTYPES:
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


def _launch(anchor: torch.Tensor, out_offsets: torch.Tensor, base_offsets: torch.Tensor, up: torch.Tensor,
            down: torch.Tensor) -> None:
    n, m, k = up.shape
    cols = down.shape[2]
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(cols, BLOCK_N), n)
    on_gpu = up.device.type == "cuda"  # (the CPU only under TRITON_INTERPRET=1: the tests' way to run the kernel)
    with torch.cuda.device(up.device) if on_gpu else contextlib.nullcontext():
        _merge_kernel[grid](anchor, out_offsets, base_offsets, up, down, m, cols, k, m * k, k * cols,
                            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)


def merge(outs: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], up: torch.Tensor, down: torch.Tensor) -> None:
    """:func:`try_merge`'s write without its checks (sizes and alignment must hold): tests and the compile."""
    anchor = outs[0]
    offsets = [_offsets(ts, anchor.data_ptr(), anchor.itemsize) for ts in (outs, bases)]
    _launch(anchor, *(_on_device(o, up.device) for o in offsets), up, down)


def _ready(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel is compiled for this device and dtype (the first ask starts its compile, in a thread)."""
    key = (device, dtype)
    with _LOCK:
        state = _READY.get(key)
        if state is None:
            _READY[key] = "compiling"
            threading.Thread(target=_compile, args=key, name="lorakit-kernel-compile", daemon=True).start()
    return state == "ready"


def _compile(device: torch.device, dtype: torch.dtype) -> None:
    """Compile (or load from Triton's cache) by running the kernel once on a tiny chunk on a side stream."""
    try:
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
            w = torch.zeros(2, 16, 16, dtype=dtype, device=device)  # sizes divisible by 16, as try_merge asks
            up = torch.zeros(2, 16, 16, dtype=dtype, device=device)
            merge(list(w), list(w), up, up)
            torch.cuda.current_stream().synchronize()
        state = "ready"
    except Exception:  # stay on cuBLAS for good
        state = "failed"
    with _LOCK:
        _READY[(device, dtype)] = state
