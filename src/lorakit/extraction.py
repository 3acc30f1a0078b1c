"""Extract a LoRA from a fine-tuned model and its base, as kohya's ``extract_lora_from_models.py`` does.

For every Linear and Conv2d weight, the difference ``tuned - base`` is factored by SVD and truncated to ``rank``
(``conv_rank`` for kxk convolutions), ``up = U * S`` and ``down = Vh``, optionally clamped to a quantile of their
entries (kohya's ``clamp_quantile``, 0.99 there). Layers whose largest difference is at most ``min_diff`` are left
out (identical layers always are). The LoRA has ``alpha == rank`` (scale 1), so diffusers+PEFT and lorakit apply
exactly ``up @ down``.

Example:
    >>> lora, report = extract_lora("tuned/unet", "base/unet", rank=32, namespace="unet")      # doctest: +SKIP
    >>> write_lora_file(lora, "extracted.safetensors")                                           # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import merge as M
from .adapter import Adapter, WeightDelta
from .errors import LoraFileError, LoraKeyError, LoraShapeError, preview
from .lorafiles import MODEL
from .merging import MergeReport, ModuleReport, Progress, lora_from_2d

Weights = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike


def _is_embedding(path: str) -> bool:
    """Embedding tables are 2-D like Linear weights; their names say what they are."""
    leaf = path.rsplit(".", 1)[-1]
    return "embed" in leaf or leaf in ("shared", "wte", "wpe")


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if len(f.name.split(".")) == 2]  # skip variants (.fp16.) when the plain file is there
    files = plain or files
    if not files:
        raise LoraFileError(f"{folder}: no .safetensors weights in this folder; pass a diffusers model folder (the "
                            f"one with diffusion_pytorch_model.safetensors or model.safetensors) or a file.")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def target_weights(obj: Weights) -> dict[str, torch.Tensor]:
    """``{module path: weight}`` of every Linear and (ungrouped) Conv2d of a model, state dict, file or folder."""
    if isinstance(obj, nn.Module):
        return {p: m.weight.detach() for p, m in obj.named_modules()
                if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)}
    if not isinstance(obj, Mapping):
        path = Path(obj)
        if not path.exists():
            raise LoraFileError(f"{path}: no such file or folder.")
        from safetensors.torch import load_file

        obj = _read_folder(path) if path.is_dir() else load_file(str(path))
    return {k[: -len(".weight")]: v for k, v in obj.items()
            if k.endswith(".weight") and v.dim() in (2, 4) and v.is_floating_point() and not _is_embedding(k[:-7])}


def _check_pair(tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> None:
    extra = set(tuned) ^ set(base)
    if extra:
        raise LoraKeyError(f"extract: the models have different layers ({preview(extra, 4)}); pass a fine-tune and "
                           f"the base it was trained from.")
    bad = [f"{k}: {list(tuned[k].shape)} vs {list(base[k].shape)}" for k in tuned if tuned[k].shape != base[k].shape]
    if bad:
        raise LoraShapeError(f"extract: weight shapes differ ({preview(bad, 3)}); the models are not the same "
                             f"architecture.")


def extract_lora(tuned: Weights, base: Weights, rank: int, *, conv_rank: int | None = None,
                 clamp_quantile: float | None = None, min_diff: float = 0.0, namespace: str | None = None,
                 name: str = "extracted", device: str | torch.device = "cpu",
                 progress: Progress = None) -> tuple[Adapter, MergeReport]:
    """A LoRA of ``rank`` (``conv_rank`` for kxk convs, default ``rank``) approximating ``tuned - base``.

    ``tuned``/``base``: models, state dicts, ``.safetensors`` files or diffusers model folders. ``namespace``
    (``unet``, ``text_encoder``...) prefixes the keys when written; the report gives each layer's relative error.
    """
    return extract_from_weights(target_weights(tuned), target_weights(base), rank, conv_rank=conv_rank,
                                clamp_quantile=clamp_quantile, min_diff=min_diff, namespace=namespace, name=name,
                                device=device, progress=progress)


def extract_from_weights(tw: Mapping[str, torch.Tensor], bw: Mapping[str, torch.Tensor], rank: int, *,
                         conv_rank: int | None = None, clamp_quantile: float | None = None, min_diff: float = 0.0,
                         namespace: str | None = None, name: str = "extracted", device: str | torch.device = "cpu",
                         progress: Progress = None) -> tuple[Adapter, MergeReport]:
    """:func:`extract_lora` on ``{module path: weight}`` maps as :func:`target_weights` returns them."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise LoraShapeError(f"extract: ranks must be >= 1, found rank={rank}, conv_rank={conv_rank}.")
    _check_pair(dict(tw), dict(bw))
    layers: dict[str, WeightDelta] = {}
    report = MergeReport()
    for path in sorted(tw):
        diff = tw[path].to(device, torch.float32) - bw[path].to(device, torch.float32)
        if diff.abs().max() <= min_diff:
            continue
        r = (conv_rank or rank) if diff.dim() == 4 and diff.shape[2:] != (1, 1) else rank
        up, down, S = M.truncated_svd(diff.reshape(diff.shape[0], -1), r, clamp=clamp_quantile)
        layers[path] = lora_from_2d(up, down, tuple(diff.shape), tw[path].dtype).to(device="cpu")
        report.modules.append(ModuleReport(namespace or MODEL, path, up.shape[1], M.relative_error(S, up.shape[1])))
        if progress:
            progress(path)
    if not layers:
        raise LoraShapeError(f"extract: no layer differs by more than min_diff={min_diff}; are these two copies of "
                             f"the same model?")
    return Adapter(name, {namespace or MODEL: layers}, source="<extract>", format="extracted"), report
