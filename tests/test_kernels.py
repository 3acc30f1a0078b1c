"""The one-pass merge kernel (kernels.py), run by Triton's interpreter on the CPU: same values as a per-layer
fp32 ``addmm`` rounded once, for ragged sizes (masks), ranks that are not a multiple of the block, and conv-shaped
weights; the dispatch rules of ``kernels.try_merge``; and, on a CUDA machine, the compiled kernel itself."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
KERNELS = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "kernels.py"

PROBE = r'''
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("kernels_interpreted", sys.argv[1])
k = importlib.util.module_from_spec(spec); spec.loader.exec_module(k)
torch.manual_seed(0)
for n, shape, rank in ((3, (40, 70), 24), (2, (130, 16, 3, 3), 40), (1, (64, 128), 32)):
    m, cols = shape[0], torch.Size(shape[1:]).numel()
    bases = [torch.randn(shape).half() for _ in range(n)]
    outs = [torch.full(shape, float("nan")).half() for _ in range(n)]
    up, down = torch.randn(n, m, rank).half() * 0.1, torch.randn(n, rank, cols).half()
    k.merge(outs, bases, up, down)
    for i in range(n):
        want = torch.addmm(bases[i].reshape(m, -1).float(), up[i].float(), down[i].float()).half()
        diff = (outs[i].reshape(m, -1).float() - want.float()).abs().max().item()
        ulp = (want.float().abs().max().item() * 2 ** -10)
        assert diff <= ulp, (shape, i, diff, ulp)
        assert (outs[i].reshape(m, -1) == want).float().mean().item() > 0.99, (shape, i)
print("ok")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="the compiled kernel is tested instead (and older Tritons' "
                    "interpreters cannot run it)")
def test_merge_kernel_matches_addmm_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(KERNELS)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def _fresh_kernels():
    spec = importlib.util.spec_from_file_location("kernels_fresh", KERNELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_try_merge_declines_off_cuda():
    k = _fresh_kernels()
    t = torch.zeros(2, 16, 16, dtype=torch.float16)
    assert not k.try_merge(list(t), list(t), t, t)
    assert not k._READY  # nothing was compiled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_kernel_matches_addmm(dtype):
    k = _fresh_kernels()
    dev = torch.device("cuda", 0)
    probe = torch.zeros(1, 16, 16, dtype=dtype, device=dev)
    for _ in range(600):  # the first ask starts the compile in the background
        if k.try_merge(list(probe), list(probe), probe, probe):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"kernel not compiled: {k._READY}")
    torch.manual_seed(0)
    for n, shape, rank in ((3, (48, 80), 32), (2, (320, 64, 3, 3), 64), (4, (1280, 5120), 128)):
        m = shape[0]
        bases = [torch.randn(shape, device=dev).to(dtype) for _ in range(n)]
        outs = [torch.empty_like(b) for b in bases]
        up = torch.randn(n, m, rank, device=dev).to(dtype) * 0.1
        down = torch.randn(n, rank, bases[0][0].numel(), device=dev).to(dtype)
        assert k.try_merge(outs, bases, up, down)
        for i in range(n):
            want = torch.addmm(bases[i].reshape(m, -1).float(), up[i].float(), down[i].float()).to(dtype)
            got = outs[i].reshape(m, -1)
            assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2 ** -7
            assert (got == want).float().mean() > 0.98
    odd = torch.zeros(1, 24, 16, dtype=dtype, device=dev)  # a size not divisible by 16: the cuBLAS route's
    assert not k.try_merge(list(odd), list(odd), odd, torch.zeros(1, 16, 16, dtype=dtype, device=dev))
    flat = torch.zeros(16 * 16 + 1, dtype=dtype, device=dev)
    shifted = flat[1:].view(16, 16)  # 2-byte aligned only: the cuBLAS route's
    assert not k.try_merge([shifted], [shifted], probe, probe)
