"""GPU probe: where the time of a hotswap of a denoiser-only file into an adapter loaded from a full file (UNet and
both text encoders) goes: timed until the GPU is done (and until the call returns), then one cProfile and one
torch.profiler table. SDXL-sized, fp16.

    python3 benchmarks/profile_subset_swap.py
"""
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_switch as ps  # noqa: E402

from lorakit import hotswap as swapping  # noqa: E402
from lorakit.io import LoraSource  # noqa: E402
from lorakit.loading import PlanCache  # noqa: E402
from lorakit.manager import LoraManager  # noqa: E402

pipe, comps = ps.sdxl_pipe("cuda")
folder = Path(tempfile.mkdtemp())
full, unet_only = folder / "full.safetensors", [folder / f"unet{i}.safetensors" for i in range(2)]
save_file(ps.lora_file(comps, seed=1), str(full))
for i, path in enumerate(unet_only):
    save_file(ps.lora_file({"unet": comps["unet"]}, seed=10 + i), str(path))
pipe.enable_lora_hotswap(target_rank=32)
phases: dict[str, list[float]] = {}


def timed_phase(owner, name: str) -> None:
    """Wrap ``owner.name`` to add its host time (until it returns) to ``phases[name]``."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            phases.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
    setattr(owner, name, wrapper)


for owner, names in ((swapping, ("copyable_subset", "byte_runs", "copy_into", "refresh")),
                     (LoraManager, ("_leave_all", "_swapped")), (LoraSource, ("load",)), (PlanCache, ("plan",))):
    for name in names:
        timed_phase(owner, name)
times, host, prof = [], [], cProfile.Profile()
for rep in range(6):
    pipe.load_lora_weights(str(full), adapter_name="hs")
    torch.cuda.synchronize()
    if rep == 4:
        prof.enable()
    trace = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                 torch.profiler.ProfilerActivity.CUDA]) if rep == 5 else None
    if trace is not None:
        trace.__enter__()
    t0 = time.perf_counter()
    phases.clear()
    pipe.load_lora_weights(str(unet_only[rep % 2]), adapter_name="hs", hotswap=True)
    if rep in (1, 2, 3):
        print(f"repeat {rep}, host ms per phase:", {k: round(sum(v), 1) for k, v in phases.items()})
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    times.append((time.perf_counter() - t0) * 1e3)
    host.append((t1 - t0) * 1e3)
    if rep == 4:
        prof.disable()
    if trace is not None:
        trace.__exit__(None, None, None)
    pipe.delete_adapters("hs")
print("denoiser-only hotswap into a full adapter, until done:", [round(t, 1) for t in times],
      "median", round(statistics.median(times[1:4]), 1), "| host until return:", [round(t, 1) for t in host])
out = io.StringIO()
pstats.Stats(prof, stream=out).sort_stats("cumtime").print_stats(45)
print(out.getvalue())
print(trace.key_averages().table(sort_by="cuda_time_total", row_limit=25))
from lorakit import kernels  # noqa: E402

print("merge kernels:", {f"{k[0]} {k[1]} {k[2]}": v for k, v in kernels._READY.items()}, kernels.ERRORS or "")
