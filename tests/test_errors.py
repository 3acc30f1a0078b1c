"""Bad input gets a LoraError that names the file or key, and leaves the pipeline exactly as it was."""

import json
import os
import pickle

import pytest
import torch

import lorakit
from helpers import family, lora_state_dict, outputs, write


@pytest.fixture
def env(tmp_path):
    fam = family("sd15")
    pipe = fam.build()
    lorakit.attach(pipe)
    good = write(lora_state_dict(pipe, fam, 1), tmp_path / "good.safetensors")
    pipe.load_lora_weights(good, adapter_name="good")
    pipe.set_adapters("good", 0.7)
    return fam, pipe, tmp_path


def _state(pipe):
    params = {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
              for k, v in getattr(pipe, c).named_parameters()}
    return params, pipe.get_list_adapters(), pipe.get_active_adapters()


def _assert_unchanged(pipe, before):
    params, listed, active = _state(pipe)
    assert listed == before[1] and active == before[2]
    assert params.keys() == before[0].keys()
    for k, v in params.items():
        assert torch.allclose(v, before[0][k], rtol=0, atol=0, equal_nan=True), f"{k} changed"


def _assert_fails_unchanged(pipe, exc, match, fn):
    before = _state(pipe)
    with pytest.raises(exc, match=match) as info:
        fn()
    assert isinstance(info.value, lorakit.LoraError) and isinstance(info.value, ValueError)
    _assert_unchanged(pipe, before)
    return str(info.value)


def test_missing_path(env):
    _, pipe, tmp = env
    missing = tmp / "nope.safetensors"
    _assert_fails_unchanged(pipe, lorakit.LoraFileError, "nope.safetensors", lambda: pipe.load_lora_weights(str(missing)))


def test_empty_file(env):
    _, pipe, tmp = env
    (tmp / "empty.safetensors").write_bytes(b"")
    _assert_fails_unchanged(pipe, lorakit.LoraFileError, "empty.safetensors.*too short",
           lambda: pipe.load_lora_weights(str(tmp / "empty.safetensors")))


def test_truncated_file(env):
    fam, pipe, tmp = env
    data = (tmp / "good.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _assert_fails_unchanged(pipe, lorakit.LoraFileError, "cut.safetensors.*truncated",
           lambda: pipe.load_lora_weights(str(tmp / "cut.safetensors"), adapter_name="cut"))


