"""Switch plans: multiplier-only switches (weights, block weights, call-time scales) rerun a plan; the weights they
leave equal those of layer-by-layer writes, branch mode agrees with merge mode, structure changes skip layers that
already hold their contributions, and unload is still bit-exact."""

import torch

import lorakit
from helpers import assert_close, family, lora_state_dict, outputs, params
from lorakit import batched

STEPS = [
    ("two adapters", lambda p: p.set_adapters(["a", "b"], [0.7, 0.3])),
    ("new weights", lambda p: p.set_adapters(["a", "b"], [0.2, 0.9])),
    ("block weights", lambda p: p.set_adapters(["a", "b"], [{"unet": {"down": 0.4, "up": {"block_1": [0.1, 1.5, 0.6]}},
                                                              "text_encoder": 0.5}, -0.8])),
    ("back to uniform", lambda p: p.set_adapters(["a", "b"], [1.1, 0.3])),
    ("fuse a", lambda p: p.fuse_lora(adapter_names=["a"], lora_scale=0.6)),
    ("unfuse: back to an adapter set seen before", lambda p: p.unfuse_lora()),
    ("fuse a again", lambda p: p.fuse_lora(adapter_names=["a"], lora_scale=0.6)),
    ("weights with a fused", lambda p: p.set_adapters(["b", "c"], [0.5, 0.25])),
    ("unfuse", lambda p: p.unfuse_lora()),
    ("disable", lambda p: p.disable_lora()),
    ("enable", lambda p: p.enable_lora()),
    ("delete b", lambda p: p.delete_adapters("b")),
    ("weights after delete", lambda p: p.set_adapters(["a", "c"], [0.9, 0.45])),
]


def _pipeline(fam, mode, devices, monkeypatch):
    monkeypatch.setattr(batched, "DEVICES", devices)  # decides, at each plan build, which layers merge in chunks
    pipe = fam.build()
    lorakit.attach(pipe, mode=mode)
    for i, name in enumerate("abc"):
        pipe.load_lora_weights(lora_state_dict(pipe, fam, 10 + i, rank=2 + i, convs=True), adapter_name=name)
    return pipe


def test_plans_match_layer_by_layer_writes_and_branch_mode(monkeypatch):
    fam = family("sd15")
    setups = {"chunks": ("merge", ("cpu",)), "layers": ("merge", ()), "branch": ("branch", ())}
    pipes = {name: _pipeline(fam, mode, devices, monkeypatch) for name, (mode, devices) in setups.items()}
    base = params(family("sd15").build().unet)
    for what, step in STEPS:
        for name, pipe in pipes.items():
            monkeypatch.setattr(batched, "DEVICES", setups[name][1])
            step(pipe)
        chunks, layers = pipes["chunks"].unet, pipes["layers"].unet
        for key, p in chunks.named_parameters():
            assert torch.allclose(p, layers.get_parameter(key), atol=1e-6, rtol=0), f"{what}: {key}"
        assert_close(outputs(pipes["branch"], fam), outputs(pipes["chunks"], fam), atol=1e-4, what=what)
    for pipe in pipes.values():
        pipe.unload_lora_weights()
        assert all(torch.equal(v, base[k]) for k, v in pipe.unet.state_dict().items())


def test_call_time_scale_reruns_the_plan(monkeypatch):
    """A pipeline call's scale is a multiplier-only switch: outputs equal those at set_adapters(weight x scale)."""
    fam = family("sd15")
    pipe = _pipeline(fam, "merge", ("cpu",), monkeypatch)
    pipe.set_adapters(["a", "b"], [0.8, 0.4])
    scaled = outputs(pipe, fam, cross_attention_kwargs={"scale": 0.5})["denoiser"]
    pipe.set_adapters(["a", "b"], [0.4, 0.2])
    assert (outputs(pipe, fam)["denoiser"] - scaled).abs().max().item() <= 1e-5


def test_structure_changes_skip_layers_that_already_hold_their_contributions(monkeypatch):
    """fuse_lora of the active adapters at their current weights leaves every weight as it is: no layer is
    rewritten; nor is any when an inactive adapter is deleted."""
    fam = family("sd15")
    pipe = _pipeline(fam, "merge", ("cpu",), monkeypatch)
    pipe.set_adapters(["a", "b"], [0.7, 0.3])
    pipe.set_adapters(["a", "b"], [0.6, 0.2])  # a plan run: layers now say "written by a plan"
    written = []
    real = batched.merge_chunk
    monkeypatch.setattr(batched, "merge_chunk", lambda chunk, *args: (written.append(chunk), real(chunk, *args)))

    def weights():
        return {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}

    before = weights()
    pipe.delete_adapters("c")
    assert written == [] and all(torch.equal(v, before[k]) for k, v in pipe.unet.named_parameters())
    pipe.set_adapters(["a", "b"], [0.5, 0.2])
    assert written, "a change of weights rewrites the layers"
    written.clear()
    before = weights()
    pipe.fuse_lora(adapter_names=["a", "b"])
    assert written == [] and all(torch.equal(v, before[k]) for k, v in pipe.unet.named_parameters())
    pipe.unfuse_lora()
    assert written == [] and all(torch.equal(v, before[k]) for k, v in pipe.unet.named_parameters())


def test_unload_frees_the_adapters(monkeypatch):
    """Plans (current and kept) reference deltas: after unload nothing of lorakit holds them any more."""
    import gc
    import weakref

    fam = family("sd15")
    pipe = _pipeline(fam, "merge", ("cpu",), monkeypatch)
    pipe.set_adapters(["a", "b"], [0.7, 0.3])
    pipe.set_adapters(["a", "c"], [0.7, 0.3])
    manager = pipe._lorakit_manager
    refs = [weakref.ref(d) for a in manager.adapters.values() for mods in a.layers.values() for d in mods.values()]
    pipe.unload_lora_weights()
    gc.collect()
    assert all(r() is None for r in refs)


