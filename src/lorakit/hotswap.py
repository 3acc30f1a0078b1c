"""Hotswap in place: a new adapter's tensors copied into the loaded adapter's, when both have the same layout.

A new checkpoint of the same training run (the common hotswap) has the same modules, algorithms, shapes and alpha as
the adapter it replaces. Copying its tensors into the old ones keeps every object the engine built around them (the
deltas, the switch plans, the stacked factors of the batched merge, the runtime branches' factor pools and stacks)
and so costs only the copy and a re-merge of the layers the adapter is on (in branch mode, a copy into the pools):
no plan layout, no allocation, and a compiled graph that reads the branch factors sees the new values without
recompiling. Files that differ in layout (other layers, ranks, alpha) go through the general path in the manager,
which replaces the deltas.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping

import torch

from . import batched
from .wide import changed
from .adapter import Adapter, LoraWeights, WeightDelta
from .io import LoraSource, TensorInfo, merge_runs
from .loading import LoadPlan
from .state import ComponentState

# What a layer's ``applied`` says once its delta's values changed under it: matches no signature and no plan's mark.
_STALE = itertools.count()
_UNREAD = object()  # an alpha copyable_subset cannot compare


def layout(delta: WeightDelta) -> tuple:
    """Everything but tensor values: the type, each tensor's shape/dtype/device, the other fields (alpha, layout).
    Kept on the delta (a hotswap copies values only; moving it drops this): a swap compares ~1000 pairs."""
    known = delta.__dict__.get("_layout")
    if known is None:
        known = delta.__dict__["_layout"] = _layout(delta)
    return known


def _layout(delta: WeightDelta) -> tuple:
    if type(delta) is LoraWeights:  # (the common case, without the walk over its fields)
        tensors = (delta.down, delta.up) if delta.mid is None else (delta.down, delta.up, delta.mid)
        return (LoraWeights, delta.alpha, *((t.shape, t.dtype, t.device) for t in tensors))
    parts: list = [type(delta)]
    for name, value in sorted(vars(delta).items()):
        if name.startswith("_"):  # caches (``_low_rank``) are derived from the fields
            continue
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype, value.device))
        elif isinstance(value, WeightDelta):
            parts.append((name, _layout(value)))
        else:
            parts.append((name, value))
    return tuple(parts)


def _nested(delta: WeightDelta) -> Iterator[WeightDelta]:
    yield delta
    for value in vars(delta).values():
        if isinstance(value, WeightDelta):
            yield from _nested(value)


def matching_pairs(old: Adapter, new: Adapter) -> list[tuple[WeightDelta, WeightDelta]] | None:
    """``(old delta, new delta)`` for every module, or None when the two adapters differ in anything but values."""
    if {c: set(m) for c, m in old.layers.items() if m} != {c: set(m) for c, m in new.layers.items() if m}:
        return None
    pairs = [(old.layers[c][p], new.layers[c][p]) for c, modules in new.layers.items() for p in modules]
    if old.layout is not None and old.layout == new.layout and old.alphas == new.alphas:
        return pairs  # built from files of one layout (and alphas: values, not layout) for this model
    if any(layout(a) != layout(b) for a, b in pairs):
        return None
    return pairs


def matching_subset(old: Adapter, new: Adapter) -> tuple[list[tuple[WeightDelta, WeightDelta]], list[str]] | None:
    """For a new adapter that reaches only some of the components the old one reaches, each exactly as the old one
    did (same modules, same layouts: a denoiser-only checkpoint of a run that also trained the text encoders):
    ``(old/new delta pairs there, the components it leaves)``; else None."""
    reached = {c: set(m) for c, m in new.layers.items() if m}
    held = {c: set(m) for c, m in old.layers.items() if m}
    left = [c for c in held if c not in reached]
    if not reached or not left or any(held.get(c) != modules for c, modules in reached.items()):
        return None
    pairs = [(old.layers[c][p], new.layers[c][p]) for c, modules in new.layers.items() for p in modules]
    if any(layout(a) != layout(b) for a, b in pairs):
        return None
    return pairs, left


@torch.no_grad()
def swap_values(adapter: Adapter, pairs: list[tuple[WeightDelta, WeightDelta]], states: list[ComponentState]) -> None:
    """Copy each new delta's tensors into the old one (``adapter``'s, every module of it), then :func:`refresh`."""
    olds, news = [], []
    for old, new in pairs:
        olds += old.leaves()
        news += new.leaves()  # same layout: the same fields in the same order
    torch._foreach_copy_(olds, news)
    refresh(adapter, states)


def keep_buffer(adapter: Adapter, source: LoraSource, tensors: Mapping[str, torch.Tensor]) -> None:
    """Remember the source's data section on the adapter when every tensor of every delta is a view into it."""
    buffer = source.buffer
    if buffer is None:
        return
    ptr = buffer.untyped_storage().data_ptr()
    if all(t.untyped_storage().data_ptr() == ptr for m in adapter.layers.values() for d in m.values()
           for t in d.leaves()):
        adapter.buffer = buffer
        adapter.table = tuple(source.infos.items())
        adapter.spans = getattr(tensors, "span", None)


