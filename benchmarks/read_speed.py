"""GPU probe: moving a LoRA file's data section to the GPU, three ways, interleaved (medians of --repeats).

- ``mmap``: one pageable copy from a memory map (lorakit before session 3);
- ``safetensors``: ``safetensors.torch.load_file(device="cuda")`` (a copy per tensor, as diffusers does);
- ``fastread``: ``lorakit.fastread.read_to_device`` (parallel preadv into a pinned ring, overlapped copies).

Run on the GPU machine: ``python3 benchmarks/read_speed.py --mb 228``. The file is in the page cache (just
written), as for a LoRA that was loaded before or written by a trainer.
"""
from __future__ import annotations

import argparse
import mmap
import statistics
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lorakit import fastread  # noqa: E402


def via_mmap(path: str) -> torch.Tensor:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        start = 8 + struct.unpack("<Q", mapped[:8])[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            host = torch.frombuffer(mapped, dtype=torch.uint8, offset=start, count=len(mapped) - start)
        data = host.to("cuda", copy=True)
        del host
    return data


def via_fastread(path: str) -> torch.Tensor:
    with open(path, "rb") as fh:
        start = 8 + struct.unpack("<Q", fh.read(8))[0]
    return fastread.read_to_device(path, start, Path(path).stat().st_size - start, torch.device("cuda"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=228)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    n = args.mb * 1024 * 1024 // 2 // 1972
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/lora.safetensors"
        save_file({f"t{i}": torch.randn(n, dtype=torch.float16) for i in range(1972)}, path)
        ways = {"mmap": via_mmap, "safetensors": lambda p: load_file(p, device="cuda"), "fastread": via_fastread}
        ref = via_mmap(path)
        assert torch.equal(via_fastread(path), ref)
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.repeats):
            for name, fn in ways.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(path)
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) * 1e3)
        size = Path(path).stat().st_size / 1e6
        print(f"file {size:.0f} MB, threads {fastread.THREADS}, medians of {args.repeats}:")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:12s} {med:7.1f} ms  {size / med:5.1f} GB/s   (min {min(ts):.1f}, max {max(ts):.1f})")


if __name__ == "__main__":
    main()
