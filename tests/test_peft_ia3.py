"""(IA)^3 saved by PEFT for a diffusers model (``<module>.ia3_l``): lorakit's outputs and fused weights (biases
included) match PEFT's own IA3 layers on the same tiny UNet; unload is bit-exact; an ambiguous conv vector is refused."""

import pytest
import torch
from helpers import assert_params_equal, denoiser_inputs, params
from peft import IA3Config, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.ia3 import IA3Layer

import lorakit
from lorakit.testing.models import tiny_sd15_pipeline

# Linear outputs (to_k: no bias, to_out.0 and time_emb_proj: bias scaled too), Linear inputs (ff.net.2, PEFT's
# feedforward), conv outputs (conv_in 4 -> 32) and conv inputs (conv_out 32 -> 4).
TARGETS = ["to_k", "to_out.0", "time_emb_proj", "ff.net.2", "conv_in", "conv_out"]
FEEDFORWARD = ["ff.net.2", "conv_out"]


def _unet_with_biases():
    """The tiny UNet with seeded non-zero biases (its builder leaves them zero), to see IA3 scale them."""
    unet = tiny_sd15_pipeline().unet
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return unet


@pytest.fixture(scope="module")
def peft_unet():
    """(tiny UNet with PEFT IA3 layers holding seeded vectors, PEFT's state dict of them)."""
    unet = _unet_with_biases()
    inject_adapter_in_model(IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD), unet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, IA3Layer):
                vec = module.ia3_l["default"]
                vec.copy_(1 + 0.3 * torch.randn(vec.shape, generator=g))
    return unet, {k: v.clone() for k, v in get_peft_model_state_dict(unet).items()}


@torch.no_grad()
def _out(unet):
    return unet(**denoiser_inputs(unet), return_dict=False)[0]


def test_peft_ia3_matches_peft(peft_unet):
    ref, sd = peft_unet
    assert all(k.endswith(".ia3_l") for k in sd) and any(k.startswith("conv_in.") for k in sd)
    pipe = tiny_sd15_pipeline()
    pipe.unet = _unet_with_biases()
    lorakit.attach(pipe)
    base = params(pipe.unet)
    pipe.load_lora_weights(dict(sd), adapter_name="ia3")
    assert pipe._lorakit_manager.adapters["ia3"].num_modules() == len(sd)
    got, want = _out(pipe.unet), _out(ref)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    pipe.set_adapters("ia3", 0.0)  # multiplier 0: the base model
    assert_params_equal(base, pipe.unet)
    pipe.set_adapters("ia3", 1.0)
    pipe.fuse_lora()
    merged = {}
    for name, module in ref.named_modules():  # PEFT's own merge: weights and (output-scaled) biases
        if isinstance(module, IA3Layer):
            layer = module.get_base_layer()
            module.merge()
            merged[name] = (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
            module.unmerge()
    fused = pipe.unet.state_dict()
    for name, (weight, bias) in merged.items():
        assert torch.allclose(fused[f"{name}.weight"], weight, rtol=1e-6, atol=1e-7), name
        if bias is not None:
            assert torch.allclose(fused[f"{name}.bias"], bias, rtol=1e-6, atol=1e-7), name
    assert any(not torch.equal(fused[f"{n}.bias"], base[f"{n}.bias"]) for n, (_, b) in merged.items() if b is not None)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert_params_equal(base, pipe.unet)


def test_peft_ia3_on_a_square_conv_is_refused():
    pipe = tiny_sd15_pipeline()
    lorakit.attach(pipe)
    base = params(pipe.unet)
    sd = {"down_blocks.0.resnets.0.conv2.ia3_l": torch.ones(1, 32, 1, 1)}  # 32 -> 32: inputs or outputs?
    with pytest.raises(lorakit.LoraShapeError, match=r"conv2.*feedforward_modules"):
        pipe.load_lora_weights(sd, adapter_name="x")
    assert_params_equal(base, pipe.unet)
