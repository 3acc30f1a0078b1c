"""diffusers+PEFT vs lorakit, side by side in one process, on the same full-size models with identical weights.

Two copies of a pipeline are built from config with the same seeded random weights: one is driven through diffusers'
own LoRA methods (PEFT backend), the other is ``lorakit.attach``-ed. Synthetic rank-``--rank`` LoRA files (4 PEFT-format
adapters, 1 kohya file, denoiser-only copies for diffusers' hotswap) are written to a temp dir. Every operation runs in
lock-step on both systems (PEFT then lorakit, step by step, repeat after repeat: A B A B ...), after ``--warmup``
repeats; medians are reported. CUDA ops are timed with CUDA events between ``torch.cuda.synchronize()`` calls, CPU ops
with ``time.perf_counter``. Outputs are compared between the two systems after each op that should agree, and the base
weights are checked for a bit-exact restore after unfuse and unload.

Run (from the repository root, see benchmarks/README.md):
    python benchmarks/bench.py --quick                        # tiny models, smoke run, seconds
    python benchmarks/bench.py --model sd15 --repeats 3       # CPU default: SD1.5-sized fp32, a few minutes
    python3 benchmarks/bench.py --model sdxl --json $OUT/bench.json   # GPU: SDXL fp16 1024px + CFG
    python3 benchmarks/bench.py --model flux --compile        # GPU: Flux bf16 1024px, plus torch.compile checks

Options: --ops load_peft,forward_1 (a subset; prerequisites run too), --repeats, --warmup, --forwards, --rank,
--latent/--batch/--text-tokens (sizes), --dtype, --compile, --json PATH (default $OUT/bench.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

try:
    import lorakit
except ImportError:  # run from a checkout without an install: use the repository's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import lorakit

import diffusers
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from lorakit.adapter import LoraWeights
from lorakit.testing import models as tm
from lorakit.testing.loras import make_lora, to_state_dict

T = TypeVar("T")
SYSTEMS = ("peft", "lorakit")
Output = tuple[torch.Tensor, list[torch.Tensor]]  # (denoiser output, text-encoder outputs)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                "norm1.linear", "norm1_context.linear", "norm.linear")

LABELS = {
    "forward_base": "forward, base (no adapters)",
    "load_peft": "load_lora_weights, PEFT-format file, 1st adapter",
    "forward_1": "forward, 1 adapter",
    "scale": "forward with call-time scale (new scale each call)",
    "scale_back": "first plain forward after a scaled one",
    "load_kohya": "load_lora_weights, kohya file (2nd adapter)",
    "load_third": "load_lora_weights, 3rd adapter",
    "load_fourth": "load_lora_weights, 4th adapter",
    "set_adapters_2": "set_adapters, 2 adapters (call)",
    "set_adapters_2_first": "set_adapters 2 + first forward - plain forward",
    "forward_2": "forward, 2 adapters",
    "set_adapters_4": "set_adapters, 4 adapters (call)",
    "set_adapters_4_first": "set_adapters 4 + first forward - plain forward",
    "forward_4": "forward, 4 adapters",
    "switch_loaded": "set_adapters among loaded adapters (new set and weights) + first forward - plain forward",
    "fuse": "fuse_lora, 2 adapters",
    "forward_fused": "forward, 2 adapters fused",
    "unfuse": "unfuse_lora",
    "delete_1": "delete_adapters, 1 adapter",
    "unload": "unload_lora_weights (all)",
    "hotswap": "load_lora_weights(hotswap=True)",
    "hotswap_denoiser": "hotswap, denoiser-only file (both)",
    "hotswap_dict": "hotswap, denoiser-only state dict on the device",
    "compile_first_call": "compiled: first call (compile time)",
    "compile_forward": "compiled: forward, 1 adapter",
    "compile_set_adapters": "compiled: set_adapters (call)",
    "compile_set_adapters_forward": "compiled: forward after set_adapters",
    "compile_hotswap": "compiled: hotswap load",
    "compile_hotswap_forward": "compiled: forward after hotswap",
    "compile_scale_forward": "compiled: forward with call-time scale 0.5",
    "compile_hotswap_recompile": "compiled: recompile + forward after hotswap",
    "compile_set_adapters_recompile": "compiled: recompile + forward after set_adapters",
    "compile_scale_forward_recompile": "compiled: recompile + forward with call-time scale",
}
NOTES = {
    "load_peft": "file read from page cache after the first repeat",
    "load_kohya": "file read from page cache after the first repeat",
    "scale": "scale alternates 0.5/0.8 between repeats; compare with forward, 1 adapter",
    "scale_back": "lorakit re-merges at scale 1 here",
    "set_adapters_2": "weights rotate between repeats, so every call is a change",
    "set_adapters_4": "adapters a, k (kohya), b, c (d replaces k if k failed: see notes)",
    "fuse": "fuse_lora(adapter_names=[a, b]) after set_adapters([a, b], [0.7, 0.8])",
    "delete_1": "deletes an inactive adapter (2 remain active)",
    "hotswap": "PEFT: denoiser-only file (diffusers refuses text encoders); lorakit: full file",
}


# ------------------------------------------------------------------------------------------------ models and inputs
@dataclass(frozen=True)
class ModelSpec:
    """A model family as data: which components exist, which layers the LoRAs target, how files are spelled."""

    name: str
    denoiser: str
    text_encoders: tuple[str, ...]
    call_kwarg: str
    kohya_format: str  # SD1.5: diffusers cannot read LDM-named kohya files, so the diffusers-named form
    denoiser_targets: tuple[str, ...]
    block_prefixes: tuple[str, ...] = ()  # keep only layers under these paths (Flux: the transformer blocks)


SPECS = {
    "sd15": ModelSpec("sd15", "unet", ("text_encoder",), "cross_attention_kwargs", "kohya", UNET_TARGETS),
    "sdxl": ModelSpec("sdxl", "unet", ("text_encoder", "text_encoder_2"), "cross_attention_kwargs", "kohya_ldm",
                      UNET_TARGETS),
    "flux": ModelSpec("flux", "transformer", (), "joint_attention_kwargs", "kohya", FLUX_TARGETS,
                      ("transformer_blocks.", "single_transformer_blocks.")),
}
DEFAULT_DTYPES = {"sd15": torch.float16, "sdxl": torch.float16, "flux": torch.bfloat16}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Sizes:
    """Denoiser input sizes: ``latent`` is the VAE latent side (Flux packs 2x2 patches: (latent/2)^2 tokens)."""

    latent: int
    batch: int
    text_tokens: int


def default_sizes(model: str, quick: bool, cuda: bool) -> Sizes:
    if quick:
        return Sizes(8, 1, 7)
    if model == "sdxl":
        return Sizes(128, 2, 77)  # 1024 px, one image + CFG
    if model == "flux":
        return Sizes(128, 1, 512)  # 1024 px: 4096 image tokens, 512 text tokens
    return Sizes(64, 2, 77) if cuda else Sizes(32, 1, 77)  # SD1.5: 512 px + CFG on GPU; 256 px on CPU


def build_pipeline(spec: ModelSpec, quick: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """A real diffusers pipeline around seeded random models (stand-ins: no VAE, tokenizer or scheduler)."""
    if quick:
        tiny = {"sd15": tm.tiny_sd15_pipeline, "sdxl": tm.tiny_sdxl_pipeline, "flux": tm.tiny_flux_pipeline}
        return tiny[spec.name](seed=0, dtype=dtype, device=device)
    kw: dict[str, Any] = {"seed": 0, "dtype": dtype, "device": device}
    if spec.name == "sd15":
        return StableDiffusionPipeline(vae=None, text_encoder=tm.sd15_text_encoder(**kw), tokenizer=None,
                                       unet=tm.sd15_unet(**kw), scheduler=None, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if spec.name == "sdxl":
        te1, te2 = tm.sdxl_text_encoders(**kw)
        return StableDiffusionXLPipeline(vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=None,
                                         tokenizer_2=None, unet=tm.sdxl_unet(**kw), scheduler=None,
                                         add_watermarker=False)
    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=tm.flux_transformer(**kw))


def denoiser_inputs(model: nn.Module, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Fixed seeded inputs of the denoiser's forward (UNet2DConditionModel or FluxTransformer2DModel)."""
    g = torch.Generator().manual_seed(0)
    cfg, b, n = model.config, sizes.batch, sizes.latent

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    if hasattr(model, "down_blocks"):
        out: dict[str, Any] = {"sample": rand(b, cfg.in_channels, n, n),
                               "timestep": torch.full((b,), 10, device=device),
                               "encoder_hidden_states": rand(b, sizes.text_tokens, cfg.cross_attention_dim)}
        if cfg.addition_embed_type == "text_time":
            px = float(n * 8)
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            out["added_cond_kwargs"] = {"text_embeds": rand(b, text_dim),
                                        "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]] * b).to(device, dtype)}
        return out
    tokens = (n // 2) ** 2
    out = {"hidden_states": rand(b, tokens, cfg.in_channels),
           "encoder_hidden_states": rand(b, sizes.text_tokens, cfg.joint_attention_dim),
           "pooled_projections": rand(b, cfg.pooled_projection_dim),
           "timestep": torch.full((b,), 0.5).to(device, dtype),
           "img_ids": torch.zeros(tokens, 3).to(device, dtype),
           "txt_ids": torch.zeros(sizes.text_tokens, 3).to(device, dtype)}
    if cfg.guidance_embeds:
        out["guidance"] = torch.full((b,), 3.5).to(device, dtype)
    return out


def text_ids(encoder: nn.Module, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    length = min(77, encoder.config.max_position_embeddings)
    return torch.randint(0, encoder.config.vocab_size - 2, (1, length), generator=g).to(device)


# ------------------------------------------------------------------------------------------------------ LoRA files
@dataclass
class LoraFiles:
    """The synthetic LoRA files of a run and what they target."""

    folder: Path
    peft: list[Path]  # seeds 1..4, pipeline-level keys (unet./transformer., text_encoder., text_encoder_2.)
    kohya: Path  # seed 5, with .alpha = rank / 2
    denoiser_only: dict[int, Path]  # seeds 3, 4 without text encoders (diffusers' hotswap)
    targets: dict[str, list[str]]  # component -> targeted module paths
    layers: dict[str, int] = field(default_factory=dict)
    tensors: int = 0
    size_mb: float = 0.0


def lora_layers(model: nn.Module, targets: tuple[str, ...], prefixes: tuple[str, ...], rank: int, seed: int,
                dtype: torch.dtype, alpha: float | None) -> dict[str, LoraWeights]:
    layers = make_lora(model, rank=rank, seed=seed, targets=targets, dtype=dtype, alpha=alpha)
    return {p: w for p, w in layers.items() if not prefixes or p.startswith(prefixes)}


def component_layers(pipe: Any, spec: ModelSpec, rank: int, seed: int, dtype: torch.dtype,
                     alpha: float | None = None) -> dict[str, dict[str, LoraWeights]]:
    out = {spec.denoiser: lora_layers(getattr(pipe, spec.denoiser), spec.denoiser_targets, spec.block_prefixes, rank,
                                      seed, dtype, alpha)}
    for i, name in enumerate(spec.text_encoders):
        out[name] = lora_layers(getattr(pipe, name), TE_TARGETS, (), rank, seed * 100 + i + 1, dtype, alpha)
    return out


def spell(pipe: Any, spec: ModelSpec, layers: dict[str, dict[str, LoraWeights]], fmt: str) -> dict[str, torch.Tensor]:
    """A pipeline-level state dict: PEFT keys (``unet.<path>.lora_A.weight``) or kohya (LDM names for SDXL)."""
    sd: dict[str, torch.Tensor] = {}
    for comp, lay in layers.items():
        comp_fmt = spec.kohya_format if fmt == "kohya" and comp == spec.denoiser else fmt
        sd.update(to_state_dict(lay, comp_fmt, comp, model=getattr(pipe, comp), sdxl_te=len(spec.text_encoders) > 1))
    return sd


def save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    return path


def write_loras(pipe: Any, spec: ModelSpec, rank: int, dtype: torch.dtype, folder: Path) -> LoraFiles:
    files = LoraFiles(folder, [], folder / "kohya_5.safetensors", {}, {})
    for seed in (1, 2, 3, 4):
        layers = component_layers(pipe, spec, rank, seed, dtype)
        sd = spell(pipe, spec, layers, "peft")
        files.peft.append(save(sd, folder / f"peft_{seed}.safetensors"))
        if seed == 1:
            files.targets = {c: sorted(lay) for c, lay in layers.items()}
            files.layers = {c: len(lay) for c, lay in layers.items()}
            files.tensors = len(sd)
            files.size_mb = files.peft[0].stat().st_size / 1e6
        if seed in (3, 4):
            files.denoiser_only[seed] = (save(spell(pipe, spec, {spec.denoiser: layers[spec.denoiser]}, "peft"),
                                              folder / f"peft_{seed}_{spec.denoiser}.safetensors")
                                         if spec.text_encoders else files.peft[-1])
    save(spell(pipe, spec, component_layers(pipe, spec, rank, 5, dtype, alpha=rank / 2), "kohya"), files.kohya)
    return files


# ------------------------------------------------------------------------------------------------ timing and records
class Clock:
    """Times a call: CUDA events between synchronizes on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def measure(self, fn: Callable[[], T]) -> tuple[float, T]:
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return (time.perf_counter() - t0) * 1e3, out
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), out

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    @contextlib.contextmanager
    def peak(self) -> Iterator[list[int]]:
        """Yields a one-item list that holds, afterwards, the peak allocation above the allocation at entry."""
        holder = [0]
        if not self.cuda:
            yield holder
            return
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield holder
        holder[0] = torch.cuda.max_memory_allocated() - before


@dataclass
class OpResult:
    samples: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SYSTEMS})
    errors: dict[str, str] = field(default_factory=dict)
    error_count: dict[str, int] = field(default_factory=dict)


class Recorder:
    """Collects timings per op and system (only while ``measuring``), and errors against the op that was running."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.ops: dict[str, OpResult] = {}
        self.measuring = False
        self.current = "setup"
        # Python's garbage collections that fell inside each timed sample (op -> system -> ms per sample): a full
        # collection walks every object of the process, both pipelines' included, whichever system triggered it
        self.gc_ms: dict[str, dict[str, list[float]]] = {}
        self._gc_total = 0.0
        self._gc_start: float | None = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self._gc_total += time.perf_counter() - self._gc_start
            self._gc_start = None

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)

    def at(self, op: str) -> None:
        self.current = op
        self.ops.setdefault(op, OpResult())

    def time(self, op: str, system: str, fn: Callable[[], T]) -> T:
        self.at(op)
        before = self._gc_total
        ms, out = self.clock.measure(fn)
        self.add(op, system, ms)
        if self.measuring:
            self.gc_ms.setdefault(op, {}).setdefault(system, []).append((self._gc_total - before) * 1e3)
        return out

    def add(self, op: str, system: str, ms: float) -> None:
        if self.measuring:
            self.ops.setdefault(op, OpResult()).samples[system].append(ms)

    def fail(self, system: str, exc: BaseException) -> None:
        result = self.ops.setdefault(self.current, OpResult())
        result.errors.setdefault(system, f"{type(exc).__name__}: {exc}".strip()[:600])
        result.error_count[system] = result.error_count.get(system, 0) + 1


# ------------------------------------------------------------------------------------------------------ the systems
@dataclass
class System:
    """One pipeline driven through one LoRA engine."""

    name: str
    pipe: Any
    spec: ModelSpec
    inputs: dict[str, Any]
    te_ids: dict[str, torch.Tensor]
    held: int = 0  # CUDA bytes this system allocated since the clean state of the current repeat
    step_start: int = 0
    runner: Callable[..., Any] | None = None  # the compiled denoiser, while one is in use

    @property
    def denoiser(self) -> nn.Module:
        model = getattr(self.pipe, self.spec.denoiser)
        return getattr(model, "_orig_mod", model)

    def call_kwargs(self, scale: float | None) -> dict[str, Any]:
        """The denoiser's attention kwargs as a pipeline passes them: always present, None without a scale."""
        return {self.spec.call_kwarg: {"scale": scale} if scale is not None else None}

    def forward(self, scale: float | None = None) -> torch.Tensor:
        fn = self.runner if self.runner is not None else getattr(self.pipe, self.spec.denoiser)
        return fn(**self.inputs, **self.call_kwargs(scale), return_dict=False)[0]

    def te_outputs(self) -> list[torch.Tensor]:
        return [getattr(self.pipe, name)(ids)[0] for name, ids in self.te_ids.items()]

    def weight(self, component: str, path: str) -> torch.Tensor:
        module = getattr(self.pipe, component).get_submodule(path)
        return getattr(module, "base_layer", module).weight

    def has_adapters(self) -> bool:
        if self.name == "lorakit":
            manager = self.pipe._lorakit_manager
            return bool(manager.adapters) or bool(manager.fused_loras)
        names = (self.spec.denoiser, *self.spec.text_encoders)
        return any(getattr(getattr(self.pipe, n, None), "peft_config", None) for n in names)


# ------------------------------------------------------------------------------------------------------ run context
@dataclass
class Ctx:
    args: argparse.Namespace
    spec: ModelSpec
    clock: Clock
    rec: Recorder
    files: LoraFiles
    base_weights: dict[str, dict[str, torch.Tensor]]
    forwards: int
    rep: int = 0
    four: list[str] = field(default_factory=lambda: ["a", "k", "b", "c"])  # the 4-adapter mix
    outputs: dict[str, dict[str, Output]] = field(default_factory=dict)
    base_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    diffs: dict[str, dict[str, Any]] = field(default_factory=dict)
    restore: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    memory: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    compile_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    # an untouched copy of the denoiser, timed right after each forward op: its "x base" divides by these times
    reference: Callable[[], Any] | None = None

    def mem(self, system: str, key: str, value: int) -> None:
        if self.clock.cuda and self.rec.measuring:
            self.memory.setdefault(system, {}).setdefault(key, []).append(value)


def held_now(ctx: Ctx, sys: System) -> int:
    return sys.held + ctx.clock.allocated() - sys.step_start


def keep(ctx: Ctx, key: str, sys: System, out: torch.Tensor, with_te: bool = False) -> None:
    """Remember an output for the comparison of the two systems after this step."""
    ctx.outputs.setdefault(key, {})[sys.name] = (out, sys.te_outputs() if with_te else [])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float | None:
    value = (a.float() - b.float()).abs().max().item()
    return value if math.isfinite(value) else None


def compare(ctx: Ctx, key: str) -> None:
    """Max |lorakit - PEFT| of the outputs kept under ``key``; keeps the worst over repeats."""
    pair = ctx.outputs.get(key, {})
    if set(pair) != set(SYSTEMS):
        return
    (ref, ref_te), (got, got_te) = pair["peft"], pair["lorakit"]
    entry = ctx.diffs.setdefault(key, {"denoiser": None, "text_encoders": None, "lora_effect": None, "checks": 0,
                                       "non_finite": False})
    entry["checks"] += 1
    te = [max_diff(g, r) for g, r in zip(got_te, ref_te)]
    if None in te:
        entry["non_finite"] = True
    diffs = {"denoiser": max_diff(got, ref), "text_encoders": max((d for d in te if d is not None), default=None),
             "lora_effect": max_diff(ref, ctx.base_outputs["peft"]) if "peft" in ctx.base_outputs else None}
    if diffs["denoiser"] is None:
        entry["non_finite"] = True
    for part, value in diffs.items():
        if value is not None and math.isfinite(value):
            entry[part] = value if entry[part] is None else max(entry[part], value)


@torch.no_grad()
def check_restore(ctx: Ctx, sys: System, key: str) -> None:
    """Compare every targeted weight with the saved copy of the base weights, bit for bit."""
    exact, worst = True, 0.0
    for comp, paths in ctx.files.targets.items():
        for path in paths:
            weight, ref = sys.weight(comp, path), ctx.base_weights[comp][path]
            if not torch.equal(weight, ref):
                exact = False
                worst = max(worst, (weight.float() - ref.float()).abs().max().item())
    entry = ctx.restore.setdefault(key, {}).setdefault(sys.name, {"exact": True, "max_abs_diff": 0.0, "checks": 0})
    entry["exact"] = entry["exact"] and exact
    entry["max_abs_diff"] = max(entry["max_abs_diff"], worst)
    entry["checks"] += 1


@torch.no_grad()
def reset_base(ctx: Ctx, sys: System) -> None:
    """Put PEFT's base weights back to the exact originals, so its unfuse drift does not pile up over repeats."""
    for comp, paths in ctx.files.targets.items():
        for path in paths:
            sys.weight(comp, path).copy_(ctx.base_weights[comp][path])


def ensure_clean(ctx: Ctx, sys: System) -> None:
    if sys.has_adapters():
        sys.pipe.unload_lora_weights()
    if sys.name == "peft":
        reset_base(ctx, sys)
        sys.denoiser._prepare_lora_hotswap_kwargs = None
    else:
        sys.pipe._lorakit_manager.hotswap_rank = None


# ------------------------------------------------------------------------------------------------------ the steps
def timed_forwards(ctx: Ctx, sys: System, op: str, n: int, scale: float | None = None
                   ) -> tuple[torch.Tensor, int, list[float]]:
    """``n`` timed forwards recorded under ``op``: (last output, peak bytes above the entry allocation, times)."""
    out, times = None, []
    ctx.rec.at(op)
    with ctx.clock.peak() as peak:
        for _ in range(max(1, n)):
            ms, out = ctx.clock.measure(lambda: sys.forward(scale))
            ctx.rec.add(op, sys.name, ms)
            times.append(ms)
    if ctx.reference is not None:  # the same forward on an untouched model, seconds later: a base free of drift
        for _ in range(max(1, n)):
            ctx.rec.add(f"{op}{REFERENCE}", sys.name, ctx.clock.measure(ctx.reference)[0])
    return out, peak[0], times


def load(ctx: Ctx, sys: System, op: str | None, path: Path, name: str, **kwargs: Any) -> None:
    call = lambda: sys.pipe.load_lora_weights(str(path), adapter_name=name, **kwargs)  # noqa: E731
    if op is None:
        call()
    else:
        ctx.rec.time(op, sys.name, call)


def step_forward_base(ctx: Ctx, sys: System) -> None:
    out, peak, _ = timed_forwards(ctx, sys, "forward_base", ctx.forwards)
    ctx.base_outputs.setdefault(sys.name, out)
    ctx.mem(sys.name, "peak_forward_base", peak)
    keep(ctx, "base (no adapters)", sys, out, with_te=True)


def step_load_peft(ctx: Ctx, sys: System) -> None:
    load(ctx, sys, "load_peft", ctx.files.peft[0], "a")


def step_forward_1(ctx: Ctx, sys: System) -> None:
    held = held_now(ctx, sys)
    out, peak, _ = timed_forwards(ctx, sys, "forward_1", ctx.forwards)
    ctx.mem(sys.name, "held_1_adapter", held)
    ctx.mem(sys.name, "peak_1_adapter", held + peak)
    keep(ctx, "1 adapter", sys, out, with_te=True)


def step_scale(ctx: Ctx, sys: System) -> None:
    scale = 0.5 if ctx.rep % 2 == 0 else 0.8
    out = ctx.rec.time("scale", sys.name, lambda: sys.forward(scale))
    keep(ctx, "call-time scale", sys, out)
    ctx.rec.time("scale_back", sys.name, lambda: sys.forward())


def step_load_kohya(ctx: Ctx, sys: System) -> None:
    load(ctx, sys, "load_kohya", ctx.files.kohya, "k")


def step_load_third(ctx: Ctx, sys: System) -> None:
    load(ctx, sys, "load_third", ctx.files.peft[1], "b")


def step_load_fourth(ctx: Ctx, sys: System) -> None:
    load(ctx, sys, "load_fourth", ctx.files.peft[2], "c")
    if "d" in ctx.four:  # the kohya adapter is missing on one side: a PEFT-format stand-in keeps the mix comparable
        load(ctx, sys, None, ctx.files.peft[3], "d")


def after_load_kohya(ctx: Ctx, systems: list[System]) -> None:
    """Use the kohya adapter in the 4-adapter mix only if both systems loaded it."""
    if all("k" in loaded_adapters(sys) for sys in systems):
        ctx.four = ["a", "k", "b", "c"]
    else:
        ctx.four = ["a", "d", "b", "c"]
        ctx.notes["4-adapter mix"] = "the kohya file did not load in both systems: adapter d (PEFT file) stands in"


def set_adapters_and_forward(ctx: Ctx, sys: System, names: list[str], weights: list[float], key: str) -> None:
    n = len(names)
    shift = ctx.rep % n
    weights = weights[shift:] + weights[:shift]
    call_ms, _ = ctx.clock.measure(lambda: sys.pipe.set_adapters(names, weights))
    ctx.rec.add(f"set_adapters_{n}", sys.name, call_ms)
    first_ms, _ = ctx.clock.measure(lambda: sys.forward())
    held = held_now(ctx, sys)
    out, peak, plain = timed_forwards(ctx, sys, f"forward_{n}", ctx.forwards)
    ctx.rec.add(f"set_adapters_{n}_first", sys.name, call_ms + first_ms - statistics.median(plain))
    if n == 4:
        ctx.mem(sys.name, "held_4_adapters", held)
        ctx.mem(sys.name, "peak_4_adapters", held + peak)
    keep(ctx, key, sys, out, with_te=True)


def step_set_adapters_2(ctx: Ctx, sys: System) -> None:
    ctx.rec.at("set_adapters_2")
    set_adapters_and_forward(ctx, sys, ["a", "b"], [0.7, 0.8], "2 adapters, weighted")


def step_set_adapters_4(ctx: Ctx, sys: System) -> None:
    ctx.rec.at("set_adapters_4")
    set_adapters_and_forward(ctx, sys, list(ctx.four), [0.5, 0.6, 0.7, 0.8], "4 adapters, weighted")


def step_switch_loaded(ctx: Ctx, sys: System) -> None:
    """Switching among adapters loaded earlier (a server's or a UI's common case): each call changes the set and the
    weights; timed as the call plus its first forward, minus a plain forward right after."""
    sets = [(["a", "b"], [0.7, 0.8]), (list(ctx.four), [0.5, 0.6, 0.7, 0.8]), (["b", "c"], [0.6, 0.9])]
    for names, weights in sets:  # each set once, so that both systems have seen it
        sys.pipe.set_adapters(names, weights)
        sys.forward()
    for names, weights in sets:
        weights = [w * (0.9 + 0.05 * ctx.rep) for w in weights]
        call_ms, _ = ctx.clock.measure(lambda: sys.pipe.set_adapters(names, weights))
        first_ms, _ = ctx.clock.measure(lambda: sys.forward())
        plain_ms, _ = ctx.clock.measure(lambda: sys.forward())
        ctx.rec.add("switch_loaded", sys.name, call_ms + first_ms - plain_ms)


def step_fuse(ctx: Ctx, sys: System) -> None:
    sys.pipe.set_adapters(["a", "b"], [0.7, 0.8])
    ctx.rec.time("fuse", sys.name, lambda: sys.pipe.fuse_lora(adapter_names=["a", "b"], lora_scale=1.0))
    out, _, _ = timed_forwards(ctx, sys, "forward_fused", ctx.forwards)
    keep(ctx, "2 adapters fused", sys, out, with_te=True)


def step_unfuse(ctx: Ctx, sys: System) -> None:
    ctx.rec.time("unfuse", sys.name, lambda: sys.pipe.unfuse_lora())
    if sys.name == "lorakit":  # its live adapters are merged too: look at the base through disable_lora
        sys.pipe.disable_lora()
        check_restore(ctx, sys, "after unfuse")
        sys.pipe.enable_lora()
    else:
        check_restore(ctx, sys, "after unfuse")
        reset_base(ctx, sys)


def step_delete(ctx: Ctx, sys: System) -> None:
    ctx.rec.time("delete_1", sys.name, lambda: sys.pipe.delete_adapters("c"))


def step_unload(ctx: Ctx, sys: System) -> None:
    ctx.rec.time("unload", sys.name, lambda: sys.pipe.unload_lora_weights())
    check_restore(ctx, sys, "after unload")
    if sys.name == "peft":
        reset_base(ctx, sys)


def loaded_adapters(sys: System) -> set[str]:
    try:
        return {a for names in sys.pipe.get_list_adapters().values() for a in names}
    except Exception:  # a pipeline in a broken state holds nothing usable
        return set()


def adapter_components(sys: System, name: str) -> list[str]:
    if sys.name == "lorakit":
        adapter = sys.pipe._lorakit_manager.adapters.get(name)
        return sorted(adapter.components) if adapter else []
    names = (sys.spec.denoiser, *sys.spec.text_encoders)
    return [n for n in names if name in (getattr(getattr(sys.pipe, n), "peft_config", None) or {})]


def step_hotswap(ctx: Ctx, sys: System) -> None:
    files, rank = ctx.files, ctx.args.rank
    ensure_clean(ctx, sys)
    sys.pipe.enable_lora_hotswap(target_rank=rank)
    lorakit_side = sys.name == "lorakit"
    first = files.peft[2] if lorakit_side else files.denoiser_only[3]
    second = files.peft[3] if lorakit_side else files.denoiser_only[4]
    load(ctx, sys, None, first, "hs")
    load(ctx, sys, "hotswap", second, "hs", hotswap=True)
    ctx.notes.setdefault(f"hotswap_{sys.name}", f"swapped {Path(second).name} into {adapter_components(sys, 'hs')}")
    keep(ctx, "after hotswap", sys, sys.forward())
    load(ctx, sys, "hotswap_denoiser", files.denoiser_only[3], "hs", hotswap=True)
    keep(ctx, "after hotswap, denoiser-only", sys, sys.forward())
    # From tensors already on the device (a server keeps its LoRAs in memory): the engine's own cost, no file read.
    resident = load_file(str(files.denoiser_only[4]), device=str(next(sys.denoiser.parameters()).device))
    given = dict(resident)  # diffusers empties the dict it is given
    ctx.rec.time("hotswap_dict", sys.name, lambda: sys.pipe.load_lora_weights(given, adapter_name="hs", hotswap=True))
    keep(ctx, "after hotswap from a state dict", sys, sys.forward())
    if not lorakit_side and ctx.spec.text_encoders and "hotswap_peft_full_file" not in ctx.notes:
        try:  # what diffusers does with a file that also holds text encoders (may leave the denoiser swapped)
            load(ctx, sys, None, files.peft[3], "hs", hotswap=True)
            ctx.notes["hotswap_peft_full_file"] = "accepted"
        except Exception as exc:  # the refusal is the finding
            ctx.notes["hotswap_peft_full_file"] = f"refused: {type(exc).__name__}: {str(exc)[:200]}"
    ensure_clean(ctx, sys)


@dataclass(frozen=True)
class Step:
    name: str
    ops: tuple[str, ...]
    run: Callable[[Ctx, System], None]
    needs: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    after: Callable[[Ctx, list[System]], None] | None = None  # once both systems ran the step


STEPS = (
    Step("forward_base", ("forward_base",), step_forward_base, checks=("base (no adapters)",)),
    Step("load_peft", ("load_peft",), step_load_peft),
    Step("forward_1", ("forward_1",), step_forward_1, ("load_peft",), ("1 adapter",)),
    Step("scale", ("scale", "scale_back"), step_scale, ("load_peft",), ("call-time scale",)),
    Step("load_kohya", ("load_kohya",), step_load_kohya, ("load_peft",), after=after_load_kohya),
    Step("load_third", ("load_third",), step_load_third, ("load_kohya",)),
    Step("load_fourth", ("load_fourth",), step_load_fourth, ("load_third",)),
    Step("set_adapters_2", ("set_adapters_2", "set_adapters_2_first", "forward_2"), step_set_adapters_2,
         ("load_third",), ("2 adapters, weighted",)),
    Step("set_adapters_4", ("set_adapters_4", "set_adapters_4_first", "forward_4"), step_set_adapters_4,
         ("load_fourth",), ("4 adapters, weighted",)),
    Step("switch_loaded", ("switch_loaded",), step_switch_loaded, ("load_fourth",)),
    Step("fuse", ("fuse", "forward_fused"), step_fuse, ("load_third",), ("2 adapters fused",)),
    Step("unfuse", ("unfuse",), step_unfuse, ("fuse",)),
    Step("delete_1", ("delete_1",), step_delete, ("load_fourth",)),
    Step("unload", ("unload",), step_unload, ("load_peft",)),
    Step("hotswap", ("hotswap", "hotswap_denoiser", "hotswap_dict"), step_hotswap, (),
         ("after hotswap", "after hotswap, denoiser-only", "after hotswap from a state dict")),
)
ALL_OPS = tuple(op for step in STEPS for op in step.ops)


def select_steps(ops: str | None) -> list[Step]:
    """The steps that produce the requested ops, plus every step they need, in the fixed order."""
    if not ops:
        return list(STEPS)
    wanted = [o.strip() for o in ops.split(",") if o.strip()]
    unknown = [o for o in wanted if o not in ALL_OPS]
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {unknown}; choose from {', '.join(ALL_OPS)}")
    by_name = {s.name: s for s in STEPS}
    chosen = {s.name for s in STEPS if set(s.ops) & set(wanted)}
    pending = list(chosen)
    while pending:
        for need in by_name[pending.pop()].needs:
            if need not in chosen:
                chosen.add(need)
                pending.append(need)
    return [s for s in STEPS if s.name in chosen]


# ------------------------------------------------------------------------------------------------------ the runner
def run_step(ctx: Ctx, step: Step, sys: System) -> None:
    ctx.rec.at(step.ops[0])
    sys.step_start = ctx.clock.allocated()
    try:
        with torch.no_grad():
            step.run(ctx, sys)
    except Exception as exc:  # one failing op is reported, not fatal
        ctx.rec.fail(sys.name, exc)
        if ctx.args.verbose:
            traceback.print_exc()
    finally:
        sys.held += ctx.clock.allocated() - sys.step_start


def run_repeats(ctx: Ctx, systems: list[System], steps: list[Step]) -> None:
    total = ctx.args.warmup + ctx.args.repeats
    t0 = time.perf_counter()
    for rep in range(total):
        ctx.rep, ctx.rec.measuring = rep, rep >= ctx.args.warmup
        for sys in systems:
            sys.held = 0
        for step in steps:
            ctx.outputs.clear()
            for sys in systems:
                run_step(ctx, step, sys)
            for key in step.checks:
                compare(ctx, key)
            if step.after is not None:
                step.after(ctx, systems)
        for sys in systems:
            ctx.rec.at("cleanup")
            try:
                ensure_clean(ctx, sys)
            except Exception as exc:
                ctx.rec.fail(sys.name, exc)
        kind = "warm-up" if rep < ctx.args.warmup else "measured"
        log(f"repeat {rep + 1}/{total} ({kind}) done, {time.perf_counter() - t0:.0f} s")


# ------------------------------------------------------------------------------------------------------ compile
def is_recompile(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return "recompil" in text


def without_recompile(fn: Callable[[], T]) -> tuple[bool, T | None, str]:
    """Run ``fn`` with dynamo's error_on_recompile; (recompiled, result, message)."""
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            return False, fn(), ""
    except Exception as exc:
        if is_recompile(exc):
            return True, None, f"{type(exc).__name__}: {str(exc)[:300]}"
        raise


def keep_compiled(ctx: Ctx, sys: System, key: str, out: torch.Tensor, scale: float | None = None) -> None:
    """Keep a compiled output for the cross-system check, and compare it with the same system's eager forward."""
    ctx.outputs.setdefault(key, {})[sys.name] = (out, [])
    eager = sys.denoiser(**sys.inputs, **sys.call_kwargs(scale), return_dict=False)[0]
    ctx.compile_info.setdefault(sys.name, {})[f"compiled vs eager max abs diff: {key}"] = max_diff(out, eager)


def compiled_step(ctx: Ctx, sys: System, op: str, change: Callable[[], Any] | None, scale: float | None,
                  key: str) -> None:
    """Time a state change (if any) and the forward after it on the compiled denoiser, watching for a recompile."""
    def body() -> torch.Tensor:
        if change is not None:
            ctx.rec.time(op, sys.name, change)
        return ctx.rec.time(f"{op}_forward" if change is not None else op, sys.name, lambda: sys.forward(scale))

    recompiled, out, message = without_recompile(body)
    info = ctx.compile_info.setdefault(sys.name, {})
    info[f"{op}: recompiled"] = recompiled
    if recompiled:
        info[f"{op}: recompile message"] = message
        if ctx.args.compile_recompile == "compile":
            out = ctx.rec.time(f"{op}_recompile", sys.name, lambda: sys.forward(scale))
        else:  # keep the segment short and every later check relative to the first graph
            with torch.compiler.set_stance("eager_on_recompile"):
                out = sys.forward(scale)
            info[f"{op}: forward"] = "ran eagerly instead of recompiling (--compile-recompile eager)"
    keep_compiled(ctx, sys, key, out, scale)


def set_adapters_compiled(ctx: Ctx, sys: System) -> Callable[[], Any]:
    """The set_adapters call to time on a compiled pipeline.

    diffusers' pipeline-level set_adapters skips a denoiser that the pipeline holds as a torch.compile wrapper (it is
    not a ModelMixin): the call returns and nothing changes. That is detected and noted here, and PEFT is then timed
    through the eager model's own set_adapters, which does change the scale. lorakit is timed through the pipeline.
    """
    if sys.name == "lorakit":
        return lambda: sys.pipe.set_adapters(["hs"], [0.5])
    before = sys.denoiser(**sys.inputs, **sys.call_kwargs(None), return_dict=False)[0]
    sys.pipe.set_adapters(["hs"], [0.25])
    after = sys.denoiser(**sys.inputs, **sys.call_kwargs(None), return_dict=False)[0]
    ctx.notes["diffusers pipe.set_adapters with a compiled denoiser"] = (
        "changed the output" if not torch.equal(before, after) else
        "silently did nothing (timed the eager model's set_adapters instead)")
    return lambda: sys.denoiser.set_adapters(["hs"], [0.5])


def compile_system(ctx: Ctx, sys: System) -> None:
    """The diffusers hotswap recipe: enable_lora_hotswap, load, torch.compile(fullgraph=True), then change state."""
    files, den = ctx.files, ctx.spec.denoiser
    ensure_clean(ctx, sys)
    torch._dynamo.reset()
    sys.pipe.enable_lora_hotswap(target_rank=ctx.args.rank)
    load(ctx, sys, None, files.peft[2], "hs")
    eager = sys.denoiser
    # lorakit's own wrapper (it also serves call-time scales) where this lorakit has one; PEFT: torch.compile
    compile_fn = getattr(lorakit, "compile", torch.compile) if sys.name == "lorakit" else torch.compile
    ctx.compile_info.setdefault(sys.name, {})["compiled with"] = f"{compile_fn.__module__}.{compile_fn.__name__}"
    compiled = compile_fn(eager, fullgraph=True, mode=ctx.args.compile_mode)
    if sys.name == "peft":  # the recipe: the pipeline holds the compiled model, diffusers hotswaps into it
        setattr(sys.pipe, den, compiled)
    sys.runner = compiled
    swap = files.peft[3] if sys.name == "lorakit" else files.denoiser_only[4]
    try:
        ctx.rec.time("compile_first_call", sys.name, sys.forward)
        out, _, _ = timed_forwards(ctx, sys, "compile_forward", max(3, ctx.forwards))
        keep_compiled(ctx, sys, "compiled, 1 adapter", out)
        compiled_step(ctx, sys, "compile_hotswap",
                      lambda: sys.pipe.load_lora_weights(str(swap), adapter_name="hs", hotswap=True), None,
                      "compiled, after hotswap")
        compiled_step(ctx, sys, "compile_scale_forward", None, 0.5, "compiled, call-time scale 0.5")
        compiled_step(ctx, sys, "compile_set_adapters", set_adapters_compiled(ctx, sys), None,
                      "compiled, after set_adapters 0.5")
    finally:
        sys.runner = None
        if sys.name == "peft":
            setattr(sys.pipe, den, eager)
        ensure_clean(ctx, sys)
        torch._dynamo.reset()


def run_compile(ctx: Ctx, systems: list[System]) -> None:
    ctx.rec.measuring = True
    ctx.outputs.clear()
    for sys in systems:
        t0 = time.perf_counter()
        ctx.rec.at("compile_first_call")
        try:
            with torch.no_grad():
                compile_system(ctx, sys)
        except Exception as exc:
            ctx.rec.fail(sys.name, exc)
            if ctx.args.verbose:
                traceback.print_exc()
        log(f"compile segment, {sys.name}: {time.perf_counter() - t0:.0f} s")
    for key in list(ctx.outputs):
        compare(ctx, key)


# ------------------------------------------------------------------------------------------------------ reporting
def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


REFERENCE = "@reference"  # suffix of the ops that time the untouched denoiser


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def op_summary(ctx: Ctx) -> dict[str, dict[str, Any]]:
    overall = {s: median(ctx.rec.ops["forward_base"].samples[s]) if "forward_base" in ctx.rec.ops else None
               for s in SYSTEMS}
    out: dict[str, dict[str, Any]] = {}
    order = [op for op in LABELS if op in ctx.rec.ops] + [op for op in ctx.rec.ops if op not in LABELS
                                                           and not op.endswith(REFERENCE)]
    for op in order:
        result = ctx.rec.ops[op]
        if not any(result.samples.values()) and not result.errors:
            continue
        ref = ctx.rec.ops.get(f"{op}{REFERENCE}")
        base = {s: median(ref.samples[s]) for s in SYSTEMS} if ref is not None else overall
        peft, ours = median(result.samples["peft"]), median(result.samples["lorakit"])
        out[op] = {"label": LABELS.get(op, op), "peft_ms": peft, "lorakit_ms": ours,
                   "speedup_peft_over_lorakit": ratio(peft, ours), "lorakit_over_peft": ratio(ours, peft),
                   "peft_vs_base": ratio(peft, base["peft"]), "lorakit_vs_base": ratio(ours, base["lorakit"]),
                   "samples_ms": result.samples, "errors": result.errors, "error_count": result.error_count,
                   "base_ms": base, "base": "untouched copy, timed right after" if ref is not None else "forward_base",
                   "note": NOTES.get(op, "")}
    return out


def memory_summary(ctx: Ctx) -> dict[str, dict[str, float | None]]:
    return {s: {f"{k}_mb": (median(v) or 0) / 2**20 for k, v in keys.items()} for s, keys in ctx.memory.items()}


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}{unit}"
    if abs(value) >= 10:
        return f"{value:.1f}{unit}"
    return f"{value:.2f}{unit}" if abs(value) >= 1 else f"{value:.3f}{unit}"


def op_table(ops: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| op | PEFT ms | lorakit ms | speed-up (PEFT/lorakit) | PEFT x base fwd | lorakit x base fwd | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in ops.values():
        notes = [r["note"]] if r["note"] else []
        notes += [f"{s} ERROR ({r['error_count'][s]}x): {' '.join(e.split())[:160]}" for s, e in r["errors"].items()]
        lines.append(f"| {r['label']} | {fmt(r['peft_ms'])} | {fmt(r['lorakit_ms'])} | "
                     f"{fmt(r['speedup_peft_over_lorakit'], 'x')} | {fmt(r['peft_vs_base'], 'x')} | "
                     f"{fmt(r['lorakit_vs_base'], 'x')} | {'; '.join(notes).replace('|', '/')} |")
    return lines


def g3(value: Any) -> str:
    return "-" if value is None else format(value, ".3g") if isinstance(value, float) else str(value)


def check_table(result: dict[str, Any]) -> list[str]:
    lines = ["| check: lorakit vs PEFT outputs | max abs diff, denoiser | text encoders | LoRA effect (PEFT vs base) |",
             "|---|---|---|---|"]
    for key, d in result["checks"].items():
        flag = " (non-finite outputs!)" if d["non_finite"] else ""
        lines.append(f"| {key} | {g3(d['denoiser'])}{flag} | {g3(d['text_encoders'])} | {g3(d['lora_effect'])} |")
    lines += ["", "| restore check vs saved base weights | PEFT exact | PEFT max abs diff | lorakit exact | "
              "lorakit max abs diff |", "|---|---|---|---|---|"]
    for key, per in result["restore"].items():
        p, o = per.get("peft", {}), per.get("lorakit", {})
        lines.append(f"| {key} | {g3(p.get('exact'))} | {g3(p.get('max_abs_diff'))} | {g3(o.get('exact'))} | "
                     f"{g3(o.get('max_abs_diff'))} |")
    return lines


def memory_table(memory: dict[str, dict[str, float | None]]) -> list[str]:
    if not memory:
        return []
    keys = sorted({k for v in memory.values() for k in v})
    lines = ["| CUDA memory (MiB) | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for system, values in memory.items():
        lines.append(f"| {system} | " + " | ".join(fmt(values.get(k)) for k in keys) + " |")
    lines.append("(held = allocated since the clean state; peak = held + activations of the forward)")
    return lines


def report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"## diffusers+PEFT vs lorakit: {meta.get('model')} on {meta.get('device_name')}",
             "", "```", *(f"{k}: {v}" for k, v in meta.items() if k not in ("argv",)), "```", ""]
    lines += op_table(result["ops"])
    if any(r.get("base") != "forward_base" for r in result["ops"].values() if r.get("peft_vs_base") is not None):
        lines += ["(x base fwd of forward ops: against an untouched copy of the denoiser timed right after them)"]
    lines += [""] + check_table(result) + [""]
    lines += memory_table(result["memory"])
    if result["notes"]:
        lines += ["", "Notes:"] + [f"- {k}: {v}" for k, v in result["notes"].items()]
    if result.get("gc_pauses"):
        lines += ["", "Python garbage collection inside timed samples (ms per sample, in the samples' order):"]
        lines += [f"- {op}, {system}: {' '.join(f'{ms:.0f}' for ms in v)}"
                  for op, by in result["gc_pauses"].items() for system, v in by.items()]
    for system, info in (result.get("compile") or {}).items():
        lines += ["", f"torch.compile, {system}:"] + [f"- {k}: {' '.join(str(v).split())[:300]}"
                                                      for k, v in info.items()]
    if result.get("error"):
        lines += ["", "RUN FAILED:", result["error"]]
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------------ setup & main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(SPECS), default=None, help="default: sdxl on CUDA, sd15 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: fp16 (SD) / bf16 (Flux) on CUDA, fp32 on CPU")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None, help="measured repeats (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up repeats (not measured)")
    p.add_argument("--forwards", type=int, default=None, help="forwards per forward op and repeat (3 CUDA, 1 CPU)")
    p.add_argument("--latent", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--text-tokens", type=int, default=None)
    p.add_argument("--ops", default=None, help=f"comma-separated subset of: {', '.join(ALL_OPS)}")
    p.add_argument("--quick", action="store_true", help="tiny models, 2 repeats: a smoke run")
    p.add_argument("--compile", action="store_true", help="also time torch.compile and check recompiles (slow)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: the default mode)")
    p.add_argument("--compile-recompile", choices=("eager", "compile"), default="eager",
                   help="after a detected recompile, run that forward eagerly (default: saves minutes) or recompile")
    p.add_argument("--json", default=None, help="where to write the results (default $OUT/bench.json if $OUT set)")
    p.add_argument("--lorakit-mode", default="auto", choices=("auto", "merge", "branch"),
                   help="lorakit.attach(mode=...): auto = merge on accelerators, branch on CPU")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 avoids stalls on a CPU shared with other jobs")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing ops")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                   help="time an untouched copy of the denoiser after each forward op and report 'x base' against "
                        "it (default: on for CUDA; the GPU drifts between steps)")
    args = p.parse_args(argv)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    args.device = args.device or ("cuda" if cuda else "cpu")
    args.model = args.model or ("sdxl" if cuda and not args.quick else "sd15")
    if args.repeats is None:
        args.repeats = 2 if args.quick else (5 if cuda else 3)
    if args.forwards is None:
        args.forwards = 3 if cuda or args.quick else 1
    if args.reference is None:
        args.reference = cuda
    if args.json is None and os.environ.get("OUT"):
        args.json = str(Path(os.environ["OUT"]) / "bench.json")
    return args


