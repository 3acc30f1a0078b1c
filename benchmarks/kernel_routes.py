"""GPU probe: the time of a merge-mode switch on the group kernel's route against the chunk route (stacked factors,
one launch of the chunk kernel per group of same-shaped layers), on an SDXL UNet (fp16) and a FLUX.1-dev-sized
transformer (bf16), 4 rank-32 adapters. Each switch changes every multiplier; timed until the GPU is done, medians,
the routes interleaved. Run on the GPU machine (see benchmarks/README.md for the wheels):

    python3 benchmarks/kernel_routes.py [--model sdxl|flux|both] [--repeats 9] [--blocks 128,128,32,8 ...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lorakit  # noqa: E402
from lorakit import batched, kernels  # noqa: E402
from lorakit.testing import models as tm  # noqa: E402
from lorakit.testing.loras import TRANSFORMER_TARGETS, make_lora, to_state_dict  # noqa: E402

FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                "norm1.linear", "norm1_context.linear", "norm.linear")  # (bench.py's)


def switch_ms(pipe, names: list[str], step: int) -> tuple[float, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe.set_adapters(names, [0.5 + 0.01 * (step % 7)] + [0.6] * (len(names) - 1))
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3


def probe(model: str, repeats: int, blocks: list[tuple[int, ...]]) -> None:
    dtype = torch.float16 if model == "sdxl" else torch.bfloat16
    net = tm.sdxl_unet(device="cuda", dtype=dtype) if model == "sdxl" else tm.flux_transformer(device="cuda", dtype=dtype)
    targets = TRANSFORMER_TARGETS if model == "sdxl" else FLUX_TARGETS
    routes = {}
    pipe = types.SimpleNamespace(unet=net) if model == "sdxl" else types.SimpleNamespace(transformer=net)
    manager = lorakit.attach(pipe, mode="merge")
    default = (kernels.BLOCK_M, kernels.BLOCK_N, kernels.BLOCK_K, kernels.NUM_WARPS)
    # (unloaded in between: the next loads lay out the other route)
    for route, config in [("group", default), ("chunk", default), *(("group", b) for b in blocks), ("group", default)]:
        batched.KERNEL_DEVICES = ("cuda",) if route == "group" else ()
        kernels.BLOCK_M, kernels.BLOCK_N, kernels.BLOCK_K, kernels.NUM_WARPS = config
        for i in range(4):
            sd = to_state_dict(make_lora(net, rank=32, seed=i, targets=targets, dtype=dtype), "peft",
                               "unet" if model == "sdxl" else "transformer")
            pipe.load_lora_weights(sd, adapter_name=f"a{i}")
        deadline = time.time() + 120
        while not kernels.ready(torch.device("cuda", 0), dtype) and time.time() < deadline:
            time.sleep(0.05)
        names = [f"a{i}" for i in range(4)]
        for step in range(3):
            switch_ms(pipe, names, step)
        routes[route] = [switch_ms(pipe, names, step) for step in range(repeats)]
        layers = sum(len(s.layers) for s in manager.states.values())
        print(f"{model} {route:5s} {config}: {layers} layers, switch of 4 adapters: host "
              f"{statistics.median(r[0] for r in routes[route]):6.2f} ms, until done "
              f"{statistics.median(r[1] for r in routes[route]):6.2f} ms", flush=True)
        pipe.unload_lora_weights()
        batched.clear_cache()
    batched.KERNEL_DEVICES = ("cuda",)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="both", choices=("sdxl", "flux", "both"))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--blocks", nargs="*", default=[],
                        help="group-kernel tile configs to try besides the default: BLOCK_M,BLOCK_N,BLOCK_K,WARPS")
    args = parser.parse_args()
    for model in (("sdxl", "flux") if args.model == "both" else (args.model,)):
        probe(model, args.repeats, [tuple(int(v) for v in b.split(",")) for b in args.blocks])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
