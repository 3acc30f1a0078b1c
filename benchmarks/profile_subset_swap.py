"""GPU probe: where the time of a hotswap of a denoiser-only file into an adapter loaded from a full file (UNet and
both text encoders) goes: timed until the GPU is done, then one cProfile. SDXL-sized, fp16.

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

pipe, comps = ps.sdxl_pipe("cuda")
folder = Path(tempfile.mkdtemp())
full, unet_only = folder / "full.safetensors", [folder / f"unet{i}.safetensors" for i in range(2)]
save_file(ps.lora_file(comps, seed=1), str(full))
for i, path in enumerate(unet_only):
    save_file(ps.lora_file({"unet": comps["unet"]}, seed=10 + i), str(path))
pipe.enable_lora_hotswap(target_rank=32)
times, prof = [], cProfile.Profile()
for rep in range(5):
    pipe.load_lora_weights(str(full), adapter_name="hs")
    torch.cuda.synchronize()
    if rep == 4:
        prof.enable()
    t0 = time.perf_counter()
    pipe.load_lora_weights(str(unet_only[rep % 2]), adapter_name="hs", hotswap=True)
    torch.cuda.synchronize()
    times.append((time.perf_counter() - t0) * 1e3)
    if rep == 4:
        prof.disable()
    pipe.delete_adapters("hs")
print("denoiser-only hotswap into a full adapter, until done:", [round(t, 1) for t in times],
      "median", round(statistics.median(times[1:4]), 1))
out = io.StringIO()
pstats.Stats(prof, stream=out).sort_stats("cumtime").print_stats(35)
print(out.getvalue())
