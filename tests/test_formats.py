"""Every format of the core issue loads with exact deltas; where diffusers also loads it, outputs match it."""

import pytest
import torch

import lorakit
from helpers import DENOISER_TARGETS, assert_close, family, outputs, pair, write
from lorakit.formats import parse_keys
from lorakit.testing.loras import TRANSFORMER_TARGETS, expected_deltas, make_lora, to_state_dict


def _layers(pipe, fam, seed, convs=False, alpha=None, rank=4):
    den = getattr(pipe, fam.denoiser)
    out = {fam.denoiser: make_lora(den, rank=rank, seed=seed, targets=DENOISER_TARGETS, convs=convs, alpha=alpha)}
    for i, te in enumerate(fam.text_encoders):
        out[te] = make_lora(getattr(pipe, te), rank=rank, seed=seed + 10 + i, targets=TRANSFORMER_TARGETS, alpha=alpha)
    return out


def _file(pipe, fam, layers, fmt):
    sd = {}
    for comp, lay in layers.items():
        sd.update(to_state_dict(lay, fmt, comp, model=getattr(pipe, comp), sdxl_te=len(fam.text_encoders) > 1))
    return sd


def _check_deltas(pipe, layers, adapter="x"):
    """Fuse, unload, and compare each weight's change with the delta computed from the factors (fp64)."""
    # state_dict shows the base weights (the live adapter's internal merge is not user-visible)
    before = {c: {p: getattr(pipe, c).state_dict()[f"{p}.weight"].double().clone() for p in lay}
              for c, lay in layers.items()}
    pipe.fuse_lora(components=list(layers), adapter_names=[adapter])
    pipe.unload_lora_weights()
    for comp, lay in layers.items():
        want = expected_deltas(lay, getattr(pipe, comp))
        for path, delta in want.items():
            got = getattr(pipe, comp).get_submodule(path).weight.detach().double() - before[comp][path]
            err = ((got - delta).norm() / delta.norm()).item()
            assert err < 1e-3, f"{comp}.{path}: relative error {err:.2e}"


@pytest.mark.parametrize("fmt,fam_name,convs", [
    ("peft", "sd15", True), ("diffusers", "sd15", True), ("kohya", "sd15", True), ("kohya", "sdxl", True),
    ("kohya_ldm", "sdxl", True), ("kohya_ldm", "sd15", True), ("peft", "flux", False), ("kohya", "flux", False),
])
def test_format_loads_with_exact_deltas(fmt, fam_name, convs, tmp_path):
    fam = family(fam_name)
    pipe = fam.build()
    lorakit.attach(pipe)
    alpha = 2.0 if fmt.startswith("kohya") else None
    layers = _layers(pipe, fam, 1, convs=convs, alpha=alpha)
    if fam_name == "flux" and fmt == "kohya":  # kohya Flux uses BFL names (fused qkv): a later issue; here the
        layers = {fam.denoiser: layers[fam.denoiser]}  # diffusers-named lora_unet_ form, as OneTrainer-like files
    path = write(_file(pipe, fam, layers, fmt), tmp_path / f"{fmt}.safetensors")
    name = pipe.load_lora_weights(path, adapter_name="x")
    adapter = pipe._lorakit_manager.adapters[name]
    assert adapter.num_modules() == sum(len(v) for v in layers.values())
    assert adapter.format == fmt.replace("kohya_ldm", "kohya")
    _check_deltas(pipe, layers)


def test_legacy_formats(tmp_path):
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe)
    unet = make_lora(pipe.unet, seed=3, targets=("to_q", "to_k", "to_v", "to_out.0"))
    te = make_lora(pipe.text_encoder, seed=4, targets=("q_proj", "k_proj", "v_proj", "out_proj"))
    sd = to_state_dict(unet, "legacy_processor", "unet")
    for path, w in te.items():  # old text-encoder spelling: <path>.lora_linear_layer.up/down.weight
        key = f"text_encoder.text_model.{path}.lora_linear_layer"
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = w.down, w.up
    assert parse_keys(list(sd)).format == "diffusers_legacy"
    pipe.load_lora_weights(write(sd, tmp_path / "legacy.safetensors"), adapter_name="x")
    _check_deltas(pipe, {"unet": unet, "text_encoder": te})


