"""torch.compile: a compiled denoiser never recompiles on adapter changes, and every change shows in its output."""

import pytest
import torch

import lorakit
from helpers import denoiser_inputs, family, lora_state_dict


@pytest.fixture
def unet():
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe, mode="merge")
    pipe.enable_lora_hotswap(target_rank=8)
    for seed, name in ((1, "a"), (2, "b")):
        pipe.load_lora_weights(lora_state_dict(pipe, fam, seed, text_encoders=False), adapter_name=name)
    return pipe, fam


def test_compiled_unet_follows_every_state_change_without_recompiling(unet):
    pipe, fam = unet
    model = pipe.unet
    inputs = denoiser_inputs(model)
    compiled = lorakit.compile(model, fullgraph=True, backend="aot_eager")

    @torch.no_grad()
    def check(tag, **kw):
        kw = kw or {"cross_attention_kwargs": None}  # as a pipeline calls it
        got = compiled(**inputs, **kw).sample
        want = model(**inputs, **kw).sample  # eager, same state
        assert torch.allclose(got, want, atol=1e-5, rtol=0), f"{tag}: compiled output differs from eager"
        return got

    steps = [
        ("initial", lambda: None, {}),
        ("set_adapters both", lambda: pipe.set_adapters(["a", "b"], [0.7, 0.3]), {}),
        ("block weights", lambda: pipe.set_adapters("a", {"unet": {"down": 0.2, "up": {"block_1": [1, 0, 1]}}}), {}),
        ("call-time scale 0.5", lambda: None, {"cross_attention_kwargs": {"scale": 0.5}}),
        ("call-time scale 0.0", lambda: None, {"cross_attention_kwargs": {"scale": 0.0}}),
        ("disable", pipe.disable_lora, {}),
        ("enable", pipe.enable_lora, {}),
        ("hotswap", lambda: pipe.load_lora_weights(lora_state_dict(pipe, fam, 5, rank=8, text_encoders=False),
                                                   adapter_name="a", hotswap=True), {}),
        ("same-layout hotswap (values copied in place)",
         lambda: pipe.load_lora_weights(lora_state_dict(pipe, fam, 6, rank=8, text_encoders=False),
                                        adapter_name="a", hotswap=True), {}),
        ("fuse", lambda: pipe.fuse_lora(adapter_names=["a"]), {}),
        ("unfuse", pipe.unfuse_lora, {}),
        ("delete", lambda: pipe.delete_adapters("b"), {}),
        ("unload", pipe.unload_lora_weights, {}),
    ]
    check("warm-up")  # the one compile
    seen = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tag, change, kw in steps:
            change()
            seen.append(check(tag, **kw))
    # The changes really changed the output.
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])
    assert not torch.allclose(seen[5], seen[6]) and not torch.allclose(seen[6], seen[7])
    assert not torch.allclose(seen[7], seen[8])


@pytest.mark.parametrize("wide_devices", [("cuda",), ("cuda", "cpu")], ids=["plain", "wide"])
def test_compiled_branches_follow_value_changes_without_recompiling(wide_devices, monkeypatch):
    """Runtime-branch mode: a change of weights, a call-time scale and a same-layout hotswap rewrite the branches'
    tensors in place (scales, stacked factors), so the compiled graph sees them without recompiling. With
    ``wide``, the eager reference runs lorakit.wide's path, whose first forward re-homes the weights under the
    compiled graph."""
    from lorakit import wide

    monkeypatch.setattr(wide, "DEVICES", wide_devices)
    fam = family("sd15")
    pipe = fam.build()
    manager = lorakit.attach(pipe, mode="branch")
    for seed, name in ((1, "a"), (2, "b")):
        pipe.load_lora_weights(lora_state_dict(pipe, fam, seed, text_encoders=False), adapter_name=name)
    pipe.set_adapters(["a", "b"], [0.7, 0.3])
    model = pipe.unet
    inputs = denoiser_inputs(model)
    compiled = lorakit.compile(model, fullgraph=True, backend="aot_eager")
    adapter = manager.adapters["a"]

    @torch.no_grad()
    def check(tag, **kw):
        got = compiled(**inputs, **(kw or {"cross_attention_kwargs": None})).sample
        want = model(**inputs, **(kw or {"cross_attention_kwargs": None})).sample
        assert torch.allclose(got, want, atol=1e-5, rtol=0), f"{tag}: compiled output differs from eager"
        return got

    seen = [check("warm-up")]
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe.set_adapters(["a", "b"], [0.2, 0.9])
        seen.append(check("weights"))
        seen.append(check("call-time scale", cross_attention_kwargs={"scale": 0.5}))
        pipe.load_lora_weights(lora_state_dict(pipe, fam, 7, text_encoders=False), adapter_name="a", hotswap=True)
        assert manager.adapters["a"] is adapter  # the values were copied into the tensors the branches stack
        seen.append(check("same-layout hotswap"))
    assert all(not torch.allclose(x, y) for x, y in zip(seen, seen[1:]))
    widened = [layer.wide is not None or layer.fanout is not None for layer in manager.states["unet"].layers.values()
               if isinstance(layer.module, torch.nn.Linear)]  # (alone, or with the layers that read its input)
    assert all(widened) if "cpu" in wide_devices else not any(widened)


def test_compiled_denoiser_in_a_pipeline_gets_the_call_scale(unet):
    pipe, fam = unet
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="aot_eager")
    run = lambda **kw: pipe("a cat", num_inference_steps=2, output_type="latent", height=64, width=64,  # noqa: E731
                            generator=torch.Generator().manual_seed(0), **kw).images
    run()
    with torch._dynamo.config.patch(error_on_recompile=True):
        half = run(cross_attention_kwargs={"scale": 0.5})
        pipe.set_adapters(["a", "b"], [0.5, 0.5])
        mixed = run()
    eager = fam.build()
    lorakit.attach(eager, mode="merge")
    for seed, name in ((1, "a"), (2, "b")):
        eager.load_lora_weights(lora_state_dict(eager, fam, seed, text_encoders=False), adapter_name=name)
    ref_run = lambda **kw: eager("a cat", num_inference_steps=2, output_type="latent", height=64,  # noqa: E731
                                 width=64, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.allclose(half, ref_run(cross_attention_kwargs={"scale": 0.5}), atol=1e-5)
    eager.set_adapters(["a", "b"], [0.5, 0.5])
    assert torch.allclose(mixed, ref_run(), atol=1e-5)


def test_plain_torch_compile_refuses_an_unapplied_call_scale(unet):
    pipe, fam = unet
    model = pipe.unet
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    inputs = denoiser_inputs(model)
    with torch.no_grad():
        compiled(**inputs, cross_attention_kwargs=None)
        with pytest.raises(Exception, match="lorakit.compile"):
            compiled(**inputs, cross_attention_kwargs={"scale": 0.5})
