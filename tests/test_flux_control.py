"""FLUX Control LoRAs (BFL layout): LoRA factors with lora_B biases, q/k norm overwrites and a widened x_embedder.
lorakit loads the BFL file; diffusers+PEFT loads the same tensors under diffusers names (its BFL converter is fixed to
FLUX.1-dev's sizes) into an identical tiny model; outputs, unload (with and without reset) and restores must agree."""

import json

import pytest
import torch
from helpers import (
    assert_close,
    assert_params_equal,
    family,
    outputs,
    pair,
    params,
    write,
)
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.convert import convert_file
from lorakit.inspection import inspect_file
from lorakit.testing.family_files import Source, flux_control_file

DB, SB = "transformer_blocks.0", "single_transformer_blocks.0"
QKV, ADD = ("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")
# The layers of a BFL control LoRA (flux1-canny-dev-lora), mapping written out here (not lorakit's tables).
CONTROL = [
    Source("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Source("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Source("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Source("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Source("txt_in", ("context_embedder",)),
    Source("img_in", ("x_embedder",)),
    Source("double_blocks.0.img_mod.lin", (f"{DB}.norm1.linear",)),
    Source("double_blocks.0.txt_mod.lin", (f"{DB}.norm1_context.linear",)),
    Source("double_blocks.0.img_attn.qkv", tuple(f"{DB}.attn.{p}" for p in QKV)),
    Source("double_blocks.0.txt_attn.qkv", tuple(f"{DB}.attn.{p}" for p in ADD)),
    Source("double_blocks.0.img_mlp.0", (f"{DB}.ff.net.0.proj",)),
    Source("double_blocks.0.img_mlp.2", (f"{DB}.ff.net.2",)),
    Source("double_blocks.0.txt_mlp.0", (f"{DB}.ff_context.net.0.proj",)),
    Source("double_blocks.0.txt_mlp.2", (f"{DB}.ff_context.net.2",)),
    Source("double_blocks.0.img_attn.proj", (f"{DB}.attn.to_out.0",)),
    Source("double_blocks.0.txt_attn.proj", (f"{DB}.attn.to_add_out",)),
    Source("single_blocks.0.modulation.lin", (f"{SB}.norm.linear",)),
    Source("single_blocks.0.linear1", (*(f"{SB}.attn.{p}" for p in QKV), f"{SB}.proj_mlp")),
    Source("single_blocks.0.linear2", (f"{SB}.proj_out",)),
    Source("final_layer.linear", ("proj_out",)),
    Source("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
]
NORMS = {
    "double_blocks.0.img_attn.norm.query_norm.scale": f"{DB}.attn.norm_q.weight",
    "double_blocks.0.img_attn.norm.key_norm.scale": f"{DB}.attn.norm_k.weight",
    "double_blocks.0.txt_attn.norm.query_norm.scale": f"{DB}.attn.norm_added_q.weight",
    "double_blocks.0.txt_attn.norm.key_norm.scale": f"{DB}.attn.norm_added_k.weight",
    "single_blocks.0.norm.query_norm.scale": f"{SB}.attn.norm_q.weight",
    "single_blocks.0.norm.key_norm.scale": f"{SB}.attn.norm_k.weight",
}
FAM = family("flux")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(BFL file path, diffusers twin state dict, the model's input width)."""
    pipe = FAM.build()
    width = pipe.transformer.config.in_channels
    bfl, twin = flux_control_file(pipe.transformer, CONTROL, NORMS, {"img_in": 2 * width}, seed=7)
    return write(bfl, tmp_path_factory.mktemp("control") / "control.safetensors"), twin, width


def _loaded(files, **kwargs):
    path, twin, _ = files
    ref, ours = pair(FAM)
    base = params(ours.transformer)
    ours.original_x_embedder = ours.transformer.x_embedder
    ours.load_lora_weights(path, adapter_name="c", **kwargs)
    ref.load_lora_weights(dict(twin), adapter_name="c")
    return ref, ours, base


def _same_weights(ours, ref):
    a, b = ours.transformer.state_dict(), ref.transformer.state_dict()
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_control_lora_matches_diffusers(files):
    ref, ours, _ = _loaded(files)
    width = files[2]
    t = ours.transformer
    assert t.config.in_channels == ref.transformer.config.in_channels == 2 * width
    assert t.x_embedder.weight.shape == ref.transformer.x_embedder.base_layer.weight.shape
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="control")  # on a widened (latents + control) input
    for name, value in NORMS.items():  # overwrites, not deltas: the adapter weight does not touch them
        assert torch.equal(t.get_parameter(value), ref.transformer.get_parameter(value)), name
    ours.set_adapters("c", 0.5)
    ref.set_adapters("c", 0.5)  # lora_B.bias scales with the adapter weight, like the weight delta
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="weight 0.5")
    ours.set_adapters("c", 1.0)
    ours.fuse_lora()
    ref.set_adapters("c", 1.0)
    ref.fuse_lora()
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="fused")


def test_diffusers_names_load_too(files):
    """The converted file (transformer.<path>.lora_B.bias, attn.norm_q.weight...) gives the same model."""
    path, twin, _ = files
    pipe, again = FAM.build(), FAM.build()
    lorakit.attach(pipe)
    lorakit.attach(again)
    pipe.load_lora_weights(path, adapter_name="c")
    again.load_lora_weights(dict(twin), adapter_name="c")
    assert_close(outputs(pipe, FAM), outputs(again, FAM), atol=1e-6)


@pytest.mark.parametrize("reset", [False, True])
def test_unload_matches_diffusers(files, reset):
    ref, ours, base = _loaded(files)
    original = ours.original_x_embedder
    assert ours.transformer.x_embedder is not original
    ours.unload_lora_weights(reset_to_overwritten_params=reset)
    ref.unload_lora_weights(reset_to_overwritten_params=reset)
    t = ours.transformer
    assert t.config.in_channels == ref.transformer.config.in_channels == (files[2] if reset else 2 * files[2])
    _same_weights(ours, ref)  # norms back in both; x_embedder wide (zero-padded) or original in both
    if reset:  # the very layer object and every weight, bit for bit
        assert t.x_embedder is original and ours._lorakit_manager.states["transformer"].control.widened == {}
        assert_params_equal(base, t)
    else:
        assert torch.equal(t.x_embedder.weight[:, :files[2]], base["x_embedder.weight"])
        assert not t.x_embedder.weight[:, files[2]:].any()
        now = t.state_dict()
        assert all(torch.equal(now[k], v) for k, v in base.items() if not k.startswith("x_embedder.weight"))
        ours.unload_lora_weights(reset_to_overwritten_params=True)  # a later reset still gives the original back
        assert t.x_embedder is original and t.config.in_channels == files[2]
        assert_params_equal(base, t)


def test_unfuse_restores_norms_as_diffusers(files):
    ref, ours, base = _loaded(files)
    for pipe in (ours, ref):
        pipe.fuse_lora()
        pipe.unfuse_lora()
    for value in NORMS.values():
        assert torch.equal(ours.transformer.get_parameter(value), base[value]), value
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="unfused")


