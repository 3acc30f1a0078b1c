"""Property: after ANY sequence of load / set_adapters / call-time scale / fuse / unfuse / hotswap / disable / enable /
delete, the weights equal what laying the plans out afresh writes, and unfuse followed by unload restores every
parameter bit-exactly (fp32 and fp16, merge and branch, and merge mode's group-kernel plans on their fallback route;
test_batched checks that those plans lay kernel parts out)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit
from helpers import denoiser_inputs, family
from lorakit.testing.loras import ATTENTION_TARGETS, make_lora, to_state_dict

FAM = family("sd15")
_BUILT: dict = {}


def _base(dtype, ranks=(4, 2, 8, 4)):
    """One tiny UNet per dtype and its LoRA pool, built once (hypothesis runs many examples)."""
    if (dtype, ranks) not in _BUILT:
        unet = FAM.build(dtype).unet
        pool = [to_state_dict(make_lora(unet, seed=s, rank=r, convs=s == 2, targets=ATTENTION_TARGETS, alpha=a,
                                        dtype=dtype), "peft")
                for s, r, a in zip((1, 2, 3, 4), ranks, (None, 1.0, 16.0, None))]  # 0, 3: one layout
        _BUILT[dtype, ranks] = (unet, pool, {k: v.clone() for k, v in unet.named_parameters()})
    return _BUILT[dtype, ranks]


ops = st.lists(st.one_of(
    st.tuples(st.just("load"), st.integers(0, 3)),
    st.tuples(st.just("set"), st.lists(st.floats(-2, 2, allow_nan=False, width=16), min_size=1, max_size=3)),
    st.tuples(st.just("scale"), st.floats(-1, 2, allow_nan=False, width=16)),
    st.tuples(st.just("fuse"), st.floats(-1, 2, allow_nan=False, width=16)),
    st.tuples(st.just("unfuse"), st.none()),
    st.tuples(st.just("hotswap"), st.integers(0, 3)),
    st.tuples(st.just("disable"), st.none()),
    st.tuples(st.just("enable"), st.none()),
    st.tuples(st.just("delete"), st.none()),
), min_size=1, max_size=12)


def _apply(unet, pool, op, arg, names):
    loaded = list(unet._lorakit_manager.adapters)
    if op == "load":
        name = f"a{len(names)}"
        names.append(name)
        unet.load_lora_adapter(dict(pool[arg]), adapter_name=name)
    elif op == "set" and loaded:
        chosen = loaded[: len(arg)]
        unet.set_adapters(chosen, weights=list(arg[: len(chosen)]))
    elif op == "scale":
        with torch.no_grad():
            unet(**denoiser_inputs(unet), cross_attention_kwargs={"scale": arg})
    elif op == "fuse" and loaded:
        unet.fuse_lora(lora_scale=arg)
    elif op == "unfuse":
        unet.unfuse_lora()
    elif op == "hotswap" and loaded:
        fused = unet._lorakit_manager.fused_loras.get("unet", [])
        if loaded[0] not in fused:
            unet.load_lora_adapter(dict(pool[arg]), adapter_name=loaded[0], hotswap=True)
    elif op == "disable":
        unet.disable_lora()
    elif op == "enable":
        unet.enable_lora()
    elif op == "delete" and loaded:
        unet.delete_adapters(loaded[-1])


def _relaid_out_equal(unet, manager) -> None:
    """The weights equal what laying every plan out afresh writes: switch plans' skipping of unchanged layers (chunks,
    the group kernel's dirty flags, reactivated plans) never leaves a weight stale."""
    with torch.no_grad():
        unet(**denoiser_inputs(unet))  # a plain call: back at call-time scale 1 after a scaled one
    held = {k: v.clone() for k, v in unet.named_parameters()}
    for state in manager.states.values():
        for layer in state.layers.values():
            layer.applied = ("<unknown to the test>",)
        state.forget_plans()
        state.sync()
    for k, v in unet.named_parameters():
        assert torch.equal(v, held[k]), f"{k} differs from a fresh layout"


@pytest.mark.parametrize("mode", ["merge", "branch", "kernel-fallback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=ops)
def test_any_sequence_restores_bit_exactly(dtype, mode, sequence, monkeypatch):
    ranks = (4, 2, 8, 4)
    if mode == "kernel-fallback":  # merge mode's group-kernel plans, on their route while the kernel compiles
        if dtype != torch.float16:
            pytest.skip("the group kernel takes fp16/bf16")
        pytest.importorskip("triton")
        from lorakit import batched, kernels
        monkeypatch.setattr(batched, "DEVICES", ("cpu", "cuda"))
        monkeypatch.setattr(batched, "KERNEL_DEVICES", ("cpu",))
        monkeypatch.setattr(kernels, "ready", lambda device, dtype: False)
        ranks = (16, 8, 32, 16)  # (rank 8: a file the kernel cannot read, live in some plans only)
    unet, pool, base = _base(dtype, ranks)
    manager = lorakit.attach(unet)
    manager.set_mode("merge" if mode == "kernel-fallback" else mode)
    names: list[str] = []
    try:
        for op, arg in sequence:
            _apply(unet, pool, op, arg, names)
        _relaid_out_equal(unet, manager)
        unet.unfuse_lora()
        unet.unload_lora()
        for k, v in unet.named_parameters():
            assert torch.equal(v, base[k]), f"{k} not restored after {sequence}"
        assert manager.adapters == {}
    finally:  # keep the shared model clean for the next example, whatever happened
        unet.unfuse_lora()
        unet.unload_lora()
        with torch.no_grad():
            for k, v in unet.named_parameters():
                v.copy_(base[k])
