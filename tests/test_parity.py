"""Parity with diffusers + PEFT (the oracle) on the same files and the same seeded tiny pipelines.

Every workflow of the diffusers LoRA guide, on SD1.5-, SDXL- and Flux-shaped pipelines: denoiser and text-encoder
outputs must agree within 1e-5 (fp32).
"""

import pytest
import torch

from helpers import (assert_close, assert_differs, family, lora_state_dict, outputs, pair, run_pipeline, write)

FAMILIES = ["sd15", "sdxl", "flux"]


@pytest.fixture(params=[(f, m) for f in FAMILIES for m in ("merge", "branch")], ids="-".join)
def setup(request, tmp_path):
    fam_name, mode = request.param
    fam = family(fam_name)
    ref, ours = pair(fam, mode=mode)
    files = [write(lora_state_dict(ref, fam, seed), tmp_path / f"lora{seed}.safetensors") for seed in (1, 2)]
    return fam, ref, ours, files


def both(ref, ours, fn):
    fn(ref)
    fn(ours)


def test_load_with_adapter_name(setup):
    fam, ref, ours, (a, _) = setup
    base = outputs(ref, fam)
    both(ref, ours, lambda p: p.load_lora_weights(a, adapter_name="a"))
    got, want = outputs(ours, fam), outputs(ref, fam)
    assert_close(got, want)
    for key in ["denoiser", *fam.text_encoders]:
        assert_differs(want, base, key)
    assert ours.get_list_adapters() == ref.get_list_adapters()


def test_model_level_load_with_prefix(setup):
    fam, ref, ours, (a, _) = setup
    both(ref, ours, lambda p: getattr(p, fam.denoiser).load_lora_adapter(a, prefix=fam.denoiser, adapter_name="a"))
    assert_close(outputs(ours, fam), outputs(ref, fam))
    assert getattr(ours, fam.denoiser).active_adapters() == ["a"]


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_call_time_scale(setup, scale):
    fam, ref, ours, (a, _) = setup
    both(ref, ours, lambda p: p.load_lora_weights(a, adapter_name="a"))
    kw = {fam.call_kwarg: {"scale": scale}}
    assert_close(outputs(ours, fam, **kw), outputs(ref, fam, **kw))
    # Through the pipeline: the scale reaches the text encoders via encode_prompt.
    got, want = run_pipeline(ours, fam, **kw), run_pipeline(ref, fam, **kw)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    if scale == 0.0:
        base_pipe = fam.build()
        assert torch.equal(got, run_pipeline(base_pipe, fam))
    # After the call the adapter is back at full strength.
    assert_close(outputs(ours, fam), outputs(ref, fam))


def test_two_adapters_with_weights(setup):
    fam, ref, ours, (a, b) = setup
    both(ref, ours, lambda p: p.load_lora_weights(a, adapter_name="a"))
    both(ref, ours, lambda p: p.load_lora_weights(b, adapter_name="b"))
    assert_close(outputs(ours, fam), outputs(ref, fam), what="after second load")
    both(ref, ours, lambda p: p.set_adapters(["a", "b"], adapter_weights=[0.7, 0.8]))
    assert_close(outputs(ours, fam), outputs(ref, fam), what="a+b")
    assert ours.get_active_adapters() == ["a", "b"]
    both(ref, ours, lambda p: p.set_adapters("b"))
    assert_close(outputs(ours, fam), outputs(ref, fam), what="switch to b")


def test_per_component_weights(setup):
    fam, ref, ours, (a, _) = setup
    both(ref, ours, lambda p: p.load_lora_weights(a, adapter_name="a"))
    weights = {fam.denoiser: 0.3, **{te: 0.6 for te in fam.text_encoders}}
    both(ref, ours, lambda p: p.set_adapters("a", dict(weights)))
    assert_close(outputs(ours, fam), outputs(ref, fam))


