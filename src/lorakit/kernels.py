"""One GPU kernel for the batched merge: ``W[i] = base[i] + up[i] @ down[i]`` for a chunk of same-shaped layers, in
one pass over the weights.

The cuBLAS route (batched.py) needs three passes over every weight of a chunk: stack the backups into one tensor,
``baddbmm`` into it, and copy the result back into the parameters, which live in separate allocations. A switch of
an SDXL UNet with its text encoders re-merges ~5 GB of fp16 weights, so the switch is bound by memory traffic. This
kernel reads each backup once and writes each parameter once, wherever they live: a table of their addresses is
passed in, and each program computes one tile of one layer (the low-rank product in fp32, the backup added in fp32,
rounded once to the weight's dtype, as cuBLAS does with ``beta=1``).

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
    def _merge_kernel(out_table, base_table, up, down, M, N, K, up_stride, down_stride, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        layer = tl.program_id(2).to(tl.int64)
        dtype = up.dtype.element_ty
        out = tl.load(out_table + layer).to(tl.pointer_type(dtype))
        base = tl.load(base_table + layer).to(tl.pointer_type(dtype))
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        at = rows[:, None].to(tl.int64) * N + cols[None, :]
        held = tl.load(base + at, mask=inside, other=0.0)  # issued first: in flight during the product
        ranks = tl.arange(0, BLOCK_K)
        up_tile = up + layer * up_stride + rows[:, None] * K
        down_tile = down + layer * down_stride + cols[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + ranks
            a = tl.load(up_tile + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(down_tile + kk[:, None] * N, mask=(kk[:, None] < K) & (cols[None, :] < N), other=0.0)
            acc += tl.dot(a, b)
        acc += held.to(tl.float32)
        tl.store(out + at, acc.to(dtype), mask=inside)


def _table(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The tensors' addresses on the device, kept for the next switch of the same layers (a table holds only
    addresses, so it is valid for whatever tensors have them)."""
    key = (device, *(t.data_ptr() for t in tensors))
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = torch.tensor(key[1:], dtype=torch.int64).to(device, non_blocking=True)
        if len(_TABLES) > TABLE_CACHE_SIZE:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def merge(outs: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], up: torch.Tensor, down: torch.Tensor) -> None:
    """``outs[i] = bases[i] + up[i] @ down[i]`` (2-D views ``[M, N]``), one launch for the chunk.

    ``outs``/``bases``: contiguous tensors of ``M * N`` elements in ``up``'s dtype on its device; ``up`` ``[n, M, K]`` and ``down`` ``[n, K, N]`` contiguous. Needs Triton (callers go through :func:`try_merge`)."""
    n, m, k = up.shape
    cols = down.shape[2]
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(cols, BLOCK_N), n)
    on_gpu = up.device.type == "cuda"  # (the CPU only under TRITON_INTERPRET=1: the tests' way to run the kernel)
    with torch.cuda.device(up.device) if on_gpu else contextlib.nullcontext():
        _merge_kernel[grid](_table(outs, up.device), _table(bases, up.device), up, down, m, cols, k, m * k, k * cols,
                            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)


def try_merge(outs: Sequence[torch.Tensor], bases: Sequence[torch.Tensor], up: torch.Tensor,
              down: torch.Tensor) -> bool:
    """:func:`merge` where the kernel applies and is compiled; False (nothing written) otherwise.

    It applies to fp16/bf16 on CUDA with every size a multiple of 16 (the one specialisation compiled: Triton
    specialises sizes on divisibility by 16, and another variant would compile on the spot, stalling a switch);
    the first call for a device and dtype starts the compile in the background and returns False."""
    if not ENABLED or triton is None or up.device.type != "cuda" or up.dtype not in DTYPES:
        return False
    if not _ready(up.device, up.dtype):
        return False
    if up.shape[1] % 16 or up.shape[2] % 16 or down.shape[2] % 16:
        return False
    merge(outs, bases, up, down)
    return True


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
