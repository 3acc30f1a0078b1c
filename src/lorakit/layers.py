"""The runtime of one targeted Linear/Conv2d layer: merged adapters with an exact way back, or a runtime branch.

**merge** (the default on accelerators). When every sample of a batch uses the same adapter mix (the common case) the
fastest LoRA is no LoRA branch at all: the weight holds ``base + sum(scale_i * delta_i)`` and the model runs at base
speed. lorakit keeps an exact copy of each targeted weight, taken before its first change, and recomputes the weight
from that copy whenever the mix changes (one ``addmm`` per adapter, written straight into the weight), so going back
(unfuse, disable, unload of unfused adapters) is a copy: bit-exact in every dtype. No module is replaced and nothing
runs in the forward pass, so ``state_dict`` keys, ``save_pretrained`` and ``torch.compile`` see a plain model.

**branch** (the default on CPU, and the basis for per-sample adapters). The weight holds only the base and what the
user fused; active low-rank adapters run as one stacked branch per layer, ``out += ((x @ A_cat^T) * s) @ B_cat^T``,
one shrink and one expand whatever the number of adapters, ``s`` holding each adapter's multiplier over its ranks.
With uniform weights ``A_cat``/``B_cat`` are views of a span of the layer's factor pool, where every adapter loaded
on it was laid out once at load (see :mod:`lorakit.pool`): a new adapter set moves the span (picked up at the next
forward), a change of weights or scales rewrites ``s`` in place, and nothing is restacked. Per-layer (block) weights,
fused adapters and spans with too many idle ranks run on factors stacked by a switch plan (:meth:`set_branch`).
In eager inference a plain Linear runs all of that in two kernels instead of four (:mod:`lorakit.wide`).

Memory: one exact copy of every targeted weight, on the weight's device unless ``backup_device`` says otherwise.
"""

from __future__ import annotations

import copyreg
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import WeightDelta
from . import fanout as _fanout
from . import wide as _wide
from .wide import WideLinear

if TYPE_CHECKING:
    from .fanout import Fanout
    from .pool import Group, Pool

Contribution = tuple[WeightDelta, float]  # (delta, total multiplier on its unscaled form)


def _signature(contributions: list[Contribution]) -> tuple:
    return tuple((id(d), float(m)) for d, m in contributions)


