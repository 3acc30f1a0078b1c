"""Plan a load (every key and shape checked against the model, nothing read or changed), then build the adapter.

Splitting the two is what keeps a failed load from leaving a model half-changed: :func:`plan_load` raises
:class:`LoraError` for any problem, and only a complete plan reaches :func:`build_adapter`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from . import control
from .adapter import Adapter, WeightDelta
from .errors import LoraKeyError, LoraShapeError, preview
from .families import model_family
from .formats import ModuleKeys, ParsedKeys, parse_keys
from .formats.build import build_delta, check_shapes
from .formats.split import fused_module, split_delta
from .io import LoraSource
from .keymaps import (
    NAMESPACE_ALIASES,
    Target,
    comfy_text_encoder,
    map_key,
    strip_original_prefix,
)
from .state import ComponentState

DENOISER_ALIASES = (None, "unet", "transformer")


@dataclass
class PlannedModule:
    component: str
    path: str
    keys: ModuleKeys
    alpha: float | None
    rows: tuple[int, int] | None = None  # output rows of a fused file layer that this module takes
    total_rows: int = 0  # outputs of that fused layer
    swap_halves: bool = False
    pad_to: int | None = None  # a LoRA for the narrow layer on one a FLUX Control LoRA widened: pad down to this
    widen_to: int | None = None  # a FLUX Control LoRA: the layer is widened to this many inputs


@dataclass
class LoadPlan:
    source: LoraSource | None  # None only in PlanCache's kept copies (they must not hold a file's tensors)
    parsed: ParsedKeys
    modules: list[PlannedModule] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    layout: tuple | None = None  # set by PlanCache: files with equal layouts build adapters of equal layouts
    norms: dict[str, dict[str, str]] = field(default_factory=dict)  # component -> {norm parameter: file key}
    #: what a load works out from the modules alone (the device to read to), once: shared by the copies PlanCache
    #: hands out for files of this layout
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def components(self) -> list[str]:
        return sorted({m.component for m in self.modules})


def component_for(namespace: str | None, states: Mapping[str, ComponentState]) -> str | None:
    """The component a namespace of keys belongs to (``unet.``/``transformer.``/unprefixed -> the denoiser)."""
    if namespace in states:
        return namespace
    denoisers = [n for n, s in states.items() if not s.is_text_encoder]
    if namespace in DENOISER_ALIASES and denoisers:
        return denoisers[0]
    if namespace is None and len(states) == 1:
        return next(iter(states))
    return None


def peft_alphas(metadata: Mapping[str, str]) -> dict[str | None, tuple[float | None, dict[str, float]]]:
    """Alphas from diffusers' ``lora_adapter_metadata`` (PEFT LoraConfig fields), per key namespace."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str | None, tuple[float | None, dict[str, float]]] = {}
    groups: dict[str | None, dict] = {}
    for key, value in meta.items():
        ns, _, fld = key.rpartition(".")
        groups.setdefault(ns or None, {})[fld] = value
    for ns, cfg in groups.items():
        alpha = cfg.get("lora_alpha")
        out[ns] = (float(alpha) if alpha is not None else None, dict(cfg.get("alpha_pattern") or {}))
    return out


def _alpha_for(path: str, namespace: str | None, alphas: dict) -> float | None:
    alpha, pattern = alphas.get(namespace) or alphas.get(None) or (None, {})
    for pat, value in pattern.items():  # PEFT matches patterns against the end of the module path
        if re.fullmatch(rf"(.*\.)?{pat}", path):
            return float(value)
    return alpha


def _route(namespace: str | None, states: Mapping[str, ComponentState], scope: list[str] | None,
           prefix: str | None, unprefixed: bool) -> str | None | bool:
    """The component for keys of ``namespace``; None if none fits (an error), False if out of scope (ignored)."""
    single = scope[0] if scope is not None and len(scope) == 1 else None
    if prefix is not None and namespace != prefix and not unprefixed:
        return False
    if single is not None and (prefix is not None or namespace is None):
        return single
    comp = component_for(namespace, states)
    if scope is not None and comp not in scope:
        return False
    return comp