def can_copy_buffer(old: Adapter, layout: tuple | None, source: LoraSource, alphas: tuple[float, ...]) -> bool:
    """Whether ``source`` (already loaded) is laid out byte for byte as the file ``old`` was built from: same keys,
    shapes, dtypes and offsets, same metadata and alphas, for the same model (``layout``: its load-plan key)."""
    new = source.buffer
    return (old.buffer is not None and new is not None and old.layout is not None and old.layout == layout
            and new.shape == old.buffer.shape and new.device == old.buffer.device and old.alphas == alphas
            and old.table == tuple(source.infos.items()))  # (one C-level comparison of ~2,000 entries)


@torch.no_grad()
def copy_buffer(old: Adapter, source: LoraSource, states: list[ComponentState]) -> None:
    """The hotswap of a file laid out as ``old``'s (see :func:`can_copy_buffer`): one device copy of its data section
    into the buffer every delta views, then :func:`refresh`."""
    old.buffer.copy_(source.buffer)
    refresh(old, states)


def can_copy_tensors(old: Adapter, layout: tuple | None, tensors: Mapping[str, torch.Tensor],
                     alphas: tuple[float, ...]) -> bool:
    """Whether a source of ``layout`` (its load-plan key: same keys, shapes, dtypes, metadata, model) can be copied
    tensor by tensor into ``old``, whose deltas hold its file's tensors as they are (``old.origins``)."""
    return (bool(old.origins) and old.layout is not None and old.layout == layout and old.alphas == alphas
            and all(key in tensors for _, key in old.origins))


def copy_tensors(old: Adapter, tensors: Mapping[str, torch.Tensor], states: list[ComponentState]) -> None:
    """The hotswap of a source laid out as ``old``'s (see :func:`can_copy_tensors`): each of its tensors copied into
    the one the deltas hold (multi-tensor copies), then :func:`refresh`."""
    copy_into(old, [t for t, _ in old.origins], [tensors[key] for _, key in old.origins], states)