def test_fuse_then_unload(setup):
    fam, ref, ours, (a, b) = setup
    both(ref, ours, lambda p: p.load_lora_weights(a, adapter_name="a"))
    both(ref, ours, lambda p: p.load_lora_weights(b, adapter_name="b"))
    both(ref, ours, lambda p: p.set_adapters(["a", "b"], [0.7, 0.8]))
    both(ref, ours, lambda p: p.fuse_lora(adapter_names=["a", "b"], lora_scale=1.0))
    assert_close(outputs(ours, fam), outputs(ref, fam), what="fused")
    both(ref, ours, lambda p: p.unload_lora_weights())
    assert_close(outputs(ours, fam), outputs(ref, fam), what="fused+unloaded")
    assert ours.get_list_adapters() == {}


def test_fuse_with_lora_scale_then_unfuse(setup):
    fam, ref, ours, (a, _) = setup
    both(ref, ours, lambda p: p.load_lora_weights(a, adapter_name="a"))
    both(ref, ours, lambda p: p.fuse_lora(lora_scale=0.5))
    assert_close(outputs(ours, fam), outputs(ref, fam), what="fused at 0.5")
    both(ref, ours, lambda p: p.unfuse_lora())
    both(ref, ours, lambda p: p.set_adapters("a", 1.0))  # PEFT keeps the fused 0.5 scaling: reset both sides
    assert_close(outputs(ours, fam), outputs(ref, fam), what="unfused")


def test_disable_enable(setup):
    fam, ref, ours, (a, _) = setup
    base = outputs(ours, fam)
    both(ref, ours, lambda p: p.load_lora_weights(a, adapter_name="a"))
    both(ref, ours, lambda p: p.disable_lora())
    got = outputs(ours, fam)
    assert_close(got, outputs(ref, fam), what="disabled")
    assert_close(got, base, atol=0.0, what="disabled vs base")
    both(ref, ours, lambda p: p.enable_lora())
    assert_close(outputs(ours, fam), outputs(ref, fam), what="enabled")


def test_delete_adapters(setup):
    fam, ref, ours, (a, b) = setup
    both(ref, ours, lambda p: p.load_lora_weights(a, adapter_name="a"))
    both(ref, ours, lambda p: p.load_lora_weights(b, adapter_name="b"))
    both(ref, ours, lambda p: p.set_adapters(["a", "b"], [0.5, 1.0]))
    both(ref, ours, lambda p: p.delete_adapters("a"))
    assert_close(outputs(ours, fam), outputs(ref, fam))
    assert ours.get_list_adapters() == ref.get_list_adapters()


def test_save_then_reload_in_both_libraries(setup, tmp_path):
    fam, ref, ours, (a, _) = setup
    ours.load_lora_weights(a, adapter_name="a")
    saved = ours.save_lora_adapter(tmp_path / "ours", adapter_name="a")
    import json
    from safetensors import safe_open
    with safe_open(str(saved), "pt") as fh:
        meta = fh.metadata()
    info = json.loads(meta["lorakit"])
    assert info["family"] == {"sd15": "sd1", "sdxl": "sdxl", "flux": "flux"}[fam.name]
    assert info["ranks"] == [4] and info["source_format"] == "peft"
    peft_meta = json.loads(meta["lora_adapter_metadata"])
    assert peft_meta[f"{fam.denoiser}.r"] == 4 and peft_meta[f"{fam.denoiser}.lora_alpha"] == 4.0
    want = outputs(ours, fam)
    ref.load_lora_weights(str(saved), adapter_name="x")  # diffusers+PEFT reads lorakit's file
    assert_close(outputs(ref, fam), want, what="diffusers loads lorakit's file")
    # ...and lorakit reads diffusers' own save of it.
    ref_state = {}
    from peft import get_peft_model_state_dict
    for comp in [fam.denoiser, *fam.text_encoders]:
        ref_state[f"{comp}_lora_layers"] = get_peft_model_state_dict(getattr(ref, comp), adapter_name="x")
    type(ref).save_lora_weights(tmp_path / "ref", **ref_state)
    fresh = fam.build()
    import lorakit
    lorakit.attach(fresh)
    fresh.load_lora_weights(str(tmp_path / "ref" / "pytorch_lora_weights.safetensors"), adapter_name="y")
    assert_close(outputs(fresh, fam), want, what="lorakit loads diffusers' file")
