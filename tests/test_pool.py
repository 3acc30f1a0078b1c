"""Branch mode's factor pools (lorakit.pool): a new adapter set runs on views of a span of each layer's pool, idle
adapters inside the span at exactly 0, against diffusers+PEFT; sets with too many idle ranks, block scales and fused
adapters fall back to switch plans; hotswap, loads, deletes and unload keep the pools right."""

import torch
from helpers import (
    assert_close,
    family,
    lora_state_dict,
    outputs,
    pair,
    params,
    snapshot,
)

import lorakit
from lorakit.testing.loras import make_lora, to_state_dict

NAMES = ("a", "k", "b", "c")  # the benchmark's load order
FAM = family("sd15")


def loaded(ranks=(4, 4, 4, 4), peft=True):
    """(diffusers+PEFT pipeline or None, lorakit pipeline in branch mode, the files) with a, k, b, c loaded."""
    ref, ours = pair(FAM, mode="branch")
    files = {n: lora_state_dict(ours, FAM, seed, rank=r) for seed, (n, r) in enumerate(zip(NAMES, ranks), 1)}
    for p in (ref, ours) if peft else (ours,):
        for name, sd in files.items():
            p.load_lora_weights(dict(sd), adapter_name=name)
    return (ref if peft else None), ours, files


def both(ref, ours, call: str, *args, **kwargs) -> None:
    for p in (ref, ours):
        getattr(p, call)(*args, **kwargs)


def state(pipe, name="unet"):
    return pipe._lorakit_manager.states[name]


def shares(t: torch.Tensor, pool: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()


@torch.no_grad()
def test_new_sets_run_on_views_of_the_pools_and_match_peft():
    ref, ours, _ = loaded()
    sets = [(["a", "b"], [0.7, 0.8]), (list(NAMES), [0.5, 0.6, 0.7, 0.8]), (["b", "c"], [0.6, 0.9]),
            (["a", "b"], [0.3, -0.5]), (list(NAMES), [0.2, 0.4, 0.6, 0.8])]
    for names, weights in sets:  # back and forth: every call a new set or new weights
        both(ref, ours, "set_adapters", names, weights)
        assert_close(outputs(ours, FAM), outputs(ref, FAM), what=str(names))
        for comp in ("unet", "text_encoder"):
            st = state(ours, comp)
            assert st._pooled and st._plan is None  # no switch plan laid out, nothing restacked
            assert len(st._pools.groups) == 1  # every adapter targets the same layers: one group per component
            for layer in st.layers.values():
                (a, b), pool = layer.branch, layer.pool
                assert shares(a, pool.down) and shares(b, pool.up_t)
                first, last = NAMES.index(names[0]), NAMES.index(names[-1])
                assert a.shape[0] == pool.offsets[last] + 4 - pool.offsets[first]


@torch.no_grad()
def test_idle_adapters_in_a_span_get_exactly_zero():
    _, ours, files = loaded(peft=False)
    ours.set_adapters(["a", "b"], [0.7, 0.8])
    got = outputs(ours, FAM)
    for layer in state(ours).layers.values():
        assert layer.branch_scale.tolist()[4:8] == [0.0] * 4  # k's ranks, between a's and b's
    alone = FAM.build()
    lorakit.attach(alone, mode="branch")
    for name in ("a", "b"):
        alone.load_lora_weights(dict(files[name]), adapter_name=name)
    alone.set_adapters(["a", "b"], [0.7, 0.8])
    assert_close(got, outputs(alone, FAM))  # (summation order differs: the span has 4 more, zeroed, ranks)


@torch.no_grad()
def test_a_span_with_too_many_idle_ranks_is_stacked_instead():
    ref, ours, _ = loaded(ranks=(2, 8, 2, 2))
    both(ref, ours, "set_adapters", ["a", "b"], [0.7, 0.8])  # 8 idle ranks (k) for 4 active: stacked
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="stacked")
    st = state(ours)
    assert not st._pooled and st._plan is not None
    for layer in st.layers.values():
        assert layer.group is None and layer.branch[0].shape[0] == 4 and not shares(layer.branch[0], layer.pool.down)
    both(ref, ours, "set_adapters", list(NAMES), [0.5, 0.6, 0.7, 0.8])  # back on the pools
    assert state(ours)._pooled
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="pooled again")
    both(ref, ours, "set_adapters", ["a", "b"], [0.1, 0.2])  # the kept plan comes back with its stack
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="stacked again")


