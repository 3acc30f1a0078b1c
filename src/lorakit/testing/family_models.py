"""Tiny models of the further families (SD3/3.5 with its three text encoders, Wan, LTX-Video, HunyuanVideo): bare
transformers from small configs with seeded weights, for the family tests. Their pipelines need tokenizers and VAEs
these tests do not use. The shared build machinery and configs are in :mod:`lorakit.testing.models`.
"""

from __future__ import annotations

import torch
from diffusers import (
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from torch import nn
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from .models import DeviceLike, _build, _derive_seed, _tiny_clip_config, _tiny_t5_config

__all__ = ["tiny_hunyuan_video_transformer", "tiny_ltx_video_transformer", "tiny_sd3_models", "tiny_wan_transformer"]


def tiny_sd3_models(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> dict[str, nn.Module]:
    """A tiny SD3.5-shaped ``SD3Transformer2DModel`` (two joint blocks, the first with SD3.5's second attention, the
    last with a pre-only context stream) and SD3's three text encoders (CLIP, CLIP with projection, T5)."""
    transformer = _build(
        lambda: SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=32,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
        seed=_derive_seed(seed, "transformer"),
        dtype=dtype,
        device=device,
    )
    encoders = {
        "text_encoder": lambda: CLIPTextModelWithProjection(_tiny_clip_config()),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(_tiny_clip_config()),
        "text_encoder_3": lambda: T5EncoderModel(_tiny_t5_config()),
    }
    out: dict[str, nn.Module] = {"transformer": transformer}
    for name, factory in encoders.items():
        out[name] = _build(factory, seed=_derive_seed(seed, name), dtype=dtype, device=device)
    return out


def tiny_wan_transformer(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> WanTransformer3DModel:
    """A tiny Wan 2.x-shaped ``WanTransformer3DModel`` (text-to-video, two blocks, 16 wide)."""
    return _build(
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        ),
        seed=_derive_seed(seed, "transformer"),
        dtype=dtype,
        device=device,
    )


def tiny_ltx_video_transformer(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> LTXVideoTransformer3DModel:
    """A tiny LTX-Video-shaped ``LTXVideoTransformer3DModel`` (two blocks, 16 wide)."""
    return _build(
        lambda: LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            caption_channels=32,
        ),
        seed=_derive_seed(seed, "transformer"),
        dtype=dtype,
        device=device,
    )


def tiny_hunyuan_video_transformer(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> HunyuanVideoTransformer3DModel:
    """A tiny HunyuanVideo-shaped ``HunyuanVideoTransformer3DModel`` (one double, one single, one refiner block)."""
    return _build(
        lambda: HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=False,
            text_embed_dim=32,
            pooled_projection_dim=16,
            rope_axes_dim=(4, 6, 6),
        ),
        seed=_derive_seed(seed, "transformer"),
        dtype=dtype,
        device=device,
    )
