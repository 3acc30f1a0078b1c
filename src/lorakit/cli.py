"""The ``lorakit`` command: ``inspect`` a LoRA file, ``convert`` it between formats, ``merge``/``resize`` LoRA files,
``extract`` a LoRA from two models, run the ``demo``. Parsing and rendering only; the work lives in
:mod:`lorakit.inspection`, :mod:`lorakit.convert`, :mod:`lorakit.merging`, :mod:`lorakit.extraction` and
:mod:`lorakit.demo`.

Exit codes: 0 ok, 1 unexpected error or a failed demo check (a bug: ``LORAKIT_TRACEBACK=1`` shows tracebacks),
2 bad input (any :class:`~lorakit.LoraError`, usage errors).

Example:
    $ lorakit inspect style.safetensors --keys
    $ lorakit convert style.safetensors style_kohya.safetensors --to kohya
    $ lorakit merge a.safetensors b.safetensors --weights 0.7 0.8 --method ties --density 0.5 -o mix.safetensors
    $ lorakit resize big.safetensors --rank 8 -o small.safetensors
    $ lorakit extract tuned/unet base/unet --rank 32 --namespace unet -o extracted.safetensors
    $ lorakit demo
    $ lorakit demo --model ./sd15 --lora style.safetensors:0.8 --prompt "a cat" --output cat.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .errors import LoraError

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT = 0, 1, 2
_META_WIDTH = 100  # metadata values (tag frequencies, bucket info) can be kilobytes long


# ------------------------------------------------------------------------------------------------ parsing
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="lorakit", description="Inspect, merge, resize and extract LoRA files; demo lorakit's engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    ins = sub.add_parser("inspect", help="what a LoRA file holds (header only, no weights read)")
    ins.add_argument("file", help="a .safetensors file, a folder (with --weight-name) or a hub repo id")
    ins.add_argument("--weight-name", help="file inside a folder or hub repo")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    ins.add_argument("--keys", action="store_true", help="list every targeted module")
    ins.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt/.ckpt files (only if trusted)")

    conv = sub.add_parser("convert", help="rewrite a LoRA file as diffusers/PEFT or kohya (factors and alphas as is)")
    conv.add_argument("input", help="a LoRA .safetensors file")
    conv.add_argument("output", help="the .safetensors file to write")
    conv.add_argument("--to", required=True, choices=("diffusers", "kohya"), help="format to write")
    conv.add_argument("--model", help="a diffusers pipeline folder, or sd1/sdxl/flux for the reference architecture "
                                      "(default: guessed from the file)")
    _add_merge_parsers(sub)

    demo = sub.add_parser("demo", help="run the LoRA API end to end (embedded tiny pipeline, or --model)")
    demo.add_argument("--model", help="a diffusers pipeline folder or hub id; default: an embedded tiny SD1.5")
    demo.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                      help="LoRA to apply with --model (repeatable), optional weight after a colon")
    demo.add_argument("--prompt", default=None, help="text prompt")
    demo.add_argument("--steps", type=int, default=None, help="denoising steps (default 2, or 25 with --model)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="device for --model (default: cuda if available)")
    demo.add_argument("--output", type=Path, default=None, help="image to write (default out.png with --model)")
    return parser


def _add_merge_parsers(sub) -> None:
    from .merge import METHODS

    merge = sub.add_parser("merge", help="merge LoRA files into one (PEFT's add_weighted_adapter methods)")
    merge.add_argument("files", nargs="+", help="LoRA .safetensors files, all with the same key style")
    merge.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per file (default 1.0)")
    merge.add_argument("--method", choices=METHODS, default="svd", help="combination type (default svd)")
    merge.add_argument("--density", type=float, default=None, help="fraction kept by ties/dare/magnitude_prune")
    merge.add_argument("--majority-sign", choices=("total", "frequency"), default="total")
    merge.add_argument("--rank", type=int, default=None, help="rank of *_svd results (default: largest input rank)")
    merge.add_argument("--clamp", type=float, default=None, help="quantile to clamp *_svd factors to")
    merge.add_argument("--seed", type=int, default=None, help="seed of the dare_* methods")
    merge.add_argument("-o", "--output", type=Path, required=True, help=".safetensors file to write")

    resize = sub.add_parser("resize", help="re-rank a LoRA file by SVD (fixed rank or kept energy)")
    resize.add_argument("file")
    how = resize.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="new rank of every layer")
    how.add_argument("--energy", type=float, help="keep this fraction of the squared singular values (0..1]")
    resize.add_argument("-o", "--output", type=Path, required=True)
    resize.add_argument("--layers", action="store_true", help="list every layer's rank and error")

    ext = sub.add_parser("extract", help="LoRA of tuned - base (diffusers model folders or .safetensors)")
    ext.add_argument("tuned", help="fine-tuned model folder or .safetensors state dict")
    ext.add_argument("base", help="base model folder or .safetensors state dict")
    ext.add_argument("--rank", type=int, required=True)
    ext.add_argument("--conv-rank", type=int, default=None, help="rank of kxk convs (default --rank)")
    ext.add_argument("--clamp-quantile", type=float, default=None, help="clamp factors to this quantile (kohya 0.99)")
    ext.add_argument("--min-diff", type=float, default=0.0, help="skip layers whose largest change is this or less")
    ext.add_argument("--namespace", default=None, help="key prefix: unet, transformer, text_encoder...")
    ext.add_argument("-o", "--output", type=Path, required=True)
    ext.add_argument("--layers", action="store_true", help="list every layer's rank and error")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """Parsed arguments, or the exit code argparse chose (``--help``: 0, usage errors: 2)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits; main() returns codes instead so tests and callers can use them
        return int(exc.code or 0)


