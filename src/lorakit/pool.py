"""Branch mode's factor pools: a new adapter set runs on views of factors laid out at load time, with no restacking.

Each targeted layer keeps the LoRA factors of every adapter loaded on it in one :class:`Pool`, rank after rank in the
component's load order: ``down [C, in*kh*kw]`` and ``up_t [C, out]``. A set whose adapters occupy ranks
``start:stop`` runs on ``down[start:stop]`` and ``up_t[start:stop]`` (held transposed, ``[C, out]``): views, no
copy (the expand reads the up view as a plain ``[R, out]`` operand). Transposed, a load writes only the pages of its
own ranks: an ``[out, C]`` layout with room for later adapters touched every page of the pool at the first load (a
first-touch page fault per 4 KiB: ~55 ms of an SD1.5 load, benchmarks/cpu_load.py). Adapters inside the span
that are not in the set get multiplier 0, so a span is used only while those idle ranks are no more than the active
ones; otherwise (and for per-layer multipliers or fused adapters) the component runs on a switch plan that stacks the
set's factors (:mod:`lorakit.plan`).

Layers whose pools hold the same adapters with the same ranks and scales (the common case: LoRAs target the same
layers) share one :class:`Group`: its span and its per-rank multiplier vector. A switch rewrites each group's span
and vector, O(groups) whatever the number of layers; each layer picks a new span up at its next forward (one integer
compare when nothing changed). A change of weights keeps the span and rewrites the vector in place.

Memory: the pools hold a second copy of the adapters' factors; uniform-weight switches then need no stacked copies
at all. On the CPU a pool is allocated with room for 4x the ranks of its first adapters (pages never written take no
physical memory there), so later loads append without regrowing it; a full pool regrows to twice what it needs (one
copy of what it holds). On accelerators, where allocated means held, a pool starts at the size it needs.

Example:
    >>> manager = lorakit.attach(pipe, mode="branch")        # doctest: +SKIP
    >>> pipe.set_adapters(["a", "b"], [0.7, 0.8])            # views of each layer's pool: no copy, O(groups)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import hostmem
from .wide import changed
from .adapter import WeightDelta
from .layers import LayerState

_EPOCHS = itertools.count(1)  # global: a layer moved to a new group never mistakes that group's span for its own
Entry = tuple[str, WeightDelta]


def _new(like: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` uninitialised rows shaped as ``like``'s; on the CPU from recycled memory (:mod:`lorakit.hostmem`)."""
    if like.device.type == "cpu":
        return hostmem.empty_typed((rows, like.shape[1]), like.dtype)
    return like.new_empty(rows, like.shape[1])


def poolable(delta: WeightDelta) -> bool:
    """Whether a delta runs as a plain low-rank branch (what a switch plan would stack for it)."""
    return delta.additive and delta.low_rank() is not None


