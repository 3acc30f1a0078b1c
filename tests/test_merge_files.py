"""Extract, resize and the merge/resize/extract CLI: written files load the same in lorakit and diffusers+PEFT."""

import copy

import pytest
import torch
from helpers import assert_close, family, lora_state_dict, outputs, pair, write
from safetensors.torch import save_file

from lorakit import merge as M
from lorakit.cli import EXIT_BAD_INPUT, EXIT_OK, main
from lorakit.extraction import extract_lora
from lorakit.lorafiles import read_lora_file, write_lora_file
from lorakit.merging import resize_adapter

FAM = family("sd15")
PERTURBED = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 2,
             "down_blocks.1.resnets.0.conv1": 3, "down_blocks.1.resnets.0.conv_shortcut": 1}


def perturbed_unet(unet, seed=0):
    """A copy of ``unet`` whose PERTURBED layers get a known low-rank delta; returns it and the deltas."""
    tuned = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for path, r in PERTURBED.items():
        w = tuned.get_submodule(path).weight
        d = (torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w[0].numel(), generator=g) * 0.05)
        deltas[path] = d.reshape(w.shape)
        w.data += deltas[path]
    return tuned, deltas


def test_extract_recovers_a_low_rank_finetune_in_lorakit_and_diffusers(tmp_path):
    ref, ours = pair(FAM)
    tuned, deltas = perturbed_unet(ref.unet)
    lora, report = extract_lora(tuned, ref.unet, rank=4, conv_rank=3, namespace="unet")
    assert set(lora.layers["unet"]) == set(PERTURBED)  # unchanged layers are left out
    for path, want in deltas.items():
        got = lora.layers["unet"][path].delta(tuple(want.shape))
        assert (got - want).norm() / want.norm() < 1e-4, path
    assert report.max_error < 1e-5
    path = write_lora_file(lora, tmp_path / "x.safetensors")
    want = tuned(**_inputs(tuned), return_dict=False)[0]
    for pipe in (ref, ours):
        pipe.load_lora_weights(str(path), adapter_name="x")
        got = pipe.unet(**_inputs(pipe.unet), return_dict=False)[0]
        assert (got - want).abs().max() < 1e-4


def _inputs(model):
    from helpers import denoiser_inputs

    return denoiser_inputs(model)


def test_cli_extract_from_folders_and_files(tmp_path):
    base = FAM.build().unet
    tuned, _ = perturbed_unet(base)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "ext.safetensors"
    code = main(["extract", str(tmp_path / "tuned"), str(tmp_path / "base"), "--rank", "3", "--namespace", "unet",
                 "-o", str(out), "--layers"])
    assert code == EXIT_OK
    assert set(read_lora_file(out).adapter.layers["unet"]) == set(PERTURBED)
    save_file(tuned.state_dict(), str(tmp_path / "t.safetensors"))
    save_file(base.state_dict(), str(tmp_path / "b.safetensors"))
    lora, _ = extract_lora(tmp_path / "t.safetensors", tmp_path / "b.safetensors", rank=3)
    assert set(lora.layers[""]) == set(PERTURBED)
    assert main(["extract", str(tmp_path / "t.safetensors"), str(tmp_path / "nope"), "--rank", "2",
                 "-o", str(out)]) == EXIT_BAD_INPUT


def test_resize_rank_and_energy_report_the_exact_error(tmp_path):
    sd = lora_state_dict(FAM.build(), FAM, 1, rank=6, convs=True, alpha=3.0, text_encoders=False)
    adapter = read_lora_file(write(sd, tmp_path / "a.safetensors")).adapter
    same, report = resize_adapter(adapter, rank=6)
    assert report.max_error < 1e-5
    small, report = resize_adapter(adapter, rank=2)
    for m in report.modules:
        comp, path = m.component, m.path
        d = adapter.layers[comp][path]
        shape = tuple(d.up.shape[:1]) + tuple(d.down.shape[1:])
        full = d.delta(shape).reshape(shape[0], -1)
        S = torch.linalg.svdvals(full)
        approx = small.layers[comp][path].delta(shape).reshape(shape[0], -1)
        assert m.rank == 2 and abs(m.error - M.relative_error(S, 2)) < 1e-5
        assert abs((full - approx).norm() / full.norm() - m.error) < 1e-4
        assert torch.allclose(same.layers[comp][path].delta(shape), d.delta(shape), atol=1e-6)
    _, report = resize_adapter(adapter, energy=0.9)
    for m in report.modules:
        d = adapter.layers[m.component][m.path]
        S = torch.linalg.svdvals(d.delta(tuple(d.up.shape[:1]) + tuple(d.down.shape[1:])).reshape(d.up.shape[0], -1))
        kept = (S[: m.rank] ** 2).sum() / (S ** 2).sum()
        assert kept >= 0.9 - 1e-6 and (m.rank == 1 or (S[: m.rank - 1] ** 2).sum() / (S ** 2).sum() < 0.9)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_cli_merge_and_resize_files_load_the_same_in_lorakit_and_diffusers(tmp_path, fmt):
    ref, ours = pair(FAM)
    a = write(lora_state_dict(ref, FAM, 1, fmt=fmt, alpha=2.0), tmp_path / "a.safetensors")
    b = write(lora_state_dict(ref, FAM, 2, fmt=fmt), tmp_path / "b.safetensors")
    out = tmp_path / "mix.safetensors"
    assert main(["merge", a, b, "--weights", "0.7", "0.8", "--method", "ties", "--density", "0.5",
                 "-o", str(out)]) == EXIT_OK
    # the same merge through the pipeline API gives the same outputs
    ours.load_lora_weights(a, adapter_name="a")
    ours.load_lora_weights(b, adapter_name="b")
    ours.add_weighted_adapter(["a", "b"], [0.7, 0.8], "mix", "ties", density=0.5)
    ours.set_adapters("mix")
    want = outputs(ours, FAM)
    ref.load_lora_weights(str(out), adapter_name="mix")
    assert_close(outputs(ref, FAM), want, atol=1e-5, what="diffusers+PEFT")
    small = tmp_path / "small.safetensors"
    assert main(["resize", str(out), "--rank", "2", "-o", str(small)]) == EXIT_OK
    ref.load_lora_weights(str(small), adapter_name="small")
    ours.load_lora_weights(str(small), adapter_name="small")
    assert_close(outputs(ours, FAM), outputs(ref, FAM), atol=1e-5, what="resized")


def test_cli_bad_input_exit_codes(tmp_path, capsys):
    pipe = FAM.build()
    a = write(lora_state_dict(pipe, FAM, 1, rank=4), tmp_path / "a.safetensors")
    c = write(lora_state_dict(pipe, FAM, 3, rank=2), tmp_path / "c.safetensors")
    k = write(lora_state_dict(pipe, FAM, 4, fmt="kohya"), tmp_path / "k.safetensors")
    out = str(tmp_path / "o.safetensors")
    assert main(["merge", a, c, "--method", "ties", "--density", "0.5", "-o", out]) == EXIT_BAD_INPUT
    assert "ties_svd" in capsys.readouterr().err.replace("\n", "")
    assert main(["merge", a, k, "-o", out]) == EXIT_BAD_INPUT
    assert main(["merge", a, c, "--method", "cat", "--weights", "1", "-o", out]) == EXIT_BAD_INPUT
    assert main(["merge", a, c, "--method", "average", "-o", out]) == 2  # argparse usage error
    assert main(["resize", a, "--rank", "2", "--energy", "0.5", "-o", out]) == 2
    assert main(["merge", a, c, "--method", "ties_svd", "--density", "0.5", "-o", out]) == EXIT_OK
