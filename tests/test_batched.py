"""The batched merge (used on GPUs) gives the same weights as the per-layer path, and restores bit-exactly."""

import pytest
import torch

import lorakit
from helpers import family, lora_state_dict
from lorakit import batched


@pytest.fixture
def batched_on_cpu(monkeypatch):
    monkeypatch.setattr(batched, "DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(batched, "CHUNK_BYTES", 64 * 1024)  # several chunks per group
    monkeypatch.setattr(batched, "LARGE_ELEMENTS", 4096)  # some layers take the per-layer addmm (fp32 only on CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batched_merge_matches_per_layer(batched_on_cpu, dtype):
    fam = family("sd15")
    pipes = [fam.build(dtype), fam.build(dtype)]
    for i, pipe in enumerate(pipes):
        if i == 1:
            batched.DEVICES = ()  # the reference: per-layer writes
        lorakit.attach(pipe, mode="merge")
        for seed in (1, 2, 3):
            sd = {k: v.to(dtype) for k, v in lora_state_dict(pipe, fam, seed, rank=2 + seed, convs=True).items()}
            pipe.load_lora_weights(sd, adapter_name=f"a{seed}")
        pipe.set_adapters(["a1", "a2", "a3"], [0.7, {"unet": {"down": 0.3}, "text_encoder": -1.0}, 1.3])
        pipe.fuse_lora(adapter_names=["a3"], lora_scale=0.9)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for name, p in pipes[0].unet.named_parameters():
        q = pipes[1].unet.get_parameter(name)
        assert torch.allclose(p, q, atol=tol, rtol=0), name
    _assert_unloaded_to_base(pipes, family("sd15").build(dtype).unet)


def _assert_unloaded_to_base(pipes, base) -> None:
    """unfuse + unload give every pipe's UNet back the base weights, bit for bit."""
    for pipe in pipes:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        for name, p in pipe.unet.named_parameters():
            assert torch.equal(p, base.get_parameter(name)), name


def _reference_key(layer, contributions):
    """batch_key's definition, worked out from scratch (no cache): what every plan build must group by."""
    w = layer.weight
    if (not contributions or layer.base_bias is not None or w.device.type not in batched.DEVICES
            or not w.is_contiguous() or (layer.base is not None and layer.base.device != w.device)
            or (layer.base is None and layer.backup_device not in (None, w.device))):
        return None
    if any(not d.additive or d.low_rank() is None for d, _ in contributions):
        return None
    compute = w.dtype if w.device.type == "cuda" else torch.float32
    large = w.numel() >= batched.LARGE_ELEMENTS and w.dtype == compute
    return (w.shape, w.dtype, w.device, tuple(d.rank for d, _ in contributions), large)


def test_batch_keys_follow_the_layers(batched_on_cpu, monkeypatch):
    """The layer part of a batch key is kept on the layer: it follows backups taken and dropped and the module's
    settings; the ranks (LoCon, Tucker, LoKr, DoRA among them) are those of the deltas."""
    from lorakit.testing.lycoris import make_lycoris

    fam = family("sd15")
    pipe = fam.build()
    manager = lorakit.attach(pipe, mode="merge")
    pipe.load_lora_weights(lora_state_dict(pipe, fam, 1, rank=3, convs=True, fmt="kohya"), adapter_name="a")
    pipe.load_lora_weights(lora_state_dict(pipe, fam, 2, rank=5), adapter_name="b")
    for algo in ("lokr", "dora"):
        pipe.load_lora_weights(make_lycoris(pipe.unet, algo, seed=3), adapter_name=algo)
    conv = "down_blocks.0.resnets.0.conv1"
    module = pipe.unet.get_submodule(conv)
    key = "lora_unet_" + conv.replace(".", "_")
    pipe.load_lora_weights({f"{key}.lora_down.weight": torch.randn(3, module.in_channels, 1, 1),
                            f"{key}.lora_mid.weight": torch.randn(3, 3, 3, 3),
                            f"{key}.lora_up.weight": torch.randn(module.out_channels, 3, 1, 1)}, adapter_name="tucker")

    def check(what):
        layers = [layer for state in manager.states.values() for layer in state.layers.values()]
        for layer in layers:
            for names in (["a"], ["a", "b"], list(layer.deltas)):
                contributions = [(layer.deltas[n], 0.5) for n in names if n in layer.deltas]
                assert batched.batch_key(layer, contributions) == _reference_key(layer, contributions), what
        return layers

    layers = check("loaded")
    assert any(_reference_key(layer, [(d, 1.0)]) for layer in layers for d in layer.deltas.values()), "some batch"
    pipe.set_adapters(["a", "b", "tucker"], [0.3, 0.7, 0.2])
    check("backups taken")
    monkeypatch.setattr(batched, "LARGE_ELEMENTS", 10**9)
    check("another size class")
    monkeypatch.setattr(batched, "DEVICES", ())
    check("batching off")
    monkeypatch.setattr(batched, "DEVICES", ("cpu",))
    for layer in layers[::2]:
        layer.base = None  # as a drop does
    check("backups dropped")
    for layer in layers[::2]:
        layer.base = layer.weight.detach().to("meta")  # a backup elsewhere (backup_device=): per-layer writes
    check("backups on another device")
    for layer in layers[::2]:
        layer.base, layer.backup_device = None, torch.device("meta")  # attach(backup_device=): not taken yet
    check("backups to be taken on another device")
    layers[0].take_backup()
    assert layers[0].base.device.type == "meta"  # where backup_device says, whichever path takes it


SEGMENT_PROBE = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
import lorakit
from lorakit import batched, kernels
from helpers import family, lora_state_dict

batched.DEVICES = ("cpu",)
kernels.ready = lambda device, dtype: True  # interpreted: no compile to wait for
launches = []
real = kernels.merge_group
def counted(tables, mults):
    launches.append(int(mults[:, -1].sum()))
    real(tables, mults)
kernels.merge_group = counted
dtype = torch.float16
fam = family("sd15")
pipes = [fam.build(dtype), fam.build(dtype)]
files = [{k: v.to(dtype) for k, v in lora_state_dict(pipes[0], fam, seed, rank=16 * (1 + seed % 2), convs=True).items()}
         for seed in (1, 2, 3)]
new = {k: v.to(dtype) for k, v in lora_state_dict(pipes[0], fam, 9, rank=16, convs=True).items()}
narrow = {k: v.to(dtype) for k, v in lora_state_dict(pipes[0], fam, 4, rank=8, convs=True).items()}  # not the kernel's

def check(what):
    for name, p in pipes[0].unet.named_parameters():
        q = pipes[1].unet.get_parameter(name)
        diff = (p.float() - q.float()).abs().max().item()
        assert diff <= q.float().abs().max().item() * 2 ** -9, (what, name, diff)

def on(i, fn):
    batched.KERNEL_DEVICES = ("cpu",) if i == 0 else ()  # pipe 1 takes the chunk route: the reference
    fn(pipes[i])

for i, pipe in enumerate(pipes):
    lorakit.attach(pipe, mode="merge")
    pipe.enable_lora_hotswap(target_rank=32)
steps = [lambda p: [p.load_lora_weights(dict(sd), adapter_name=f"a{seed}") for seed, sd in zip((1, 2, 3), files)],
         lambda p: p.set_adapters(["a1", "a2"], [0.7, -0.4]),
         lambda p: p.set_adapters(["a1", "a2", "a3"], [0.7, {"unet": {"down": 0.3}, "text_encoder": -1.0}, 1.3]),
         lambda p: p.load_lora_weights(dict(new), adapter_name="a1", hotswap=True),
         lambda p: p.set_adapters(["a1", "a2"], [0.7, -0.4]),  # back to a kept plan (reactivated)
         lambda p: p.set_adapters(["a1", "a2", "a3"], [0.5, 0.6, 0.7]),
         lambda p: p.load_lora_weights(dict(narrow), adapter_name="a4"),
         lambda p: p.set_adapters(["a4", "a1"], [0.8, 0.6]),  # the layers a4 reaches: on the plan's general path
         lambda p: p.set_adapters(["a2", "a1"], [0.8, 0.6]),  # ...and back to the kernel
         lambda p: p.disable_lora(),
         lambda p: p.enable_lora(),
         lambda p: p.fuse_lora(adapter_names=["a3"], lora_scale=0.9)]
for k, step in enumerate(steps):
    on(0, step)
    on(1, step)
    check(k)
assert len(launches) >= len(steps) and all(launches), launches
for pipe in pipes:
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
base = fam.build(dtype).unet
for pipe in pipes:
    for name, p in pipe.unet.named_parameters():
        assert torch.equal(p, base.get_parameter(name)), name
print("ok", launches)
'''


def test_group_kernel_in_switch_plans_interpreted():
    """The switch plans' group-kernel route (CUDA's, run here by Triton's interpreter) writes the weights the chunk
    route writes, through set_adapters with block scales, a hotswap and a fuse; unload restores bit-exactly."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SEGMENT_PROBE, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]


def test_kernel_parts_fall_back_while_the_kernel_compiles(batched_on_cpu, monkeypatch):
    """Until the group kernel is compiled (or when a weight moved), a plan's kernel part writes its layers through
    the batched BLAS route: the same weights as a plan without kernel parts, through switches, a hotswap, a switch
    back to a kept plan and a fuse; unload restores bit-exactly."""
    pytest.importorskip("triton")
    from lorakit import kernels
    monkeypatch.setattr(kernels, "ready", lambda device, dtype: False)
    dtype = torch.float16
    fam = family("sd15")
    pipes = [fam.build(dtype), fam.build(dtype)]
    files = [{k: v.to(dtype) for k, v in lora_state_dict(pipes[0], fam, seed, rank=16).items()} for seed in (1, 2)]
    new = {k: v.to(dtype) for k, v in lora_state_dict(pipes[0], fam, 9, rank=16).items()}
    managers = [lorakit.attach(pipe, mode="merge") for pipe in pipes]
    for pipe in pipes:
        pipe.enable_lora_hotswap(target_rank=16)
    steps = [lambda p: [p.load_lora_weights(dict(sd), adapter_name=f"a{i}") for i, sd in enumerate(files)],
             lambda p: p.set_adapters(["a0", "a1"], [0.7, -0.4]),
             lambda p: p.load_lora_weights(dict(new), adapter_name="a0", hotswap=True),
             lambda p: p.set_adapters("a1", 0.5),
             lambda p: p.set_adapters(["a0", "a1"], [0.3, 0.9]),  # back to a kept plan
             lambda p: p.fuse_lora(adapter_names=["a1"])]
    for step in steps:
        for i, pipe in enumerate(pipes):
            monkeypatch.setattr(batched, "KERNEL_DEVICES", ("cpu",) if i == 0 else ())
            step(pipe)
        assert any(state._plan.kernel for state in managers[0].states.values())  # the kernel parts were laid out
        for name, p in pipes[0].unet.named_parameters():
            assert torch.equal(p, pipes[1].unet.get_parameter(name)), name
    _assert_unloaded_to_base(pipes, fam.build(dtype).unet)


def test_one_kernel_layout_serves_every_adapter_set(batched_on_cpu, monkeypatch):
    """Merge mode lays the group kernel's parts out once per set of loaded adapters: set_adapters to any set of them
    reuses the layout (no pass over the layers), its weights do not depend on the order of the names, a rank-8
    adapter the kernel cannot read sends only the layers it reaches to the general path, and only while it is live;
    every step writes what the chunk route writes, and disable / unload restore bit-exactly."""
    pytest.importorskip("triton")
    from lorakit import kernels
    monkeypatch.setattr(kernels, "ready", lambda device, dtype: False)  # the parts' BLAS route: bit-comparable
    dtype = torch.float16
    fam = family("sd15")
    pipes = [fam.build(dtype), fam.build(dtype)]
    files = {name: {k: v.to(dtype) for k, v in lora_state_dict(pipes[0], fam, seed, rank=rank).items()}
             for name, seed, rank in (("a", 1, 16), ("b", 2, 32), ("narrow", 3, 8))}
    managers = [lorakit.attach(pipe, mode="merge") for pipe in pipes]
    base = {name: p.clone() for name, p in pipes[0].unet.named_parameters()}

    def step(fn):
        for i, pipe in enumerate(pipes):
            monkeypatch.setattr(batched, "KERNEL_DEVICES", ("cpu",) if i == 0 else ())
            fn(pipe)
        for name, p in pipes[0].unet.named_parameters():
            assert torch.equal(p, pipes[1].unet.get_parameter(name)), name

    for name, sd in files.items():
        step(lambda p: p.load_lora_weights(dict(sd), adapter_name=name))  # noqa: B023
    state = managers[0].states["unet"]
    layout = state._plan.layout
    assert layout.parts and layout.mixed.get("narrow")
    step(lambda p: p.set_adapters(["b", "a"], [0.6, 0.8]))
    assert state._plan.layout is layout and state._plan.skips is None
    reversed_order = {name: p.clone() for name, p in pipes[0].unet.named_parameters()}
    step(lambda p: p.set_adapters(["a", "b"], [0.8, 0.6]))
    for name, p in pipes[0].unet.named_parameters():
        assert torch.equal(p, reversed_order[name]), name
    step(lambda p: p.set_adapters(["narrow", "a"], [0.5, 0.7]))
    assert state._plan.layout is layout and any(bool(s.any()) for s in state._plan.skips)
    step(lambda p: p.set_adapters(["a"], [0.9]))
    step(lambda p: p.disable_lora())
    for name, p in pipes[0].unet.named_parameters():
        assert torch.equal(p, base[name]), name
    step(lambda p: p.enable_lora())
    step(lambda p: p.unload_lora_weights())
    for name, p in pipes[0].unet.named_parameters():
        assert torch.equal(p, base[name]), name
