"""Branch mode's eager fast path for Linear layers that read the same input: one GEMM and one addmm_ for all of them.

An attention module projects one input three times (``to_q``, ``to_k``, ``to_v`` of self-attention; ``to_k`` and
``to_v`` of cross-attention read the text states; a Flux single block adds ``proj_mlp``). Each widened layer
(:mod:`lorakit.wide`) costs two kernels and their host time; a :class:`Fanout` runs its layers as one GEMM against
``[W_1; ...; W_n; s_1*A_1; ...; s_n*A_n]`` and one ``addmm_`` against the block-diagonal of the up factors, so three
layers cost two kernels where the base model runs three. On an H200 an SDXL step with 4 adapters (rank 128 on each
of 722 layers) went from 1.32x to 1.25x base, the same kernels by hand from 1.26x to 1.18x (``benchmarks/
branch_variants.py --paired``, BENCHMARKS.md "Session 8").

Fanouts are named where a table of sibling layers knows them (:data:`CHAINS`: self-attention's q/k/v, cross-
attention's k/v, CLIP's q/k/v_proj, Flux's context projections and single blocks): such a chain forms at its first
forward after a load. Other chains are learned: a widened layer called right after another on the very same tensor
(same object, same version) is linked to it, and at the first layer's next call the chain becomes a fanout. Named or
learned, the calls must follow the chain. The first layer then
computes every member's output; the others return theirs (views of one GEMM's output) when they are called on that
tensor. When the calls stop following that pattern (another input, another order, a member no longer running the
branch) the fanout dissolves: each layer gets its own storage back and runs alone (after two such misses a layer
stops linking). A layer that links to nothing for LONELY forwards stops noting (until the next switch).

Memory: the block-diagonal up factors (``sum(rank) x sum(out)``: 264 MiB for an SDXL UNet at rank 128 in fp16,
from its shapes) on top of what :mod:`lorakit.wide` takes. Every member's weight is a view of one matrix:
``state_dict()`` holds disjoint views of one storage, which safetensors saves as separate tensors. Inputs made under
``torch.inference_mode()`` carry no version counter, so an in-place change between two calls could not be seen: on
those the members run the plain branch (diffusers pipelines run under ``no_grad``, where fanouts run). A learned
chain runs its layers alone at the first forward after a load and as a fanout from the second, so the two can
differ in the last bits; a named chain runs as a fanout from the first.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .wide import _all_zero, _changes, _normal, write_scaled

if TYPE_CHECKING:
    from .layers import LayerState

# LORAKIT_FANOUT=0, or ENABLED = False: every widened layer runs alone (lorakit.wide) as before.
ENABLED: bool = os.environ.get("LORAKIT_FANOUT", "1") != "0"
FRESH, STALE, MOVED = 0, 1, 2  # what Fanout.state() finds
LONELY = 3  # forwards in a row a layer is noted without any link before it stops (a switch resets it)
STRIKES = 2  # dissolutions after which a layer stops linking (its callers' pattern keeps changing)
LONGEST = 8  # layers in one chain at most (a longer one is cut)

# Children of one module that its forward calls one after another on one input, in call order (the first leads):
# their fanout forms at their first forward instead of being learned from it (see predict()). "self" / "cross": only
# where the module is not / is cross-attention (diffusers' ``Attention.is_cross_attention``; a module without the
# flag counts as self-attention). Earlier rows win. A wrong guess costs one dissolved fanout, then the calls teach.
CHAINS: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"), None),  # Flux single blocks: the MLP and the attention
    (("to_q", "to_k", "to_v"), "self"),  # diffusers' self-attention (UNets, DiTs)
    (("to_k", "to_v"), "cross"),  # cross-attention: k and v read the text states
    (("add_q_proj", "add_k_proj", "add_v_proj"), None),  # joint attention's text stream (Flux, SD3)
    (("q_proj", "k_proj", "v_proj"), None),  # CLIP's attention
)

# Weak references to the widened layer called last and to its input, and the input's version.
_last: list = [None, None, -1]


def predict(layers: Mapping[str, LayerState], modules: Mapping[str, nn.Module]) -> None:
    """Give each layer that leads a chain of :data:`CHAINS` its followers (``predicted``), from the layers' paths
    (``layers``: path -> layer; ``modules``: the model's named modules). Their fanout then forms at their first
    forward, which gives what later forwards give; the calls still have to follow the chain (a follower called on
    another tensor dissolves it, and the layers learn from the calls as without a prediction)."""
    for layer in layers.values():
        layer.predicted = None
    taken: set[int] = set()
    for names, kind in CHAINS:
        first = names[0]
        for path, layer in layers.items():
            if not (path == first or path.endswith("." + first)):
                continue
            prefix = path[:len(path) - len(first)]  # "parent." (or "" at the top)
            members = [layers.get(prefix + name) for name in names]
            if any(m is None or id(m) in taken for m in members):
                continue
            if kind is not None:  # (attention classes without the flag, Flux's: self-attention)
                cross = bool(getattr(modules.get(prefix[:-1]), "is_cross_attention", False))
                if cross != (kind == "cross"):
                    continue
            layer.predicted = members[1:]
            taken.update(map(id, members))


def note(layer: LayerState, x: torch.Tensor) -> list[LayerState] | None:
    """Record that ``layer`` runs on ``x`` now. Returns the chain it leads (itself, then the layers that followed it
    on its input last time, or those :func:`predict` named for it) when there is one to form, else None."""
    if x.is_inference():  # no version counter: an in-place change between two calls could not be seen
        _last[1] = None
        return None
    prev, ref, version = _last
    _last[0], _last[1], _last[2] = weakref.ref(layer), weakref.ref(x), x._version
    if layer.next_same is None and layer.predicted is not None and not layer.strikes:
        return [layer, *layer.predicted]  # (the calls confirm it: see Fanout.run)
    if layer.next_same is None:  # (a layer that leads a chain learned last time forms it, whatever came before)
        if ref is not None and ref() is x and version == x._version and (prev := prev()) is not layer:
            if prev is not None and prev.strikes < STRIKES:
                prev.next_same = layer
                prev.lonely = layer.lonely = 0
                return None
        layer.lonely += 1  # (LONELY forwards of this: it stops noting, and its forwards skip this function)
        return None
    chain = [layer]
    while chain[-1].next_same is not None and len(chain) < LONGEST:
        nxt = chain[-1].next_same
        chain[-1].next_same = None
        if any(nxt is c for c in chain):
            break
        chain.append(nxt)
    chain[-1].next_same = None
    return chain


def _compatible(chain: list[LayerState], x: torch.Tensor) -> list | None:
    """Each member's (branch, scale) when the chain can run as one fanout on ``x`` now, else None."""
    w0 = chain[0].module._parameters["weight"]
    states = []
    for layer in chain:
        w = layer.module._parameters["weight"]
        if not (layer._running is True and layer.widenable and layer.fanout is None):
            return None
        branch, scale = layer.live()
        if branch is None:
            return None
        down = branch[0]
        if not (w.dtype == w0.dtype == x.dtype == down.dtype == scale.dtype and w.device == w0.device == down.device
                and w.dim() == 2 and w.shape[1] == w0.shape[1] == down.shape[1] and w.is_floating_point()):
            return None
        states.append((branch, scale))
    return states


def form(chain: list[LayerState], x: torch.Tensor) -> Fanout | None:
    """Make a fanout of ``chain`` (learned by :func:`note`), or None (and a strike each) when it cannot run on ``x``."""
    states = _compatible(chain, x)
    if states is None:
        for layer in chain:
            layer.strikes += 1
        return None
    capacities = []
    for layer, (branch, _) in zip(chain, states):
        if layer.wide is not None:  # widened alone before: its own matrix goes
            layer.wide.release(layer.module)
            layer.wide = None
        capacities.append(max(branch[0].shape[0], layer.pool.down.shape[0] if layer.pool is not None else 0))
    return Fanout(chain, capacities)


class Fanout:
    """Layers reading one input, their weights (and biases) re-homed as the first rows of one matrix."""

    @_normal
    @torch.no_grad()
    def __init__(self, members: list[LayerState], capacities: list[int]) -> None:
        params = [(m.module._parameters["weight"], m.module._parameters["bias"]) for m in members]
        w0 = params[0][0]
        self.outs = tuple(w.shape[0] for w, _ in params)
        total, room = sum(self.outs), sum(capacities)
        self.matrix = w0.new_empty(total + room, w0.shape[1])
        self.bias = w0.new_zeros(total + room) if any(b is not None for _, b in params) else None
        self.up_diag = w0.new_zeros(room, total)  # the block-diagonal of the up factors, transposed
        self.members, self.capacities, self.total, self.dtype = members, capacities, total, w0.dtype
        ptrs, start = [], 0
        for (w, b), out in zip(params, self.outs):
            self.matrix[start:start + out].copy_(w)
            w.data = self.matrix[start:start + out]  # the Parameter and its values stay; its storage moves
            if b is not None:
                self.bias[start:start + out].copy_(b)
                b.data = self.bias[start:start + out]
            ptrs.append((w.data_ptr(), 0 if b is None else b.data_ptr()))
            start += out
        self.ptrs = ptrs
        self.checks = [(m, m.module._parameters, wp, bp) for m, (wp, bp) in zip(members, ptrs)]  # (state())
        self.sources: list[tuple] = [()] * len(members)  # per member: (down, scale, up, their versions)
        self.ranks: tuple[int, ...] = ()
        self.used = self.used_bias = self.up = None
        self.sizes = (total, 0)
        self.idle = False
        self.stamp = -1  # the count of wide.changed() at which state() last found the branches as the rows hold them
        # one round: the input the first member ran on, its version, the others' outputs not yet taken
        self.x: torch.Tensor | None = None
        self.version = -1
        self.parts: list[torch.Tensor | None] = [None] * len(members)
        self.left = 0
        for i, m in enumerate(members):
            m.fanout, m.fan_index = self, i

    def run(self, layer: LayerState, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output on ``x``: the first member computes every member's, the others take theirs. None
        where the plain branch runs instead (the fanout dissolved, or every multiplier is 0). (Host time: this runs
        for every member at every forward.)"""
        i = layer.fan_index
        if i:
            part = self.parts[i]
            if part is None:  # the first member did not run this round (idle, or called after this one)
                return None
            if self.x is x and self.version == x._version:
                self.parts[i] = None
                self.left -= 1
                if not self.left:
                    self.x = None
                return part
            self.dissolve(strike=True)  # called on another input: the pattern changed
            return None
        if (self.left or x.dtype != self.dtype or x.is_inference() or self.state() != FRESH) and not self._settle(x):
            return None
        if self.idle:
            return None
        y, hidden = F.linear(x, self.used, self.used_bias).split_with_sizes(self.sizes, -1)
        y.view(-1, self.total).addmm_(hidden.view(-1, self.sizes[1]), self.up)
        parts = list(y.split_with_sizes(self.outs, -1))
        self.parts, self.left, self.x, self.version = parts, len(parts) - 1, x, x._version
        return parts[0]

    def _settle(self, x: torch.Tensor) -> bool:
        """Whether the first member may compute this round after all, bringing the rows up to date if they are
        stale; False where the members run the plain branch (dissolving the fanout when it no longer holds)."""
        if self.left:  # a member did not take its output last round
            self.dissolve(strike=True)
            return False
        if x.dtype != self.dtype or x.is_inference():  # (autocast; see note): this round only
            return False
        state = self.state()
        if state == MOVED:
            self.dissolve()
            return False
        if state == STALE:
            group = self.members[0].group
            if group is not None:  # the first layer of its group to run since a switch: the whole group at once
                self.members[0].refresh_once(group)
            if self.stale() and not rewrite([self]):
                self.dissolve()
                return False
        return True

    def stale(self) -> bool:
        return self.state() != FRESH

    def state(self) -> int:
        """MOVED when a member's parameters left the matrix (``.to()``/``.half()`` replace their data), STALE
        when a member's branch, multipliers or up factors changed (identity or values) since the rows and the
        block-diagonal were written, else FRESH. Every forward's check: the parameters' places, then (only when
        lorakit :func:`lorakit.wide.changed` something since the last look) the members' :meth:`LayerState.live`,
        inlined in one loop."""
        for _, p, wp, bp in self.checks:
            b = p["bias"]
            if p["weight"].data_ptr() != wp or (0 if b is None else b.data_ptr()) != bp:
                return MOVED
        stamp = _changes[0]
        if self.stamp == stamp:
            return FRESH
        stale = False
        for (m, _, _, _), src in zip(self.checks, self.sources):
            if stale:
                break
            group = m.group
            branch, scale = m.branch, m.branch_scale
            if branch is None or not src or (group is not None and m._epoch != group.epoch):
                stale = True
                continue
            down, up = branch
            stale = not (src[0] is down and src[1] is scale and src[2] is up and src[3] == down._version
                         and src[4] == scale._version and src[5] == up._version)
        if stale:
            return STALE
        self.stamp = stamp
        return FRESH

    def layout(self, states: list, rows: list, downs: list, scales: list, blocks: list, ups: list) -> bool:
        """Queue what must be rewritten for these (branch, scale) per member: the rows of members whose factors or
        multipliers changed, the up blocks of those whose up factors or ranks changed (:func:`rewrite` writes
        them). False when a branch does not fit (the caller dissolves the fanout)."""
        m = self.matrix
        ranks = tuple(branch[0].shape[0] for branch, _ in states)
        for (branch, _), cap in zip(states, self.capacities):
            down = branch[0]
            if down.shape[0] > cap or down.dtype != m.dtype or down.device != m.device:
                return False
        moved = ranks != self.ranks
        if moved:  # the blocks move: the rest of the block-diagonal must read 0
            self.ranks, rank = ranks, sum(ranks)
            end = self.total + rank
            self.used, self.used_bias = m[:end], None if self.bias is None else self.bias[:end]
            self.up = self.up_diag[:rank]
            with torch.no_grad(), _normal:
                self.up.zero_()
            self.sizes = (self.total, rank)
        row = col = 0
        for ((down, up), scale), src, r, out in zip(states, self.sources, ranks, self.outs):
            if moved or not (src and src[0] is down and src[1] is scale and src[3] == down._version
                             and src[4] == scale._version):
                rows.append(m[self.total + row:self.total + row + r])
                downs.append(down)
                scales.append(scale[:, None])
            if moved or not (src and src[2] is up and src[5] == up._version):
                blocks.append(self.up[row:row + r, col:col + out])
                ups.append(up.t())
            row, col = row + r, col + out
        self.sources = [(b[0], s, b[1], b[0]._version, s._version, b[1]._version) for b, s in states]
        self.idle = any(_all_zero(s) for _, s in states)  # the layers with all multipliers 0 must give the base
        return True

    @_normal
    def dissolve(self, strike: bool = False) -> None:
        """Give each member's parameters storage of their own again (the values stay) and let it run alone."""
        for m, (wp, bp) in zip(self.members, self.ptrs):
            for p, ptr in zip((m.module._parameters["weight"], m.module._parameters["bias"]), (wp, bp)):
                if p is not None and p.data_ptr() == ptr:  # (a member moved since holds storage of its own)
                    p.data = p.data.clone()
            m.fanout, m.next_same, m.lonely = None, None, 0
            if strike:
                m.strikes += 1
        self.x, self.parts, self.left = None, [None] * len(self.members), 0


@_normal
@torch.no_grad()
def rewrite(fans: list[Fanout]) -> bool:
    """Bring these fanouts' rows and block-diagonals up to date with their members' branches, in three multi-tensor
    operations for all of them (a switch would otherwise cost each fanout a few kernels at its first forward).
    Fanouts whose branches no longer fit dissolve; False when one of them did."""
    rows: list = []
    downs: list = []
    scales: list = []
    blocks: list = []
    ups: list = []
    fitted = True
    for fan in fans:
        states = [m.live() for m in fan.members]
        if any(branch is None for branch, _ in states) or not fan.layout(states, rows, downs, scales, blocks, ups):
            fan.dissolve()
            fitted = False
    if rows:
        write_scaled(rows, downs, scales)
    if blocks:
        torch._foreach_copy_(blocks, ups)
    return fitted