@dataclass(eq=False)
class Pool:
    """The factors of every adapter on one layer, rank after rank: ``entries[i]`` holds ranks ``offsets[i]:...``."""

    down: torch.Tensor  # [capacity, in*kh*kw]
    up_t: torch.Tensor  # [capacity, out]: the up factors, transposed
    kernel: tuple[int, ...] | None  # a conv weight's [in, kh, kw]: views are shaped for F.conv2d
    entries: list[Entry] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    used: int = 0

    @classmethod
    def empty(cls, module: nn.Module) -> Pool:
        w = module._parameters["weight"]
        kernel = tuple(w.shape[1:]) if isinstance(module, nn.Conv2d) else None
        return cls(w.new_empty(0, w[0].numel()), w.new_empty(0, w.shape[0]), kernel)

    def fits(self, module: nn.Module) -> bool:
        """Whether the pool still matches the layer's weight (placement, dtype, shape: a moved or widened layer)."""
        w = module._parameters["weight"]
        return (self.down.device == w.device and self.down.dtype == w.dtype and self.up_t.shape[1] == w.shape[0]
                and self.down.shape[1] == w[0].numel())

    @torch.no_grad()
    def sync(self, entries: list[Entry]) -> None:
        """Hold exactly ``entries``, in order: the common prefix stays where it is, the rest is (re)written after it,
        regrowing the pool (one copy of what it keeps) only when it is full."""
        fresh = not self.entries
        keep = 0
        for (name, delta), (old_name, old) in zip(entries, self.entries):
            if name != old_name or delta is not old:
                break
            keep += 1
        self.entries, self.offsets = self.entries[:keep], self.offsets[:keep]
        self.used = self.offsets[-1] + self.entries[-1][1].rank if keep else 0
        need = self.used + sum(d.rank for _, d in entries[keep:])
        if need > self.down.shape[0]:
            spare = 2 if not fresh else 4 if self.down.device.type == "cpu" else 1
            self._grow(spare * need)
        for entry in entries[keep:]:
            self.entries.append(entry)
            self.offsets.append(self.used)
            self.used += entry[1].rank
            self.write(len(self.entries) - 1)

    def _grow(self, capacity: int) -> None:
        changed()
        down, up_t = _new(self.down, capacity), _new(self.up_t, capacity)
        down[:self.used].copy_(self.down[:self.used])
        up_t[:self.used].copy_(self.up_t[:self.used])
        self.down, self.up_t = down, up_t

    @torch.no_grad()
    def write(self, i: int) -> None:
        """Copy entry ``i``'s factors into its ranks, in place (a compiled graph reading views sees the values)."""
        changed()
        up, down = self.entries[i][1].low_rank()
        start = self.offsets[i]
        stop = start + down.shape[0]
        self.down[start:stop].copy_(down)
        self.up_t[start:stop].copy_(up.t())

    def refresh(self, swapped: frozenset[int]) -> None:
        """Rewrite the entries whose deltas' values changed in place (a hotswap)."""
        for i, (_, delta) in enumerate(self.entries):
            if id(delta) in swapped:
                self.write(i)

    def views(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(down [R, in(, kh, kw)], up [out, R(, 1, 1)])`` for ranks ``start:stop`` as views, as a branch holds
        them; None for an empty span."""
        if start == stop:
            return None
        down, up = self.down[start:stop], self.up_t[start:stop].t()
        if self.kernel is not None:
            return down.view(stop - start, *self.kernel), up[:, :, None, None]
        return down, up


@dataclass(eq=False)
class Group:
    """Layers whose pools hold the same entries (adapter, rank, scale) in the same order: one span, one vector."""

    entries: tuple[tuple[str, int, float], ...]
    dtype: torch.dtype
    device: torch.device
    layers: list[LayerState] = field(default_factory=list)
    start: int = 0
    stop: int = 0
    scale: torch.Tensor | None = None  # [stop - start]: each rank's multiplier (0 for adapters not in the set)
    epoch: int = 0  # a new value whenever the span changes: layers follow at their next forward
    refreshed: tuple = ()  # (epoch, scale, its version) the group's wide rows were last rewritten for (lorakit.wide)

    def span(self, multipliers: dict[str, float]) -> tuple[int, int, list[float]] | None:
        """(start, stop, per-rank multipliers) for the live adapters on this group, or None when the idle ranks
        inside the span would outnumber the active ones (the set is better stacked)."""
        first = last = None
        offset = active = 0
        for i, (name, rank, _) in enumerate(self.entries):
            if name in multipliers:
                first = i if first is None else first
                last, active = i, active + rank
        if first is None:
            return 0, 0, []
        start = sum(rank for _, rank, _ in self.entries[:first])
        values: list[float] = []
        for name, rank, scale in self.entries[first:last + 1]:
            values += [scale * multipliers.get(name, 0.0)] * rank
            offset += rank
        if offset - active > active:
            return None
        return start, start + offset, values

    @torch.no_grad()
    def set(self, start: int, stop: int, values: list[float]) -> None:
        changed()
        if (start, stop) == (self.start, self.stop):
            if self.scale is not None:  # in place: compiled graphs read this tensor
                self.scale.copy_(torch.tensor(values, dtype=self.dtype))
            return
        self.scale = torch.tensor(values, dtype=self.dtype).to(self.device) if stop > start else None
        self.start, self.stop, self.epoch = start, stop, next(_EPOCHS)


@dataclass(eq=False)
class Pools:
    """A component's groups, laid out for one structure (``key``: its adapters, layers, placement)."""

    key: tuple
    groups: list[Group] | None  # None: some layer holds a delta with no branch form (a switch plan serves it)

    @classmethod
    def layout(cls, key: tuple, layers: Iterable[LayerState], adapters: list[str]) -> Pools:
        """Bring every layer's pool in line with the adapters on it (in ``adapters`` order) and group the layers."""
        found = [(layer, [(n, d) for n in adapters if (d := layer.deltas.get(n)) is not None]) for layer in layers]
        if not all(poolable(d) for _, entries in found for _, d in entries):
            return cls(key, None)
        groups: dict[tuple, Group] = {}
        for layer, entries in found:
            if layer.pool is None or not layer.pool.fits(layer.module):
                layer.pool = Pool.empty(layer.module)
            layer.pool.sync(entries)
            w = layer.weight
            shape = tuple((n, d.rank, d.scale) for n, d in entries)
            group = groups.get((shape, w.dtype, w.device))
            if group is None:
                group = groups[(shape, w.dtype, w.device)] = Group(shape, w.dtype, w.device)
            group.layers.append(layer)
        return cls(key, list(groups.values()))

    def switch(self, live: list[tuple[str, float]]) -> bool:
        """Point every group at the live adapters' span with their multipliers; False (and nothing changed) when a
        group's span would carry too many idle ranks."""
        multipliers = dict(live)
        spans = []
        for group in self.groups:
            span = group.span(multipliers)
            if span is None:
                return False
            spans.append(span)
        for group, span in zip(self.groups, spans):
            group.set(*span)
        return True

    @torch.no_grad()
    def enter(self) -> None:
        """Run every layer on its group (O(layers): done when the layout changes, not at each switch). The weights
        go back to the base first: a pool branch adds to the base, nothing is merged."""
        for group in self.groups:
            for layer in group.layers:
                if layer.applied != ():
                    layer.write([])  # exact restore of what a merge plan left
                layer.join(group)


def leave(layers: Iterable[LayerState]) -> None:
    """Stop running layers on their groups (a switch plan takes over, or the mode changed)."""
    changed()
    for layer in layers:
        if layer.group is not None:
            layer.group = None
            layer.set_branch([])
