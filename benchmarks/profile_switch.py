"""GPU probe: where the time of an adapter switch goes (lorakit only, merge mode, SDXL-sized fp16).

Times each state-changing call twice: the host time until the call returns, and the time until the GPU is done; then
profiles a few ``set_adapters`` calls with cProfile (Python) and torch.profiler (kernels). Run on the GPU machine:
``python3 benchmarks/profile_switch.py`` (see benchmarks/README.md for the wheels); ``--hotswap-only`` stops after
the hotswap profiles, ``--new-plan`` adds a profile of a set_adapters that lays out a new switch plan, ``--first``
profiles what bench.py times as "hotswap" and "unload": the first hotswap of a new file into an adapter loaded from a
file just before (as bench.py does), and ``unload_lora_weights`` of four adapters (both with cProfile and
torch.profiler).
"""
from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lorakit
from lorakit.testing import models as tm
from lorakit.testing.loras import TRANSFORMER_TARGETS, make_lora, to_state_dict

UNET_TARGETS = TRANSFORMER_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def lora_file(comps: dict, seed: int, rank: int = 32) -> dict[str, torch.Tensor]:
    sd = {}
    for name, model in comps.items():
        targets = UNET_TARGETS if name == "unet" else TE_TARGETS
        layers = make_lora(model, rank=rank, seed=seed, targets=targets, dtype=torch.float16)
        sd.update(to_state_dict(layers, "peft", name, model=model, sdxl_te=name != "unet"))
    return sd


def timed(fn, n: int = 7) -> tuple[float, float]:
    """(median host ms until return, median ms until the GPU is done)."""
    host, total = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        total.append((t2 - t0) * 1e3)
    return statistics.median(host), statistics.median(total)


