"""The benchmark's --quick path, in process: every op is timed on both systems and the checks pass.

Run: python -m pytest -q tests/test_bench_quick.py
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _load_bench() -> ModuleType:
    """benchmarks/bench.py as a module (registered first: dataclasses look their module up in sys.modules)."""
    if "lorakit_bench" in sys.modules:
        return sys.modules["lorakit_bench"]
    spec = importlib.util.spec_from_file_location("lorakit_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lorakit_bench"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    bench = _load_bench()
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    # One thread: a CPU shared with other jobs makes multi-threaded ops stall; main() restores the setting.
    returned = bench.main(["--quick", "--model", "sdxl", "--device", "cpu", "--threads", "1", "--json", str(path)])
    assert torch.get_num_threads() == threads
    written = json.loads(path.read_text())
    assert written["status"] == returned["status"]
    return written


def test_run_completed(result: dict) -> None:
    assert result["error"] is None, result["error"]
    assert result["status"] == "ok", result["failed_ops"]
    assert result["meta"]["identical_weights"] is True


def test_every_op_has_numbers_for_both_systems(result: dict) -> None:
    bench = _load_bench()
    assert set(bench.ALL_OPS) <= set(result["ops"]), set(bench.ALL_OPS) - set(result["ops"])
    for op, row in result["ops"].items():
        for key in ("peft_ms", "lorakit_ms", "speedup_peft_over_lorakit"):
            value = row[key]
            assert isinstance(value, float) and math.isfinite(value), f"{op}: {key} = {value!r}"
        assert not row["errors"], f"{op}: {row['errors']}"


def test_outputs_match_peft(result: dict) -> None:
    expected = {"base (no adapters)", "1 adapter", "call-time scale", "2 adapters, weighted", "4 adapters, weighted",
                "2 adapters fused", "after hotswap", "after hotswap, denoiser-only"}
    assert expected <= set(result["checks"])
    for key, check in result["checks"].items():
        assert not check["non_finite"], key
        assert check["denoiser"] is not None and check["denoiser"] < 1e-4, f"{key}: {check}"
        assert check["text_encoders"] is None or check["text_encoders"] < 1e-4, f"{key}: {check}"
        if key != "base (no adapters)":
            assert check["lora_effect"] > 1e-2, f"{key}: the LoRA had no visible effect"


def test_lorakit_restores_base_bit_exactly(result: dict) -> None:
    for key in ("after unfuse", "after unload"):
        entry = result["restore"][key]["lorakit"]
        assert entry["exact"] is True and entry["max_abs_diff"] == 0.0, (key, entry)
        assert "exact" in result["restore"][key]["peft"]


def test_hotswap_notes(result: dict) -> None:
    assert result["notes"]["hotswap_peft_full_file"].startswith("refused")
    assert "text_encoder" in result["notes"]["hotswap_lorakit"]
