"""Reading and writing LoRA files.

safetensors headers are parsed and validated without loading any tensor, so a file's format can be detected and
every key checked before a byte of weight data is read. Pickle files (.bin/.pt/.ckpt/.pth) can run code when
unpickled: they are refused unless the caller opts in, and are then read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import operator
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple

import torch

from .errors import LoraFileError
from .fastread import read_to_device

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DEFAULT_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
_MAX_HEADER = 100 * 1024 * 1024
# Recently parsed headers by their bytes (and data section length): a hotswap of a new checkpoint of the same run
# usually repeats its header byte for byte, and then needs no JSON parse and no checks (~4 ms for an SDXL LoRA).
_HEADERS: OrderedDict[tuple[bytes, int], tuple[dict[str, TensorInfo], dict[str, str]]] = OrderedDict()
_KEPT_HEADERS = 8

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TensorInfo(NamedTuple):
    """What a file's header says of one tensor (a tuple: a header has thousands, built at every load)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offsets: tuple[int, int] | None = None  # byte range in a file's data section (None for in-memory tensors)


ALIGN_BYTES = 32  # where the merge kernel vectorises (16 fp16/bf16 elements)


def aligned_layout(infos: Mapping[str, TensorInfo]) -> dict[str, int] | None:
    """New start offsets that put every tensor of a data section at a multiple of ALIGN_BYTES, moving runs of
    tensors that are contiguous and aligned among themselves together; None when the file is aligned already.

    Kohya files interleave each module's 2-byte ``.alpha`` with its factors, leaving the factors at odd offsets:
    views there would cost the merge kernel its vectorised loads (see kernels.py)."""
    spans = sorted((info.offsets[0], info.offsets[1], key) for key, info in infos.items() if info.offsets)
    if all(start % ALIGN_BYTES == 0 for start, _, _ in spans):
        return None
    moved, at, shift = {}, 0, 0
    prev_end = None
    for start, end, key in spans:
        if prev_end is None or start != prev_end or (start + shift) % ALIGN_BYTES:  # a new run starts here
            new_start = -(-at // ALIGN_BYTES) * ALIGN_BYTES
            shift = new_start - start
        moved[key] = start + shift
        at = end + shift
        prev_end = end
    return moved


def merge_runs(pieces: Iterable[tuple[int, int, int]]) -> list[list[int]]:
    """Byte ranges ``(start, end, other start)`` that map one buffer onto another, sorted and joined where both
    sides continue each other: ``[start, end, other start]`` per run (one copy each)."""
    runs: list[list[int]] = []
    for start, end, other in sorted(pieces):
        if runs and runs[-1][1] == start and other - runs[-1][2] == start - runs[-1][0]:
            runs[-1][1] = end
        else:
            runs.append([start, end, other])
    return runs


def relayout(buffer: torch.Tensor, infos: Mapping[str, TensorInfo], moved: Mapping[str, int]) -> torch.Tensor:
    """``buffer`` (a data section) copied to the offsets of :func:`aligned_layout`: one multi-tensor copy of its
    runs of contiguous tensors."""
    size = max(moved[key] + info.offsets[1] - info.offsets[0] for key, info in infos.items() if info.offsets)
    out = torch.empty(-(-size // ALIGN_BYTES) * ALIGN_BYTES, dtype=torch.uint8, device=buffer.device)
    runs = merge_runs((i.offsets[0], i.offsets[1], moved[k]) for k, i in infos.items() if i.offsets)
    torch._foreach_copy_([out[new:new + end - start] for start, end, new in runs],
                         [buffer[start:end] for start, end, _ in runs])
    return out


@functools.lru_cache(maxsize=1024)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class BufferViews(Mapping[str, torch.Tensor]):
    """A file's tensors as views into its data section, each made when first asked for (a hotswap that copies the
    whole section needs none of them). ``moved``: start offsets of a relaid-out section (see aligned_layout)."""

    def __init__(self, buffer: torch.Tensor, infos: Mapping[str, TensorInfo], moved: Mapping[str, int] | None = None):
        self.buffer, self.infos, self.moved, self._made = buffer, infos, moved, {}
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        made = self._made.get(key)
        if made is None:
            dtype, shape = self.infos[key][:2]
            start, end = self.span(key)
            if start % dtype.itemsize:  # misaligned for a view: copy this one tensor
                made = self.buffer[start:end].clone().view(dtype).view(shape)
            else:
                # One tensor object per tensor, a view of the whole section in its dtype (slicing, then viewing as
                # the dtype and the shape, kept two alive per tensor: ~1.5 us more to free each at unload)
                typed = self._typed_view(dtype)
                made = typed.as_strided(shape, _contiguous_strides(shape), typed.storage_offset() + start // dtype.itemsize)
            self._made[key] = made
        return made

    def span(self, key: str) -> tuple[int, int]:
        """The byte range of ``key``'s tensor in :attr:`buffer` (its relaid-out place, when the section moved)."""
        start, end = self.infos[key].offsets
        if self.moved is not None:
            start, end = self.moved[key], self.moved[key] + end - start
        return start, end

    def _typed_view(self, dtype: torch.dtype) -> torch.Tensor:
        typed = self._typed.get(dtype)
        if typed is None:
            usable = self.buffer.numel() - self.buffer.numel() % dtype.itemsize
            typed = self._typed[dtype] = self.buffer[:usable].view(dtype)
        return typed

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)


@dataclass
class LoraSource:
    """A LoRA source after resolution: where it came from, its tensor table and its metadata.

    ``tensors`` is filled lazily for files (``load()``), and up front for in-memory dicts.
    """

    name: str
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]
    path: Path | None = None
    size_bytes: int = 0
    tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    #: the data section, once read in one piece (CUDA loads): every tensor of ``load()`` is a view into it
    buffer: torch.Tensor | None = field(default=None, repr=False)

    def load(self, device: torch.device | str = "cpu") -> Mapping[str, torch.Tensor]:
        """Return every tensor of the source, read straight onto ``device`` (CPU or CUDA; elsewhere: read to the CPU)."""
        if self.tensors is not None:
            return self.tensors
        assert self.path is not None
        try:
            return self._read_in_one_copy(torch.device(device))
        except Exception as exc:
            raise LoraFileError(f"{self.name}: could not read tensors ({exc}). The file may be truncated or "
                                f"corrupt: download it again.") from exc


    def _read_in_one_copy(self, device: torch.device) -> Mapping[str, torch.Tensor]:
        """Every tensor of the file on ``device`` from ONE read of the data section (see :mod:`lorakit.fastread`),
        the tensors being views into it. Per-tensor copies cost ~2x on an H200 (218 MB: 86 ms)."""
        with open(self.path, "rb") as fh:
            data_start = 8 + struct.unpack("<Q", fh.read(8))[0]
        self.buffer = read_to_device(self.path, data_start, self.size_bytes - data_start, device)
        moved = aligned_layout(self.infos) if device.type == "cuda" else None
        if moved is not None:  # (CUDA: the merge kernel reads factors where they are; one device copy, ~0.1 ms)
            self.buffer = relayout(self.buffer, self.infos, moved)
        return BufferViews(self.buffer, self.infos, moved)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Example:
        >>> infos, meta = read_safetensors_header(Path("lora.safetensors"))  # doctest: +SKIP
    """
    size = path.stat().st_size
    where = str(path)
    if size < 8:
        raise LoraFileError(f"{where}: file is {size} bytes, too short to be safetensors (expected an 8-byte header "
                            f"length). The file is empty or truncated: download or save it again.")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise LoraFileError(f"{where}: header claims {n} bytes but the file holds {size - 8} after the length "
                                f"field. The file is truncated or not safetensors.")
        raw = fh.read(n)
    data_len = size - 8 - n
    seen = _HEADERS.get((raw, data_len))
    if seen is not None:  # byte for byte a header parsed before (checkpoints of one run): the same result
        _HEADERS.move_to_end((raw, data_len))
        return dict(seen[0]), dict(seen[1])
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoraFileError(f"{where}: corrupt safetensors header ({exc}). Re-download or re-save the file.") from exc
    metadata = header.pop("__metadata__", None) or {}
    infos = _tensor_infos(header, data_len, where)
    metadata = {str(k): str(v) for k, v in metadata.items()}
    _HEADERS[raw, data_len] = (infos, metadata)
    if len(_HEADERS) > _KEPT_HEADERS:
        _HEADERS.popitem(last=False)
    return dict(infos), dict(metadata)


def _tensor_infos(header: dict, data_len: int, where: str) -> dict[str, TensorInfo]:
    """Every entry of a header as a TensorInfo, checked (~2,000 per SDXL LoRA, at every load and hotswap): the checks
    run over whole columns with C-level maps; only a header that fails them is walked entry by entry, to name the
    entry at fault."""
    try:
        entries = header.values()
        dtypes = [_ST_DTYPES[e["dtype"]] for e in entries]
        shapes = [tuple(e["shape"]) for e in entries]
        spans = [tuple(e["data_offsets"]) for e in entries]
        starts, ends = [s[0] for s in spans if len(s) == 2], [s[1] for s in spans if len(s) == 2]
        numbers = {*map(type, itertools.chain.from_iterable(shapes)), *map(type, starts), *map(type, ends)}
        ok = (len(starts) == len(spans) and numbers <= {int}
              and (not spans or min(starts) >= 0 and max(ends) <= data_len)
              and all(map(operator.le, starts, ends))
              and list(map(operator.sub, ends, starts)) == list(map(operator.mul, map(math.prod, shapes),
                                                                    (d.itemsize for d in dtypes))))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        _check_entries(header, data_len, where)  # raises, naming the first bad entry
    return dict(zip(header, map(TensorInfo, dtypes, shapes, spans)))


def _check_entries(header: dict, data_len: int, where: str) -> None:
    for key, entry in header.items():
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            start, end = entry["data_offsets"]
            if not all(type(v) is int for v in (start, end, *shape)):
                raise TypeError("shape and offsets must be integers")
        except (KeyError, TypeError, ValueError) as exc:
            raise LoraFileError(f"{where}: corrupt header entry for key {key!r}: {entry!r}.") from exc
        if not 0 <= start <= end <= data_len:
            raise LoraFileError(f"{where}: tensor {key!r} lies at bytes {start}..{end} but the data section has "
                                f"{data_len} bytes: the file is truncated. Download it again.")
        if end - start != math.prod(shape) * dtype.itemsize:
            raise LoraFileError(f"{where}: tensor {key!r} has shape {list(shape)} ({dtype}) but {end - start} bytes "
                                f"of data. The file is corrupt: download or save it again.")
    raise LoraFileError(f"{where}: corrupt safetensors header (an entry's dtype, shape or offsets). Re-download or "
                        f"re-save the file.")


def _from_dict(tensors: Mapping[str, torch.Tensor], name: str) -> LoraSource:
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LoraFileError(f"{name}: values must be tensors; key {bad[0]!r} holds {type(tensors[bad[0]]).__name__}.")
    tensors = dict(tensors)
    infos = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    return LoraSource(name=name, infos=infos, metadata={}, size_bytes=size, tensors=tensors)


def _load_pickle(path: Path) -> LoraSource:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoraFileError(f"{path}: refused to unpickle ({type(exc).__name__}: {str(exc)[:200]}). Only plain "
                            f"tensor dicts load with weights_only=True; convert the file to safetensors.") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise LoraFileError(f"{path}: expected a dict of tensors, found {type(obj).__name__}.")
    src = _from_dict(obj, str(path))
    src.path, src.size_bytes = path, path.stat().st_size
    return src


def _resolve_path(src: str | os.PathLike, weight_name: str | None, subfolder: str | None, hub_kwargs: dict) -> Path:
    path = Path(src)
    if subfolder:
        path = path / subfolder
    if path.is_file():
        return path
    if path.is_dir():
        if weight_name:
            candidate = path / weight_name
            if candidate.is_file():
                return candidate
            raise LoraFileError(f"{path}: no file {weight_name!r} in this folder. Files there: "
                                f"{sorted(p.name for p in path.iterdir())[:10]}.")
        for default in DEFAULT_WEIGHT_NAMES:
            if (path / default).is_file():
                return path / default
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise LoraFileError(f"{path}: a folder with {len(found)} .safetensors files; pass weight_name= to pick one.")
    text = str(src)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not os.path.splitext(text)[1]
    if not looks_like_repo:
        raise LoraFileError(f"{text}: no such file or folder (and not a hub repo id of the form 'owner/name'). "
                            f"Check the path.")
    return _download(text, weight_name, subfolder, hub_kwargs)


def _download(repo: str, weight_name: str | None, subfolder: str | None, hub_kwargs: dict) -> Path:
    from huggingface_hub import hf_hub_download

    names = [weight_name] if weight_name else list(DEFAULT_WEIGHT_NAMES)
    last: Exception | None = None
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, subfolder=subfolder, **hub_kwargs))
        except Exception as exc:  # hub errors come in many types (offline, 404, auth)
            last = exc
    raise LoraFileError(f"{repo}: could not get {names[0] if weight_name else 'a LoRA file'} from the hub or its "
                        f"cache ({type(last).__name__}: {str(last)[:300]}). Pass weight_name=, check the repo id, "
                        f"or download the file and pass its path.") from last


def open_source(src: str | os.PathLike | Mapping[str, torch.Tensor], weight_name: str | None = None, *,
                subfolder: str | None = None, allow_pickle: bool = False, **hub_kwargs) -> LoraSource:
    """Resolve a LoRA source (file, folder, hub repo id or tensor dict) and read its header only.

    Hub keywords (``cache_dir``, ``local_files_only``, ``token``, ``revision``) go to ``huggingface_hub``, which
    honours its cache and ``HF_HUB_OFFLINE``.

    Example:
        >>> source = open_source("my_lora.safetensors")  # doctest: +SKIP
        >>> sorted(source.infos)[:2]  # doctest: +SKIP
    """
    if isinstance(src, Mapping):
        return _from_dict(src, "<state dict>")
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    path = _resolve_path(src, weight_name, subfolder, hub_kwargs)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraFileError(f"{path}: pickle files can run code when loaded, so lorakit refuses them by default. "
                                f"Convert it to .safetensors, or pass allow_pickle=True if you trust its origin "
                                f"(it is then read with torch.load(weights_only=True)).")
        return _load_pickle(path)
    infos, metadata = read_safetensors_header(path)
    return LoraSource(name=str(path), infos=infos, metadata=metadata, path=path, size_bytes=path.stat().st_size)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """Write tensors (made contiguous, on CPU) with string metadata to ``path``; folders are created."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        where = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if where in seen else v  # safetensors refuses shared storage (a split layer's down)
        seen.add(where)
    save_file(out, str(path), metadata={"format": "pt", **dict(metadata)})
    return path
