"""The one in-memory form of an adapter: per-module weight deltas with alpha kept apart from the user's scale.

Every reader produces :class:`WeightDelta` objects and every writer consumes them. ``alpha`` and the rank are facts
read from the file; the user's scale is applied by the engine, never baked in, so files round-trip exactly::

    LoRA   delta = (alpha / r) * up @ down                      up [out, r], down [r, in(, kh, kw)]
    Tucker down [r, in, 1, 1], mid [r, r, kh, kw]: mid is folded into down (exact in real arithmetic)
    LoKr   delta = (alpha / r) * kron(w1, w2)                   w1, w2 full or factored (w?_a @ w?_b)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


class WeightDelta(ABC):
    """What one module of an adapter adds to that module's weight.

    Subclasses give the full delta; low-rank ones also give their factors, which the engine uses to merge with one
    matmul (and a runtime branch would use directly).
    """

    alpha: float | None
    #: False for algorithms whose result depends on the weight they change (DoRA, OFT, IA3, GLoRA): the engine
    #: calls :meth:`apply` on the weight after every additive delta is in, instead of adding :meth:`delta`.
    additive: ClassVar[bool] = True

    @property
    @abstractmethod
    def rank(self) -> int:
        """The rank that alpha is divided by."""

    @property
    def scale(self) -> float:
        """alpha / rank; a file without alpha means scale 1 (kohya, ComfyUI and PEFT agree)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(up2d [out, r], down2d [r, in*kh*kw])`` without the scale, or None for full-rank algorithms."""
        return None

    def stable_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`low_rank`'s factors where they are views of the stored fields (so they keep their addresses while
        the delta lives, and a hotswap writes into them), else None. The merge kernel reads them where they are."""
        return None

    @abstractmethod
    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The delta without alpha / rank, shaped like the target weight."""

    def delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight delta ``scale * ...`` shaped like the target weight."""
        return self.unscaled_delta(shape, dtype) * self.scale

    def fit(self, shape: tuple[int, ...]) -> WeightDelta:
        """Settle what the file leaves ambiguous with the target weight's shape (old vs new GLoRA); returns self."""
        return self

    def apply(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        """Non-additive algorithms: the new weight from ``weight`` (fp32, the layer's shape) at ``multiplier``."""
        raise TypeError(f"{type(self).__name__} is additive: add multiplier * unscaled_delta() instead")

    def bias_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """What the module's bias gains at multiplier 1 (``diff_b``, ``b_norm``), or None: most algorithms leave it."""
        return None

    #: True for algorithms that transform the bias (PEFT's IA3 on outputs): the engine calls :meth:`apply_bias`.
    scales_bias: ClassVar[bool] = False

    def apply_bias(self, bias: torch.Tensor, multiplier: float) -> torch.Tensor:
        """The new bias from ``bias`` (fp32) at ``multiplier``, for algorithms with :attr:`scales_bias`."""
        return bias

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (for writers, moving and memory accounting)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def leaves(self) -> list[torch.Tensor]:
        """Every tensor this delta holds, its inner deltas' included (caches excluded): what a hotswap overwrites."""
        out = []
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and not name.startswith("_"):
                out.append(value)
            elif isinstance(value, WeightDelta):
                out += value.leaves()
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "WeightDelta":
        """Move every tensor in place; returns self."""
        for k, v in self.tensors().items():
            setattr(self, k, v.to(device=device, dtype=dtype))
        self._drop_caches()
        return self

    def _drop_caches(self) -> None:
        """Forget what was derived from the tensors' places (after a move)."""
        self.__dict__.pop("_low_rank", None)
        self.__dict__.pop("_addresses", None)  # (batched.factor_addresses)
        self.__dict__.pop("_layout", None)  # (hotswap.layout)


class WrappedDelta(WeightDelta):
    """A delta built around another (``inner``): DoRA, a row slice of a fused layer, a bias riding along. Alpha,
    rank and scale are the inner delta's unless a subclass says otherwise; moving moves the inner delta too."""

    inner: WeightDelta

    @property
    def alpha(self) -> float | None:  # type: ignore[override]
        return self.inner.alpha

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def scale(self) -> float:
        return self.inner.scale

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WrappedDelta:
        self.inner.to(device, dtype)
        for k, v in list(vars(self).items()):
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device=device, dtype=dtype))
        self._drop_caches()
        return self


