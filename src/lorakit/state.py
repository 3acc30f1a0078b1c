"""Per-component bookkeeping: which adapters a component holds, which are active, fused, and at what scale."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .layers import Contribution, LayerState
from .scales import ScaleRule
from .targets import ModuleIndex


@dataclass
class FusedEntry:
    """An adapter the user fused: the exact contributions it was fused with, kept so unfuse is exact."""

    adapter: str
    contributions: dict[str, Contribution]


@dataclass
class ComponentState:
    """One LoRA-capable component (``unet``, ``transformer``, ``text_encoder``...) of a pipeline or a bare model."""

    name: str
    model: nn.Module
    is_text_encoder: bool
    call_kwarg: str | None = None
    layers: dict[str, LayerState] = field(default_factory=dict)
    adapters: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    rules: dict[str, ScaleRule] = field(default_factory=dict)
    fused: list[FusedEntry] = field(default_factory=list)
    enabled: bool = True
    call_scale: float = 1.0
    _index: ModuleIndex | None = None

    @property
    def index(self) -> ModuleIndex:
        if self._index is None:
            self._index = ModuleIndex(self.model)
        return self._index

    def fused_names(self) -> list[str]:
        return [f.adapter for f in self.fused]

    def contributions(self, path: str, layer: LayerState, include_live: bool = True) -> list[Contribution]:
        """What the weight at ``path`` should hold now: fused adapters, then active unfused ones."""
        if not self.enabled:
            return []
        out = [f.contributions[path] for f in self.fused if path in f.contributions]
        if include_live:
            fused = set(self.fused_names())
            for name in self.active:
                delta = layer.deltas.get(name)
                if delta is not None and name not in fused:
                    out.append((delta, self.rules.get(name, ScaleRule())(path) * self.call_scale * delta.scale))
        return out

    def visible_weight(self, path: str, layer: LayerState):
        """The weight as diffusers+PEFT would show it: base plus what the user fused, without live adapters.

        lorakit merges active adapters into the weights to run at base speed; ``state_dict()`` reports this
        instead, so saving or inspecting a model never picks up the internal merge.
        """
        if layer.base is None:
            return layer.weight.detach()
        fused = self.contributions(path, layer, include_live=False)
        if len(fused) == len(self.contributions(path, layer)):
            return layer.weight.detach()
        return layer.compute(fused) if fused else layer.base.to(layer.weight.device)

    def state_dict_hook(self, module, state_dict: dict, prefix: str, local_metadata) -> None:
        for path, layer in self.layers.items():
            key = f"{prefix}{path}.weight"
            if key in state_dict:
                state_dict[key] = self.visible_weight(path, layer)

    def sync(self) -> None:
        """Bring every layer's weight in line with the current state."""
        for path, layer in self.layers.items():
            layer.write(self.contributions(path, layer))
