"""CPU probe: the host time a runtime branch adds to each layer's forward.

An eager diffusers denoiser on a fast GPU is bound by host time (an SDXL UNet step at 1024 px on an H200: ~42 ms of
GPU work in an 86 ms step), so what a branch costs there is mostly the Python and the kernel launches it adds per
layer. This probe reproduces that regime on the CPU: a chain of many tiny ``nn.Linear(64, 64)`` layers (722, as
many as lorakit targets in an SDXL UNet), batch 1, one thread, where the arithmetic is negligible. It times a forward
of the chain with branches of ``--adapters`` LoRAs (``lorakit.attach(..., mode="branch")``) against the same chain
without, interleaved, and prints the medians and the time added per layer. ``--tokens N`` feeds [1, N, width]
inputs (3-D, as diffusers' attention layers get them) instead of [1, width]. ``--device cuda`` runs the same chain
on the GPU, where the kernels are tiny and the time is the host's (kernel launches included). The chain also runs
with the wide path written by hand (``[W; s*A]`` GEMM, split, ``addmm_``: lorakit.wide's kernels without its
bookkeeping). From the repository root:

    python benchmarks/branch_host.py [--layers 722] [--adapters 4] [--rounds 200] [--tokens 0] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lorakit
import lorakit.wide
from lorakit.testing.loras import make_lora, to_state_dict


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(width, width)


class Chain(nn.Module):
    """``layers`` tiny Linear layers in sequence (each named ``blocks.i.to_q``, a path LoRA files target)."""

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block.to_q(x)
        return x


def by_hand(base: Chain, rank: int) -> Chain:
    """A copy of ``base`` whose layers run the wide path as plain closures (random factors of ``rank``)."""
    chain = copy.deepcopy(base)
    for block in chain.blocks:
        lin = block.to_q
        w = lin.weight.detach()
        wide = torch.cat([w, torch.randn(rank, w.shape[1], dtype=w.dtype, device=w.device) * 0.02])
        bias = torch.cat([lin.bias.detach(), w.new_zeros(rank)])
        up = torch.randn(rank, w.shape[0], dtype=w.dtype, device=w.device) * 0.02
        sizes = (w.shape[0], rank)

        def forward(x, wide=wide, bias=bias, up=up, sizes=sizes):
            y, h = F.linear(x, wide, bias).split_with_sizes(sizes, -1)
            y.view(-1, sizes[0]).addmm_(h.view(-1, sizes[1]), up)
            return y
        lin.forward = forward
    return chain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=722)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=0, help="0: inputs [1, width]; N: [1, N, width]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--wide", action="store_true", help="let CPU layers take lorakit.wide's path")
    args = parser.parse_args()
    if args.wide:
        lorakit.wide.DEVICES = ("cuda", "cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    base = Chain(args.layers, args.width).eval().to(args.device, dtype)
    model = copy.deepcopy(base)
    pipe = types.SimpleNamespace(transformer=model)
    lorakit.attach(pipe, mode="branch")
    names = [f"a{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        layers = make_lora(model, rank=args.rank, seed=i, targets=("to_q",), std=0.02, dtype=dtype)
        pipe.load_lora_weights(to_state_dict(layers, "peft", "transformer"), adapter_name=name)
    pipe.set_adapters(names, [0.5 + 0.1 * i for i in range(len(names))])
    x = torch.randn(1, *((args.tokens,) if args.tokens else ()), args.width).to(args.device, dtype)
    runs = {"base": base, "branch": model}
    runs["by hand"] = by_hand(base, args.adapters * args.rank)
    times: dict[str, list[float]] = {k: [] for k in runs}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with torch.no_grad():  # as diffusers pipelines run
        for _ in range(10):
            for m in runs.values():
                m(x)
        for _ in range(args.rounds):  # interleaved: both see the same machine state
            for tag, m in runs.items():
                sync()
                t0 = time.perf_counter()
                m(x)
                times[tag].append(time.perf_counter() - t0)
    if "by hand" in times:
        h = statistics.median(times["by hand"]) * 1e3
        b = statistics.median(times["base"]) * 1e3
        print(f"by hand {h:.3f} ms   added per layer {(h - b) / args.layers * 1e3:.2f} us")
    b, r = (statistics.median(times[k]) * 1e3 for k in ("base", "branch"))
    print(f"{args.layers} x Linear({args.width}, {args.width}), input {list(x.shape)}, 1 thread, {args.adapters} "
          f"adapters of rank {args.rank}; medians of {args.rounds} interleaved forwards")
    print(f"base {b:.3f} ms   branch {r:.3f} ms   ({r / b:.2f}x)   added per layer {(r - b) / args.layers * 1e3:.2f} us")


if __name__ == "__main__":
    main()
