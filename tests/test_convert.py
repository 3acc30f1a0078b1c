"""Writers and `lorakit convert`: kohya <-> diffusers/PEFT, alpha kept (never baked), deltas identical after a
conversion, tensors bytes-identical after a double round trip, and diffusers+PEFT loads what lorakit writes."""

import pytest
import torch
from helpers import assert_close, family, lora_state_dict, outputs, pair, write
from safetensors import safe_open
from safetensors.torch import load_file
from test_families import FLUX_BFL, FLUX_BFL_BLOCKS, FLUX_DIFFUSERS

import lorakit
from lorakit.cli import main
from lorakit.convert import convert_file
from lorakit.testing.family_files import source_file
from lorakit.testing.loras import make_lora, to_state_dict


def _deltas(pipe, path):
    """Every module's full delta (at scale 1) as lorakit builds it from the file."""
    name = pipe.load_lora_weights(path, adapter_name=f"a{len(pipe._lorakit_manager.adapters)}")
    adapter = pipe._lorakit_manager.adapters[name]
    out = {}
    for comp, layers in adapter.layers.items():
        model = getattr(pipe, comp)
        for p, d in layers.items():
            out[f"{comp}.{p}"] = d.delta(tuple(model.get_submodule(p).weight.shape), torch.float64)
    pipe.delete_adapters(name)
    return out


def _same_deltas(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-12, atol=1e-15), k


def _same_tensors(p, q):
    a, b = load_file(p), load_file(q)
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_sd15_kohya_round_trip_and_diffusers_reads_the_result(tmp_path):
    fam = family("sd15")
    ref, ours = pair(fam)
    k0 = write(lora_state_dict(ours, fam, 4, fmt="kohya", alpha=2.0, convs=True), tmp_path / "k0.safetensors")
    d1 = convert_file(k0, tmp_path / "d1.safetensors", to="diffusers", model=ours).output
    k2 = convert_file(d1, tmp_path / "k2.safetensors", to="kohya", model=ours).output
    d3 = convert_file(k2, tmp_path / "d3.safetensors", to="diffusers", model=ours).output
    _same_tensors(k0, k2)  # diffusers-named kohya, alpha kept: the writer gives back the very file
    _same_tensors(d1, d3)
    with safe_open(d1, "pt") as f:
        assert "lora_alpha" in f.metadata()["lora_adapter_metadata"]
    _same_deltas(_deltas(ours, k0), _deltas(ours, d1))
    ref.load_lora_weights(d1, adapter_name="x")  # diffusers+PEFT reads the converted file
    ours.load_lora_weights(k0, adapter_name="x")
    assert_close(outputs(ours, fam), outputs(ref, fam))


