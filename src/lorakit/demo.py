"""The ``lorakit demo`` workflows as plain functions that return step records (the CLI only renders them).

Two plans:

* :func:`default_plan` runs the whole diffusers LoRA API on an embedded tiny SD1.5 pipeline with synthetic LoRA files
  in four formats, and checks bit-exactness wherever lorakit promises it (unfuse, disable, unload, save/reload).
* :func:`model_plan` loads a real pipeline (local folder or hub id), applies ``--lora`` files and renders a prompt.

Example:
    >>> records = run_default_demo()                 # doctest: +SKIP
    >>> all(r.check is not False for r in records)   # doctest: +SKIP
    True
"""

from __future__ import annotations

import inspect
import json
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import LoraError

DEFAULT_PROMPT = "a watercolor painting of a lighthouse at dawn"
DEFAULT_SIZE = 32  # the tiny pipeline's UNet works on 1/2-size latents: 32 px keeps each run well under a second
DEFAULT_STEPS = 2


class ModelLoadError(LoraError):
    """A ``--model`` pipeline could not be loaded (missing folder, unknown or uncached hub id, offline)."""


@dataclass
class StepRecord:
    """One step of a demo: what changed, how long the change and the pipeline run took, and its check if any.

    ``check`` is True/False for a bit-exactness (or detection) check, None for steps that only do something.
    """

    name: str
    ms: float = 0.0
    run_ms: float | None = None
    check: bool | None = None
    detail: str = ""


@dataclass
class DemoContext:
    """Mutable state shared by the steps of one plan."""

    prompt: str = DEFAULT_PROMPT
    steps: int = DEFAULT_STEPS
    seed: int = 0
    size: int | None = DEFAULT_SIZE
    folder: Path = field(default_factory=Path)  # where the default demo writes its files
    pipe: Any = None
    manager: Any = None
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    snapshot: dict[str, torch.Tensor] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    last: np.ndarray | None = None
    run_ms: float = 0.0  # pipeline time spent in the current step (run_plan keeps it apart from the change)
    on_denoise: Callable[[int, int], None] | None = None
    # model mode
    model: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    output: Path | None = None
    device: str | None = None


# A step changes the pipeline (and may render) and returns (check or None, detail).
StepFn = Callable[[DemoContext], tuple[bool | None, str]]
Plan = list[tuple[str, StepFn]]


# ------------------------------------------------------------------------------------------------ helpers
def lora_components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The components whose weights LoRA changes (the ones the exactness checks compare)."""
    return {n: m for n in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
            if isinstance(m := getattr(pipe, n, None), torch.nn.Module)}


def snapshot_weights(pipe: Any) -> dict[str, torch.Tensor]:
    """An exact copy of every parameter of the LoRA-capable components."""
    return {f"{c}.{n}": p.detach().clone() for c, m in lora_components(pipe).items() for n, p in m.named_parameters()}


def compare_weights(pipe: Any, reference: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """(every parameter bit-identical to ``reference``?, a short account)."""
    now = {f"{c}.{n}": p for c, m in lora_components(pipe).items() for n, p in m.named_parameters()}
    differ = [k for k, ref in reference.items() if not torch.equal(now[k], ref)]
    if not differ:
        return True, f"{len(reference)} tensors bit-identical"
    return False, f"{len(differ)}/{len(reference)} tensors differ, e.g. {differ[0]}"


def run_pipeline(ctx: DemoContext, **call_kwargs: Any) -> np.ndarray:
    """Render ``ctx.prompt`` with a fixed seed into ``ctx.last`` (a float HxWx3 array in [0, 1]) and return it."""
    pipe = ctx.pipe
    kwargs: dict[str, Any] = dict(num_inference_steps=ctx.steps, output_type="np",
                                  generator=torch.Generator("cpu").manual_seed(ctx.seed), **call_kwargs)
    if ctx.size:
        kwargs.update(height=ctx.size, width=ctx.size)
    if ctx.on_denoise is not None and "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        report = ctx.on_denoise

        def callback(_pipe: Any, i: int, _t: Any, tensors: dict) -> dict:
            report(i + 1, ctx.steps)
            return tensors
        kwargs["callback_on_step_end"] = callback
    start = time.perf_counter()
    ctx.last = np.asarray(pipe(ctx.prompt, **kwargs).images[0], dtype=np.float32)
    ctx.run_ms += (time.perf_counter() - start) * 1e3
    return ctx.last


def image_change(a: np.ndarray | None, b: np.ndarray | None) -> str:
    """Mean absolute pixel change between two renders, for step details."""
    if a is None or b is None:
        return "image Δ n/a"
    return f"image Δ {float(np.abs(a - b).mean()):.4f}"


def render(ctx: DemoContext, detail: str, check: bool | None = None) -> tuple[bool | None, str]:
    """Render after a change and add the image change against the base render to the step's detail."""
    image = run_pipeline(ctx)
    return check, f"{detail}; {image_change(image, ctx.images.get('base'))} vs base"


