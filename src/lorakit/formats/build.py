"""Check a module's tensors against its target (from header shapes alone) and build its delta from tensors."""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn as nn

from ..adapter import LokrWeights, LoraWeights, WeightDelta
from .keys import ModuleKeys

Shape = tuple[int, ...]


def target_shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear or Conv2d weight."""
    w = module.weight
    return int(w.shape[0]), int(w.shape[1]), tuple(int(s) for s in w.shape[2:])


def check_shapes(entry: ModuleKeys, shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    """Return why this module's tensors cannot target ``module``, or None if they fit."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"targets a {type(module).__name__}; lorakit applies LoRA to Linear and Conv2d layers"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"targets a grouped Conv2d (groups={module.groups}), which LoRA files do not describe"
    out, inp, kernel = target_shape(module)
    ksize = math.prod(kernel) if kernel else 1
    if entry.algorithm == "lora":
        down, up = shapes[entry.fields["down"]], shapes[entry.fields["up"]]
        r = down[0]
        if up[0] != out or math.prod(up[1:]) != r:
            return f"up has shape {list(up)}, expected [{out}, {r}] for a layer with {out} outputs"
        if "mid" in entry.fields:
            mid = shapes[entry.fields["mid"]]
            if len(mid) != 4 or mid[:2] != (r, r) or tuple(mid[2:]) != kernel or math.prod(down[1:]) != inp:
                return f"Tucker mid {list(mid)} / down {list(down)} do not fit weight [{out}, {inp}, *{list(kernel)}]"
            return None
        if math.prod(down[1:]) != inp * ksize:
            return f"down has shape {list(down)}, expected [{r}, {inp}{', ' + ', '.join(map(str, kernel)) if kernel else ''}]"
        return None
    if entry.algorithm == "lokr":
        rows, cols = lokr_rows_cols(entry, shapes)
        if (rows, cols) != (out, inp * ksize):
            return f"LoKr factors give a [{rows}, {cols}] product, expected [{out}, {inp * ksize}]"
        return None
    return f"holds fields {sorted(entry.fields)}, which are not a known algorithm"


def lokr_rows_cols(entry: ModuleKeys, shapes: Mapping[str, Shape]) -> tuple[int, int]:
    """(rows, cols) of kron(w1, w2) in 2-D, from shapes alone."""
    def dims(full: str, a: str, b: str) -> tuple[int, int]:
        if full in entry.fields:
            s = shapes[entry.fields[full]]
            return s[0], math.prod(s[1:])
        return shapes[entry.fields[a]][0], math.prod(shapes[entry.fields[b]][1:])

    a, c = dims("w1", "w1_a", "w1_b")
    if "t2" in entry.fields:
        t2 = shapes[entry.fields["t2"]]
        b = shapes[entry.fields["w2_a"]][1]
        d = shapes[entry.fields["w2_b"]][1] * math.prod(t2[2:])
    else:
        b, d = dims("w2", "w2_a", "w2_b")
    return a * b, c * d


def build_delta(entry: ModuleKeys, get: Callable[[str], torch.Tensor], alpha: float | None) -> WeightDelta:
    """Make the delta of one module from its tensors; ``alpha`` from the file's ``.alpha`` key wins over the one given."""
    if "alpha" in entry.fields:
        alpha = float(get(entry.fields["alpha"]).float().item())
    if alpha is not None and alpha == 0:
        alpha = None  # kohya/LyCORIS: alpha 0 means alpha = rank
    f = {k: get(v) for k, v in entry.fields.items() if k != "alpha"}
    if entry.algorithm == "lora":
        return LoraWeights(down=f["down"], up=f["up"], alpha=alpha, mid=f.get("mid"))
    return LokrWeights(alpha=alpha, **f)
