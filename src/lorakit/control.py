"""FLUX Control LoRAs (BFL's Canny/Depth LoRAs, diffusers' ``FluxControlPipeline``): what such a file changes besides
weight deltas, done reversibly and only after the whole file has been checked.

- **Norm overwrites.** ``*.query_norm.scale`` / ``*.key_norm.scale`` (BFL names; ``attn.norm_q.weight``... in
  diffusers names) replace the q/k RMSNorm weights outright, whatever the adapter weights. The originals are kept:
  ``unfuse_lora`` and ``unload_lora_weights`` put them back (diffusers restores them at both).
- **Widened inputs.** The control file's ``img_in`` LoRA reads latents + control latents (128 channels) where
  ``x_embedder`` takes 64. As diffusers does, the layer is replaced by a wider one whose weight is zero-padded (the
  base ignores the new channels) and ``config.in_channels`` follows. ``unload_lora_weights(
  reset_to_overwritten_params=True)`` puts back the original layer object and config value; without it the layer
  stays wide. A later LoRA made for the narrow layer gets its ``down`` zero-padded to the new width.

Example:
    >>> pipe.load_lora_weights("flux1-canny-dev-lora.safetensors", adapter_name="canny")  # doctest: +SKIP
    >>> pipe.transformer.config.in_channels                                                # doctest: +SKIP
    128
    >>> pipe.unload_lora_weights(reset_to_overwritten_params=True)                         # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import LoraWeights, WeightDelta
from .algorithms.full import BiasAdded
from .errors import LoraError
from .keymaps import strip_original_prefix

_DB, _SB = "transformer_blocks.{0}.attn.", "single_transformer_blocks.{0}.attn."
# Family -> (BFL norm-scale key, diffusers parameter it replaces). Facts from diffusers'
# ``_convert_bfl_flux_control_lora_to_diffusers``; the table is lorakit's.
NORM_KEYS: dict[str, tuple[tuple[str, str], ...]] = {"flux": (
    (r"double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale", _DB + "norm_q.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale", _DB + "norm_k.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale", _DB + "norm_added_q.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale", _DB + "norm_added_k.weight"),
    (r"single_blocks\.(\d+)\.norm\.query_norm\.scale", _SB + "norm_q.weight"),
    (r"single_blocks\.(\d+)\.norm\.key_norm\.scale", _SB + "norm_k.weight"),
)}
# Family -> the norm modules a file may overwrite under diffusers names (``transformer.<path>.norm_q.weight``).
DIFFUSERS_NORMS: dict[str, tuple[str, ...]] = {"flux": ("norm_q", "norm_k", "norm_added_q", "norm_added_k")}
# Family -> layers a LoRA may widen -> the config attribute holding their input width.
WIDENABLE: dict[str, dict[str, str]] = {"flux": {"x_embedder": "in_channels"}}
DENOISER_PREFIX = "transformer."


def norm_param(key: str, family: str | None) -> str | None:
    """The denoiser parameter a file key overwrites (``transformer_blocks.0.attn.norm_q.weight``), or None.

    Example:
        >>> norm_param("double_blocks.0.txt_attn.norm.key_norm.scale", "flux")
        'transformer_blocks.0.attn.norm_added_k.weight'
    """
    names = DIFFUSERS_NORMS.get(family or "", ())
    if not key.endswith(("_norm.scale", *(f".{n}.weight" for n in names))):
        return None  # the common case, cheaply: thousands of LoRA keys per file
    bare = strip_original_prefix(key.removeprefix(DENOISER_PREFIX))
    for pattern, target in NORM_KEYS.get(family or "", ()):
        m = re.fullmatch(pattern, bare)
        if m:
            return target.format(*m.groups())
    if key.startswith(DENOISER_PREFIX) and key.endswith(tuple(f".{n}.weight" for n in names)):
        return bare
    return None


def split_norm_keys(keys: list[str], family: str | None) -> tuple[dict[str, str], list[str]]:
    """``({file key: parameter path}, the other keys)``: norm overwrites are not LoRA modules."""
    norms = {k: p for k in keys if (p := norm_param(k, family)) is not None}
    return norms, [k for k in keys if k not in norms]


def check_norms(norms: Mapping[str, str], params: Mapping[str, torch.Tensor],
                shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Why the norm overwrites do not fit the denoiser's parameters (one line each); empty when they do."""
    problems = []
    for key, param in norms.items():
        have = params.get(param)
        if have is None:
            problems.append(f"{key} -> {param}: the model has no such parameter")
        elif tuple(shapes[key]) != tuple(have.shape):
            problems.append(f"{key} -> {param}: shape {list(shapes[key])}, expected {list(have.shape)}")
    return problems


