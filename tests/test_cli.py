"""The ``lorakit`` command: ``inspect`` on the three real sample files, error exits, and the embedded ``demo``.

Expected numbers were checked by hand against the raw safetensors headers (json of the first 8+n bytes):
LoKr: 1750 tensors = 350 modules x (alpha + w1_a, w1_b, w2_a, w2_b), 72 under ``lora_te_`` (12 CLIP layers x
q/k/v/out/fc1/fc2) and 278 under ``lora_unet_``, every ``lokr_w2_b`` of 4 rows, fp16, ``ss_network_alpha`` 4.0.
The two diffusers files: 256 fp32 tensors = 128 rank-4 modules (16 UNet transformer blocks x q/k/v/out x 2 attns).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.inspection import inspect_file

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples"
LOKR = SAMPLES / "sd15_kohya_lycoris_lokr_r4.safetensors"
LEGACY = SAMPLES / "sd15_diffusers_processor_legacy.safetensors"
UNET = SAMPLES / "sd15_diffusers_unet_lora.safetensors"


def _sample(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"sample file {path} not present")
    return path


def test_inspect_lokr_sample():
    r = inspect_file(_sample(LOKR))
    assert (r.format, r.algorithms, r.num_modules) == ("lycoris", {"lokr": 350}, 350)
    assert r.ranks == {4: 350} and r.alphas == [4.0] and r.alpha_note == "from .alpha keys"
    assert r.components == {"unet": 278, "text_encoder": 72}
    assert r.dtypes == {"float16": 1750} and r.num_tensors == 1750
    assert r.family == "sd1"  # attn2.to_k LoKr product is [320, 768]: SD1's CLIP-L width
    assert r.metadata["ss_network_module"] == "lycoris.kohya" and len(r.metadata) == 61
    assert r.unused == [] and r.embeddings == []


@pytest.mark.parametrize("path, fmt, component", [(LEGACY, "diffusers_legacy", None), (UNET, "diffusers", "unet")])
def test_inspect_diffusers_samples(path, fmt, component):
    r = inspect_file(_sample(path))
    assert (r.format, r.algorithms, r.ranks) == (fmt, {"lora": 128}, {4: 128})
    assert r.components == {component: 128}
    assert r.alphas == [] and r.alpha_text() == "none (scale 1)"
    assert (r.dtypes, r.num_params, r.family) == ({"float32": 256}, 797_184, "sd1")


@pytest.mark.parametrize("path", [LOKR, LEGACY, UNET], ids=lambda p: p.stem)
def test_cli_inspect_table_and_json(path, capsys):
    path = _sample(path)
    assert main(["inspect", str(path), "--keys"]) == 0
    table = capsys.readouterr().out
    assert "format" in table and "Modules" in table
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["path"] == str(path) and data["size_bytes"] == path.stat().st_size
    assert data["num_modules"] == sum(data["components"].values())


def test_cli_inspect_json_keys_lists_modules(capsys):
    assert main(["inspect", str(_sample(LEGACY)), "--json", "--keys"]) == 0
    modules = json.loads(capsys.readouterr().out)["modules"]
    assert len(modules) == 128 and {m["component"] for m in modules} == {"(model)"}
    assert modules[0]["key"].endswith("attn1.to_k") and modules[0]["rank"] == 4


def test_cli_missing_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope" / "missing.safetensors"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_cli_corrupt_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(os.urandom(20))
    assert main(["inspect", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_cli_usage_errors_exit_2(capsys):
    assert main(["inspect"]) == 2
    assert main(["demo", "--lora", "x.safetensors"]) == 2  # --lora needs --model
    assert "--model" in capsys.readouterr().err


def test_cli_demo_default_all_checks_pass(monkeypatch, capsys):
    # One demo run (it is the slow part): through main(), keeping the records run_default_demo returns.
    import lorakit.demo as demo

    runs: list = []
    original = demo.run_default_demo
    monkeypatch.setattr(demo, "run_default_demo", lambda **kw: runs.append(original(**kw)) or runs[-1])
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "checks passed" in out
    records = runs[0]
    checks = {r.name: r.check for r in records if r.check is not None}
    assert all(checks.values()), checks
    for name in ("unfuse_lora exact", "disable_lora exact", "enable_lora exact", "save_lora_adapter + reload exact",
                 "unload_lora_weights exact", "call-time scale gone", "write synthetic LoRA files"):
        assert checks.get(name) is True, name
    assert sum(1 for r in records if r.run_ms) >= 10  # the pipeline ran after each change
