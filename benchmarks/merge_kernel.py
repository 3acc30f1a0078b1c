"""GPU probe: the one-pass Triton merge (kernels.py) against the cuBLAS route, interleaved, on an SDXL-sized UNet
with both text encoders (fp16, rank 32, ~1000 layers), plus a bf16 check on Flux-sized large layers.

For each switch kind, alternately with the kernel off and on: median time until the GPU is done, and the largest
difference between the weights the two routes write (both must hold base + delta rounded once). Run on the GPU
machine: ``python3 benchmarks/merge_kernel.py`` (see benchmarks/README.md for the wheels).
"""
from __future__ import annotations

import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lorakit  # noqa: E402
from lorakit import kernels  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_switch import lora_file, python_profile, sdxl_pipe  # noqa: E402


def until_done(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def weights(comps: dict) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for c in comps.values() for m in c.modules() if isinstance(m, torch.nn.Linear)]


def main() -> None:
    dev, dt = "cuda", torch.float16
    pipe, comps = sdxl_pipe(dev, dt)
    for i in range(4):
        pipe.load_lora_weights(lora_file(comps, seed=i), adapter_name="abcd"[i])
    deadline = time.time() + 60
    while not kernels._ready(torch.device(dev, 0), dt) and time.time() < deadline:
        time.sleep(0.05)
    print("kernel state", dict(kernels._READY), "waited", round(60 - (deadline - time.time()), 2), "s")
    w = iter(range(10**6))
    ops = {
        "set_adapters 1 (new weight)": lambda: pipe.set_adapters("a", 0.5 + 0.001 * next(w)),
        "set_adapters 2 (new weights)": lambda: pipe.set_adapters(["a", "b"], [0.5 + 0.001 * next(w), 0.8]),
        "set_adapters 4 (new weights)": lambda: pipe.set_adapters(list("abcd"), [0.5 + 0.001 * next(w), .6, .7, .8]),
        "set 2 <-> 4": lambda: pipe.set_adapters(*((["a", "b"], [0.5, 0.8]) if next(w) % 2 else
                                                    (list("abcd"), [0.5, 0.6, 0.7, 0.8]))),
    }
    for name, fn in ops.items():
        times = {False: [], True: []}
        for rep in range(7):
            for on in (False, True):
                kernels.ENABLED = on
                fn()
                times[on].append(until_done(fn))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name:30s} cuBLAS {off:6.1f} ms   kernel {on:6.1f} ms   ({off / on:.2f}x)")
    if "--sweep" in sys.argv:
        sweep(ops)
    for k in (1, 4):  # the two routes on the same state: the weights they write
        names, ws = list("abcd")[:k], [0.7, 0.6, 0.5, 0.9][:k]
        out = {}
        for on in (False, True):
            kernels.ENABLED = on
            pipe.set_adapters(names, [x + 0.01 for x in ws])
            pipe.set_adapters(names, ws)
            out[on] = weights(comps)
        diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(out[False], out[True])]
        same = sum(torch.equal(a, b) for a, b in zip(out[False], out[True]))
        print(f"{k} adapters: max |cuBLAS - kernel| {max(diffs):.3g}, identical layers {same}/{len(diffs)}")
    kernels.ENABLED = True
    check_bf16(dev)


def sweep(ops: dict) -> None:
    """Block shapes of the kernel, and where a switch's time goes with the default ones."""
    kernels.ENABLED = True
    default = (kernels.BLOCK_M, kernels.BLOCK_N, kernels.BLOCK_K, kernels.NUM_WARPS)
    # (session 4: 64x128x32 with 4 warps, and 7 other shapes from 32x128 to 128x128, were within 0.5 ms of each other)
    for config in (default, (64, 128, 64, 4)):
        kernels.BLOCK_M, kernels.BLOCK_N, kernels.BLOCK_K, kernels.NUM_WARPS = config
        row = []
        for name in ("set_adapters 1 (new weight)", "set_adapters 4 (new weights)"):
            ops[name]()
            row.append(statistics.median(until_done(ops[name]) for _ in range(7)))
        print("blocks", config, "set_adapters 1 / 4:", " / ".join(f"{t:.1f}" for t in row), "ms")
    kernels.BLOCK_M, kernels.BLOCK_N, kernels.BLOCK_K, kernels.NUM_WARPS = default
    for name in ("set_adapters 1 (new weight)", "set_adapters 4 (new weights)"):
        fn = ops[name]
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        print(name, f"host {host:.1f} ms; kernels of 3 calls:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10))
        print(python_profile(fn, "tottime", 25))


def check_bf16(dev: str, width: int = 3072) -> None:
    """Flux-sized large layers in bf16 (the large-layer route of the cuBLAS path) against an fp32 reference."""
    torch.manual_seed(0)
    shapes = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    for route in (False, True):
        kernels.ENABLED = route
        lin = torch.nn.Sequential(*[torch.nn.Linear(i, o, bias=False) for o, i in shapes]).to(dev, torch.bfloat16)
        pipe = types.SimpleNamespace(transformer=lin)
        lorakit.attach(pipe, mode="merge")
        sd = {}
        g = torch.Generator().manual_seed(1)
        for j, (o, i) in enumerate(shapes):
            sd[f"transformer.{j}.lora_A.weight"] = (torch.randn(16, i, generator=g) * 0.02).bfloat16()
            sd[f"transformer.{j}.lora_B.weight"] = (torch.randn(o, 16, generator=g) * 0.02).bfloat16()
        base = [m.weight.detach().clone() for m in lin]
        pipe.load_lora_weights(sd, adapter_name="x")
        while route and not kernels._ready(torch.device(dev, 0), torch.bfloat16):
            time.sleep(0.05)
        pipe.set_adapters("x", 0.9)
        pipe.set_adapters("x", 0.8)
        worst = 0.0
        for j, m in enumerate(lin):
            up = sd[f"transformer.{j}.lora_B.weight"].to(dev).float() * 0.8
            want = torch.addmm(base[j].float(), up.bfloat16().float(), sd[f"transformer.{j}.lora_A.weight"].to(dev).float())
            worst = max(worst, (m.weight.float() - want).abs().max().item() / want.abs().max().item())
        ms = statistics.median(until_done(lambda: pipe.set_adapters("x", 0.7 + 0.01 * r)) for r in range(7))
        print(f"bf16 Flux-sized, {'kernel' if route else 'cuBLAS'}: set_adapters {ms:.2f} ms, "
              f"max rel. error vs fp32 {worst:.3g}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
