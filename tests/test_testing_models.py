"""Tests for lorakit.testing.models: seeded random diffusers pipelines and models."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from torch import nn

from lorakit.testing.models import (
    CLIP_VOCAB_SIZE,
    TINY_VOCAB_SIZE,
    clip_tokenizer,
    flux_transformer,
    randomize_,
    sd15_pipeline,
    sd15_text_encoder,
    sd15_unet,
    sdxl_text_encoders,
    sdxl_unet,
    t5_tokenizer,
    tiny_flux_pipeline,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)

ModuleT = TypeVar("ModuleT", bound=nn.Module)

BUILD_TIME_LIMIT_S = 15.0
PROMPT = "a photo of an astronaut riding a horse"

TINY_BUILDERS: dict[str, Callable[..., DiffusionPipeline]] = {
    "sd15": tiny_sd15_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "flux": tiny_flux_pipeline,
}
TINY_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "sd15": {},
    "sdxl": {"height": 64, "width": 64},
    "flux": {"height": 32, "width": 32, "max_sequence_length": 16},
}


def _generate(pipe: DiffusionPipeline, kind: str) -> np.ndarray:
    """Run ``pipe`` for two steps with a fixed generator and return the images."""
    result = pipe(
        PROMPT,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **TINY_CALL_KWARGS[kind],
    )
    return result.images


def _modules(pipe: DiffusionPipeline) -> dict[str, nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, nn.Module)}


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _timed(build: Callable[[], ModuleT]) -> tuple[ModuleT, float]:
    """Build a model; return it with the smaller of its wall and CPU seconds.

    Wall time grows when other processes share the machine and CPU time when
    the fill threads run in parallel; the minimum is robust to both while
    still catching a slow build.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    model = build()
    return model, min(time.perf_counter() - wall, time.process_time() - cpu)


# --------------------------------------------------------------------------- #
# Tiny pipelines
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module", params=sorted(TINY_BUILDERS))
def tiny(request: pytest.FixtureRequest) -> tuple[str, DiffusionPipeline]:
    kind: str = request.param
    return kind, TINY_BUILDERS[kind](seed=0)


def test_tiny_pipeline_runs_end_to_end(tiny: tuple[str, DiffusionPipeline]) -> None:
    kind, pipe = tiny
    images = _generate(pipe, kind)
    side = TINY_CALL_KWARGS[kind].get("height", 64)
    assert images.shape == (1, side, side, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0.01  # not a constant image


def test_tiny_pipeline_is_deterministic(tiny: tuple[str, DiffusionPipeline]) -> None:
    kind, pipe = tiny
    np.testing.assert_array_equal(_generate(pipe, kind), _generate(TINY_BUILDERS[kind](seed=0), kind))


def test_same_seed_gives_identical_weights(tiny: tuple[str, DiffusionPipeline]) -> None:
    kind, pipe = tiny
    again = TINY_BUILDERS[kind](seed=0)
    for name, module in _modules(pipe).items():
        other = _modules(again)[name]
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, other.state_dict()[key]), f"{name}.{key}"


def test_different_seed_gives_different_weights(tiny: tuple[str, DiffusionPipeline]) -> None:
    kind, pipe = tiny
    other = TINY_BUILDERS[kind](seed=1)
    for name, module in _modules(pipe).items():
        theirs = dict(_modules(other)[name].named_parameters())
        for key, param in module.named_parameters():
            if param.ndim >= 2:
                assert not torch.equal(param, theirs[key]), f"{name}.{key}"


def test_components_with_equal_shapes_differ() -> None:
    pipe = tiny_sdxl_pipeline(seed=0)
    a = pipe.text_encoder.embeddings.token_embedding.weight
    b = pipe.text_encoder_2.text_model.embeddings.token_embedding.weight
    assert a.shape == b.shape
    assert not torch.equal(a, b)


def test_tiny_sd15_unet_has_every_block_kind() -> None:
    unet = tiny_sd15_pipeline().unet
    assert hasattr(unet.down_blocks[0], "attentions")
    assert not hasattr(unet.down_blocks[1], "attentions")
    assert hasattr(unet.mid_block, "attentions")
    assert not hasattr(unet.up_blocks[0], "attentions")
    assert hasattr(unet.up_blocks[1], "attentions")


