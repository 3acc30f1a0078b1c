"""Hotswap: in place, text encoders included, different layers and ranks; a failed hotswap changes nothing."""

from pathlib import Path

import pytest
import torch

import lorakit
from helpers import assert_close, family, lora_state_dict, outputs, pair, write
from lorakit import hotswap as swapping
from lorakit.testing.loras import make_lora, to_state_dict


@pytest.mark.parametrize("mode", ["merge", "branch"])
def test_hotswap_equals_fresh_load(mode, tmp_path):
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe, mode=mode)
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(lora_state_dict(pipe, fam, 1, rank=8), adapter_name="slot")
    pipe.set_adapters("slot", 0.6)
    # The new LoRA: another rank, fewer layers (no to_v), text encoder included.
    unet = {p: w for p, w in make_lora(pipe.unet, seed=2, rank=4).items() if not p.endswith("to_v")}
    te = make_lora(pipe.text_encoder, seed=3, rank=2)
    sd = {**to_state_dict(unet, "peft", "unet"), **to_state_dict(te, "peft", "text_encoder")}
    pipe.load_lora_weights(write(sd, tmp_path / "new.safetensors"), adapter_name="slot", hotswap=True)
    got = outputs(pipe, fam)
    fresh = fam.build()
    lorakit.attach(fresh, mode=mode)
    fresh.load_lora_weights(dict(sd), adapter_name="slot")
    # as in diffusers+PEFT, the swapped-in LoRA starts at weight 1.0 (the 0.6 of the old one is not kept)
    assert_close(got, outputs(fresh, fam), atol=1e-6)
    assert pipe.get_list_adapters() == {"unet": ["slot"], "text_encoder": ["slot"]}


def test_failed_hotswap_keeps_the_previous_adapter(tmp_path):
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe)
    pipe.enable_lora_hotswap(target_rank=4)
    pipe.load_lora_weights(lora_state_dict(pipe, fam, 1), adapter_name="slot")
    want = outputs(pipe, fam)
    bad = lora_state_dict(pipe, fam, 2)
    bad["unet.down_blocks.0.attentions.0.nope.lora_A.weight"] = torch.zeros(4, 32)
    bad["unet.down_blocks.0.attentions.0.nope.lora_B.weight"] = torch.zeros(32, 4)
    with pytest.raises(lorakit.LoraKeyError, match="nope"):
        pipe.load_lora_weights(bad, adapter_name="slot", hotswap=True)
    with pytest.raises(lorakit.AdapterError, match="target_rank=4"):
        pipe.load_lora_weights(lora_state_dict(pipe, fam, 3, rank=16), adapter_name="slot", hotswap=True)
    with pytest.raises(lorakit.AdapterError, match="replaces an existing adapter"):
        pipe.load_lora_weights(lora_state_dict(pipe, fam, 3), adapter_name="other", hotswap=True)
    assert_close(outputs(pipe, fam), want, atol=0.0)
    assert pipe.get_list_adapters() == {"unet": ["slot"], "text_encoder": ["slot"]}


def test_hotswap_parity_with_diffusers_unet_only():
    fam = family("sd15")
    ref, ours = pair(fam)
    first = lora_state_dict(ref, fam, 1, text_encoders=False)
    second = lora_state_dict(ref, fam, 2, rank=8, text_encoders=False)
    for p in (ref, ours):  # diffusers empties dicts it is given: each gets its own copy
        p.enable_lora_hotswap(target_rank=8)
        p.load_lora_weights(dict(first), adapter_name="slot")
        p.load_lora_weights(dict(second), adapter_name="slot", hotswap=True)
    assert_close(outputs(ours, fam), outputs(ref, fam))


