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
    base = family("sd15").build(dtype).unet
    for pipe in pipes:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        for name, p in pipe.unet.named_parameters():
            assert torch.equal(p, base.get_parameter(name)), name