def test_layers_with_different_adapter_counts_switch_together(monkeypatch):
    """Adapters on different layer sets give chunks of different widths in one switch (one transfer for all)."""
    from lorakit.testing.loras import make_lora, to_state_dict

    fam = family("sd15")
    pipes = {}
    for name, devices in (("chunks", ("cpu",)), ("layers", ())):
        monkeypatch.setattr(batched, "DEVICES", devices)
        pipe = fam.build()
        lorakit.attach(pipe, mode="merge")
        pipe.load_lora_weights(lora_state_dict(pipe, fam, 1, text_encoders=False), adapter_name="all")
        only_q = to_state_dict(make_lora(pipe.unet, rank=3, seed=2, targets=("to_q",)), "peft", "unet")
        pipe.load_lora_weights(only_q, adapter_name="q")
        pipe.set_adapters(["all", "q"], [0.6, 0.9])
        pipe.set_adapters(["all", "q"], [0.4, 1.2])
        pipes[name] = pipe
    for key, p in pipes["chunks"].unet.named_parameters():
        assert torch.allclose(p, pipes["layers"].unet.get_parameter(key), atol=1e-6, rtol=0), key


def test_plans_of_other_sets_survive_a_load_on_the_same_layers(monkeypatch):
    """Loading an adapter onto layers that already hold adapters keeps the plans of other adapter sets: switching
    back to one lays out nothing, and the outputs equal a pipeline that never had the plan."""
    fam = family("sd15")
    built = []
    real_build = lorakit.plan.build
    monkeypatch.setattr(lorakit.plan, "build", lambda *a, **k: built.append(1) or real_build(*a, **k))
    pipe, fresh = fam.build(), fam.build()
    for p in (pipe, fresh):
        lorakit.attach(p, mode="merge")
        for i, name in enumerate("ab"):
            p.load_lora_weights(lora_state_dict(p, fam, 10 + i), adapter_name=name)
    pipe.set_adapters(["a", "b"], [0.6, 0.3])
    outputs(pipe, fam)
    pipe.load_lora_weights(lora_state_dict(pipe, fam, 12), adapter_name="c")  # same layers as a and b
    fresh.load_lora_weights(lora_state_dict(fresh, fam, 12), adapter_name="c")
    before = len(built)
    pipe.set_adapters(["a", "b"], [0.5, 0.4])
    assert len(built) == before, "the kept plan of [a, b] was laid out again"
    fresh.set_adapters(["a", "b"], [0.5, 0.4])
    assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-6)
    pipe.set_adapters(["c", "a"], [1.0, 0.2])
    fresh.set_adapters(["c", "a"], [1.0, 0.2])
    assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-6)


def test_fusing_the_merged_mix_writes_nothing_and_stays_exact(monkeypatch):
    """fuse_lora of exactly the live mix at lora_scale 1 keeps the weights as merged (no plan laid out); every later
    state equals a pipeline whose fuse laid out a plan, and unload restores the base bit-exactly."""
    fam = family("sd15")
    built = []
    real_build = lorakit.plan.build
    monkeypatch.setattr(lorakit.plan, "build", lambda *a, **k: built.append(1) or real_build(*a, **k))
    pipes = {}
    for name, devices in (("chunks", ("cpu",)), ("layers", ())):
        monkeypatch.setattr(batched, "DEVICES", devices)
        pipes[name] = _pipeline(fam, "merge", devices, monkeypatch)
    ref = _pipeline(fam, "merge", (), monkeypatch)
    monkeypatch.setattr(ref._lorakit_manager.states["unet"], "merged_live", lambda: None)
    monkeypatch.setattr(ref._lorakit_manager.states["text_encoder"], "merged_live", lambda: None)
    steps = [
        ("mix", lambda p: p.set_adapters(["a", "b"], [0.7, 0.4])),
        ("fuse the mix", lambda p: p.fuse_lora(adapter_names=["a", "b"])),
        ("weights of fused adapters", lambda p: p.set_adapters(["a", "b"], [0.1, 0.2])),
        ("another adapter on top", lambda p: p.set_adapters(["c"], [0.5])),
        ("unfuse", lambda p: p.unfuse_lora()),
        ("mix again", lambda p: p.set_adapters(["b", "c"], [0.3, 0.9])),
        ("fuse again", lambda p: p.fuse_lora(adapter_names=["b", "c"])),
        ("disable", lambda p: p.disable_lora()),
        ("enable", lambda p: p.enable_lora()),
        ("delete a", lambda p: p.delete_adapters("a")),
    ]
    for what, step in steps:
        before = len(built)
        for name, pipe in pipes.items():
            monkeypatch.setattr(batched, "DEVICES", ("cpu",) if name == "chunks" else ())
            step(pipe)
        if what.startswith("fuse"):
            assert len(built) == before, f"{what}: a plan was laid out"
        monkeypatch.setattr(batched, "DEVICES", ())
        step(ref)
        for name, pipe in pipes.items():
            assert_close(outputs(pipe, fam), outputs(ref, fam), atol=1e-5, what=f"{name}, {what}")
    base = params(family("sd15").build().unet)
    for pipe in pipes.values():
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        assert all(torch.equal(v, base[k]) for k, v in pipe.unet.named_parameters())  # the weights, not a view