SETUPS = {"chunks": ("merge", ("cpu",)), "layers": ("merge", ()), "branch": ("branch", ())}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_same_layout_hotswap_copies_in_place(setup, tmp_path, monkeypatch):
    """A new checkpoint of the same layout is copied into the loaded adapter's tensors (the deltas, plans and stacked
    factors are kept); outputs equal a fresh load in every state, including kept plans switched back to."""
    from lorakit import batched

    mode, devices = SETUPS[setup]
    monkeypatch.setattr(batched, "DEVICES", devices)
    fam = family("sd15")
    pipe, fresh = fam.build(), fam.build()
    manager = lorakit.attach(pipe, mode=mode)
    lorakit.attach(fresh, mode=mode)
    for p in (pipe, fresh):
        p.load_lora_weights(lora_state_dict(p, fam, 2, convs=True), adapter_name="b")
    pipe.load_lora_weights(lora_state_dict(pipe, fam, 1, convs=True), adapter_name="a")
    fresh.load_lora_weights(lora_state_dict(fresh, fam, 3, convs=True), adapter_name="a")
    for names, weights in ((["a", "b"], [0.5, 0.7]), (["b"], [0.7]), (["a", "b"], [0.5, 0.7])):
        pipe.set_adapters(names, weights)  # leaves plans with "a" live, kept and current
        outputs(pipe, fam)
    kept = {c: dict(m) for c, m in manager.adapters["a"].layers.items()}
    pipe.load_lora_weights(write(lora_state_dict(pipe, fam, 3, convs=True), tmp_path / "a3.safetensors"),
                           adapter_name="a", hotswap=True)
    assert manager.adapters["a"].layers == kept and all(
        manager.adapters["a"].layers[c][p] is d for c, m in kept.items() for p, d in m.items()), "not in place"
    assert manager.adapters["a"].source.endswith("a3.safetensors")
    states = [(["a", "b"], [1.0, 0.7]),  # the swapped-in adapter starts at 1.0, as in diffusers+PEFT
              (["b"], [0.7]), (["a", "b"], [0.3, 0.7]), (["a"], [0.9])]
    for names, weights in states:
        if (names, weights) != states[0]:
            pipe.set_adapters(names, weights)
        fresh.set_adapters(names, weights)
        assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-5, what=f"{names} {weights}")
    base = fam.build()
    pipe.unload_lora_weights()
    for name in ("unet", "text_encoder"):
        assert all(torch.equal(v, getattr(base, name).state_dict()[k]) for k, v in getattr(pipe, name).state_dict().items())


def test_other_layout_hotswap_replaces_the_deltas(tmp_path):
    """Another alpha (so another scale) is not a value copy: the general path replaces the deltas."""
    fam = family("sd15")
    pipe = fam.build()
    manager = lorakit.attach(pipe)
    pipe.load_lora_weights(lora_state_dict(pipe, fam, 1), adapter_name="a")
    before = next(iter(manager.adapters["a"].layers["unet"].values()))
    sd = lora_state_dict(pipe, fam, 2, fmt="kohya", alpha=2.0)
    pipe.load_lora_weights(sd, adapter_name="a", hotswap=True)
    assert next(iter(manager.adapters["a"].layers["unet"].values())) is not before
    fresh = fam.build()
    lorakit.attach(fresh)
    fresh.load_lora_weights(dict(sd), adapter_name="a")
    assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-6)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_file_laid_out_alike_is_one_buffer_copy(setup, tmp_path, monkeypatch):
    """A file laid out byte for byte as the loaded one (a new checkpoint of the same run) is copied into the buffer
    every delta views; other alphas in the file (kohya ``.alpha`` tensors) take the general path. Outputs equal a
    fresh load either way."""
    from lorakit import batched

    mode, devices = SETUPS[setup]
    monkeypatch.setattr(batched, "DEVICES", devices)
    fam = family("sd15")
    pipe = fam.build()
    manager = lorakit.attach(pipe, mode=mode)
    files = {seed: write(lora_state_dict(pipe, fam, seed, fmt="kohya", alpha=alpha, convs=True),
                         tmp_path / f"{seed}.safetensors") for seed, alpha in ((1, 2.0), (2, 2.0), (3, 3.0))}
    pipe.load_lora_weights(files[2], adapter_name="b")
    pipe.load_lora_weights(files[1], adapter_name="a")
    pipe.set_adapters(["a", "b"], [0.5, 0.7])
    outputs(pipe, fam)
    adapter = manager.adapters["a"]
    buffer, deltas = adapter.buffer, {c: dict(m) for c, m in adapter.layers.items()}
    assert buffer is not None, "a file read in one piece whose tensors need no conversion keeps its buffer"
    for seed, copied in ((2, True), (3, False)):
        pipe.load_lora_weights(files[seed], adapter_name="a", hotswap=True)
        swapped = manager.adapters["a"]
        if copied:
            assert swapped is adapter and swapped.buffer is buffer and swapped.layers == deltas
            assert torch.equal(buffer, manager.adapters["b"].buffer), "the data section of file 2, copied"
        fresh = fam.build()
        lorakit.attach(fresh, mode=mode)
        fresh.load_lora_weights(files[2], adapter_name="b")
        fresh.load_lora_weights(files[seed], adapter_name="a")
        for names, weights in ((["a", "b"], [1.0, 0.7]), (["a"], [0.4])):
            pipe.set_adapters(names, weights)
            fresh.set_adapters(names, weights)
            assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-5, what=f"file {seed}: {names}")


