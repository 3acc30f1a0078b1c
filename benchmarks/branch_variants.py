"""GPU probe: ways to run a stacked LoRA branch in an eager SDXL UNet, against the untouched UNet, interleaved.

Each targeted Linear (lorakit's 722 transformer-block layers) gets its forward replaced by one variant of
``out = linear(x, W, b) + ((x @ A^T) * s) @ B^T`` with A [R, in], B [out, R] (R = ``--rank``, 4 adapters of 32 by
default). The variants differ in kernels and host work per layer:

- ``four``: linear, shrink, scale in place, addmm_ of the expand into the output (lorakit's branch until session 7);
- ``scaledB``: linear, shrink, addmm_ with a B that already holds the scales (3 kernels);
- ``wide``: one linear against ``[W; s*A]`` (and bias ``[b; 0]``) gives the output and the hidden in one GEMM, then
  addmm_ of the expand into the output's columns (2 kernels; the output is a strided view): lorakit.wide's path.

Prints medians of CUDA-event times of a full UNet forward per variant, and of host time (the forward's wall time
without a sync). Run on the GPU machine (wheels: benchmarks/README.md): ``python3 benchmarks/branch_variants.py``.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lorakit.testing import models as tm
from lorakit.testing.loras import TRANSFORMER_TARGETS

parser = argparse.ArgumentParser()
parser.add_argument("--rank", type=int, default=128)
parser.add_argument("--rounds", type=int, default=6)
args = parser.parse_args()
dev, dt = "cuda", torch.float16
torch.manual_seed(0)
with torch.no_grad():
    unet = tm.sdxl_unet(device=dev, dtype=dt)
    layers = [m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TRANSFORMER_TARGETS)]
    print(len(layers), "layers, rank", args.rank)
    R = args.rank
    fac = []
    for m in layers:
        n, k = m.weight.shape
        a = torch.randn(R, k, device=dev, dtype=dt) * 0.01
        b = torch.randn(n, R, device=dev, dtype=dt) * 0.01
        s = torch.rand(R, device=dev, dtype=dt)
        wide = torch.cat([m.weight, a * s[:, None]])
        wb = None if m.bias is None else torch.cat([m.bias, torch.zeros(R, device=dev, dtype=dt)])
        fac.append((m, m.weight, m.bias, a, b, s, (b * s).t().contiguous(), wide, wb, n))

    def four(W, bias, a, b, s, bst, wide, wb, n):
        def f(x):
            out = F.linear(x, W, bias)
            h = F.linear(x, a)
            h.mul_(s)
            out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t())
            return out
        return f

    def scaledB(W, bias, a, b, s, bst, wide, wb, n):
        def f(x):
            out = F.linear(x, W, bias)
            h = F.linear(x, a)
            out.view(-1, n).addmm_(h.view(-1, R), bst)
            return out
        return f

    def widef(W, bias, a, b, s, bst, wide, wb, n):
        up, sizes = b.t().contiguous(), (n, R)

        def f(x):
            y, h = F.linear(x, wide, wb).split_with_sizes(sizes, -1)
            y.view(-1, n).addmm_(h.view(-1, R), up)
            return y
        return f

    variants = {"base": None, "four": four, "scaledB": scaledB, "wide": widef}

    def install(v):
        for m, *rest in fac:
            if v is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = v(*rest)

    x = torch.randn(2, 4, 128, 128, device=dev, dtype=dt); t = torch.tensor([500, 500], device=dev)
    e = torch.randn(2, 77, 2048, device=dev, dtype=dt)
    ac = {"text_embeds": torch.randn(2, 1280, device=dev, dtype=dt),
          "time_ids": torch.tensor([[1024., 1024, 0, 0, 1024, 1024]] * 2, device=dev, dtype=dt)}

    def fwd():
        return unet(x, t, e, added_cond_kwargs=ac, return_dict=False)[0]

    outs = {}
    for name, v in variants.items():
        install(v); outs[name] = fwd().float(); fwd()
    ref = outs["four"]
    print("max |variant - four|:", {k: float((o - ref).abs().max()) for k, o in outs.items()},
          "effect", float((outs["base"] - ref).abs().max()))
    gpu = {k: [] for k in variants}; host = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, v in variants.items():
            install(v)
            for _ in range(3):
                torch.cuda.synchronize()
                s0 = torch.cuda.Event(enable_timing=True); s1 = torch.cuda.Event(enable_timing=True)
                s0.record(); h0 = time.perf_counter(); fwd(); h1 = time.perf_counter(); s1.record()
                torch.cuda.synchronize()
                gpu[name].append(s0.elapsed_time(s1)); host[name].append((h1 - h0) * 1e3)
    b = statistics.median(gpu["base"])
    for name in variants:
        g = statistics.median(gpu[name]); h = statistics.median(host[name])
        print(f"{name:8s} step {g:7.2f} ms ({g / b:.3f}x base)   host {h:7.2f} ms")
