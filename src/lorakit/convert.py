"""Convert a LoRA file between ecosystems: read it as lorakit loads it (every key checked against a model), write it
as diffusers/PEFT or kohya. Factors and alphas are copied, never rescaled, so a converted file reads back to the same
deltas.

The model decides where keys go (kohya underscores are resolved against real module names). Pass the pipeline or
model the file is for; without one, the reference architecture of the file's family is built on the meta device
(no memory, no weights).

Example:
    >>> convert_file("style_kohya.safetensors", "style_peft.safetensors", to="diffusers")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .binding import _components_of
from .errors import LoraError
from .families import is_text_encoder, model_family
from .formats import parse_keys
from .formats.write import to_peft
from .formats.write_kohya import to_kohya
from .inspection import _module_rows, guess_family
from .io import open_source, save_safetensors
from .loading import LoadPlan, build_adapter, plan_load
from .state import ComponentState

TARGETS = ("diffusers", "kohya")
REFERENCE_FAMILIES = ("sd1", "sdxl", "flux")


@dataclass
class ConvertReport:
    """What a conversion read and wrote."""

    source: str
    output: str
    source_format: str
    to: str
    family: str | None
    components: dict[str, int]
    tensors: int


def reference_components(family: str) -> dict[str, nn.Module]:
    """Shape-only (meta device) models of a family's reference architecture: SD1.5, SDXL base, FLUX.1-dev."""
    from transformers import T5Config, T5EncoderModel

    from .testing import models

    if family == "sd1":
        return {"unet": models.sd15_unet(device="meta"), "text_encoder": models.sd15_text_encoder(device="meta")}
    if family == "sdxl":
        te1, te2 = models.sdxl_text_encoders(device="meta")
        return {"unet": models.sdxl_unet(device="meta"), "text_encoder": te1, "text_encoder_2": te2}
    if family == "flux":
        t5 = T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
        with models._building("meta", models.torch.float32):
            te2 = T5EncoderModel(t5)
        return {"transformer": models.flux_transformer(device="meta"),
                "text_encoder": models.sd15_text_encoder(device="meta"), "text_encoder_2": te2}
    raise LoraError(f"convert: no built-in reference model for family {family!r}; pass the model the file is for "
                    f"(--model PIPELINE_DIR, or one of {list(REFERENCE_FAMILIES)}).")


def _components(model: Any, source) -> dict[str, nn.Module]:
    if isinstance(model, str) and model in REFERENCE_FAMILIES:
        return reference_components(model)
    if isinstance(model, (str, os.PathLike)):
        from diffusers import DiffusionPipeline

        try:
            model = DiffusionPipeline.from_pretrained(str(model))
        except (OSError, ValueError) as exc:
            raise LoraError(f"convert: could not load a diffusers pipeline from {model} ({exc}).") from exc
    if model is not None:
        return dict(model) if isinstance(model, dict) else _components_of(model)
    parsed = parse_keys(list(source.infos))
    rows = _module_rows(parsed, source)
    family, how = guess_family(source.metadata, parsed, rows, list(source.infos))
    if family not in REFERENCE_FAMILIES:
        raise LoraError(f"convert: {source.name}: cannot tell which model the file is for (family {family!r}, "
                        f"{how}); pass --model (a pipeline folder, or one of {list(REFERENCE_FAMILIES)}).")
    return reference_components(family)


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, model: Any = None,
                 strict: bool = True) -> ConvertReport:
    """Read ``src`` as lorakit loads it into ``model`` and write it to ``dst`` in format ``to`` (``diffusers`` or
    ``kohya``). Raises :class:`LoraError` for bad input; nothing is written then.

    Example:
        >>> convert_file("a.safetensors", "b.safetensors", to="kohya", model=pipe).components  # doctest: +SKIP
        {'unet': 64, 'text_encoder': 24}
    """
    if to not in TARGETS:
        raise LoraError(f"convert: unknown target format {to!r}; one of {list(TARGETS)}.")
    source = open_source(src)
    components = _components(model, source)
    states = {n: ComponentState(n, m, is_text_encoder(m)) for n, m in components.items()}
    plan = plan_load(source, states, strict=strict)
    loaded = source.load("cpu")
    adapter = build_adapter(plan, Path(src).stem, states, loaded, place=False)
    family = model_family(components)
    adapter.family = family
    comps = [c for c in states if adapter.layers.get(c)]
    if plan.norms and to != "diffusers":
        raise LoraError(f"convert: {source.name} is a FLUX Control LoRA whose norm scales the kohya format cannot "
                        f"hold; convert it --to diffusers (norm scales written as transformer.<path>.weight).")
    if to == "diffusers":
        modules = {c: {p: states[c].index.modules[p] for p in adapter.layers[c]} for c in comps}
        tensors, metadata = to_peft(adapter, modules, comps, prefixed=True)
        tensors.update(_norm_tensors(plan, loaded))
    else:
        denoisers = tuple(n for n, s in states.items() if not s.is_text_encoder)
        tensors, metadata = to_kohya(adapter, components, comps, family, denoisers)
    out = save_safetensors(tensors, dst, metadata)
    return ConvertReport(str(src), str(out), plan.parsed.format, to, family,
                         {c: len(adapter.layers[c]) for c in comps}, len(tensors))


def _norm_tensors(plan: LoadPlan, loaded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FLUX Control LoRA's norm scales under diffusers names (``transformer.<block>.attn.norm_q.weight``), as
    diffusers' converter writes them and diffusers and lorakit read them."""
    return {f"{comp}.{param}": loaded[key] for comp, norms in plan.norms.items() for param, key in norms.items()}