def test_state_dict_hotswap_copies_into_lorakits_own_tensors():
    """A state dict laid out as the loaded one is copied tensor by tensor into the deltas; the tensors the deltas
    hold are lorakit's own copies, so neither the first dict nor the second is written to."""
    fam = family("sd15")
    pipe = fam.build()
    manager = lorakit.attach(pipe)
    first, second = lora_state_dict(pipe, fam, 1), lora_state_dict(pipe, fam, 2)
    kept_first, kept_second = ({k: v.clone() for k, v in sd.items()} for sd in (first, second))
    pipe.load_lora_weights(first, adapter_name="a")
    adapter = manager.adapters["a"]
    assert adapter.origins, "tensors used as they are: a same-layout hotswap copies into them"
    deltas = {c: dict(m) for c, m in adapter.layers.items()}
    pipe.load_lora_weights(second, adapter_name="a", hotswap=True)
    assert manager.adapters["a"] is adapter and adapter.layers == deltas
    for sd, kept in ((first, kept_first), (second, kept_second)):
        assert all(torch.equal(sd[k], kept[k]) for k in kept), "a caller's tensors changed"
    fresh = fam.build()
    lorakit.attach(fresh)
    fresh.load_lora_weights(kept_second, adapter_name="a")
    assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-6)


def test_same_layout_hotswap_after_a_partial_delete_restores_every_component(tmp_path):
    """An adapter deleted from one component no longer holds every module of its file: a hotswap of a file laid out
    alike must not take the value-copy paths (the text encoder would miss its new layers)."""
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe)
    first = write(lora_state_dict(pipe, fam, 1), tmp_path / "1.safetensors")
    second = write(lora_state_dict(pipe, fam, 2), tmp_path / "2.safetensors")
    pipe.load_lora_weights(first, adapter_name="a")
    pipe.delete_adapters("a", components=["text_encoder"])
    pipe.load_lora_weights(second, adapter_name="a", hotswap=True)
    assert pipe.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
    fresh = fam.build()
    lorakit.attach(fresh)
    fresh.load_lora_weights(second, adapter_name="a")
    assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-6)


