"""The real LoRA files in ../shared/samples load into an SD1.5-shaped pipeline, every key used, with exact deltas.

The expected deltas are computed here from the file's tensors alone (fp64), independently of lorakit's readers.
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lorakit
from lorakit.testing.models import sd15_pipeline

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples"
FILES = ["sd15_diffusers_processor_legacy.safetensors", "sd15_diffusers_unet_lora.safetensors",
         "sd15_kohya_lycoris_lokr_r4.safetensors"]
pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared/samples not present")


@pytest.fixture(scope="module")
def pipe():
    p = sd15_pipeline()
    lorakit.attach(p)
    return p


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _module_names(pipe) -> dict[str, tuple[str, str]]:
    """Every spelling the three files use for a module -> (component, module path)."""
    out = {}
    for comp in ("unet", "text_encoder"):
        for name, _ in getattr(pipe, comp).named_modules():
            full = name if comp == "unet" or name.startswith("text_model.") else "text_model." + name
            prefix = "lora_unet_" if comp == "unet" else "lora_te_"
            out[prefix + full.replace(".", "_")] = (comp, name)
            out[("unet." if comp == "unet" else "") + name] = (comp, name)
            if comp == "unet":
                out[name] = (comp, name)
    return out


def expected_deltas(pipe, tensors: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    names = _module_names(pipe)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if ".processor." in key:  # old attention processors: <attn>.processor.to_q_lora.down.weight
            attn, rest = key.split(".processor.")
            proj, field = rest.split("_lora.")
            module = f"{attn}.{'to_out.0' if proj == 'to_out' else proj}"
        elif ".lora." in key:
            module, field = key.split(".lora.")
        else:
            module, field = key.split(".", 1)
        groups.setdefault(module, {})[field.removesuffix(".weight")] = t.double()
    out = {}
    for module, f in groups.items():
        comp, path = names[module]
        weight = getattr(pipe, comp).get_submodule(path).weight
        if "down" in f:
            delta = (f["up"].flatten(1) @ f["down"].flatten(1))
            scale = f["alpha"].item() / f["down"].shape[0] if "alpha" in f else 1.0
        else:  # LoKr, factored w1 and w2
            w1 = f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
            delta = torch.kron(w1, w2)
            scale = f["alpha"].item() / f["lokr_w2_b"].shape[0]
        out[(comp, path)] = (delta * scale).reshape(weight.shape)
    return out


@pytest.mark.parametrize("name", FILES)
def test_real_file_loads_with_exact_deltas(pipe, name):
    path = SAMPLES / name
    tensors = _read(path)
    want = expected_deltas(pipe, tensors)
    before = {k: getattr(pipe, c).get_submodule(p).weight.detach().clone() for k in want for c, p in [k]}
    full_before = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}

    adapter = pipe.load_lora_weights(str(path), adapter_name="real")  # strict: every key must be used
    manager = pipe._lorakit_manager
    assert manager.adapters[adapter].num_modules() == len(want)
    pipe.fuse_lora(adapter_names=["real"], lora_scale=1.0)
    pipe.unload_lora_weights()  # fused weights stay: now compare them with the file's deltas
    worst = 0.0
    for (comp, p), delta in want.items():
        got = getattr(pipe, comp).get_submodule(p).weight.detach().double() - before[(comp, p)].double()
        rel = (got - delta).norm() / delta.norm().clamp_min(1e-12)
        worst = max(worst, rel.item())
    assert worst < 1e-3, f"worst relative error of a fused delta: {worst:.2e}"
    # Put the base back for the next file.
    for comp, sd in full_before.items():
        getattr(pipe, comp).load_state_dict(sd)


@pytest.mark.parametrize("name", FILES)
def test_real_file_unfuse_and_unload_are_bit_exact(pipe, name):
    before = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}
    pipe.load_lora_weights(str(SAMPLES / name), adapter_name="real")
    pipe.fuse_lora()
    pipe.unfuse_lora()
    for comp, sd in before.items():
        for k, v in getattr(pipe, comp).state_dict().items():
            assert torch.equal(v, sd[k]), f"{comp}.{k} not restored by unfuse"
    pipe.unload_lora_weights()
    for comp, sd in before.items():
        for k, v in getattr(pipe, comp).state_dict().items():
            assert torch.equal(v, sd[k]), f"{comp}.{k} not restored by unload"
