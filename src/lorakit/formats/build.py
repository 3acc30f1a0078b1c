"""Check a module's tensors against its target (from header shapes alone) and build its delta from tensors.

Both consult the algorithm table in :mod:`lorakit.algorithms`.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn

from .. import algorithms
from ..adapter import WeightDelta
from .keys import ModuleKeys

Shape = tuple[int, ...]


def check_shapes(entry: ModuleKeys, shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    """Return why this module's tensors cannot target ``module``, or None if they fit."""
    return algorithms.check({f: shapes[k] for f, k in entry.fields.items()}, module)


def build_delta(entry: ModuleKeys, get: Callable[[str], torch.Tensor | float], alpha: float | None,
                target_shape: tuple[int, ...] | None = None) -> WeightDelta:
    """Make the delta of one module from its tensors; ``alpha`` from the file's ``.alpha`` key wins over the one given
    (``get`` may give it as a number, read beforehand). ``target_shape`` (the weight it goes to, when known) settles
    layouts the tensors alone leave open."""
    if "alpha" in entry.fields:
        value = get(entry.fields["alpha"])
        alpha = value if isinstance(value, float) else float(value.float().item())
    if alpha is not None and alpha == 0:
        alpha = None  # kohya/LyCORIS: alpha 0 means alpha = rank (OFT: no constraint)
    delta = algorithms.build({k: get(v) for k, v in entry.fields.items() if k != "alpha"}, alpha)
    return delta.fit(target_shape) if target_shape is not None else delta