def _with_tucker(pipe, sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``sd`` (kohya) plus a Tucker LoCon on a 3x3 conv: its cached low-rank form is computed, not a view."""
    module = pipe.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    g = torch.Generator().manual_seed(seed)
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    return {**sd, f"{key}.lora_down.weight": torch.randn(3, module.in_channels, 1, 1, generator=g) * 0.1,
            f"{key}.lora_mid.weight": torch.randn(3, 3, 3, 3, generator=g) * 0.1,
            f"{key}.lora_up.weight": torch.randn(module.out_channels, 3, 1, 1, generator=g) * 0.1,
            f"{key}.alpha": torch.tensor(1.5)}


@pytest.mark.parametrize("setup", ["chunks", "branch"])
def test_repeated_buffer_hotswaps_recompute_derived_factors(setup, tmp_path, monkeypatch):
    """What a swap refreshes is worked out at the first one and reused: a Tucker layer's folded factors are
    recomputed at every swap (they are not views of the file), and outputs after the second equal a fresh load."""
    from lorakit import batched

    mode, devices = SETUPS[setup]
    monkeypatch.setattr(batched, "DEVICES", devices)
    fam = family("sd15")
    pipe = fam.build()
    manager = lorakit.attach(pipe, mode=mode)
    files = [write(_with_tucker(pipe, lora_state_dict(pipe, fam, seed, fmt="kohya", alpha=2.0), seed),
                   tmp_path / f"{seed}.safetensors") for seed in (1, 2, 3)]
    pipe.load_lora_weights(files[0], adapter_name="a")
    outputs(pipe, fam)
    buffer = manager.adapters["a"].buffer
    for path in files[1:]:
        pipe.load_lora_weights(path, adapter_name="a", hotswap=True)
        assert manager.adapters["a"].buffer is buffer, "the buffer-copy path"
        outputs(pipe, fam)  # merged (or run as branches) with these values before the next swap
    fresh = fam.build()
    lorakit.attach(fresh, mode=mode)
    fresh.load_lora_weights(files[-1], adapter_name="a")
    assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-5)


def test_swap_index_follows_a_delete_from_a_component(tmp_path):
    """After the adapter leaves a component, a same-layout swap of what remains refreshes only what it holds now."""
    fam = family("sd15")
    pipe = fam.build()
    manager = lorakit.attach(pipe)
    pipe.load_lora_weights(lora_state_dict(pipe, fam, 1), adapter_name="a")
    pipe.load_lora_weights(lora_state_dict(pipe, fam, 2), adapter_name="a", hotswap=True)
    assert manager.adapters["a"].swap_index is not None
    pipe.delete_adapters("a", components=["text_encoder"])
    unet_only = lora_state_dict(pipe, fam, 3, text_encoders=False)
    before = manager.adapters["a"].layers["unet"]
    pipe.load_lora_weights(unet_only, adapter_name="a", hotswap=True)
    assert manager.adapters["a"].layers["unet"] is before, "values copied in place"
    fresh = fam.build()
    lorakit.attach(fresh)
    fresh.load_lora_weights(dict(unet_only), adapter_name="a")
    assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-6)


def _reordered(path: str, out) -> str:
    """The file at ``path`` with its tensors stored in reverse order: same keys, dtypes and shapes, other offsets."""
    import json
    import struct

    data = Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    meta = header.pop("__metadata__", None)
    chunks, offset = [], 0
    for key in reversed(list(header)):
        start, end = header[key]["data_offsets"]
        chunks.append(body[start:end])
        header[key]["data_offsets"] = [offset, offset + end - start]
        offset += end - start
    raw = json.dumps({**({"__metadata__": meta} if meta else {}), **header}).encode()
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))
    return str(out)


def test_same_keys_at_other_offsets_do_not_take_the_buffer_copy(tmp_path, monkeypatch):
    """The buffer copy needs the whole header laid out alike: a file with the same keys, dtypes and shapes stored in
    another order is copied some other way, and gives the same outputs as a fresh load of it."""
    from lorakit import hotswap

    fam = family("sd15")
    pipe = fam.build()
    manager = lorakit.attach(pipe)
    pipe.load_lora_weights(write(lora_state_dict(pipe, fam, 1), tmp_path / "1.safetensors"), adapter_name="a")
    other = _reordered(write(lora_state_dict(pipe, fam, 2), tmp_path / "2.safetensors"), tmp_path / "2r.safetensors")
    copied = []
    monkeypatch.setattr(hotswap, "copy_buffer", lambda *args: copied.append(args))
    pipe.load_lora_weights(other, adapter_name="a", hotswap=True)
    assert not copied and manager.adapters["a"].source == other
    fresh = fam.build()
    lorakit.attach(fresh)
    fresh.load_lora_weights(other, adapter_name="a")
    assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-6)


@pytest.mark.parametrize("mode", ["merge", "branch"])
def test_hotswap_of_a_denoiser_only_file_into_a_full_adapter(mode, tmp_path):
    """A checkpoint that reaches fewer components than the adapter (a denoiser-only file into an adapter with text
    encoders): the denoiser's deltas take the new values in place, the adapter leaves the text encoder, whose
    weights come back bit-exactly; the result equals loading that file fresh, and the next swap of the same layout
    stays in place."""
    fam = family("sd15")
    pipe = fam.build()
    base_te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    manager = lorakit.attach(pipe, mode=mode)
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(lora_state_dict(pipe, fam, 1, rank=8), adapter_name="slot")
    deltas = dict(manager.adapters["slot"].layers["unet"])
    unet_only = lora_state_dict(pipe, fam, 2, rank=8, text_encoders=False)
    pipe.load_lora_weights(write(unet_only, tmp_path / "unet.safetensors"), adapter_name="slot", hotswap=True)
    # the same delta objects: the values were copied in place
    assert all(deltas[p] is d for p, d in manager.adapters["slot"].layers["unet"].items())
    assert pipe.get_list_adapters() == {"unet": ["slot"]}
    assert not manager.states["text_encoder"].layers
    # the parameters themselves (what runs), not only what state_dict reports
    assert all(torch.equal(p, base_te[name]) for name, p in pipe.text_encoder.named_parameters())
    fresh = fam.build()
    lorakit.attach(fresh, mode=mode)
    fresh.load_lora_weights(dict(unet_only), adapter_name="slot")
    assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-6)
    again = lora_state_dict(pipe, fam, 3, rank=8, text_encoders=False)
    pipe.load_lora_weights(dict(again), adapter_name="slot", hotswap=True)
    assert all(deltas[p] is d for p, d in manager.adapters["slot"].layers["unet"].items())
    fresh.load_lora_weights(dict(again), adapter_name="slot", hotswap=True)
    assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-6)


def test_delta_layouts_follow_a_move():
    """hotswap.layout is kept on the delta (a swap compares ~1000 pairs); moving the delta drops it, so a swap never
    matches a delta by where its tensors used to be."""
    from lorakit.adapter import LoraWeights
    from lorakit.hotswap import layout
    delta = LoraWeights(down=torch.zeros(4, 8), up=torch.zeros(8, 4), alpha=4.0)
    assert layout(delta) == layout(LoraWeights(down=torch.ones(4, 8), up=torch.ones(8, 4), alpha=4.0))
    assert layout(delta) != layout(LoraWeights(down=torch.zeros(4, 8), up=torch.zeros(8, 4), alpha=2.0))
    delta.to(dtype=torch.float16)
    assert layout(delta) == layout(LoraWeights(down=torch.zeros(4, 8, dtype=torch.float16),
                                               up=torch.zeros(8, 4, dtype=torch.float16), alpha=4.0))
    assert delta.leaves() == [delta.down, delta.up]


def _built_by_swaps(monkeypatch) -> list:
    """Calls of build_adapter (each hotswap that built the new file's deltas)."""
    from lorakit import manager as manager_module
    built = []
    real = manager_module.build_adapter
    monkeypatch.setattr(manager_module, "build_adapter", lambda *a, **k: built.append(1) or real(*a, **k))
    return built


@pytest.mark.parametrize(("fmt", "alpha", "copied"), [("peft", 4.0, True), ("kohya", 4.0, True), ("kohya", 2.0, False)])
def test_denoiser_only_hotswap_copies_without_building_deltas(fmt, alpha, copied, tmp_path, monkeypatch):
    """A denoiser-only checkpoint in the format of the full file the adapter came from, with the same alphas, is
    copied into the adapter's tensors by key, without building its deltas (then, the adapter reaching the denoiser
    only, the next one is a same-layout copy); one whose alphas differ builds its deltas. Each result equals a fresh
    load of the file, and the text encoder's weights come back bit-exactly."""
    fam = family("sd15")
    pipe = fam.build()
    base_te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    manager = lorakit.attach(pipe, mode="merge")
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(write(lora_state_dict(pipe, fam, 1, fmt, rank=8, alpha=4.0), tmp_path / "full.safetensors"),
                           adapter_name="slot")
    built = _built_by_swaps(monkeypatch)
    runs = []  # the byte runs the copy took (None: a copy tensor by tensor)
    real_runs = swapping.byte_runs
    monkeypatch.setattr(swapping, "byte_runs", lambda *a: runs.append(real_runs(*a)) or runs[-1])
    for i in range(2):
        unet_only = write(lora_state_dict(pipe, fam, 2 + i, fmt, rank=8, text_encoders=False, alpha=alpha),
                          tmp_path / f"unet{i}.safetensors")
        built.clear()
        pipe.load_lora_weights(unet_only, adapter_name="slot", hotswap=True)
        assert bool(built) == (i == 0 and not copied), (i, built)
        if i == 0 and copied:  # both files read in one piece: a few runs of bytes, not a copy per tensor
            assert len(runs) == 1 and runs[0] is not None and 0 < len(runs[0][0]) < len(fam.text_encoders) + 3
        assert pipe.get_list_adapters() == {"unet": ["slot"]}
        assert all(torch.equal(p, base_te[name]) for name, p in pipe.text_encoder.named_parameters())
        fresh = fam.build()
        lorakit.attach(fresh, mode="merge")
        fresh.load_lora_weights(unet_only, adapter_name="slot")
        assert_close(outputs(pipe, fam), outputs(fresh, fam), atol=1e-6)
    assert manager.adapters["slot"].components == ["unet"]
    kept, rebuilt = manager.adapters["slot"].swap_index, swapping.SwapIndex(manager.adapters["slot"])
    assert (kept.ids, kept.paths, kept.modules) == (rebuilt.ids, rebuilt.paths, rebuilt.modules)  # it left the TE
