"""add_weighted_adapter on a pipeline and a model: every component, registered like a loaded adapter, sources and
base untouched, saved files load the same in lorakit and in diffusers+PEFT."""

import pytest
import torch
from helpers import assert_close, family, lora_state_dict, outputs, pair, params, write

import lorakit
from lorakit import AdapterError, LoraError

FAM = family("sd15")


@pytest.fixture
def env(tmp_path):
    ref, ours = pair(FAM)
    files = {name: write(lora_state_dict(ref, FAM, seed, rank=rank, convs=True, alpha=alpha),
                         tmp_path / f"{name}.safetensors")
             for name, seed, rank, alpha in (("a", 1, 4, 8.0), ("b", 2, 4, None), ("c", 3, 2, 1.0))}
    for name in ("a", "b", "c"):
        ours.load_lora_weights(files[name], adapter_name=name)
    return ref, ours, tmp_path


def test_cat_is_the_weighted_sum_in_every_component(env):
    _, ours, _ = env
    unet_before = params(ours.unet)
    ours.set_adapters(["a", "c"], [0.7, -0.8])
    want = outputs(ours, FAM)
    ours.set_adapters("b")
    ours.add_weighted_adapter(["a", "c"], [0.7, -0.8], "mix", "cat")
    assert ours.get_active_adapters() == ["b"]  # as PEFT: the new adapter is not activated
    assert all("mix" in names for names in ours.get_list_adapters().values())
    assert set(ours.get_list_adapters()) == {"unet", "text_encoder"}
    ours.set_adapters("mix")
    assert_close(outputs(ours, FAM), want, atol=1e-5)
    ours.set_adapters(["a", "c"], [0.7, -0.8])  # the sources are unchanged
    assert_close(outputs(ours, FAM), want, atol=0.0)
    ours.unload_lora_weights()
    for k, v in unet_before.items():
        assert torch.equal(ours.unet.state_dict()[k], v)


@pytest.mark.parametrize("method,kwargs", [("ties_svd", {"density": 0.5}), ("dare_linear", {"density": 0.7, "seed": 1}),
                                           ("svd", {"svd_rank": 3, "svd_clamp": 0.99})])
def test_saved_merge_loads_the_same_in_lorakit_and_diffusers(env, method, kwargs):
    ref, ours, tmp = env
    adapters = ["a", "b"] if method == "dare_linear" else ["a", "c"]
    ours.add_weighted_adapter(adapters, [0.9, 0.6], "mix", method, **kwargs)
    ours.set_adapters("mix")
    got = outputs(ours, FAM)
    path = ours.save_lora_weights(tmp / "out", adapter_name="mix")
    ref.load_lora_weights(str(path), adapter_name="mix")
    assert_close(outputs(ref, FAM), got, atol=1e-5, what="diffusers+PEFT")
    fresh = FAM.build()
    lorakit.attach(fresh)
    fresh.load_lora_weights(str(path), adapter_name="mix")
    assert_close(outputs(fresh, FAM), got, atol=0.0, what="lorakit reload")


def test_model_level_merge_and_errors_change_nothing(env):
    _, ours, _ = env
    ours.unet.add_weighted_adapter(["a", "b"], [1.0, 1.0], "unet_mix", "linear")
    assert ours.get_list_adapters()["unet"][-1] == "unet_mix"
    assert "unet_mix" not in ours.get_list_adapters()["text_encoder"]
    listed = ours.get_list_adapters()
    with pytest.raises(LoraError, match="ties_svd"):
        ours.add_weighted_adapter(["a", "c"], [1.0, 1.0], "bad", "ties", density=0.5)
    with pytest.raises(AdapterError, match="already in use"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "a", "cat")
    with pytest.raises(AdapterError, match="not loaded"):
        ours.add_weighted_adapter(["a", "zzz"], [1.0, 1.0], "new", "cat")
    assert ours.get_list_adapters() == listed
