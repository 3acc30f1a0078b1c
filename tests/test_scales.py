"""set_adapters weight grammar: per-block dicts match diffusers on attention-only LoRAs, and (unlike diffusers) a
block's scale reaches every LoRA layer in it, resnets and samplers included."""

import pytest
import torch

import lorakit
from helpers import assert_close, family, outputs, pair
from lorakit.scales import build_rule
from lorakit.testing.loras import make_lora, to_state_dict

UNET_DICTS = [
    {"down": 0.9},
    {"mid": 0.3},
    {"up": {"block_1": [0.4, 0.8, 1.0]}},
    {"down": 0.9, "mid": 0.5, "up": {"block_0": 0.6, "block_1": [0.4, 0.8, 1.0]}},
]


@pytest.mark.parametrize("fam_name", ["sd15", "sdxl"])
@pytest.mark.parametrize("weights", UNET_DICTS, ids=str)
def test_per_block_dicts_match_diffusers_on_attention_loras(fam_name, weights):
    fam = family(fam_name)
    ref, ours = pair(fam)
    if fam_name == "sdxl" and "block_1" in str(weights):
        weights = {**weights, "up": {"block_0": [0.4, 0.8, 1.0]}}  # SDXL-tiny: attentions live in up block 0
    sd = to_state_dict(make_lora(ref.unet, seed=1), "peft", "unet")
    for p in (ref, ours):
        p.load_lora_weights(dict(sd), adapter_name="a")
        p.set_adapters("a", {"unet": weights})
    assert_close(outputs(ours, fam), outputs(ref, fam))


def test_block_scale_reaches_resnets_and_samplers():
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe, mode="merge")  # merged: the weights show each layer's effective scale
    layers = make_lora(pipe.unet, seed=2, convs=True, targets=())
    pipe.load_lora_weights(to_state_dict(layers, "kohya", "unet"), adapter_name="c")
    base = {p: pipe.unet.state_dict()[f"{p}.weight"].clone() for p in layers}
    pipe.set_adapters("c", {"unet": {"down": 0.5, "up": {"block_1": [0.1, 0.2, 0.3]}}})
    expect = {"down_blocks.0.resnets.0.conv1": 0.5, "down_blocks.0.downsamplers.0.conv": 0.5,
              "down_blocks.1.resnets.1.conv2": 0.5, "up_blocks.1.resnets.2.conv1": 0.3,
              "up_blocks.1.resnets.0.conv_shortcut": 0.1, "up_blocks.0.upsamplers.0.conv": 1.0,
              "mid_block.resnets.0.conv1": 1.0, "conv_in": 1.0}
    for path, scale in expect.items():
        w = layers[path]
        delta = (w.up.flatten(1) @ w.down.flatten(1)).reshape(base[path].shape) * scale
        got = pipe.unet.get_submodule(path).weight.detach() - base[path]
        assert torch.allclose(got, delta, atol=1e-6), path


def test_transformer_block_grammar():
    fam = family("flux")
    pipe = fam.build()
    t = pipe.transformer
    rule = build_rule(t, {"transformer_blocks": [0.2], "single_transformer_blocks": {"block_0": 0.7}}, "w")
    assert rule("transformer_blocks.0.attn.to_q") == 0.2
    assert rule("single_transformer_blocks.0.attn.to_q") == 0.7  # no substring collision with transformer_blocks.0
    assert rule("proj_out") == 1.0
    rule = build_rule(t, {"transformer_blocks.0.attn": 0.3, "transformer_blocks": 0.9}, "w")
    assert rule("transformer_blocks.0.attn.to_k") == 0.3 and rule("transformer_blocks.0.ff.net.2") == 0.9
    with pytest.raises(lorakit.LoraError, match="lists 2 values but the model has 1"):
        build_rule(t, {"transformer_blocks": [0.1, 0.2]}, "w")


def test_transformer_block_scales_in_pipeline():
    fam = family("flux")
    pipe = fam.build()
    lorakit.attach(pipe, mode="merge")
    layers = make_lora(pipe.transformer, seed=3, targets=("to_q", "proj_out"))
    pipe.load_lora_weights(to_state_dict(layers, "peft", "transformer"), adapter_name="f")
    pipe.set_adapters("f", {"transformer": {"single_transformer_blocks": 0.0}})
    for path, w in layers.items():
        got = pipe.transformer.get_submodule(path).weight.detach() - pipe.transformer.state_dict()[f"{path}.weight"]
        want = 0.0 if path.startswith("single_transformer_blocks") else 1.0
        assert torch.allclose(got, want * (w.up @ w.down), atol=1e-6), path