@dataclass
class Widened:
    """A layer replaced by a wider one: the original object, and the config attribute (and value) it set."""

    original: nn.Linear
    attribute: str | None
    old_value: object


@dataclass
class ControlState:
    """One component's FLUX Control changes: original norm weights and widened layers, for exact restores."""

    norm_originals: dict[str, torch.Tensor] = field(default_factory=dict)
    widened: dict[str, Widened] = field(default_factory=dict)

    @torch.no_grad()
    def overwrite_norms(self, model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
        """Write ``values`` into these parameters; the first overwrite of each keeps an exact copy of the original."""
        for param, value in values.items():
            target = model.get_parameter(param)
            if param not in self.norm_originals:
                self.norm_originals[param] = target.detach().clone()
            target.copy_(value.to(target.device, target.dtype))

    @torch.no_grad()
    def restore_norms(self, model: nn.Module) -> None:
        """Put every overwritten norm weight back, bit-exactly, and forget the copies."""
        for param, original in self.norm_originals.items():
            model.get_parameter(param).copy_(original)
        self.norm_originals.clear()

    @torch.no_grad()
    def widen(self, model: nn.Module, modules: dict[str, nn.Module], path: str, width: int, family: str) -> None:
        """Replace the Linear at ``path`` by one with ``width`` inputs, the new input columns zero."""
        old = modules[path]
        wide = nn.Linear(width, old.out_features, bias=old.bias is not None, device=old.weight.device,
                         dtype=old.weight.dtype)
        wide.weight.zero_()
        wide.weight[:, :old.in_features] = old.weight
        if old.bias is not None:
            wide.bias.copy_(old.bias)
        wide.train(old.training)
        wide.weight.requires_grad_(old.weight.requires_grad)
        attribute = WIDENABLE.get(family, {}).get(path)
        if path not in self.widened:  # widened again: the original stays the one to reset to
            self.widened[path] = Widened(old, attribute, getattr(model.config, attribute, None) if attribute else None)
        _replace(model, modules, path, wide)
        if attribute:
            setattr(model.config, attribute, width)  # as diffusers: the attribute, not the frozen dict entry

    def reset_widened(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        """Put the original layers and config values back (``reset_to_overwritten_params=True``)."""
        for path, widened in self.widened.items():
            _replace(model, modules, path, widened.original)
            if widened.attribute:
                setattr(model.config, widened.attribute, widened.old_value)
        self.widened.clear()


def _replace(model: nn.Module, modules: dict[str, nn.Module], path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    modules[path] = new


def lora_width(fields: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The input width of a plain LoRA module's ``down`` (Linear), or None for anything else."""
    if set(fields) - {"down", "up", "alpha", "lora_bias"} or "down" not in fields:
        return None
    down = shapes[fields["down"]]
    return int(down[1]) if len(down) == 2 else None


def fit_width(display: str, width: int | None, path: str, module: nn.Module, control: ControlState,
              family: str | None, busy: bool) -> tuple[nn.Module, int | None, int | None]:
    """``(module to check the file's shapes against, width to widen the layer to, width to pad down to)``.

    A LoRA wider than a widenable layer widens it (a stand-in of that width is checked); one as narrow as a layer
    lorakit widened earlier gets its ``down`` padded (checked against the original layer). Otherwise the layer
    itself, unchanged. ``busy``: the layer holds adapters already, which a widening would leave too narrow."""
    if width is None or not isinstance(module, nn.Linear):
        return module, None, None
    if width > module.in_features and path in WIDENABLE.get(family or "", {}):
        if busy:
            raise LoraError(f"{display}: widening {path} from {module.in_features} to {width} inputs (a FLUX Control "
                            f"LoRA), but adapters made for the narrow layer are loaded on it; unload them first. "
                            f"Nothing was loaded.")
        return nn.Linear(width, module.out_features, bias=module.bias is not None, device="meta"), width, None
    widened = control.widened.get(path)
    if widened is not None and width < module.in_features:
        return widened.original, None, module.in_features
    return module, None, None


def pad_down(delta: WeightDelta, width: int) -> WeightDelta:
    """The LoRA with ``down`` zero-padded to ``width`` inputs (a LoRA for the narrow layer on a widened one)."""
    if isinstance(delta, BiasAdded):
        return BiasAdded(pad_down(delta.inner, width), delta.diff_b, delta.scaled)
    assert isinstance(delta, LoraWeights)
    down = delta.down.new_zeros(delta.down.shape[0], width)
    down[:, :delta.down.shape[1]] = delta.down
    return LoraWeights(down=down, up=delta.up, alpha=delta.alpha)
