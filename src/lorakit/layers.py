"""The runtime: adapters merged into the weights of Linear/Conv2d layers, with an exact way back.

When every sample of a batch uses the same adapter mix (the common case) the fastest LoRA is no LoRA branch at all:
the layer's weight holds ``base + sum(scale_i * delta_i)`` and the model runs at base speed. lorakit keeps an exact
copy of each targeted weight taken before its first change, and recomputes the weight from that copy whenever the
mix changes, so restoring the base (unfuse, unload of unfused adapters, disable) is a copy: bit-exact in every dtype.

The price is memory: one copy of every targeted weight, on the weight's device (see ``LoraManager(backup_device=)``).
No module is replaced and no hook runs in the forward pass, so ``state_dict`` keys, ``save_pretrained`` and
``torch.compile`` see a plain model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .adapter import WeightDelta

Contribution = tuple[WeightDelta, float]  # (delta, total multiplier on its unscaled form)


@dataclass
class LayerState:
    """One targeted layer: the adapters on it and the exact copy of its weight before lorakit changed it."""

    module: nn.Module
    deltas: dict[str, WeightDelta] = field(default_factory=dict)
    base: torch.Tensor | None = None
    backup_device: torch.device | None = None
    applied: tuple = ()

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def _compute_dtype(self) -> torch.dtype:
        # On CPU, half-precision matmuls are slow and not always fp32-accumulated: compute in fp32, round once.
        w = self.weight
        return w.dtype if w.device.type == "cuda" else torch.float32

    @staticmethod
    def _accumulate(acc: torch.Tensor, contributions: list[Contribution]) -> None:
        """``acc += sum(c * delta)`` in place; ``acc`` is the 2-D [out, in*kh*kw] view of a weight."""
        ups, downs = [], []
        for delta, mult in contributions:
            pair = delta.low_rank()
            if pair is not None:
                ups.append(pair[0].to(acc.device, acc.dtype) * mult)
                downs.append(pair[1].to(acc.device, acc.dtype))
            else:
                acc.add_(delta.unscaled_delta(tuple(acc.shape), acc.dtype).to(acc.device), alpha=mult)
        if ups:  # every low-rank adapter in one matmul: [out, sum r] @ [sum r, in]
            acc.addmm_(torch.cat(ups, 1), torch.cat(downs, 0))

    def compute(self, contributions: list[Contribution]) -> torch.Tensor:
        """The weight ``base + sum(c * delta)`` for these contributions, rounded once to the weight's dtype."""
        w = self.weight
        base = self.base if self.base is not None else w.detach()
        acc = base.to(device=w.device, dtype=self._compute_dtype(), copy=True).reshape(w.shape[0], -1)
        self._accumulate(acc, contributions)
        return acc.reshape(w.shape).to(w.dtype)

    @torch.no_grad()
    def write(self, contributions: list[Contribution]) -> None:
        """Make the weight hold exactly these contributions (a no-op when it already does)."""
        signature = tuple((id(d), float(m)) for d, m in contributions)
        if signature == self.applied:
            return
        w = self.weight
        if contributions and self.base is None:
            self.base = w.detach().to(self.backup_device or w.device, copy=True)
        if self.base is not None:
            w.copy_(self.base)  # exact restore; also the starting point of a merge
        if contributions:
            if w.dtype == self._compute_dtype() and w.is_contiguous():
                self._accumulate(w.view(w.shape[0], -1), contributions)  # in place, no temporaries
            else:
                w.copy_(self.compute(contributions))
        self.applied = signature

    @torch.no_grad()
    def release(self, keep: list[Contribution]) -> None:
        """Leave the weight holding ``keep`` (the fused adapters) and forget the backup: unload."""
        self.write(keep)
        self.base = None
        self.applied = ()
        self.deltas.clear()