def test_corrupt_header(env):
    _, pipe, tmp = env
    body = b"{not json at all"
    (tmp / "bad.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 16)
    _assert_fails_unchanged(pipe, lorakit.LoraFileError, "bad.safetensors.*corrupt",
           lambda: pipe.load_lora_weights(str(tmp / "bad.safetensors")))


def test_keys_matching_nothing(env):
    _, pipe, tmp = env
    sd = {"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 32),
          "unet.no_such_block.to_q.lora_B.weight": torch.zeros(32, 4)}
    path = write(sd, tmp / "nothing.safetensors")
    msg = _assert_fails_unchanged(pipe, lorakit.LoraKeyError, "nothing.safetensors",
                 lambda: pipe.load_lora_weights(path, adapter_name="x"))
    assert "no_such_block" in msg and "strict=False" in msg


def test_one_bad_key_among_good_ones_is_an_error_and_strict_false_loads_the_rest(env):
    fam, pipe, tmp = env
    sd = lora_state_dict(pipe, fam, 2)
    sd["unet.down_blocks.0.attentions.0.typo_proj.lora_A.weight"] = torch.zeros(4, 32)
    sd["unet.down_blocks.0.attentions.0.typo_proj.lora_B.weight"] = torch.zeros(32, 4)
    path = write(sd, tmp / "onebad.safetensors")
    msg = _assert_fails_unchanged(pipe, lorakit.LoraKeyError, "typo_proj", lambda: pipe.load_lora_weights(path, adapter_name="x"))
    assert "onebad.safetensors" in msg
    with pytest.warns(UserWarning, match="typo_proj"):
        pipe.load_lora_weights(path, adapter_name="x", strict=False)
    assert "x" in pipe.get_list_adapters()["unet"]


def test_wrong_shapes_sd15_lora_into_sdxl(env):
    fam, pipe, tmp = env
    sdxl = family("sdxl").build()
    lorakit.attach(sdxl)
    path = write(lora_state_dict(pipe, fam, 3, text_encoders=False), tmp / "sd15.safetensors")
    before = {k: v.clone() for k, v in sdxl.unet.state_dict().items()}
    with pytest.raises(lorakit.LoraError, match="sd15.safetensors") as info:
        sdxl.load_lora_weights(path, adapter_name="wrong")
    assert "another model family" in str(info.value) or "match no module" in str(info.value)
    assert sdxl.get_list_adapters() == {}
    assert all(torch.equal(v, before[k]) for k, v in sdxl.unet.state_dict().items())


def test_shape_mismatch_names_the_key(env):
    fam, pipe, tmp = env
    sd = lora_state_dict(pipe, fam, 4)
    key = next(k for k in sd if k.endswith("attn1.to_q.lora_B.weight"))
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    path = write(sd, tmp / "shape.safetensors")
    msg = _assert_fails_unchanged(pipe, lorakit.LoraShapeError, "shape.safetensors", lambda: pipe.load_lora_weights(path))
    assert "attn1.to_q" in msg and "expected" in msg


def test_nan_weights_with_safe_fusing(env):
    fam, pipe, tmp = env
    sd = lora_state_dict(pipe, fam, 5)
    key = next(k for k in sd if k.endswith("to_k.lora_B.weight"))
    sd[key][0, 0] = float("nan")
    pipe.load_lora_weights(write(sd, tmp / "nan.safetensors"), adapter_name="nan")
    pipe.set_adapters(["good", "nan"], [0.7, 1.0])
    msg = _assert_fails_unchanged(pipe, lorakit.FusingError, "nan", lambda: pipe.fuse_lora(safe_fusing=True))
    assert "to_k" in msg
    assert pipe._lorakit_manager.num_fused_loras == 0


def test_duplicate_adapter_name(env):
    _, pipe, tmp = env
    _assert_fails_unchanged(pipe, lorakit.AdapterError, "'good' is already in use",
           lambda: pipe.load_lora_weights(str(tmp / "good.safetensors"), adapter_name="good"))


def test_unknown_adapter_in_set_adapters(env):
    _, pipe, _ = env
    _assert_fails_unchanged(pipe, lorakit.AdapterError, "missing", lambda: pipe.set_adapters(["good", "missing"], [1.0, 1.0]))


def test_bad_block_name_in_set_adapters(env):
    _, pipe, _ = env
    msg = _assert_fails_unchanged(pipe, lorakit.LoraError, "block_7",
                 lambda: pipe.set_adapters("good", {"unet": {"up": {"block_7": 0.5}}}))
    assert "up_blocks" in msg


def test_unknown_component_in_weights(env):
    _, pipe, _ = env
    _assert_fails_unchanged(pipe, lorakit.LoraError, "text_encoder_2", lambda: pipe.set_adapters("good", {"text_encoder_2": 0.5}))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["LORAKIT_MARKER"],))


def test_pickle_is_refused_and_never_runs_code(env, monkeypatch):
    _, pipe, tmp = env
    marker = tmp / "pwned"
    monkeypatch.setenv("LORAKIT_MARKER", str(marker))
    path = tmp / "evil.bin"
    with open(path, "wb") as fh:
        pickle.dump({"unet.x.lora_A.weight": _Evil()}, fh)
    _assert_fails_unchanged(pipe, lorakit.LoraFileError, "evil.bin.*allow_pickle", lambda: pipe.load_lora_weights(str(path)))
    _assert_fails_unchanged(pipe, lorakit.LoraFileError, "evil.bin.*refused to unpickle",
           lambda: pipe.load_lora_weights(str(path), allow_pickle=True))
    assert not marker.exists()


def test_plain_pickle_loads_with_opt_in(env):
    fam, pipe, tmp = env
    path = tmp / "plain.bin"
    torch.save(lora_state_dict(pipe, fam, 6), path)
    pipe.load_lora_weights(str(path), adapter_name="plain", allow_pickle=True)
    assert "plain" in pipe.get_list_adapters()["unet"]


def test_errors_leave_outputs_unchanged(env):
    fam, pipe, tmp = env
    want = outputs(pipe, fam)
    with pytest.raises(lorakit.LoraError):
        pipe.load_lora_weights(str(tmp / "missing.safetensors"))
    got = outputs(pipe, fam)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_header_size_disagrees_with_shape(env):
    _, pipe, tmp = env
    body = json.dumps({"unet.a.lora_A.weight": {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 64]}}).encode()
    (tmp / "short.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 64)
    _assert_fails_unchanged(pipe, lorakit.LoraFileError, "short.safetensors.*lora_A.*64 bytes",
           lambda: pipe.load_lora_weights(str(tmp / "short.safetensors")))
