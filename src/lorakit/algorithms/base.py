"""What every algorithm module registers: its fields, when they are complete, a shape check and a builder."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import WeightDelta

Shape = tuple[int, ...]
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of a LoRA file, as the loaders see it.

    ``fields`` are the field names (from the key grammar in formats/keys.py) it may hold besides ``alpha``;
    ``complete(names)`` says whether a module's fields make a loadable module; ``check(shapes, module)`` returns why
    the shapes (from the file header) cannot target ``module``, or None; ``build(tensors, alpha)`` makes the delta;
    ``rank(shapes)`` and ``shape(shapes)`` (the changed weight's ``(out, in*kernel)``, 0 where the file does not
    tell) are what inspection reports.
    """

    name: str
    fields: frozenset[str]
    complete: Callable[[set[str]], bool]
    check: Callable[[Mapping[str, Shape], nn.Module], str | None]
    build: Callable[[dict[str, torch.Tensor], float | None], WeightDelta]
    rank: Callable[[Mapping[str, Shape]], int | str]
    shape: Callable[[Mapping[str, Shape]], tuple[int, int]]


def layer_problem(module: nn.Module) -> str | None:
    """Why ``module`` is not a Linear / ungrouped Conv2d (the layers weight-space algorithms describe), or None."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"targets a {type(module).__name__}; this algorithm applies to Linear and Conv2d layers"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"targets a grouped Conv2d (groups={module.groups}), which LoRA files do not describe"
    return None


def weight_dims(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear or Conv2d weight."""
    w = module.weight
    return int(w.shape[0]), int(w.shape[1]), tuple(int(s) for s in w.shape[2:])


def flat_in(module: nn.Module) -> int:
    """in * kh * kw of a Linear/Conv2d weight: the width of its 2-D view."""
    _, inp, kernel = weight_dims(module)
    return inp * math.prod(kernel)


def numel(shape: Shape) -> int:
    return int(math.prod(shape))
