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