def test_narrow_lora_on_widened_layer_is_padded(files):
    """A LoRA made for the 16-input x_embedder, loaded after the control LoRA widened it: down is zero-padded."""
    ref, ours, _ = _loaded(files)
    g = torch.Generator().manual_seed(3)
    width, out = files[2], ours.transformer.x_embedder.out_features
    sd = {"transformer.x_embedder.lora_A.weight": torch.randn(2, width, generator=g) * 0.2,
          "transformer.x_embedder.lora_B.weight": torch.randn(out, 2, generator=g) * 0.2,
          "transformer.context_embedder.lora_A.weight": torch.randn(2, 32, generator=g) * 0.2,
          "transformer.context_embedder.lora_B.weight": torch.randn(out, 2, generator=g) * 0.2}
    for pipe in (ours, ref):
        pipe.load_lora_weights(dict(sd), adapter_name="n")
        pipe.set_adapters(["c", "n"], [1.0, 0.8])
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="control + narrow")


@pytest.mark.parametrize("corrupt", ["norm_shape", "wide_up_rows", "bias_rows"])
def test_corrupt_control_file_changes_nothing(files, tmp_path, corrupt):
    sd = load_file(files[0])
    key = {"norm_shape": "single_blocks.0.norm.key_norm.scale", "wide_up_rows": "img_in.lora_B.weight",
           "bias_rows": "double_blocks.0.img_attn.qkv.lora_B.bias"}[corrupt]
    sd[key] = sd[key][:-1]
    pipe = FAM.build()
    manager = lorakit.attach(pipe)
    t = pipe.transformer
    base, original = params(t), t.x_embedder
    with pytest.raises(lorakit.LoraShapeError, match=key.rpartition(".")[0].rpartition(".")[0]):
        pipe.load_lora_weights(write(sd, tmp_path / "bad.safetensors"), adapter_name="c")
    assert t.x_embedder is original and t.config.in_channels == files[2]
    assert_params_equal(base, t)
    assert manager.adapters == {} and manager.states["transformer"].control.widened == {}


