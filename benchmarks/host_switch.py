"""CPU probe: the host-side (Python) cost of lorakit's switches on an SDXL-sized UNet, with the merges themselves
stubbed out.

On a GPU the eager switch is bound by host time (plans, stacks, kernel launches), while a CPU's merges are bound by
arithmetic. This probe keeps the first and drops the second: `batched.merge_chunks` does nothing, so what is timed
is laying out and running switch plans, `fuse_lora` and `unfuse_lora`, as they run in merge mode on the GPU.
Medians of --repeats, one thread:

    python benchmarks/host_switch.py
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
from lorakit import batched  # noqa: E402
from lorakit.testing import models as tm  # noqa: E402
from lorakit.testing.loras import TRANSFORMER_TARGETS, make_lora, to_state_dict  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batched.DEVICES = ("cpu",)  # the batched route, as on a GPU...
    batched.merge_chunks = lambda items, mark=batched.PLAN_WRITTEN: None  # ...without its arithmetic
    unet = tm.sdxl_unet(device="cpu", dtype=torch.float32)
    pipe = types.SimpleNamespace(unet=unet)
    manager = lorakit.attach(pipe, mode="merge")
    for i, name in enumerate("abcd"):
        layers = make_lora(unet, rank=4, seed=i, targets=TRANSFORMER_TARGETS)
        pipe.load_lora_weights(to_state_dict(layers, "peft", "unet"), adapter_name=name)
    state = manager.states["unet"]
    print(f"SDXL UNet, {len(state.layers)} targeted layers, merges stubbed out; medians of {args.repeats}")

    def new_plan(names):
        def run():
            state._plans.clear()
            state._plan = None
            pipe.set_adapters(names)
        return run

    weights = iter(range(10**6))
    rows = {
        "set_adapters, new weights (plan rerun)": lambda: pipe.set_adapters(["a", "b"], [0.5 + 1e-3 * next(weights), 0.7]),
        "set_adapters 2, new structure (plan laid out)": new_plan(["a", "b"]),
        "set_adapters 4, new structure (plan laid out)": new_plan(list("abcd")),
    }
    for label, fn in rows.items():
        print(f"  {label:48s} {median_ms(fn, args.repeats):7.2f} ms")
    fuse, unfuse = [], []
    for i in range(args.repeats):
        pipe.set_adapters(["a", "b"], [0.7, 0.8 + 0.01 * i])
        fuse.append(median_ms(lambda: pipe.fuse_lora(adapter_names=["a", "b"]), 1))
        unfuse.append(median_ms(pipe.unfuse_lora, 1))
    print(f"  {'fuse_lora of the live mix':48s} {statistics.median(fuse):7.2f} ms")
    print(f"  {'unfuse_lora':48s} {statistics.median(unfuse):7.2f} ms")


if __name__ == "__main__":
    main()
