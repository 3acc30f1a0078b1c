"""LoRA / LoCon (kohya, diffusers, PEFT): ``up @ down``, with an optional Tucker core ``mid`` for kxk convs."""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import nn

from ..adapter import LoraWeights
from .base import Algorithm, Shape, layer_problem, weight_dims

FIELDS = frozenset({"down", "up", "mid"})


def check(shapes: Mapping[str, Shape], module: nn.Module) -> str | None:
    problem = layer_problem(module)
    if problem:
        return problem
    out, inp, kernel = weight_dims(module)
    ksize = math.prod(kernel) if kernel else 1
    down, up = shapes["down"], shapes["up"]
    r = down[0]
    if up[0] != out or math.prod(up[1:]) != r:
        return f"up has shape {list(up)}, expected [{out}, {r}] for a layer with {out} outputs"
    if "mid" in shapes:
        mid = shapes["mid"]
        if len(mid) != 4 or mid[:2] != (r, r) or tuple(mid[2:]) != kernel or math.prod(down[1:]) != inp:
            return f"Tucker mid {list(mid)} / down {list(down)} do not fit weight [{out}, {inp}, *{list(kernel)}]"
        return None
    if math.prod(down[1:]) != inp * ksize:
        return f"down has shape {list(down)}, expected [{r}, {inp}{', ' + ', '.join(map(str, kernel)) if kernel else ''}]"
    return None


ALGORITHM = Algorithm(
    name="lora", fields=FIELDS,
    complete=lambda names: {"down", "up"} <= names,
    check=check,
    build=lambda f, alpha: LoraWeights(down=f["down"], up=f["up"], alpha=alpha, mid=f.get("mid")),
    rank=lambda shapes: int(shapes["down"][0]),
    shape=lambda s: (int(s["up"][0]), math.prod(s["down"][1:]) * (math.prod(s["mid"][2:]) if "mid" in s else 1)),
)