def model_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype:
        return DTYPES[args.dtype]
    return DEFAULT_DTYPES[args.model] if args.device.startswith("cuda") else torch.float32


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "lorakit": lorakit.__version__}
    for name in ("peft", "transformers", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # reported, not fatal
            out[name] = "missing"
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def num_params(pipe: Any, spec: ModelSpec) -> dict[str, float]:
    names = (spec.denoiser, *spec.text_encoders)
    return {n: round(sum(p.numel() for p in getattr(pipe, n).parameters()) / 1e9, 3) for n in names}


@torch.no_grad()
def identical(a: Any, b: Any, spec: ModelSpec) -> bool:
    for name in (spec.denoiser, *spec.text_encoders):
        for (_, x), (_, y) in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().items()):
            if not torch.equal(x, y):
                return False
    return True


@contextlib.contextmanager
def quiet(threads: int | None) -> Iterator[None]:
    """Silence library warnings, logs and progress bars (and set torch's CPU threads) for the run; restore after."""
    import transformers

    libs = (diffusers.utils.logging, transformers.utils.logging)
    levels = [lib.get_verbosity() for lib in libs]
    saved_threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lib in libs:
                lib.set_verbosity_error()
                lib.disable_progress_bar()
            if threads:
                torch.set_num_threads(threads)
            yield
    finally:
        for lib, level in zip(libs, levels):
            lib.set_verbosity(level)
            lib.enable_progress_bar()
        torch.set_num_threads(saved_threads)