# ------------------------------------------------------------------------------------------------ inspect
def _size(n: int) -> str:
    """Human-readable size: ``'3.1 MiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _counts(mapping: dict, label: Callable[[object], str] = str) -> str:
    return ", ".join(f"{label(k)}: {v}" for k, v in mapping.items()) or "none"


def _preview(items: list[str], limit: int = 3) -> str:
    if not items:
        return "none"
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)}: " + ", ".join(items[:limit]) + more


def report_table(report) -> Table:
    """The main table of a :class:`~lorakit.inspection.FileReport`."""
    from .inspection import MODEL_NAMESPACE

    table = Table(title="LoRA file", show_header=False, title_justify="left")
    table.add_column("field", style="bold cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    def note(value: str, why: str) -> Text:
        return Text.assemble(value, (f"  ({why})", "dim"))

    components = _counts(report.components, lambda k: MODEL_NAMESPACE if k is None else str(k))
    rows: list[tuple[str, str | Text]] = [
        ("path", report.path),
        ("size", f"{_size(report.size_bytes)} ({report.size_bytes:,} bytes)"),
        ("format", report.format),
        ("algorithm", _counts(report.algorithms)),
        ("family", note(report.family, report.family_source)),
        ("trainer", note(report.trainer, report.trainer_source)),
        ("modules", str(report.num_modules)),
        ("ranks", _counts(report.ranks)),
        ("alpha", note(report.alpha_text(), report.alpha_note) if report.alphas else report.alpha_text()),
        ("components", components),
        ("dtypes", _counts(report.dtypes)),
        ("tensors", f"{report.num_tensors:,}"),
        ("parameters", f"{report.num_params:,}"),
        ("embeddings", Text(_preview(report.embeddings), style="yellow" if report.embeddings else "")),
        ("unused keys", Text(_preview(report.unused), style="yellow" if report.unused else "")),
    ]
    if report.norm_overwrites:
        rows.insert(-2, ("norm overwrites", note(str(len(report.norm_overwrites)),
                                                 "FLUX Control: q/k norm scales replaced on load")))
    for name, value in rows:
        table.add_row(name, value if isinstance(value, Text) else Text(value))
    return table


def metadata_table(metadata: dict[str, str]) -> Table:
    """Header metadata, one key a row, long values cut."""
    table = Table(title=f"Metadata ({len(metadata)} key{'' if len(metadata) == 1 else 's'})", title_justify="left")
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key in sorted(metadata):
        value = " ".join(metadata[key].split())  # JSON values: one line
        if len(value) > _META_WIDTH:
            value = f"{value[:_META_WIDTH]}… ({len(metadata[key]):,} chars)"
        table.add_row(key, Text(value))
    return table


def modules_table(report) -> Table:
    """One row per targeted module, as the file spells it."""
    from .inspection import MODEL_NAMESPACE

    table = Table(title=f"Modules ({report.num_modules})", title_justify="left")
    for col in ("component", "module key", "algorithm", "rank", "alpha", "weight shape"):
        table.add_column(col, overflow="fold")
    for m in report.modules:
        table.add_row(m.component or MODEL_NAMESPACE, m.key, m.algorithm, str(m.rank),
                      "-" if m.alpha is None else f"{m.alpha:g}", "x".join(map(str, m.shape)))
    return table


def cmd_inspect(args: argparse.Namespace, out: Console) -> int:
    from .inspection import inspect_file

    try:
        report = inspect_file(args.file, args.weight_name, allow_pickle=args.allow_pickle)
    except LoraError as exc:
        if "allow_pickle=True" in str(exc):  # the library's advice, in this command's words
            raise LoraError(f"{exc} On the command line: --allow-pickle.") from exc
        raise
    if args.json:
        # plain print: rich would wrap long lines and highlight, which breaks piping to jq
        print(json.dumps(report.to_dict(modules=args.keys), indent=2))
        return EXIT_OK
    out.print(report_table(report))
    if report.metadata:
        out.print(metadata_table(report.metadata))
    if args.keys:
        out.print(modules_table(report))
    return EXIT_OK


# ---------------------------------------------------------------------------------------- merge / resize / extract
def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """Two-column summary of a merge, resize or extract."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


