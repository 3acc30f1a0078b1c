"""Recycled host memory (lorakit.hostmem): a freed buffer is reused only once nothing can see it, the list is
bounded, and CPU loads after an unload run on the recycled read buffers and pools with results equal to
diffusers+PEFT."""

import pytest
import torch
from helpers import assert_close, family, lora_state_dict, outputs, pair, write

from lorakit import hostmem


@pytest.fixture
def recycler(monkeypatch):
    """Every request recycled (tiny models' buffers included), starting from an empty list."""
    monkeypatch.setattr(hostmem, "MIN_BYTES", 0)
    monkeypatch.setattr(hostmem, "LIMIT_BYTES", 1 << 30)
    hostmem.release()
    yield
    hostmem.release()


def test_a_dead_buffer_is_reused_and_a_viewed_one_is_not(recycler):
    first = hostmem.empty(100_000)
    assert first.dtype == torch.uint8 and first.shape == (100_000,) and first.data_ptr() % 64 == 0
    ptr = first.data_ptr()
    view = first[10:20]
    del first
    assert hostmem.held_bytes() == 0  # a view still sees the block
    other = hostmem.empty(100_000)
    assert other.data_ptr() != ptr
    del view
    assert hostmem.held_bytes() >= 100_000
    again = hostmem.empty(90_000)  # fits (at most 2x the size): the same block
    assert again.data_ptr() == ptr and hostmem.held_bytes() == 0
    del other, again


def test_no_block_more_than_twice_the_request(recycler):
    big = hostmem.empty(1_000_000)
    ptr = big.data_ptr()
    del big
    small = hostmem.empty(100_000)
    assert small.data_ptr() != ptr and hostmem.held_bytes() >= 1_000_000


def test_typed_buffers_and_the_bound(recycler, monkeypatch):
    t = hostmem.empty_typed((3, 1000), torch.float16)
    assert t.shape == (3, 1000) and t.dtype == torch.float16 and t.is_contiguous()
    t.fill_(1.5)
    assert float(t.sum()) == 4500.0
    monkeypatch.setattr(hostmem, "LIMIT_BYTES", 250_000)
    blocks = [hostmem.empty(100_000) for _ in range(3)]
    ptrs = [b.data_ptr() for b in blocks]
    while blocks:
        blocks.pop(0)  # back in order: the first, oldest, is dropped to stay under the bound
    assert 200_000 <= hostmem.held_bytes() <= 250_000
    taken = [hostmem.empty(100_000) for _ in range(2)]
    assert {t.data_ptr() for t in taken} == set(ptrs[1:])
    del taken
    assert hostmem.release() >= 200_000 and hostmem.held_bytes() == 0


def test_recycling_off(monkeypatch):
    monkeypatch.setattr(hostmem, "LIMIT_BYTES", 0)
    hostmem.release()
    t = hostmem.empty(1 << 20)
    del t
    assert hostmem.held_bytes() == 0


@torch.no_grad()
def test_loads_after_unload_run_on_recycled_memory_and_match_peft(recycler, tmp_path):
    fam = family("sd15")
    ref, ours = pair(fam, mode="branch")
    files = [write(lora_state_dict(ours, fam, seed, rank=4), tmp_path / f"{seed}.safetensors") for seed in (1, 2)]
    for p in (ref, ours):
        p.load_lora_weights(files[0], adapter_name="a")
        p.load_lora_weights(files[1], adapter_name="b")
        p.set_adapters(["a", "b"], [0.7, -0.4])
    expected = outputs(ref, fam)
    assert_close(outputs(ours, fam), expected)
    ours.unload_lora_weights()
    held = hostmem.held_bytes()
    assert held > 0  # the read buffers and pools of both adapters (no kept plan holds a file's data)
    for name, path in zip("ab", files):
        ours.load_lora_weights(path, adapter_name=name)
    assert hostmem.held_bytes() < held  # the loads took recycled blocks
    ours.set_adapters(["a", "b"], [0.7, -0.4])
    assert_close(outputs(ours, fam), expected)
