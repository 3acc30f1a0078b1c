"""Synthetic, seeded LoRA files in every format lorakit reads, for tests, the demo and benchmarks.

Example:
    >>> layers = make_lora(pipe.unet, rank=4, seed=1)                      # doctest: +SKIP
    >>> sd = to_state_dict(layers, "kohya", namespace="unet")             # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..adapter import LoraWeights
from ..families import is_text_encoder, is_unet, unet_ldm_names

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
TRANSFORMER_TARGETS = ATTENTION_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "fc1", "fc2")
FORMATS = ("peft", "diffusers", "legacy_processor", "kohya", "kohya_ldm")
_KOHYA_PREFIX = {"unet": "lora_unet_", "transformer": "lora_unet_", "text_encoder": "lora_te_",
                 "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}


def make_lora(model: nn.Module, *, rank: int = 4, seed: int = 0, targets: tuple[str, ...] = ATTENTION_TARGETS,
              convs: bool = False, alpha: float | None = None, std: float = 0.2,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict[str, LoraWeights]:
    """Random LoRA factors for every Linear whose path ends with one of ``targets`` (and every Conv2d with
    ``convs=True``, kxk convs as LoCon), seeded. ``up`` is random too (not zero as in training) so effects show."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, LoraWeights] = {}
    for path, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) and path.endswith(targets)
        is_conv = convs and isinstance(module, nn.Conv2d) and module.groups == 1
        if not (is_linear or is_conv):
            continue
        fan_in = module.weight[0].numel()
        down_shape = (rank, *module.weight.shape[1:])
        up_shape = (module.weight.shape[0], rank, *((1, 1) if is_conv else ()))
        down = torch.randn(down_shape, generator=g) * (std / fan_in ** 0.5)
        up = torch.randn(up_shape, generator=g) * (std / rank ** 0.5)
        out[path] = LoraWeights(down=down.to(device, dtype), up=up.to(device, dtype), alpha=alpha)
    return out


def _legacy_name(path: str) -> str | None:
    for proj, legacy in (("to_out.0", "to_out"), ("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v")):
        if path.endswith("." + proj):
            return f"{path[: -len(proj) - 1]}.processor.{legacy}_lora"
    return None


def to_state_dict(layers: dict[str, LoraWeights], fmt: str, namespace: str | None = None,
                  model: nn.Module | None = None, sdxl_te: bool = False) -> dict[str, torch.Tensor]:
    """Spell ``layers`` as a file of format ``fmt`` (one of :data:`FORMATS`) under ``namespace`` (``unet``,
    ``text_encoder``...; None for a model-level file). kohya text-encoder names keep transformers 4's
    ``text_model_`` level as real files do; ``kohya_ldm`` needs the UNet ``model`` for LDM names; ``sdxl_te`` writes
    ``lora_te1_`` for the first text encoder."""
    sd: dict[str, torch.Tensor] = {}
    ldm = unet_ldm_names(model) if fmt == "kohya_ldm" and model is not None and is_unet(model) else {}
    text = model is not None and is_text_encoder(model) or (namespace or "").startswith("text_encoder")
    dot = f"{namespace}." if namespace else ""
    for path, w in layers.items():
        if fmt == "peft":
            sd[f"{dot}{path}.lora_A.weight"], sd[f"{dot}{path}.lora_B.weight"] = w.down, w.up
        elif fmt == "diffusers":
            sd[f"{dot}{path}.lora.down.weight"], sd[f"{dot}{path}.lora.up.weight"] = w.down, w.up
        elif fmt == "legacy_processor":
            name = _legacy_name(path)
            if name is None:
                raise ValueError(f"legacy processor files only hold attention projections, not {path}")
            sd[f"{dot}{name}.down.weight"], sd[f"{dot}{name}.up.weight"] = w.down, w.up
        elif fmt in ("kohya", "kohya_ldm"):
            prefix = "lora_te1_" if sdxl_te and namespace == "text_encoder" else _KOHYA_PREFIX[namespace or "unet"]
            name = ldm.get(path, path) if fmt == "kohya_ldm" else path
            if text and not name.startswith("text_model."):
                name = "text_model." + name
            key = prefix + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = w.down, w.up
            if w.alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(float(w.alpha))
        else:
            raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
    return sd


def expected_deltas(layers: dict[str, LoraWeights], model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight change each layer should see at scale 1, computed independently of the engine (fp64)."""
    modules = dict(model.named_modules())
    out = {}
    for path, w in layers.items():
        shape = modules[path].weight.shape
        delta = (w.up.double().flatten(1) @ w.down.double().flatten(1)).reshape(shape)
        out[path] = delta * (w.alpha / w.rank if w.alpha is not None else 1.0)
    return out