def test_kohya_alpha_per_module_and_missing_alpha(tmp_path):
    """Each module's own alpha is used; a module without .alpha has scale 1 (diffusers gets both wrong)."""
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe)
    layers = make_lora(pipe.unet, seed=5, rank=4)
    for i, w in enumerate(layers.values()):
        w.alpha = [1.0, 2.0, 8.0, None][i % 4]
    pipe.load_lora_weights(write(to_state_dict(layers, "kohya", "unet"), tmp_path / "a.safetensors"), adapter_name="x")
    _check_deltas(pipe, {"unet": layers})


def test_tucker_locon(tmp_path):
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe)
    conv = "down_blocks.0.resnets.0.conv1"
    module = pipe.unet.get_submodule(conv)
    g = torch.Generator().manual_seed(0)
    r = 3
    down = torch.randn(r, module.in_channels, 1, 1, generator=g) * 0.1
    mid = torch.randn(r, r, 3, 3, generator=g) * 0.1
    up = torch.randn(module.out_channels, r, 1, 1, generator=g) * 0.1
    key = "lora_unet_" + conv.replace(".", "_")
    sd = {f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up,
          f"{key}.alpha": torch.tensor(1.5)}
    before = module.weight.detach().double().clone()  # taken before the load
    pipe.load_lora_weights(write(sd, tmp_path / "tucker.safetensors"), adapter_name="t")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    want = torch.einsum("mnkl,im,nj->ijkl", mid.double(), up.double().flatten(1), down.double().flatten(1)) * 0.5
    got = module.weight.detach().double() - before
    assert ((got - want).norm() / want.norm()) < 1e-4


@pytest.mark.parametrize("fam_name,fmt", [("sd15", "kohya"), ("sdxl", "kohya"), ("sdxl", "kohya_ldm"),
                                          ("sd15", "diffusers")])
def test_parity_with_diffusers_on_non_peft_formats(fam_name, fmt, tmp_path):
    """Where diffusers converts the file too, both libraries give the same outputs."""
    fam = family(fam_name)
    ref, ours = pair(fam)
    layers = _layers(ref, fam, 7, alpha=2.0 if fmt != "diffusers" else None, convs=fmt != "diffusers")
    if fmt == "diffusers":  # diffusers reads this spelling for UNets only (as in the real sample file)
        layers = {fam.denoiser: layers[fam.denoiser]}
    if fmt == "kohya":  # diffusers mangles diffusers-named add_embedding keys (add.embedding.linear) and drops them
        layers[fam.denoiser] = {p: w for p, w in layers[fam.denoiser].items() if not p.startswith("add_embedding")}
    path = write(_file(ref, fam, layers, fmt), tmp_path / "f.safetensors")
    ref.load_lora_weights(path, adapter_name="x")
    ours.load_lora_weights(path, adapter_name="x")
    assert_close(outputs(ours, fam), outputs(ref, fam))


def test_kohya_4d_factors_on_linear_projections(tmp_path):
    """kohya SD2 files store proj_in/proj_out factors as 1x1 convs; diffusers SD2 (and SDXL) use Linear there."""
    fam = family("sdxl")  # use_linear_projection=True, like SD2
    pipe = fam.build()
    lorakit.attach(pipe)
    layers = make_lora(pipe.unet, seed=9, targets=("proj_in", "proj_out"))
    assert layers and all(isinstance(pipe.unet.get_submodule(p), torch.nn.Linear) for p in layers)
    sd = to_state_dict(layers, "kohya", "unet")
    sd = {k: (v[..., None, None] if v.dim() == 2 else v) for k, v in sd.items()}
    pipe.load_lora_weights(write(sd, tmp_path / "sd2style.safetensors"), adapter_name="x")
    _check_deltas(pipe, {"unet": layers})


def test_embeddings_in_a_lora_file_are_reported(tmp_path):
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe)
    sd = to_state_dict(make_lora(pipe.unet, seed=1), "peft", "unet")
    sd["<s0>"] = torch.zeros(2, 32)
    sd["<s1>"] = torch.zeros(2, 32)
    with pytest.warns(UserWarning, match=r"2 textual-inversion embedding.*<s0>.*load_textual_inversion"):
        pipe.load_lora_weights(write(sd, tmp_path / "with_emb.safetensors"), adapter_name="x")
    assert pipe._lorakit_manager.adapters["x"].num_modules() == len(sd) // 2 - 1
