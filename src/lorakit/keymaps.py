"""Family key maps as data: module names of the original (BFL, SAI, Wan, Hunyuan, XLabs) checkpoints, as LoRA files
spell them, mapped onto diffusers module paths.

A row is ``(pattern, targets, op)``. ``pattern`` is written with dots; a dot matches ``.`` or ``_``, so one row reads
both the dotted spelling (``double_blocks.0.img_attn.qkv``) and kohya's underscored one (``double_blocks_0_img_attn_qkv``).
``targets`` are diffusers paths relative to the denoiser, ``{0}`` standing for the first number the pattern caught.
Several targets mean the source layer is fused: its output rows are split over them in order (sizes read from the
model), which for LoRA is exact as targets sharing ``down`` with row slices of ``up``. ``op`` ``"adaln"`` marks an
adaLN modulation whose (shift, scale) halves diffusers stores as (scale, shift) when the target belongs to an
``AdaLayerNormContinuous`` (final layers, SD3's last context block).

Facts from diffusers' own converters (``loaders/lora_conversion_utils.py``, ``single_file_utils.py``); the tables
are lorakit's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from torch import nn

Row = tuple[str, tuple[str, ...], str | None]


def _qkv(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}.{p}" for p in ("to_q", "to_k", "to_v"))


def _add_qkv(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj"))


_DB, _SB = "transformer_blocks.{0}", "single_transformer_blocks.{0}"

# FLUX.1: BFL names (kohya ``lora_unet_double_blocks_*``, ComfyUI/BFL ``diffusion_model.double_blocks.*``) and XLabs.
FLUX: tuple[Row, ...] = (
    (r"double_blocks.(\d+).img_attn.qkv", _qkv(f"{_DB}.attn"), None),
    (r"double_blocks.(\d+).img_attn.proj", (f"{_DB}.attn.to_out.0",), None),
    (r"double_blocks.(\d+).img_mlp.0", (f"{_DB}.ff.net.0.proj",), None),
    (r"double_blocks.(\d+).img_mlp.2", (f"{_DB}.ff.net.2",), None),
    (r"double_blocks.(\d+).img_mod.lin", (f"{_DB}.norm1.linear",), None),
    (r"double_blocks.(\d+).txt_attn.qkv", _add_qkv(f"{_DB}.attn"), None),
    (r"double_blocks.(\d+).txt_attn.proj", (f"{_DB}.attn.to_add_out",), None),
    (r"double_blocks.(\d+).txt_mlp.0", (f"{_DB}.ff_context.net.0.proj",), None),
    (r"double_blocks.(\d+).txt_mlp.2", (f"{_DB}.ff_context.net.2",), None),
    (r"double_blocks.(\d+).txt_mod.lin", (f"{_DB}.norm1_context.linear",), None),
    (r"single_blocks.(\d+).linear1", (*_qkv(f"{_SB}.attn"), f"{_SB}.proj_mlp"), None),
    (r"single_blocks.(\d+).linear2", (f"{_SB}.proj_out",), None),
    (r"single_blocks.(\d+).modulation.lin", (f"{_SB}.norm.linear",), None),
    (r"img_in", ("x_embedder",), None),
    (r"txt_in", ("context_embedder",), None),
    (r"time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), None),
    (r"time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), None),
    (r"vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), None),
    (r"vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), None),
    (r"guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), None),
    (r"guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), None),
    (r"final_layer.linear", ("proj_out",), None),
    (r"final_layer.adaLN_modulation.1", ("norm_out.linear",), "adaln"),
    # XLabs attention processors: 1 = image stream, 2 = text stream.
    (r"double_blocks.(\d+).processor.qkv_lora1", _qkv(f"{_DB}.attn"), None),
    (r"double_blocks.(\d+).processor.proj_lora1", (f"{_DB}.attn.to_out.0",), None),
    (r"double_blocks.(\d+).processor.qkv_lora2", _add_qkv(f"{_DB}.attn"), None),
    (r"double_blocks.(\d+).processor.proj_lora2", (f"{_DB}.attn.to_add_out",), None),
    (r"single_blocks.(\d+).processor.qkv_lora", _qkv(f"{_SB}.attn"), None),
    (r"single_blocks.(\d+).processor.proj_lora", (f"{_SB}.proj_out",), None),
)

# SD3 / SD3.5 MMDiT (kohya ``lora_unet_joint_blocks_*``, SAI names).
_JB = "joint_blocks.(\\d+)"
SD3: tuple[Row, ...] = (
    (rf"{_JB}.x_block.attn.qkv", _qkv(f"{_DB}.attn"), None),
    (rf"{_JB}.x_block.attn.proj", (f"{_DB}.attn.to_out.0",), None),
    (rf"{_JB}.x_block.attn2.qkv", _qkv(f"{_DB}.attn2"), None),
    (rf"{_JB}.x_block.attn2.proj", (f"{_DB}.attn2.to_out.0",), None),
    (rf"{_JB}.x_block.mlp.fc1", (f"{_DB}.ff.net.0.proj",), None),
    (rf"{_JB}.x_block.mlp.fc2", (f"{_DB}.ff.net.2",), None),
    (rf"{_JB}.x_block.adaLN_modulation.1", (f"{_DB}.norm1.linear",), None),
    (rf"{_JB}.context_block.attn.qkv", _add_qkv(f"{_DB}.attn"), None),
    (rf"{_JB}.context_block.attn.proj", (f"{_DB}.attn.to_add_out",), None),
    (rf"{_JB}.context_block.mlp.fc1", (f"{_DB}.ff_context.net.0.proj",), None),
    (rf"{_JB}.context_block.mlp.fc2", (f"{_DB}.ff_context.net.2",), None),
    (rf"{_JB}.context_block.adaLN_modulation.1", (f"{_DB}.norm1_context.linear",), "adaln"),
    (r"x_embedder.proj", ("pos_embed.proj",), None),
    (r"context_embedder", ("context_embedder",), None),
    (r"t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), None),
    (r"t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), None),
    (r"y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), None),
    (r"y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), None),
    (r"final_layer.linear", ("proj_out",), None),
    (r"final_layer.adaLN_modulation.1", ("norm_out.linear",), "adaln"),
)

# Wan 2.x (original ``diffusion_model.blocks.*`` names; musubi-tuner ``lora_unet_blocks_*``).
_WB = "blocks.{0}"
WAN: tuple[Row, ...] = (
    *((rf"blocks.(\d+).self_attn.{o}", (f"{_WB}.attn1.{t}",), None)
      for o, t in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
    *((rf"blocks.(\d+).cross_attn.{o}", (f"{_WB}.attn2.{t}",), None)
      for o, t in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                   ("k_img", "add_k_proj"), ("v_img", "add_v_proj"))),
    (r"blocks.(\d+).ffn.0", (f"{_WB}.ffn.net.0.proj",), None),
    (r"blocks.(\d+).ffn.2", (f"{_WB}.ffn.net.2",), None),
    (r"time_projection.1", ("condition_embedder.time_proj",), None),
    (r"head.head", ("proj_out",), None),
    (r"text_embedding.0", ("condition_embedder.text_embedder.linear_1",), None),
    (r"text_embedding.2", ("condition_embedder.text_embedder.linear_2",), None),
    (r"time_embedding.0", ("condition_embedder.time_embedder.linear_1",), None),
    (r"time_embedding.2", ("condition_embedder.time_embedder.linear_2",), None),
    (r"img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",), None),
    (r"img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",), None),
)

# HunyuanVideo (original names).
_TR = "context_embedder.token_refiner.refiner_blocks.{0}"
HUNYUAN_VIDEO: tuple[Row, ...] = (
    (r"double_blocks.(\d+).img_attn_qkv", _qkv(f"{_DB}.attn"), None),
    (r"double_blocks.(\d+).img_attn_proj", (f"{_DB}.attn.to_out.0",), None),
    (r"double_blocks.(\d+).img_mod.linear", (f"{_DB}.norm1.linear",), None),
    (r"double_blocks.(\d+).img_mlp.fc1", (f"{_DB}.ff.net.0.proj",), None),
    (r"double_blocks.(\d+).img_mlp.fc2", (f"{_DB}.ff.net.2",), None),
    (r"double_blocks.(\d+).txt_attn_qkv", _add_qkv(f"{_DB}.attn"), None),
    (r"double_blocks.(\d+).txt_attn_proj", (f"{_DB}.attn.to_add_out",), None),
    (r"double_blocks.(\d+).txt_mod.linear", (f"{_DB}.norm1_context.linear",), None),
    (r"double_blocks.(\d+).txt_mlp.fc1", (f"{_DB}.ff_context.net.0.proj",), None),
    (r"double_blocks.(\d+).txt_mlp.fc2", (f"{_DB}.ff_context.net.2",), None),
    (r"single_blocks.(\d+).linear1", (*_qkv(f"{_SB}.attn"), f"{_SB}.proj_mlp"), None),
    (r"single_blocks.(\d+).linear2", (f"{_SB}.proj_out",), None),
    (r"single_blocks.(\d+).modulation.linear", (f"{_SB}.norm.linear",), None),
    (r"txt_in.individual_token_refiner.blocks.(\d+).self_attn_qkv", _qkv(f"{_TR}.attn"), None),
    (r"txt_in.individual_token_refiner.blocks.(\d+).self_attn_proj", (f"{_TR}.attn.to_out.0",), None),
    (r"txt_in.individual_token_refiner.blocks.(\d+).mlp.fc1", (f"{_TR}.ff.net.0.proj",), None),
    (r"txt_in.individual_token_refiner.blocks.(\d+).mlp.fc2", (f"{_TR}.ff.net.2",), None),
    (r"txt_in.individual_token_refiner.blocks.(\d+).adaLN_modulation.1", (f"{_TR}.norm_out.linear",), None),
    (r"txt_in.input_embedder", ("context_embedder.proj_in",), None),
    (r"txt_in.t_embedder.mlp.0", ("context_embedder.time_text_embed.timestep_embedder.linear_1",), None),
    (r"txt_in.t_embedder.mlp.2", ("context_embedder.time_text_embed.timestep_embedder.linear_2",), None),
    (r"txt_in.c_embedder.linear_1", ("context_embedder.time_text_embed.text_embedder.linear_1",), None),
    (r"txt_in.c_embedder.linear_2", ("context_embedder.time_text_embed.text_embedder.linear_2",), None),
    (r"time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), None),
    (r"time_in.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), None),
    (r"guidance_in.mlp.0", ("time_text_embed.guidance_embedder.linear_1",), None),
    (r"guidance_in.mlp.2", ("time_text_embed.guidance_embedder.linear_2",), None),
    (r"vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), None),
    (r"vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), None),
    (r"final_layer.linear", ("proj_out",), None),
    (r"final_layer.adaLN_modulation.1", ("norm_out.linear",), "adaln"),
)

# Family (families.model_family) -> its table. LTX-Video files use diffusers names under ``diffusion_model.``: no
# table needed beyond the prefix strip every family gets.
FAMILY_MAPS: dict[str, tuple[Row, ...]] = {"flux": FLUX, "sd3": SD3, "wan": WAN, "hunyuan-video": HUNYUAN_VIDEO}

# Component namespaces that a family's kohya files number differently (kohya's FLUX.1 T5 is lora_te3_; diffusers'
# FluxPipeline calls it text_encoder_2).
NAMESPACE_ALIASES: dict[str, dict[str, str]] = {"flux": {"text_encoder_3": "text_encoder_2"}}

# ComfyUI's own text-encoder spelling (LoraSave output): ``text_encoders.<name>.transformer.<module path>``.
_COMFY_CLIP_L, _COMFY_CLIP_G, _COMFY_T5 = (f"text_encoders.{n}.transformer." for n in ("clip_l", "clip_g", "t5xxl"))
COMFY_TEXT_ENCODERS: dict[str, dict[str, str]] = {
    "sd1": {_COMFY_CLIP_L: "text_encoder"},
    "sdxl": {_COMFY_CLIP_L: "text_encoder", _COMFY_CLIP_G: "text_encoder_2"},
    "flux": {_COMFY_CLIP_L: "text_encoder", _COMFY_T5: "text_encoder_2"},
    "sd3": {_COMFY_CLIP_L: "text_encoder", _COMFY_CLIP_G: "text_encoder_2", _COMFY_T5: "text_encoder_3"},
}

# Prefixes original-checkpoint files put before module names (ComfyUI, BFL, LTX, Wan).
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass(frozen=True)
class Target:
    """One diffusers module a file's module feeds: all of it, or output rows ``[start, stop)`` of it."""

    path: str
    rows: tuple[int, int] | None = None  # rows of the fused source's up / delta
    swap_halves: bool = False  # diffusers keeps (scale, shift) where the file keeps (shift, scale)