def plan_load(source: LoraSource, states: Mapping[str, ComponentState], *, scope: list[str] | None = None,
              prefix: str | None = None, strict: bool = True) -> LoadPlan:
    """Check every key and shape of ``source`` against the model; raise LoraError before anything changes."""
    family = model_family({n: s.model for n, s in states.items()})
    norms, keys = control.split_norm_keys(list(source.infos), family)
    parsed = parse_keys(keys)
    plan = LoadPlan(source, parsed)
    alphas = peft_alphas(source.metadata)
    shapes = {k: v.shape for k, v in source.infos.items()}
    shape_errors: list[str] = []
    entries = [_comfy_text_encoder(e, family) for e in parsed.modules]
    # A file whose keys carry no component prefix at all belongs to whatever model it is loaded into.
    unprefixed = all(e.namespace is None for e in entries)
    shape_errors += _plan_norms(plan, norms, shapes, states, scope, prefix, unprefixed)
    taken: dict[tuple[str, str], str] = {}
    aliases = NAMESPACE_ALIASES.get(family or "", {})
    for entry in entries:
        namespace = entry.namespace if entry.namespace in states else aliases.get(entry.namespace, entry.namespace)
        comp = _route(namespace, states, scope, prefix, unprefixed)
        if comp is False:
            plan.ignored.extend(entry.fields.values())
            continue
        targets = resolve_targets(entry, states[comp], family) if comp is not None else None
        if targets is None:
            plan.unmatched.extend(entry.fields.values())
            continue
        planned = _plan_targets(entry, comp, states[comp], targets, shapes, family)
        if isinstance(planned, str):
            shape_errors.append(planned)
            continue
        for m in planned:
            if (comp, m.path) in taken:
                raise LoraKeyError(f"{source.name}: {entry.display} and {taken[comp, m.path]} both target "
                                   f"{comp}.{m.path}; a file may hold one LoRA per module. Nothing was loaded.")
            taken[comp, m.path] = entry.display
            m.alpha = _alpha_for(m.path, entry.namespace, alphas)
            plan.modules.append(m)
    name = source.name
    if shape_errors:
        raise LoraShapeError(f"{name}: {len(shape_errors)} module(s) do not fit this model, e.g. "
                             f"{shape_errors[0]}. Is this LoRA made for another model family (an SD1.5 LoRA on "
                             f"SDXL, say)? Nothing was loaded.")
    unusable = plan.unmatched + parsed.unused
    if unusable and strict:
        where = ", ".join(f"{n}: {type(s.model).__name__}" for n, s in states.items())
        raise LoraKeyError(f"{name}: {len(unusable)} key(s) match no module of the model ({where}): "
                           f"{preview(unusable, 5)}.{_diff_note(unusable)} Check the LoRA is made for this model, or "
                           f"pass strict=False to load the rest. Nothing was loaded.")
    if unusable:
        warnings.warn(f"{name}: skipped {len(unusable)} key(s) that match no module: {preview(unusable, 5)}.",
                      stacklevel=3)
    if parsed.embeddings:
        warnings.warn(f"{name}: the file carries {len(parsed.embeddings)} textual-inversion embedding tensor(s) "
                      f"({preview(parsed.embeddings, 4)}); lorakit loads LoRA layers only, load the embeddings "
                      f"with pipe.load_textual_inversion.", stacklevel=3)
    if not plan.modules and not plan.norms:
        raise LoraKeyError(f"{name}: no LoRA layer in this file targets the model (found {len(source.infos)} keys, "
                           f"format {parsed.format!r}{', prefix ' + repr(prefix) if prefix else ''}). "
                           f"Nothing was loaded.")
    return plan


