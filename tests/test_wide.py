"""Branch mode's eager fast path (lorakit.wide): Linear weights re-homed into ``[W; s*A]``.

The wide path must give what the plain branch gives (the training path, with grad enabled, is the plain branch), keep
the parameters' identity and values, follow every change of the branch (new set, new weights, in-place rewrites of
the factors), step aside where it cannot run (a dtype the matrix does not have, a module moved), and give the
weights their own storage back at unload, bit-exactly. Layers take it on CUDA only (``wide.DEVICES``); these tests add
the CPU."""

import pytest
import torch

from helpers import assert_close, outputs
from lorakit import wide
from test_branch import WEIGHTS, against_peft, inputs, reference, tiny_pipe


@pytest.fixture(autouse=True)
def _wide_on_cpu(monkeypatch):
    monkeypatch.setattr(wide, "DEVICES", ("cuda", "cpu"))


def _plain(model, x):
    """The same forward on the plain branch: with grad enabled lorakit never takes the wide path."""
    with torch.enable_grad():
        return tuple(o.detach() for o in model(x))


def _ran():
    """``tiny_pipe()`` after one eager forward, its Linear layers widened: (pipe, model, inputs, to_q's layer)."""
    pipe, model = tiny_pipe()
    x = inputs()
    model(x)
    return pipe, model, x, pipe._lorakit_manager.states["transformer"].layers["to_q"]


def _storage_is_own(p: torch.Tensor) -> bool:
    return p.untyped_storage().nbytes() == p.numel() * p.element_size()


@torch.no_grad()
def test_wide_path_matches_the_plain_branch_and_keeps_the_parameters():
    pipe, model = tiny_pipe()
    params = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in params.items()}
    x = inputs()
    plain = _plain(model, x)
    got = model(x)
    layer = pipe._lorakit_manager.states["transformer"].layers["to_q"]
    assert layer.wide is not None and layer.wide.homed(model.to_q)  # the fast path ran
    assert not _storage_is_own(model.to_q.weight) and model.to_q.weight.is_contiguous()
    for g, p, ref in zip(got, plain, reference(model, x, WEIGHTS[0])):
        assert torch.allclose(g, p, atol=1e-6, rtol=0)
        assert torch.allclose(g.double(), ref, atol=1e-5, rtol=0)
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    for n, p in model.named_parameters():
        assert torch.equal(p, values[n]), n  # and the same values
    assert set(model.state_dict()) == set(values)


