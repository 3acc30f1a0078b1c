"""safetensors headers: parsed with column-wise checks, the entry at fault named; repeated headers parsed once."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lorakit.errors import LoraFileError
from lorakit.io import read_safetensors_header


def _raw_file(path, header: dict, data_len: int) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))


def test_header_matches_safetensors_own_reading(tmp_path):
    tensors = {"b": torch.zeros(3, 4, dtype=torch.float16), "a": torch.ones(2, dtype=torch.float32),
               "s": torch.tensor(1.5), "i": torch.zeros(2, 2, dtype=torch.int8)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    infos, meta = read_safetensors_header(path)
    assert meta == {"format": "pt"} and set(infos) == set(tensors)
    data = path.read_bytes()
    start = 8 + struct.unpack("<Q", data[:8])[0]
    for key, t in tensors.items():
        dtype, shape, (lo, hi) = infos[key]
        assert (dtype, shape) == (t.dtype, tuple(t.shape))
        assert torch.equal(torch.frombuffer(bytearray(data[start + lo:start + hi]), dtype=dtype).reshape(shape), t)
    again, _ = read_safetensors_header(path)  # the same bytes: a kept parse, as a new dict
    assert again == infos and again is not infos


GOOD = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("bad,match", [
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32, 48]}, "corrupt header entry for key 'bad'"),
    ({"dtype": "F32", "shape": [2, True], "data_offsets": [16, 24]}, "corrupt header entry for key 'bad'"),
    ({"dtype": "F32", "shape": [2.0, 2], "data_offsets": [16, 32]}, "corrupt header entry for key 'bad'"),
    ({"dtype": "X9", "shape": [2, 2], "data_offsets": [16, 32]}, "corrupt header entry for key 'bad'"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 28]}, "tensor 'bad' has shape"),
    ({"dtype": "F32", "shape": [4, 2], "data_offsets": [16, 48]}, "tensor 'bad' lies at bytes 16..48"),
    ({"dtype": "F32", "shape": [-2, 2], "data_offsets": [32, 16]}, "tensor 'bad' lies at bytes 32..16"),
])
def test_bad_entry_is_named(tmp_path, bad, match):
    path = tmp_path / "bad.safetensors"
    _raw_file(path, {"good": GOOD, "bad": bad}, 32)
    with pytest.raises(LoraFileError, match=match):
        read_safetensors_header(path)


def test_kohya_data_section_relaid_out_aligned(tmp_path):
    """Kohya files interleave 2-byte alphas with the factors: on CUDA the section is relaid out so every tensor
    sits at a multiple of 32 bytes (the merge kernel's vectorised loads), with the same values."""
    from lorakit.io import ALIGN_BYTES, BufferViews, aligned_layout, relayout
    torch.manual_seed(0)
    sd = {}
    for i in range(5):
        sd[f"m{i}.alpha"] = torch.tensor(4.0, dtype=torch.float16)
        sd[f"m{i}.lora_down.weight"] = torch.randn(8, 24).half()
        sd[f"m{i}.lora_up.weight"] = torch.randn(40, 8).half()
    sd["z.odd"] = torch.randn(3).half()
    path = tmp_path / "k.safetensors"
    save_file(sd, str(path))
    infos, _ = read_safetensors_header(path)
    assert any(info.offsets[0] % ALIGN_BYTES for info in infos.values())
    moved = aligned_layout(infos)
    raw = path.read_bytes()
    section = torch.frombuffer(bytearray(raw[8 + struct.unpack("<Q", raw[:8])[0]:]), dtype=torch.uint8)
    out = relayout(section, infos, moved)
    views = BufferViews(out, infos, moved)
    for key, want in sd.items():
        assert (views[key].data_ptr() - out.data_ptr()) % ALIGN_BYTES == 0, key
        assert torch.equal(views[key], want), key
    aligned = tmp_path / "a.safetensors"  # PEFT files (no alphas, sizes of 16k elements) need no relayout
    save_file({k: v for k, v in sd.items() if k.endswith("weight")}, str(aligned))
    assert aligned_layout(read_safetensors_header(aligned)[0]) is None


def test_buffer_views_are_single_views_at_the_right_bytes():
    """A file's tensors are views into its data section, one tensor object each, at their byte ranges, also when
    the section is itself a view at an offset; a tensor off its dtype's alignment is copied instead."""
    from lorakit.io import BufferViews, TensorInfo
    whole = torch.arange(80, dtype=torch.uint8)
    section = whole[8:]
    infos = {"a": TensorInfo(torch.float16, (2, 3), (4, 16)), "b": TensorInfo(torch.float32, (2,), (16, 24)),
             "odd": TensorInfo(torch.float16, (2,), (25, 29))}
    views = BufferViews(section, infos)
    for key, (dtype, shape, (start, end)) in infos.items():
        got = views[key]
        assert torch.equal(got, section[start:end].clone().view(dtype).view(shape)), key
        if key != "odd":
            assert got.data_ptr() == section[start:].data_ptr() and got._base is not None and got._base._base is None
    assert views["odd"].data_ptr() != section[25:].data_ptr()
