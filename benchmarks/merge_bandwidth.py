"""GPU probe: bandwidth of the merge kernel on single chunks, against a multi-tensor copy of the same bytes, and of
variants that guided its design (addresses in a table; one launch per layer; offsets from an aligned anchor, the
variant kernels.py adopted; block shapes). Run on the GPU machine: ``PYTHONPATH=src python3 benchmarks/merge_bandwidth.py``.
Session 4's run is in results/2026-11-29-h200-merge-bandwidth-session4.txt (made before the adoption: its "kernel (tables)"
row is the library's kernel then; the script's "kernel (library)" row now times the adopted one)."""
import statistics, sys
import torch, triton, triton.language as tl
sys.path.insert(0, "src")
from lorakit import kernels

@triton.jit
def k_direct(out, base, up, down, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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

@triton.jit
def k_anchor(anchor, out_off, base_off, up, down, M, N, K, up_stride, down_stride,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    layer = tl.program_id(2).to(tl.int64)
    out = anchor + tl.multiple_of(tl.load(out_off + layer), 16)
    base = anchor + tl.multiple_of(tl.load(base_off + layer), 16)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    at = rows[:, None].to(tl.int64) * N + cols[None, :]
    held = tl.load(base + at, mask=inside, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up_t = up + layer * up_stride + rows[:, None] * K
    down_t = down + layer * down_stride + cols[None, :]
    for k in range(0, K, BLOCK_K):
        kk = k + tl.arange(0, BLOCK_K)
        a = tl.load(up_t + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(down_t + kk[:, None] * N, mask=(kk[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    acc += held.to(tl.float32)
    tl.store(out + at, acc.to(anchor.dtype.element_ty), mask=inside)

def gpu_ms(fn, n=9):
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return statistics.median(ts)

dev, dt = "cuda", torch.float16
for (n, M, N, K) in ((60, 1280, 5120, 32), (120, 640, 640, 32), (60, 1280, 1280, 128)):
    bases = [torch.randn(M, N, device=dev, dtype=dt) for _ in range(n)]
    outs = [torch.empty_like(b) for b in bases]
    up = torch.randn(n, M, K, device=dev, dtype=dt) * 0.01
    down = torch.randn(n, K, N, device=dev, dtype=dt)
    gb = 2 * n * M * N * 2 / 1e9
    res = {}
    res["foreach copy"] = gpu_ms(lambda: torch._foreach_copy_(outs, bases))
    res["kernel (library)"] = gpu_ms(lambda: kernels.merge(outs, bases, up, down))
    grid2 = (triton.cdiv(M, 64), triton.cdiv(N, 128))
    def direct():
        for i in range(n):
            k_direct[grid2](outs[i], bases[i], up[i], down[i], M, N, K, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32)
    res["kernel per layer (aligned args)"] = gpu_ms(direct)
    anchor = bases[0]
    a0 = anchor.data_ptr()
    offs_o = torch.tensor([(t.data_ptr() - a0) // 2 for t in outs], device=dev)
    offs_b = torch.tensor([(t.data_ptr() - a0) // 2 for t in bases], device=dev)
    grid3 = (triton.cdiv(M, 64), triton.cdiv(N, 128), n)
    res["kernel (anchor + aligned offsets)"] = gpu_ms(lambda: k_anchor[grid3](anchor, offs_o, offs_b, up, down, M, N, K, M * K, K * N, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32))
    for bm, bn, w in ((64, 128, 4), (128, 128, 8), (64, 256, 8)):
        g = (triton.cdiv(M, bm), triton.cdiv(N, bn), n)
        res[f"anchor {bm}x{bn} w{w}"] = gpu_ms(lambda: k_anchor[g](anchor, offs_o, offs_b, up, down, M, N, K, M * K, K * N, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, num_warps=w))
    ref = torch.stack([torch.addmm(b.float(), up[i].float(), down[i].float()).half() for i, b in enumerate(bases)])
    k_anchor[grid3](anchor, offs_o, offs_b, up, down, M, N, K, M * K, K * N, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32)
    print(f"chunk n={n} {M}x{N} K={K}: {gb:.2f} GB moved by a one-pass merge; anchor kernel max err {(torch.stack(outs).float()-ref.float()).abs().max().item():.3g}")
    for k, v in res.items():
        print(f"  {k:36s} {v:7.3f} ms  {gb / v:6.2f} TB/s")