@torch.no_grad()
def test_wide_rows_follow_weights_sets_and_in_place_rewrites():
    from lorakit import hotswap

    pipe, model = tiny_pipe()
    x = inputs()
    model(x)
    pipe.set_adapters(["a", "b"], WEIGHTS[1])  # new multipliers: the rows are rewritten at the next forward
    for g, ref in zip(model(x), reference(model, x, WEIGHTS[1])):
        assert torch.allclose(g.double(), ref, atol=1e-5, rtol=0)
    pipe.set_adapters("b", 0.9)  # a new set (a span of the pool)
    for g, p in zip(model(x), _plain(model, x)):
        assert torch.allclose(g, p, atol=1e-6, rtol=0)
    pipe.set_adapters(["a", "b"], WEIGHTS[0])
    state = pipe._lorakit_manager.states["transformer"]
    for layer in state.layers.values():
        layer.deltas["a"].down.mul_(-2.0)  # values changed in place, as a hotswap leaves them
    hotswap.refresh(pipe._lorakit_manager.adapters["a"], [state])
    want = reference(model, x, [-2.0 * WEIGHTS[0][0], WEIGHTS[0][1]])
    for g, ref in zip(model(x), want):
        assert torch.allclose(g.double(), ref, atol=1e-5, rtol=0)
    pipe.disable_lora()
    pipe.enable_lora()
    for g, ref in zip(model(x), want):
        assert torch.allclose(g.double(), ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_outgrowing_the_rows_widens_again():
    from lorakit.testing.loras import make_lora, to_state_dict

    pipe, model, x, layer = _ran()
    first = layer.wide
    big = make_lora(model, rank=64, seed=9, targets=("to_q", "to_k"), convs=True)
    pipe.load_lora_weights(to_state_dict(big, "peft", "transformer"), adapter_name="big")
    pipe.set_adapters(["a", "b", "big"], [0.5, 0.5, 0.5])
    out = model(x)
    assert layer.wide is not first and layer.wide.capacity >= first.capacity + 64
    for g, p in zip(out, _plain(model, x)):
        assert torch.allclose(g, p, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@torch.no_grad()
def test_unload_gives_the_weights_their_own_storage_bit_exactly(dtype):
    pipe, model = tiny_pipe(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(inputs(dtype))
    assert not _storage_is_own(model.to_q.weight)
    pipe.unload_lora_weights()
    for n, p in model.named_parameters():
        assert _storage_is_own(p), n
        assert torch.equal(p, before[n]), n


@torch.no_grad()
def test_a_moved_module_and_a_foreign_dtype_run_the_plain_branch():
    pipe, model, x, layer = _ran()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # inputs reach the layer in bf16: the plain branch runs
        auto = model(x)
    assert auto[1].dtype == torch.bfloat16 and layer.wide.homed(model.to_q)
    model.double()  # .data replaced: the matrix no longer holds the weights
    assert not layer.wide.homed(model.to_q)
    pipe.set_adapters(["a", "b"], WEIGHTS[1])  # a sync lays the factors out in float64 again
    for g, ref in zip(model(x.double()), reference(model, x, WEIGHTS[1])):
        assert g.dtype == torch.float64 and torch.allclose(g, ref, atol=1e-12, rtol=0)
    assert layer.wide.homed(model.to_q) and layer.wide.matrix.dtype == torch.float64  # widened afresh


@torch.no_grad()
def test_cpu_layers_keep_their_storage_by_default(monkeypatch):
    monkeypatch.setattr(wide, "DEVICES", ("cuda",))
    pipe, model = tiny_pipe()
    model(inputs())
    layer = pipe._lorakit_manager.states["transformer"].layers["to_q"]
    assert layer.wide is None and not layer.widenable and _storage_is_own(model.to_q.weight)


def test_wide_path_matches_diffusers_peft():
    """An SD1.5-shaped UNet, two adapters in branch mode with the wide path, against diffusers+PEFT: new weights, a
    switch to one adapter, a call-time scale (0 gives the base bit for bit)."""
    for fam, ref, ours, weights, got, want in against_peft(convs=False):
        assert_close(got, want, what=str(weights))
    layers = ours._lorakit_manager.states[fam.denoiser].layers
    assert all(layer.wide is not None or layer.fanout is not None
               for layer in layers.values() if isinstance(layer.module, torch.nn.Linear))
    # the projections that read one input run as fanouts (lorakit.fanout): self-attention's q/k/v, cross-attention's k/v
    fans = {tuple(p.rsplit(".", 1)[1] for p, ly in layers.items() if ly.fanout is fan)
            for fan in {id(ly.fanout): ly.fanout for ly in layers.values() if ly.fanout is not None}.values()}
    assert fans == {("to_q", "to_k", "to_v"), ("to_k", "to_v")}
    for p in (ref, ours):
        p.set_adapters("b", 0.6)
    assert_close(outputs(ours, fam), outputs(ref, fam), what="b alone")
    kw = {fam.call_kwarg: {"scale": 0.0}}
    base = outputs(fam.build(), fam)
    for k, v in outputs(ours, fam, **kw).items():
        assert torch.equal(v, base[k]), k


@torch.no_grad()
def test_a_switch_rewrites_each_groups_rows_at_once(monkeypatch):
    pipe, model = tiny_pipe()
    x = inputs()
    model(x)
    calls = []
    real = wide.rewrite
    monkeypatch.setattr(wide, "rewrite", lambda items: (calls.append(len(items)), real(items)))
    linears = [ly for ly in pipe._lorakit_manager.states["transformer"].layers.values() if ly.wide is not None]
    for weights in (WEIGHTS[1], WEIGHTS[0]):
        calls.clear()
        pipe.set_adapters(["a", "b"], weights)
        for g, ref in zip(model(x), reference(model, x, weights)):
            assert torch.allclose(g.double(), ref, atol=1e-5, rtol=0)
        assert sum(calls) == len(linears) == 2  # every widened layer of the group, in one call per group
        calls.clear()
        model(x)
        assert calls == []  # nothing stale until the next switch


def test_widened_model_pickles_copies_and_saves(tmp_path):
    """With weights re-homed: torch.save(model) and copy.deepcopy give plain layers whose weights hold what runs, and
    save_pretrained writes the base weights, each exactly once (a view's whole storage is not written)."""
    import copy
    import io

    from safetensors.torch import load_file

    import lorakit
    from helpers import denoiser_inputs, family, lora_state_dict

    fam = family("sd15")
    pipe, base = fam.build(), fam.build()
    lorakit.attach(pipe, mode="branch")
    pipe.load_lora_weights(lora_state_dict(pipe, fam, 1, text_encoders=False), adapter_name="a")
    pipe.set_adapters("a", 0.7)
    unet = pipe.unet
    inputs = denoiser_inputs(unet)
    with torch.no_grad():
        live = unet(**inputs).sample
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    state = layer._lorakit_layer  # re-homed: widened alone or, to_q of self-attention, in a fanout
    assert (state.wide is not None or state.fanout is not None) and not _storage_is_own(layer.weight)
    buf = io.BytesIO()
    torch.save(unet, buf)
    buf.seek(0)
    with torch.no_grad():
        for copied in (torch.load(buf, weights_only=False), copy.deepcopy(unet)):
            assert torch.allclose(copied(**inputs).sample, live, atol=1e-5, rtol=0)
            plain = copied.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
            assert type(plain) is torch.nn.Linear and not hasattr(plain, "_lorakit_layer")
    unet.save_pretrained(tmp_path / "unet")
    saved = load_file(str(next((tmp_path / "unet").glob("*.safetensors"))))
    want = base.unet.state_dict()
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)


def test_lorakit_wide_0_keeps_the_plain_branch():
    import os
    import subprocess
    import sys

    code = "import lorakit.wide as w; print(w.DEVICES)"
    for value, want in (("0", "()"), ("1", "('cuda',)")):
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LORAKIT_WIDE": value},
                              capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == want, done.stderr[-2000:]


def test_a_first_forward_in_inference_mode_leaves_normal_parameters():
    """Widened inside torch.inference_mode, the parameters must not become inference tensors: a later fuse, unfuse,
    unload (in-place writes) and backward outside it must work."""
    pipe, model = tiny_pipe()
    x = inputs()
    with torch.inference_mode():
        model(x)
    layer = pipe._lorakit_manager.states["transformer"].layers["to_q"]
    assert layer.wide is not None and not model.to_q.weight.is_inference()
    pipe.set_adapters(["a", "b"], WEIGHTS[1])
    with torch.no_grad():
        for g, ref in zip(model(x), reference(model, x, WEIGHTS[1])):
            assert torch.allclose(g.double(), ref, atol=1e-5, rtol=0)
    pipe.fuse_lora()
    pipe.unfuse_lora()
    out = model(x)  # grad enabled: the plain branch, through autograd
    sum(o.sum() for o in out).backward()
    assert model.to_q.weight.grad is not None
    pipe.unload_lora_weights()
    assert _storage_is_own(model.to_q.weight) and not model.to_q.weight.is_inference()
