"""Adapter-level merging, resizing and extraction: build new adapters from existing ones (or from two models).

The tensor math lives in :mod:`lorakit.merge`; this module walks adapters component by component and module by
module. Inputs are never changed. Every result is an :class:`~lorakit.adapter.Adapter` of :class:`LoraWeights` with
``alpha == rank`` (scale 1: the factors carry the whole delta), as PEFT's ``add_weighted_adapter`` makes its new
adapter, so it saves to the diffusers/PEFT format and loads back the same everywhere.

Alpha: PEFT applies each input's own ``alpha / rank`` (per module, alpha_pattern included) before combining, and so
does lorakit: ``linear``/``ties``/``dare_*``/``magnitude_prune`` weight A by ``sign * sqrt(|w * scale|)`` and B by
``sqrt(|w * scale|)``; ``cat`` weights A by ``w * scale``; the ``*_svd`` methods combine full scaled deltas.

Example:
    >>> merged, report = merge_adapters([a, b], [0.7, 0.8], "mix", "ties_svd", density=0.5)   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import merge as M
from .adapter import Adapter, LokrWeights, LoraWeights, WeightDelta
from .errors import LoraError

Shape = tuple[int, ...]
#: ``shape_of(component, path, deltas)`` -> the target weight shape of a module.
ShapeFn = Callable[[str, str, Sequence[WeightDelta]], Shape]
Progress = Callable[[str], None] | None


def factor_shape(delta: WeightDelta) -> Shape:
    """The weight shape a delta implies from its factors alone (model-free files); LoKr: its 2-D product."""
    if isinstance(delta, LoraWeights):
        if delta.mid is not None:
            return (delta.up.shape[0], delta.down.shape[1], *delta.mid.shape[2:])
        return (delta.up.shape[0], *delta.down.shape[1:])
    if isinstance(delta, LokrWeights):
        f1, f2 = delta.factor1(torch.float32), delta.factor2(torch.float32)
        if f1.dim() > 2 or f2.dim() > 2:
            raise LoraError("a LoKr conv module needs its target model to be merged; load the LoRAs into a "
                            "pipeline (lorakit.attach) and call pipe.add_weighted_adapter there.")
        return (f1.shape[0] * f2.shape[0], f1.shape[1] * f2.shape[1])
    raise LoraError(f"cannot merge a {type(delta).__name__}.")


def lora_from_2d(up: torch.Tensor, down: torch.Tensor, shape: Shape, dtype: torch.dtype) -> LoraWeights:
    """LoraWeights shaped for the target: down [r, in(, kh, kw)], up [out, r(, 1, 1)] for convs."""
    r = down.shape[0]
    conv = len(shape) == 4
    up = up.reshape(shape[0], r, 1, 1) if conv else up
    down = down.reshape(r, *shape[1:]) if conv else down.reshape(r, -1)
    return LoraWeights(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous(), alpha=float(r))


@dataclass
class ModuleReport:
    """What happened to one module: its new rank and, where an SVD truncated it, the relative Frobenius error."""

    component: str
    path: str
    rank: int
    error: float | None = None


@dataclass
class MergeReport:
    """Per-module outcome of a merge, resize or extract."""

    modules: list[ModuleReport] = field(default_factory=list)

    @property
    def max_error(self) -> float | None:
        errors = [m.error for m in self.modules if m.error is not None]
        return max(errors) if errors else None

    @property
    def ranks(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for m in self.modules:
            out[m.rank] = out.get(m.rank, 0) + 1
        return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------------ merge
def _check_merge(adapters: Sequence[Adapter], weights: Sequence[float], method: str, density: float | None) -> str:
    if not adapters:
        raise LoraError("add_weighted_adapter: give at least one adapter to merge.")
    if not isinstance(weights, Sequence) or isinstance(weights, str):
        raise LoraError(f"add_weighted_adapter: weights must be a list with one number per adapter, found {weights!r}.")
    if len(weights) != len(adapters):
        raise LoraError(f"add_weighted_adapter: {len(adapters)} adapter(s) but {len(weights)} weight(s); give one "
                        f"weight per adapter.")
    if method not in M.METHODS:
        raise LoraError(f"add_weighted_adapter: unknown combination_type {method!r}; expected one of "
                        f"{list(M.METHODS)}.")
    method = "linear" if len(adapters) == 1 else method  # as PEFT: one adapter can only be scaled
    if method in M.DENSITY_METHODS and density is None:
        raise LoraError(f"add_weighted_adapter: combination_type {method!r} needs density= (fraction kept, 0..1).")
    for a in adapters:
        for comp, mods in a.layers.items():
            for path, d in mods.items():
                if d.bias_delta() is not None:
                    raise LoraError(f"add_weighted_adapter: adapter {a.name!r} also changes the bias at {comp}.{path} "
                                    f"(lora_B.bias or diff_b), which a merged LoRA cannot hold; merge adapters "
                                    f"without bias deltas, or combine them with set_adapters weights instead.")
                if not isinstance(d, LoraWeights) and method not in M.SVD_METHODS:
                    raise LoraError(f"add_weighted_adapter: adapter {a.name!r} holds a {type(d).__name__} at "
                                    f"{comp}.{path}, which {method!r} cannot combine factor by factor; use "
                                    f"{M.svd_alternative(method) if method != 'cat' else 'svd'!r}, which merges "
                                    f"full deltas.")
    if method in M.FACTOR_METHODS:
        for comp, path, present in touched_modules(adapters):
            ranks = {a.name: a.layers[comp][path].rank for a, _ in present}
            if len(set(ranks.values())) > 1:
                raise LoraError(f"add_weighted_adapter: {method!r} needs equal ranks, but {comp}.{path} has ranks "
                                f"{ranks}. Use combination_type={M.svd_alternative(method)!r} (any ranks) or 'cat'.")
    return method


def touched_modules(adapters: Sequence[Adapter]) -> list[tuple[str, str, list[tuple[Adapter, int]]]]:
    """Every (component, path) any adapter touches, with the adapters (and their indices) that hold it."""
    keys: dict[tuple[str, str], list[tuple[Adapter, int]]] = {}
    for i, a in enumerate(adapters):
        for comp, mods in a.layers.items():
            for path in mods:
                keys.setdefault((comp, path), []).append((a, i))
    return [(c, p, present) for (c, p), present in keys.items()]


def merge_module(deltas: Sequence[WeightDelta], weights: Sequence[float], method: str, shape: Shape, *,
                 rank: int | None = None, density: float | None = None, majority_sign_method: M.SignMethod = "total",
                 svd_clamp: float | None = None, generator: torch.Generator | None = None
                 ) -> tuple[LoraWeights, float | None]:
    """Merge the deltas of one module (the adapters that hold it) into new LoRA factors; returns them and, for the
    ``*_svd`` methods, the relative error of the truncation."""
    dtype = next(iter(deltas[0].tensors().values())).dtype
    kw = {"density": density, "majority_sign_method": majority_sign_method, "generator": generator}
    if method in M.SVD_METHODS:
        full = [d.delta(shape, torch.float32).reshape(shape[0], -1) for d in deltas]
        total = M.combine(method, full, torch.tensor(weights, dtype=torch.float32), **kw)
        up, down, S = M.truncated_svd(total, rank, clamp=svd_clamp)
        return lora_from_2d(up, down, shape, dtype), M.relative_error(S, up.shape[1])
    factors = [tuple(t.float() for t in d.low_rank()) for d in deltas]  # (up2d, down2d)
    scaled = [w * d.scale for w, d in zip(weights, deltas)]
    if method == "cat":
        down = torch.cat([dn * s for (_, dn), s in zip(factors, scaled)])
        up = torch.cat([u for u, _ in factors], dim=1)
        return lora_from_2d(up, down, shape, dtype), None
    w_down = torch.tensor([math.copysign(math.sqrt(abs(s)), s) for s in scaled])
    w_up = torch.tensor([math.sqrt(abs(s)) for s in scaled])
    down = M.combine(method, [dn for _, dn in factors], w_down, **kw)
    up = M.combine(method, [u for u, _ in factors], w_up, **kw)
    return lora_from_2d(up, down, shape, dtype), None


def merge_adapters(adapters: Sequence[Adapter], weights: Sequence[float], adapter_name: str,
                   combination_type: str = "svd", *, shape_of: ShapeFn | None = None, density: float | None = None,
                   majority_sign_method: M.SignMethod = "total", svd_rank: int | None = None,
                   svd_clamp: float | None = None, seed: int | None = None,
                   progress: Progress = None) -> tuple[Adapter, MergeReport]:
    """A new adapter combining ``adapters`` with ``weights`` by ``combination_type`` (PEFT's names and semantics).

    A module held by only some adapters is merged from those (the others count as a zero delta). Factor methods
    (``linear``, ``ties``, ``dare_*``, ``magnitude_prune``) need equal ranks per module; ``cat`` and ``*_svd`` take
    any ranks; ``*_svd`` truncate to ``svd_rank`` (default: the largest input rank). ``seed`` makes the random
    ``dare_*`` methods reproducible. ``shape_of`` gives target weight shapes (default: from the factors).

    Example:
        >>> mix, report = merge_adapters([a, b], [1.0, 0.5], "mix", "cat")   # doctest: +SKIP
    """
    method = _check_merge(adapters, weights, combination_type, density)
    if majority_sign_method not in ("total", "frequency"):
        raise LoraError(f"majority_sign_method must be 'total' or 'frequency', found {majority_sign_method!r}.")
    if svd_rank is not None and svd_rank < 1:
        raise LoraError(f"svd_rank must be >= 1, found {svd_rank}.")
    rank = svd_rank or max(d.rank for a in adapters for mods in a.layers.values() for d in mods.values())
    shape_of = shape_of or (lambda comp, path, ds: factor_shape(ds[0]))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    layers: dict[str, dict[str, WeightDelta]] = {}
    report = MergeReport()
    for comp, path, present in sorted(touched_modules(adapters), key=lambda x: (x[0], x[1])):
        deltas = [a.layers[comp][path] for a, _ in present]
        ws = [float(weights[i]) for _, i in present]
        merged, err = merge_module(deltas, ws, method, shape_of(comp, path, deltas), rank=rank, density=density,
                                   majority_sign_method=majority_sign_method, svd_clamp=svd_clamp,
                                   generator=generator)
        device = next(iter(deltas[0].tensors().values())).device
        layers.setdefault(comp, {})[path] = merged.to(device=device)
        report.modules.append(ModuleReport(comp, path, merged.rank, err))
        if progress:
            progress(f"{comp}.{path}")
    meta = {"lorakit_merge": f"{method} of {[a.name for a in adapters]} weights {list(map(float, weights))}"}
    return Adapter(adapter_name, layers, source=f"<merge: {method}>", format="merged", metadata=meta), report


# ------------------------------------------------------------------------------------------------ resize
def resize_adapter(adapter: Adapter, rank: int | None = None, energy: float | None = None, *,
                   shape_of: ShapeFn | None = None, name: str | None = None,
                   progress: Progress = None) -> tuple[Adapter, MergeReport]:
    """Re-rank every module of ``adapter`` by SVD of its full delta: to ``rank`` (capped by the layer's size), or
    to the smallest rank that keeps ``energy`` of the sum of squared singular values. The report gives each
    module's new rank and relative Frobenius error ``||D - D_r|| / ||D||``.

    Example:
        >>> small, report = resize_adapter(adapter, rank=8)           # doctest: +SKIP
        >>> report.max_error                                           # doctest: +SKIP
        0.031
    """
    if (rank is None) == (energy is None):
        raise LoraError("resize: give exactly one of rank= (a fixed rank) or energy= (a kept fraction in (0, 1]).")
    if rank is not None and rank < 1:
        raise LoraError(f"resize: rank must be >= 1, found {rank}.")
    shape_of = shape_of or (lambda comp, path, ds: factor_shape(ds[0]))
    layers: dict[str, dict[str, WeightDelta]] = {}
    report = MergeReport()
    for comp, mods in adapter.layers.items():
        for path, delta in sorted(mods.items()):
            shape = shape_of(comp, path, [delta])
            dtype = next(iter(delta.tensors().values())).dtype
            up, down, S = _low_rank_svd(delta, shape)
            k = rank if rank is not None else M.rank_for_energy(S, energy)
            k = max(1, min(k, S.numel()))
            root = S[:k].sqrt()
            new = lora_from_2d(up[:, :k] * root, root[:, None] * down[:k], shape, dtype)
            layers.setdefault(comp, {})[path] = new.to(device=next(iter(delta.tensors().values())).device)
            report.modules.append(ModuleReport(comp, path, k, M.relative_error(S, k)))
            if progress:
                progress(f"{comp}.{path}")
    out = Adapter(name or adapter.name, layers, source=adapter.source, format=adapter.format, family=adapter.family,
                  metadata={"lorakit_resize": f"rank={rank}" if rank is not None else f"energy={energy}"})
    return out, report


def _low_rank_svd(delta: WeightDelta, shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, Vh, S)`` of the scaled delta; for LoRA factors through QR of each side (a small r x r SVD)."""
    if isinstance(delta, LoraWeights):
        up, down = (t.double() for t in delta.low_rank())
        qu, ru = torch.linalg.qr(up)
        qd, rd = torch.linalg.qr(down.T)
        U, S, Vh = torch.linalg.svd((ru @ rd.T) * delta.scale, full_matrices=False)
        return (qu @ U).float(), (Vh @ qd.T).float(), S.float()
    U, S, Vh = torch.linalg.svd(delta.delta(shape, torch.float32).reshape(shape[0], -1), full_matrices=False)
    return U, Vh, S
