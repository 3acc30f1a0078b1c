"""LoRA files without a model: read one into an :class:`Adapter` keyed as the file spells its modules, write one back.

This is what ``lorakit merge`` / ``resize`` / ``extract`` work on. Modules are identified by (key namespace, module
key) exactly as the file names them, so files merged together must spell names the same way (all diffusers/PEFT
dotted paths, or all kohya ``lora_unet_...`` names). Output keeps the inputs' style: PEFT/diffusers files are
written as PEFT/diffusers files (``lora_A``/``lora_B`` + ``lora_adapter_metadata``), kohya files as kohya files
(``lora_down``/``lora_up``/``alpha``), and diffusers+PEFT and lorakit load both.

Example:
    >>> lf = read_lora_file("style.safetensors")                   # doctest: +SKIP
    >>> write_lora_file(lf.adapter, "copy.safetensors", style=lf.style,
    ...                 kohya_prefixes=lf.kohya_prefixes)          # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import Adapter, LoraWeights, WeightDelta
from .errors import LoraError, LoraKeyError
from .formats import parse_keys
from .formats.build import build_delta
from .formats.keys import KOHYA_PREFIXES
from .formats.write import METADATA_KEY, to_peft
from .io import open_source, save_safetensors
from .loading import _alpha_for, peft_alphas

#: The namespace of keys without a component prefix (a model-level file).
MODEL = ""
_DEFAULT_KOHYA = {"unet": "lora_unet_", "transformer": "lora_unet_", "text_encoder": "lora_te1_",
                  "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}


@dataclass
class LoraFile:
    """A file read without a model: its adapter (``layers[namespace][module key]``), its naming style (``dotted``
    or ``kohya``) and, for kohya files, the prefix each namespace was spelled with."""

    adapter: Adapter
    style: str
    kohya_prefixes: dict[str, str] = field(default_factory=dict)


def read_lora_file(src: str | os.PathLike, name: str | None = None) -> LoraFile:
    """Read every LoRA/LoCon/LoKr module of a file; keys no reader understands raise :class:`LoraKeyError`."""
    source = open_source(src)
    parsed = parse_keys(list(source.infos))
    if parsed.unused or not parsed.modules:
        raise LoraKeyError(f"{source.name}: {len(parsed.unused)} key(s) are not LoRA layers "
                           f"({parsed.unused[:3]}) or no LoRA layer was found; lorakit merge/resize read LoRA, LoCon "
                           f"and LoKr files.")
    styles = {e.style for e in parsed.modules}
    if len(styles) > 1:
        raise LoraKeyError(f"{source.name}: mixes kohya and diffusers key names; load it into a pipeline and save it "
                           f"with save_lora_weights first.")
    tensors = source.load()
    alphas = peft_alphas(source.metadata)
    layers: dict[str, dict[str, WeightDelta]] = {}
    prefixes: dict[str, str] = {}
    for entry in parsed.modules:
        ns = entry.namespace or MODEL
        alpha = _alpha_for(entry.key, entry.namespace, alphas) if entry.style == "dotted" else None
        layers.setdefault(ns, {})[entry.key] = build_delta(entry, tensors.__getitem__, alpha)
        if entry.style == "kohya":
            raw = next(iter(entry.fields.values()))
            prefixes[ns] = next(p for p, n in KOHYA_PREFIXES if raw.startswith(p) and n == entry.namespace)
    adapter = Adapter(name or Path(source.name).stem, layers, source=source.name, format=parsed.format,
                      metadata=dict(source.metadata))
    return LoraFile(adapter, styles.pop(), prefixes)


def check_same_style(files: list[LoraFile]) -> str:
    """The one naming style of ``files``; different styles cannot be matched module by module without a model."""
    styles = {f.style for f in files}
    if len(styles) > 1:
        names = ", ".join(f"{f.adapter.source} ({f.style})" for f in files)
        raise LoraError(f"these files name modules differently: {names}. Without a model lorakit cannot match kohya "
                        f"names to diffusers paths: load the files into a pipeline (lorakit.attach) and call "
                        f"pipe.add_weighted_adapter, then save_lora_adapter.")
    return styles.pop()


def write_lora_file(adapter: Adapter, path: str | os.PathLike, *, style: str = "dotted",
                    kohya_prefixes: dict[str, str] | None = None, extra_metadata: dict[str, str] | None = None
                    ) -> Path:
    """Write ``adapter`` (``layers[namespace][module key]`` of LoraWeights) in the given naming style."""
    if style == "kohya":
        tensors, metadata = _to_kohya(adapter, kohya_prefixes or {})
    else:
        tensors, metadata = _to_dotted(adapter)
    metadata["lorakit"] = json.dumps({"adapter": adapter.name, "source": adapter.source, **(extra_metadata or {})})
    return save_safetensors(tensors, path, metadata)


def _to_dotted(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    config: dict = {}
    for ns in adapter.components:
        t, meta = to_peft(adapter, None, [ns], prefixed=ns != MODEL)
        tensors.update(t)
        config.update(json.loads(meta[METADATA_KEY]))
    return tensors, {METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def _to_kohya(adapter: Adapter, prefixes: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    for ns, mods in adapter.layers.items():
        prefix = prefixes.get(ns) or _DEFAULT_KOHYA.get(ns)
        if prefix is None:
            raise LoraError(f"write: no kohya prefix for namespace {ns!r}; write the dotted (PEFT) style instead.")
        for key, d in sorted(mods.items()):
            if not isinstance(d, LoraWeights):
                raise LoraError(f"write: {ns}.{key} holds a {type(d).__name__}; only LoRA factors can be written.")
            tensors[f"{prefix}{key}.lora_down.weight"] = d.down
            tensors[f"{prefix}{key}.lora_up.weight"] = d.up
            if d.mid is not None:
                tensors[f"{prefix}{key}.lora_mid.weight"] = d.mid
            tensors[f"{prefix}{key}.alpha"] = torch.tensor(float(d.alpha if d.alpha is not None else d.rank))
    return tensors, {}
