"""Model families as data: component roles, call-time scale keywords, and LDM <-> diffusers UNet names.

Nothing here is a class per pipeline: a pipeline is bound by finding its components, and names that differ between
ecosystems are derived from the model's own structure (so SD1.x, SD2.x and SDXL, whatever their block counts, share
one rule set).
"""

from __future__ import annotations

import inspect

import torch.nn as nn

# Components of a diffusers pipeline that can hold LoRA layers, in the order lorakit visits them.
DENOISER_NAMES = ("unet", "transformer", "transformer_2", "prior")
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
LORA_COMPONENTS = DENOISER_NAMES + TEXT_ENCODER_NAMES

# The keyword a denoiser's forward takes its call-time LoRA scale in (diffusers' @apply_lora_scale).
CALL_SCALE_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")

# Inside a UNet resnet, LDM names differ from diffusers names (kohya sdxl_model_util, A1111).
_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def is_text_encoder(model: nn.Module) -> bool:
    """transformers models are text encoders; diffusers models are denoisers."""
    return type(model).__module__.startswith("transformers.")


def call_scale_kwarg(model: nn.Module) -> str | None:
    """Name of the kwargs dict through which ``scale`` reaches this denoiser's forward, if any."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CALL_SCALE_KWARGS if name in params), None)


def unet_block_prefixes(unet: nn.Module) -> dict[str, str]:
    """Map diffusers module prefixes of a UNet2DConditionModel to LDM prefixes (``down_blocks.1.attentions.0`` ->
    ``input_blocks.4.1``), derived from the model's own blocks."""
    m = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    idx = 1
    for i, block in enumerate(unet.down_blocks):
        has_attn = getattr(block, "attentions", None) is not None
        for j in range(len(block.resnets)):
            m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{idx}.0"
            if has_attn:
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{idx}.1"
            idx += 1
        if getattr(block, "downsamplers", None):
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        m["mid_block.resnets.0"] = "middle_block.0"
        if getattr(mid, "attentions", None):
            m["mid_block.attentions.0"] = "middle_block.1"
        for j in range(1, len(mid.resnets)):
            m[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
    idx = 0
    for i, block in enumerate(unet.up_blocks):
        has_attn = getattr(block, "attentions", None) is not None
        for j in range(len(block.resnets)):
            m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{idx}.0"
            if has_attn:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{idx}.1"
            idx += 1
        if getattr(block, "upsamplers", None):
            m[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{idx - 1}.{2 if has_attn else 1}"
    return m


def unet_ldm_names(unet: nn.Module) -> dict[str, str]:
    """LDM name of every module of a UNet2DConditionModel that has one: ``{diffusers_path: ldm_path}``."""
    prefixes = unet_block_prefixes(unet)
    out: dict[str, str] = {}
    for name, _ in unet.named_modules():
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in prefixes:
                rest = parts[cut:]
                if ".resnets." in f".{head}." and rest and rest[0] in _RESNET_LDM:
                    rest = _RESNET_LDM[rest[0]].split(".") + rest[1:]
                out[name] = ".".join([prefixes[head], *rest])
                break
    return out


# Transformer denoiser classes -> family names (data, not code: add a row for a new family).
_TRANSFORMER_FAMILIES = {
    "FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3", "LTXVideoTransformer3DModel": "ltx-video",
    "WanTransformer3DModel": "wan", "HunyuanVideoTransformer3DModel": "hunyuan-video",
    "Flux2Transformer2DModel": "flux2", "QwenImageTransformer2DModel": "qwen-image",
}


def model_family(components: dict[str, nn.Module]) -> str | None:
    """The model family of a pipeline's denoiser (``sd1``, ``sd2``, ``sdxl``, ``flux``...), from its class/config."""
    for name in DENOISER_NAMES:
        model = components.get(name)
        if model is None:
            continue
        if is_unet(model):
            cfg = model.config
            if getattr(cfg, "addition_embed_type", None) == "text_time":
                return "sdxl"
            return "sd2" if getattr(cfg, "cross_attention_dim", None) == 1024 else "sd1"
        return _TRANSFORMER_FAMILIES.get(type(model).__name__, type(model).__name__)
    return None


def is_unet(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("down_blocks", "up_blocks", "conv_in"))