def test_sdxl_kohya_te_prefixes(tmp_path):
    fam = family("sdxl")
    ref, ours = pair(fam)
    d0 = write(lora_state_dict(ours, fam, 5), tmp_path / "d0.safetensors")
    k1 = convert_file(d0, tmp_path / "k1.safetensors", to="kohya", model=ours).output
    keys = list(load_file(k1))
    assert any(k.startswith("lora_te1_text_model_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    _same_deltas(_deltas(ours, d0), _deltas(ours, k1))
    ref.load_lora_weights(k1, adapter_name="x")  # diffusers' kohya converter reads it
    ours.load_lora_weights(d0, adapter_name="x")
    assert_close(outputs(ours, fam), outputs(ref, fam))


def test_flux_bfl_kohya_round_trip_gives_back_the_file(tmp_path):
    """BFL-named kohya -> diffusers (qkv split) -> kohya fuses back to the very same tensors."""
    fam = family("flux")
    pipe = fam.build()
    lorakit.attach(pipe)
    sd, _ = source_file(pipe.transformer, FLUX_BFL, "kohya", prefix="lora_unet_", underscore=True, seed=2)
    for comp, prefix, targets in (("text_encoder", "lora_te1_", (".q_proj", ".fc2")), ("text_encoder_2", "lora_te3_",
                                                                                     (".q", ".wi_1"))):
        model = getattr(pipe, comp)
        for path, w in make_lora(model, seed=3, targets=targets, alpha=1.5).items():
            name = prefix + (path if comp == "text_encoder_2" or path.startswith("text_model.")
                             else "text_model." + path).replace(".", "_")
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = w.down, w.up
            sd[f"{name}.alpha"] = torch.tensor(1.5)
    k0 = write(sd, tmp_path / "k0.safetensors")
    d1 = convert_file(k0, tmp_path / "d1.safetensors", to="diffusers", model=pipe).output
    keys = load_file(d1)
    assert "transformer.transformer_blocks.0.attn.to_k.lora_B.weight" in keys
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in keys
    k2 = convert_file(d1, tmp_path / "k2.safetensors", to="kohya", model=pipe).output
    _same_tensors(k0, k2)
    _same_deltas(_deltas(pipe, k0), _deltas(pipe, d1))


def test_flux_peft_to_kohya_is_exact_and_diffusers_reads_it(tmp_path):
    """Separately trained to_q/to_k/to_v (ai-toolkit) become one block-diagonal BFL qkv LoRA with the same deltas."""
    fam = family("flux")
    ref, ours = pair(fam)
    # blocks only: diffusers drops kohya final_layer keys and splits linear1 at FLUX.1-dev's sizes
    spec = [s for s in FLUX_DIFFUSERS if "transformer_blocks.0." in s.name and "single" not in s.name]
    sd, _ = source_file(ours.transformer, spec, "peft", prefix="transformer.", seed=6)
    d0 = write(sd, tmp_path / "d0.safetensors")
    k1 = convert_file(d0, tmp_path / "k1.safetensors", to="kohya", model=ours).output
    keys = load_file(k1)
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12  # 3 x rank 4
    _same_deltas(_deltas(ours, d0), _deltas(ours, k1))
    ref.load_lora_weights(k1, adapter_name="x")
    ours.load_lora_weights(d0, adapter_name="x")
    assert_close(outputs(ours, fam), outputs(ref, fam))


def test_flux_blocks_kohya_to_diffusers_matches_diffusers(tmp_path):
    fam = family("flux")
    ref, ours = pair(fam)
    sd, _ = source_file(ours.transformer, FLUX_BFL_BLOCKS, "kohya", prefix="lora_unet_", underscore=True, seed=8)
    k0 = write(sd, tmp_path / "k0.safetensors")
    d1 = convert_file(k0, tmp_path / "d1.safetensors", to="diffusers", model=ours).output
    ref.load_lora_weights(k0, adapter_name="x")  # diffusers' own kohya conversion (alpha baked)
    ours.load_lora_weights(d1, adapter_name="x")  # lorakit's conversion, alpha in the metadata
    assert_close(outputs(ours, fam), outputs(ref, fam))


def test_lokr_writes_kohya_not_diffusers(tmp_path):
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe)
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = {f"{key}.lokr_w1": torch.randn(4, 4, generator=g), f"{key}.lokr_w2_a": torch.randn(8, 2, generator=g),
          f"{key}.lokr_w2_b": torch.randn(2, 8, generator=g), f"{key}.alpha": torch.tensor(1.0)}
    k0 = write(sd, tmp_path / "lokr.safetensors")
    with pytest.raises(lorakit.LoraError, match="kohya"):
        convert_file(k0, tmp_path / "x.safetensors", to="diffusers", model=pipe)
    assert not (tmp_path / "x.safetensors").exists()
    k1 = convert_file(k0, tmp_path / "k1.safetensors", to="kohya", model=pipe).output
    _same_tensors(k0, k1)


def test_cli_convert(tmp_path, capsys):
    """Without --model the family's reference architecture is built on the meta device (SD1.5 here)."""
    from lorakit.testing.models import sd15_unet

    unet = sd15_unet(device="meta")
    layers = make_lora(unet, rank=2, seed=1, targets=("attn2.to_k", "attn2.to_v"), alpha=1.0)
    src = write(to_state_dict(layers, "kohya", "unet"), tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    assert main(["convert", src, str(out), "--to", "diffusers"]) == 0
    assert "unet" in capsys.readouterr().out
    assert len(load_file(out)) == 2 * len(layers)
    assert main(["convert", src, str(tmp_path / "k.safetensors"), "--to", "kohya", "--model", "sd1"]) == 0
    _same_tensors(src, str(tmp_path / "k.safetensors"))
    assert main(["convert", str(tmp_path / "missing.safetensors"), str(out), "--to", "kohya"]) == 2
    assert main(["convert", src, str(out), "--to", "comfy"]) == 2


@pytest.mark.parametrize("fmt", ["sd3_kohya", "wan_musubi", "hunyuan_kohya"])
def test_original_name_families_round_trip(fmt, tmp_path):
    """kohya files in original names (SD3 joint_blocks, Wan/Hunyuan musubi) -> diffusers -> kohya: the same file."""
    from test_families import BARE_FORMATS, HUNYUAN_ALL, _bare

    name, spec, *_ = BARE_FORMATS.get(fmt, ("hunyuan", HUNYUAN_ALL))
    model = _bare(name)
    sd, want = source_file(model, spec, "kohya", prefix="lora_unet_", underscore=True, seed=11)
    k0 = write(sd, tmp_path / "k0.safetensors")
    d1 = convert_file(k0, tmp_path / "d1.safetensors", to="diffusers", model=model).output
    assert len(load_file(d1)) == 2 * len(want)
    k2 = convert_file(d1, tmp_path / "k2.safetensors", to="kohya", model=model).output
    _same_tensors(k0, k2)


def test_save_loaded_adapter_as_kohya(tmp_path):
    """pipe.save_lora_adapter(..., format="kohya") writes back the BFL-named kohya file it loaded, alpha kept."""
    fam = family("flux")
    pipe = fam.build()
    lorakit.attach(pipe)
    sd, _ = source_file(pipe.transformer, FLUX_BFL, "kohya", prefix="lora_unet_", underscore=True, seed=12)
    k0 = write(sd, tmp_path / "k0.safetensors")
    pipe.load_lora_weights(k0, adapter_name="x")
    out = pipe.save_lora_adapter(tmp_path / "saved.safetensors", adapter_name="x", format="kohya")
    _same_tensors(k0, str(out))
    with pytest.raises(lorakit.LoraError, match="format"):
        pipe.save_lora_adapter(tmp_path / "bad.safetensors", adapter_name="x", format="comfy")


def test_partial_fused_layer_to_kohya(tmp_path):
    """Only to_k of a qkv carries a LoRA: the kohya writer fills the other rows with zeros (the same deltas)."""
    fam = family("flux")
    pipe = fam.build()
    lorakit.attach(pipe)
    spec = [s for s in FLUX_DIFFUSERS if s.name.endswith(("attn.to_k", "proj_mlp"))]
    sd, _ = source_file(pipe.transformer, spec, "peft", prefix="transformer.", seed=14)
    d0 = write(sd, tmp_path / "d0.safetensors")
    k1 = convert_file(d0, tmp_path / "k1.safetensors", to="kohya", model=pipe).output
    names = {k.split(".")[0] for k in load_file(k1)}
    assert names == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"}
    want, got = _deltas(pipe, d0), _deltas(pipe, k1)
    for k, v in want.items():
        assert torch.allclose(v, got[k], rtol=1e-12, atol=1e-15), k
    assert all(got[k].abs().max() == 0 for k in set(got) - set(want))


def test_convert_without_a_reference_model_asks_for_one(tmp_path):
    from test_families import HUNYUAN_BLOCKS, _bare

    sd, _ = source_file(_bare("hunyuan"), HUNYUAN_BLOCKS, "kohya", prefix="lora_unet_", underscore=True)
    src = write(sd, tmp_path / "hy.safetensors")
    with pytest.raises(lorakit.LoraError, match=r"hunyuan-video.*--model"):
        convert_file(src, tmp_path / "out.safetensors", to="diffusers")
    assert not (tmp_path / "out.safetensors").exists()