def layers_table(report) -> Table:
    """One row per module of a :class:`~lorakit.merging.MergeReport`."""
    table = Table(title=f"Layers ({len(report.modules)})", title_justify="left")
    for col in ("module", "rank", "rel. error"):
        table.add_column(col, overflow="fold")
    for m in report.modules:
        table.add_row(f"{m.component}.{m.path}" if m.component else m.path, str(m.rank),
                      "-" if m.error is None else f"{m.error:.2e}")
    return table


def _report_rows(report, output: Path, seconds: float) -> list[tuple[str, str]]:
    err = report.max_error
    return [("modules", str(len(report.modules))), ("ranks", _counts(report.ranks)),
            ("max rel. error", "-" if err is None else f"{err:.3e}"), ("time", f"{seconds:.2f} s"),
            ("written", str(output))]


def _run_with_progress(err: Console, total: int, label: str, work: Callable) -> tuple:
    import time

    start = time.perf_counter()
    with _progress(err) as progress:
        task = progress.add_task(label, total=total)
        result = work(lambda what: progress.update(task, advance=1, description=f"{label} {what[-40:]}"))
    return result, time.perf_counter() - start


def cmd_merge(args: argparse.Namespace, out: Console, err: Console) -> int:
    from .lorafiles import check_same_style, read_lora_file, write_lora_file
    from .merging import merge_adapters, touched_modules

    files = [read_lora_file(f) for f in args.files]
    style = check_same_style(files)
    weights = args.weights if args.weights is not None else [1.0] * len(files)
    adapters = [f.adapter for f in files]
    def work(tick: Callable) -> tuple:
        return merge_adapters(adapters, weights, args.output.stem, args.method, density=args.density,
                              majority_sign_method=args.majority_sign, svd_rank=args.rank, svd_clamp=args.clamp,
                              seed=args.seed, progress=tick)

    (merged, report), seconds = _run_with_progress(err, len(touched_modules(adapters)), "merging", work)
    prefixes = {k: v for f in files for k, v in f.kohya_prefixes.items()}
    write_lora_file(merged, args.output, style=style, kohya_prefixes=prefixes,
                    extra_metadata={"merge": merged.metadata["lorakit_merge"]})
    rows = [("inputs", ", ".join(f"{p} x {w:g}" for p, w in zip(args.files, weights))), ("method", args.method)]
    out.print(summary_table("lorakit merge", rows + _report_rows(report, args.output, seconds)))
    return EXIT_OK


