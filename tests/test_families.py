"""Model families x file formats: every seeded synthetic file loads, each diffusers weight changes by exactly the delta
computed from the file's tensors (by a mapping written out here, not lorakit's tables), unload restores the weights
bit for bit, and where diffusers also loads the file, outputs match diffusers+PEFT."""

import pytest
import torch
from helpers import assert_close, family, outputs, pair, params, write

import lorakit
from lorakit.testing.family_files import Source, source_file
from lorakit.testing.loras import expected_deltas, make_lora

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


def test_flux_kohya_text_encoders(tmp_path):
    """kohya FLUX.1 files name CLIP lora_te1_ and T5 lora_te3_ (diffusers' text_encoder_2)."""
    fam = family("flux")
    pipe = fam.build()
    lorakit.attach(pipe)
    sd, _ = source_file(pipe.transformer, FLUX_BFL[:2], "kohya", prefix="lora_unet_", underscore=True, seed=4)
    tes = {"text_encoder": ("lora_te1_", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
           "text_encoder_2": ("lora_te3_", ("q", "k", "v", "o", "wi_0", "wi_1", "wo"))}
    te_want = {}
    for comp, (prefix, targets) in tes.items():
        model = getattr(pipe, comp)
        layers = make_lora(model, seed=9, targets=tuple("." + t for t in targets), alpha=3.0)
        for path, w in layers.items():
            name = ("text_model." + path if comp == "text_encoder" else path).replace(".", "_")
            sd[f"{prefix}{name}.lora_down.weight"], sd[f"{prefix}{name}.lora_up.weight"] = w.down, w.up
            sd[f"{prefix}{name}.alpha"] = torch.tensor(3.0)
        te_want[comp] = expected_deltas(layers, model)
    pipe.load_lora_weights(write(sd, tmp_path / "te.safetensors"), adapter_name="x")
    for comp, want_te in te_want.items():
        before = {p: getattr(pipe, comp).get_submodule(p).weight.detach().double().clone() for p in want_te}
        pipe.fuse_lora(components=[comp], adapter_names=["x"])
        for p, d in want_te.items():
            got = getattr(pipe, comp).get_submodule(p).weight.detach().double() - before[p]
            assert ((got - d).norm() / d.norm()).item() < 1e-3, f"{comp}.{p}"
        pipe.unfuse_lora(components=[comp])


def _inputs(name, model):
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    def r(*shape):
        return torch.randn(*shape, generator=g)

    if name == "sd3":
        return {"hidden_states": r(1, 4, 8, 8), "encoder_hidden_states": r(1, 5, cfg.joint_attention_dim),
                "pooled_projections": r(1, cfg.pooled_projection_dim), "timestep": torch.tensor([3.0])}
    common = {"timestep": torch.tensor([3]), "encoder_hidden_states": r(1, 5, 32)}
    if name == "wan":
        return {"hidden_states": r(1, 4, 1, 4, 4), **common}
    if name == "ltx":
        return {"hidden_states": r(1, 4, 8), **common, "encoder_attention_mask": torch.ones(1, 5), "num_frames": 1,
                "height": 2, "width": 2}
    return {"hidden_states": r(1, 4, 1, 4, 4), **common, "encoder_attention_mask": torch.ones(1, 5),
            "pooled_projections": r(1, 16)}


def _bare(name):
    from lorakit.testing import models

    return {"sd3": lambda: models.tiny_sd3_models()["transformer"], "wan": models.tiny_wan_transformer,
            "ltx": models.tiny_ltx_video_transformer, "hunyuan": models.tiny_hunyuan_video_transformer}[name]()


def _pipeline_class(name):
    import diffusers

    return {"sd3": diffusers.StableDiffusion3Pipeline, "wan": diffusers.WanPipeline,
            "ltx": diffusers.LTXPipeline, "hunyuan": diffusers.HunyuanVideoPipeline}[name]


def _blocks(prefix, names, n=2):
    return [Source(f"{prefix}.{i}.{a}", (t.format(i),)) for i in range(n) for a, t in names]


J = "joint_blocks.{0}"
SD3_SAI = [
    Source("joint_blocks.0.x_block.attn.qkv", _qkv(f"{DB}.attn")),
    Source("joint_blocks.0.x_block.attn.proj", (f"{DB}.attn.to_out.0",)),
    Source("joint_blocks.0.x_block.attn2.qkv", _qkv(f"{DB}.attn2")),
    Source("joint_blocks.0.x_block.attn2.proj", (f"{DB}.attn2.to_out.0",)),
    Source("joint_blocks.0.x_block.mlp.fc1", (f"{DB}.ff.net.0.proj",)),
    Source("joint_blocks.0.x_block.mlp.fc2", (f"{DB}.ff.net.2",)),
    Source("joint_blocks.0.x_block.adaLN_modulation.1", (f"{DB}.norm1.linear",)),
    Source("joint_blocks.0.context_block.attn.qkv", _qkv(f"{DB}.attn", ADD)),
    Source("joint_blocks.0.context_block.attn.proj", (f"{DB}.attn.to_add_out",)),
    Source("joint_blocks.0.context_block.mlp.fc2", (f"{DB}.ff_context.net.2",)),
    Source("joint_blocks.0.context_block.adaLN_modulation.1", (f"{DB}.norm1_context.linear",)),
    # the last block's context stream only modulates: an AdaLayerNormContinuous, (scale, shift) in diffusers
    Source("joint_blocks.1.context_block.adaLN_modulation.1", ("transformer_blocks.1.norm1_context.linear",), True),
    Source("joint_blocks.1.context_block.attn.qkv", _qkv("transformer_blocks.1.attn", ADD)),
    Source("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Source("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    Source("context_embedder", ("context_embedder",)),
    Source("final_layer.linear", ("proj_out",)),
    Source("final_layer.adaLN_modulation.1", ("norm_out.linear",), True),
]
SD3_DIFFUSERS = [Source(p, (p,)) for p in (*_qkv(f"{DB}.attn"), *_qkv(f"{DB}.attn2"), f"{DB}.attn.to_add_out",
                                           f"{DB}.ff.net.0.proj", f"{DB}.norm1_context.linear", "proj_out")]
WAN_BLOCKS = _blocks("blocks", [("self_attn.q", "blocks.{0}.attn1.to_q"), ("self_attn.k", "blocks.{0}.attn1.to_k"),
                                ("self_attn.v", "blocks.{0}.attn1.to_v"), ("self_attn.o", "blocks.{0}.attn1.to_out.0"),
                                ("cross_attn.q", "blocks.{0}.attn2.to_q"), ("cross_attn.k", "blocks.{0}.attn2.to_k"),
                                ("cross_attn.v", "blocks.{0}.attn2.to_v"),
                                ("cross_attn.o", "blocks.{0}.attn2.to_out.0"),
                                ("ffn.0", "blocks.{0}.ffn.net.0.proj"), ("ffn.2", "blocks.{0}.ffn.net.2")])
WAN_ALL = WAN_BLOCKS + [Source("time_projection.1", ("condition_embedder.time_proj",)),
                        Source("head.head", ("proj_out",)),
                        Source("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
                        Source("time_embedding.2", ("condition_embedder.time_embedder.linear_2",))]
LTX_DIFFUSERS = [Source(p, (p,)) for p in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_k",
                                           "transformer_blocks.1.ff.net.0.proj", "proj_in", "time_embed.linear",
                                           "caption_projection.linear_1", "proj_out")]
TR = "context_embedder.token_refiner.refiner_blocks.0"
HUNYUAN_BLOCKS = [
    Source("double_blocks.0.img_attn_qkv", _qkv(f"{DB}.attn")),
    Source("double_blocks.0.img_attn_proj", (f"{DB}.attn.to_out.0",)),
    Source("double_blocks.0.img_mod.linear", (f"{DB}.norm1.linear",)),
    Source("double_blocks.0.img_mlp.fc1", (f"{DB}.ff.net.0.proj",)),
    Source("double_blocks.0.txt_attn_qkv", _qkv(f"{DB}.attn", ADD)),
    Source("double_blocks.0.txt_attn_proj", (f"{DB}.attn.to_add_out",)),
    Source("double_blocks.0.txt_mlp.fc2", (f"{DB}.ff_context.net.2",)),
    Source("single_blocks.0.linear2", (f"{SB}.proj_out",)),
    Source("single_blocks.0.modulation.linear", (f"{SB}.norm.linear",)),
    Source("txt_in.individual_token_refiner.blocks.0.mlp.fc1", (f"{TR}.ff.net.0.proj",)),
    Source("txt_in.input_embedder", ("context_embedder.proj_in",)),
    Source("time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Source("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Source("final_layer.linear", ("proj_out",)),
]
# lorakit only: diffusers splits linear1 at HunyuanVideo's fixed width (3072), splits the token refiner's qkv lora_A
# (down) in three along the rank as well as lora_B (fails, or is wrong, at any rank), and swaps the halves of the final
# adaLN's lora_A along the rank as well as those of lora_B (a wrong delta)
HUNYUAN_ALL = HUNYUAN_BLOCKS + [Source("single_blocks.0.linear1", (*_qkv(f"{SB}.attn"), f"{SB}.proj_mlp")),
                                Source("txt_in.individual_token_refiner.blocks.0.self_attn_qkv", _qkv(f"{TR}.attn")),
                                Source("final_layer.adaLN_modulation.1", ("norm_out.linear",), True)]

# name -> (model, spec, suffixes, prefix, underscore, diffusers loads it)
BARE_FORMATS = {
    "sd3_kohya": ("sd3", SD3_SAI, "kohya", "lora_unet_", True, False),
    "sd3_diffusers": ("sd3", SD3_DIFFUSERS, "peft", "transformer.", False, True),
    "wan_original_blocks": ("wan", WAN_BLOCKS, "kohya", "diffusion_model.", False, True),
    "wan_original_all": ("wan", WAN_ALL, "kohya", "diffusion_model.", False, False),
    "wan_original_peft": ("wan", WAN_ALL, "peft", "diffusion_model.", False, True),
    "wan_musubi": ("wan", WAN_BLOCKS, "kohya", "lora_unet_", True, True),
    "ltx_original": ("ltx", LTX_DIFFUSERS, "peft", "diffusion_model.", False, True),
    "ltx_diffusers": ("ltx", LTX_DIFFUSERS, "peft", "transformer.", False, True),
    "hunyuan_original": ("hunyuan", HUNYUAN_BLOCKS, "peft", "diffusion_model.", False, True),
    "hunyuan_original_all": ("hunyuan", HUNYUAN_ALL, "peft", "", False, False),
}


@pytest.mark.parametrize("fmt", sorted(BARE_FORMATS))
def test_transformer_families(fmt, tmp_path):
    name, spec, suffixes, prefix, under, diffusers_loads = BARE_FORMATS[fmt]
    model = _bare(name)
    manager = lorakit.attach(model)
    sd, want = source_file(model, spec, suffixes, prefix=prefix, underscore=under, seed=5)
    path = write(sd, tmp_path / f"{fmt}.safetensors")
    base = params(model)
    manager.load_lora_weights(path, adapter_name="x")
    assert manager.adapters["x"].num_modules() == len(want)
    if diffusers_loads:
        ref = _bare(name)
        state_dict = _pipeline_class(name).lora_state_dict(path)
        ref.load_lora_adapter(state_dict, prefix="transformer", adapter_name="x")
        with torch.no_grad():
            got = model(**_inputs(name, model), return_dict=False)[0]
            exp = ref(**_inputs(name, ref), return_dict=False)[0]
        assert (got - exp).abs().max().item() <= 1e-5, fmt
    manager.unload_lora_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    manager.load_lora_weights(path, adapter_name="x")
    before = {p: model.get_submodule(p).weight.detach().double().clone() for p in want}
    manager.fuse_lora(adapter_names=["x"])
    for p, d in want.items():
        got = model.get_submodule(p).weight.detach().double() - before[p]
        assert ((got - d).norm() / d.norm()).item() < 1e-3, f"{fmt} {p}"


def test_sd3_kohya_text_encoders(tmp_path):
    """SD3 kohya files: lora_te1_/lora_te2_ (CLIP) and lora_te3_ (T5) next to the joint blocks."""
    from lorakit.testing.models import tiny_sd3_models

    models = tiny_sd3_models()
    manager = lorakit.LoraManager(models)
    sd, want = source_file(models["transformer"], SD3_SAI[:3], "kohya", prefix="lora_unet_", underscore=True)
    wants = {"transformer": want}
    for i, comp in enumerate(("text_encoder", "text_encoder_2", "text_encoder_3"), 1):
        model = models[comp]
        targets = ("q", "k", "v", "o", "wi_0", "wo") if i == 3 else ("q_proj", "v_proj", "out_proj", "fc1")
        layers = make_lora(model, seed=i, targets=tuple("." + t for t in targets), alpha=1.0)
        for path, w in layers.items():
            clip_path = path if path.startswith("text_model.") else "text_model." + path
            name = f"lora_te{i}_" + (clip_path if i < 3 else path).replace(".", "_")
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = w.down, w.up
            sd[f"{name}.alpha"] = torch.tensor(1.0)
        wants[comp] = expected_deltas(layers, model)
    base = {c: params(m) for c, m in models.items()}
    manager.load_lora_weights(write(sd, tmp_path / "sd3.safetensors"), adapter_name="x")
    assert manager.get_list_adapters() == {c: ["x"] for c in models}
    before = {c: {p: models[c].get_submodule(p).weight.detach().double().clone() for p in w} for c, w in wants.items()}
    manager.fuse_lora(adapter_names=["x"])
    for comp, want_c in wants.items():
        for p, d in want_c.items():
            got = models[comp].get_submodule(p).weight.detach().double() - before[comp][p]
            assert ((got - d).norm() / d.norm()).item() < 1e-3, f"{comp}.{p}"
    manager.unfuse_lora()
    manager.unload_lora_weights()
    for comp, model in models.items():
        for k, v in model.state_dict().items():
            assert torch.equal(v, base[comp][k]), f"{comp}.{k}"


def test_wan_diff_b_loads_as_a_bias_delta(tmp_path):
    """Wan files carry ``diff_b`` beside ``lora_down``/``lora_up`` (and alone): the bias moves by weight x diff_b (no
    alpha / rank), the weight by its LoRA delta, outputs match diffusers+PEFT (which reads diff_b as a lora_B bias),
    and unload restores weights and biases bit for bit."""
    model = _bare("wan")
    manager = lorakit.attach(model)
    sd, want = source_file(model, WAN_BLOCKS[:2], "kohya", prefix="diffusion_model.")
    q = model.get_submodule("blocks.0.attn1.to_q")
    diff_b = torch.randn(q.bias.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    sd["diffusion_model.blocks.0.self_attn.q.diff_b"] = diff_b
    path = write(sd, tmp_path / "diffb.safetensors")
    base = params(model)
    manager.load_lora_weights(path, adapter_name="x")
    assert manager.adapters["x"].num_modules() == len(want)
    manager.set_adapters("x", 0.7)
    assert torch.allclose(q.bias, base["blocks.0.attn1.to_q.bias"] + 0.7 * diff_b, atol=1e-6)
    ref = _bare("wan")
    ref.load_lora_adapter(_pipeline_class("wan").lora_state_dict(path), prefix="transformer", adapter_name="x")
    ref.set_adapters("x", 0.7)
    with torch.no_grad():
        got = model(**_inputs("wan", model), return_dict=False)[0]
        exp = ref(**_inputs("wan", ref), return_dict=False)[0]
    assert (got - exp).abs().max().item() <= 1e-5
    manager.unload_lora_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k


def test_lokr_on_fused_flux_layers(tmp_path):
    """A non-low-rank algorithm on a fused layer: each diffusers projection takes its rows of the full delta; the
    kohya writer joins the parts back into the very same file."""
    fam = family("flux")
    pipe = fam.build()
    manager = lorakit.attach(pipe)
    g = torch.Generator().manual_seed(0)
    w1, w2a, w2b = torch.randn(4, 4, generator=g), torch.randn(24, 2, generator=g), torch.randn(2, 8, generator=g)
    key = "lora_unet_double_blocks_0_img_attn_qkv"  # fused qkv: 96 x 32 = kron([4, 4], [24, 8])
    sd = {f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b, f"{key}.alpha": torch.tensor(1.0)}
    path = write(sd, tmp_path / "lokr_qkv.safetensors")
    full = torch.kron(w1.double(), w2a.double() @ w2b.double()) * 0.5  # alpha 1 / rank 2
    want = dict(zip(_qkv(f"{DB}.attn"), full.split(32)))
    base = params(pipe.transformer)
    pipe.load_lora_weights(path, adapter_name="x")
    out = pipe.save_lora_adapter(tmp_path / "again.safetensors", adapter_name="x", format="kohya")
    from safetensors.torch import load_file

    again = load_file(out)
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    with pytest.raises(lorakit.LoraError, match="kohya"):
        pipe.save_lora_adapter(tmp_path / "peft.safetensors", adapter_name="x")
    pipe.fuse_lora(components=["transformer"], adapter_names=["x"])
    for p, d in want.items():
        got = pipe.transformer.get_submodule(p).weight.detach().double() - base[f"{p}.weight"].double()
        assert ((got - d).norm() / d.norm()).item() < 1e-6, p
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert all(torch.equal(v, base[k]) for k, v in pipe.transformer.state_dict().items())
    assert manager.adapters == {}


def test_flux_comfyui_lorasave_keys(tmp_path):
    """ComfyUI's own spelling: diffusion_model.<BFL name> and text_encoders.clip_l/t5xxl.transformer.<path>."""
    fam = family("flux")
    ref, ours = pair(fam)
    sd, _ = source_file(ours.transformer, FLUX_BFL_BLOCKS, "kohya", prefix="diffusion_model.", seed=13)
    # MLP layers only: diffusers renames kohya-style Flux CLIP attention keys to old processor names and drops them
    clip = make_lora(ours.text_encoder, seed=2, targets=(".fc1", ".fc2"), alpha=2.0)
    for path, w in clip.items():
        key = "text_encoders.clip_l.transformer." + (path if path.startswith("text_model.") else "text_model." + path)
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = w.down, w.up
        sd[f"{key}.alpha"] = torch.tensor(2.0)
    path = write(sd, tmp_path / "comfy.safetensors")
    ours.load_lora_weights(path, adapter_name="x")
    assert ours.get_list_adapters() == {"transformer": ["x"], "text_encoder": ["x"]}
    ref.load_lora_weights(path, adapter_name="x")  # diffusers reads this spelling through its kohya converter
    assert_close(outputs(ours, fam), outputs(ref, fam))
