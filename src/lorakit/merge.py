"""Merge math on plain tensors: pruning, sign election, disjoint merge, the combination methods and truncated SVD.

Every function here is pure (no module, no adapter, no global state) and follows the semantics of PEFT's
``add_weighted_adapter`` (``peft.utils.merge_utils``), so lorakit's merges give the same effective weights as PEFT's
for the deterministic methods. Task tensors are same-shaped tensors stacked along a new first dimension.

Example:
    >>> import torch
    >>> a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, 2.0, -1.0])
    >>> combine("linear", [a, b], torch.tensor([0.5, 0.5]))
    tensor([1., 0., 1.])
    >>> combine("ties", [a, b], torch.tensor([1.0, 1.0]), density=1.0)
    tensor([1., 2., 3.])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .errors import LoraError

SignMethod = Literal["total", "frequency"]

#: Methods that combine LoRA factors (A and B separately); they need equal ranks.
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Methods that combine full deltas and re-factor them by SVD; any ranks.
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
#: Every combination type, as PEFT names them.
METHODS = ("cat", *FACTOR_METHODS, *SVD_METHODS)
#: Methods that prune with a density.
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune",
                   "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def svd_alternative(method: str) -> str:
    """The method combining full deltas that does what ``method`` does on factors (``linear`` -> ``svd``)."""
    return "svd" if method == "linear" else f"{method}_svd"


def prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (density >= 1: unchanged).

    The cut is a k-th value threshold (several times faster than a top-k on large layers); entries tied with it
    are all kept, which only differs from a top-k when equal non-zero magnitudes straddle the cut.
    """
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    if k == 0:
        return torch.zeros_like(tensor)
    magnitude = tensor.abs()
    threshold = magnitude.reshape(-1).kthvalue(tensor.numel() - k + 1).values
    return tensor * (magnitude >= threshold)


def prune_random(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None,
                 rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (drawn from ``generator``), rescaled by 1/density."""
    if density >= 1:
        return tensor
    device = generator.device if generator is not None else tensor.device
    keep = torch.bernoulli(torch.full(tensor.shape, float(density), device=device), generator=generator)
    pruned = tensor * keep.to(tensor.device, tensor.dtype)
    return pruned / density if rescale else pruned


def majority_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """Where each task tensor agrees with the elected sign: of the sum (``total``) or of the sign count
    (``frequency``); ties elect +."""
    sign = stacked.sign()
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise LoraError(f"majority_sign_method must be 'total' or 'frequency', found {method!r}.")
    return sign == torch.where(votes >= 0, 1, -1).to(sign.dtype)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the task tensors that agree with the elected sign (entries where none agree are 0)."""
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.to(stacked).reshape(-1, *([1] * (stacked.dim() - 1)))


def combine(method: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, *, density: float | None = None,
            majority_sign_method: SignMethod = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Combine same-shaped task tensors with one weight each, by a method of :data:`FACTOR_METHODS` (a ``*_svd``
    name means the same combination; the SVD is :func:`truncated_svd`'s job).

    ``ties``: magnitude-prune each tensor to ``density``, elect a sign per entry from the pruned tensors, average the
    weighted entries of that sign. ``dare_*``: random pruning with rescaling instead (``generator`` makes it
    reproducible). ``magnitude_prune``: magnitude pruning then a weighted sum. ``linear``: the weighted sum.
    """
    base = method.removesuffix("_svd") if method != "svd" else "linear"
    if base not in FACTOR_METHODS:
        raise LoraError(f"unknown combination_type {method!r}; expected one of {list(METHODS)}.")
    if base != "linear":
        if density is None:
            raise LoraError(f"combination_type {method!r} needs density= (the fraction of entries kept, in [0, 1]).")
        if not 0 <= density <= 1:
            raise LoraError(f"density must be in [0, 1], found {density}.")
    if base in ("ties", "magnitude_prune"):
        tensors = [prune_magnitude(t, density) for t in tensors]
    elif base.startswith("dare"):
        tensors = [prune_random(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    weighted = _weighted(stacked, weights)
    if base.endswith("ties"):
        return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(dim=0)


def top_singular(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_k * S_k, Vh_k, S)`` of a 2-D ``delta``: the top ``k = min(rank, *shape)`` singular triplets, with the
    singular values ``S`` (all of them, descending, for error reports).

    Exact, through the eigendecomposition of the smaller Gram matrix in float64 (``up = D @ V_k`` is ``U_k * S_k``):
    about 3x faster than a full SVD on large layers; float64 keeps the top triplets accurate far below 1e-6.
    """
    m, n = delta.shape
    k = max(1, min(rank, m, n))
    d = delta.double()
    if m >= n:
        evals, evecs = torch.linalg.eigh(d.T @ d)
        v = evecs.flip(-1)[:, :k]
        up, down = d @ v, v.T
    else:
        evals, evecs = torch.linalg.eigh(d @ d.T)
        u = evecs.flip(-1)[:, :k]
        down = u.T @ d  # rows have norms S_k: move them to up, as U_k * S_k
        norms = down.norm(dim=1)
        up, down = u * norms, down / norms.clamp(min=1e-300)[:, None]
    S = evals.flip(-1).clamp(min=0).sqrt()
    return up.to(delta.dtype), down.to(delta.dtype), S.to(delta.dtype)


def truncated_svd(delta: torch.Tensor, rank: int,
                  clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(up [out, k], down [k, in], S)`` with ``up @ down`` the best rank-``k`` approximation of a 2-D ``delta``,
    ``k = min(rank, *delta.shape)``; ``S`` holds every singular value (for error reports).

    As PEFT (and kohya's svd_merge_lora): ``up = U * S``, ``down = Vh``, then with ``clamp`` (a quantile in (0, 1])
    both are clamped to +-the ``clamp`` quantile of their joined entries. That quantile of signed entries depends on
    the signs the SVD routine gives each singular pair, so with ``clamp`` the factors come from
    ``torch.linalg.svd`` as in PEFT; without, from the faster :func:`top_singular` (same product).
    """
    if clamp is None:
        return top_singular(delta, rank)
    if not 0 < clamp <= 1:
        raise LoraError(f"svd_clamp must be a quantile in (0, 1], found {clamp}.")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = max(1, min(rank, S.numel()))
    up, down = U[:, :k] * S[:k], Vh[:k]
    joined = torch.cat([up.flatten(), down.flatten()])
    hi = torch.quantile(joined.float(), clamp).to(joined.dtype) if joined.numel() < 2 ** 24 else \
        joined.kthvalue(max(1, round(clamp * joined.numel()))).values
    return up.clamp(-hi, hi), down.clamp(-hi, hi), S


def rank_for_energy(S: torch.Tensor, fraction: float) -> int:
    """The smallest rank whose singular values keep ``fraction`` of the sum of squared singular values."""
    if not 0 < fraction <= 1:
        raise LoraError(f"the kept-energy fraction must be in (0, 1], found {fraction}.")
    energy = (S.double() ** 2).cumsum(0)
    if energy[-1] == 0:
        return 1
    return torch.searchsorted(energy / energy[-1], torch.tensor(fraction - 1e-12, dtype=energy.dtype)).item() + 1


def relative_error(S: torch.Tensor, rank: int) -> float:
    """``||D - D_rank||_F / ||D||_F`` from all singular values of ``D`` (0 for a zero delta)."""
    total = float((S.double() ** 2).sum())
    return 0.0 if total == 0 else float((S[rank:].double() ** 2).sum() / total) ** 0.5
