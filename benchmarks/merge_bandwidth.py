"""GPU probe: bandwidth of the merge kernel (kernels.py) on single chunks of same-shaped layers, against a
multi-tensor copy of the same bytes, at a few block shapes, and against a launch per layer with each weight passed as
an argument (so that the compiler sees its alignment). Run on the GPU machine:
``PYTHONPATH=src python3 benchmarks/merge_bandwidth.py``.

Session 4's run (results/2026-11-29-h200-merge-bandwidth-session4.txt) was made before kernels.py took weights as
aligned offsets from one tensor: its "kernel (tables)" row is the kernel that read each address from a table, and its
"anchor" rows are the kernel as adopted."""
import statistics
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, "src")
from lorakit import kernels  # noqa: E402


@triton.jit
def k_direct(out, base, up, down, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The kernel's tile for one layer whose weight and backup are arguments."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    at = rows[:, None].to(tl.int64) * N + cols[None, :]
    held = tl.load(base + at, mask=inside, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + tl.arange(0, BLOCK_K)
        a = tl.load(up + rows[:, None] * K + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(down + kk[:, None] * N + cols[None, :], mask=(kk[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    acc += held.to(tl.float32)
    tl.store(out + at, acc.to(out.dtype.element_ty), mask=inside)


def gpu_ms(fn, n: int = 9) -> float:
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def with_blocks(config: tuple[int, int, int], fn) -> float:
    saved = kernels.BLOCK_M, kernels.BLOCK_N, kernels.NUM_WARPS
    kernels.BLOCK_M, kernels.BLOCK_N, kernels.NUM_WARPS = config
    try:
        return gpu_ms(fn)
    finally:
        kernels.BLOCK_M, kernels.BLOCK_N, kernels.NUM_WARPS = saved


def main() -> None:
    dev, dt = "cuda", torch.float16
    probe = torch.zeros(1, 16, 16, device=dev, dtype=dt)
    while not kernels.try_merge(list(probe), list(probe), probe, probe):  # compiled in the background
        time.sleep(0.05)
    for n, m, cols, k in ((60, 1280, 5120, 32), (120, 640, 640, 32), (60, 1280, 1280, 128)):
        bases = [torch.randn(m, cols, device=dev, dtype=dt) for _ in range(n)]
        outs = [torch.empty_like(b) for b in bases]
        up = torch.randn(n, m, k, device=dev, dtype=dt) * 0.01
        down = torch.randn(n, k, cols, device=dev, dtype=dt)
        gb = 2 * n * m * cols * 2 / 1e9
        res = {"foreach copy": gpu_ms(lambda: torch._foreach_copy_(outs, bases))}
        for config in ((64, 128, 4), (128, 128, 8), (64, 256, 8)):
            res[f"kernel {config[0]}x{config[1]} w{config[2]}"] = with_blocks(
                config, lambda: kernels.try_merge(outs, bases, up, down))  # the library's path: offsets cached
        grid = (triton.cdiv(m, 64), triton.cdiv(cols, 128))

        def per_layer() -> None:
            for i in range(n):
                k_direct[grid](outs[i], bases[i], up[i], down[i], m, cols, k, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32)

        res["kernel launched per layer (aligned args)"] = gpu_ms(per_layer)
        kernels.merge(outs, bases, up, down)
        want = torch.stack([torch.addmm(b.float(), up[i].float(), down[i].float()).half() for i, b in enumerate(bases)])
        err = (torch.stack(outs).float() - want.float()).abs().max().item()
        print(f"chunk n={n} {m}x{cols} K={k}: {gb:.2f} GB moved by a one-pass merge; kernel max err {err:.3g}")
        for name, ms in res.items():
            print(f"  {name:40s} {ms:7.3f} ms  {gb / ms:6.2f} TB/s")


if __name__ == "__main__":
    with torch.no_grad():
        main()