def copyable_subset(old: Adapter, plan: LoadPlan, infos: Mapping[str, TensorInfo], alphas: Mapping[str, float]
                    ) -> tuple[list[torch.Tensor], list[str], list[str], list[str]] | None:
    """For a source that reaches only some of the components ``old`` reaches, every module there read by the same
    keys, shapes, dtypes and alpha as the file ``old`` was built from (a denoiser-only checkpoint of a run that also
    trained the text encoders, in the same format): ``(old's tensors, the source's keys to copy into them, its alpha
    keys (equal to the old file's), the components it leaves)``, worked out from the load plan and the source's
    header (``infos``) without building the source's deltas or a view of its tensors; else None."""
    if not old.origins:
        return None
    held = {key: t for t, key in old.origins}
    reached: dict[str, set[str]] = {}
    dst: list[torch.Tensor] = []
    keys: list[str] = []
    same: list[str] = []
    layers = old.layers
    for m in plan.modules:
        delta = layers.get(m.component, {}).get(m.path)
        if delta is None or m.rows is not None or m.swap_halves or m.pad_to is not None or m.widen_to is not None:
            return None
        fields = m.keys.fields
        alpha = alphas.get(fields["alpha"], _UNREAD) if "alpha" in fields else m.alpha  # (as build_delta reads it)
        if alpha is _UNREAD or (alpha if alpha != 0 else None) != getattr(delta, "alpha", _UNREAD):
            return None
        mine = []
        for field, key in fields.items():
            if field == "alpha":
                same.append(key)  # (equal values in both files: copied too, so that runs of bytes join up)
                continue
            t, info = held.get(key), infos.get(key)
            if t is None or info is None or t.shape != info.shape or t.dtype != info.dtype:
                return None
            mine.append(t)
            keys.append(key)
        leaves = delta.leaves()  # the same fields, read from the same keys (in order, or in any order)
        if not (len(leaves) == len(mine) and all(a is b for a, b in zip(leaves, mine))) and \
                {id(t) for t in leaves} != {id(t) for t in mine}:
            return None
        dst += mine
        reached.setdefault(m.component, set()).add(m.path)
    modules = {c: set(m) for c, m in layers.items() if m}
    left = [c for c in modules if c not in reached]
    if not left or any(modules.get(c) != paths for c, paths in reached.items()):
        return None
    return dst, keys, same, left