@dataclass(eq=False)
class LayerState:
    """One targeted layer: the adapters on it, the exact copy of its base weight, and its branch (if any)."""

    module: nn.Module
    deltas: dict[str, WeightDelta] = field(default_factory=dict)
    base: torch.Tensor | None = None
    base_bias: torch.Tensor | None = None  # exact copy of the bias, only once a bias delta touched it
    backup_device: torch.device | None = None
    applied: tuple = ()
    branch: tuple[torch.Tensor, torch.Tensor] | None = None  # stacked (down [R, in], up [out, R]), unscaled
    branch_scale: torch.Tensor | None = None  # [R]: each adapter's multiplier, repeated over its rank
    branch_applied: tuple = ()
    pool: Pool | None = None  # every adapter's factors on this layer, laid out once (branch mode: lorakit.pool)
    group: Group | None = None  # while set, the branch is the group's span of the pool, followed lazily
    _epoch: int = 0  # the group's epoch the branch was last set for (0: none yet)
    _placement: tuple | None = None  # batched._placement's, with what it was worked out for
    _running: object = False  # True: the module's class is swapped for its branch-running subclass; a hook handle
    widenable: bool = False  # a plain nn.Linear on a wide.DEVICES device, running on the subclass (see _widenable)
    wide: WideLinear | None = None  # the weight re-homed into [W; s*A] (lorakit.wide), kept until drop
    fanout: Fanout | None = None  # run with the layers that read the same input (lorakit.fanout), or None
    fan_index: int = 0  # this layer's place in its fanout (0: the one that computes all)
    next_same: LayerState | None = None  # the widened layer called right after this one on its input, last forward
    predicted: list[LayerState] | None = None  # the layers that follow this one on its input, by name (fanout.predict)
    strikes: int = 0  # fanouts of this layer dissolved because calls stopped following their pattern
    lonely: int = 0  # forwards in a row in which no layer followed this one on its input nor it another (learning)

    @property
    def weight(self) -> torch.Tensor:
        return self.module._parameters["weight"]  # read on every switch for ~1000 layers: skip Module.__getattr__

    def facts(self) -> tuple[torch.Size, torch.dtype, torch.device, torch.dtype, bool]:
        """(shape, dtype, device, compute dtype, contiguous) of the weight (batched._placement keeps what it needs
        of them per layer)."""
        w = self.weight
        return w.shape, w.dtype, w.device, self._compute_dtype(), w.is_contiguous()

    def _compute_dtype(self) -> torch.dtype:
        # On CPU, half-precision matmuls are slow and not always fp32-accumulated: compute in fp32, round once.
        w = self.weight
        return w.dtype if w.device.type == "cuda" else torch.float32

    @staticmethod
    def _accumulate(acc: torch.Tensor, contributions: list[Contribution], base: torch.Tensor | None = None,
                    shape: tuple[int, ...] | None = None) -> None:
        """``acc = (base if given else acc) + sum(c * delta)``; ``acc`` is the 2-D [out, in*kh*kw] view of a weight.

        All low-rank adapters go through ONE ``addmm`` that reads ``base`` and writes ``acc`` (one pass over the
        weight whatever the adapter count): their factors are concatenated along the rank, each ``up`` scaled by its
        multiplier in fp32 first. A single adapter passes its multiplier as ``alpha`` instead. Non-additive
        algorithms (DoRA, OFT, IA3, GLoRA) then transform the result in order, in fp32, on the weight's ``shape``."""
        additive = [(d, m) for d, m in contributions if d.additive]
        low = [(d.low_rank(), m) for d, m in additive if d.low_rank() is not None]
        full = [(d, m) for d, m in additive if d.low_rank() is None]
        src = acc if base is None else base
        if len(low) == 1:
            (up, down), mult = low[0]
            torch.addmm(src, up.to(acc.device, acc.dtype), down.to(acc.device, acc.dtype), alpha=mult, out=acc)
        elif low:
            up = torch.cat([(u.to(acc.device).float() * m).to(acc.dtype) for (u, _), m in low], 1)
            down = torch.cat([d.to(acc.device, acc.dtype) for (_, d), _ in low], 0)
            torch.addmm(src, up, down, out=acc)
        elif base is not None:
            acc.copy_(base)
        for delta, mult in full:
            acc.add_(delta.unscaled_delta(tuple(acc.shape), acc.dtype).to(acc.device), alpha=mult)
        for delta, mult in contributions:
            if not delta.additive:
                new = delta.apply(acc.float().reshape(shape or acc.shape), mult)
                acc.copy_(new.reshape(acc.shape))

    def compute(self, contributions: list[Contribution]) -> torch.Tensor:
        """The weight ``base + sum(c * delta)`` for these contributions, rounded once to the weight's dtype."""
        w = self.weight
        base = self.base if self.base is not None else w.detach()
        acc = base.to(device=w.device, dtype=self._compute_dtype(), copy=True).reshape(w.shape[0], -1)
        self._accumulate(acc, contributions, shape=tuple(w.shape))
        return acc.reshape(w.shape).to(w.dtype)

    def compute_bias(self, contributions: list[Contribution]) -> torch.Tensor | None:
        """The bias ``base + sum(c * bias_delta)``, then transformed by bias-scaling algorithms (PEFT IA3) in order,
        as the weight is (fp32, rounded once); None when no contribution changes it."""
        parts = [(d.bias_delta(), m) for d, m in contributions if d.bias_delta() is not None]
        scaling = [(d, m) for d, m in contributions if d.scales_bias]
        b = self.module.bias
        if not (parts or scaling) or b is None:
            return None
        acc = (self.base_bias if self.base_bias is not None else b.detach()).to(b.device, torch.float32, copy=True)
        for delta, mult in parts:
            acc.add_(delta.to(acc.device, torch.float32).reshape(acc.shape), alpha=mult)
        for delta, mult in scaling:
            acc = delta.apply_bias(acc, mult)
        return acc.to(b.dtype)

    def _write_bias(self, contributions: list[Contribution]) -> None:
        """Bias deltas (``diff_b``, ``b_norm``): the bias gets its own exact backup, taken before its first change."""
        new = self.compute_bias(contributions)
        if new is None and self.base_bias is None:
            return
        b = self.module.bias.detach()
        if self.base_bias is None:
            self.base_bias = b.to(self.backup_device or b.device, copy=True)
        b.copy_(self.base_bias if new is None else new)  # no bias delta left: exact restore

    def take_backup(self) -> None:
        """The exact copy of the weight, taken before its first change, where ``backup_device`` says."""
        if self.base is None:
            w = self.weight.detach()
            self.base = w.to(self.backup_device or w.device, copy=True)

    @torch.no_grad()
    def write(self, contributions: list[Contribution]) -> None:
        """Make the weight hold exactly these contributions (a no-op when it already does)."""
        signature = _signature(contributions)
        if signature == self.applied:
            return
        w = self.weight.detach()
        if contributions:
            self.take_backup()
        if not contributions:
            if self.base is not None:
                w.copy_(self.base)  # exact restore
        elif w.dtype == self._compute_dtype() and w.is_contiguous() and self.base.device == w.device:
            self._accumulate(w.view(w.shape[0], -1), contributions, self.base.view(w.shape[0], -1), tuple(w.shape))
        else:
            w.copy_(self.compute(contributions))
        self._write_bias(contributions)
        self.applied = signature

    # ------------------------------------------------------------------------------------------ branch
    @torch.no_grad()
    def set_branch(self, contributions: list[Contribution]) -> None:
        """Run these low-rank contributions as one stacked branch (shrink, scale, expand) in the forward pass.

        The stacked factors are rebuilt only when the set of adapters changes; a change of weights or call-time
        scale only rewrites the small per-rank scale vector, in place. (What switch plans run; uniform-weight sets
        run on views of the layer's factor pool instead: :meth:`join`.)"""
        if not contributions and not self._running:
            return  # the merge path's common case: nothing to run, nothing to remove
        _wide.changed()
        structure = (tuple(id(d) for d, _ in contributions), self.weight.device, self.weight.dtype)
        if not contributions:
            self.branch, self.branch_scale, self.branch_applied = None, None, structure
            self._run(False)  # no branch: the layer runs its own class's forward, at base speed
            return
        w = self.weight
        values = [m for d, m in contributions for _ in range(d.rank)]
        if structure == self.branch_applied:
            self.branch_scale.copy_(torch.tensor(values, dtype=w.dtype))
            return
        pairs = [d.low_rank() for d, _ in contributions]
        b = torch.cat([up.to(w.device, w.dtype) for up, _ in pairs], 1)
        a = torch.cat([down.to(w.device, w.dtype) for _, down in pairs], 0)
        if isinstance(self.module, nn.Conv2d):
            a = a.reshape(a.shape[0], *w.shape[1:])
            b = b.reshape(*b.shape, 1, 1)
        self.branch = (a, b)
        self.branch_scale = torch.tensor(values, dtype=w.dtype, device=w.device)
        self.branch_applied = structure
        self._run(True)
        self._set_widenable()

    @torch.no_grad()
    def restack_branch(self) -> None:
        """Recompute the stacked branch factors in place from the deltas they came from (whose values changed: a
        hotswap); a compiled graph that reads them sees the new values."""
        _wide.changed()
        by_id = {id(d): d for d in self.deltas.values()}
        pairs = [by_id[i].low_rank() for i in self.branch_applied[0]]
        a, b = self.branch
        a.view(a.shape[0], -1).copy_(torch.cat([down for _, down in pairs], 0))
        b.view(b.shape[0], -1).copy_(torch.cat([up for up, _ in pairs], 1))

    def attach_branch(self, branch: tuple[torch.Tensor, torch.Tensor], scale: torch.Tensor, structure: tuple) -> None:
        """Run a branch set up earlier (by :meth:`set_branch`) again, as it was: a switch back to an adapter set."""
        _wide.changed()
        self.branch, self.branch_scale, self.branch_applied = branch, scale, structure
        self._run(True)
        self._set_widenable()

    def join(self, group: Group) -> None:
        """Run on ``group``'s span of this layer's pool (see :mod:`lorakit.pool`), picked up at the next forward."""
        _wide.changed()
        self.group, self._epoch = group, 0
        self.branch, self.branch_scale, self.branch_applied = None, None, ()
        self._run(True)
        self._set_widenable()

    def current(self, keep: bool = True) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """(branch factors, per-rank scale) this layer runs now: its group's span of the pool when it has a group
        (views, made when the span changed; ``keep``: remember them), else what :meth:`set_branch` stacked."""
        group = self.group
        if group is None or (keep and self._epoch == group.epoch):
            return self.branch, self.branch_scale
        branch = self.pool.views(group.start, group.stop)
        scale = group.scale if branch is not None else None
        if keep:
            self.branch, self.branch_scale, self._epoch = branch, scale, group.epoch
        return branch, scale

    def _run(self, on: bool) -> None:
        """Swap the module's class for its branch-running subclass, or back. A subclass rather than a forward hook:
        a hook sends every call through Module's slow path, and eager forwards of diffusers' denoisers are bound by
        host time (an SDXL UNet at 1024px on an H200: ~42 ms of GPU work in an 86 ms step). A module whose forward
        is patched on the instance (accelerate's offload hooks do that) would never call the subclass's forward: it
        gets a forward hook instead."""
        if on == bool(self._running):
            return
        module = self.module
        if not on and self.fanout is not None:
            self.fanout.dissolve()
        if not on and self.wide is not None and not self.wide.homed(module):
            self.wide = None  # the module moved (.to()): the old matrix holds nothing of it any more
        if on and "forward" in module.__dict__:
            self._running = module.register_forward_hook(self._hooked)
        elif on:
            module._lorakit_layer = self
            module.__class__ = _branch_class(type(module))
            self._running = True
        elif self._running is True:
            module.__class__ = module.__class__._lorakit_base
            del module._lorakit_layer
            self._running = self.widenable = False
        else:
            self._running.remove()
            self._running = False

    def _set_widenable(self) -> None:
        self.widenable = self._widenable()
        self.lonely = 0  # (a switch: layers whose branches run now may read one input; learn again)
        if not self.widenable and self.fanout is not None:
            self.fanout.dissolve()  # (a fanout checks no member's eligibility per forward: it leaves here)

    def _widenable(self) -> bool:
        """Whether eager inference may run this layer through a :class:`~lorakit.wide.WideLinear`: a plain
        ``nn.Linear`` running on the branch subclass, its weight on a device where kernel launches are what a branch
        costs (re-checked whenever the layer's branch is set up again: after a move, a sync lays it out anew)."""
        module = self.module
        w = module._parameters.get("weight")
        return (self._running is True and module._lorakit_base.forward is nn.Linear.forward and w is not None
                and w.device.type in _wide.DEVICES)

    def _hooked(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.run_branch(module, inputs[0], output)

    def live(self) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """(branch factors, per-rank scale) for an eager forward: the group's span is picked up when it moved."""
        group = self.group
        if group is not None and self._epoch != group.epoch:
            return self.current()
        return self.branch, self.branch_scale

    def fast(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """This layer's output on ``x`` by the eager fast path when it is in no fanout (its own widened weight, or a
        fanout it forms now), or None where the plain branch runs instead. Only for eager inference of a widenable
        layer; a layer in a fanout runs :meth:`lorakit.fanout.Fanout.run` (None there: the plain branch, on the
        weight's rows in the fanout's matrix)."""
        if self.lonely < _LONELY and (not _fanout.ENABLED or self.strikes >= _fanout.STRIKES):
            self.lonely = _LONELY  # learns nothing: every forward takes WideLinear.run straight away
        if self.lonely < _LONELY and self.live()[0] is not None:
            chain = _fanout.note(self, x)
            if chain is not None and _fanout.form(chain, x) is not None:
                out = self.fanout.run(self, x)
                if out is not None or self.fanout is not None:
                    return out
        wide = self.wide_for(module, x)
        return None if wide is None else wide(x)

    def wide_for(self, module: nn.Module, x: torch.Tensor) -> WideLinear | None:
        """The :class:`~lorakit.wide.WideLinear` to run ``x`` through (two kernels for the layer and its branch),
        widening the weight when needed; None where the plain branch runs instead (no branch, every multiplier 0, a
        dtype the matrix does not have, factors elsewhere than the weight)."""
        branch, scale = self.live()
        if branch is None:
            return None
        wide = self.wide
        if wide is not None and wide.fresh(branch, scale):  # every forward but the first after a change
            if x.dtype == wide.dtype and wide.homed(module):
                return None if wide.idle else wide
        elif wide is not None and self.group is not None:
            self.refresh_once(self.group)
        if wide is None or not wide.ready(module, x, branch, scale):
            wide = self._widen(module, x, branch, scale)
            if wide is None:
                return None
        return None if wide.idle else wide

    @staticmethod
    def refresh_once(group: Group) -> None:
        """:meth:`refresh_group` when no layer of the group did since the last switch (its span or its scales)."""
        scale = group.scale
        key = (group.epoch, id(scale), None if scale is None else scale._version)
        if group.refreshed != key:  # the first layer of the group to run since the switch: once per switch
            group.refreshed = key
            LayerState.refresh_group(group)

    @staticmethod
    def refresh_group(group: Group) -> None:
        """A switch moved this group's span or rewrote its scales: bring the rows of every layer of the group that
        is widened already, alone or in a fanout, up to date at once (:func:`lorakit.wide.rewrite`,
        :func:`lorakit.fanout.rewrite`), rather than each at its own forward."""
        items, fans = [], []
        for layer in group.layers:
            fan = layer.fanout
            if fan is not None:
                if layer.fan_index == 0 and fan.state() == _fanout.STALE:
                    fans.append(fan)
                continue
            wide = layer.wide
            if wide is None or not layer.widenable or not wide.homed(layer.module):
                continue
            branch, scale = layer.current()
            if branch is not None and wide.holds(branch[0]):
                items.append((wide, branch, scale))
        _wide.rewrite(items)
        _fanout.rewrite(fans)

    def _widen(self, module: nn.Module, x: torch.Tensor, branch: tuple[torch.Tensor, torch.Tensor],
               scale: torch.Tensor) -> WideLinear | None:
        """Re-home the weight into a matrix with room for this branch (and for every adapter in the layer's pool,
        so that later sets fit): one copy of the weight, at the first forward or when the ranks outgrow it."""
        w = module._parameters["weight"]
        down = branch[0]
        if not (w.is_floating_point() and x.dtype == w.dtype == down.dtype == scale.dtype
                and down.device == w.device and down.shape[1] == w.shape[1]):
            return None
        capacity = max(down.shape[0], self.pool.down.shape[0] if self.pool is not None else 0)
        self.wide = WideLinear(module, capacity)
        self.wide.ready(module, x, branch, scale)
        return self.wide

    def run_branch(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output`` (the layer's own) plus this layer's branch on its input ``x``."""
        if self.group is not None and torch.compiler.is_compiling():
            branch, scale = self.current(keep=False)  # views made in the graph: no guard on this layer's bookkeeping
        else:
            branch, scale = self.live()
        if branch is None:
            return output
        a, b = branch
        if isinstance(module, nn.Conv2d):
            hidden = F.conv2d(x, a, None, module.stride, module.padding, module.dilation)
            return output + F.conv2d(hidden * scale[:, None, None], b)
        hidden = F.linear(x, a)
        if output.requires_grad or not output.is_contiguous() or output.dtype != b.dtype:
            # training (autograd sees every step) or autocast (F.linear casts the factors): out of place
            return output + F.linear(hidden * scale, b)
        # Inference: 3 kernels, no new activation: scale the small hidden in place, add the expand into the output
        hidden.mul_(scale)
        output.view(-1, output.shape[-1]).addmm_(hidden.view(-1, hidden.shape[-1]), b.t())
        return output

    @torch.no_grad()
    def release(self, keep: list[Contribution]) -> None:
        """Leave the weight holding ``keep`` (the fused adapters), drop the branch and forget the backup: unload."""
        self.write(keep)
        self.drop()

    def drop(self) -> None:
        """Forget the branch, the backup and the adapters, leaving the weight as it is now."""
        _wide.changed()
        self.group = self.pool = None
        if self.branch is not None or self._running:
            self.set_branch([])
        if self.fanout is not None:
            self.fanout.dissolve()
        if self.wide is not None:
            self.wide.release(self.module)
            self.wide = None
        self.next_same, self.predicted, self.strikes, self.lonely = None, None, 0, 0
        self.base = self.base_bias = None
        self.applied = ()
        self.deltas.clear()


_BRANCH_CLASSES: dict[type, type] = {}
_compiling = torch.compiler.is_compiling  # (read on every branch layer's forward)
_LONELY = _fanout.LONELY


def _branch_class(cls: type) -> type:
    """``cls`` with a forward that adds the layer's branch: same name, same parameters, ``isinstance`` still holds."""
    made = _BRANCH_CLASSES.get(cls)
    if made is None:
        base_forward = cls.forward

        def forward(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            layer = self._lorakit_layer
            # (compiling first: a traced graph never reads the wide path's bookkeeping, so it adds no guards)
            if layer.widenable and not _compiling() and not torch.is_grad_enabled():
                # (host time: each line here runs ~700 times per denoising step; one call per layer when set up)
                fan = layer.fanout
                if fan is not None:
                    out = fan.run(layer, input)
                    if out is None and layer.fanout is None:
                        out = layer.fast(self, input)  # the fanout dissolved just now: this layer runs alone
                else:
                    wide = layer.wide
                    out = wide.run(layer, self, input) if wide is not None and layer.lonely >= _LONELY else None
                    if out is None:
                        out = layer.fast(self, input)
                if out is not None:
                    return out
            return layer.run_branch(self, input, base_forward(self, input, *args, **kwargs))

        made = _BRANCH_CLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": forward, "_lorakit_base": cls, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__reduce_ex__": _reduce_as_base})
    return made


def _reduce_as_base(module: nn.Module, protocol: int) -> tuple:
    """Pickle (``torch.save(model)``) and ``copy.deepcopy`` a branch-running layer as a plain layer of its own class
    whose weight holds what it runs (its weight plus the branch, merged), as a layer in merge mode would be copied. A
    copy is attached to no manager: its branch could never be changed or removed, so it is not kept as one."""
    state = {k: v for k, v in module.__dict__.items() if k != "_lorakit_layer"}
    layer: LayerState = module._lorakit_layer
    branch, scale = layer.current(keep=False)
    if branch is not None:
        a, b = branch
        w = module._parameters["weight"]
        with torch.no_grad():
            merged = torch.addmm(w.reshape(w.shape[0], -1).float(), (b.flatten(1) * scale).float(),
                                 a.flatten(1).float()).to(w.dtype).reshape(w.shape)
        state["_parameters"] = {**state["_parameters"], "weight": nn.Parameter(merged, requires_grad=w.requires_grad)}
    # (stdlib only, so loading needs no lorakit; Module.__setstate__ then takes the state)
    return copyreg._reconstructor, (module._lorakit_base, object, None), state