@cache
def _compiled(family: str) -> tuple[tuple[re.Pattern, tuple[str, ...], str | None], ...]:
    return tuple((re.compile("^" + pat.replace(".", "[._]") + "$"), targets, op)
                 for pat, targets, op in FAMILY_MAPS.get(family, ()))


def comfy_text_encoder(key: str, family: str | None) -> tuple[str, str] | None:
    """``(component, module key)`` of a ComfyUI text-encoder key (``text_encoders.clip_l.transformer.…``), or None."""
    for prefix, component in COMFY_TEXT_ENCODERS.get(family or "", {}).items():
        if key.startswith(prefix):
            return component, key[len(prefix):]
    return None


def strip_original_prefix(key: str) -> str:
    for prefix in ORIGINAL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def map_key(key: str, family: str | None, modules: dict[str, nn.Module]) -> list[Target] | None:
    """The diffusers targets of a module key written in the family's original names, or None if no row matches
    or a target is missing from the model.

    Example:
        >>> map_key("double_blocks_0_img_attn_qkv", "flux", dict(transformer.named_modules()))  # doctest: +SKIP
        [Target('transformer_blocks.0.attn.to_q', (0, 3072)), Target(... to_k, (3072, 6144)), ...]
    """
    key = strip_original_prefix(key)
    for pattern, targets, op in _compiled(family or ""):
        m = pattern.match(key)
        if not m:
            continue
        paths = [t.format(*m.groups()) for t in targets]
        if not all(p in modules and hasattr(modules[p], "weight") for p in paths):
            return None
        if len(paths) == 1:
            return [Target(paths[0], None, op == "adaln" and _continuous(paths[0], modules))]
        out, start = [], 0
        for p in paths:
            n = int(modules[p].weight.shape[0])
            out.append(Target(p, (start, start + n)))
            start += n
        return out
    return None


def _continuous(path: str, modules: dict[str, nn.Module]) -> bool:
    parent = modules.get(path.rpartition(".")[0])
    return type(parent).__name__ == "AdaLayerNormContinuous"
