"""Sources: a file, a folder + weight_name, a hub repo id through huggingface_hub's cache, a dict of tensors."""

import shutil

import pytest

import lorakit
from helpers import assert_close, family, lora_state_dict, outputs, write


@pytest.fixture
def env(tmp_path):
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe)
    path = write(lora_state_dict(pipe, fam, 1), tmp_path / "my_lora.safetensors")
    pipe.load_lora_weights(path, adapter_name="file")
    want = outputs(pipe, fam)
    pipe.delete_adapters("file")
    return fam, pipe, tmp_path, path, want


def _fake_hub_cache(cache, repo, filename, src):
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/<file>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(src, root / "snapshots" / commit / filename)


def test_folder_with_weight_name_and_default_name(env):
    fam, pipe, tmp, path, want = env
    pipe.load_lora_weights(str(tmp), weight_name="my_lora.safetensors", adapter_name="folder")
    assert_close(outputs(pipe, fam), want, atol=0.0)
    with pytest.raises(lorakit.LoraFileError, match="weight_name"):
        (tmp / "second.safetensors").write_bytes((tmp / "my_lora.safetensors").read_bytes())
        pipe.load_lora_weights(str(tmp), adapter_name="ambiguous")


def test_hub_repo_id_from_cache_offline(env):
    fam, pipe, tmp, path, want = env
    cache = tmp / "hub"
    _fake_hub_cache(cache, "someone/style-lora", "pytorch_lora_weights.safetensors", path)
    pipe.load_lora_weights("someone/style-lora", adapter_name="hub", cache_dir=str(cache), local_files_only=True)
    assert_close(outputs(pipe, fam), want, atol=0.0)


def test_hub_repo_missing_offline_is_a_clear_error(env):
    _, pipe, tmp, _, _ = env
    with pytest.raises(lorakit.LoraFileError, match="nobody/nothing"):
        pipe.load_lora_weights("nobody/nothing", weight_name="x.safetensors", cache_dir=str(tmp / "empty"),
                               local_files_only=True)


def test_dict_source_is_not_modified(env):
    fam, pipe, _, _, want = env
    sd = lora_state_dict(pipe, fam, 1)
    keys = list(sd)
    pipe.load_lora_weights(sd, adapter_name="dict")
    assert list(sd) == keys
    assert_close(outputs(pipe, fam), want, atol=1e-7)


def test_model_level_load_ignores_other_components_keys(env):
    fam, pipe, _, path, _ = env
    pipe.text_encoder.load_lora_adapter(path, adapter_name="te_only")
    assert pipe.get_list_adapters() == {"text_encoder": ["te_only"]}
    pipe.unet.load_lora_adapter(path, prefix="unet", adapter_name="unet_only")
    assert pipe.get_list_adapters() == {"unet": ["unet_only"], "text_encoder": ["te_only"]}


def test_bare_model_attach(env):
    fam, pipe, _, path, _ = env
    unet = family("sd15").build().unet
    lorakit.attach(unet)
    unet.load_lora_adapter(path, prefix="unet", adapter_name="a")
    unet.set_adapters(["a"], weights=[0.5])
    assert unet.active_adapters() == ["a"]
    unet.fuse_lora(lora_scale=1.0)
    unet.unfuse_lora()
    unet.unload_lora()
    assert unet.get_list_adapters() == {"unet": []}


def test_one_copy_reader_matches_safetensors(tmp_path):
    """The one-read reader (parallel reads of the data section, tensors as views) gives safetensors' tensors bit for bit, whatever
    the dtypes and alignment; exercised here with a CPU destination."""
    import torch
    from safetensors.torch import load_file, save_file

    from lorakit.io import open_source

    g = torch.Generator().manual_seed(0)
    sd = {"odd_bytes": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),
          "half": torch.randn(7, generator=g).half(), "bf16": torch.randn(2, 3, generator=g).bfloat16(),
          "f32": torch.randn(3, 5, generator=g), "i64": torch.arange(5), "conv": torch.randn(4, 4, 1, 1, generator=g)}
    path = tmp_path / "mixed.safetensors"
    save_file(sd, str(path))
    got = open_source(str(path))._read_in_one_copy(torch.device("cpu"))
    want = load_file(str(path))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_parallel_read_of_a_byte_range(tmp_path, monkeypatch):
    """fastread splits a range over its reader threads (uneven parts here) and returns exactly those bytes."""
    import torch

    from lorakit import fastread

    data = bytes(range(256)) * 41 + b"tail"
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    fastread.release()
    monkeypatch.setattr(fastread, "THREADS", 3)
    for start, length in ((0, len(data)), (7, 1000), (len(data) - 5, 5), (3, 0)):
        got = fastread.read_to_device(path, start, length, torch.device("cpu"))
        assert bytes(got.tolist()) == data[start:start + length]
    fastread.release()


def test_reads_work_in_a_forked_child(tmp_path):
    """The reader threads do not survive a fork: a child process reads with threads of its own (no hang)."""
    import multiprocessing

    import torch

    from lorakit import fastread

    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(200)) * 50)
    fastread.read_to_device(path, 0, 10_000, torch.device("cpu"))  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_read_in_child, args=(str(path),))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the child could not read (or hung)"


def _read_in_child(path: str) -> None:
    import torch

    from lorakit import fastread

    got = fastread.read_to_device(path, 100, 500, torch.device("cpu"))
    raise SystemExit(0 if bytes(got.tolist()) == (bytes(range(200)) * 50)[100:600] else 1)


def test_reads_without_preadv(tmp_path, monkeypatch):
    """Platforms without os.preadv (Windows) read the range with one positioned read."""
    import os

    import torch

    from lorakit import fastread

    data = bytes(range(256)) * 8
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    monkeypatch.delattr(os, "preadv")
    got = fastread.read_to_device(path, 13, 1500, torch.device("cpu"))
    assert bytes(got.tolist()) == data[13:1513]