def run_plan(ctx: DemoContext, plan: Plan, on_step: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
    """Run each step and return its timed record (change time and render time kept apart).

    Example:
        >>> records = run_plan(DemoContext(), default_plan())   # doctest: +SKIP
    """
    records = []
    for name, fn in plan:
        ctx.run_ms = 0.0
        start = time.perf_counter()
        check, detail = fn(ctx)
        total = (time.perf_counter() - start) * 1e3
        record = StepRecord(name, total - ctx.run_ms, ctx.run_ms or None, check, detail)
        records.append(record)
        if on_step is not None:
            on_step(record)
    return records


# ------------------------------------------------------------------------------------------------ default plan
def _build(ctx: DemoContext) -> tuple[bool | None, str]:
    from .testing.models import tiny_sd15_pipeline

    ctx.pipe = tiny_sd15_pipeline(seed=ctx.seed)
    ctx.base = snapshot_weights(ctx.pipe)
    return None, f"tiny SD1.5 (UNet + CLIP text encoder), {len(ctx.base)} LoRA-capable tensors"


def _synthetic_files(pipe: Any, seed: int) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str], str]]:
    """name -> (tensors, metadata, expected format) for the four demo files."""
    from .testing.loras import TRANSFORMER_TARGETS, make_lora, to_state_dict

    unet, te = pipe.unet, pipe.text_encoder

    def both(fmt: str, s: int, alpha: float | None = None, convs: bool = False) -> dict[str, torch.Tensor]:
        sd = to_state_dict(make_lora(unet, rank=4, seed=s, targets=TRANSFORMER_TARGETS, convs=convs, alpha=alpha),
                           fmt, "unet", model=unet)
        sd.update(to_state_dict(make_lora(te, rank=4, seed=s + 100, targets=TRANSFORMER_TARGETS, alpha=alpha),
                                fmt, "text_encoder", model=te))
        return sd

    # diffusers keeps PEFT's lora_alpha in the header: alpha 8 on rank 4 doubles the effect.
    peft_meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8,
                                                      "text_encoder.r": 4, "text_encoder.lora_alpha": 8})}
    kohya_meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"}
    legacy = to_state_dict(make_lora(unet, rank=4, seed=seed + 4), "legacy_processor", None)
    return {
        "peft": (both("peft", seed + 1), peft_meta, "peft"),
        "diffusers": (both("diffusers", seed + 2), {}, "diffusers"),
        "kohya": (both("kohya", seed + 3, alpha=2.0, convs=True), kohya_meta, "kohya"),
        "legacy": (legacy, {}, "diffusers_legacy"),
    }