def byte_runs(old: Adapter, dst: list[torch.Tensor], keys: list[str], same: list[str],
              tensors: Mapping[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """``dst`` (views into ``old``'s buffer) and the source's ``keys`` (views into its read buffer) as slices of the
    two buffers, neighbours merged into runs: a subset hotswap in a few copies, without a view per tensor (~2,900
    for an SDXL UNet file). ``same``: keys whose values both files share (kohya's alphas, between a module's
    factors), copied too where both sides hold them alike, so that a run does not break at each. None where either
    side is not one buffer on one device."""
    buffer, spans, span = old.buffer, old.spans, getattr(tensors, "span", None)
    source = getattr(tensors, "buffer", None)
    if buffer is None or spans is None or span is None or source is None or buffer.device != source.device:
        return None
    base = buffer.data_ptr()
    pieces = []  # (dst start, dst end, src start); merged in the old buffer's order (files of one run list keys alike)
    for key in keys:  # (dst: each tensor is the view of its key's span in old's buffer, as keep_buffer found)
        (a, b), (c, d) = spans(key), span(key)
        if b - a != d - c:
            return None
        pieces.append((a, b, c))
    for t, (start, end, _) in ((dst[0], pieces[0]), (dst[-1], pieces[-1])) if dst else ():  # (spot checks)
        if t.data_ptr() - base != start or t.numel() * t.element_size() != end - start:
            return None
    for key in same:
        try:
            (a, b), (c, d) = spans(key), span(key)
        except KeyError:  # (an alpha from metadata, in neither file's tensors)
            continue
        if b - a == d - c:
            pieces.append((a, b, c))
    runs = merge_runs(pieces)
    return ([buffer[a:b] for a, b, _ in runs], [source[c:c + b - a] for a, b, c in runs])


@torch.no_grad()
def copy_into(old: Adapter, dst: list[torch.Tensor], src: list[torch.Tensor], states: list[ComponentState]) -> None:
    """Copy ``src`` into ``dst`` (tensors of ``old``'s deltas), then :func:`refresh`."""
    if all(a.device == b.device for a, b in zip(dst, src)):
        torch._foreach_copy_(dst, src)
    else:  # a state dict in host memory for a model on the GPU: tensor by tensor
        for a, b in zip(dst, src):
            a.copy_(b)
    refresh(old, states)


class SwapIndex:
    """What a hotswap of one adapter brings up to date, worked out once: an in-place hotswap keeps its deltas, so the
    next one finds the same. Kept on the adapter (``Adapter.swap_index``) while it holds the same modules."""

    def __init__(self, adapter: Adapter):
        per_component = {c: [d for top in m.values() for d in _nested(top)] for c, m in adapter.layers.items() if m}
        self.modules = adapter.num_modules()  # a delete from a component makes the index stale
        self.by_component = {c: frozenset(map(id, ds)) for c, ds in per_component.items()}
        self.ids = frozenset().union(*self.by_component.values())
        self.paths = {c: list(m) for c, m in adapter.layers.items() if m}
        nested = [d for ds in per_component.values() for d in ds]
        self.derived: list[WeightDelta] = []  # cached low-rank form computed from the fields: dropped at every swap
        self.unseen = nested  # no cached form yet: looked at when it has one (once per delta)

    @classmethod
    def of(cls, adapter: Adapter) -> SwapIndex:
        index = adapter.swap_index
        if index is None or index.modules != adapter.num_modules():
            index = adapter.swap_index = cls(adapter)
        return index

    def keep_components(self, adapter: Adapter) -> None:
        """Follow ``adapter`` out of the components it left (a subset hotswap): their deltas leave the index, which
        stays settled."""
        for comp in [c for c in self.paths if not adapter.layers.get(c)]:
            del self.paths[comp]
            self.ids = self.ids - self.by_component.pop(comp)
        self.derived = [d for d in self.derived if id(d) in self.ids]
        self.unseen = [d for d in self.unseen if id(d) in self.ids]
        self.modules = adapter.num_modules()

    def settle(self) -> None:
        """Sort the deltas that have built their cached low-rank form since the last look: views of their fields, or
        derived (a Tucker core folded into ``down``). Done once per delta; a load with hotswap enabled does it, so
        that the first hotswap does not."""
        if self.unseen:
            pending = []
            for d in self.unseen:
                cached = d.__dict__.get("_low_rank")
                if cached is None:
                    pending.append(d)
                elif not _views_of_fields(d, cached):
                    self.derived.append(d)
            self.unseen = pending

    def drop_derived(self) -> None:
        """Drop the cached low-rank forms that are derived (see :meth:`settle`): they are recomputed when next
        asked for. Views see the new values as they are."""
        self.settle()
        for d in self.derived:
            d.__dict__.pop("_low_rank", None)


def refresh(adapter: Adapter, states: list[ComponentState]) -> None:
    """After the values of ``adapter``'s deltas changed in place, bring everything derived from them up to date:
    cached low-rank forms and stacked factors are recomputed in place, its layers are marked stale (the next sync
    re-merges them), and kept switch plans other than the current one are dropped (their runtime-branch stacks hold
    the old values)."""
    changed()  # (the pools and stacks rewritten below count too; this covers anything else a branch reads)
    index = SwapIndex.of(adapter)
    index.drop_derived()
    batched.refresh(index.ids)
    stale = ("<stale after a hotswap>", next(_STALE))
    for state in states:
        _mark_stale(state, index.paths.get(state.name, ()), index.ids, stale)


def _views_of_fields(delta: WeightDelta, cached: tuple[torch.Tensor, ...]) -> bool:
    fields = {t.untyped_storage().data_ptr() for t in delta.tensors().values()}
    return all(t.untyped_storage().data_ptr() in fields for t in cached)


def _mark_stale(state: ComponentState, paths: Iterable[str], swapped: frozenset[int], stale: tuple) -> None:
    """The layers at ``paths`` (where the swapped deltas sit) may hold the old values: re-merged at the next sync
    (conservative: at worst a layer is re-merged for nothing), their factor pools rewritten and stacked branches
    restacked, in place."""
    current = state._plan
    state._plans = {k: p for k, p in state._plans.items() if p is current}
    state._layouts = {k: v for k, v in state._layouts.items() if current is not None and v is current.layout}
    layers = state.layers
    for path in paths:
        layer = layers.get(path)
        if layer is None:  # (every module of an adapter has its layer: never expected)
            continue
        if layer.pool is not None:
            layer.pool.refresh(swapped)  # in place: the views a group runs on see the new values
        if layer.branch_applied and layer.branch is not None and not swapped.isdisjoint(layer.branch_applied[0]):
            layer.restack_branch()
        if layer.applied != ():
            layer.applied = stale
    if current is not None:
        current.invalidate(swapped)