def attach_lorakit(pipe: Any, mode: str) -> Any:
    """``lorakit.attach(pipe, mode=mode)``, for lorakit versions with and without modes."""
    if "mode" in inspect.signature(lorakit.attach).parameters:
        return lorakit.attach(pipe, mode=mode)
    if mode != "auto":
        raise SystemExit(f"--lorakit-mode {mode}: this lorakit has no modes")
    return lorakit.attach(pipe)


def resolved_mode(state: Any) -> str:
    resolve = getattr(state, "resolved_mode", None)
    return resolve() if callable(resolve) else str(getattr(state, "mode", "merge"))


class Bench:
    """One benchmark run: builds everything, runs the repeats, and always yields a result dict."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.perf_counter()
        self.ctx: Ctx | None = None
        self.meta: dict[str, Any] = {"argv": sys.argv[1:], "model": args.model, "quick": args.quick,
                                     "device": args.device, "rank": args.rank, "repeats": args.repeats,
                                     "warmup": args.warmup, "forwards_per_op": args.forwards,
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), **versions()}

    def setup(self, folder: Path) -> list[System]:
        args, spec = self.args, SPECS[self.args.model]
        device, dtype = torch.device(args.device), model_dtype(args)
        if spec.name == "flux" and device.type != "cuda" and not args.quick:
            raise SystemExit("--model flux is GPU-only at full size; use --quick for the tiny Flux on CPU")
        sizes = default_sizes(spec.name, args.quick, device.type == "cuda")
        sizes = Sizes(args.latent or sizes.latent, args.batch or sizes.batch, args.text_tokens or sizes.text_tokens)
        self.meta.update(device_name=device_name(device), dtype=str(dtype).replace("torch.", ""),
                         sizes=dataclasses.asdict(sizes))
        t = time.perf_counter()
        pipes = {name: build_pipeline(spec, args.quick, device, dtype) for name in SYSTEMS}
        self.meta.update(params_billion=num_params(pipes["peft"], spec), pipeline=type(pipes["peft"]).__name__,
                         identical_weights=identical(pipes["peft"], pipes["lorakit"], spec),
                         build_s=round(time.perf_counter() - t, 1))
        log(f"built 2 x {self.meta['pipeline']} {self.meta['params_billion']} B params in {self.meta['build_s']} s")
        t = time.perf_counter()
        files = write_loras(pipes["lorakit"], spec, args.rank, dtype, folder)
        self.meta.update(lora_layers=files.layers, lora_tensors=files.tensors, lora_file_mb=round(files.size_mb, 1),
                         lora_files_s=round(time.perf_counter() - t, 1),
                         kohya_format=spec.kohya_format + " (.alpha = rank/2)",
                         page_cache="every LoRA file is read from the page cache after its first read")
        log(f"wrote LoRA files: {files.layers} layers, {files.size_mb:.0f} MB each, in {self.meta['lora_files_s']} s")
        base = {c: {p: getattr(pipes["lorakit"], c).get_submodule(p).weight.detach().clone() for p in paths}
                for c, paths in files.targets.items()}
        manager = attach_lorakit(pipes["lorakit"], args.lorakit_mode)
        self.meta["lorakit_mode"] = {n: resolved_mode(st) for n, st in getattr(manager, "states", {}).items()}
        den = getattr(pipes["peft"], spec.denoiser)
        inputs = denoiser_inputs(den, sizes, device, dtype)
        ids = {te: text_ids(getattr(pipes["peft"], te), device) for te in spec.text_encoders}
        clock = Clock(device)
        self.ctx = Ctx(args, spec, clock, Recorder(clock), files, base, args.forwards)
        if args.reference:  # a third copy of the denoiser, never given a LoRA
            untouched = getattr(build_pipeline(spec, args.quick, device, dtype), spec.denoiser)
            kwargs = {**inputs, spec.call_kwarg: None, "return_dict": False}
            self.ctx.reference = lambda: untouched(**kwargs)[0]
        return [System(name, pipes[name], spec, inputs, ids) for name in SYSTEMS]

    def run(self) -> None:
        with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
            systems = self.setup(Path(tmp))
            run_repeats(self.ctx, systems, select_steps(self.args.ops))
            if self.args.compile:
                run_compile(self.ctx, systems)

    def result(self, error: str | None) -> dict[str, Any]:
        ctx = self.ctx
        self.meta["wall_s"] = round(time.perf_counter() - self.t0, 1)
        out: dict[str, Any] = {"meta": self.meta, "ops": {}, "checks": {}, "restore": {}, "memory": {}, "notes": {},
                               "compile": {}, "gc_pauses": {}, "error": error}
        if ctx is not None:
            out.update(ops=op_summary(ctx), checks=ctx.diffs, restore=ctx.restore, memory=memory_summary(ctx),
                       notes=ctx.notes, compile=ctx.compile_info,
                       gc_pauses={op: by for op, by in ctx.rec.gc_ms.items()
                                  if any(ms >= 1 for v in by.values() for ms in v)})
            ctx.rec.close()
        failed_ops = [op for op, r in out["ops"].items() if r["errors"]]
        out["status"] = "failed" if error else ("partial" if failed_ops else "ok")
        out["failed_ops"] = failed_ops
        return json_safe(out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the report; write the JSON (also on failure); return the result dict."""
    args = parse_args(argv)
    bench = Bench(args)
    error = None
    with quiet(args.threads):
        try:
            bench.run()
        except (Exception, KeyboardInterrupt, SystemExit) as exc:  # the JSON is written whatever happened
            error = "".join(traceback.format_exception(exc))
        result = bench.result(error)
    print(report(result), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        log(f"wrote {path}")
    log(f"total {result['meta']['wall_s']} s, status {result['status']}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["status"] == "failed" else 0)
