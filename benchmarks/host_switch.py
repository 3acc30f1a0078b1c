"""CPU probe: the host-side (Python) cost of lorakit's switches on an SDXL-sized UNet, with the merges themselves
stubbed out.

On a GPU the eager switch is bound by host time (plans, stacks, kernel launches), while a CPU's merges are bound by
arithmetic. This probe keeps the first and drops the second: `batched.merge_chunks` does nothing, so what is timed
is laying out and running switch plans, `fuse_lora` and `unfuse_lora`, as they run in merge mode on the GPU; and
a hotswap of a same-layout file (`load_lora_weights(path, adapter_name=existing, hotswap=True)`, the file in a temp
dir, the OS page cache warm): header parse, load plan, the one read of the data section, the copy into the loaded
adapter's buffer and the refresh of what is derived from it (the re-merge stubbed). Its files are rank 4 by default,
so that reading and copying them (memory-bound on a CPU) stays small next to the host work, which does not depend
on the rank; `--hotswap-rank 32` is the GPU benchmark's file. Medians of --repeats, one thread:

    python benchmarks/host_switch.py                   # SDXL UNet in fp32 (~10 GB of memory)
    python benchmarks/host_switch.py --dtype float16   # half the memory; the host work is the same
    python benchmarks/host_switch.py --dtype float16 --rank 16 --segments   # + the group kernel's tables (CUDA's)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lorakit  # noqa: E402
from lorakit import batched, kernels  # noqa: E402
from lorakit.testing import models as tm  # noqa: E402
from lorakit.testing.loras import TRANSFORMER_TARGETS, make_lora, to_state_dict  # noqa: E402

UNET_TARGETS = TRANSFORMER_TARGETS + ("proj_in", "proj_out")  # as profile_switch.py's files


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
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--hotswap-rank", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4, help="of the four adapters; 16, 32...: the group kernel's")
    parser.add_argument("--segments", action="store_true",
                        help="the group kernel's route, as plans take it on CUDA (fp16/bf16, ranks of 16k)")
    args = parser.parse_args()
    if args.segments:
        batched.KERNEL_DEVICES = ("cpu",)  # laid out and launched as on CUDA, the launch stubbed out
        kernels.ready = lambda device, dtype: True
        kernels.merge_group = lambda tables, mults: None
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    batched.DEVICES = ("cpu",)  # the batched route, as on a GPU...
    batched.merge_chunks = lambda items, mark=batched.PLAN_WRITTEN: None  # ...without its arithmetic
    unet = tm.sdxl_unet(device="cpu", dtype=dtype)
    pipe = types.SimpleNamespace(unet=unet)
    manager = lorakit.attach(pipe, mode="merge")
    for i, name in enumerate("abcd"):
        layers = make_lora(unet, rank=args.rank, seed=i, targets=TRANSFORMER_TARGETS, dtype=dtype)
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
    fresh = to_state_dict(make_lora(unet, rank=args.rank, seed=9, targets=TRANSFORMER_TARGETS, dtype=dtype), "peft", "unet")
    after_load = []
    for i in range(args.repeats):  # the load's own plan is current and kept: what layers hold is resolved from it
        pipe.load_lora_weights(fresh, adapter_name=f"x{i}")
        after_load.append(median_ms(lambda: pipe.set_adapters(["a", "b", f"x{i}"]), 1))  # noqa: B023
        pipe.delete_adapters(f"x{i}")
    print(f"  {'set_adapters 3 right after a load (laid out)':48s} {statistics.median(after_load):7.2f} ms")
    fuse, unfuse = [], []
    for i in range(args.repeats):
        pipe.set_adapters(["a", "b"], [0.7, 0.8 + 0.01 * i])
        fuse.append(median_ms(lambda: pipe.fuse_lora(adapter_names=["a", "b"]), 1))
        unfuse.append(median_ms(pipe.unfuse_lora, 1))
    print(f"  {'fuse_lora of the live mix':48s} {statistics.median(fuse):7.2f} ms")
    print(f"  {'unfuse_lora':48s} {statistics.median(unfuse):7.2f} ms")
    hotswap_rows(pipe, manager, unet, dtype, args.repeats, args.hotswap_rank)


def hotswap_rows(pipe, manager, unet, dtype: torch.dtype, repeats: int, rank: int) -> None:
    """A same-layout file swapped into a live adapter, alternating between two checkpoints (the buffer-copy path)."""
    folder = Path(tempfile.mkdtemp())
    files = []
    for seed in (10, 11, 12):
        layers = make_lora(unet, rank=rank, seed=seed, targets=UNET_TARGETS, dtype=dtype)
        tensors = to_state_dict(layers, "peft", "unet")
        files.append(folder / f"swap{seed}.safetensors")
        save_file(tensors, str(files[-1]))
    pipe.enable_lora_hotswap(target_rank=rank)
    pipe.load_lora_weights(str(files[2]), adapter_name="hs")
    pipe.set_adapters(["a", "hs"], [0.5, 0.8])
    turn = iter(range(10**6))
    swap = lambda: pipe.load_lora_weights(str(files[next(turn) % 2]), adapter_name="hs", hotswap=True)
    swap()
    adapter = manager.adapters["hs"]
    assert adapter.buffer is not None, "the probe means the buffer-copy path"
    buffer = adapter.buffer
    took = median_ms(swap, repeats)
    assert manager.adapters["hs"].buffer is buffer, "a hotswap left the buffer-copy path"
    label = f"hotswap, same-layout file ({len(tensors)} tensors, r{rank})"
    print(f"  {label:48s} {took:7.2f} ms")
    first = []
    for i in range(repeats):  # a server's case: a checkpoint swapped into an adapter loaded just before
        pipe.load_lora_weights(str(files[2]), adapter_name=f"fresh{i}")
        first.append(median_ms(lambda: pipe.load_lora_weights(str(files[i % 2]), adapter_name=f"fresh{i}",  # noqa: B023
                                                               hotswap=True), 1))
        pipe.delete_adapters(f"fresh{i}")
    print(f"  {'first hotswap into a freshly loaded adapter':48s} {statistics.median(first):7.2f} ms")
    for f in files:
        f.unlink()


if __name__ == "__main__":
    main()
