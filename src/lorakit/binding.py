"""Bind a LoraManager to a diffusers pipeline or a bare model: find the components, route the LoRA verbs.

After ``attach``, every LoRA method of the diffusers API on the pipeline and on each component (``pipe.unet``,
``pipe.transformer``, ``pipe.text_encoder``...) is an instance attribute that calls the manager, so user code written
for diffusers runs unchanged, with or without PEFT installed. The call-time scale reaches lorakit in two ways:

* the denoiser's ``cross_attention_kwargs`` / ``joint_attention_kwargs`` / ``attention_kwargs`` ``{"scale": s}``
  through a forward pre-hook that reads it (the weights are re-merged only when the scale changes);
* the text encoders' ``lora_scale`` through a wrapper around ``pipe.encode_prompt``, which scales them during the
  call and restores them afterwards.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch
import torch.nn as nn

from .errors import LoraError
from .families import CALL_SCALE_KWARGS, LORA_COMPONENTS, is_text_encoder
from .manager import LoraManager

_ATTR = "_lorakit_manager"

_PIPELINE_VERBS = ("load_lora_weights", "set_adapters", "disable_lora", "enable_lora", "get_active_adapters",
                   "get_list_adapters", "delete_adapters", "unload_lora_weights", "fuse_lora", "unfuse_lora",
                   "save_lora_weights", "save_lora_adapter", "enable_lora_hotswap",
                   "add_weighted_adapter")


class _ScaleWarningFilter(logging.Filter):
    """diffusers warns that a call-time ``scale`` is ignored when PEFT is absent; with lorakit it is not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "when not using the PEFT backend is ineffective" not in record.getMessage()


def _components_of(obj: Any) -> dict[str, nn.Module]:
    if isinstance(obj, nn.Module):
        name = "text_encoder" if is_text_encoder(obj) else ("unet" if hasattr(obj, "down_blocks") else "transformer")
        return {name: obj}
    found = {}
    for name in LORA_COMPONENTS:
        module = getattr(obj, name, None)
        module = getattr(module, "_orig_mod", module)  # a torch.compile'd component
        if isinstance(module, nn.Module):
            found[name] = module
    if not found:
        raise LoraError(f"attach: {type(obj).__name__} has none of the components {list(LORA_COMPONENTS)}; pass a "
                        f"diffusers pipeline, a diffusers model or a transformers text encoder.")
    return found


def _check_no_peft(components: dict[str, nn.Module]) -> None:
    for name, model in components.items():
        if getattr(model, "peft_config", None):
            raise LoraError(f"attach: {name} already holds PEFT adapters {list(model.peft_config)}. Call "
                            f"unload_lora_weights() through diffusers first, then attach lorakit.")


def attach(obj: Any, *, mode: str = "auto", backup_device: str | torch.device | None = None) -> LoraManager:
    """Serve the diffusers LoRA API of a pipeline or a model from lorakit's engine; returns the manager.

    Calling it again on the same object returns the same manager. ``mode`` chooses merged adapters or runtime
    branches (:class:`LoraManager`); ``backup_device`` where the exact copies of targeted weights are kept.

    Example:
        >>> import lorakit
        >>> manager = lorakit.attach(pipe)                   # doctest: +SKIP
        >>> pipe.load_lora_weights("lora.safetensors", adapter_name="a")   # doctest: +SKIP
        >>> pipe("a photo", cross_attention_kwargs={"scale": 0.5})        # doctest: +SKIP
    """
    existing = getattr(obj, _ATTR, None)
    if isinstance(existing, LoraManager):
        return existing
    components = _components_of(obj)
    _check_no_peft(components)
    manager = LoraManager(components, mode=mode, backup_device=backup_device)
    if not isinstance(obj, nn.Module):
        for verb in _PIPELINE_VERBS:
            object.__setattr__(obj, verb, getattr(manager, verb))
        _wrap_encode_prompt(obj, manager)
        _wrap_call(obj, manager)
        manager.fuse_defaults = _diffusers_default(type(obj), "fuse_lora", "components")
    for name, model in components.items():
        _bind_model(model, name, manager)
    object.__setattr__(obj, _ATTR, manager)
    logging.getLogger("diffusers.utils.peft_utils").addFilter(_ScaleWarningFilter())
    return manager


