"""The ``set_adapters`` weight grammar, resolved to one scale per LoRA layer.

Per component a weight is a float, or a dict whose keys are module-path prefixes (the longest matching prefix wins,
on ``.`` boundaries only, so ``transformer_blocks.1`` never matches ``single_transformer_blocks.1``), plus sugar:

* UNets (diffusers' grammar): ``{"down": 0.9, "mid": 0.5, "up": {"block_0": 0.6, "block_1": [0.4, 0.8, 1.0]}}``.
  A block's scale applies to EVERY layer in it: attentions, resnets and down/upsamplers (diffusers leaves resnets
  and samplers at 1.0). A list gives one value per layer index ``j`` (``attentions.j`` and ``resnets.j``); the
  block's sampler takes the last value.
* Any model with block lists (``transformer_blocks``, ``single_transformer_blocks``, ``blocks``...):
  ``{"transformer_blocks": 0.5}``, ``{"transformer_blocks": [0.1, 0.2, ...]}`` (one per block) or
  ``{"single_transformer_blocks": {"block_3": 0.2, 7: 0.9}}``.

Layers no key covers keep 1.0, as in diffusers.

Example:
    >>> rule = ScaleRule.constant(0.5)
    >>> rule("down_blocks.0.attentions.0.proj_in")
    0.5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch.nn as nn

from .errors import LoraError, preview
from .families import is_unet

_UNET_PARTS = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}


@dataclass(frozen=True)
class ScaleRule:
    """Scale of each layer path: the longest matching prefix, else ``default``."""

    default: float = 1.0
    prefixes: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    @classmethod
    def constant(cls, value: float) -> "ScaleRule":
        return cls(default=float(value))

    def __call__(self, path: str) -> float:
        for prefix, value in self.prefixes:  # sorted longest first
            if path == prefix or path.startswith(prefix + "."):
                return value
        return self.default

    def describe(self) -> float | dict[str, float]:
        return self.default if not self.prefixes else {**dict(self.prefixes), "*": self.default}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoraError(f"set_adapters: {where} must be a number, found {value!r}.")
    return float(value)


def _block_index(key: Any, where: str) -> int:
    text = str(key)
    text = text[len("block_"):] if text.startswith("block_") else text
    if not text.isdigit():
        raise LoraError(f"set_adapters: {where} has key {key!r}; expected 'block_<i>' or an integer index.")
    return int(text)


def _per_block(model: nn.Module, attr: str, value: Any, where: str, out: dict[str, float]) -> None:
    """Expand a value for a block list (``down_blocks``, ``transformer_blocks``...) into prefixes."""
    blocks = getattr(model, attr)
    if not isinstance(value, (Mapping, list, tuple)):
        out[attr] = _number(value, where)
        return
    items = enumerate(value) if isinstance(value, (list, tuple)) else value.items()
    if isinstance(value, (list, tuple)) and len(value) != len(blocks):
        raise LoraError(f"set_adapters: {where} lists {len(value)} values but the model has {len(blocks)} "
                        f"{attr}; give one per block, or a dict {{'block_<i>': value}}.")
    for key, sub in items:
        i = _block_index(key, where)
        if i >= len(blocks):
            raise LoraError(f"set_adapters: {where} names {key!r}, but {attr} has blocks 0..{len(blocks) - 1} "
                            f"(block_0..block_{len(blocks) - 1}).")
        prefix = f"{attr}.{i}"
        if isinstance(sub, (list, tuple)) and hasattr(blocks[i], "resnets"):
            _per_layer(blocks[i], prefix, sub, f"{where}[{key!r}]", out)
        else:
            out[prefix] = _number(sub, f"{where}[{key!r}]")


def _per_layer(block: nn.Module, prefix: str, values: list | tuple, where: str, out: dict[str, float]) -> None:
    """A list for one UNet block: one value per layer index; samplers take the last value."""
    n = len(block.resnets)
    if len(values) != n:
        raise LoraError(f"set_adapters: {where} lists {len(values)} values, but {prefix} has {n} layers; give one "
                        f"value per layer.")
    for j, v in enumerate(values):
        v = _number(v, f"{where}[{j}]")
        out[f"{prefix}.resnets.{j}"] = v
        if getattr(block, "attentions", None) is not None:
            out[f"{prefix}.attentions.{j}"] = v
    for sampler in ("downsamplers", "upsamplers"):
        if getattr(block, sampler, None) is not None:
            out[f"{prefix}.{sampler}"] = _number(values[-1], where)


def build_rule(model: nn.Module, value: Any, where: str) -> ScaleRule:
    """Turn one component's weight (float, None or dict) into a :class:`ScaleRule`; raises LoraError on bad input."""
    if value is None:
        return ScaleRule()
    if not isinstance(value, Mapping):
        return ScaleRule.constant(_number(value, where))
    names = {n for n, _ in model.named_modules() if n}
    lists = {n for n, m in model.named_children() if isinstance(m, nn.ModuleList)}
    unet = is_unet(model)
    out: dict[str, float] = {}
    for key, sub in value.items():
        here = f"{where}[{key!r}]"
        if unet and key in _UNET_PARTS:
            attr = _UNET_PARTS[key]
            if key == "mid":
                out[attr] = _number(sub, here)
            else:
                _per_block(model, attr, sub, here, out)
        elif key in lists:
            _per_block(model, key, sub, here, out)
        elif isinstance(key, str) and key in names:
            out[key] = _number(sub, here)
        else:
            valid = (sorted(_UNET_PARTS) if unet else []) + sorted(lists)
            raise LoraError(f"set_adapters: {where} has key {key!r}, which names no block or module of this "
                            f"{type(model).__name__}. Use one of {valid} or a module path prefix such as "
                            f"{preview(sorted(names, key=len)[:6], 3)}.")
    ordered = tuple(sorted(out.items(), key=lambda kv: -len(kv[0])))
    return ScaleRule(default=1.0, prefixes=ordered)