class PlanCache:
    """Load plans of recent files, keyed by what planning reads: the header's keys, dtypes and shapes, the PEFT
    metadata (alphas), the arguments, and the components' module indexes. Files from one trainer share all of that
    (a hotswap of a new checkpoint, a reload), and their ~2,000 keys then need no parsing, mapping or shape checks.
    Plans that warned (skipped keys, embeddings) are not kept, so the warning repeats on every load."""

    def __init__(self, size: int = 8):
        self.size = size
        self._plans: dict[tuple, tuple[LoadPlan, list]] = {}

    def plan(self, source: LoraSource, states: Mapping[str, ComponentState], *, scope: list[str] | None = None,
             prefix: str | None = None, strict: bool = True) -> LoadPlan:
        """:func:`plan_load`, or a kept plan of a file with the same layout (for ``source``)."""
        indexes = [s.index for s in states.values()]
        key = (tuple(sorted((k, i.dtype, i.shape) for k, i in source.infos.items())),  # a dict's order is the caller's
               source.metadata.get("lora_adapter_metadata"),  # the only metadata planning reads (alphas)
               tuple(scope) if scope is not None else None, prefix, strict, tuple(map(id, indexes)),
               tuple(_placement(s.model) for s in states.values()))  # deltas are built where the weights are
        hit = self._plans.get(key)
        if hit is not None:
            self._plans[key] = self._plans.pop(key)  # most recent last
            return dataclasses.replace(hit[0], source=source)
        plan = plan_load(source, states, scope=scope, prefix=prefix, strict=strict)
        plan.layout = key
        if not (plan.unmatched or plan.parsed.unused or plan.parsed.embeddings):
            # kept without its source: the file's tensors (its whole data section) must die with the adapter.
            # The indexes are kept alive so that their ids stay theirs.
            self._plans[key] = (dataclasses.replace(plan, source=None), indexes)
            while len(self._plans) > self.size:
                self._plans.pop(next(iter(self._plans)))
        return plan

    def clear(self) -> None:
        self._plans.clear()


def _placement(model: torch.nn.Module) -> tuple | None:
    param = next(model.parameters(), None)
    return None if param is None else (param.device, param.dtype)


def _comfy_text_encoder(entry: ModuleKeys, family: str | None) -> ModuleKeys:
    """ComfyUI's ``text_encoders.clip_l.transformer.…`` keys, read as the text encoder's own."""
    found = comfy_text_encoder(entry.key, family) if entry.namespace is None else None
    return entry if found is None else dataclasses.replace(entry, namespace=found[0], key=found[1])


def _plan_targets(entry: ModuleKeys, comp: str, state: ComponentState, targets: list[Target],
                  shapes: Mapping[str, tuple[int, ...]], family: str | None) -> list[PlannedModule] | str:
    """The planned modules of one file module, or why its tensors do not fit (several targets: checked as the fused
    layer they were cut from; a FLUX Control LoRA's wider input layer: checked as the widened layer)."""
    modules = [state.index.modules[t.path] for t in targets]
    where = f"{entry.display} -> {comp}.{'+'.join(t.path for t in targets)}"
    try:
        module = modules[0] if len(modules) == 1 else fused_module(modules)
    except ValueError as exc:
        return f"{where}: {exc}"
    widen = pad = None
    if len(modules) == 1:
        module, widen, pad = control.fit_width(where, control.lora_width(entry.fields, shapes), targets[0].path,
                                               module, state.control, family, targets[0].path in state.layers)
    problem = check_shapes(entry, shapes, module)
    if problem:
        return f"{where}: {problem}"
    total = int(module.weight.shape[0])
    return [PlannedModule(comp, t.path, entry, None, t.rows, total, t.swap_halves, pad, widen) for t in targets]


def _plan_norms(plan: LoadPlan, norms: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]],
                states: Mapping[str, ComponentState], scope: list[str] | None, prefix: str | None,
                unprefixed: bool) -> list[str]:
    """Route a FLUX Control LoRA's norm overwrites to the denoiser and check their shapes; returns the problems."""
    by_comp: dict[str, dict[str, str]] = {}
    for key, param in norms.items():
        namespace = "transformer" if key.startswith(control.DENOISER_PREFIX) else None
        comp = _route(namespace, states, scope, prefix, unprefixed)
        if comp is False:
            plan.ignored.append(key)
        elif comp is None or states[comp].is_text_encoder:
            plan.unmatched.append(key)
        else:
            by_comp.setdefault(comp, {})[key] = param
    problems = []
    for comp, found in by_comp.items():
        params = dict(states[comp].model.named_parameters())
        problems += control.check_norms(found, params, shapes)
        plan.norms[comp] = {param: key for key, param in found.items()}
    return problems


def resolve_targets(entry: ModuleKeys, state: ComponentState, family: str | None) -> list[Target] | None:
    """Where a file module goes: its own name, the name without an original-checkpoint prefix
    (``diffusion_model.``), or the family's key map (keymaps.py), which may split a fused layer over several."""
    index = state.index
    path = index.resolve(entry)
    if path is None and entry.style == "dotted":
        path = index.dotted.get(strip_original_prefix(entry.key))
    if path is not None:
        return [Target(path)]
    if state.is_text_encoder:
        return None
    return map_key(entry.key, family, index.modules)