def _write_files(ctx: DemoContext) -> tuple[bool | None, str]:
    from .inspection import inspect_file
    from .io import save_safetensors

    seen, ok = [], True
    for name, (tensors, meta, expected) in _synthetic_files(ctx.pipe, ctx.seed).items():
        path = save_safetensors(tensors, ctx.folder / f"{name}.safetensors", meta)
        ctx.files[name] = path
        report = inspect_file(path)
        ok &= report.format == expected
        alpha = f"alpha {report.alpha_text()}" if report.alphas else "no alpha"
        seen.append(f"{name}: {report.format}, {alpha}")
    return ok, "inspect_file finds " + "; ".join(seen)


def _attach(ctx: DemoContext) -> tuple[bool | None, str]:
    import lorakit

    ctx.manager = lorakit.attach(ctx.pipe)
    return None, f"diffusers LoRA verbs of {type(ctx.pipe).__name__} served by lorakit"


def _run_base(ctx: DemoContext) -> tuple[bool | None, str]:
    ctx.images["base"] = run_pipeline(ctx)
    return None, f"{ctx.steps} steps at {ctx.size or 'default'} px"


def _loader(name: str) -> StepFn:
    def load(ctx: DemoContext) -> tuple[bool | None, str]:
        ctx.pipe.load_lora_weights(str(ctx.files[name]), adapter_name=name)
        where = {c: len(m) for c, m in ctx.manager.adapters[name].layers.items()}
        return render(ctx, ", ".join(f"{c}: {n} layers" for c, n in where.items()))
    return load


def _mix(ctx: DemoContext) -> tuple[bool | None, str]:
    ctx.pipe.set_adapters(["peft", "kohya"], adapter_weights=[0.7, 0.5])
    return render(ctx, "set_adapters(['peft', 'kohya'], [0.7, 0.5])")


BLOCK_WEIGHTS = {"unet": {"down": 0.8, "mid": 0.5, "up": {"block_1": [0.2, 0.6, 1.0]}}, "text_encoder": 0.6}


def _per_block(ctx: DemoContext) -> tuple[bool | None, str]:
    ctx.pipe.set_adapters(["peft", "diffusers"], adapter_weights=[BLOCK_WEIGHTS, 0.4])
    check, detail = render(ctx, "peft per block (down 0.8, mid 0.5, up.block_1 [0.2, 0.6, 1.0], text 0.6) + "
                                "diffusers 0.4")
    assert ctx.last is not None  # render() just set it
    ctx.images["mix"] = ctx.last
    return check, detail


def _call_scale(ctx: DemoContext) -> tuple[bool | None, str]:
    image = run_pipeline(ctx, cross_attention_kwargs={"scale": 0.5})
    return None, f"cross_attention_kwargs={{'scale': 0.5}}; {image_change(image, ctx.images['mix'])} vs scale 1"


def _scale_back(ctx: DemoContext) -> tuple[bool | None, str]:
    image = run_pipeline(ctx)
    same = bool(np.array_equal(image, ctx.images["mix"]))
    how = "bit-identically" if same else f"differently ({image_change(image, ctx.images['mix'])})"
    return same, f"the next plain call renders the scale-1 image {how}"


def _fuse(ctx: DemoContext) -> tuple[bool | None, str]:
    ctx.snapshot = snapshot_weights(ctx.pipe)
    ctx.pipe.fuse_lora()
    same, _ = compare_weights(ctx.pipe, ctx.snapshot)
    fused = ctx.manager.fused_loras
    return render(ctx, f"fused {fused}; weights {'equal' if same else 'differ from'} the live mix")


def _unfuse(ctx: DemoContext) -> tuple[bool | None, str]:
    ctx.pipe.unfuse_lora()
    ok, detail = compare_weights(ctx.pipe, ctx.snapshot)
    return render(ctx, f"weights as before fuse_lora: {detail}", ok)


def _disable(ctx: DemoContext) -> tuple[bool | None, str]:
    ctx.pipe.disable_lora()
    ok, detail = compare_weights(ctx.pipe, ctx.base)
    return render(ctx, f"base weights: {detail}", ok)