@dataclass
class LoraWeights(WeightDelta):
    """LoRA / LoCon factors: ``up @ down`` (Linear, 1x1 and kxk convs), with an optional Tucker core."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self.__dict__.get("_low_rank")  # asked for at every switch: build the 2-D views once
        if cached is None:
            down = self.down
            if self.mid is not None:
                down = torch.einsum("mnkl,nj->mjkl", self.mid, down.flatten(1))
            # (2-D fields are returned as they are: a view object more per factor costs ~0.5 us each to free at
            # unload, ~4,000 per SDXL adapter)
            cached = self.__dict__["_low_rank"] = (self.up if self.up.dim() == 2 else self.up.flatten(1),
                                                    down if down.dim() == 2 else down.flatten(1))
        return cached

    def stable_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.low_rank() if self.mid is None else None  # (a Tucker core is folded into a new tensor)

    def leaves(self) -> list[torch.Tensor]:
        # (WeightDelta's walk over the fields, without it: a hotswap asks this of every delta, ~1000 per SDXL LoRA)
        return [self.down, self.up] if self.mid is None else [self.down, self.up, self.mid]

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        up, down = self.low_rank()
        return (up.to(dtype) @ down.to(dtype)).reshape(shape)


@dataclass
class LokrWeights(WeightDelta):
    """LyCORIS LoKr: ``kron(w1, w2)``, each factor full or a product ``w?_a @ w?_b``; w2 may be Tucker (``t2``).

    Following LyCORIS, when both w1 and w2 are full matrices the scale is 1 and alpha is ignored; otherwise the
    rank is that of ``w2_b`` if present, else of ``w1_b`` (ComfyUI and A1111 agree).
    """

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        if self.w1_b is not None:
            return int(self.w1_b.shape[0])
        return 1

    @property
    def scale(self) -> float:
        if self.w1 is not None and self.w2 is not None:
            return 1.0
        return super().scale

    def factor1(self, dtype: torch.dtype) -> torch.Tensor:
        return self.w1.to(dtype) if self.w1 is not None else self.w1_a.to(dtype) @ self.w1_b.to(dtype)

    def factor2(self, dtype: torch.dtype) -> torch.Tensor:
        if self.w2 is not None:
            return self.w2.to(dtype)
        if self.t2 is not None:
            return torch.einsum("ijkl,jr,ip->prkl", self.t2.to(dtype), self.w2_b.to(dtype), self.w2_a.to(dtype))
        return self.w2_a.to(dtype) @ self.w2_b.to(dtype)

    def unscaled_delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w1 = self.factor1(dtype)
        w2 = self.factor2(dtype)
        # kron of the 2-D forms reshaped to the weight equals the 4-D kron for convs (and also reads the 2023
        # LyCORIS layout that folds the kernel into both factors).
        # (contiguous: torch.kron views its inputs, and the Tucker einsum's result is strided)
        return torch.kron(w1.reshape(w1.shape[0], -1).contiguous(),
                          w2.reshape(w2.shape[0], -1).contiguous()).reshape(shape)


@dataclass
class Adapter:
    """A named adapter: per component, per module path, its delta; plus what was learned of its origin."""

    name: str
    layers: dict[str, dict[str, WeightDelta]]
    source: str = "<state dict>"
    format: str = "unknown"
    family: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: what the file's layout was (keys, shapes, dtypes, metadata, model): equal layouts build equal deltas but for
    #: their values (see hotswap.py); None when unknown
    layout: tuple | None = None
    #: the file's data section when every tensor of every delta is a view into it (a CUDA load without conversion),
    #: with its header's ``(key, TensorInfo)`` entries in file order (keys, dtypes, shapes, byte ranges) and the
    #: alphas read from it: a hotswap of a file laid out identically is then one device copy into this buffer
    #: (see hotswap.py)
    buffer: torch.Tensor | None = field(default=None, repr=False)
    table: tuple = field(default=(), repr=False)
    #: key -> its byte range in ``buffer`` (io.BufferViews.span): a subset hotswap copies runs of bytes
    spans: Any = field(default=None, repr=False, compare=False)
    alphas: tuple[float, ...] = ()
    #: (tensor, file key) for every tensor of the deltas when each is a file tensor used as it is: a hotswap from a
    #: state dict of the same layout copies straight into them
    origins: list[tuple[torch.Tensor, str]] = field(default_factory=list, repr=False)
    #: what an in-place hotswap brings up to date, worked out at the first one (hotswap.SwapIndex)
    swap_index: Any = field(default=None, repr=False, compare=False)

    @property
    def components(self) -> list[str]:
        return [c for c, mods in self.layers.items() if mods]

    def num_modules(self) -> int:
        return sum(len(m) for m in self.layers.values())
