"""Per-component bookkeeping: which adapters a component holds, which are active, fused, and at what scale."""

from __future__ import annotations

import contextlib
import gc
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import plan, pool
from .control import ControlState
from .layers import Contribution, LayerState, _signature
from .scales import ScaleRule
from .targets import ModuleIndex

MODES = ("merge", "branch")
KEPT_PLANS = 4  # plans of this many recent structures stay ready (branch mode: their stacked factors cost memory)
KEPT_LAYOUTS = 2  # merge mode's group-kernel layouts (a fuse and an unfuse switch between two)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector while a load or a switch builds its few thousand small objects:
    with a diffusers pipeline in memory, the full collections they would trigger cost tens of ms each."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_SERIALS = itertools.count(1)


@dataclass
class FusedEntry:
    """An adapter the user fused: the exact contributions it was fused with, kept so unfuse is exact."""

    adapter: str
    contributions: dict[str, Contribution]
    # Switch plans are kept under keys naming the fused entries. Not by id(): an entry freed by unfuse_lora leaves its
    # address to the next one, and a fuse at another scale then reran the plan kept for the old entry (stale weights)
    serial: int = field(default_factory=lambda: next(_SERIALS))


@dataclass
class ComponentState:
    """One LoRA-capable component (``unet``, ``transformer``, ``text_encoder``...) of a pipeline or a bare model."""

    name: str
    model: nn.Module
    is_text_encoder: bool
    call_kwarg: str | None = None
    mode: str = "merge"
    layers: dict[str, LayerState] = field(default_factory=dict)
    adapters: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    rules: dict[str, ScaleRule] = field(default_factory=dict)
    fused: list[FusedEntry] = field(default_factory=list)
    enabled: bool = True
    call_scale: float = 1.0  # the call-time scale the weights/branches hold now
    ambient_scale: float = 1.0  # the call-time scale of the pipeline call in progress (1.0 outside one)
    version: int = 0  # bumped by the manager whenever layers or their deltas change: a new switch plan is due
    control: ControlState = field(default_factory=ControlState)  # FLUX Control LoRAs: norm overwrites, widened layers
    _index: ModuleIndex | None = None
    _plan: plan.SwitchPlan | None = None
    _plans: dict[tuple, plan.SwitchPlan] = field(default_factory=dict)  # recent plans, oldest first
    # merge mode: the group kernel's layouts of the loaded adapters, most recent last (see plan.KernelLayout)
    _layouts: dict[tuple, plan.KernelLayout] = field(default_factory=dict)
    _held: tuple | None = None  # a structure key the weights hold without a plan of its own (see hold())
    _pools: pool.Pools | None = None  # branch mode: the layers' factor pools, grouped (see lorakit.pool)
    _pooled: bool = False  # the layers run on their pools' groups now (not on a switch plan's branches)

    @property
    def index(self) -> ModuleIndex:
        if self._index is None:
            self._index = ModuleIndex(self.model)
        return self._index

    def fused_names(self) -> list[str]:
        return [f.adapter for f in self.fused]

    def fused_part(self, path: str) -> list[Contribution]:
        """What the user fused into the weight at ``path`` (nothing while the component is disabled)."""
        if not self.enabled:
            return []
        return [f.contributions[path] for f in self.fused if path in f.contributions]

    def _live_rules(self) -> list[tuple[str, ScaleRule, float | None]]:
        """(name, rule, the rule's multiplier if it is the same for every layer) of each live adapter."""
        if not self.enabled:
            return []
        fused = set(self.fused_names())
        out = []
        for name in self.active:
            if name not in fused:
                rule = self.rules.get(name, ScaleRule())
                out.append((name, rule, None if rule.prefixes else rule.default * self.call_scale))
        return out

    def resolved_mode(self) -> str:
        """``auto`` is decided at each sync from where the model is now (it may have moved since attach)."""
        if self.mode != "auto":
            return self.mode
        param = next(self.model.parameters(), None)
        return "branch" if param is None or param.device.type == "cpu" else "merge"

    def sync(self) -> None:
        """Bring every layer's weight (and branch) in line with the current state.

        In branch mode with uniform weights and nothing fused, any change (a new adapter set included) only points
        the layers' groups at spans of their factor pools (see :mod:`lorakit.pool`). Otherwise a change of structure
        (which deltas sit where, fused, mode, enabled) lays out a new switch plan; a change of weights or call-time
        scale only reruns the current one (see :mod:`lorakit.plan`)."""
        mode, live, fused, key = self._structure()
        if key == self._held:
            return  # the weights already hold this structure, which has no live adapter to rescale (see hold())
        self._held = None
        factors = [uniform for _, _, uniform in live]
        per_path = {j: [rule(path) * self.call_scale for path in self.layers]
                    for j, (_, rule, uniform) in enumerate(live) if uniform is None}
        with gc_paused():
            if self._switch_pools(mode, live, fused):
                return
            if self._plan is None or self._plan.key != key:
                self._plan = self._next_plan(key, mode, live, fused, factors, per_path)
            self._plan.run(factors, per_path)

    def _switch_pools(self, mode: str, live: list, fused: list[FusedEntry]) -> bool:
        """Branch mode with uniform weights and nothing fused: point the layers' groups at the live adapters' spans
        of their pools, O(groups) (see :mod:`lorakit.pool`). False where that does not serve (per-layer weights,
        fused adapters, no live adapter, a delta with no branch form, a span with too many idle ranks): a switch
        plan then does the work, and the layers leave their groups."""
        if mode != "branch":
            self._drop_pools()
            return False
        usable = bool(live) and not fused and all(uniform is not None for *_, uniform in live)
        if usable:
            param = next(self.model.parameters(), None)
            key = (tuple(self.adapters), self.version, None if param is None else (param.device, param.dtype))
            laid_out = self._pools is None or self._pools.key != key
            if laid_out:
                self._pools = pool.Pools.layout(key, self.layers.values(), self.adapters)
            usable = self._pools.groups is not None and self._pools.switch([(n, u) for n, _, u in live])
        if not usable:
            self._leave_pools()
            return False
        if laid_out or not self._pooled:
            self._pools.enter()
            self._pooled, self._plan = True, None  # a later plan-served structure reattaches its own branches
        return True

    def _leave_pools(self) -> None:
        """The layers stop running on their pools' groups (a switch plan serves them from now on)."""
        if self._pooled:
            pool.leave(self.layers.values())
            self._pooled = False

    def _drop_pools(self) -> None:
        """Leave and free the pools (merge mode has no use for them)."""
        self._leave_pools()
        if self._pools is not None:
            for layer in self.layers.values():
                layer.pool = None
            self._pools = None

    def _structure(self) -> tuple[str, list, list[FusedEntry], tuple]:
        """(mode, live adapters, fused entries, the key a switch plan is kept under)."""
        mode = self.resolved_mode()
        live = self._live_rules()
        fused = self.fused if self.enabled else []
        param = next(self.model.parameters(), None)
        key = (mode, self.enabled, tuple(name for name, _, _ in live), tuple(f.serial for f in fused), self.version,
               None if param is None else (param.device, param.dtype))
        return mode, live, fused, key

    def merged_live(self) -> list[str] | None:
        """The live adapters whose contributions the weights hold right now (merge mode, the current plan run for
        the current structure at call-time scale 1), or None when that is not known to hold."""
        mode, live, fused, key = self._structure()
        if (mode != "merge" or fused or self.call_scale != 1.0 or self._plan is None or self._plan.key != key
                or self._plan.branches or self._plan.branch_singles):
            return None
        return [name for name, _, _ in live]

    def hold(self) -> None:
        """Declare that the weights already hold the current structure (fusing exactly the live mix, which the
        current plan merged at the same multipliers): the next syncs of this structure do nothing, and a plan is
        laid out only when the structure changes again. Valid only where the structure has no live adapter."""
        self._held = self._structure()[3]

    def forget_plans(self) -> None:
        """Drop the current and kept switch plans (after unload: they reference the deltas that were unloaded)."""
        self._plan, self._plans, self._held, self._layouts = None, {}, None, {}
        self._pools, self._pooled = None, False

    def _next_plan(self, key: tuple, mode: str, live: list, fused: list[FusedEntry], factors: list[float | None],
                   per_path: dict[int, list[float]]) -> plan.SwitchPlan:
        """A plan for a new structure: one set aside earlier (switching back to an adapter set: no Python per layer,
        no restacking), else a new one; in merge mode a new one shares the group kernel's layout of the loaded
        adapters, laid out once per load, delete or fuse (plan.KernelLayout)."""
        resolve = plan.resolver([*self._plans.values(), *([self._plan] if self._plan is not None else [])],
                                list(self._layouts.values()))
        kept = self._plans.pop(key, None)
        if kept is not None:
            kept.reactivate(list(self.layers.values()), resolve)
            self._plans[key] = kept
            return kept
        if mode == "merge":
            # (the key of a plan's, less which adapters are live: every set of them shares one layout)
            layout_key = (self.version, tuple(self.adapters), tuple(f.serial for f in fused), key[5])
            layout = self._layouts.pop(layout_key, layout_key)
            built = plan.build_merged(key, self.layers, self.adapters, [name for name, _, _ in live], fused, factors,
                                      per_path, resolve, layout)
            self._layouts = {k: v for k, v in self._layouts.items() if k[0] == self.version}
            self._layouts[layout_key] = built.layout
            while len(self._layouts) > KEPT_LAYOUTS:
                self._layouts.pop(next(iter(self._layouts)))
        else:
            built = plan.build(key, self._branch_slots(live, fused), factors, per_path, resolve)
        self._plans = {k: p for k, p in self._plans.items() if k[4] == self.version}  # drop plans of old layers
        self._plans[key] = built
        while len(self._plans) > KEPT_PLANS:
            self._plans.pop(next(iter(self._plans)))
        return built

    def _branch_slots(self, live: list[tuple[str, ScaleRule, float | None]],
                      fused: list[FusedEntry]) -> list[tuple[str, LayerState, list[plan.Slot], list[plan.Slot]]]:
        """Per layer, in branch mode: the slots merged into its weight and those run as its branch (merge mode lays
        its plans out in one pass: plan.build_merged)."""
        items = []
        names = [(j, name) for j, (name, _, _) in enumerate(live)]
        for path, layer in self.layers.items():
            merged = [plan.Slot(*f.contributions[path], -1) for f in fused if path in f.contributions] if fused else []
            deltas = layer.deltas
            mine = [plan.Slot(d, d.scale, j) for j, name in names if (d := deltas.get(name)) is not None]
            if all(s.delta.additive for s in merged + mine):
                branch = [s for s in mine if s.delta.low_rank() is not None]
                merged += [s for s in mine if s.delta.low_rank() is None]  # full-rank deltas have no cheap branch
            else:  # a non-additive algorithm here: it transforms the sum of everything else
                merged, branch = merged + mine, []
            items.append((path, layer, merged, branch))
        return items

    def visible_weight(self, path: str, layer: LayerState) -> torch.Tensor:
        """The weight as diffusers+PEFT would show it: base plus what the user fused, without live adapters.

        lorakit may merge active adapters into the weights to run at base speed; ``state_dict()`` reports this
        instead, so saving or inspecting a model never picks up the internal merge.
        """
        fused = self.fused_part(path)
        if layer.base is None or layer.applied == _signature(fused):
            return layer.weight.detach()
        return layer.compute(fused) if fused else layer.base.to(layer.weight.device)

    def state_dict_hook(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for path, layer in self.layers.items():
            key = f"{prefix}{path}.weight"
            if key in state_dict:
                state_dict[key] = self.visible_weight(path, layer)
            if layer.base_bias is not None and f"{prefix}{path}.bias" in state_dict:  # diff_b / b_norm deltas
                bias = layer.compute_bias(self.fused_part(path))
                state_dict[f"{prefix}{path}.bias"] = bias if bias is not None else layer.base_bias.to(layer.weight.device)