def cmd_resize(args: argparse.Namespace, out: Console, err: Console) -> int:
    from .lorafiles import read_lora_file, write_lora_file
    from .merging import resize_adapter

    lf = read_lora_file(args.file)
    total = lf.adapter.num_modules()
    (small, report), seconds = _run_with_progress(err, total, "resizing", lambda tick: resize_adapter(
        lf.adapter, rank=args.rank, energy=args.energy, progress=tick))
    write_lora_file(small, args.output, style=lf.style, kohya_prefixes=lf.kohya_prefixes,
                    extra_metadata={"resize": small.metadata["lorakit_resize"]})
    target = f"rank {args.rank}" if args.rank is not None else f"energy {args.energy:g}"
    out.print(summary_table("lorakit resize", [("input", args.file), ("target", target)]
                            + _report_rows(report, args.output, seconds)))
    if args.layers:
        out.print(layers_table(report))
    return EXIT_OK


def cmd_extract(args: argparse.Namespace, out: Console, err: Console) -> int:
    from .extraction import extract_from_weights, target_weights
    from .lorafiles import write_lora_file

    tuned, base = target_weights(args.tuned), target_weights(args.base)
    (lora, report), seconds = _run_with_progress(err, len(tuned), "extracting", lambda tick: extract_from_weights(
        tuned, base, args.rank, conv_rank=args.conv_rank, clamp_quantile=args.clamp_quantile,
        min_diff=args.min_diff, namespace=args.namespace, name=args.output.stem, progress=tick))
    write_lora_file(lora, args.output, extra_metadata={"extract": f"rank={args.rank} conv_rank={args.conv_rank}"})
    rows = [("tuned", args.tuned), ("base", args.base), ("layers compared", str(len(tuned)))]
    out.print(summary_table("lorakit extract", rows + _report_rows(report, args.output, seconds)))
    if args.layers:
        out.print(layers_table(report))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ convert
def cmd_convert(args: argparse.Namespace, out: Console, err: Console) -> int:
    from .convert import convert_file

    report = convert_file(args.input, args.output, to=args.to, model=args.model)
    out.print(summary_table("Converted", [
        ("from", f"{report.source} ({report.source_format})"), ("to", f"{report.output} ({report.to})"),
        ("family", str(report.family)), ("modules", _counts(report.components)), ("tensors", f"{report.tensors:,}")]))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ demo
def steps_table(records: list, title: str) -> Table:
    """The demo's step records: timings, check results, and each step's detail dimmed under its name."""
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    table.add_column("step", overflow="fold", ratio=1)
    table.add_column("change ms", justify="right", no_wrap=True)
    table.add_column("run ms", justify="right", no_wrap=True)
    table.add_column("check", justify="center", no_wrap=True)
    for i, r in enumerate(records, 1):
        check = {True: Text("PASS", style="green"), False: Text("FAIL", style="bold red"), None: Text("-")}[r.check]
        run = "" if r.run_ms is None else f"{r.run_ms:,.0f}"
        # detail under the name: a separate column would be squeezed to nothing on an 80-column terminal
        step = Text.assemble((r.name, "bold"), ("\n" + r.detail, "dim") if r.detail else "")
        table.add_row(str(i), step, f"{r.ms:,.1f}", run, check)
    return table


