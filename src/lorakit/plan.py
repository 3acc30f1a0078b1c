"""A component's switch plan: WHAT each targeted layer holds, kept apart from HOW MUCH of it.

``set_adapters`` with new weights, a call-time scale, the pipeline's ambient scale: most switches change only the
multipliers, not which deltas sit on which layer. A plan is built when the structure changes (adapters loaded,
activated, fused, deleted; mode or enabled flipped) and records, per layer, its slots: a delta and either a fixed
multiplier (fused) or a column of the live adapters' factor table. A multiplier-only switch is then::

    factors F [layers, live adapters + 1]      (uniform weights: a broadcast; block weights: one value per layer)
    merge:  on CUDA (fp16/bf16), for all layers the group kernel takes: m = static * F[rows, cols], compared
            with what was last written, -> one transfer and ONE launch for every layer that changed (_KernelPart);
            the rest per chunk of same-shaped layers, the same way -> batched.merge_chunk per chunk that changed
    branch: per device/dtype, one buffer that every layer's per-rank scale vector is a view of
            buffer = static_per_rank * F[rank_rows, rank_cols]

a few vectorised operations in all, instead of Python for each of ~1000 layers (SDXL with its text encoders).
In merge mode the group kernel's parts are laid out once per set of LOADED adapters (:class:`KernelLayout`): every
live set's plan shares them, with the adapters out of the mix at multiplier 0, so a plan for a new adapter set
costs no pass over those layers either (set_adapters right after loads, a server switching among many adapters).
Layers the batched path does not cover (non-additive algorithms, weights off the batching devices) are written one
by one, from the same slots. In branch mode, plans serve only what the layers' factor pools do not (per-layer
weights, fused adapters, deltas with no branch form, spans with too many idle ranks: see :mod:`lorakit.pool`); their
branches stack the set's factors.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import batched
from .wide import changed
from .adapter import WeightDelta
from .layers import Contribution, LayerState, _signature

PLAN_MARK = "<written by a switch plan>"
_MARKS = itertools.count()
# What a layer holds, as a signature (None: unknown), from its own record or the plan that wrote it.
Resolver = Callable[[LayerState], tuple | None]


class Slot(NamedTuple):
    """One delta on one layer: multiplier = ``static * F[row, col]`` (``col`` -1: the constant column, fused)."""

    delta: WeightDelta
    static: float
    col: int


@dataclass
class _MergeChunk:
    chunk: batched._Chunk
    rows: torch.Tensor  # [n] member -> layer row of F
    cols: torch.Tensor  # [n, K] slot -> column of F
    static: torch.Tensor  # [n, K] float64
    clean: bool  # every member already held these contributions when the plan was built
    last: torch.Tensor | None = None
    ids: frozenset[int] | None = None  # its deltas' ids, once a hotswap asked (invalidate)
    members: list[tuple[int, tuple[int, ...]]] | None = None  # (layer id, its deltas' ids), once holds() asked

    def signature(self, i: int) -> tuple | None:
        """What member ``i`` was last written with (None: not yet), as a signature."""
        return None if self.last is None else tuple(zip(self.member_ids()[i][1], self.last[i].tolist()))

    def member_ids(self) -> list[tuple[int, tuple[int, ...]]]:
        if self.members is None:
            self.members = [(id(layer), tuple(id(d) for d, _ in contributions))
                            for layer, contributions, _ in self.chunk.members]
        return self.members


@dataclass
class _KernelPart:
    """Layers of one device and dtype that one launch of the group kernel re-merges (batched.Segment), laid out as
    flat arrays: per member its row of the layout's factor table, its deltas' columns and static multipliers (padded
    to the widest with multiplier 0, which the kernel does not read), so that a run costs a few tensor operations for
    all of them. Its members list every adapter loaded on them (see :class:`KernelLayout`): the plans of every
    adapter set share it, and it keeps its own record of what it last wrote."""

    segment: batched.Segment
    deltas: list[list[WeightDelta]]
    rows: torch.Tensor  # [n]
    cols: torch.Tensor  # [n, K]: a column of the layout's table (-1: the fused slots' constant)
    static: torch.Tensor  # [n, K] float64
    clean: torch.Tensor  # bool [n]: held at layout time what the first run writes
    last: torch.Tensor | None = None  # [n, K]: the multipliers last written
    stale: torch.Tensor | None = None  # bool [n]: rewrite at the next run whatever the multipliers
    fresh: bool = True  # not run yet: ``clean`` tells what to write
    skipped: list[bool] | None = None  # members the last run left to its plan's general path
    index: dict[int, list[int]] | None = None  # delta id -> members, once a hotswap asked (invalidate)
    # what the layers it writes carry as `applied`: its last multipliers tell what they hold (holds())
    mark: tuple = field(default_factory=lambda: (PLAN_MARK, next(_MARKS)))
    _where: dict[int, int] | None = None  # id(layer) -> member: holds()

    @classmethod
    def lay_out(cls, members: _KernelMembers) -> tuple[_KernelPart | None, list[int]]:
        """``(part, [])`` for these members, or ``(None, the members the kernel cannot take)`` (batched.segment)."""
        seg, bad = batched.segment(members.layers, members.addresses)
        if seg is None:
            return None, bad or list(range(len(members.layers)))
        width = max(len(c) for c in members.cols)
        cols, static = members.cols, members.static
        if any(len(c) < width for c in cols):  # (layers with fewer adapters: multiplier 0, never read)
            cols = [c + [-1] * (width - len(c)) for c in cols]
            static = [v + [0.0] * (width - len(v)) for v in static]
        return cls(seg, members.deltas, rows=torch.tensor(members.rows), cols=torch.tensor(cols),
                   static=torch.tensor(static, dtype=torch.float64),
                   clean=torch.tensor(members.clean, dtype=torch.bool)), []

    def run(self, table: torch.Tensor, skip: torch.Tensor | None = None) -> None:
        """Re-merge the members whose multipliers changed (``table``: the layout's, see KernelLayout.widen), but
        those in ``skip`` (bool [n]: the plan writes them on its general path; their row of ``last`` becomes NaN,
        which differs from any multiplier: rewritten when a plan next gives them to the kernel)."""
        mults = self.static * table[self.rows[:, None], self.cols]
        if self.fresh:
            dirty = ~self.clean
        elif self.last is None:
            dirty = torch.ones(len(self.deltas), dtype=torch.bool)
        else:
            dirty = (mults != self.last).any(1)
        if self.stale is not None:
            dirty |= self.stale
            self.stale = None
        layers = self.segment.layers
        if skip is not None:
            dirty &= ~skip
            mults[skip] = float("nan")
            self.skipped = skip.tolist()
            for layer, skipped in zip(layers, self.skipped):
                if not skipped:
                    layer.applied = self.mark
        else:
            self.skipped = None
            for layer in layers:
                layer.applied = self.mark
        self.last, self.fresh = mults, False
        if not bool(dirty.any()):
            return
        if self.segment.current():
            self.segment.merge(torch.cat([mults.float(), dirty.float()[:, None]], 1))
            return
        values = mults.tolist()  # the kernel is compiling (or a weight moved): the batched BLAS route
        batched.write_many([(layers[i], [(d, m) for d, m in zip(self.deltas[i], values[i]) if m != 0])
                            for i in dirty.nonzero().flatten().tolist()])

    def signature(self, i: int) -> tuple | None:
        """What member ``i`` was last written with (None: not yet), as a signature: adapters at multiplier 0 are
        not in it (the kernel skips them), so it compares with per-layer writes of the same mix."""
        if self.last is None:
            return None
        return tuple((id(d), m) for d, m in zip(self.deltas[i], self.last[i].tolist()) if m != 0)

    def holds(self, layer: LayerState) -> tuple | None:
        """What this part last wrote into ``layer`` (see SwitchPlan.holds)."""
        if self._where is None:
            self._where = {id(member): i for i, member in enumerate(self.segment.layers)}
        i = self._where.get(id(layer))
        return None if i is None else self.signature(i)

    def invalidate(self, swapped: frozenset[int]) -> None:
        if self.index is None:
            self.index = defaultdict(list)
            for i, deltas in enumerate(self.deltas):
                for d in deltas:
                    self.index[id(d)].append(i)
        hit = [i for d in swapped.intersection(self.index) for i in self.index[d]]
        if hit:
            self._mark_stale(hit)

    def reactivate(self, resolve: Resolver) -> None:
        """Before a run for another plan than the last one: members that no longer hold what this part last wrote
        are rewritten at that run. Where every member still carries its mark (the common case: no one else wrote
        them), nothing to do; where the first one does not hold it, another layout rewrote them: all are, without
        a look at each (rewriting is always right)."""
        layers = self.segment.layers
        mark = self.mark
        if self.fresh or self.last is None:
            return
        skipped = self.skipped
        if skipped is None:
            if all(layer.applied is mark for layer in layers):
                return
        elif all(layer.applied is mark for layer, s in zip(layers, skipped) if not s):
            return  # (the skipped ones' NaN multipliers rewrite them when they come back)
        first = skipped.index(False) if skipped is not None and False in skipped else 0
        if resolve(layers[first]) != self.signature(first):
            self.last = None
            return
        self._mark_stale([i for i, layer in enumerate(layers) if resolve(layer) != self.signature(i)])

    def _mark_stale(self, members: list[int]) -> None:
        if self.stale is None:
            self.stale = torch.zeros(len(self.deltas), dtype=torch.bool)
        self.stale[members] = True


# lay_out_kernel's record of one layer the group kernel takes: (layer, its deltas, its row of F, their columns, their
# static multipliers, its addresses (see kernels.group_tables), whether it holds them already)
_Member = tuple[LayerState, list[WeightDelta], int, list[int], list[float], list[int], bool]


@dataclass
class _KernelMembers:
    """A kernel part's members, column by column."""

    layers: list[LayerState]
    deltas: list[list[WeightDelta]]
    rows: list[int]
    cols: list[list[int]]
    static: list[list[float]]
    addresses: list[list[int]]
    clean: list[bool]

    @classmethod
    def of(cls, members: list[_Member]) -> _KernelMembers:
        return cls(*map(list, zip(*members)))


@dataclass
class KernelLayout:
    """Merge mode's group-kernel parts of a component for every adapter loaded on it, not only the live ones: the
    plans of every adapter set share them, and the adapters out of the mix run at multiplier 0, which the kernel
    skips. Laid out once per set of loaded adapters and fused entries (a load, a delete, a fuse), so that a switch to
    a new adapter set costs no Python per layer: set_adapters right after loads is a rerun."""

    key: tuple
    parts: list[_KernelPart]
    general: list[int]  # rows of the layers the group kernel does not take: each plan lays them out (_lay_out)
    position: dict[str, int]  # loaded adapter -> its column of the layout's table (the last: the constant)
    mixed: dict[str, list[int]] = field(default_factory=dict)  # adapter -> rows where the kernel cannot read it

    def outside(self, live: Sequence[str]) -> list[int]:
        """Rows of the parts' members that a plan of these live adapters writes on its general path instead."""
        rows = {row for name in live for row in self.mixed.get(name, ())}
        return sorted(rows.difference(self.general)) if rows else []

    def widen(self, table: torch.Tensor, live: Sequence[str]) -> torch.Tensor:
        return _widen(table, self.position, live)

    def reactivate(self, resolve: Resolver) -> None:
        for part in self.parts:
            part.reactivate(resolve)


@dataclass
class _BranchBuffer:
    buffer: torch.Tensor  # every branch layer's per-rank scales, in the layers' dtype, on their device
    rows: torch.Tensor  # [R]
    cols: torch.Tensor  # [R]
    static: torch.Tensor  # [R] float64


@dataclass
class SwitchPlan:
    key: tuple
    paths: list[str]
    chunks: list[_MergeChunk] = field(default_factory=list)
    singles: list[tuple[int, LayerState, list[Slot]]] = field(default_factory=list)
    restores: list[LayerState] = field(default_factory=list)
    branches: list[_BranchBuffer] = field(default_factory=list)
    branch_singles: list[tuple[int, LayerState, list[Slot]]] = field(default_factory=list)
    # each branch layer's (stacked factors, scale view, structure), to put back when this plan is current again
    branch_state: list[tuple[LayerState, tuple, torch.Tensor, tuple]] = field(default_factory=list)
    empties: list[LayerState] = field(default_factory=list)  # layers whose weight holds nothing in this plan
    layout: KernelLayout | None = None  # merge mode: the group kernel's parts, shared with other adapter sets' plans
    live: list[str] = field(default_factory=list)  # the live adapters, the factor table's columns
    skips: list[torch.Tensor] | None = None  # per kernel part: members this plan writes on its general path
    fresh: bool = True
    # what the layers this plan writes carry as `applied`: its last multipliers tell what they hold (holds())
    mark: tuple = field(default_factory=lambda: (PLAN_MARK, next(_MARKS)))
    _where: dict[int, tuple] | None = None  # id(layer) -> (its chunk, index): holds()

    @property
    def kernel(self) -> list[_KernelPart]:
        """The group kernel's parts this plan runs (its layout's)."""
        return self.layout.parts if self.layout is not None else []

    def reactivate(self, layers: list[LayerState], resolve: Resolver) -> None:
        """Make this plan current again after others ran (the adapter set switched back): no layout work. Layers it
        leaves empty are restored where another plan merged something; chunks whose layers no longer hold what
        this plan last wrote are rewritten at the next run; its stacked branch factors and scale views go back on
        their layers, and every other branch is dropped."""
        batched.restore_all(self.empties)
        for mc in self.chunks:
            members = [layer for layer, _, _ in mc.chunk.members]
            if mc.last is not None and all(resolve(layer) == mc.signature(i) for i, layer in enumerate(members)):
                for layer in members:
                    layer.applied = self.mark  # they hold exactly what this plan last wrote
            else:
                mc.last, mc.clean = None, False
        if self.layout is not None:
            self.layout.reactivate(resolve)
        self.fresh = False
        mine = {id(layer) for layer, *_ in self.branch_state}
        for layer in layers:
            if layer.branch is not None and id(layer) not in mine:
                layer.set_branch([])
        for layer, branch, scale, structure in self.branch_state:
            layer.attach_branch(branch, scale, structure)

    @torch.no_grad()
    def run(self, factors: Sequence[float | None], per_path: dict[int, list[float]]) -> None:
        """Write every layer for these live-adapter factors (``None``: per layer, from ``per_path[col]``)."""
        table = _factor_table(len(self.paths), factors, per_path)
        if self.fresh and self.restores:
            batched.restore(self.restores)
        self._run_chunks(table)
        if self.kernel:
            full = self.layout.widen(table, self.live)
            for i, part in enumerate(self.kernel):
                part.run(full, self.skips[i] if self.skips is not None else None)
        if self.singles or self.branch_singles:
            values = table.tolist()
            for row, layer, slots in self.singles:
                layer.write(_contributions(slots, values, row))
            for row, layer, slots in self.branch_singles:
                layer.set_branch(_contributions(slots, values, row))
        for buf in self.branches:
            buf.buffer.copy_(buf.static * table[buf.rows, buf.cols])
        if self.branches:
            changed()  # (the branches' multipliers, in place)
        self.fresh = False

    def invalidate(self, swapped: frozenset[int]) -> None:
        """Chunks merging any of these deltas are rewritten at the next run (their values changed: a hotswap)."""
        for mc in self.chunks:
            if mc.ids is None:
                mc.ids = frozenset(id(d) for _, contributions, _ in mc.chunk.members for d, _ in contributions)
            if not swapped.isdisjoint(mc.ids):
                mc.last, mc.clean = None, False
        for part in self.kernel:
            part.invalidate(swapped)

    def holds(self, layer: LayerState) -> tuple | None:
        """What this plan last wrote into ``layer``, as a signature (None: not one of its chunks' layers, or not
        written yet): lets the next plan skip unchanged layers. Looked up for one layer at a time (the layers of
        kernel parts carry the part's own mark: _KernelPart.holds)."""
        if self._where is None:
            where: dict[int, tuple] = {}
            for mc in self.chunks:
                for i, (member, _, _) in enumerate(mc.chunk.members):
                    where[id(member)] = (mc, i)
            self._where = where
        found = self._where.get(id(layer))
        return None if found is None else found[0].signature(found[1])

    def _run_chunks(self, table: torch.Tensor) -> None:
        due = []
        for mc in self.chunks:
            mults = mc.static * table[mc.rows[:, None], mc.cols]
            if mc.last is not None and torch.equal(mults, mc.last):
                continue
            if mc.last is None and mc.clean and self.fresh:
                mc.last = mults  # the weights already hold exactly this
                for layer, _, _ in mc.chunk.members:
                    layer.applied = self.mark
                continue
            mc.last = mults
            due.append((mc.chunk, mults))
        batched.merge_chunks(due, self.mark)


def resolver(plans: list[SwitchPlan], layouts: Sequence[KernelLayout] = ()) -> Resolver:
    """Resolve what layers hold, for layers these plans and layouts wrote (one no longer kept resolves to None:
    unknown)."""
    by_mark: dict[tuple, SwitchPlan | _KernelPart] = {p.mark: p for p in plans}
    for layout in (*layouts, *(p.layout for p in plans if p.layout is not None)):
        by_mark.update((part.mark, part) for part in layout.parts)

    def resolve(layer: LayerState) -> tuple | None:
        applied = layer.applied
        if len(applied) == 2 and applied[0] == PLAN_MARK:
            plan = by_mark.get(applied)
            return None if plan is None else plan.holds(layer)
        return applied

    return resolve


def _widen(table: torch.Tensor, position: dict[str, int], live: Sequence[str]) -> torch.Tensor:
    """A layout's table ``[layers, loaded + 1]`` from a plan's ``[layers, live + 1]`` (``position``: each loaded
    adapter's column): adapters out of the mix at 0."""
    full = torch.zeros(table.shape[0], len(position) + 1, dtype=table.dtype)
    full[:, [*(position[name] for name in live), -1]] = table
    return full


def _factor_table(n: int, factors: Sequence[float | None], per_path: dict[int, list[float]]) -> torch.Tensor:
    """F [n, live + 1] in float64 (the last column is the fused slots' constant 1)."""
    table = torch.ones(n, len(factors) + 1, dtype=torch.float64)
    for col, value in enumerate(factors):
        table[:, col] = value if value is not None else torch.tensor(per_path[col], dtype=torch.float64)
    return table


def _contributions(slots: list[Slot], values: list[list[float]], row: int) -> list[Contribution]:
    """``values``: the factor table as nested lists (indexing a tensor per slot costs microseconds each)."""
    return [(s.delta, s.static * values[row][s.col]) for s in slots]


def build(key: tuple, items: list[tuple[str, LayerState, list[Slot], list[Slot]]],
          factors: Sequence[float | None], per_path: dict[int, list[float]], resolve: Resolver) -> SwitchPlan:
    """Lay out a plan for ``(path, layer, merged slots, branch slots)`` of every layer (nothing is written yet).

    Layers whose weight already holds exactly its merged contributions (by their own record, or by what the plan
    that wrote them last wrote: ``resolve``) are marked clean, so the first run after a structural change (fuse,
    unfuse, deleting an adapter that was not active) rewrites only what changed."""
    plan = SwitchPlan(key, [path for path, _, _, _ in items])
    values = _factor_table(len(items), factors, per_path).tolist()
    branch_layers = _lay_out(plan, [(row, layer, merged, branch) for row, (_, layer, merged, branch)
                                    in enumerate(items)], values, resolve)
    _layout_branches(plan, branch_layers, values)
    return plan


def build_merged(key: tuple, layers: dict[str, LayerState], adapters: Sequence[str], live: Sequence[str],
                 fused: Sequence, factors: Sequence[float | None], per_path: dict[int, list[float]], resolve: Resolver,
                 layout: KernelLayout | tuple) -> SwitchPlan:
    """:func:`build` for merge mode (``adapters``: the component's, in load order; ``fused``: its FusedEntry list).

    ``layout``: the group kernel's :class:`KernelLayout` for these adapters and fused entries, or its key where
    there is none yet: it is laid out here (one pass over the layers; a load lays one out, so the first
    set_adapters after loads does not). Its parts serve this plan as they are. The layers it leaves to the general
    path (not CUDA, fp32, factors the kernel cannot read...) take build's, with the live adapters' slots in load
    order, as the kernel sums them: the same weights whatever the order of set_adapters' names."""
    paths = list(layers)
    plan = SwitchPlan(key, paths, live=list(live))
    table = _factor_table(len(paths), factors, per_path)
    if isinstance(layout, KernelLayout):
        layout.reactivate(resolve)
    else:
        first = _widen(table, {name: i for i, name in enumerate(adapters)}, live).tolist()
        layout = lay_out_kernel(layout, layers, adapters, fused, first, resolve)
    plan.layout = layout
    outside = layout.outside(live)
    if outside:  # members a live adapter's factors on them keep from the kernel: on this plan's general path
        rows = torch.tensor(outside)
        plan.skips = [torch.isin(part.rows, rows) for part in layout.parts]
    values = table.tolist()
    order = sorted(enumerate(live), key=lambda item: layout.position[item[1]])  # (column, name) in load order
    general: list[tuple[int, LayerState, list[Slot], list[Slot]]] = []
    for row in sorted(layout.general + outside) if outside else layout.general:
        path = paths[row]
        layer = layers[path]
        slots = [Slot(*f.contributions[path], -1) for f in fused if path in f.contributions]
        deltas = layer.deltas
        slots += [Slot(d, d.scale, j) for j, name in order if (d := deltas.get(name)) is not None]
        general.append((row, layer, slots, []))
    _lay_out(plan, general, values, resolve)
    return plan


def lay_out_kernel(key: tuple, layers: dict[str, LayerState], adapters: Sequence[str], fused: Sequence,
                   values: list[list[float]], resolve: Resolver) -> KernelLayout:
    """The group kernel's parts for every layer it can write (CUDA, fp16/bf16; not the very large ones, which
    cuBLAS merges faster: batched.LARGE_ELEMENTS), with every adapter loaded on it whose factors it can read (ranks
    of 16k, aligned: see batched.kernel_factor), in one pass, as flat arrays with no
    per-chunk work and no stacks. The layers it cannot write, or whose fused entries it cannot read, are left to
    each plan (``general``); an adapter whose factors it cannot read on a layer (a rank-8 LoRA among rank-32 ones)
    sends that layer to the plan's general path only in plans where that adapter is live (``mixed``). ``values``:
    the layout's table for the first run (what the members will hold, to skip those that hold it already)."""
    position = {name: i for i, name in enumerate(adapters)}
    general: list[int] = []
    mixed: dict[str, list[int]] = defaultdict(list)
    kernel: dict[tuple, list[_Member]] = {}
    devices: dict[tuple, bool] = {}  # (device, dtype) -> batched.kernel_devices
    for row, (path, layer) in enumerate(layers.items()):
        where = _kernel_layer(layer, devices)
        if where is None:
            general.append(row)
            continue
        place, m, n = where
        dtype, device = place[1], place[0]
        ds, cols, static, known = [], [], [], []
        readable = True
        for f in fused:
            c = f.contributions.get(path)
            if c is None:
                continue
            k = batched.kernel_factor(dtype, device, c[0])
            if k is None:
                readable = False
                break
            ds.append(c[0])
            cols.append(-1)
            static.append(c[1])
            known.append(k)
        else:
            deltas = layer.deltas
            outside = []
            for name in adapters:
                d = deltas.get(name)
                if d is None:
                    continue
                k = batched.kernel_factor(dtype, device, d)
                if k is None:
                    outside.append(name)
                    continue
                ds.append(d)
                cols.append(position[name])
                static.append(k[5])
                known.append(k)
            if ds:
                for name in outside:
                    mixed[name].append(row)
        if not readable or not ds:  # a fused entry the kernel cannot read, or nothing it can
            general.append(row)
            continue
        if layer.branch is not None:
            layer.set_branch([])
        layer.take_backup()
        held = resolve(layer)
        at = values[row]
        clean = held is not None and held == tuple(
            (id(d), mult) for d, v, c in zip(ds, static, cols) if (mult := v * at[c]) != 0)
        addresses = [m, n, layer.weight.data_ptr(), layer.base.data_ptr(), len(ds)]
        for k in known:
            addresses += k[:3]
        kernel.setdefault(place, []).append((layer, ds, row, cols, static, addresses, clean))
    parts = []
    for collected in kernel.values():
        members = _KernelMembers.of(collected)
        part, rejected = _KernelPart.lay_out(members)
        if part is not None:
            parts.append(part)
        general += [members.rows[i] for i in rejected]
    if len(general) > 1:
        general.sort()
    return KernelLayout(key, parts, general, position, dict(mixed))


def _kernel_layer(layer: LayerState, devices: dict[tuple, bool]) -> tuple[tuple, int, int] | None:
    """``((device, dtype), M, N)`` where the group kernel can write the layer, else None (``devices``:
    batched.kernel_devices per (device, dtype), filled as asked)."""
    place = batched._placement(layer)
    if place is None:
        return None
    shape, dtype, device, large = place
    if large:  # cuBLAS's addmm from the backup streams these at ~2x the group kernel's rate (kernel_routes.py)
        return None
    usable = devices.get((device, dtype))
    if usable is None:
        usable = devices[device, dtype] = batched.kernel_devices(device, dtype)
    m, n = shape[0], shape.numel() // shape[0]
    return ((device, dtype), m, n) if usable and n % 16 == 0 else None


def _lay_out(plan: SwitchPlan, items: list[tuple[int, LayerState, list[Slot], list[Slot]]],
             values: list[list[float]], resolve: Resolver) -> list[tuple[int, LayerState, list[Slot]]]:
    """build's general path for ``(row, layer, merged slots, branch slots)``: restores, chunks of same-shaped
    layers, layers written one by one; returns the branch layers, for :func:`_layout_branches`."""
    groups: dict[tuple, list[tuple[int, LayerState, list[Slot], list[Contribution], bool]]] = defaultdict(list)
    branch_layers: list[tuple[int, LayerState, list[Slot]]] = []
    for row, layer, merged, branch in items:
        if branch:
            branch_layers.append((row, layer, branch))
        elif layer.branch is not None:
            layer.set_branch([])
        if not merged:
            plan.empties.append(layer)
            if layer.applied != () and batched.can_restore(layer):
                plan.restores.append(layer)
            elif layer.applied != ():
                plan.singles.append((row, layer, merged))
            continue
        contributions = _contributions(merged, values, row)
        group = batched.batch_key(layer, contributions)
        if group is None:
            plan.singles.append((row, layer, merged))
            continue
        layer.take_backup()
        held = resolve(layer)  # (a signature of another length cannot match: no need to build this one)
        clean = held is not None and len(held) == len(contributions) and held == _signature(contributions)
        groups[group].append((row, layer, merged, contributions, clean))
    for group, members in groups.items():
        for part in batched.split(group, members):
            chunk = batched._Chunk([(layer, contribs, None) for _, layer, _, contribs, _ in part], group[-1])
            plan.chunks.append(_MergeChunk(
                chunk,
                rows=torch.tensor([row for row, *_ in part]),
                cols=torch.tensor([[s.col for s in slots] for _, _, slots, _, _ in part]),
                static=torch.tensor([[s.static for s in slots] for _, _, slots, _, _ in part], dtype=torch.float64),
                clean=all(clean for *_, clean in part)))
    return branch_layers


def _layout_branches(plan: SwitchPlan, layers: list[tuple[int, LayerState, list[Slot]]],
                     values: list[list[float]]) -> None:
    """Set each branch up (stacking factors where the adapter set changed), then make the per-rank scale vectors
    views of one buffer per device and dtype, so a multiplier change rewrites them all in one operation."""
    by_place: dict[tuple, list[tuple[int, LayerState, list[Slot]]]] = defaultdict(list)
    for row, layer, slots in layers:
        layer.set_branch(_contributions(slots, values, row))
        if layer.branch_scale is None:
            plan.branch_singles.append((row, layer, slots))
            continue
        by_place[(layer.branch_scale.device, layer.branch_scale.dtype)].append((row, layer, slots))
    for (device, dtype), members in by_place.items():
        rows, cols, static = [], [], []
        for row, _, slots in members:
            for s in slots:
                rows += [row] * s.delta.rank
                cols += [s.col] * s.delta.rank
                static += [s.static] * s.delta.rank
        buffer = torch.empty(len(rows), dtype=dtype, device=device)
        offset = 0
        for _, layer, _ in members:
            n = layer.branch_scale.numel()
            buffer[offset:offset + n].copy_(layer.branch_scale)
            layer.branch_scale = buffer[offset:offset + n]
            offset += n
        changed()
        plan.branches.append(_BranchBuffer(buffer, torch.tensor(rows), torch.tensor(cols),
                                           torch.tensor(static, dtype=torch.float64)))
        plan.branch_state += [(layer, layer.branch, layer.branch_scale, layer.branch_applied) for _, layer, _ in members]
