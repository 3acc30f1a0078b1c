"""Writer: adapters to the kohya format (``lora_unet_...``/``lora_te1_...`` names, ``.lora_down``/``.lora_up`` or the
LyCORIS field suffixes, a per-module ``.alpha``), the inverse of keys.py and keymaps.py.

- Alpha is written as the file's ``.alpha``, never baked into the factors, so the file reads back to the same tensors.
- SD1/SD2 UNets and text encoders get diffusers-path names underscored, SDXL UNets LDM names (as kohya writes
  them); kohya, ComfyUI and diffusers read both.
- Families whose kohya files use the original checkpoint's names (FLUX.1, SD3, Wan, HunyuanVideo; keymaps.py) get
  those names. Diffusers modules that one original layer feeds (qkv, linear1) are fused back exactly: parts that share
  ``down`` (as every file split by lorakit does) become one LoRA with the ``up`` rows stacked; parts with their own
  factors and one common scale become a block-diagonal LoRA of the summed rank. Anything else keeps its diffusers name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..adapter import Adapter, LoraWeights, WeightDelta
from ..errors import LoraError
from ..families import is_unet, unet_ldm_names
from ..keymaps import FAMILY_MAPS
from .keys import SUFFIXES
from .split import RowSliceDelta

# Field name -> kohya / LyCORIS suffix (the first kohya-style spelling of each field in keys.SUFFIXES).
KOHYA_SUFFIX: dict[str, str] = {}
for _suffix, _field, _fmt in SUFFIXES:
    if _fmt in ("kohya", "lycoris", "") and _field not in KOHYA_SUFFIX:
        KOHYA_SUFFIX[_field] = _suffix

# Text-encoder prefixes: diffusers component -> kohya prefix, per family (FLUX.1's T5 is kohya's te3).
_TE_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
_FAMILY_TE = {"flux": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}}
_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}


def kohya_prefix(component: str, family: str | None, components: list[str], denoiser: bool) -> str:
    """The kohya key prefix of a pipeline component."""
    if denoiser:
        return "lora_unet_"
    if family in _FAMILY_TE:
        return _FAMILY_TE[family][component]
    text_encoders = [c for c in components if c.startswith("text_encoder")]
    if text_encoders == ["text_encoder"] and family in ("sd1", "sd2", None):
        return "lora_te_"
    return _TE_PREFIXES[component]


def _spell(delta: WeightDelta, key: str, out: dict[str, torch.Tensor], where: str) -> None:
    for name, tensor in delta.tensors().items():
        suffix = KOHYA_SUFFIX.get(name)
        if suffix is None or name == "alpha":
            raise LoraError(f"save as kohya: {where} holds a field {name!r} that has no kohya spelling.")
        out[key + suffix] = tensor
    if delta.alpha is not None:
        out[key + KOHYA_SUFFIX["alpha"]] = torch.tensor(float(delta.alpha), dtype=torch.float32)


def _fuse(parts: list[WeightDelta | None], sizes: list[int], swap: bool) -> WeightDelta | None:
    """One delta for the fused original layer, exactly, or None when the parts cannot be joined exactly."""
    present = [p for p in parts if p is not None]
    inner = getattr(present[0], "inner", None)
    if len(present) == len(parts) and all(isinstance(p, RowSliceDelta) and p.inner is inner
                                          and p.swap_halves == swap for p in present):
        return inner  # the parts of one LoKr (or other full delta) that lorakit split
    if not all(isinstance(p, LoraWeights) and p.mid is None and p.up.dim() == 2 for p in present):
        return None
    fused = _stack_shared(parts, sizes) or _block_diagonal(parts, sizes)
    if fused is not None and swap:
        half = fused.up.shape[0] // 2
        fused.up = torch.cat([fused.up[half:], fused.up[:half]], 0)
    return fused


def _stack_shared(parts: list[LoraWeights | None], sizes: list[int]) -> LoraWeights | None:
    """Parts sharing ``down`` and alpha (every fused layer lorakit split): one LoRA with the ``up`` rows stacked."""
    first = next(p for p in parts if p is not None)
    if not all(p is None or (p.down.shape == first.down.shape and torch.equal(p.down, first.down)
                             and p.alpha == first.alpha) for p in parts):
        return None
    ups = [p.up if p is not None else first.up.new_zeros(n, first.rank) for p, n in zip(parts, sizes)]
    return LoraWeights(down=first.down, up=torch.cat(ups, 0), alpha=first.alpha)


def _block_diagonal(parts: list[LoraWeights | None], sizes: list[int]) -> LoraWeights | None:
    """Parts with their own factors: stacked ``down``, block-diagonal ``up``; exact only if all share one scale."""
    present = [p for p in parts if p is not None]
    scale, total = present[0].scale, sum(p.rank for p in present)
    alpha = None if all(p.alpha is None for p in present) else scale * total
    if any(p.scale != scale for p in present) or (alpha is not None and alpha / total != scale):
        return None
    blocks, col = [], 0
    for p, n in zip(parts, sizes):
        block = present[0].up.new_zeros(n, total)
        if p is not None:
            block[:, col:col + p.rank] = p.up
            col += p.rank
        blocks.append(block)
    return LoraWeights(down=torch.cat([p.down for p in present], 0), up=torch.cat(blocks, 0), alpha=alpha)


def _row_instances(layers: Mapping[str, WeightDelta], targets: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The block numbers (or ``()``) for which the adapter holds any of a row's targets."""
    found = set()
    for template in targets:
        regex = re.compile("^" + re.escape(template).replace(re.escape("{0}"), r"(\d+)") + "$")
        found.update(m.groups() for m in map(regex.match, layers) if m)
    return sorted(found, key=lambda g: [int(x) for x in g])


