"""Model families x file formats: every seeded synthetic file loads, each diffusers weight changes by exactly the delta
computed from the file's tensors (by a mapping written out here, not lorakit's tables), unload restores the weights
bit for bit, and where diffusers also loads the file, outputs match diffusers+PEFT."""

import pytest
import torch
from helpers import assert_close, family, outputs, pair, params, write

from lorakit.testing.family_files import Source, source_file

DB, SB = "transformer_blocks.0", "single_transformer_blocks.0"


def _qkv(prefix, names=("to_q", "to_k", "to_v")):
    return tuple(f"{prefix}.{n}" for n in names)


ADD = ("add_q_proj", "add_k_proj", "add_v_proj")
# FLUX.1 in BFL names (kohya sd-scripts / ComfyUI / BFL): fused qkv and linear1 split onto diffusers' projections.
FLUX_BFL = [
    Source("double_blocks.0.img_attn.qkv", _qkv(f"{DB}.attn")),
    Source("double_blocks.0.img_attn.proj", (f"{DB}.attn.to_out.0",)),
    Source("double_blocks.0.img_mlp.0", (f"{DB}.ff.net.0.proj",)),
    Source("double_blocks.0.img_mlp.2", (f"{DB}.ff.net.2",)),
    Source("double_blocks.0.img_mod.lin", (f"{DB}.norm1.linear",)),
    Source("double_blocks.0.txt_attn.qkv", _qkv(f"{DB}.attn", ADD)),
    Source("double_blocks.0.txt_attn.proj", (f"{DB}.attn.to_add_out",)),
    Source("double_blocks.0.txt_mlp.0", (f"{DB}.ff_context.net.0.proj",)),
    Source("double_blocks.0.txt_mlp.2", (f"{DB}.ff_context.net.2",)),
    Source("double_blocks.0.txt_mod.lin", (f"{DB}.norm1_context.linear",)),
    Source("single_blocks.0.linear1", (*_qkv(f"{SB}.attn"), f"{SB}.proj_mlp")),
    Source("single_blocks.0.linear2", (f"{SB}.proj_out",)),
    Source("single_blocks.0.modulation.lin", (f"{SB}.norm.linear",)),
    Source("img_in", ("x_embedder",)),
    Source("txt_in", ("context_embedder",)),
    Source("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Source("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Source("final_layer.linear", ("proj_out",)),
    Source("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
]
FLUX_BFL_BLOCKS = [s for s in FLUX_BFL if "blocks" in s.name and "linear1" not in s.name]
FLUX_XLABS = [
    Source("double_blocks.0.processor.qkv_lora1", _qkv(f"{DB}.attn")),
    Source("double_blocks.0.processor.proj_lora1", (f"{DB}.attn.to_out.0",)),
    Source("double_blocks.0.processor.qkv_lora2", _qkv(f"{DB}.attn", ADD)),
    Source("double_blocks.0.processor.proj_lora2", (f"{DB}.attn.to_add_out",)),
]
FLUX_DIFFUSERS = [Source(p, (p,)) for p in (*_qkv(f"{DB}.attn"), f"{DB}.attn.to_out.0", *_qkv(f"{DB}.attn", ADD),
                                            f"{DB}.attn.to_add_out", f"{DB}.ff.net.0.proj", f"{DB}.norm1.linear",
                                            *_qkv(f"{SB}.attn"), f"{SB}.proj_mlp", f"{SB}.proj_out", "proj_out")]
FLUX_ATTN = FLUX_DIFFUSERS[:8]

# name -> (spec, suffixes, key prefix, underscored names, diffusers loads it too)
FLUX_FORMATS = {
    "kohya": (FLUX_BFL, "kohya", "lora_unet_", True, False),
    # diffusers splits linear1 at FLUX.1-dev's fixed sizes (3072...) and drops img_in/txt_in/time_in/vector_in/
    # final_layer keys of kohya files (converted without the transformer. prefix): compare on the blocks only.
    "kohya_blocks": (FLUX_BFL_BLOCKS, "kohya", "lora_unet_", True, True),
    "bfl_comfy": (FLUX_BFL, "peft", "diffusion_model.", False, False),
    "bfl_bare": (FLUX_BFL, "peft", "", False, False),
    "xlabs": (FLUX_XLABS, "xlabs", "", False, True),
    "ai_toolkit": (FLUX_DIFFUSERS, "peft", "transformer.", False, True),
    "onetrainer": (FLUX_DIFFUSERS, "kohya", "lora_transformer_", True, False),
    "onetrainer_attn": (FLUX_ATTN, "kohya", "lora_transformer_", True, True),
    "simpletuner_lycoris": (FLUX_DIFFUSERS, "kohya", "lycoris_", True, False),
}


def _fused_deltas(pipe, comp, want, name="x"):
    model = getattr(pipe, comp)
    before = {p: model.state_dict()[f"{p}.weight"].double().clone() for p in want}
    pipe.fuse_lora(components=[comp], adapter_names=[name])
    pipe.unload_lora_weights()
    for path, delta in want.items():
        got = model.get_submodule(path).weight.detach().double() - before[path]
        err = ((got - delta).norm() / delta.norm()).item()
        assert err < 1e-3, f"{comp}.{path}: relative error {err:.2e}"


@pytest.mark.parametrize("fmt", sorted(FLUX_FORMATS))
def test_flux_formats(fmt, tmp_path):
    spec, suffixes, prefix, under, diffusers_loads = FLUX_FORMATS[fmt]
    fam = family("flux")
    ref, ours = pair(fam)
    sd, want = source_file(ours.transformer, spec, suffixes, prefix=prefix, underscore=under, seed=3)
    path = write(sd, tmp_path / f"{fmt}.safetensors")
    base = params(ours.transformer)
    ours.load_lora_weights(path, adapter_name="x")
    assert ours._lorakit_manager.adapters["x"].num_modules() == len(want)
    if diffusers_loads:
        ref.load_lora_weights(path, adapter_name="x")
        assert_close(outputs(ours, fam), outputs(ref, fam), what=fmt)
    ours.unload_lora_weights()  # unload restores every weight bit for bit
    for k, v in ours.transformer.state_dict().items():
        assert torch.equal(v, base[k]), k
    ours.load_lora_weights(path, adapter_name="x")
    _fused_deltas(ours, "transformer", want)