def test_tiny_sdxl_unet_matches_text_encoders() -> None:
    pipe = tiny_sdxl_pipeline()
    config = pipe.unet.config
    assert config.cross_attention_dim == 64
    assert config.addition_embed_type == "text_time"
    assert config.projection_class_embeddings_input_dim == 8 * 6 + pipe.text_encoder_2.config.projection_dim


def test_dtype_is_applied_to_every_tensor() -> None:
    pipe = tiny_flux_pipeline(dtype=torch.bfloat16)
    for name, module in _modules(pipe).items():
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                assert tensor.dtype == torch.bfloat16, f"{name}.{key}"
    assert torch.get_default_dtype() == torch.float32  # the build restores it


def test_save_and_reload_tiny_sd15(tmp_path: Path) -> None:
    pipe = tiny_sd15_pipeline(seed=3)
    expected = _generate(pipe, "sd15")
    pipe.save_pretrained(tmp_path)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)

    assert type(reloaded) is type(pipe)
    for name, module in _modules(pipe).items():
        loaded = _modules(reloaded)[name].state_dict()
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, loaded[key]), f"{name}.{key}"
    assert reloaded.tokenizer(PROMPT).input_ids == pipe.tokenizer(PROMPT).input_ids
    assert reloaded.tokenizer.model_max_length == 77
    # Weights are bit-identical; outputs may still differ by an ulp because
    # safetensors-mmapped weights are not SIMD-aligned, which can change the
    # CPU matmul kernel's summation order.
    np.testing.assert_allclose(_generate(reloaded, "sd15"), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- #
# Tokenizers and initialisation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("vocab_size", [TINY_VOCAB_SIZE, CLIP_VOCAB_SIZE])
def test_clip_tokenizer(vocab_size: int) -> None:
    tokenizer = clip_tokenizer(vocab_size)
    assert len(tokenizer) == vocab_size
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token_id == vocab_size - 2
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == vocab_size - 1
    ids = tokenizer(PROMPT + " ÄÖ 123 !?", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == vocab_size - 2
    assert max(ids) < vocab_size
    assert tokenizer.decode(tokenizer(PROMPT).input_ids, skip_special_tokens=True) == PROMPT


def test_t5_tokenizer() -> None:
    tokenizer = t5_tokenizer(TINY_VOCAB_SIZE)
    assert len(tokenizer) == TINY_VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT


def test_randomize_statistics() -> None:
    layer = nn.Sequential(nn.Linear(512, 256), nn.LayerNorm(256), nn.Embedding(100, 64))
    randomize_(layer, seed=0)
    linear, norm, embedding = layer
    assert linear.weight.std().item() == pytest.approx(1 / 512**0.5, rel=0.05)
    assert torch.all(linear.bias == 0)
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)


# --------------------------------------------------------------------------- #
# Full-size models
# --------------------------------------------------------------------------- #


def test_sd15_unet_shapes_and_build_time() -> None:
    unet, elapsed = _timed(lambda: sd15_unet(seed=0))
    assert elapsed < BUILD_TIME_LIMIT_S, f"sd15_unet took {elapsed:.1f}s"

    shapes = _shapes(unet)
    block = "transformer_blocks.0"
    expected = {
        "conv_in.weight": (320, 4, 3, 3),
        f"down_blocks.0.attentions.0.{block}.attn1.to_q.weight": (320, 320),
        f"down_blocks.0.attentions.0.{block}.attn1.to_out.0.weight": (320, 320),
        f"down_blocks.0.attentions.0.{block}.attn2.to_k.weight": (320, 768),
        f"down_blocks.0.attentions.0.{block}.attn2.to_v.weight": (320, 768),
        f"down_blocks.0.attentions.0.{block}.ff.net.0.proj.weight": (2560, 320),
        "down_blocks.0.attentions.0.proj_in.weight": (320, 320, 1, 1),
        f"down_blocks.1.attentions.1.{block}.attn2.to_k.weight": (640, 768),
        f"down_blocks.2.attentions.0.{block}.attn1.to_q.weight": (1280, 1280),
        "down_blocks.3.resnets.1.conv2.weight": (1280, 1280, 3, 3),
        f"mid_block.attentions.0.{block}.attn2.to_k.weight": (1280, 768),
        "up_blocks.0.resnets.2.conv1.weight": (1280, 2560, 3, 3),
        f"up_blocks.3.attentions.2.{block}.attn2.to_q.weight": (320, 320),
        f"up_blocks.3.attentions.2.{block}.attn2.to_k.weight": (320, 768),
        "conv_out.weight": (4, 320, 3, 3),
    }
    assert {key: shapes[key] for key in expected} == expected
    assert not any(key.startswith("down_blocks.3.attentions") for key in shapes)
    assert sum(name.endswith("to_q") for name, _ in unet.named_modules()) == 32
    assert _n_params(unet) == 859_520_964
    weight = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
    assert torch.isfinite(weight).all() and weight.std().item() > 0


def test_sd15_text_encoder_shapes_and_build_time() -> None:
    model, elapsed = _timed(lambda: sd15_text_encoder(seed=0))
    assert elapsed < BUILD_TIME_LIMIT_S, f"sd15_text_encoder took {elapsed:.1f}s"

    shapes = _shapes(model)
    expected = {
        "embeddings.token_embedding.weight": (49408, 768),
        "embeddings.position_embedding.weight": (77, 768),
        "encoder.layers.0.self_attn.q_proj.weight": (768, 768),
        "encoder.layers.0.self_attn.k_proj.weight": (768, 768),
        "encoder.layers.0.self_attn.v_proj.weight": (768, 768),
        "encoder.layers.0.self_attn.out_proj.weight": (768, 768),
        "encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "final_layer_norm.weight": (768,),
    }
    assert {key: shapes[key] for key in expected} == expected
    assert "encoder.layers.12.mlp.fc1.weight" not in shapes
    assert _n_params(model) == 123_060_480
    tokens = clip_tokenizer()(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model(tokens)
    assert output.last_hidden_state.shape == (1, tokens.shape[1], 768)
    assert torch.isfinite(output.pooler_output).all()


def test_sd15_pipeline_assembly_on_meta() -> None:
    pipe = sd15_pipeline(device="meta")
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.device.type == "meta"
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == CLIP_VOCAB_SIZE
    assert _shapes(pipe.unet) == _shapes(sd15_unet(device="meta"))


def test_sdxl_unet_shapes_on_meta() -> None:
    unet = sdxl_unet(device="meta", dtype=torch.bfloat16)
    shapes = _shapes(unet)
    assert shapes["down_blocks.1.attentions.0.proj_in.weight"] == (640, 640)
    assert shapes["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert "down_blocks.2.attentions.1.transformer_blocks.10.attn2.to_k.weight" not in shapes
    assert shapes["add_embedding.linear_1.weight"] == (1280, 2816)
    assert not any(key.startswith("down_blocks.0.attentions") for key in shapes)
    assert next(unet.parameters()).dtype == torch.bfloat16
    assert _n_params(unet) == 2_567_463_684


def test_sdxl_text_encoders_shapes_on_meta() -> None:
    clip_l, clip_g = sdxl_text_encoders(device="meta")
    assert _n_params(clip_l) == 123_060_480
    assert _n_params(clip_g) == 694_659_840
    shapes = _shapes(clip_g)
    # CLIPTextModelWithProjection keeps the ``text_model.`` prefix in transformers 5.
    assert shapes["text_model.encoder.layers.31.self_attn.q_proj.weight"] == (1280, 1280)
    assert shapes["text_model.encoder.layers.31.mlp.fc1.weight"] == (5120, 1280)
    assert shapes["text_projection.weight"] == (1280, 1280)


def test_flux_transformer_shapes_on_meta() -> None:
    model = flux_transformer(device="meta", dtype=torch.bfloat16)
    shapes = _shapes(model)
    assert shapes["x_embedder.weight"] == (3072, 64)
    assert shapes["context_embedder.weight"] == (3072, 4096)
    assert shapes["transformer_blocks.18.attn.to_q.weight"] == (3072, 3072)
    assert shapes["single_transformer_blocks.37.proj_out.weight"] == (3072, 15360)
    assert "time_text_embed.guidance_embedder.linear_1.weight" in shapes
    assert _n_params(model) == 11_901_408_320