def python_profile(fn, sort: str, rows: int, n: int = 3) -> str:
    """cProfile of ``n`` calls of ``fn`` (until the GPU is done), the top ``rows`` by ``sort``."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats(sort).print_stats(rows)
    return s.getvalue()


def sdxl_pipe(dev: str = "cuda", dt: torch.dtype = torch.float16) -> tuple[types.SimpleNamespace, dict]:
    """An SDXL UNet and both text encoders (seeded, full size) as a lorakit-attached pipeline, and its components."""
    unet = tm.sdxl_unet(device=dev, dtype=dt)
    te1, te2 = tm.sdxl_text_encoders(device=dev, dtype=dt)
    comps = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    pipe = types.SimpleNamespace(**comps)
    lorakit.attach(pipe, mode="merge")
    return pipe, comps


def main() -> None:
    dev = "cuda"
    pipe, comps = sdxl_pipe(dev)
    files = [lora_file(comps, seed=i) for i in range(4)]
    print("tensors per file", len(files[0]))
    counter = iter(range(10**6))
    path = Path(tempfile.mkdtemp()) / "lora.safetensors"
    save_file(files[0], str(path))

    def load() -> None:
        k = next(counter)
        pipe.load_lora_weights(str(path), adapter_name=f"x{k}")
        pipe.delete_adapters(f"x{k}")

    for i, sd in enumerate(files):
        pipe.load_lora_weights(sd, adapter_name="abcd"[i])
    waited = time.perf_counter()
    while not lorakit.kernels.ready(torch.device(dev, 0), torch.float16) and time.perf_counter() - waited < 120:
        time.sleep(0.05)  # the merge kernels compile in the background: time what runs once they are in
    print(f"kernels {dict(lorakit.kernels._READY)} after {time.perf_counter() - waited:.1f} s")
    swaps = [Path(path.parent) / f"swap{i}.safetensors" for i in range(2)]
    for i, target in enumerate(swaps):  # same layout as adapter "a": a new checkpoint of the same run
        save_file(lora_file(comps, seed=10 + i), str(target))
    resident = [{k: v.to(dev) for k, v in lora_file(comps, seed=20 + i).items()} for i in range(2)]  # on the GPU
    pipe.load_lora_weights(str(swaps[0]), adapter_name="hs")
    pipe.set_adapters(["a", "hs"], [0.5, 0.8])
    w = iter(range(10**6))

    def forget_plans() -> None:  # the next set_adapters lays out a plan and its kernel layout, as a load does
        for state in pipe._lorakit_manager.states.values():
            state.forget_plans()

    def forget_set_plans() -> None:  # ...a plan for a new adapter set, the loaded adapters' kernel layout kept
        for state in pipe._lorakit_manager.states.values():
            state._plan, state._plans = None, {}

    ops = {
        "set_adapters 1": lambda: pipe.set_adapters("a", 0.5 + 0.001 * next(w)),
        "set_adapters 2": lambda: pipe.set_adapters(["a", "b"], [0.5 + 0.001 * next(w), 0.8]),
        "set_adapters 4": lambda: pipe.set_adapters(list("abcd"), [0.5 + 0.001 * next(w), 0.6, 0.7, 0.8]),
        "set 2 <-> 4": lambda: pipe.set_adapters(*((["a", "b"], [0.5, 0.8]) if next(w) % 2 else
                                                    (list("abcd"), [0.5, 0.6, 0.7, 0.8]))),
        "disable+enable": lambda: (pipe.disable_lora(), pipe.enable_lora()),
        "fuse+unfuse": lambda: (pipe.fuse_lora(adapter_names=["a", "b"]), pipe.unfuse_lora()),
        "load+delete": load,
        "hotswap file": lambda: pipe.load_lora_weights(str(swaps[next(w) % 2]), adapter_name="hs", hotswap=True),
        "hotswap dict": lambda: pipe.load_lora_weights(resident[next(w) % 2], adapter_name="hs", hotswap=True),
        "new plan, 2": lambda: (forget_plans(), pipe.set_adapters(["a", "b"], [0.5 + 0.001 * next(w), 0.8])),
        "new set, 2": lambda: (forget_set_plans(), pipe.set_adapters(["a", "b"], [0.5 + 0.001 * next(w), 0.8])),
        "new set, 4": lambda: (forget_set_plans(), pipe.set_adapters(list("abcd"), [0.5 + 0.001 * next(w), 0.6, 0.7,
                                                                                    0.8])),
    }
    for name, fn in ops.items():
        fn()
        h, t = timed(fn)
        print(f"{name:16s} host {h:7.1f} ms   total {t:7.1f} ms")

    if "--new-plan" in sys.argv:
        print("new plan, 2 x3", python_profile(ops["new plan, 2"], "tottime", 30))
    if "--first" in sys.argv:
        first_swap_and_unload(pipe, comps, path.parent)
        return
    for what in ("hotswap file", "hotswap dict"):
        print(what, "x3", python_profile(ops[what], "cumtime", 25))
    if "--hotswap-only" in sys.argv:
        return
    pipe.set_adapters(["a", "b"], [0.5, 0.8])
    print(python_profile(ops["set_adapters 2"], "tottime", 15))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            ops["set_adapters 2"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    print(python_profile(load, "cumtime", 30))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


def first_swap_and_unload(pipe, comps: dict, folder: Path, n: int = 4) -> None:
    """bench.py's "hotswap" (a new file swapped into an adapter loaded from another file just before) and "unload"
    (four adapters), each timed ``n`` times on fresh adapters, then profiled once more."""
    pipe.unload_lora_weights()
    pipe.enable_lora_hotswap(target_rank=32)
    news = []
    for i in range(2 * n + 2):
        news.append(folder / f"new{i}.safetensors")
        save_file(lora_file(comps, seed=100 + i), str(news[-1]))
    swaps, unloads = [], []
    for i in range(n + 1):
        pipe.load_lora_weights(str(news[2 * i]), adapter_name="hs")
        torch.cuda.synchronize()
        prof = cProfile.Profile() if i == n else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        pipe.load_lora_weights(str(news[2 * i + 1]), adapter_name="hs", hotswap=True)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if prof:
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumtime").print_stats(30)
            print("first hotswap, profiled:", s.getvalue())
        else:
            swaps.append(((t1 - t0) * 1e3, (t2 - t0) * 1e3))
        for name in "bcd":
            pipe.load_lora_weights(str(news[0]), adapter_name=name)
        pipe.set_adapters(["hs", "b", "c", "d"], [0.5, 0.6, 0.7, 0.8])
        torch.cuda.synchronize()
        if i < n:
            t0 = time.perf_counter()
            pipe.unload_lora_weights()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            unloads.append(((t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3))
        else:
            print("unload x1", python_profile(pipe.unload_lora_weights, "cumtime", 30, n=1))
    kept_ms, free_ms = [], []
    for _ in range(3):  # how much of an unload is freeing the adapters' objects (kept alive here, freed after)
        for name in "abcd":
            pipe.load_lora_weights(str(news[0]), adapter_name=name)
        pipe.set_adapters(list("abcd"), [0.5, 0.6, 0.7, 0.8])
        adapters = list(pipe._lorakit_manager.adapters.values())
        keep = [adapters, [d for a in adapters for m in a.layers.values() for d in m.values()]]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe.unload_lora_weights()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        del keep, adapters
        t2 = time.perf_counter()
        kept_ms.append((t1 - t0) * 1e3)
        free_ms.append((t2 - t1) * 1e3)
    print(f"unload 4, adapters kept alive: {statistics.median(kept_ms):.1f} ms; freeing them after: "
          f"{statistics.median(free_ms):.1f} ms")
    for what, rows in (("first hotswap", swaps), ("unload 4", unloads)):
        print(f"{what:16s} host {statistics.median(r[0] for r in rows):7.1f} ms   total "
              f"{statistics.median(r[1] for r in rows):7.1f} ms   (all: {[round(r[1], 1) for r in rows]})")
    for name in "abcd":
        pipe.load_lora_weights(str(news[0]), adapter_name=name)
    pipe.set_adapters(list("abcd"), [0.5, 0.6, 0.7, 0.8])
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        pipe.unload_lora_weights()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


if __name__ == "__main__":
    with torch.no_grad():
        main()
