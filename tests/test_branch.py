"""Runtime-branch mode: Linear layers on 2-, 3- and 4-D inputs and Conv2d layers (against a float64 reference and
diffusers+PEFT), scale changes, values changed in place (hotswap), and the training path."""

import types

import torch
from torch import nn

import lorakit
from helpers import assert_close, family, lora_state_dict, outputs, pair
from lorakit.testing.loras import make_lora, to_state_dict

WEIGHTS = ([0.7, -0.4], [0.3, 1.25])  # a switch from the first to the second rescales every branch


class Tiny(nn.Module):
    """Convs (3x3 stride 2 with padding, 1x1) and Linear layers fed 3-D (non-contiguous), 2-D and 4-D inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.conv_mix = nn.Conv2d(8, 8, 1)
        self.to_q = nn.Linear(8, 16)
        self.to_k = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.conv_mix(self.conv_in(x))
        tokens = self.to_k(self.to_q(h.flatten(2).transpose(1, 2)))  # [N, T, 8]
        return h, tokens, self.to_q(tokens[:, 0]), self.to_q(tokens.reshape(2, 2, -1, 8))


def tiny_pipe(dtype=torch.float32, weights=WEIGHTS[0]):
    torch.manual_seed(0)
    model = Tiny().to(dtype)
    pipe = types.SimpleNamespace(transformer=model)
    lorakit.attach(pipe, mode="branch")
    for seed, name in ((1, "a"), (2, "b")):
        layers = make_lora(model, rank=2 + seed, seed=seed, targets=("to_q", "to_k"), convs=True, dtype=dtype)
        pipe.load_lora_weights(to_state_dict(layers, "peft", "transformer"), adapter_name=name)
    pipe.set_adapters(["a", "b"], weights)
    return pipe, model


def reference(model: Tiny, x: torch.Tensor, weights: list[float]) -> tuple[torch.Tensor, ...]:
    """The same forward in float64 with every weight merged by hand: ``W + sum(w_i * B_i @ A_i)``."""
    ref = Tiny().double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    for seed, w in zip((1, 2), weights):
        for path, lora in make_lora(model, rank=2 + seed, seed=seed, targets=("to_q", "to_k"), convs=True).items():
            weight = ref.get_submodule(path).weight
            delta = lora.up.flatten(1).double() @ lora.down.flatten(1).double()
            weight.data += w * delta.reshape(weight.shape)
    return ref(x.double())


def inputs(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)).to(dtype)


@torch.no_grad()
def test_scale_change_equals_a_fresh_setup():
    pipe, model = tiny_pipe()
    x = inputs()
    first = model(x)
    for got, want in zip(first, reference(model, x, WEIGHTS[0])):
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=0)
    pipe.set_adapters(["a", "b"], WEIGHTS[1])  # the per-rank scales are rewritten in place
    after = model(x)
    fresh = tiny_pipe(weights=WEIGHTS[1])[1](x)
    for got, want, ref in zip(after, fresh, reference(model, x, WEIGHTS[1])):
        assert torch.equal(got, want)  # bit for bit what a plan laid out for these weights runs
        assert torch.allclose(got.double(), ref, atol=1e-5, rtol=0)
    assert any(not torch.allclose(a, b) for a, b in zip(first, after))


def test_training_path_gradients_reach_inputs_and_weights():
    _, model = tiny_pipe()
    x = inputs().requires_grad_()
    out = model(x)
    loss = sum((o.double() ** 2).sum() for o in out)
    loss.backward()
    ref_x = x.detach().double().requires_grad_()
    ref_loss = sum((o ** 2).sum() for o in reference(model, ref_x, WEIGHTS[0]))
    ref_loss.backward()
    assert torch.allclose(x.grad.double(), ref_x.grad, atol=1e-4, rtol=1e-5)
    for layer in (model.to_q, model.conv_in):
        assert layer.weight.grad is not None and layer.weight.grad.abs().max() > 0  # the base still trains
    with torch.no_grad():  # the in-place inference path gives the same outputs
        for got, want in zip(model(x), out):
            assert torch.allclose(got, want, atol=1e-6, rtol=0)


@torch.no_grad()
def test_conv_branch_on_channels_last_inputs():
    _, model = tiny_pipe()
    x = inputs()
    want = model(x)
    got = model(x.to(memory_format=torch.channels_last))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=0)


def against_peft(convs: bool):
    """An SD1.5-shaped UNet in branch mode next to diffusers+PEFT, adapters "a" (on convs too with ``convs``) and
    "b" loaded in both; yields (family, PEFT pipeline, lorakit pipeline, weights, lorakit's outputs, PEFT's outputs)
    at each of WEIGHTS."""
    fam = family("sd15")
    ref, ours = pair(fam, mode="branch")
    files = {name: lora_state_dict(ours, fam, seed, convs=c, text_encoders=False)
             for seed, name, c in ((1, "a", convs), (2, "b", False))}
    for p in (ref, ours):
        for name, sd in files.items():
            p.load_lora_weights(dict(sd), adapter_name=name)
    for weights in WEIGHTS:
        for p in (ref, ours):
            p.set_adapters(["a", "b"], weights)
        yield fam, ref, ours, weights, outputs(ours, fam), outputs(ref, fam)


def test_conv_branches_match_diffusers_peft():
    """An SD1.5-shaped UNet with LoRAs on its convs and linears: branch mode against diffusers+PEFT, before and after
    a change of weights. (PEFT refuses a second adapter with conv targets: "b" has linears only.)"""
    for _, _, _, weights, got, want in against_peft(convs=True):
        assert_close(got, want, what=str(weights))


@torch.no_grad()
def test_refresh_after_values_change_in_place_restacks_without_a_switch():
    """hotswap.refresh (what every in-place hotswap ends with) restacks a branch layer itself: a compiled graph
    reading the stacked factors sees the new values with no switch plan run afterwards."""
    from lorakit import hotswap

    pipe, model = tiny_pipe()
    state = pipe._lorakit_manager.states["transformer"]
    deltas = [layer.deltas["a"] for layer in state.layers.values()]
    for delta in deltas:
        delta.down.mul_(-2.0)
    hotswap.refresh(pipe._lorakit_manager.adapters["a"], [state])
    x = inputs()
    want = reference(model, x, [-2.0 * WEIGHTS[0][0], WEIGHTS[0][1]])  # -2 * a at weight w is a at weight -2w
    for got, ref in zip(model(x), want):
        assert torch.allclose(got.double(), ref, atol=1e-5, rtol=0)
