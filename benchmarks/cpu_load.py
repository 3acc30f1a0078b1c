"""CPU probe: what a branch-mode load costs, per load of four rank-32 adapters (PEFT, kohya, PEFT, PEFT files) into
a full-size SD1.5 UNet + CLIP-L (fp32, one thread), with set_adapters of two of them before the fourth (as bench.py
does), repeated after unloads; the last repeat's first load (the one that lays out the layers' factor pools) is
profiled with cProfile.

    python benchmarks/cpu_load.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lorakit  # noqa: E402
from lorakit.testing import models as tm  # noqa: E402
from lorakit.testing.loras import TRANSFORMER_TARGETS, make_lora, to_state_dict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    unet, te = tm.sd15_unet(seed=0), tm.sd15_text_encoder(seed=0)
    pipe = types.SimpleNamespace(unet=unet, text_encoder=te)
    lorakit.attach(pipe)
    folder = Path(tempfile.mkdtemp())
    files = []
    for i, fmt in enumerate(["peft", "kohya", "peft", "peft"]):
        sd = to_state_dict(make_lora(unet, rank=32, seed=i, targets=TRANSFORMER_TARGETS + ("proj_in", "proj_out"),
                                     alpha=16), fmt, "unet", model=unet)
        sd.update(to_state_dict(make_lora(te, rank=32, seed=i + 9, targets=("q_proj", "k_proj", "v_proj", "out_proj"),
                                          alpha=16), fmt, "text_encoder", model=te))
        files.append(folder / f"f{i}.safetensors")
        save_file(sd, str(files[-1]))
    profile = cProfile.Profile()
    for rep in range(args.repeats):
        took = []
        for i, path in enumerate(files):
            if i == 3:
                pipe.set_adapters(["a0", "a2"], [0.7, 0.8])
            last = rep == args.repeats - 1 and i == 0
            t0 = time.perf_counter()
            if last:
                profile.enable()
            pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
            if last:
                profile.disable()
            took.append(round((time.perf_counter() - t0) * 1e3, 1))
        print(f"repeat {rep + 1}: loads {took} ms")
        pipe.unload_lora_weights()
    pstats.Stats(profile).sort_stats("cumtime").print_stats(18)


if __name__ == "__main__":
    main()
