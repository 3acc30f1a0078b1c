"""CPU probe: does branch mode's two-kernel Linear (lorakit.wide) pay on the CPU? An SD1.5 UNet (fp32, latent 32x32,
batch 1) in branch mode, the forwards right after each of two rank-16 loads, with the wide path allowed on the CPU
(``--wide``) or not (the default: ``wide.DEVICES`` holds CUDA only). Run once each way, on an otherwise idle machine:

    python benchmarks/wide_cpu.py [--wide] [--threads 2]
"""
import argparse
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lorakit  # noqa: E402
from lorakit import wide  # noqa: E402
from lorakit.testing import models as tm  # noqa: E402
from lorakit.testing.loras import TRANSFORMER_TARGETS, make_lora, to_state_dict  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--wide", action="store_true", help="let CPU layers take the wide path")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)
if args.wide:
    wide.DEVICES = ("cuda", "cpu")
with torch.no_grad():
    unet = tm.sd15_unet()
    pipe = types.SimpleNamespace(unet=unet)
    lorakit.attach(pipe, mode="branch")
    x, t, e = torch.randn(1, 4, 32, 32), torch.tensor([500]), torch.randn(1, 77, 768)

    def forward() -> float:
        t0 = time.perf_counter()
        unet(x, t, e, return_dict=False)
        return time.perf_counter() - t0

    forward()
    print(f"wide path on the CPU: {args.wide}; base forward {forward():.3f} s")
    for i in range(2):
        made = make_lora(unet, rank=16, seed=i, targets=TRANSFORMER_TARGETS)
        pipe.load_lora_weights(to_state_dict(made, "peft", "unet"), adapter_name=f"a{i}")
        pipe.set_adapters([f"a{j}" for j in range(i + 1)])
        print(f"after load {i + 1}: forwards", " ".join(f"{forward():.3f}" for _ in range(3)), "s")
