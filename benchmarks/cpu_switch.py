"""CPU: the cost of switching among loaded adapters, diffusers+PEFT vs lorakit, interleaved (A B A B), medians.

Two full-size SD1.5 pipelines (UNet + CLIP-L, fp32, identical seeded weights) each load the same 4 rank-32 LoRAs;
then, in lock-step, each system runs the same sequence of calls:
  weights    set_adapters(["a", "b"], new weights)              (same adapters, new weights)
  set        set_adapters between ["a", "b"] and ["a", "b", "c", "d"]   (the adapter set changes)
  scale      a call-time scale change (lorakit: the pipeline's ambient scale; PEFT: scale_lora_layers)
Run: ``python benchmarks/cpu_switch.py [--repeats 15]`` (see benchmarks/README.md for --threads).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lorakit
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
from lorakit.testing.loras import ATTENTION_TARGETS, make_lora, to_state_dict
from lorakit.testing.models import sd15_pipeline

TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_file(pipe, seed: int) -> dict[str, torch.Tensor]:
    sd = to_state_dict(make_lora(pipe.unet, rank=32, seed=seed, targets=ATTENTION_TARGETS[:4]), "peft", "unet")
    layers = make_lora(pipe.text_encoder, rank=32, seed=seed + 100, targets=TE_TARGETS)
    sd.update(to_state_dict(layers, "peft", "text_encoder", model=pipe.text_encoder))
    return sd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipes = {"peft": sd15_pipeline(), "lorakit": sd15_pipeline()}
    manager = lorakit.attach(pipes["lorakit"])
    files = [lora_file(pipes["lorakit"], seed=i) for i in range(4)]  # before PEFT wraps its layers
    for name, sd in zip("abcd", files):
        for pipe in pipes.values():
            pipe.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name=name)
    counter = iter(range(10**6))

    def scale(pipe, system: str) -> None:  # noqa: ARG001
        value = 0.5 + 0.01 * (next(counter) % 7)
        if system == "peft":  # what a diffusers pipeline call does around the UNet for a new scale
            scale_lora_layers(pipe.unet, value)
            unscale_lora_layers(pipe.unet, value)
        else:
            with manager.ambient_scale(value):
                pass

    ops = {
        "weights": lambda pipe, s: pipe.set_adapters(["a", "b"], [0.5 + 0.01 * (next(counter) % 7), 0.8]),
        "set": lambda pipe, s: pipe.set_adapters(*((["a", "b"], [0.7, 0.8]) if next(counter) % 2 else
                                                   (list("abcd"), [0.5, 0.6, 0.7, 0.8]))),
        "scale": scale,
    }
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats + 2):
        for op, fn in ops.items():
            for system, pipe in pipes.items():
                t0 = time.perf_counter()
                fn(pipe, system)
                if rep >= 2:  # two warm-up rounds (lorakit sets its plans up there)
                    times.setdefault((op, system), []).append((time.perf_counter() - t0) * 1e3)
    print(f"| op | PEFT ms | lorakit ms | speed-up | (medians of {args.repeats}, {args.threads} thread(s)) |")
    print("|---|---|---|---|---|")
    for op in ops:
        a, b = (statistics.median(times[(op, s)]) for s in ("peft", "lorakit"))
        print(f"| {op} | {a:.2f} | {b:.2f} | {a / b:.1f}x | |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
