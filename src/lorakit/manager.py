"""LoraManager: the adapters of one pipeline or model, and every LoRA verb of the diffusers API.

Example:
    >>> import lorakit
    >>> manager = lorakit.attach(pipe)                       # doctest: +SKIP
    >>> pipe.load_lora_weights("style.safetensors", adapter_name="style")   # doctest: +SKIP
    >>> pipe.set_adapters(["style"], adapter_weights=[0.7])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from . import batched, fanout
from . import hotswap as swapping  # `hotswap` is also the diffusers keyword argument
from .adapter import Adapter
from .errors import AdapterError, FusingError, LoraError, preview
from .families import call_scale_kwarg, is_text_encoder, model_family
from .io import open_source
from .layers import LayerState
from .loading import LoadPlan, PlanCache, build_adapter, file_alphas
from .scales import ScaleRule, build_rule
from .state import gc_paused, MODES, ComponentState, FusedEntry

Names = str | Sequence[str]

if TYPE_CHECKING:
    from .merging import MergeReport


def _as_list(names: Names | None) -> list[str] | None:
    if names is None:
        return None
    return [names] if isinstance(names, str) else list(names)


class LoraManager:
    """Owns the adapters of a pipeline's components (or of one bare model) and serves the diffusers LoRA API.

    Args:
        components: ``{name: module}`` for every LoRA-capable component (``unet``, ``text_encoder``...).
        mode: ``"merge"`` (active adapters merged into the weights: base speed, a re-merge per change),
            ``"branch"`` (a stacked runtime branch per layer: cheap changes, a small cost per forward), or
            ``"auto"``: merge for components on an accelerator, branch for components on the CPU.
        backup_device: where the exact copies of targeted weights live (default: each weight's own device).
            Choose ``"cpu"`` to save accelerator memory at the cost of slower switches.
    """

    def __init__(self, components: Mapping[str, nn.Module], *, mode: str = "auto",
                 backup_device: str | torch.device | None = None):
        self.states: dict[str, ComponentState] = {
            name: ComponentState(name, model, is_text_encoder(model), call_scale_kwarg(model))
            for name, model in components.items()
        }
        self.set_mode(mode)
        self.adapters: dict[str, Adapter] = {}
        self.backup_device = torch.device(backup_device) if backup_device is not None else None
        self.hotswap_rank: int | None = None
        # Components fuse_lora acts on by default: the pipeline's own diffusers default (Flux: transformer only).
        self.fuse_defaults: list[str] | None = None
        self._loaded = 0
        self._load_plans = PlanCache()

    def set_mode(self, mode: str) -> None:
        """Switch between merged adapters and runtime branches (see the class docstring); exact either way."""
        if mode not in ("auto", *MODES):
            raise LoraError(f"mode must be one of 'auto', 'merge', 'branch'; found {mode!r}.")
        self.mode = mode
        for state in self.states.values():
            state.mode = mode
            state.sync()

    # ----------------------------------------------------------------------------------------------- helpers
    def _states(self, components: Sequence[str] | None) -> list[ComponentState]:
        if components is None:
            return list(self.states.values())
        unknown = [c for c in components if c not in self.states]
        if unknown:
            raise LoraError(f"unknown component(s) {unknown}; this pipeline has {list(self.states)}.")
        return [self.states[c] for c in components]

    def _check_names(self, names: list[str], states: list[ComponentState] | None = None) -> None:
        known = {a for s in (states or self.states.values()) for a in s.adapters}
        missing = [n for n in names if n not in known]
        if missing:
            raise AdapterError(f"adapter(s) {missing} are not loaded{' in ' + str([s.name for s in states]) if states else ''}; "
                               f"loaded adapters: {sorted(known) or 'none'}.")

    # ----------------------------------------------------------------------------------------------- loading
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor],
                          weight_name: str | None = None, adapter_name: str | None = None, hotswap: bool = False,
                          prefix: str | None = None, *, strict: bool = True, allow_pickle: bool = False,
                          components: Sequence[str] | None = None, **hub_kwargs: Any) -> str:
        """Load a LoRA into every component it targets, make it the active adapter there, and return its name.

        ``src`` is a file, a folder (+ ``weight_name``), a hub repo id (+ ``weight_name``, through huggingface_hub and
        its cache) or a dict of tensors. Formats are detected from the keys. Every key and shape is checked before
        anything changes; keys that match no module raise :class:`LoraError` unless ``strict=False``.

        Example:
            >>> pipe.load_lora_weights("lora.safetensors", adapter_name="style")  # doctest: +SKIP
            'style'
        """
        hub_kwargs.pop("low_cpu_mem_usage", None)  # lorakit never builds throw-away modules: always "low"
        with gc_paused():
            return self._load(pretrained_model_name_or_path_or_dict, weight_name, adapter_name, hotswap, prefix,
                              strict, allow_pickle, components, hub_kwargs)

    def _load(self, src, weight_name, adapter_name, hotswap, prefix, strict, allow_pickle, components,
              hub_kwargs) -> str:
        source = open_source(src, weight_name, allow_pickle=allow_pickle,
                             subfolder=hub_kwargs.pop("subfolder", None),
                             **{k: hub_kwargs.pop(k) for k in ("cache_dir", "local_files_only", "token", "revision")
                                if k in hub_kwargs})
        if hub_kwargs:
            raise LoraError(f"load_lora_weights: unknown keyword argument(s) {sorted(hub_kwargs)}.")
        scope = list(components) if components is not None else None
        if scope is not None:
            self._states(scope)
        if hotswap:
            return self._hotswap(source, adapter_name, scope, prefix, strict)
        name = adapter_name if adapter_name is not None else f"default_{self._loaded}"
        if name in self.adapters:
            raise AdapterError(f"adapter name {name!r} is already in use (loaded from {self.adapters[name].source}). "
                               f"Pick another adapter_name, delete_adapters({name!r}) first, or pass hotswap=True "
                               f"to replace it in place.")
        plan = self._load_plans.plan(source, self.states, scope=scope, prefix=prefix, strict=strict)
        tensors = source.load(self._load_device(plan))
        adapter = build_adapter(plan, name, self.states, tensors)
        swapping.keep_buffer(adapter, source, tensors)
        self._apply_control(plan, tensors)
        if adapter.components:
            self._register(adapter)
            if self.hotswap_rank is not None:  # hotswaps will follow: what they refresh is worked out now, once
                swapping.SwapIndex.of(adapter).settle()
        self._loaded += 1
        return name

    def _apply_control(self, plan: LoadPlan, tensors: Mapping[str, torch.Tensor]) -> None:
        """A FLUX Control LoRA's changes besides weight deltas (checked in the plan): widen layers, overwrite norms."""
        family = model_family({n: s.model for n, s in self.states.items()})
        for m in plan.modules:
            if m.widen_to is not None:
                state = self.states[m.component]
                state.control.widen(state.model, state.index.modules, m.path, m.widen_to, family)
                self._load_plans.clear()  # kept plans checked shapes against the narrow layer
        for comp, norms in plan.norms.items():
            self.states[comp].control.overwrite_norms(self.states[comp].model,
                                                      {param: tensors[key] for param, key in norms.items()})

    def _load_device(self, plan: LoadPlan) -> torch.device:
        """Read tensors straight onto the targets' device when they all share one (no host round trip). Worked out
        once per plan (a plan is kept for the components' placement); were some modules moved since, the deltas
        are still built where their weights are, at the cost of a conversion."""
        device = plan.memo.get("device")
        if device is None:
            devices = {self.states[m.component].index.modules[m.path].weight.device for m in plan.modules}
            device = devices.pop() if len(devices) == 1 else torch.device("cpu")
            device = plan.memo["device"] = device if device.type in ("cpu", "cuda") else torch.device("cpu")
        return device

    def _register(self, adapter: Adapter, activate: bool = True) -> None:
        adapter.family = model_family({n: s.model for n, s in self.states.items()})
        self.adapters[adapter.name] = adapter
        for comp, modules in adapter.layers.items():
            state = self.states[comp]
            grew = False
            for path, delta in modules.items():
                layer = state.layers.get(path)
                if layer is None:
                    layer = state.layers[path] = LayerState(state.index.modules[path], backup_device=self.backup_device)
                    grew = True
                layer.deltas[adapter.name] = delta
            state.adapters.append(adapter.name)
            if activate:
                state.active = [adapter.name]  # as diffusers: a new adapter becomes the one active adapter
            state.rules[adapter.name] = ScaleRule()
            # Plans of other adapter sets stay valid (their layers and deltas did not change) unless layers were added
            # (a plan covers every layer of the component): switching back to them after a load costs no layout.
            state.version += grew
            if grew:
                fanout.predict(state.layers, state.index.modules)
            state.sync()

    def _hotswap(self, source, adapter_name: str | None, scope, prefix, strict) -> str:
        if adapter_name is None or adapter_name not in self.adapters:
            raise AdapterError(f"hotswap=True replaces an existing adapter: pass adapter_name= one of "
                               f"{sorted(self.adapters) or 'none (load one first)'}.")
        fused = [s.name for s in self.states.values() if adapter_name in s.fused_names()]
        if fused:
            raise AdapterError(f"adapter {adapter_name!r} is fused into {fused}; unfuse_lora() before hotswapping it.")
        plan = self._load_plans.plan(source, self.states, scope=scope, prefix=prefix, strict=strict)
        if plan.norms or any(m.widen_to is not None for m in plan.modules):
            raise AdapterError(f"{source.name}: a FLUX Control LoRA (norm overwrites, a widened input layer) cannot be "
                               f"hotswapped; load it with hotswap=False. Adapter {adapter_name!r} is unchanged.")
        if self.hotswap_rank is not None:
            # (ranks first: reading a shape is cheaper than detecting the algorithm of ~1000 modules)
            too_big = [f"{m.component}.{m.path}" for m in plan.modules if "down" in m.keys.fields
                       and source.infos[m.keys.fields["down"]].shape[:1] > (self.hotswap_rank,)
                       and m.keys.algorithm == "lora"]
            if too_big:
                raise AdapterError(f"{source.name}: rank above enable_lora_hotswap(target_rank={self.hotswap_rank}) "
                                   f"at {preview(too_big, 3)}; call enable_lora_hotswap with a larger target_rank "
                                   f"before the first load. Adapter {adapter_name!r} is unchanged.")
        tensors = source.load(self._load_device(plan))
        old = self.adapters[adapter_name]
        by_key = file_alphas(plan, tensors)
        alphas = tuple(by_key.values())
        # (the value copies need every module the file targets still there: not after a delete from a component)
        intact = old.num_modules() == len(plan.modules)
        if intact and swapping.can_copy_buffer(old, plan.layout, source, alphas):
            swapping.copy_buffer(old, source, list(self.states.values()))  # laid out byte for byte as the old file
            return self._swapped(old, source.name, source.metadata)
        if intact and swapping.can_copy_tensors(old, plan.layout, tensors, alphas):
            swapping.copy_tensors(old, tensors, list(self.states.values()))  # same keys, shapes, dtypes: copy each
            return self._swapped(old, source.name, source.metadata)
        copyable = swapping.copyable_subset(old, plan, source.infos, by_key)
        if copyable is not None:  # fewer components, the same keys there: copied in place, no deltas built
            dst, keys, same, left = copyable
            runs = swapping.byte_runs(old, dst, keys, same, tensors)  # (runs of bytes between the two read buffers)
            dst, src = runs if runs is not None else (dst, [tensors[key] for key in keys])
            self._leave_all(old, left)  # (first: the refresh after the copy then covers only what stays)
            swapping.copy_into(old, dst, src, list(self.states.values()))
            old.format, old.layout, old.alphas = plan.parsed.format, plan.layout, alphas
            return self._swapped(old, source.name, source.metadata)
        new = build_adapter(plan, adapter_name, self.states, tensors)
        pairs = swapping.matching_pairs(old, new)
        if pairs is not None:  # same layout (a new checkpoint of the same run): copy the values in place
            swapping.swap_values(old, pairs, list(self.states.values()))
            old.format, old.layout, old.alphas = new.format, new.layout, new.alphas  # (its buffer, if any, stays)
            return self._swapped(old, new.source, new.metadata)
        subset = swapping.matching_subset(old, new)
        if subset is not None:  # the same layout in fewer components: in place there, the adapter leaves the rest
            pairs, left = subset
            swapping.swap_values(old, pairs, list(self.states.values()))
            self._leave_all(old, left)
            old.format, old.layout, old.alphas = new.format, new.layout, new.alphas
            return self._swapped(old, new.source, new.metadata)
        batched.forget(d for modules in old.layers.values() for d in modules.values())
        for comp, modules in old.layers.items():  # drop the old deltas...
            for path in modules:
                self.states[comp].layers[path].deltas.pop(adapter_name, None)
        for comp, modules in new.layers.items():  # ...and put the new ones where the old ones were
            state = self.states[comp]
            for path, delta in modules.items():
                layer = state.layers.get(path)
                if layer is None:
                    layer = state.layers[path] = LayerState(state.index.modules[path], backup_device=self.backup_device)
                layer.deltas[adapter_name] = delta
            fanout.predict(state.layers, state.index.modules)
            if adapter_name not in state.adapters:  # a component the old adapter did not reach: active there too
                state.adapters.append(adapter_name)
                state.active.append(adapter_name)
            state.rules[adapter_name] = ScaleRule()  # as diffusers+PEFT: the swapped-in LoRA starts at weight 1.0
        swapping.keep_buffer(new, source, tensors)
        self.adapters[adapter_name] = new
        for state in self.states.values():
            if adapter_name in state.adapters and state.name not in new.layers:
                state.adapters.remove(adapter_name)
                state.active = [a for a in state.active if a != adapter_name]
            self._prune(state)
            state.version += 1
            state.sync()
        return adapter_name

    def _leave_all(self, adapter: Adapter, components: list[str]) -> None:
        """A hotswapped adapter leaves the components its new file does not reach; it keeps the file keys of the
        tensors it still holds (for the next tensor-copy swap)."""
        gone = {id(t) for comp in components for d in adapter.layers.get(comp, {}).values() for t in d.leaves()}
        for comp in components:
            self._leave(adapter.name, self.states[comp])
        adapter.origins = [(t, key) for t, key in adapter.origins if id(t) not in gone]
        if adapter.swap_index is not None:
            adapter.swap_index.keep_components(adapter)

    def _leave(self, name: str, state: ComponentState) -> None:
        """A hotswap's adapter leaves a component its new file does not reach (as a new structure would: no other
        adapter is activated in its place), restoring what it held there."""
        for path in self.adapters[name].layers.get(state.name, {}):
            state.layers[path].deltas.pop(name, None)
        self._forget(name, state.name)
        state.adapters.remove(name)
        state.active = [a for a in state.active if a != name]
        state.rules.pop(name, None)
        self._prune(state)
        state.version += 1
        state.sync()

    def _swapped(self, adapter: Adapter, source: str, metadata: Mapping[str, str]) -> str:
        """Finish a hotswap that changed ``adapter``'s values in place."""
        adapter.source, adapter.metadata = source, dict(metadata)
        for state in self.states.values():
            if adapter.name in state.adapters:
                state.rules[adapter.name] = ScaleRule()  # as diffusers+PEFT: the swapped-in LoRA starts at 1.0
                state.sync()
        return adapter.name

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """Prepare for hotswapping. lorakit merges adapters into the weights in place, so a hotswap never changes a
        module, a shape or a Python attribute that a compiled graph depends on: any rank and any set of target layers
        can be swapped in. ``target_rank`` is kept as an upper bound that hotswaps are checked against."""
        if target_rank < 1:
            raise LoraError(f"enable_lora_hotswap: target_rank must be >= 1, found {target_rank}.")
        self.hotswap_rank = int(target_rank)

    # ----------------------------------------------------------------------------------------------- merging
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", *, density: float | None = None,
                             majority_sign_method: str = "total", svd_rank: int | None = None,
                             svd_clamp: float | None = None, seed: int | None = None,
                             svd_full_matrices: bool = True, svd_driver: str | None = None,
                             components: Sequence[str] | None = None) -> MergeReport:
        """Create adapter ``adapter_name`` by merging loaded adapters, in every component they touch, with PEFT's
        ``LoraModel.add_weighted_adapter`` methods and semantics (see :mod:`lorakit.merging`), for any ranks with
        ``cat`` and the ``*_svd`` methods. The sources and the base weights are unchanged; the new adapter is
        registered like a loaded one and, as in PEFT, not activated (``set_adapters`` it). Returns a per-module
        report (new ranks, SVD truncation errors). ``svd_full_matrices``/``svd_driver`` are accepted for PEFT
        compatibility and do not change the result.

        Example:
            >>> pipe.add_weighted_adapter(["a", "b"], [0.7, 0.8], "mix", "ties", density=0.5)  # doctest: +SKIP
            >>> pipe.set_adapters("mix")                                                    # doctest: +SKIP
        """
        from .merging import merge_adapters

        names = _as_list(adapters)
        states = self._states(components)
        self._check_names(names, states)
        if adapter_name in self.adapters:
            raise AdapterError(f"add_weighted_adapter: adapter name {adapter_name!r} is already in use; pick another "
                               f"adapter_name or delete_adapters({adapter_name!r}) first.")
        scope = {s.name for s in states}
        inputs = [Adapter(n, {c: m for c, m in self.adapters[n].layers.items() if c in scope}) for n in names]
        shape_of = lambda comp, path, ds: tuple(self.states[comp].index.modules[path].weight.shape)  # noqa: E731
        merged, report = merge_adapters(inputs, weights, adapter_name, combination_type, shape_of=shape_of,
                                        density=density, majority_sign_method=majority_sign_method,
                                        svd_rank=svd_rank, svd_clamp=svd_clamp, seed=seed)
        self._register(merged, activate=False)
        return report

    # ------------------------------------------------------------------------------------ activation & scales
    def set_adapters(self, adapter_names: Names, adapter_weights: Any = None, *,
                     components: Sequence[str] | None = None) -> None:
        """Activate these adapters (and only these) with per-adapter weights.

        A weight is a float, None (1.0), or a dict per component (``{"unet": ..., "text_encoder": 0.5}``), where a
        denoiser's value may itself be a per-block dict (see :mod:`lorakit.scales`).

        Example:
            >>> pipe.set_adapters(["ikea", "feng"], adapter_weights=[0.7, 0.8])  # doctest: +SKIP
        """
        names = _as_list(adapter_names)
        states = self._states(components)
        if len(set(names)) != len(names):
            raise AdapterError(f"set_adapters: adapter names must be unique, found {names}.")
        self._check_names(names, states)
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise LoraError(f"set_adapters: {len(names)} adapter name(s) but {len(weights)} weight(s); give one "
                            f"weight per adapter.")
        plans: dict[str, tuple[list[str], dict[str, ScaleRule]]] = {}
        for state in states:
            active, rules = [], {}
            for name, weight in zip(names, weights):
                value = weight
                if isinstance(weight, Mapping) and components is None:
                    unknown = [k for k in weight if k not in self.states]
                    if unknown:
                        raise LoraError(f"set_adapters: weights for {name!r} name component(s) {unknown}; this "
                                        f"pipeline has {list(self.states)}.")
                    value = weight.get(state.name)
                if name in state.adapters:
                    active.append(name)
                    rules[name] = build_rule(state.model, value, f"weight of {name!r} for {state.name}")
            plans[state.name] = (active, rules)
        for state in states:  # everything checked: now apply
            state.active, rules = plans[state.name]
            state.rules.update(rules)
            state.sync()

    def disable_lora(self, components: Sequence[str] | None = None) -> None:
        """Run the base model (fused adapters included) while keeping every adapter loaded."""
        for state in self._states(components):
            state.enabled = False
            state.sync()

    def enable_lora(self, components: Sequence[str] | None = None) -> None:
        """Undo :meth:`disable_lora`."""
        for state in self._states(components):
            state.enabled = True
            state.sync()

    def get_active_adapters(self) -> list[str]:
        """Active adapters over all components, in order of first appearance."""
        out: list[str] = []
        for state in self.states.values():
            out += [a for a in state.active if a not in out]
        return out

    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{component: [loaded adapter names]}`` for components that hold any."""
        return {s.name: list(s.adapters) for s in self.states.values() if s.adapters}

    @contextlib.contextmanager
    def call_scale(self, scale: float | None, components: Sequence[str] | None = None) -> Iterator[None]:
        """Scale every active, unfused adapter by ``scale`` for the duration of a call (diffusers' runtime scale);
        None means the scale of the pipeline call in progress, if any."""
        states = self._states(components)
        try:
            for s in states:
                self.apply_call_scale(s, scale)
            yield
        finally:
            for s in states:
                self.apply_call_scale(s, None)

    @contextlib.contextmanager
    def ambient_scale(self, scale: float) -> Iterator[None]:
        """A pipeline call's scale: applied to every component now, and the default of its denoiser's forwards."""
        try:
            for s in self.states.values():
                s.ambient_scale = float(scale)
                self.apply_call_scale(s, scale)
            yield
        finally:
            for s in self.states.values():
                s.ambient_scale = 1.0
                self.apply_call_scale(s, 1.0)

    def apply_call_scale(self, state: ComponentState, scale: float | None) -> None:
        """Set the call-time scale a component's weights/branches hold (None: the ambient pipeline call's)."""
        scale = state.ambient_scale if scale is None else float(scale)
        if scale != state.call_scale:
            state.call_scale = scale
            state.sync()

    # ----------------------------------------------------------------------------------------- fuse / unfuse
    def fuse_lora(self, components: Sequence[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: Names | None = None, **deprecated: Any) -> None:
        """Bake adapters (default: the active ones) into the weights at their current weights times ``lora_scale``.

        Fused adapters stop being affected by ``set_adapters`` and call-time scales; :meth:`unfuse_lora` removes
        them exactly. With ``safe_fusing=True`` every new weight is checked for NaN/inf first and nothing changes if
        one is found.
        """
        if deprecated:
            raise LoraError(f"fuse_lora: unknown keyword argument(s) {sorted(deprecated)}; use components=[...].")
        names = _as_list(adapter_names)
        if components is None and self.fuse_defaults is not None:
            components = [c for c in self.fuse_defaults if c in self.states]
        states = self._states(components)
        if names is not None:
            self._check_names(names)
        entries: list[tuple[ComponentState, FusedEntry]] = []
        merged = {state.name: state.merged_live() for state in states}
        for state in states:
            fused = set(state.fused_names())
            chosen = [n for n in (names if names is not None else state.active) if n in state.adapters and n not in fused]
            rule_of = lambda n: state.rules.get(n, ScaleRule())  # noqa: E731
            for name in chosen:
                contribs = {path: (layer.deltas[name], rule_of(name)(path) * lora_scale * layer.deltas[name].scale)
                            for path, layer in state.layers.items() if name in layer.deltas}
                entries.append((state, FusedEntry(name, contribs)))
        if safe_fusing:
            for state, entry in entries:
                for path in entry.contributions:
                    layer = state.layers[path]
                    planned = state.fused_part(path) + [entry.contributions[path]]
                    if not torch.isfinite(layer.compute(planned)).all():
                        raise FusingError(f"fuse_lora(safe_fusing=True): adapter {entry.adapter!r} gives non-finite "
                                          f"weights at {state.name}.{path}. Nothing was fused; check the LoRA file.")
        for state, entry in entries:
            state.fused.append(entry)
        for state in {id(s): s for s, _ in entries}.values():
            fusing = [e.adapter for s, e in entries if s is state]
            if lora_scale == 1.0 and merged[state.name] == fusing and not state._live_rules():
                state.hold()  # the weights hold exactly these contributions already: nothing to write or lay out
            else:
                state.sync()

    def unfuse_lora(self, components: Sequence[str] | None = None, **deprecated: Any) -> None:
        """Remove every fused adapter from these components; base weights come back bit-exactly. As diffusers, norm
        weights a FLUX Control LoRA overwrote come back too."""
        for state in self._states(components):
            state.control.restore_norms(state.model)
            if state.fused:
                state.fused.clear()
                state.sync()

    @property
    def num_fused_loras(self) -> int:
        return len({f.adapter for s in self.states.values() for f in s.fused})

    @property
    def fused_loras(self) -> dict[str, list[str]]:
        return {s.name: s.fused_names() for s in self.states.values() if s.fused}

    # ------------------------------------------------------------------------------------ delete / unload
    def delete_adapters(self, adapter_names: Names, components: Sequence[str] | None = None) -> None:
        """Remove adapters and their layers; a fused adapter stays fused (its fused delta is kept for unfuse)."""
        names = _as_list(adapter_names)
        states = self._states(components)
        self._check_names(names, states)
        for state in states:
            for name in names:
                if name not in state.adapters:
                    continue
                state.adapters.remove(name)
                was_active = name in state.active
                state.active = [a for a in state.active if a != name]
                if was_active and not state.active and state.adapters:
                    state.active = [state.adapters[0]]  # as PEFT: the first remaining adapter takes over
                state.rules.pop(name, None)
                for layer in state.layers.values():
                    layer.deltas.pop(name, None)  # signatures change only where it was live: only those re-merge
                self._forget(name, state.name)
            self._prune(state)
            state.version += 1
            state.sync()

    def _forget(self, name: str, component: str, evict: bool = True) -> None:
        adapter = self.adapters.get(name)
        if adapter is None:
            return
        if evict:
            batched.forget(adapter.layers.get(component, {}).values())
        adapter.layers.pop(component, None)
        if not adapter.components:
            del self.adapters[name]

    def _prune(self, state: ComponentState) -> None:
        """Drop layers that hold no adapter and no fused delta (restoring their base first)."""
        gone = [p for p, layer in state.layers.items() if not layer.deltas
                and not any(p in f.contributions for f in state.fused)]
        batched.write_many([(state.layers[p], []) for p in gone])  # exact restores, batched
        for path in gone:
            state.layers.pop(path).drop()
        if gone:
            state.version += 1
            fanout.predict(state.layers, state.index.modules)

    def unload_lora_weights(self, reset_to_overwritten_params: bool = False,
                            components: Sequence[str] | None = None) -> None:
        """Remove every adapter. Weights return bit-exactly to the base, except what the user fused, which stays
        fused (diffusers' fuse -> unload -> save_pretrained / compile flow). Norm weights a FLUX Control LoRA
        overwrote come back; layers it widened stay wide unless ``reset_to_overwritten_params`` (diffusers' flag),
        which puts the original layers and config values back.

        Example:
            >>> pipe.unload_lora_weights(reset_to_overwritten_params=True)  # doctest: +SKIP
        """
        with gc_paused():
            self._unload(self._states(components), reset_to_overwritten_params)

    def _unload(self, states: list[ComponentState], reset: bool) -> None:
        deltas = (d for s in states for name in s.adapters if name in self.adapters
                  for d in self.adapters[name].layers.get(s.name, {}).values())
        batched.forget(deltas)  # one pass over the stack cache for every adapter unloaded (none: not walked)
        for state in states:
            state.control.restore_norms(state.model)
            if state.fused and state.enabled:  # what the user fused stays fused
                batched.write_many([(layer, state.fused_part(path)) for path, layer in state.layers.items()])
            else:
                batched.restore_all(state.layers.values())
            for layer in state.layers.values():
                layer.drop()
            for name in list(state.adapters):
                self._forget(name, state.name, evict=False)
            state.layers.clear()
            state.adapters.clear()
            state.active.clear()
            state.rules.clear()
            state.fused.clear()
            state.enabled = True
            state.version += 1
            state.forget_plans()  # they hold the unloaded deltas
            if reset:
                state.control.reset_widened(state.model, state.index.modules)
                self._load_plans.clear()

    # ----------------------------------------------------------------------------------------------- info
    def __repr__(self) -> str:
        parts = [f"{s.name}: {len(s.adapters)} adapter(s), {len(s.layers)} layer(s)" for s in self.states.values()]
        return f"LoraManager({'; '.join(parts)})"


# Saving lives in its own module; bound here so the manager exposes the diffusers verbs in one place.
from .saving import save_lora_adapter, save_lora_weights  # noqa: E402

LoraManager.save_lora_adapter = save_lora_adapter  # type: ignore[attr-defined]
LoraManager.save_lora_weights = save_lora_weights  # type: ignore[attr-defined]
