"""Writers: adapters to the diffusers/PEFT file format (``lora_A``/``lora_B`` + ``lora_adapter_metadata``).

Alpha is written as PEFT's ``lora_alpha``/``alpha_pattern`` metadata, never baked into the factors, so a file read
back gives the same factors and the same alpha.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Mapping

import torch
import torch.nn as nn

from ..adapter import Adapter, LoraWeights
from ..algorithms.full import BiasAdded
from ..errors import LoraError

METADATA_KEY = "lora_adapter_metadata"


def _peft_config(ranks: dict[str, int], alphas: dict[str, float], lora_bias: bool) -> dict:
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "use_dora": False,
        "lora_bias": lora_bias,
    }


def to_peft(adapter: Adapter, modules: Mapping[str, Mapping[str, nn.Module]] | None, components: list[str],
            prefixed: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of ``adapter`` in diffusers/PEFT format.

    ``modules[component][path]`` is the target layer (its type decides 2-D vs 4-D factors); with ``modules=None``
    (no model at hand: files merged or extracted on their own) the factors keep their shapes. With ``prefixed`` keys
    start with the component name (``unet.``, ``text_encoder.``), as pipeline-level files do.
    """
    tensors: dict[str, torch.Tensor] = {}
    lora_meta: dict[str, object] = {}
    for comp in components:
        ranks, alphas, biased = {}, {}, False
        for path, delta in sorted(adapter.layers.get(comp, {}).items()):
            bias = None
            if isinstance(delta, BiasAdded) and delta.scaled:  # PEFT's lora_B.bias
                delta, bias = delta.inner, delta.diff_b
            if not isinstance(delta, LoraWeights):
                raise LoraError(f"save: adapter {adapter.name!r} holds a {type(delta).__name__} at {comp}.{path}, "
                                f"which the diffusers/PEFT LoRA format cannot represent; save it as kohya instead "
                                f"(`lorakit convert IN OUT --to kohya`).")
            up, down = delta.up, delta.down
            if delta.mid is not None:  # fold the Tucker core: down [r, in, kh, kw]
                down = torch.einsum("mnkl,nj->mjkl", delta.mid.float(), down.flatten(1).float()).to(down.dtype)
            if modules is None:
                pass  # shapes as stored: conv factors are already 4-D
            elif isinstance(modules[comp][path], nn.Conv2d):
                up = up.reshape(*up.shape[:2], 1, 1) if up.dim() == 2 else up
                down = down if down.dim() == 4 else down.reshape(*down.shape, 1, 1)
            else:
                up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
            key = f"{comp}.{path}" if prefixed else path
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
            if bias is not None:
                tensors[f"{key}.lora_B.bias"] = bias
                biased = True
            ranks[path] = delta.rank
            alphas[path] = float(delta.alpha) if delta.alpha is not None else float(delta.rank)
        if ranks:
            cfg = _peft_config(ranks, alphas, biased)
            lora_meta.update({(f"{comp}.{k}" if prefixed else k): v for k, v in cfg.items()})
    if not tensors:
        raise LoraError(f"save: adapter {adapter.name!r} has no layers in {components}.")
    info = {"adapter": adapter.name, "source": adapter.source, "source_format": adapter.format,
            "family": adapter.family, "components": components,
            "ranks": sorted({d.rank for c in components for d in adapter.layers.get(c, {}).values()})}
    metadata = {METADATA_KEY: json.dumps(lora_meta, indent=2, sort_keys=True), "lorakit": json.dumps(info)}
    return tensors, metadata