def _enable(ctx: DemoContext) -> tuple[bool | None, str]:
    ctx.pipe.enable_lora()
    ok, detail = compare_weights(ctx.pipe, ctx.snapshot)
    return render(ctx, f"the mix again: {detail}", ok)


def _save_reload(ctx: DemoContext) -> tuple[bool | None, str]:
    from .inspection import inspect_file

    path = ctx.pipe.save_lora_adapter(ctx.folder / "saved", adapter_name="kohya")
    ctx.pipe.load_lora_weights(str(path), adapter_name="kohya_saved")
    ctx.pipe.set_adapters("kohya")
    original = snapshot_weights(ctx.pipe)
    ctx.pipe.set_adapters("kohya_saved")
    ok, detail = compare_weights(ctx.pipe, original)
    report = inspect_file(path)
    return render(ctx, f"kohya saved as {report.format} ({report.num_modules} modules, alpha {report.alpha_text()})"
                       f", reloaded as kohya_saved: same weights as kohya: {detail}", ok)


def _unload(ctx: DemoContext) -> tuple[bool | None, str]:
    ctx.pipe.unload_lora_weights()
    ok, detail = compare_weights(ctx.pipe, ctx.base)
    left = ctx.pipe.get_list_adapters()
    image = run_pipeline(ctx)
    same = bool(np.array_equal(image, ctx.images["base"]))
    return ok and not left and same, (f"base weights: {detail}; adapters left: {left or 'none'}; render "
                                      f"{'bit-identical to' if same else 'DIFFERS from'} the first base render")


def default_plan() -> Plan:
    """The steps of the embedded demo, in order (names are stable: tests look them up)."""
    return [
        ("build tiny SD1.5 pipeline", _build),
        ("write synthetic LoRA files", _write_files),
        ("lorakit.attach(pipe)", _attach),
        ("run base", _run_base),
        ("load peft (unet + text_encoder, metadata alpha)", _loader("peft")),
        ("load diffusers (unet + text_encoder)", _loader("diffusers")),
        ("load kohya (.alpha, LoCon convs)", _loader("kohya")),
        ("load legacy processor (unet)", _loader("legacy")),
        ("set_adapters mix", _mix),
        ("set_adapters per-block", _per_block),
        ("call-time scale 0.5", _call_scale),
        ("call-time scale gone", _scale_back),
        ("fuse_lora", _fuse),
        ("unfuse_lora exact", _unfuse),
        ("disable_lora exact", _disable),
        ("enable_lora exact", _enable),
        ("save_lora_adapter + reload exact", _save_reload),
        ("unload_lora_weights exact", _unload),
    ]