@torch.no_grad()
def test_block_scales_and_fused_adapters_run_on_switch_plans():
    ref, ours = pair(FAM, mode="branch")
    # attention-only: diffusers' block grammar needs block paths
    files = {n: to_state_dict(make_lora(ours.unet, rank=4, seed=seed), "peft", "unet") for seed, n in ((1, "a"), (2, "b"))}
    for name, sd in files.items():
        both(ref, ours, "load_lora_weights", dict(sd), adapter_name=name)
    weights = {"unet": {"down": 0.9, "mid": 0.5, "up": {"block_1": [0.4, 0.8, 1.0]}}}
    both(ref, ours, "set_adapters", ["a", "b"], [weights, 0.7])
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="block scales")
    assert not state(ours)._pooled
    both(ref, ours, "set_adapters", ["a", "b"], [0.7, 0.8])
    assert state(ours)._pooled
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="uniform again")
    # a fused, b live: against lorakit's merge mode (no pools; lorakit and PEFT part ways on fusing a subset of the
    # active adapters, in main as here)
    merged = FAM.build()
    lorakit.attach(merged, mode="merge")
    for name in ("a", "b"):
        merged.load_lora_weights(dict(files[name]), adapter_name=name)
    for p in (merged, ours):
        p.set_adapters(["a", "b"], [0.7, 0.8])
        p.fuse_lora(adapter_names=["a"])
    assert not state(ours)._pooled
    assert_close(outputs(ours, FAM), outputs(merged, FAM), what="a fused, b live")
    both(merged, ours, "unfuse_lora")
    assert state(ours)._pooled
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="unfused")


@torch.no_grad()
def test_load_appends_and_delete_rebuilds_the_pools():
    ref, ours = pair(FAM, mode="branch")
    before = snapshot(ours, ("unet", "text_encoder"))
    files = {n: lora_state_dict(ours, FAM, seed, rank=4) for seed, n in enumerate(NAMES, 1)}
    for name in ("a", "k", "b"):
        both(ref, ours, "load_lora_weights", dict(files[name]), adapter_name=name)
    both(ref, ours, "set_adapters", ["a", "b"], [0.7, 0.8])
    layer = state(ours).layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    kept = layer.pool.down
    both(ref, ours, "load_lora_weights", dict(files["c"]), adapter_name="c")  # appended: no regrowth, no rewrite
    assert layer.pool.down is kept and [n for n, _ in layer.pool.entries] == list(NAMES)
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="c alone, as diffusers activates it")
    both(ref, ours, "set_adapters", ["a", "b", "c"], [0.7, 0.8, 0.9])
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="a, b, c")
    both(ref, ours, "delete_adapters", "k")
    assert [n for n, _ in layer.pool.entries] == ["a", "b", "c"] and state(ours)._pooled
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="k deleted")
    both(ref, ours, "delete_adapters", "b")  # an active one
    assert_close(outputs(ours, FAM), outputs(ref, FAM), what="b deleted")
    ours.unload_lora_weights()
    for comp, want in before.items():
        got = params(getattr(ours, comp))
        assert all(torch.equal(got[k], v) for k, v in want.items())  # bit-exact
    assert not any(hasattr(type(m), "_lorakit_base") for m in ours.unet.modules())  # plain layers again


@torch.no_grad()
def test_hotswap_of_a_pooled_adapter_rewrites_its_ranks_in_place():
    _, ours, files = loaded(peft=False)
    ours.enable_lora_hotswap(target_rank=4)
    ours.set_adapters(list(NAMES), [0.5, 0.6, 0.7, 0.8])
    outputs(ours, FAM)
    layer = next(iter(state(ours).layers.values()))
    a, pool = layer.branch[0], layer.pool.down
    new_k = lora_state_dict(ours, FAM, 9, rank=4)
    ours.load_lora_weights(new_k, adapter_name="k", hotswap=True)
    ours.set_adapters(list(NAMES), [0.5, 0.6, 0.7, 0.8])
    got = outputs(ours, FAM)
    assert layer.pool.down is pool and layer.branch[0] is a  # the same views: the values changed under them
    fresh = FAM.build()
    lorakit.attach(fresh, mode="branch")
    for name in NAMES:
        fresh.load_lora_weights(dict(new_k if name == "k" else files[name]), adapter_name=name)
    fresh.set_adapters(list(NAMES), [0.5, 0.6, 0.7, 0.8])
    assert_close(got, outputs(fresh, FAM), atol=1e-6)
    ours.set_adapters(["k", "b"], [1.0, 0.5])  # another span sees the swapped values too
    fresh.set_adapters(["k", "b"], [1.0, 0.5])
    assert_close(outputs(ours, FAM), outputs(fresh, FAM), atol=1e-6)


@torch.no_grad()
def test_a_linear_layer_runs_on_the_views_without_copying_them():
    from torch.profiler import profile

    _, ours, _ = loaded(peft=False)
    ours.set_adapters(["k", "b"], [0.7, 0.8])  # a span inside the pool: up is a view with leading dimension C
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    module, layer = ours.unet.get_submodule(path), state(ours).layers[path]
    x = torch.randn(2, 5, module.in_features)
    module(x)  # follows the new span
    module(x)  # (where layers widen: a fanout predicted for q/k/v gives way to a layer called alone)
    want = torch.nn.functional.linear(x, module.weight, module.bias)
    a, b = layer.branch
    want += (x @ a.t() * layer.branch_scale) @ b.t()
    with profile() as prof:
        got = module(x)
    assert not [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
