"""Seeded synthetic LoRA files in original-checkpoint names (BFL, SAI, Wan, Hunyuan, XLabs...), with the deltas each
diffusers module must receive, computed from the file's tensors and a spec the caller writes out by hand (so tests
do not reuse lorakit's key maps).

Example:
    >>> spec = [Source("double_blocks.0.img_attn.qkv", ("transformer_blocks.0.attn.to_q", ...))]  # doctest: +SKIP
    >>> sd, want = source_file(pipe.transformer, spec, "kohya")                                  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# (down suffix, up suffix, alpha suffix or None)
SUFFIXES = {"kohya": (".lora_down.weight", ".lora_up.weight", ".alpha"),
            "peft": (".lora_A.weight", ".lora_B.weight", None),
            "peft_alpha": (".lora_A.weight", ".lora_B.weight", ".alpha"),
            "xlabs": (".down.weight", ".up.weight", None)}


@dataclass(frozen=True)
class Source:
    """One layer of the original model: its name (dotted) and the diffusers modules its output rows feed, in order;
    ``swap`` when diffusers stores the two halves of its output the other way round."""

    name: str
    targets: tuple[str, ...]
    swap: bool = False


def source_file(model: nn.Module, spec: list[Source], suffixes: str, *, prefix: str = "", underscore: bool = False,
                rank: int = 4, alpha: float | None = 2.0, seed: int = 0
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(state dict, {diffusers path: expected fp64 delta at scale 1})``. Keys are ``prefix + name`` (dots turned to
    underscores with ``underscore``) + the suffixes of ``suffixes`` (a key of :data:`SUFFIXES`)."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    down_sfx, up_sfx, alpha_sfx = SUFFIXES[suffixes]
    sd: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    for src in spec:
        sizes = [int(modules[t].weight.shape[0]) for t in src.targets]
        fan_in = int(modules[src.targets[0]].weight.shape[1])
        down = torch.randn(rank, fan_in, generator=g) * (0.3 / fan_in ** 0.5)
        up = torch.randn(sum(sizes), rank, generator=g) * (0.3 / rank ** 0.5)
        key = prefix + (src.name.replace(".", "_") if underscore else src.name)
        sd[key + down_sfx], sd[key + up_sfx] = down, up
        scale = 1.0
        if alpha_sfx and alpha is not None:
            sd[key + alpha_sfx] = torch.tensor(alpha)
            scale = alpha / rank
        full = (up.double() @ down.double()) * scale
        if src.swap:
            full = torch.cat([full[full.shape[0] // 2:], full[: full.shape[0] // 2]])
        for t, part in zip(src.targets, torch.split(full, sizes)):
            want[t] = part
    return sd, want


def flux_control_file(model: nn.Module, spec: list[Source], norms: dict[str, str], widths: dict[str, int], *,
                      rank: int = 4, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A seeded BFL FLUX Control LoRA (Canny/Depth layout) and the same file in diffusers/PEFT names.

    Every layer of ``spec`` gets ``lora_A.weight``, ``lora_B.weight`` and a ``lora_B.bias``, no alpha (scale 1);
    ``norms`` maps BFL norm-scale keys (``double_blocks.0.img_attn.norm.query_norm.scale``) to the diffusers
    parameters they replace, which get values near 1; ``widths`` gives layers whose ``lora_A`` reads more inputs
    than the model's layer (``{"img_in": 32}``: latents and control latents). The diffusers twin is what diffusers'
    BFL converter makes of such a file (``transformer.`` + target path; fused layers: ``lora_A`` repeated, ``lora_B``
    rows and bias split; ``swap``: both halves of ``lora_B`` and bias exchanged), so diffusers can load it into a
    tiny model, whose sizes its converter's fixed FLUX.1-dev sizes do not fit.
    """
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    bfl: dict[str, torch.Tensor] = {}
    twin: dict[str, torch.Tensor] = {}
    for src in spec:
        sizes = [int(modules[t].weight.shape[0]) for t in src.targets]
        fan_in = widths.get(src.name, int(modules[src.targets[0]].weight.shape[1]))
        down = torch.randn(rank, fan_in, generator=g) * (0.3 / fan_in ** 0.5)
        up = torch.randn(sum(sizes), rank, generator=g) * (0.3 / rank ** 0.5)
        bias = torch.randn(sum(sizes), generator=g) * 0.05
        bfl[f"{src.name}.lora_A.weight"], bfl[f"{src.name}.lora_B.weight"] = down, up
        bfl[f"{src.name}.lora_B.bias"] = bias
        if src.swap:
            up, bias = (torch.cat([t[t.shape[0] // 2:], t[: t.shape[0] // 2]]) for t in (up, bias))
        for target, up_part, bias_part in zip(src.targets, up.split(sizes), bias.split(sizes)):
            key = f"transformer.{target}"
            twin[f"{key}.lora_A.weight"] = down.clone()
            twin[f"{key}.lora_B.weight"], twin[f"{key}.lora_B.bias"] = up_part.clone(), bias_part.clone()
    for key, param in norms.items():
        value = 1 + 0.2 * torch.randn(params[param].shape, generator=g)
        bfl[key], twin[f"transformer.{param}"] = value, value.clone()
    return bfl, twin
