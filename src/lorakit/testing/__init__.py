"""Test helpers: diffusers pipelines and models with seeded random weights."""

from .models import (
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

__all__ = [
    "CLIP_VOCAB_SIZE",
    "TINY_VOCAB_SIZE",
    "clip_tokenizer",
    "flux_transformer",
    "randomize_",
    "sd15_pipeline",
    "sd15_text_encoder",
    "sd15_unet",
    "sdxl_text_encoders",
    "sdxl_unet",
    "t5_tokenizer",
    "tiny_flux_pipeline",
    "tiny_sd15_pipeline",
    "tiny_sdxl_pipeline",
]
