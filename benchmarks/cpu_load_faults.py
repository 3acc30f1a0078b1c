"""CPU probe: lorakit's loads inside a process that also runs diffusers+PEFT, as bench.py's does. Four rank-32
PEFT-format files (SD1.5 UNet + CLIP-L, fp32, one thread), each loaded into a PEFT pipeline and then into a lorakit
one, repeated after unloads; for each lorakit load: wall time, CPU time, system time and minor page faults
(``getrusage``). ``--no-peft`` loads into lorakit only.

    python benchmarks/cpu_load_faults.py [--no-peft] [--repeats 4]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import lorakit  # noqa: E402
from lorakit.testing.loras import TRANSFORMER_TARGETS, make_lora, to_state_dict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec, cpu = bench.SPECS["sd15"], torch.device("cpu")
    peft_pipe = None if args.no_peft else bench.build_pipeline(spec, False, cpu, torch.float32)
    pipe = bench.build_pipeline(spec, False, cpu, torch.float32)
    lorakit.attach(pipe)
    folder, files = Path(tempfile.mkdtemp()), []
    for i in range(4):
        sd = to_state_dict(make_lora(pipe.unet, rank=32, seed=i, targets=TRANSFORMER_TARGETS), "peft", "unet")
        te = make_lora(pipe.text_encoder, rank=32, seed=50 + i, targets=TRANSFORMER_TARGETS)
        sd.update(to_state_dict(te, "peft", "text_encoder", model=pipe.text_encoder))
        files.append(folder / f"{i}.safetensors")
        save_file(sd, str(files[-1]))
    for rep in range(args.repeats):
        row = []
        for i, path in enumerate(files):
            if peft_pipe is not None:
                peft_pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
            r0, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
            pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
            t1, c1, r1 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            row.append(f"{(t1 - t0) * 1e3:4.0f} ms (cpu {(c1 - c0) * 1e3:4.0f}, sys {(r1.ru_stime - r0.ru_stime) * 1e3:4.0f},"
                       f" {r1.ru_minflt - r0.ru_minflt} faults)")
        print(f"repeat {rep + 1}: " + " | ".join(row), flush=True)
        if peft_pipe is not None:
            peft_pipe.unload_lora_weights()
        pipe.unload_lora_weights()


if __name__ == "__main__":
    main()