def _diff_note(keys: list[str]) -> str:
    """Why ``.diff``/``.diff_b`` tensors (ComfyUI/Wan full-weight and bias differences) do not load."""
    diffs = [k for k in keys if k.endswith((".diff", ".diff_b"))]
    if not diffs:
        return ""
    return (f" {len(diffs)} of them are full weight/bias differences (.diff, .diff_b) whose shapes or names fit no "
            f"layer of this model.")


def build_adapter(plan: LoadPlan, name: str, states: Mapping[str, ComponentState],
                  tensors: Mapping[str, torch.Tensor], *, place: bool = True) -> Adapter:
    """Build each module's delta on its target's device and dtype (as read, with ``place=False``: conversions)."""
    layers: dict[str, dict[str, WeightDelta]] = {}
    built: dict[int, tuple[WeightDelta, tuple]] = {}  # a fused file layer is built once and split over its targets
    alphas = file_alphas(plan, tensors)
    numbers = alphas  # the file's alphas as numbers (read in one transfer): no device sync per module
    placed: dict[tuple, torch.Tensor] = {}  # (key, (device, dtype)) -> converted copy
    owned: dict[str, torch.Tensor] = {}  # key -> our copy of a caller's tensor
    origins: dict[int, str] = {}  # id of a tensor the deltas hold as read -> its key
    borrowed = plan.source.path is None  # an in-memory state dict: its tensors belong to the caller

    def reader(where: tuple | None) -> Callable[[str], torch.Tensor]:
        def read(key: str) -> torch.Tensor | float:  # each file tensor converted once, only if it must be
            if key in numbers:
                return numbers[key]
            t = tensors[key]
            if where is None:
                return t
            if (t.device, t.dtype) == where:
                if borrowed:  # a hotswap writes into the deltas' tensors: never into the caller's
                    t = owned[key] = owned[key] if key in owned else t.clone()
                origins[id(t)] = key
                return t
            if (key, where) not in placed:
                placed[key, where] = t.to(*where)
            return placed[key, where]
        return read

    for m in plan.modules:
        weight = states[m.component].index.modules[m.path].weight
        where = (weight.device, weight.dtype) if place and weight.is_floating_point() else None
        whole = built.get(id(m.keys))
        if whole is None:
            shape = tuple(weight.shape) if m.rows is None and not m.swap_halves else None  # fused: no one target
            whole = built[id(m.keys)] = (build_delta(m.keys, reader(where), m.alpha, shape), where)
        delta = split_delta(whole[0], m.rows, m.total_rows, m.swap_halves)
        if m.pad_to is not None:
            delta = control.pad_down(delta, m.pad_to)
        if place and where != whole[1]:  # a fused layer's targets on different devices or dtypes
            delta.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        layers.setdefault(m.component, {})[m.path] = delta
    adapter = Adapter(name=name, layers=layers, source=plan.source.name, format=plan.parsed.format,
                      metadata=dict(plan.source.metadata), layout=plan.layout, alphas=tuple(alphas.values()))
    adapter.origins = _origins(adapter, origins)
    return adapter


def _origins(adapter: Adapter, origins: Mapping[int, str]) -> list[tuple[torch.Tensor, str]]:
    """(tensor, file key) for every tensor the deltas hold, when each is a file tensor used as it is (else [])."""
    out, seen = [], set()
    for modules in adapter.layers.values():
        for delta in modules.values():
            for t in delta.leaves():
                if id(t) not in seen:
                    key = origins.get(id(t))
                    if key is None:
                        return []
                    seen.add(id(t))
                    out.append((t, key))
    return out


def file_alphas(plan: LoadPlan, tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The file's one-element ``.alpha`` tensors as numbers (sorted by key), read in one transfer."""
    keys = sorted({m.keys.fields["alpha"] for m in plan.modules if "alpha" in m.keys.fields})
    keys = [k for k in keys if tensors[k].numel() == 1]
    if not keys:
        return {}
    values = torch.stack([tensors[k].reshape(()).float() for k in keys]).cpu().tolist()
    return dict(zip(keys, values))
