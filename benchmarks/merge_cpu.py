"""CPU timing of merging two SDXL-sized rank-32 LoRAs (``lorakit.merging.merge_adapters``, default ties_svd).

The SDXL UNet is built on the meta device (shapes only, no weights); the two LoRAs are seeded random factors on the
CPU for the 722 layers a full SDXL UNet LoRA targets (attention, feed-forward, proj_in/out), fp32. Only the merge is
timed. ``--every N`` merges every N-th module of each weight shape only, to bound a run on a busy machine (the
output then says so and estimates the full run from per-shape means).

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/merge_cpu.py --method ties_svd --density 0.5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict

import torch

from lorakit.adapter import Adapter
from lorakit.merging import merge_adapters
from lorakit.testing.loras import make_lora
from lorakit.testing.models import sdxl_unet

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="ties_svd")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--every", type=int, default=1, help="merge every N-th module of each shape (bounded)")
    ap.add_argument("--json", default=None, help="write per-module timings here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    unet = sdxl_unet(device="meta")
    shapes = {p: tuple(m.weight.shape) for p, m in unet.named_modules() if hasattr(m, "weight")}
    loras = [make_lora(unet, rank=args.rank, seed=s, targets=UNET_TARGETS) for s in (1, 2)]
    groups: dict[tuple, list[str]] = defaultdict(list)
    for p in sorted(loras[0]):
        groups[shapes[p]].append(p)
    paths = sorted(p for group in groups.values() for p in group[:: args.every])  # every shape is represented
    adapters = [Adapter(f"lora{i}", {"unet": {p: lora[p] for p in paths}}) for i, lora in enumerate(loras)]

    stamps: list[tuple[str, float]] = []
    start = time.perf_counter()
    _, report = merge_adapters(adapters, [0.7, 0.8], "mix", args.method, density=args.density,
                                    shape_of=lambda c, p, ds: shapes[p],
                                    progress=lambda what: stamps.append((what, time.perf_counter())))
    total = time.perf_counter() - start

    by_shape: dict[tuple, list[float]] = defaultdict(list)
    prev = start
    for what, t in stamps:
        by_shape[shapes[what.split(".", 1)[1]]].append(t - prev)
        prev = t
    print(f"lorakit merge_adapters, {args.method} density={args.density}, two rank-{args.rank} SDXL UNet LoRAs, "
          f"fp32, torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}")
    print(f"modules merged: {len(paths)} of {len(loras[0])} (every {args.every}); total {total:.1f} s; "
          f"max rel. truncation error {report.max_error:.3f}")
    print("| weight shape | modules | mean s/module | total s |\n|---|---|---|---|")
    for shape, times in sorted(by_shape.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {'x'.join(map(str, shape))} | {len(times)} | {sum(times) / len(times):.2f} | {sum(times):.1f} |")
    if args.every > 1:
        full = sum(len(groups[s]) * sum(t) / len(t) for s, t in by_shape.items())
        print(f"estimate for all {len(loras[0])} modules (per-shape means x counts): {full:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"total_s": total, "modules": len(paths), "args": vars(args),
                       "per_module": [[w, t] for w, t in stamps]}, fh)


if __name__ == "__main__":
    main()