def _original_names(layers: Mapping[str, WeightDelta], family: str | None, modules: Mapping[str, nn.Module]
                    ) -> tuple[dict[str, WeightDelta], set[str]]:
    """``({original name underscored: delta}, diffusers paths covered)`` through the family's key map."""
    out: dict[str, WeightDelta] = {}
    covered: set[str] = set()
    for pattern, targets, op in FAMILY_MAPS.get(family or "", ()):
        if "processor" in pattern:  # XLabs spellings: read, never written
            continue
        for index in _row_instances(layers, targets):
            paths = [t.format(*index) for t in targets]
            if any(p in covered for p in paths) or not all(p in modules for p in paths):
                continue
            parent = modules.get(paths[0].rpartition(".")[0])
            swap = op == "adaln" and type(parent).__name__ == "AdaLayerNormContinuous"
            if len(paths) == 1 and not swap:
                fused = layers[paths[0]]
            else:
                sizes = [int(modules[p].weight.shape[0]) for p in paths]
                fused = _fuse([layers.get(p) for p in paths], sizes, swap)
            if fused is None:
                continue
            name = pattern.replace(r"(\d+)", index[0] if index else "").replace("\\", "").replace(".", "_")
            out[name] = fused
            covered.update(p for p in paths if p in layers)
    return out, covered


def _kohya_module_name(path: str, model: nn.Module) -> str:
    text = type(model).__module__.startswith("transformers.")
    if text and type(model).__name__.startswith("CLIP") and not path.startswith("text_model."):
        path = "text_model." + path  # kohya names keep the transformers 4 CLIP level
    return path.replace(".", "_")


def to_kohya(adapter: Adapter, models: Mapping[str, nn.Module], components: list[str], family: str | None,
             denoisers: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of ``adapter`` in kohya format; ``models[component]`` is the component the adapter
    was loaded into (its module names and types decide the spelling).

    Example:
        >>> tensors, meta = to_kohya(adapter, {"unet": pipe.unet}, ["unet"], "sd1", ("unet",))  # doctest: +SKIP
    """
    tensors: dict[str, torch.Tensor] = {}
    original = 0
    for comp in components:
        layers = adapter.layers.get(comp, {})
        model = models[comp]
        prefix = kohya_prefix(comp, family, components, comp in denoisers)
        named: dict[str, WeightDelta] = {}
        covered: set[str] = set()
        # kohya trains SDXL on the LDM UNet, so its SDXL files use LDM names (diffusers and ComfyUI read both)
        ldm = unet_ldm_names(model) if family == "sdxl" and is_unet(model) else {}
        if comp in denoisers:
            named, covered = _original_names(layers, family, dict(model.named_modules()))
            original += len(covered)
        for path, delta in sorted(layers.items()):
            if path not in covered:
                if isinstance(delta, RowSliceDelta):
                    raise LoraError(f"save as kohya: {comp}.{path} holds part of a fused layer whose other parts "
                                    f"are missing; it has no exact kohya spelling.")
                named[_kohya_module_name(ldm.get(path, path), model)] = delta
        for name, delta in sorted(named.items()):
            _spell(delta, prefix + name, tensors, f"{comp}.{name}")
    if not tensors:
        raise LoraError(f"save as kohya: adapter {adapter.name!r} has no layers in {components}.")
    algos = {type(d).__name__ for c in components for d in adapter.layers.get(c, {}).values()}
    info = {"adapter": adapter.name, "source": adapter.source, "source_format": adapter.format,
            "family": family, "components": components, "original_names": original}
    metadata = {"ss_network_module": "networks.lora" if algos <= {"LoraWeights"} else "lycoris.kohya",
                "lorakit": json.dumps(info)}
    if family in _BASE_VERSION:
        metadata["ss_base_model_version"] = _BASE_VERSION[family]
    return tensors, metadata
