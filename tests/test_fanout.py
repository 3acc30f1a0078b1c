"""Branch mode's fanouts (lorakit.fanout): widened Linear layers that read one input share one GEMM and one addmm_.

A fanout is learned from the calls (a layer called right after another on the very same tensor), must give what the
plain branch gives, follow every change (weights, sets, hotswaps, fuse), dissolve when the calls stop following its
pattern (another input, another order, a member without a branch), and leave the parameters as they were: identity,
values, own storage after unload, bit-exactly. Layers take it on CUDA only (``wide.DEVICES``); these tests add the
CPU."""

import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from helpers import assert_close, family, lora_state_dict, outputs, pair
from lorakit import fanout, wide
from lorakit.testing.loras import make_lora, to_state_dict
from test_wide import _storage_is_own

WEIGHTS = [0.7, -0.4]
QKV = ("to_q", "to_k", "to_v")


@pytest.fixture(autouse=True)
def _wide_on_cpu(monkeypatch):
    monkeypatch.setattr(wide, "DEVICES", ("cuda", "cpu"))


class Attn(nn.Module):
    """Projections as attention processors call them: q, k, v on one input (``ctx``: k and v on another)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(16, 12)
        self.to_k = nn.Linear(16, 8, bias=False)
        self.to_v = nn.Linear(16, 20)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, k_first: bool = False) -> tuple:
        src = x if ctx is None else ctx
        if k_first:
            k = self.to_k(src)
            return self.to_q(x), k, self.to_v(src)
        return self.to_q(x), self.to_k(src), self.to_v(src)


def make(dtype=torch.float32, b_targets=QKV):
    """An Attn in branch mode with adapters "a" (q, k, v; rank 3) and "b" (``b_targets``; rank 4), both active."""
    torch.manual_seed(0)
    model = Attn().to(dtype)
    pipe = types.SimpleNamespace(transformer=model)
    lorakit.attach(pipe, mode="branch")
    for seed, name, targets in ((1, "a", QKV), (2, "b", b_targets)):
        made = make_lora(model, rank=2 + seed, seed=seed, targets=targets, dtype=dtype)
        pipe.load_lora_weights(to_state_dict(made, "peft", "transformer"), adapter_name=name)
    pipe.set_adapters(["a", "b"], WEIGHTS)
    return pipe, model


def formed(dtype=torch.float32, b_targets=QKV):
    """:func:`make`, then two forwards on one input: the first learns the fanouts, the second forms them."""
    pipe, model = make(dtype, b_targets)
    x = x_in(dtype)
    model(x)
    model(x)
    return pipe, model, x


def reference(model, x, weights, ctx=None, b_targets=QKV):
    """The same projections in float64 with every weight merged by hand."""
    ref = Attn().double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    for seed, w, targets in ((1, weights[0], QKV), (2, weights[1], b_targets)):
        for path, lora in make_lora(model, rank=2 + seed, seed=seed, targets=targets).items():
            ref.get_submodule(path).weight.data += w * (lora.up.double() @ lora.down.double())
    return ref(x.double(), None if ctx is None else ctx.double())


def x_in(dtype=torch.float32, seed=5):
    return torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)


def layers(pipe):
    return pipe._lorakit_manager.states["transformer"].layers


def check(got, want, atol=1e-5):
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w, atol=atol, rtol=0), float((g.double() - w).abs().max())


class Gemms(TorchDispatchMode):
    """Counts the matrix products a forward launches."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_,
                                   torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def fanout_kinds(state) -> set[tuple[str, ...]]:
    """The fanouts of a component, each as the last names of its members' paths."""
    path = {id(ly): p for p, ly in state.layers.items()}
    return {tuple(path[id(m)].rsplit(".", 1)[1] for m in ly.fanout.members)
            for ly in state.layers.values() if ly.fanout is not None}


def _shares_one_storage(model, names) -> bool:
    ptrs = {getattr(model, n).weight.untyped_storage().data_ptr() for n in names}
    return len(ptrs) == 1


@pytest.mark.parametrize("named", [True, False], ids=["named", "learned"])
@torch.no_grad()
def test_projections_of_one_input_run_as_one_gemm_and_one_addmm(named, monkeypatch):
    """q/k/v named by CHAINS fan out from the first forward; without the table the first forward learns the chain
    (each layer widened alone: 2 kernels each) and the second forms it."""
    if not named:
        monkeypatch.setattr(fanout, "CHAINS", ())
    pipe, model = make()
    params = dict(model.named_parameters())
    values = {n: p.detach().clone() for n, p in params.items()}
    x = x_in()
    with Gemms() as alone:
        first = model(x)
    assert (layers(pipe)["to_q"].fanout is not None) == named
    with Gemms() as forming:
        model(x)  # learned: q forms the fanout at its next call
    fan = layers(pipe)["to_q"].fanout
    assert fan is not None and [m.module for m in fan.members] == [model.to_q, model.to_k, model.to_v]
    with Gemms() as fanned:
        got = model(x)
    assert (alone.count, forming.count, fanned.count) == ((2 if named else 6), 2, 2)
    assert _shares_one_storage(model, QKV)
    want = reference(model, x, WEIGHTS)
    check(first, want)
    check(got, want)
    assert dict(model.named_parameters()) == params
    for n, p in model.named_parameters():
        assert torch.equal(p, values[n]), n
    with torch.enable_grad():  # the plain branch (training) reads the same parameters
        check([o.detach() for o in model(x)], want)