class ModelVerbs:
    """diffusers' model-level LoRA methods (their names and argument orders) for one component of a manager."""

    def __init__(self, manager: LoraManager, name: str):
        self.manager, self.name, self.scope = manager, name, [name]

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict: Any, prefix: str | None = None,
                          hotswap: bool = False, **kwargs: Any) -> str:
        return self.manager.load_lora_weights(pretrained_model_name_or_path_or_dict, hotswap=hotswap, prefix=prefix,
                                              components=self.scope, **kwargs)

    def set_adapters(self, adapter_names: Any, weights: Any = None) -> None:
        self.manager.set_adapters(adapter_names, weights, components=self.scope)

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: Any = None) -> None:
        self.manager.fuse_lora(self.scope, lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self) -> None:
        self.manager.unfuse_lora(self.scope)

    def disable_lora(self) -> None:
        self.manager.disable_lora(self.scope)

    def enable_lora(self) -> None:
        self.manager.enable_lora(self.scope)

    def delete_adapters(self, adapter_names: Any) -> None:
        self.manager.delete_adapters(adapter_names, self.scope)

    def unload_lora(self) -> None:
        self.manager.unload_lora_weights(components=self.scope)

    def active_adapters(self) -> list[str]:
        return list(self.manager.states[self.name].active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {self.name: list(self.manager.states[self.name].adapters)}

    def save_lora_adapter(self, save_directory: Any, adapter_name: str | None = None, weight_name: str | None = None,
                          **kwargs: Any) -> Any:
        return self.manager.save_lora_adapter(save_directory, adapter_name, weight_name=weight_name,
                                              components=self.scope, **kwargs)

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        self.manager.enable_lora_hotswap(target_rank, check_compiled)

    def add_weighted_adapter(self, adapters: Any, weights: Any, adapter_name: str, combination_type: str = "svd",
                             **kwargs: Any) -> Any:
        return self.manager.add_weighted_adapter(adapters, weights, adapter_name, combination_type,
                                                 components=self.scope, **kwargs)

    # PEFT-style aliases diffusers models also expose
    set_adapter = set_adapters
    disable_adapters = disable_lora
    enable_adapters = enable_lora
    unload_lora_weights = unload_lora

    VERBS = ("load_lora_adapter", "set_adapters", "set_adapter", "fuse_lora", "unfuse_lora", "disable_lora",
             "enable_lora", "disable_adapters", "enable_adapters", "delete_adapters", "unload_lora",
             "unload_lora_weights", "active_adapters", "get_list_adapters", "save_lora_adapter", "enable_lora_hotswap",
             "add_weighted_adapter")


def _diffusers_default(cls: type, method: str, parameter: str) -> Any:
    """The default of a parameter of the pipeline class's own diffusers method (None if it has none)."""
    try:
        default = inspect.signature(getattr(cls, method)).parameters[parameter].default
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return None if default is inspect.Parameter.empty else default


def _bind_model(model: nn.Module, name: str, manager: LoraManager) -> None:
    verbs = ModelVerbs(manager, name)
    for verb in ModelVerbs.VERBS:
        object.__setattr__(model, verb, getattr(verbs, verb))
    object.__setattr__(model, _ATTR, manager)
    state = manager.states[name]
    model._register_state_dict_hook(state.state_dict_hook)
    if state.call_kwarg is not None:
        model.register_forward_pre_hook(functools.partial(_call_scale_hook, manager, name), with_kwargs=True)


def _call_scale_hook(manager: LoraManager, name: str, module: nn.Module, args: tuple,
                     kwargs: dict) -> tuple[tuple, dict] | None:
    """Apply a denoiser's call-time ``scale`` (eagerly, before the forward) and take it out of the kwargs, so the
    model itself (and a compiled graph) never sees it."""
    state = manager.states[name]
    extra = kwargs.get(state.call_kwarg)
    if torch.compiler.is_compiling():
        # Inside a traced graph nothing can be re-merged: lorakit.compile's outer hook (or the pipeline call)
        # applies the scale first. A scale that reaches the graph unapplied would be silently ignored: refuse it.
        if extra and "scale" in extra and float(extra["scale"]) != state.call_scale:
            raise LoraError(f"{name}: a call-time scale ({extra['scale']}) reached a torch.compile'd model that lorakit "
                            f"cannot apply inside the graph. Compile with lorakit.compile({name}, ...) instead of "
                            f"torch.compile, pass the scale through the pipeline call, or use set_adapters weights.")
        return None
    manager.apply_call_scale(state, (extra or {}).get("scale", state.ambient_scale))
    if extra and "scale" in extra:
        # An emptied dict becomes None, as when no scale is given, so a compiled graph sees the same inputs.
        rest = {k: v for k, v in extra.items() if k != "scale"} or None
        return args, {**kwargs, state.call_kwarg: rest}
    return None


def compile(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """``torch.compile`` a component that lorakit serves, keeping call-time scales working without recompiles.

    Adapter changes (``set_adapters``, enable/disable, hotswap, fuse) never recompile a lorakit model, whichever way
    it was compiled. A call-time ``scale`` in the denoiser's kwargs has to be applied before the compiled graph
    runs: this wrapper does that (a plain ``torch.compile`` works too when the scale comes through the pipeline
    call, which applies it around ``encode_prompt``).

    Example:
        >>> pipe.unet = lorakit.compile(pipe.unet, fullgraph=True)   # doctest: +SKIP
        >>> pipe.unet(x, t, e, cross_attention_kwargs={"scale": 0.5})  # doctest: +SKIP
    """
    manager = getattr(model, _ATTR, None)
    if not isinstance(manager, LoraManager):
        raise LoraError(f"lorakit.compile: {type(model).__name__} is not attached; call lorakit.attach first.")
    name = next(n for n, s in manager.states.items() if s.model is model)
    compiled = torch.compile(model, **compile_kwargs)
    if manager.states[name].call_kwarg is not None:
        compiled.register_forward_pre_hook(functools.partial(_call_scale_hook, manager, name), with_kwargs=True)
    return compiled


def _wrap_call(pipe: Any, manager: LoraManager) -> None:
    """Serve the pipeline call's ``cross_attention_kwargs={"scale": s}`` (or joint_/attention_kwargs) from lorakit.

    The scale is taken out of the call and applied to every component for its duration, so the denoiser (compiled
    or not) sees the same inputs whatever the scale, and nothing is left behind afterwards (diffusers keeps it in
    ``pipe._lora_scale``). ``__call__`` is looked up on the type, so the pipeline gets a subclass of its own class
    with the same name; ``save_pretrained`` and ``isinstance`` are unaffected.
    """
    from diffusers import DiffusionPipeline

    cls = type(pipe)
    if not isinstance(pipe, DiffusionPipeline):
        return  # a plain holder of components (tests, benchmarks): nothing to call

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        name = next((k for k in CALL_SCALE_KWARGS if isinstance(kwargs.get(k), dict) and "scale" in kwargs[k]), None)
        if name is None:
            return cls.__call__(self, *args, **kwargs)
        scale = kwargs[name]["scale"]
        kwargs[name] = {k: v for k, v in kwargs[name].items() if k != "scale"} or None
        with manager.ambient_scale(scale):
            return cls.__call__(self, *args, **kwargs)

    __call__.__doc__ = cls.__call__.__doc__
    pipe.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                 "__qualname__": cls.__qualname__})


def _wrap_encode_prompt(pipe: Any, manager: LoraManager) -> None:
    original = getattr(pipe, "encode_prompt", None)
    encoders = [n for n, s in manager.states.items() if s.is_text_encoder]
    if original is None or not encoders:
        return

    @functools.wraps(original)
    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        with manager.call_scale(kwargs.get("lora_scale"), encoders):
            return original(*args, **kwargs)

    object.__setattr__(pipe, "encode_prompt", encode_prompt)
