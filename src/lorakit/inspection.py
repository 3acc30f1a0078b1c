"""What a LoRA file holds, read from its header alone: format, algorithms, ranks, alphas, targets, family, metadata.

No weight tensor is read. The only data read are the scalar ``.alpha`` tensors (a few bytes each), because kohya
and LyCORIS files keep alpha there and not in the header.

Example:
    >>> report = inspect_file("style.safetensors")          # doctest: +SKIP
    >>> report.format, report.family, report.ranks           # doctest: +SKIP
    ('kohya', 'sdxl', {16: 722})
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

from . import control
from .algorithms import describe
from .formats import ParsedKeys, parse_keys
from .io import LoraSource, open_source
from .loading import peft_alphas

#: Key of :attr:`FileReport.components` display/JSON form for modules with no component prefix (the model itself).
MODEL_NAMESPACE = "(model)"
#: What :attr:`FileReport.alpha_note` says when no alpha is stored: PEFT, kohya and ComfyUI then use scale 1.
NO_ALPHA = "none (scale 1)"
FULL_RANK = "full"  # a LoKr module whose two Kronecker factors are both full matrices has no rank

# ss_base_model_version values (kohya sd-scripts) -> family.
_SS_BASE = (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"), ("sd3", "sd3"), ("flux", "flux"))
# modelspec.architecture prefixes (sai_model_spec.py) -> family; checked in order, so "-xl" before "-v1".
_ARCHITECTURES = (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-3", "sd3"), ("stable-diffusion-v2", "sd2"),
                  ("stable-diffusion-v1", "sd1"), ("flux", "flux"))
# Key fragments that only one family's files contain.
_KEY_FAMILIES = ((re.compile(r"(^|[._])lora_te[12]_"), "sdxl", "lora_te1_/lora_te2_"),
                 (re.compile(r"img_mlp[._]fc1|img_mod[._]linear|individual_token_refiner"), "hunyuan-video",
                  "img_mlp.fc1/img_mod.linear/individual_token_refiner"),
                 (re.compile(r"(^|[._])blocks[._]\d+[._](self|cross)_attn[._]"), "wan", "blocks.N.self_attn/cross_attn"),
                 (re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), "flux",
                  "double_blocks/single_(transformer_)blocks"),
                 (re.compile(r"joint_blocks"), "sd3", "joint_blocks"))
# Cross-attention key width (the text encoder's hidden size) -> family.
_CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_ATTN2_TO_K = re.compile(r"attn2[._]to_k$")


@dataclass
class ModuleReport:
    """One targeted module as the file spells it."""

    key: str
    component: str | None
    algorithm: str
    rank: int | str
    alpha: float | None
    shape: tuple[int, int]  # (out, in*kernel) of the weight the module changes, from the factor shapes


@dataclass
class FileReport:
    """Everything :func:`inspect_file` learned of a LoRA file.

    ``components`` maps a key namespace (``unet``, ``text_encoder``...; None for keys without one, which belong to
    whatever model the file is loaded into) to its module count. ``ranks`` maps each rank (``"full"`` for LoKr
    modules made of two full matrices) to its module count. ``alphas`` lists the distinct alpha values stored.
    """

    path: str
    size_bytes: int
    format: str
    algorithms: dict[str, int]
    family: str
    family_source: str
    trainer: str
    trainer_source: str
    ranks: dict[int | str, int]
    alphas: list[float]
    alpha_note: str
    components: dict[str | None, int]
    dtypes: dict[str, int]
    num_tensors: int
    num_params: int
    metadata: dict[str, str]
    embeddings: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    modules: list[ModuleReport] = field(default_factory=list)
    #: FLUX Control norm scales (``…query_norm.scale``): replaced in the model, not LoRA modules
    norm_overwrites: list[str] = field(default_factory=list)

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    def alpha_text(self) -> str:
        """Alphas for display: ``"4.0"``, ``"8.0, 16.0"`` or ``"none (scale 1)"``."""
        if not self.alphas:
            return NO_ALPHA
        return ", ".join(f"{a:g}" for a in self.alphas)

    def to_dict(self, *, modules: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (component None -> ``"(model)"``, rank keys as strings); per-module rows if asked.

        Example:
            >>> import json; json.dumps(inspect_file("lora.safetensors").to_dict())  # doctest: +SKIP
        """
        out = asdict(self)
        out["components"] = {_namespace_label(k): v for k, v in self.components.items()}
        out["ranks"] = {str(k): v for k, v in self.ranks.items()}
        out["num_modules"] = self.num_modules
        if modules:
            for row in out["modules"]:
                row["component"] = _namespace_label(row["component"])
        else:
            del out["modules"]
        return out