@torch.no_grad()
def test_follows_weights_sets_hotswaps_and_fuse():
    from lorakit import hotswap

    pipe, model, x = formed()
    fan = layers(pipe)["to_q"].fanout
    pipe.set_adapters(["a", "b"], [0.2, 0.9])  # new multipliers
    check(model(x), reference(model, x, [0.2, 0.9]))
    pipe.set_adapters("b", 0.5)  # another set: other ranks, the block-diagonal moves
    check(model(x), reference(model, x, [0.0, 0.5]))
    pipe.set_adapters(["a", "b"], WEIGHTS)
    state = pipe._lorakit_manager.states["transformer"]
    for layer in state.layers.values():
        layer.deltas["a"].down.mul_(-2.0)  # in place, as a hotswap leaves the factors
    hotswap.refresh(pipe._lorakit_manager.adapters["a"], [state])
    check(model(x), reference(model, x, [-2.0 * WEIGHTS[0], WEIGHTS[1]]))
    assert layers(pipe)["to_q"].fanout is fan  # weights, sets and in-place rewrites: the same fanout, rewritten
    want = reference(model, x, [-2.0 * WEIGHTS[0], WEIGHTS[1]])
    pipe.fuse_lora(adapter_names=["a"])  # written into the weights, views of the fanout's matrix
    check(model(x), want)
    pipe.unfuse_lora()
    check(model(x), want)
    assert layers(pipe)["to_q"].fanout is not fan  # fusing dissolved it (the layers' branches were set anew)...
    assert len(layers(pipe)["to_q"].fanout.members) == 3  # ...and the next forwards formed it again


@torch.no_grad()
def test_another_input_or_order_dissolves_it_and_outputs_stay_right():
    pipe, model = make()
    x, ctx = x_in(), x_in(seed=6)
    model(x)
    model(x)
    assert layers(pipe)["to_q"].fanout is not None
    check(model(x, ctx), reference(model, x, WEIGHTS, ctx))  # k and v read another tensor: a miss
    assert all(layers(pipe)[n].fanout is None for n in QKV)
    for n in QKV:
        w = getattr(model, n).weight
        assert w.untyped_storage().nbytes() >= w.numel() * w.element_size()
    for _ in range(3):
        check(model(x, ctx), reference(model, x, WEIGHTS, ctx))
    fan = layers(pipe)["to_k"].fanout  # k then v on ctx: a fanout of those two
    assert fan is not None and [m.module for m in fan.members] == [model.to_k, model.to_v]
    for _ in range(2):  # k before q, and q, k, v on one input again: k and v still read one tensor, in order
        check(model(x, k_first=True), reference(model, x, WEIGHTS))
        check(model(x), reference(model, x, WEIGHTS))
    assert layers(pipe)["to_k"].fanout is fan and layers(pipe)["to_q"].fanout is None
    pipe, model = make()
    ref = reference(model, x, WEIGHTS, ctx)
    for i in range(6):  # k reads x, then ctx, in turns: each fanout of q, k, v misses; after 2 strikes no more links
        src = ctx if i % 2 else x
        got = (model.to_q(x), model.to_k(src), model.to_v(x))
        check(got, (ref[0], ref[1] if i % 2 else reference(model, x, WEIGHTS)[1], reference(model, x, WEIGHTS)[2]))
    assert all(layers(pipe)[n].fanout is None and layers(pipe)[n].strikes == fanout.STRIKES for n in QKV[:2])
    assert all(layers(pipe)[n].wide is not None for n in QKV)  # each runs alone, widened


@torch.no_grad()
def test_a_member_without_a_branch_leaves_and_the_rest_fan_out_again():
    pipe, model, x = formed(b_targets=("to_q", "to_v"))
    assert len(layers(pipe)["to_q"].fanout.members) == 3
    pipe.set_adapters("b", 0.8)  # k has no branch: it runs its own class, on the matrix's rows, then alone
    for _ in range(3):
        check(model(x), reference(model, x, [0.0, 0.8], b_targets=("to_q", "to_v")))
    fan = layers(pipe)["to_q"].fanout
    assert fan is not None and [m.module for m in fan.members] == [model.to_q, model.to_v]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@torch.no_grad()
