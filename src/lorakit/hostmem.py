"""Host memory that lorakit frees and allocates again (adapter files' bytes, branch-mode factor pools) is recycled.

A CPU load writes a file's data section and the layers' factor pools into fresh memory: ~31,000 first-touch page
faults for a 69 MB SD1.5 LoRA, which cost more system time than the load's own work, again at every load after an
unload (the C allocator returns large blocks to the kernel when they are freed). Here a freed buffer goes to a bounded
free list instead, and the next request of a fitting size takes it with its pages already mapped.

A buffer is lent out as a tensor over a numpy view of a kept block: when the last tensor (or view) of it dies, the
view's finalizer puts the block back on the list. Blocks are only ever reused after that, so no live tensor can see
its memory rewritten. At most :data:`LIMIT_BYTES` wait on the list (``LORAKIT_HOST_CACHE_MB``; 0 turns recycling
off); the oldest go first. :func:`release` frees them all.

Example:
    >>> buf = hostmem.empty(1 << 20)          # 1 MiB of uint8 on the CPU, recycled when it dies  # doctest: +SKIP
    >>> hostmem.release()                     # give the kept blocks back to the system           # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

LIMIT_BYTES = int(float(os.environ.get("LORAKIT_HOST_CACHE_MB", "1024")) * 2**20)
MIN_BYTES = 64 * 1024  # smaller requests: the C allocator's own free lists serve them without new pages
_ALIGN = 64

_lock = threading.Lock()
_free: OrderedDict[int, np.ndarray] = OrderedDict()  # id -> block, oldest first
_sizes: list[tuple[int, int]] = []  # (size, id), sorted: best fit by bisection
_held = 0


def _forget_lock_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a lock another thread held at the fork would never be released in the child


os.register_at_fork(after_in_child=_forget_lock_after_fork)


def empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of ``nbytes``, from a recycled block when one fits (at most 2x the size)."""
    if nbytes < MIN_BYTES or LIMIT_BYTES <= 0:
        return torch.empty(nbytes, dtype=torch.uint8)
    block = _take(nbytes)
    if block is None:
        block = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = (-block.ctypes.data) % _ALIGN
    view = block[start:start + nbytes]
    weakref.finalize(view, _give_back, block).atexit = False
    return torch.from_numpy(view)


def empty_typed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype`` (see :func:`empty`)."""
    return empty(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


def release() -> int:
    """Free every kept block; returns how many bytes were kept."""
    global _held
    with _lock:
        held, _held = _held, 0
        _free.clear()
        _sizes.clear()
    return held


def held_bytes() -> int:
    """Bytes kept for reuse right now."""
    return _held


def _take(nbytes: int) -> np.ndarray | None:
    global _held
    with _lock:
        i = bisect.bisect_left(_sizes, (nbytes + _ALIGN, -1))
        if i == len(_sizes) or _sizes[i][0] > 2 * nbytes + _ALIGN:
            return None
        size, key = _sizes.pop(i)
        _held -= size
        return _free.pop(key)


def _give_back(block: np.ndarray) -> None:
    global _held
    if LIMIT_BYTES <= 0 or block.nbytes > LIMIT_BYTES:
        return
    with _lock:
        _free[id(block)] = block
        bisect.insort(_sizes, (block.nbytes, id(block)))
        _held += block.nbytes
        while _held > LIMIT_BYTES:
            key, old = _free.popitem(last=False)
            _sizes.remove((old.nbytes, key))
            _held -= old.nbytes