def run_default_demo(*, prompt: str = DEFAULT_PROMPT, steps: int = DEFAULT_STEPS, seed: int = 0,
                     folder: Path | None = None, output: Path | None = None,
                     on_step: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
    """Run the embedded demo end to end; every record with ``check`` set must have it True.

    Example:
        >>> failed = [r.name for r in run_default_demo() if r.check is False]   # doctest: +SKIP
    """
    with tempfile.TemporaryDirectory(prefix="lorakit-demo-") as tmp:
        ctx = DemoContext(prompt=prompt, steps=steps, seed=seed, folder=Path(folder or tmp))
        records = run_plan(ctx, default_plan(), on_step)
    if output is not None and ctx.last is not None:
        save_image(ctx.last, output)
    return records


# ------------------------------------------------------------------------------------------------ model plan
def parse_lora_spec(text: str) -> tuple[str, float]:
    """``FILE[:scale]`` -> (file, scale); a suffix that is not a number stays part of the path (``C:\\x``).

    Example:
        >>> parse_lora_spec("style.safetensors:0.7"), parse_lora_spec("owner/repo")
        (('style.safetensors', 0.7), ('owner/repo', 1.0))
    """
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def adapter_name_for(path: str, taken: set[str]) -> str:
    """A readable, unique adapter name from a file path or repo id."""
    stem = Path(path).stem or "lora"
    base = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "lora"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def load_model_pipeline(model: str, device: str | None = None) -> Any:
    """``DiffusionPipeline.from_pretrained`` with failures (missing, offline, not a pipeline) as ModelLoadError."""
    from diffusers import DiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype to dtype; older ones only know torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except Exception as exc:  # hub, filesystem and config errors come in many types
        local = Path(model).exists()
        hint = ("the folder must hold a diffusers pipeline (model_index.json)" if local else
                "no such local folder, and the hub id could not be fetched or found in the cache (offline?); "
                "download the pipeline first or pass a local folder")
        raise ModelLoadError(f"{model}: could not load a diffusers pipeline ({type(exc).__name__}: "
                             f"{str(exc).strip()[:300]}). {hint.capitalize()}.") from exc
    return pipe.to(device)


def _load_model(ctx: DemoContext) -> tuple[bool | None, str]:
    assert ctx.model is not None
    ctx.pipe = load_model_pipeline(ctx.model, ctx.device)
    ctx.pipe.set_progress_bar_config(disable=True)  # the CLI draws its own progress
    return None, f"{type(ctx.pipe).__name__} on {ctx.pipe.device}"


def _load_spec(path: str, scale: float) -> StepFn:
    def load(ctx: DemoContext) -> tuple[bool | None, str]:
        name = ctx.pipe.load_lora_weights(path, adapter_name=adapter_name_for(path, set(ctx.manager.adapters)))
        ctx.files[name] = Path(path)
        adapter = ctx.manager.adapters[name]
        return None, f"{name}: format {adapter.format}, {adapter.num_modules()} layers, weight {scale:g}"
    return load


def _apply_weights(ctx: DemoContext) -> tuple[bool | None, str]:
    names = list(ctx.files)  # in load order, as ctx.loras
    weights = [scale for _, scale in ctx.loras]
    ctx.pipe.set_adapters(names, adapter_weights=weights)
    return None, ", ".join(f"{n}={w:g}" for n, w in zip(names, weights, strict=True))


def _render(ctx: DemoContext) -> tuple[bool | None, str]:
    image = run_pipeline(ctx)
    if ctx.output is not None:
        save_image(image, ctx.output)
    return None, f"{ctx.steps} steps -> {ctx.output}"


def model_plan(loras: list[tuple[str, float]]) -> Plan:
    """Load a pipeline, attach, load each LoRA, set their weights and render."""
    plan: Plan = [("load pipeline", _load_model), ("lorakit.attach(pipe)", _attach)]
    plan += [(f"load {Path(p).name}", _load_spec(p, s)) for p, s in loras]
    if loras:
        plan.append(("set_adapters weights", _apply_weights))
    plan.append(("render prompt", _render))
    return plan


def run_model_demo(model: str, loras: list[tuple[str, float]], *, prompt: str = DEFAULT_PROMPT, steps: int = 25,
                   seed: int = 0, output: Path = Path("out.png"), device: str | None = None,
                   on_step: Callable[[StepRecord], None] | None = None,
                   on_denoise: Callable[[int, int], None] | None = None) -> list[StepRecord]:
    """Render ``prompt`` with a real pipeline and the given ``(file, scale)`` LoRAs; raises LoraError on bad input.

    Example:
        >>> run_model_demo("./sd15", [("style.safetensors", 0.8)], output=Path("a.png"))  # doctest: +SKIP
    """
    ctx = DemoContext(prompt=prompt, steps=steps, seed=seed, size=None, model=model, loras=list(loras),
                      output=Path(output), device=device, on_denoise=on_denoise)
    return run_plan(ctx, model_plan(ctx.loras), on_step)


def save_image(image: np.ndarray, path: str | Path) -> Path:
    """Write a float [0, 1] HxWx3 array as an image file (PNG, JPEG... by suffix)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return path