def test_scale_zero_is_the_base_and_unload_restores_own_storage_bit_exactly(dtype):
    torch.manual_seed(0)
    base = Attn().to(dtype)
    pipe, model = make(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = x_in(dtype)
    model(x)
    model(x)
    assert layers(pipe)["to_q"].fanout is not None
    pipe.set_adapters(["a", "b"], [0.0, 0.0])  # every multiplier 0: each layer runs alone, bit for bit the base
    for g, w in zip(model(x), base(x)):
        assert torch.equal(g, w)
    pipe.set_adapters(["a", "b"], WEIGHTS)
    model(x)
    pipe.unload_lora_weights()
    for n, p in model.named_parameters():
        assert _storage_is_own(p) and torch.equal(p, before[n]), n


@torch.no_grad()
def test_state_dict_saves_with_safetensors(tmp_path):
    pipe, model, x = formed()
    assert _shares_one_storage(model, QKV)
    sd = model.state_dict()
    save_file(sd, str(tmp_path / "m.safetensors"))  # disjoint views of one storage: saved as separate tensors
    loaded = load_file(str(tmp_path / "m.safetensors"))
    assert set(loaded) == set(sd)
    for k, v in loaded.items():
        assert torch.equal(v, sd[k]) and v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
    torch.save(sd, tmp_path / "m.pt")
    for k, v in torch.load(tmp_path / "m.pt").items():
        assert torch.equal(v, sd[k]), k


@torch.no_grad()
def test_inference_mode_runs_the_layers_on_their_own():
    pipe, model, x = formed()
    with torch.inference_mode():
        xi = x_in()
        got = model(xi)
    check(got, reference(model, x, WEIGHTS))
    assert layers(pipe)["to_q"].fanout is not None and not model.to_q.weight.is_inference()


def test_disabled_by_the_switch(monkeypatch):
    monkeypatch.setattr(fanout, "ENABLED", False)
    pipe, model = make()
    x = x_in()
    with torch.no_grad():
        for _ in range(3):
            check(model(x), reference(model, x, WEIGHTS))
    assert all(layers(pipe)[n].fanout is None and layers(pipe)[n].wide is not None for n in QKV)


def test_text_encoders_and_denoiser_match_diffusers_peft():
    """An SD1.5-shaped pipeline, LoRAs on the UNet and the text encoder in branch mode: fanouts on both (CLIP's
    q/k/v_proj, the UNet's to_q/k/v) against diffusers+PEFT, across a change of weights."""
    fam = family("sd15")
    ref, ours = pair(fam, mode="branch")
    files = {name: lora_state_dict(ours, fam, seed) for seed, name in ((1, "a"), (2, "b"))}
    for p in (ref, ours):
        for name, sd in files.items():
            p.load_lora_weights(dict(sd), adapter_name=name)
    for weights in ([0.6, 0.3], [0.6, 0.3], [-0.5, 1.1]):
        for p in (ref, ours):
            p.set_adapters(["a", "b"], weights)
        assert_close(outputs(ours, fam), outputs(ref, fam), what=str(weights))
    states = ours._lorakit_manager.states
    for component, names in (("text_encoder", ("q_proj", "k_proj", "v_proj")), ("unet", QKV)):
        kinds = fanout_kinds(states[component])
        assert names in kinds, (component, kinds)


@torch.no_grad()
def test_named_chains_fan_out_from_the_first_forward():
    """Layers that CHAINS names (self-attention's to_q/k/v, cross-attention's to_k/v, CLIP's q/k/v_proj) form their
    fanout at their first forward after a load: that forward launches what later ones do and gives the same bits, and
    matches diffusers+PEFT. A chain the calls do not follow (here: to_k and to_v called on other tensors than to_q's)
    dissolves and the layers run alone, with the right outputs."""
    fam = family("sd15")
    ref, ours = pair(fam, mode="branch")
    for p in (ref, ours):
        p.load_lora_weights(lora_state_dict(ours, fam, 1), adapter_name="a")
    states = ours._lorakit_manager.states
    first, second = outputs(ours, fam), outputs(ours, fam)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert_close(first, outputs(ref, fam))
    for component, names in (("text_encoder", ("q_proj", "k_proj", "v_proj")), ("unet", QKV), ("unet", QKV[1:])):
        kinds = fanout_kinds(states[component])
        assert names in kinds, (component, kinds)
    # the self-attention chain of a model whose processor reads k and v from another tensor: the calls win
    model = nn.Module()
    model.attn = Attn()
    model.attn.is_cross_attention = False
    pipe = types.SimpleNamespace(transformer=model)
    lorakit.attach(pipe, mode="branch")
    made = make_lora(model, rank=3, seed=1, targets=QKV)
    pipe.load_lora_weights(to_state_dict(made, "peft", "transformer"), adapter_name="a")
    layer = pipe._lorakit_manager.states["transformer"].layers["attn.to_q"]
    assert [m.module for m in layer.predicted] == [model.attn.to_k, model.attn.to_v]
    x, ctx = x_in(), x_in(seed=6)
    with torch.enable_grad():
        want = [o.detach() for o in model.attn(x, ctx)]
    for _ in range(3):
        for g, w in zip(model.attn(x, ctx), want):
            assert torch.allclose(g, w, atol=1e-6, rtol=0)
    assert layer.fanout is None and layer.strikes >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: where layers take the fast path by default")
@torch.no_grad()
def test_on_cuda_by_default_against_the_plain_branch_and_a_reference(monkeypatch):
    """On CUDA (wide.DEVICES as shipped), fp16: fanouts form, follow a change of weights and of the adapter set
    (rows and block-diagonal rewritten by multi-tensor operations on the device), and unload bit-exactly."""
    monkeypatch.setattr(wide, "DEVICES", ("cuda",))
    torch.manual_seed(0)
    model = Attn().half().cuda()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pipe = types.SimpleNamespace(transformer=model)
    lorakit.attach(pipe, mode="branch")
    for seed, name in ((1, "a"), (2, "b")):
        made = make_lora(model, rank=2 + seed, seed=seed, targets=QKV, dtype=torch.float16, device="cuda")
        pipe.load_lora_weights(to_state_dict(made, "peft", "transformer"), adapter_name=name)
    x = x_in().half().cuda()
    for weights in (WEIGHTS, [0.9, 0.2], [0.0, 0.6]):
        pipe.set_adapters(["a", "b"], weights) if weights[0] else pipe.set_adapters("b", weights[1])
        model(x)
        got = model(x)
        assert layers(pipe)["to_q"].fanout is not None
        with torch.enable_grad():
            plain = [o.detach() for o in model(x)]
        check([g.cpu() for g in got], reference(model, x.cpu(), weights), atol=3e-3)
        for g, p in zip(got, plain):
            assert torch.allclose(g.float(), p.float(), atol=3e-3, rtol=0)
    pipe.unload_lora_weights()
    for n, p in model.named_parameters():
        assert _storage_is_own(p) and torch.equal(p, before[n]), n


@torch.no_grad()
def test_no_change_by_lorakit_leaves_a_stale_branch_running():
    """The fast path reads a layer's branch only when lorakit's count of its own branch writes moved
    (``wide.changed``): after every kind of change, in a seeded random order, the fanned and widened outputs equal
    the plain branch's (grad enabled: no fast path) on the same state."""
    import random

    from lorakit import hotswap

    pipe, model, x = formed(b_targets=("to_q", "to_v"))  # to_k without "b": mixed ranks, fanouts and wide layers
    manager = pipe._lorakit_manager
    files = {name: to_state_dict(make_lora(model, rank=2 + seed, seed=seed, targets=targets), "peft", "transformer")
             for seed, name, targets in ((1, "a", QKV), (2, "b", ("to_q", "to_v")))}

    def in_place(name):
        for layer in manager.states["transformer"].layers.values():
            if name in layer.deltas:
                layer.deltas[name].up.mul_(-1.5)  # as a hotswap leaves the factors, then refreshes
        hotswap.refresh(manager.adapters[name], [manager.states["transformer"]])

    def reload(name):
        pipe.delete_adapters(name)
        pipe.load_lora_weights(dict(files[name]), adapter_name=name)
        pipe.set_adapters(["a", "b"], WEIGHTS)

    rng = random.Random(7)
    ops = [lambda: pipe.set_adapters(["a", "b"], [rng.uniform(-1, 1), rng.uniform(-1, 1)]),
           lambda: pipe.set_adapters(rng.choice("ab"), rng.uniform(-1, 1)),
           lambda: pipe.set_adapters(["a", "b"], [0.0, 0.0]),
           pipe.disable_lora, pipe.enable_lora,
           lambda: in_place(rng.choice("ab")),
           lambda: pipe.fuse_lora(adapter_names=["a"]), pipe.unfuse_lora,
           lambda: reload(rng.choice("ab"))]
    for step in range(40):
        op = rng.choice(ops)
        op()
        for _ in range(2):  # (the second forward may form fanouts anew)
            fast = model(x)
            with torch.enable_grad():
                plain = model(x)
            for f, p in zip(fast, plain):
                assert torch.allclose(f, p.detach(), atol=1e-5, rtol=0), (step, float((f - p).abs().max()))
