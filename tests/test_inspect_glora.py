"""``lorakit inspect`` on GLoRA: a square layer's factors fit the old and the new layout, whose ranks differ; without
the model both are reported, and loading into the model settles the layout (and the rank)."""

import torch
from helpers import family, write

import lorakit
from lorakit.cli import main
from lorakit.inspection import inspect_file

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 -> 32
PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _glora(old: bool, out: int, inp: int, r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = ({"a1": (r, inp), "a2": (inp, r), "b1": (r, inp), "b2": (out, r)} if old else
              {"a1": (inp, r), "a2": (r, inp), "b1": (out, r), "b2": (r, inp)})
    sd = {f"{KEY}.{k}.weight": torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    sd[f"{KEY}.alpha"] = torch.tensor(2.0)
    return sd


def test_inspect_reports_both_ranks_when_the_layout_needs_the_model(tmp_path, capsys):
    cases = {("new", 32, 32): "4 or 32", ("old", 32, 32): "32 or 4", ("new", 64, 32): 4, ("old", 64, 32): 4}
    for (layout, out, inp), want in cases.items():
        path = write(_glora(layout == "old", out, inp), tmp_path / f"{layout}_{out}.safetensors")
        report = inspect_file(path)
        assert [m.rank for m in report.modules] == [want], (layout, out)
        assert report.ranks == {want: 1}
    assert main(["inspect", str(tmp_path / "old_32.safetensors")]) == 0
    assert "32 or 4" in capsys.readouterr().out


def test_loading_settles_the_square_layout(tmp_path):
    for old in (False, True):
        pipe = family("sd15").build()
        manager = lorakit.attach(pipe)
        pipe.load_lora_weights(write(_glora(old, 32, 32), tmp_path / f"g{old}.safetensors"), adapter_name="g")
        delta = manager.adapters["g"].layers["unet"][PATH]
        assert (delta.old, delta.rank) == (old, 4)
