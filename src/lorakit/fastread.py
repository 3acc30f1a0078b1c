"""A byte range of a file onto a CUDA device at memory speed: parallel reads into pinned memory, overlapped copies.

A LoRA load or hotswap is bounded by moving the file's data section (218 MB for an SDXL rank-32 LoRA) to the GPU.
Copying from a memory map is a single thread faulting in pages and a pageable (staged, synchronous) transfer: ~5 GB/s.
Here several threads ``preadv`` pieces of the range straight into a small pinned ring (the kernel copies from the page
cache; the GIL is released), and each piece crosses to the GPU asynchronously while the next one is being read.

The ring (``RING_SLOTS`` x ``PIECE_BYTES`` of pinned host memory per device) is allocated on first use and kept: pinning
memory costs more than reading a LoRA. Call :func:`release` to free it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import hostmem

PIECE_BYTES = 32 * 1024 * 1024  # one pinned slot; a piece is read by up to THREADS threads at once
RING_SLOTS = 2
THREADS = max(1, min(8, os.cpu_count() or 1))

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_rings: dict[torch.device, list[tuple[torch.Tensor, torch.cuda.Event | None]]] = {}


def _forget_after_fork() -> None:
    """A forked child has none of the parent's reader threads (a pool that believes it has them would hang): start
    afresh there."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()
    _rings.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def release() -> None:
    """Free the pinned staging memory and the reader threads (they are recreated on the next read)."""
    global _pool
    with _lock:
        for ring in _rings.values():
            for _, event in ring:
                if event is not None:
                    event.synchronize()
        _rings.clear()
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None


def _readers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="lorakit-read")
    return _pool


def _ring(device: torch.device) -> list[tuple[torch.Tensor, torch.cuda.Event | None]]:
    ring = _rings.get(device)
    if ring is None:
        ring = _rings[device] = [(torch.empty(PIECE_BYTES, dtype=torch.uint8, pin_memory=True), None)
                                 for _ in range(RING_SLOTS)]
    return ring


def _pread_all(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset`` (preadv may return short counts)."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n


def _host_view(pinned: torch.Tensor, length: int) -> memoryview:
    return memoryview((ctypes.c_char * length).from_address(pinned.data_ptr())).cast("B")


def _read_parallel(fd: int, buffer: memoryview, offset: int, pool: ThreadPoolExecutor) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``, split over the reader threads (one positioned read where the
    platform has no ``preadv``: Windows)."""
    if not hasattr(os, "preadv"):
        os.lseek(fd, offset, os.SEEK_SET)
        with open(fd, "rb", buffering=0, closefd=False) as fh:
            done = 0
            while done < len(buffer):
                n = fh.readinto(buffer[done:])
                if not n:
                    raise OSError(f"unexpected end of file at byte {offset + done}")
                done += n
        return
    step = max(1, -(-len(buffer) // THREADS))
    parts = [pool.submit(_pread_all, fd, buffer[i:i + step], offset + i) for i in range(0, len(buffer), step)]
    for part in parts:
        part.result()


def read_to_device(path: str | os.PathLike, start: int, length: int, device: torch.device) -> torch.Tensor:
    """Bytes ``[start, start + length)`` of ``path`` as a uint8 tensor on ``device`` (CUDA: through the pinned ring;
    elsewhere: read straight into the result).

    Returns once every read is done; the last copies may still be in flight on the current stream (work queued after
    them on that stream sees the data).

    Example:
        >>> data = read_to_device("lora.safetensors", 8 + header_len, n, torch.device("cuda"))  # doctest: +SKIP
    """
    out = hostmem.empty(length) if device.type == "cpu" else torch.empty(length, dtype=torch.uint8, device=device)
    with _lock, open(path, "rb", buffering=0) as fh:
        fd, pool = fh.fileno(), _readers()
        if device.type != "cuda":
            if length:
                _read_parallel(fd, _host_view(out, length), start, pool)
            return out
        try:
            ring = _ring(device)
        except RuntimeError:  # no pinned memory to be had (locked-memory limits): read to the host, copy once
            host = torch.empty(length, dtype=torch.uint8)
            if length:
                _read_parallel(fd, _host_view(host, length), start, pool)
            return out.copy_(host)
        stream = torch.cuda.current_stream(device)
        for index, offset in enumerate(range(0, length, PIECE_BYTES)):
            size = min(PIECE_BYTES, length - offset)
            pinned, event = ring[index % RING_SLOTS]
            if event is not None:
                event.synchronize()  # the copy out of this slot (RING_SLOTS pieces ago) is done: overwrite it
            _read_parallel(fd, _host_view(pinned, size), start + offset, pool)
            out[offset:offset + size].copy_(pinned[:size], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            ring[index % RING_SLOTS] = (pinned, event)
    return out
