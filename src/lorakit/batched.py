"""Merging many layers at once on an accelerator: one batched matmul per group of same-shaped layers.

A switch of the adapter mix (``set_adapters``, a call-time scale, a load) re-merges every targeted weight. Done layer
by layer that is ~1000 small kernels and as much Python for an SDXL UNet with its text encoders; grouped by weight
shape and adapter ranks, it is a few kernels per group::

    W[i] = base[i] + sum_j m[i, j] * up_j[i] @ down_j[i]        for every layer i of a group
         = baddbmm(stack(base), cat_j(stack(up_j) * m[:, j]), cat_j(stack(down_j)))

On the GPU the batched product runs in the weights' dtype (cuBLAS accumulates in fp32 and rounds once); each
adapter's multipliers are applied to its factor in fp32 before that factor is rounded. Groups are cut into chunks to
bound the temporary memory.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict

import torch

from .adapter import WeightDelta
from .layers import Contribution, LayerState, _signature

CHUNK_BYTES = 512 * 1024 * 1024  # fp32 temporaries per chunk: stacked bases + result
DEVICES = ("cuda",)  # where batching pays off (kernel launches dominate); tests add "cpu" to exercise it
# Above this many elements a layer's own addmm (one pass over the weight) beats the batched path (three passes:
# stack, product, copy back), whose saving is launch overhead: ~15 us per layer against ~8 bytes per element.
MAX_BATCHED_ELEMENTS = 4 * 1024 * 1024


_STACKS: OrderedDict[tuple[int, ...], tuple[list[WeightDelta], torch.Tensor, torch.Tensor]] = OrderedDict()
STACK_CACHE_SIZE = 256


def _stacked(deltas: list[WeightDelta]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked ``(up [n, out, r], down [n, r, in])`` of one adapter over a chunk of layers, cached: switching the
    mix reuses them. The cache holds the deltas themselves, so their ids (the key) cannot be reused while cached."""
    key = tuple(id(d) for d in deltas)
    hit = _STACKS.get(key)
    if hit is not None:
        _STACKS.move_to_end(key)
        return hit[1], hit[2]
    pairs = [d.low_rank() for d in deltas]
    up, down = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    _STACKS[key] = (deltas, up, down)
    if len(_STACKS) > STACK_CACHE_SIZE:
        _STACKS.popitem(last=False)
    return up, down


def clear_cache() -> None:
    """Drop every cached stack (after adapters are deleted, unloaded or swapped out: frees their memory)."""
    _STACKS.clear()


def eligible(layer: LayerState, contributions: list[Contribution]) -> bool:
    """Batched merging covers the common case: a CUDA weight, its backup beside it, low-rank adapters only."""
    w = layer.weight
    return (w.device.type in DEVICES and w.is_contiguous() and bool(contributions)
            and w.numel() <= MAX_BATCHED_ELEMENTS
            and (layer.base is None or layer.base.device == w.device) and layer.base_bias is None
            and all(d.low_rank() is not None for d, _ in contributions))


@torch.no_grad()
def write_many(items: list[tuple[LayerState, list[Contribution]]]) -> None:
    """``layer.write(contributions)`` for every item, batching what can be batched."""
    groups: dict[tuple, list[tuple[LayerState, list[Contribution], tuple]]] = defaultdict(list)
    restores: list[LayerState] = []
    for layer, contributions in items:
        signature = _signature(contributions)
        if signature == layer.applied:
            continue
        if (not contributions and layer.base is not None and layer.base.device == layer.weight.device
                and layer.base_bias is None):
            restores.append(layer)  # exact copies back, many tensors per kernel
            continue
        if not eligible(layer, contributions):
            layer.write(contributions)
            continue
        w = layer.weight
        key = (w.shape[0], w[0].numel(), w.dtype, w.device, tuple(d.rank for d, _ in contributions))
        groups[key].append((layer, contributions, signature))
    if restores:
        torch._foreach_copy_([layer.weight.detach() for layer in restores], [layer.base for layer in restores])
        for layer in restores:
            layer.applied = ()
    for (out, inp, _, _, _), members in groups.items():
        per_layer = out * inp * 4 * 2
        size = max(1, CHUNK_BYTES // per_layer)
        for start in range(0, len(members), size):
            _merge_chunk(members[start:start + size], out, inp)


def _merge_chunk(members: list[tuple[LayerState, list[Contribution], tuple]], out: int, inp: int) -> None:
    weights = [layer.weight.detach().view(out, inp) for layer, _, _ in members]
    for layer, _, _ in members:
        if layer.base is None:
            layer.base = layer.weight.detach().clone()
    device, dtype = weights[0].device, weights[0].dtype
    # cuBLAS accumulates half-precision products in fp32 and rounds once; elsewhere compute in fp32.
    cdtype = dtype if device.type == "cuda" else torch.float32
    acc = torch.stack([layer.base.view(out, inp) for layer, _, _ in members]).to(cdtype)
    n_adapters = len(members[0][1])
    mults = torch.tensor([[m for _, m in contribs] for _, contribs, _ in members], dtype=torch.float32)
    mults = mults.to(device, non_blocking=True)
    ups, downs = [], []
    for j in range(n_adapters):
        up, down = _stacked([contribs[j][0] for _, contribs, _ in members])
        # the multiplier is applied in fp32, then the scaled factor is rounded once (as PEFT scales its output)
        ups.append((up.float() * mults[:, j, None, None]).to(cdtype))
        downs.append(down.to(cdtype))
    up = ups[0] if n_adapters == 1 else torch.cat(ups, 2)
    down = downs[0] if n_adapters == 1 else torch.cat(downs, 1)
    acc.baddbmm_(up, down)
    torch._foreach_copy_(weights, list(acc.to(dtype).unbind(0)))
    for layer, _, signature in members:
        layer.applied = signature