def _namespace_label(namespace: str | None) -> str:
    return MODEL_NAMESPACE if namespace is None else namespace


# ------------------------------------------------------------------------------------------------ per module
def _read_alphas(source: LoraSource, keys: list[str]) -> dict[str, float]:
    """The scalar ``.alpha`` tensors (only these tensors are read)."""
    if not keys:
        return {}
    if source.tensors is not None:
        return {k: float(source.tensors[k].float().item()) for k in keys}
    from safetensors import safe_open

    with safe_open(str(source.path), framework="pt") as fh:
        return {k: float(fh.get_tensor(k).float().item()) for k in keys}


def _metadata_alphas(metadata: Mapping[str, str]) -> list[float]:
    """lora_alpha and alpha_pattern values of diffusers' ``lora_adapter_metadata``."""
    found: list[float] = []
    for alpha, pattern in peft_alphas(metadata).values():
        if alpha is not None:
            found.append(alpha)
        found.extend(float(v) for v in pattern.values())
    return found


def _module_rows(parsed: ParsedKeys, source: LoraSource) -> list[ModuleReport]:
    alpha_of = _read_alphas(source, [m.fields["alpha"] for m in parsed.modules if "alpha" in m.fields])
    rows = []
    for m in parsed.modules:
        name, rank, shape = describe({f: source.infos[k].shape for f, k in m.fields.items()})
        rows.append(ModuleReport(key=m.display, component=m.namespace, algorithm=name, rank=rank,
                                 alpha=alpha_of.get(m.fields.get("alpha", "")), shape=shape))
    return rows


def _alphas(rows: list[ModuleReport], metadata: Mapping[str, str]) -> tuple[list[float], str]:
    """Distinct alphas and where they came from."""
    in_keys = [r.alpha for r in rows if r.alpha is not None]
    if in_keys:
        missing = len(rows) - len(in_keys)
        note = "from .alpha keys" + (f"; {missing} module(s) without alpha (scale 1)" if missing else "")
        return sorted(set(in_keys)), note
    from_meta = _metadata_alphas(metadata)
    if from_meta:
        return sorted(set(from_meta)), "from lora_adapter_metadata"
    return [], NO_ALPHA


def _sorted_ranks(rows: list[ModuleReport]) -> dict[int | str, int]:
    counts = Counter(r.rank for r in rows)
    return dict(sorted(counts.items(), key=lambda kv: (isinstance(kv[0], str), kv[0] if isinstance(kv[0], int) else 0)))