def test_widening_a_layer_with_adapters_is_refused(files):
    path, _, width = files
    pipe = FAM.build()
    lorakit.attach(pipe)
    out = pipe.transformer.x_embedder.out_features
    pipe.load_lora_weights({"transformer.x_embedder.lora_A.weight": torch.zeros(2, width),
                            "transformer.x_embedder.lora_B.weight": torch.zeros(out, 2)}, adapter_name="n")
    base = params(pipe.transformer)
    with pytest.raises(lorakit.LoraError, match=r"x_embedder.*unload them first"):
        pipe.load_lora_weights(path, adapter_name="c")
    assert_params_equal(base, pipe.transformer)
    pipe.unload_lora_weights()
    pipe.load_lora_weights({"transformer.context_embedder.lora_A.weight": torch.zeros(2, 32),
                            "transformer.context_embedder.lora_B.weight": torch.zeros(out, 2)}, adapter_name="n")
    with pytest.raises(lorakit.LoraError, match="cannot be hotswapped"):
        pipe.load_lora_weights(path, adapter_name="n", hotswap=True)
    assert_params_equal(base, pipe.transformer)


# ------------------------------------------------------------------------------- lora_B.bias in any PEFT file
def test_lora_bias_in_any_peft_file(tmp_path):
    """PEFT's lora_B.bias on SD1.5 layers with alpha != rank: the bias takes weight x alpha / r, as in PEFT."""
    fam = family("sd15")
    ref, ours = pair(fam)
    g = torch.Generator().manual_seed(5)
    sd = {}
    layers = [(n, m) for n, m in ours.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and m.bias is not None and n.startswith(("down_blocks.0.", "mid_block.")) and "conv" not in n]
    assert len(layers) >= 6
    for name, m in layers:
        shape = m.weight.shape
        sd[f"unet.{name}.lora_A.weight"] = torch.randn(4, *shape[1:], generator=g) * 0.1
        sd[f"unet.{name}.lora_B.weight"] = torch.randn(shape[0], 4, *([1] * (len(shape) - 2)), generator=g) * 0.1
        sd[f"unet.{name}.lora_B.bias"] = torch.randn(shape[0], generator=g) * 0.2
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.lora_bias": True,
                                                  "unet.target_modules": [n for n, _ in layers]})}
    path = write(sd, tmp_path / "bias.safetensors", metadata=meta)
    base = params(ours.unet)
    for pipe in (ours, ref):
        pipe.load_lora_weights(path, adapter_name="b")
        pipe.set_adapters("b", 0.7)
    assert_close(outputs(ours, fam), outputs(ref, fam), what="lora_B.bias")
    saved = load_file(ours.save_lora_adapter(tmp_path / "again", adapter_name="b"))  # written back as lora_B.bias
    assert saved.keys() == sd.keys() and all(torch.equal(saved[k], sd[k]) for k in sd)
    with pytest.raises(lorakit.LoraError, match="bias"):
        ours.add_weighted_adapter(["b"], [1.0], "m", "svd")
    ours.unload_lora_weights()
    assert_params_equal(base, ours.unet)


