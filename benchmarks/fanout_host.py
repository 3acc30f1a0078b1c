"""CPU probe: lorakit's host time per layer on the branch fast path (fanouts and widened layers), against the same
kernels written by hand.

A chain of ``--blocks`` tiny attention-like blocks (``to_q``, ``to_k``, ``to_v`` on one input, their sum through
``to_out``; width 64, batch 1, one thread, 4 tokens), where the arithmetic is negligible and a forward's time is the
host's. One copy runs lorakit's branch mode with 4 adapters active on all four layers (``lorakit.wide`` forced onto
the CPU: q/k/v become one fanout, ``to_out`` is widened alone). The other copy runs the same kernels by hand: one
GEMM against ``[Wq; Wk; Wv; A]`` and one ``addmm_`` against the block-diagonal up factors for q/k/v, the wide pair
for ``to_out``. Interleaved; prints the medians and lorakit's extra time per layer. From the repository root:

    python benchmarks/fanout_host.py [--blocks 180] [--rounds 300] [--no-fanout]
"""
from __future__ import annotations

import argparse
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
from lorakit import fanout, wide
from lorakit.testing.loras import make_lora, to_state_dict

parser = argparse.ArgumentParser()
parser.add_argument("--blocks", type=int, default=180)
parser.add_argument("--rounds", type=int, default=300)
parser.add_argument("--no-fanout", action="store_true", help="lorakit with LORAKIT_FANOUT=0 (each layer alone)")
args = parser.parse_args()
torch.set_num_threads(1)
wide.DEVICES = ("cuda", "cpu")
fanout.ENABLED = not args.no_fanout
W, RANK, ADAPTERS = 64, 8, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(W, W, bias=False) for _ in range(3))
        self.to_out = nn.Linear(W, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.to_q(x) + self.to_k(x) + self.to_v(x))


class Chain(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def by_hand(block: Block, r: int) -> None:
    """Replace the block's forwards by the fanout's and the wide pair's kernels, with no checks."""
    qkv = [block.to_q, block.to_k, block.to_v]
    matrix = torch.cat([m.weight for m in qkv] + [torch.randn(r, W) * 0.01 for _ in qkv])
    up = torch.block_diag(*[torch.randn(W, r) * 0.01 for _ in qkv]).t().contiguous()
    stash: dict = {}

    def lead(x):
        y, h = F.linear(x, matrix).split_with_sizes((3 * W, 3 * r), -1)
        y.view(-1, 3 * W).addmm_(h.view(-1, 3 * r), up)
        parts = y.split_with_sizes((W, W, W), -1)
        stash["x"], stash["parts"] = x, parts
        return parts[0]

    def follow(i):
        return lambda x: stash["parts"][i] if stash.get("x") is x else None

    block.to_q.forward, block.to_k.forward, block.to_v.forward = lead, follow(1), follow(2)
    out = block.to_out
    w_out = torch.cat([out.weight, torch.randn(r, W) * 0.01])
    b_out = torch.cat([out.bias, torch.zeros(r)])
    u_out = torch.randn(r, W) * 0.01

    def wide_out(x):
        y, h = F.linear(x, w_out, b_out).split_with_sizes((W, r), -1)
        y.view(-1, W).addmm_(h.view(-1, r), u_out)
        return y

    out.forward = wide_out


torch.manual_seed(0)
ours = Chain(args.blocks)
pipe = types.SimpleNamespace(transformer=ours)
lorakit.attach(pipe, mode="branch")
names = [f"a{i}" for i in range(ADAPTERS)]
for i, name in enumerate(names):
    made = make_lora(ours, rank=RANK, seed=i, targets=("to_q", "to_k", "to_v", "to_out"))
    pipe.load_lora_weights(to_state_dict(made, "peft", "transformer"), adapter_name=name)
pipe.set_adapters(names, [0.5, 0.6, 0.7, 0.8])
hand = Chain(args.blocks)
for block in hand.blocks:
    by_hand(block, RANK * ADAPTERS)
x = torch.randn(1, 4, W)
with torch.no_grad():
    for _ in range(5):  # (lorakit: learn the fanouts, widen, stop noting)
        ours(x), hand(x)
    state = pipe._lorakit_manager.states["transformer"].layers.values()
    print(f"{args.blocks} blocks: {sum(ly.fanout is not None for ly in state)} layers in fanouts, "
          f"{sum(ly.wide is not None for ly in state)} widened alone")
    times: dict[str, list[float]] = {"by hand": [], "lorakit": []}
    for _ in range(args.rounds):
        for name, model in (("by hand", hand), ("lorakit", ours)):
            t0 = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - t0)
med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
layers = 4 * args.blocks
print(f"by hand {med['by hand']:.2f} ms   lorakit {med['lorakit']:.2f} ms   "
      f"lorakit's extra host time: {(med['lorakit'] - med['by hand']) / layers * 1e3:.2f} us per layer")
