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
k = importlib.util.module_from_spec(spec); sys.modules[spec.name] = k; spec.loader.exec_module(k)
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
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def test_try_merge_declines_off_cuda():
    k = _fresh_kernels()
    t = torch.zeros(2, 16, 16, dtype=torch.float16)
    assert not k.try_merge(list(t), list(t), t, t)
    assert not k._READY  # nothing was compiled


def test_group_tables_leave_layers_too_large_for_32_bit_indices():
    """The group kernel indexes a layer's tiles in int32: a layer of 2**31 elements or more (or factors that large)
    is reported, for the chunk route, as misaligned ones are."""
    pytest.importorskip("triton")
    k = _fresh_kernels()
    anchor = torch.zeros(64, dtype=torch.float16)
    at = anchor.data_ptr()
    fits = [64, 32768, at, at, 1, at, at, 16]
    huge = [65536, 32768, at, at, 1, at, at, 16]  # M * N = 2**31
    tables, bad = k.group_tables([fits, huge, fits], anchor)
    assert tables is None and bad == [1]
    tables, bad = k.group_tables([fits, fits], anchor)
    assert tables is not None and bad == []


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


GROUP_PROBE = r'''
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("kernels_interpreted", sys.argv[1])
k = importlib.util.module_from_spec(spec); sys.modules[spec.name] = k; spec.loader.exec_module(k)
torch.manual_seed(0)
arena = torch.zeros(1 << 21, dtype=torch.float16)  # one allocation: addresses 16 elements apart, as checked
used = [0]

def take(*shape, fill=None, odd=False):
    n = torch.Size(shape).numel()
    start = used[0] + (1 if odd else 0)  # odd: one element off alignment, as a kohya file's factors sit
    t = arena[start:start + n].view(shape)
    used[0] += -(-(n + 1) // 16) * 16
    t.copy_(torch.randn(shape) if fill is None else torch.full(shape, fill))
    return t

def case(specs, odd):
    # (weight shape, ranks of its adapters): ragged sizes, conv-shaped weights, 1-3 adapters of different ranks
    layers, tensors, wants, mults = [], [], [], torch.zeros(len(specs), 4)
    for i, (shape, ranks) in enumerate(specs):
        m, n = shape[0], torch.Size(shape[1:]).numel()
        weight, base = take(*shape, fill=float("nan")), take(*shape)
        factors = [(take(m, r, odd=odd) * 0.1, take(r, n, odd=odd)) for r in ranks]
        layers.append([m, n, weight.data_ptr(), base.data_ptr(), len(ranks)]
                      + [a for (u, d), r in zip(factors, ranks) for a in (u.data_ptr(), d.data_ptr(), r)])
        tensors.append((weight, base, factors))
        want = base.reshape(m, n).float()
        for j, (up, down) in enumerate(factors):
            mults[i, j] = 0.5 + 0.25 * j - 0.1 * i
            want = want + (up.float() * mults[i, j]).half().float() @ down.float()
        wants.append(want)
    mults[:, -1] = 1
    mults[-1, -1] = 0  # not flagged: left as it is
    tables, bad = k.group_tables(layers, arena)
    if odd:  # factors off alignment, or ranks not multiples of 16: the layers at fault, for the chunk route
        assert tables is None and bad == list(range(len(specs))), bad
        return layers
    assert tables is not None and tables.width == 3 and bad == [], bad
    k.merge_group(tables, mults)
    for i, ((weight, _, _), want) in enumerate(zip(tensors, wants)):
        got = weight.reshape(weight.shape[0], -1).float()
        if i == len(specs) - 1:
            assert torch.isnan(got).all(), "an unflagged layer was written"
            continue
        diff = (got - want).abs().max().item()
        ulp = want.abs().max().item() * 2 ** -10
        assert diff <= ulp, (odd, i, diff, ulp)
        assert (got.half() == want.half()).float().mean().item() > 0.99, (odd, i)
    return layers

layers = case([((40, 80), (16,)), ((130, 16, 3, 3), (32, 16)), ((64, 128), (48, 16, 32)), ((16, 32), (16,))], False)
case([((40, 80), (8,)), ((130, 16, 3, 3), (4, 16)), ((64, 128), (48, 24, 32)), ((16, 32), (16,))], True)
# Adapters at multiplier 0 are skipped (the table lists every loaded adapter); a layer with none in the mix gets its
# backup bit for bit, negative zeros included
weight, base = take(32, 48, fill=float("nan")), take(32, 48)
base[0, :5] = -0.0
f = [(take(32, 16) * 0.1, take(16, 48)), (take(32, 16) * 0.1, take(16, 48))]
row = [32, 48, weight.data_ptr(), base.data_ptr(), 2] + [a for u, d in f for a in (u.data_ptr(), d.data_ptr(), 16)]
tables, _ = k.group_tables([row], arena)
k.merge_group(tables, torch.tensor([[0.0, 0.0, 1.0]]))
assert torch.equal(weight.view(torch.int16), base.view(torch.int16)), "no adapter in the mix: not the backup exactly"
k.merge_group(tables, torch.tensor([[0.0, 0.5, 1.0]]))
want = base.float() + (f[1][0].float() * 0.5).half().float() @ f[1][1].float()
assert (weight.float() - want).abs().max().item() <= want.abs().max().item() * 2 ** -10
weight_off = [layers[1], layers[0][:2] + [arena[1:].data_ptr()] + layers[0][3:]]
assert k.group_tables(weight_off, arena) == (None, [1])  # weights and backups must be aligned
rows_off = [[40, 72] + layers[0][2:]]
assert k.group_tables(rows_off, arena) == (None, [])  # and their rows (N % 16)
print("ok")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="the compiled kernel is tested instead")
def test_group_kernel_matches_addmm_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", GROUP_PROBE, str(KERNELS)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("odd", [False, True], ids=["aligned", "odd-factors"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_group_kernel_matches_addmm(dtype, odd):
    k = _fresh_kernels()
    dev = torch.device("cuda", 0)
    for _ in range(600):  # the first ask starts the compile in the background
        if k.ready(dev, dtype):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"kernel not compiled: {k._READY}")
    torch.manual_seed(0)
    specs = [((48, 80), (32,)), ((320, 64, 3, 3), (64, 16)), ((1280, 5120), (128, 32, 16)), ((3072, 3072), (32,))]
    if odd:  # factors one element off alignment (a kohya file's), ranks not multiples of 16
        specs = [(shape, tuple(r // 2 + 4 for r in ranks)) for shape, ranks in specs]

    def factor(*shape, scale=1.0):
        n = torch.Size(shape).numel()
        flat = (torch.randn(n + 1, device=dev) * scale).to(dtype)
        return flat[1:].view(shape) if odd else flat[:n].view(shape)

    layers, tensors = [], []
    mults = torch.zeros(len(specs), 4, device=dev)
    for i, (shape, ranks) in enumerate(specs):
        m, n = shape[0], torch.Size(shape[1:]).numel()
        base = torch.randn(shape, device=dev).to(dtype)
        weight = torch.empty_like(base)
        factors = [(factor(m, r, scale=0.1), factor(r, n)) for r in ranks]
        mults[i, :len(ranks)] = torch.tensor([0.7, -0.3, 1.1][:len(ranks)])
        layers.append([m, n, weight.data_ptr(), base.data_ptr(), len(ranks)]
                      + [a for (u, d), r in zip(factors, ranks) for a in (u.data_ptr(), d.data_ptr(), r)])
        tensors.append((weight, base, factors))
    mults[:, -1] = 1
    tables, bad = k.group_tables(layers, tensors[0][0])
    if odd:  # left to the chunk route
        assert tables is None and bad == list(range(len(specs)))
        return
    k.merge_group(tables, mults)
    for i, (weight, base, factors) in enumerate(tensors):
        m = weight.shape[0]
        want = base.reshape(m, -1).float()
        for j, (up, down) in enumerate(factors):
            want = want + (up.float() * mults[i, j]).to(dtype).float() @ down.float()
        got = weight.reshape(m, -1).float()
        assert (got - want).abs().max().item() <= want.abs().max().item() * 2 ** -7, i
        assert (got == want.to(dtype).float()).float().mean().item() > 0.98, i
    # adapters out of the mix (multiplier 0) are skipped; a layer with none in it gets its backup bit for bit
    base0 = tensors[0][1]
    base0.view(-1)[:7] = -0.0
    mults[:, :-1] = 0
    mults[2, 1] = 0.5
    k.merge_group(tables, mults)
    torch.cuda.synchronize()
    for i, (weight, base, factors) in enumerate(tensors):
        if i != 2:
            assert torch.equal(weight.view(torch.int16), base.view(torch.int16)), i
    up, down = tensors[2][2][1]
    want = tensors[2][1].reshape(1280, -1).float() + (up.float() * 0.5).to(dtype).float() @ down.float()
    got = tensors[2][0].reshape(1280, -1).float()
    assert (got - want).abs().max().item() <= want.abs().max().item() * 2 ** -7