def _summary(records: list) -> tuple[bool, str]:
    checks = [r for r in records if r.check is not None]
    failed = [r.name for r in checks if not r.check]
    change = sum(r.ms for r in records)
    run = sum(r.run_ms or 0.0 for r in records)
    renders = sum(1 for r in records if r.run_ms)
    passed = f"{len(checks) - len(failed)}/{len(checks)} checks passed" if checks else "no checks"
    text = (f"{len(records)} steps, {passed}; "
            f"LoRA operations {change:,.0f} ms, {renders} pipeline runs {run:,.0f} ms")
    if failed:
        text += f"; FAILED: {', '.join(failed)}"
    return not failed, text


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def cmd_demo(args: argparse.Namespace, out: Console, err: Console) -> int:
    from . import demo

    if args.lora and not args.model:
        raise LoraError("--lora needs --model (the embedded demo writes its own LoRA files).")
    prompt = args.prompt or demo.DEFAULT_PROMPT
    with _progress(err) as progress:
        if args.model is None:
            plan_len = len(demo.default_plan())
            task = progress.add_task("demo", total=plan_len)
            on_step = _advance(progress, task)
            records = demo.run_default_demo(prompt=prompt, steps=args.steps or demo.DEFAULT_STEPS, seed=args.seed,
                                            output=args.output, on_step=on_step)
            title = "lorakit demo (embedded tiny SD1.5)"
        else:
            _quiet_library_progress()
            loras = [demo.parse_lora_spec(s) for s in args.lora]
            task = progress.add_task("demo", total=len(demo.model_plan(loras)))
            steps = args.steps or 25
            denoise = progress.add_task("denoising", total=steps, visible=False)
            records = demo.run_model_demo(
                args.model, loras, prompt=prompt, steps=steps, seed=args.seed,
                output=args.output or Path("out.png"), device=args.device, on_step=_advance(progress, task),
                on_denoise=lambda i, n: progress.update(denoise, completed=i, total=n, visible=True))
            title = f"lorakit demo ({args.model})"
    out.print(steps_table(records, title))
    ok, text = _summary(records)
    out.print(Text(("PASS: " if ok else "FAIL: ") + text, style="bold green" if ok else "bold red"))
    return EXIT_OK if ok else EXIT_UNEXPECTED  # a failed exactness check is a bug


def _quiet_library_progress() -> None:
    """diffusers' and transformers' tqdm bars would interleave with rich's progress display."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _advance(progress: Progress, task) -> Callable:
    def on_step(record) -> None:
        progress.update(task, advance=1, description=record.name)
    return on_step


# ------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lorakit`` command; returns the exit code (0 ok, 1 unexpected error or failed check, 2 bad input).

    Example:
        >>> main(["inspect", "lora.safetensors", "--json"])   # doctest: +SKIP
        0
    """
    args = _parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    out, err = Console(), Console(stderr=True)
    try:
        if args.command == "inspect":
            return cmd_inspect(args, out)
        commands = {"convert": cmd_convert, "merge": cmd_merge, "resize": cmd_resize, "extract": cmd_extract,
                    "demo": cmd_demo}
        return commands[args.command](args, out, err)
    except LoraError as exc:
        # soft_wrap: never break a path in the message across lines
        err.print(Text(f"error: {exc}", style="red"), soft_wrap=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        err.print(Text("interrupted", style="red"))
        return 130
    except Exception as exc:  # a bug, not bad input: say so, traceback on request
        err.print(Text(f"unexpected error: {type(exc).__name__}: {exc}", style="bold red"), soft_wrap=True)
        if os.environ.get("LORAKIT_TRACEBACK"):
            traceback.print_exc()
        else:
            err.print(Text("set LORAKIT_TRACEBACK=1 to see the traceback", style="dim"))
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