# ------------------------------------------------------------------------------------------------ family
def _family_from_metadata(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    """Family from ``ss_base_model_version`` or ``modelspec.architecture`` (explicit statements of the trainer)."""
    base = metadata.get("ss_base_model_version", "").lower()
    for prefix, family in _SS_BASE:
        if base.startswith(prefix):
            return family, "ss_base_model_version"
    if base:
        return base, "ss_base_model_version"  # chroma, lumina2...: report the trainer's own name
    arch = metadata.get("modelspec.architecture", "").lower()
    for prefix, family in _ARCHITECTURES:
        if arch.startswith(prefix):
            return family, "modelspec.architecture"
    return None


def _family_from_keys(parsed: ParsedKeys, rows: list[ModuleReport], keys: list[str]) -> tuple[str, str] | None:
    """Family from names only one family uses, then from the cross-attention key width."""
    for pattern, family, label in _KEY_FAMILIES:
        if any(pattern.search(k) for k in keys):
            return family, f"keys: {label}"
    for row in rows:
        if _ATTN2_TO_K.search(row.key) and row.shape[1] in _CONTEXT_WIDTHS:
            return _CONTEXT_WIDTHS[row.shape[1]], f"attn2.to_k input width {row.shape[1]}"
    # LDM block names: kohya writes them for SDXL UNets (SD1 kohya files use diffusers-like names). Checked after
    # the width, which is the stronger evidence when both are present.
    if any("input_blocks" in k for k in keys):
        return "sdxl", "keys: input_blocks"
    return None


def guess_family(metadata: Mapping[str, str], parsed: ParsedKeys, rows: list[ModuleReport],
                 keys: list[str]) -> tuple[str, str]:
    """(family, how it was found): trainer metadata, then key names and shapes, then ``ss_v2``; else unknown.

    Example:
        >>> guess_family({"ss_base_model_version": "sdxl_base_v1-0"}, parse_keys([]), [], [])
        ('sdxl', 'ss_base_model_version')
    """
    found = _family_from_metadata(metadata) or _family_from_keys(parsed, rows, keys)
    if found:
        return found
    v2 = metadata.get("ss_v2")
    if v2 is not None:  # A1111: ss_v2 "True" -> SD2, any other kohya metadata -> SD1
        return ("sd2" if v2.lower() == "true" else "sd1"), "ss_v2"
    return "unknown", "no metadata or telling keys"


# ------------------------------------------------------------------------------------------------ trainer
# ss_network_module values (kohya sd-scripts' --network_module) -> the network code that trained the file.
_NETWORK_MODULES = {"networks.lora": "kohya sd-scripts", "networks.oft": "kohya sd-scripts (OFT)",
                    "networks.dylora": "kohya sd-scripts (DyLoRA)", "lycoris.kohya": "LyCORIS (kohya sd-scripts)"}


def guess_trainer(metadata: Mapping[str, str], fmt: str) -> tuple[str, str]:
    """(trainer, how it was found): lorakit's own record, kohya ``ss_*`` keys (with LyCORIS' ``algo`` from
    ``ss_network_args``), diffusers' ``lora_adapter_metadata``; else a guess from the key format.

    Example:
        >>> guess_trainer({"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha"}'}, "lycoris")
        ('LyCORIS (kohya sd-scripts), algo loha', 'ss_network_module')
    """
    if "lorakit" in metadata:
        return "lorakit", "lorakit metadata"
    module = metadata.get("ss_network_module")
    if module:
        name = _NETWORK_MODULES.get(module, f"kohya sd-scripts ({module})")
        try:
            algo = json.loads(metadata.get("ss_network_args") or "{}").get("algo")
        except (ValueError, AttributeError):
            algo = None
        return name + (f", algo {algo}" if algo else ""), "ss_network_module"
    if any(k.startswith("ss_") for k in metadata):
        return "kohya sd-scripts", "ss_* metadata"
    if "lora_adapter_metadata" in metadata:
        return "diffusers / PEFT", "lora_adapter_metadata"
    by_format = {"lycoris": "LyCORIS", "kohya": "kohya-style", "peft": "PEFT", "diffusers": "diffusers",
                 "diffusers_legacy": "diffusers (attention processors)"}
    if fmt in by_format:
        return by_format[fmt], "key names (no trainer metadata)"
    return "unknown", "no metadata or telling keys"


# ------------------------------------------------------------------------------------------------ entry point
def inspect_file(src: str | os.PathLike, weight_name: str | None = None, *,
                 allow_pickle: bool = False) -> FileReport:
    """Inspect a LoRA file (or folder + ``weight_name``, or hub repo id) from its header; raises LoraError.

    Example:
        >>> r = inspect_file("lora.safetensors")   # doctest: +SKIP
        >>> r.components                           # doctest: +SKIP
        {'unet': 128, 'text_encoder': 72}
    """
    source = open_source(src, weight_name, allow_pickle=allow_pickle)
    keys = list(source.infos)
    parsed = parse_keys(keys)
    rows = _module_rows(parsed, source)
    alphas, note = _alphas(rows, source.metadata)
    family, family_source = guess_family(source.metadata, parsed, rows, keys)
    norms, _ = control.split_norm_keys(list(parsed.unused), family)
    trainer, trainer_source = guess_trainer(source.metadata, parsed.format)
    return FileReport(
        path=str(source.path or source.name),
        # pickle sources report their tensor bytes as size_bytes; the file's own size is what a user expects
        size_bytes=source.path.stat().st_size if source.path is not None else source.size_bytes,
        format=parsed.format,
        algorithms=dict(Counter(r.algorithm for r in rows).most_common()),
        family=family,
        family_source=family_source,
        trainer=trainer,
        trainer_source=trainer_source,
        ranks=_sorted_ranks(rows),
        alphas=alphas,
        alpha_note=note,
        components=dict(Counter(r.component for r in rows).most_common()),
        dtypes=dict(Counter(_dtype_name(i.dtype) for i in source.infos.values()).most_common()),
        num_tensors=len(keys),
        num_params=sum(math.prod(i.shape) for i in source.infos.values()),
        metadata=dict(source.metadata),
        embeddings=list(parsed.embeddings),
        unused=[k for k in parsed.unused if k not in norms],
        modules=rows,
        norm_overwrites=list(norms),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["FileReport", "ModuleReport", "inspect_file", "guess_family", "guess_trainer", "MODEL_NAMESPACE",
           "NO_ALPHA"]