def test_inspect_lists_norm_overwrites(files, capsys):
    report = inspect_file(files[0])
    assert sorted(report.norm_overwrites) == sorted(NORMS) and report.unused == []
    assert report.algorithms == {"lora+bias": len(CONTROL)} and report.family == "flux"
    assert main(["inspect", files[0]]) == 0
    assert "norm overwrites" in capsys.readouterr().out


def test_convert_to_diffusers_gives_the_converted_file(files, tmp_path):
    """``lorakit convert --to diffusers`` of the BFL file writes what diffusers' converter makes of it (norm scales
    included, as transformer.<path>.weight); kohya cannot hold the norm scales: refused."""
    pipe = FAM.build()
    out = convert_file(files[0], tmp_path / "diffusers.safetensors", "diffusers", model=pipe).output
    got, want = load_file(out), files[1]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(lorakit.LoraError, match="--to diffusers"):
        convert_file(files[0], tmp_path / "kohya.safetensors", "kohya", model=pipe)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_control_loras_restore_exactly(files, dtype):
    """Half precision, several control LoRAs (the later ones widen nothing more), fused and unfused: unload restores
    the true original norms (diffusers would restore the first LoRA's) and, with reset, the original layer, bit for
    bit."""
    pipe = FAM.build(dtype)
    lorakit.attach(pipe)
    t = pipe.transformer
    base, original = params(t), t.x_embedder
    pipe.load_lora_weights(files[0], adapter_name="a")
    pipe.load_lora_weights(dict(files[1]), adapter_name="b")
    assert t.x_embedder.weight.dtype == dtype and t.x_embedder.in_features == 2 * files[2]
    pipe.set_adapters(["a", "b"], [0.5, 0.7])
    pipe.fuse_lora(adapter_names=["a"])
    pipe.unfuse_lora()  # norms back (as diffusers), adapters still loaded
    assert all(torch.equal(t.get_parameter(p), base[p]) for p in NORMS.values())
    pipe.load_lora_weights(files[0], adapter_name="c")  # overwrites the norms again
    pipe.unload_lora_weights(reset_to_overwritten_params=True)
    assert t.x_embedder is original and t.config.in_channels == files[2]
    assert_params_equal(base, t)


def test_kept_load_plans_follow_widening_and_reset(files):
    """Load plans are kept per file layout; widening x_embedder (and resetting it) must not reuse a plan that was
    checked against the other width."""
    path, twin, width = files
    ref, ours = pair(FAM)
    g = torch.Generator().manual_seed(5)
    out = ours.transformer.x_embedder.out_features
    narrow = {"transformer.x_embedder.lora_A.weight": torch.randn(2, width, generator=g) * 0.2,
              "transformer.x_embedder.lora_B.weight": torch.randn(out, 2, generator=g) * 0.2}
    ours.load_lora_weights(dict(narrow), adapter_name="n")  # planned (and kept) for the narrow layer
    ours.unload_lora_weights()
    ours.load_lora_weights(path, adapter_name="c")
    ref.load_lora_weights(dict(twin), adapter_name="c")
    for pipe in (ours, ref):
        pipe.load_lora_weights(dict(narrow), adapter_name="n")  # now padded to the widened layer
        pipe.set_adapters(["c", "n"], [1.0, 0.8])
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="control + narrow after a kept plan")
    ours.unload_lora_weights(reset_to_overwritten_params=True)
    ours.load_lora_weights(dict(narrow), adapter_name="n")  # narrow again: no padding
    assert ours.transformer.x_embedder.in_features == width
