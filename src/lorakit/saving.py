"""save_lora_adapter / save_lora_weights: write adapters as safetensors that lorakit and diffusers+PEFT both load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from .errors import AdapterError, LoraError
from .families import model_family
from .formats.write import METADATA_KEY, to_peft
from .formats.write_kohya import to_kohya
from .io import save_safetensors

if TYPE_CHECKING:
    from .manager import LoraManager

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _pick_adapter(manager: "LoraManager", adapter_name: str | None) -> str:
    if adapter_name is not None:
        if adapter_name not in manager.adapters:
            raise AdapterError(f"save: no adapter named {adapter_name!r}; loaded: {sorted(manager.adapters) or 'none'}.")
        return adapter_name
    candidates = manager.get_active_adapters() or list(manager.adapters)
    if len(candidates) != 1:
        raise AdapterError(f"save: pass adapter_name=, one of {sorted(manager.adapters) or 'none (load one first)'}.")
    return candidates[0]


def _target(save_directory: str | os.PathLike, weight_name: str | None) -> Path:
    path = Path(save_directory)
    if path.suffix == ".safetensors" and weight_name is None:
        return path  # a file path was given: write exactly there
    if path.is_file():
        raise LoraError(f"save: {path} is a file; pass a folder (and weight_name=) or a .safetensors path.")
    return path / (weight_name or DEFAULT_WEIGHT_NAME)


def save_lora_adapter(self: "LoraManager", save_directory: str | os.PathLike, adapter_name: str | None = None, *,
                      weight_name: str | None = None, components: Sequence[str] | None = None,
                      upcast_before_saving: bool = False, safe_serialization: bool = True,
                      format: str = "diffusers") -> Path:
    """Write one adapter in diffusers/PEFT format (safetensors with ``lora_adapter_metadata``), or with
    ``format="kohya"`` in kohya format (``lora_unet_``/``lora_te1_`` names, per-module alpha); returns the path.

    Called on a pipeline (or the manager) diffusers keys carry component prefixes (``unet.``, ``text_encoder.``) as
    ``save_lora_weights`` files do; called on one model they do not, as diffusers' model-level method writes.

    Example:
        >>> pipe.save_lora_adapter("out", adapter_name="style")  # doctest: +SKIP
        PosixPath('out/pytorch_lora_weights.safetensors')
        >>> pipe.save_lora_adapter("style_kohya.safetensors", adapter_name="style", format="kohya")  # doctest: +SKIP
    """
    if not safe_serialization:
        raise LoraError("save: lorakit writes safetensors only (pickle files can run code when loaded).")
    if format not in ("diffusers", "kohya"):
        raise LoraError(f"save: format must be 'diffusers' or 'kohya', found {format!r}.")
    name = _pick_adapter(self, adapter_name)
    adapter = self.adapters[name]
    comps = [c for c in (components or adapter.components) if c in adapter.layers]
    if format == "kohya":
        models = {c: self.states[c].model for c in comps}
        denoisers = tuple(c for c in comps if not self.states[c].is_text_encoder)
        family = model_family({n: s.model for n, s in self.states.items()})
        tensors, metadata = to_kohya(adapter, models, comps, family, denoisers)
        return save_safetensors(tensors, _target(save_directory, weight_name), metadata)
    modules = {c: {p: self.states[c].layers[p].module for p in adapter.layers[c]} for c in comps}
    tensors, metadata = to_peft(adapter, modules, comps, prefixed=components is None)
    if upcast_before_saving:
        tensors = {k: v.float() for k, v in tensors.items()}
    return save_safetensors(tensors, _target(save_directory, weight_name), metadata)


def save_lora_weights(self: "LoraManager", save_directory: str | os.PathLike, adapter_name: str | None = None, *,
                      weight_name: str | None = None, safe_serialization: bool = True, **layers: Any) -> Path:
    """diffusers' ``save_lora_weights``: write ``<component>_lora_layers=`` state dicts as given (training scripts),
    or, without them, the named (or only active) adapter of every component.

    Example:
        >>> pipe.save_lora_weights("out", unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd)  # doctest: +SKIP
    """
    for key in ("is_main_process", "save_function"):
        layers.pop(key, None)
    given = {k[: -len("_lora_layers")]: v for k, v in layers.items() if k.endswith("_lora_layers") and v is not None}
    metas = {k[: -len("_lora_adapter_metadata")]: v for k, v in layers.items()
             if k.endswith("_lora_adapter_metadata") and v}
    unknown = [k for k in layers if not k.endswith(("_lora_layers", "_lora_adapter_metadata"))]
    if unknown:
        raise LoraError(f"save_lora_weights: unknown keyword argument(s) {unknown}.")
    if not given:
        return self.save_lora_adapter(save_directory, adapter_name, weight_name=weight_name,
                                      safe_serialization=safe_serialization)
    import json

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for comp, state_dict in given.items():
        if not isinstance(state_dict, Mapping):
            raise LoraError(f"save_lora_weights: {comp}_lora_layers must be a dict of tensors.")
        tensors.update({f"{comp}.{k}": v for k, v in state_dict.items()})
        meta.update({f"{comp}.{k}": v for k, v in metas.get(comp, {}).items()})
    header = {METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True, default=list)} if meta else {}
    return save_safetensors(tensors, _target(save_directory, weight_name), header)
