"""`dyvte-stats`: the command line of the analysis half. Thin shells over plain functions."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analysis.stages import StageSettings

EPILOG = """examples:
  dyvte-stats demo
  dyvte-stats dump --model llava-hf/llava-1.5-7b-hf --questions questions.jsonl \\
      --image-folder images/ --out stats/ --heads all --attn sdpa --batch-size 4 --dtype bfloat16 --device cuda
  dyvte-stats dump --model ./my-checkpoint --questions q.jsonl --image-folder img/ --out stats/ --limit 64
  torchrun --nproc-per-node 4 -m analysis dump --model ./ckpt --questions q.jsonl --image-folder img/ --out stats/
  dyvte-stats dump --model ./ckpt --questions q.jsonl --image-folder img/ --out stats/ --shard 2/8   # a scheduler's task 2 of 8
  dyvte-stats dump --model ./ckpt --questions q.jsonl --image-folder img/ --out stats/ --resume     # after a kill
  dyvte-stats errors stats/
  dyvte-stats validate stats/
  dyvte-stats summary stats/
  dyvte-stats schema
  dyvte-stats tiny-model --out /tmp/tiny-llava
  dyvte-stats stages stats/ --out stages.parquet
  dyvte-stats plot stats/ --kind stages --out stages.svg
  dyvte-stats figures runs/demo --out figures/
"""


def _cmd_dump(args: argparse.Namespace) -> int:
    from analysis.data import DataError, read_questions
    from analysis.dump import Shard, all_sum, barrier, distributed, dump_statistics, load_model, summarize
    from analysis.io import read_statistics

    questions = read_questions(args.questions, limit=args.limit, require_image=args.fail_fast)
    with distributed() as group:
        if args.shard is not None and group.count > 1:
            raise DataError(f"expected either --shard or torchrun, found --shard {args.shard[0]}/{args.shard[1]} "
                            f"under torchrun (rank {group.index} of {group.count})")
        shard = Shard(*args.shard) if args.shard is not None else group
        device = args.device
        if group.count > 1 and device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{os.environ['LOCAL_RANK']}"
        model, processor = load_model(args.model, dtype=args.dtype, device=device, attention=args.attn)
        result = dump_statistics(
            model,
            processor,
            questions,
            args.image_folder,
            args.out,
            model_id=str(args.model),
            heads=args.heads,
            attention=args.attn,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.no_progress and group.index == 0,
            shard=shard,
            resume=args.resume,
            fail_fast=args.fail_fast,
            batches_per_file=args.batches_per_file,
            seconds_per_file=args.seconds_per_file,
        )
        where = f"shard {shard.index}/{shard.count}: " if shard.count > 1 else ""
        skipped = f" (skipped {result.skipped} already in the folder)" if args.resume else ""
        print(f"{where}wrote {result.rows} rows for {result.samples} samples to {result.out_dir}{skipped}")
        samples, errors = all_sum([result.samples, result.errors])
        barrier()  # the folder is complete once every process is here
    if errors and group.index == 0:
        print(f"{int(errors)} sample(s) failed and were left out; their reasons are in {args.out}/_errors-*.jsonl "
              "(dyvte-stats errors " + str(args.out) + ")", file=sys.stderr)
    if group.index == 0 and not args.quiet and shard.count == group.count:
        print(summarize(read_statistics(result.out_dir)).to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def _shard_argument(text: str) -> tuple[int, int]:
    """``--shard i/n`` -> (i, n), checked without importing torch."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 0 <= int(parts[0]) < int(parts[1]):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), found {text!r}")
    return int(parts[0]), int(parts[1])


def _cmd_errors(args: argparse.Namespace) -> int:
    from analysis.io import read_errors

    errors = read_errors(args.path)
    if errors.empty:
        print(f"no failed samples in {args.path}")
        return 0
    for row in errors.itertuples():
        print(f"{row.sample_id}\t{row.error}\t{row.reason}")
    print(f"{len(errors)} failed sample(s)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from analysis.demo import run_demo

    result = run_demo(args.out, args.data, samples=args.samples, heads=args.heads, attention=args.attn,
                      progress=not args.no_progress)
    print(f"wrote {result.dump.rows} rows for {result.dump.samples} ShapesVQA test samples "
          f"({result.questions}) to {result.dump.out_dir}")
    print("mean attention mass by layer of the demo model (mean over heads, queries and samples)")
    print(result.summary.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from analysis.io import validate_path

    for line in validate_path(args.path):
        print(line)
    print("ok")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from analysis.dump import summarize
    from analysis.io import read_statistics

    table = summarize(read_statistics(args.path))
    print("mean attention mass by layer (mean over heads, queries and samples)")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from analysis.schema import describe

    print(describe())
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from analysis.tiny import TinyLlavaSpec, save_tiny_llava

    spec = TinyLlavaSpec(num_layers=args.layers, image_size=args.image_size)
    print(f"saved a tiny random LLaVA and its processor to {save_tiny_llava(args.out, spec)}")
    return 0


def _stage_settings(args: argparse.Namespace) -> StageSettings:
    from analysis.stages import StageSettings

    return StageSettings(
        boundary_curve=args.curve, smoothing=args.smoothing, min_contrast=args.min_contrast, min_quality=args.min_quality
    )


def _cmd_stages(args: argparse.Namespace) -> int:
    from analysis.io import read_statistics
    from analysis.stages import detect_dataset_stages, format_stages, write_stages

    result = detect_dataset_stages(read_statistics(args.stats), _stage_settings(args))
    path = write_stages(result, args.out, source=args.stats)
    print(format_stages(result))
    print(f"wrote the stages of {result.per_sample['sample_id'].nunique()} samples and their consensus to {path}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from analysis.io import read_statistics
    from analysis.plots import save_plot
    from analysis.stages import detect_dataset_stages

    statistics = read_statistics(args.stats)
    stages = detect_dataset_stages(statistics, _stage_settings(args))
    print(f"wrote {save_plot(statistics, args.kind, args.out, stages)}")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from analysis.plots import make_figures

    result = make_figures(args.stats, args.out, _stage_settings(args))
    for path in result.files:
        print(f"wrote {path}")
    for kind, reason in result.skipped.items():
        print(f"skipped {kind}: {reason}")
    return 0


def _add_stage_settings(parser: argparse.ArgumentParser) -> None:
    from analysis.stages import StageSettings

    defaults = StageSettings()
    group = parser.add_argument_group("stage detection (see analysis/stages.py)")
    group.add_argument("--curve", default=defaults.boundary_curve,
                       help=f"boundary curve, 'query->key' or 'entropy:query' (default: {defaults.boundary_curve})")
    group.add_argument("--smoothing", type=int, default=defaults.smoothing,
                       help=f"running-median window in layers, odd (default: {defaults.smoothing})")
    group.add_argument("--min-contrast", type=float, default=defaults.min_contrast,
                       help=f"smallest level difference between stages (default: {defaults.min_contrast})")
    group.add_argument("--min-quality", type=float, default=defaults.min_quality,
                       help=f"smallest quality score for any stage (default: {defaults.min_quality})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dyvte-stats",
        description="Record per-layer attention statistics of multimodal LLMs and study them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dump = commands.add_parser(
        "dump",
        help="record attention statistics of a question file to parquet",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dump.add_argument("--model", required=True, help="checkpoint id or folder (from_pretrained), or 'demo' for the demo model")
    dump.add_argument("--questions", required=True, type=Path, help="LLaVA question file (JSONL: question_id, image, text)")
    dump.add_argument("--image-folder", required=True, type=Path, help="folder the questions' image paths are relative to")
    dump.add_argument("--out", required=True, type=Path, help="output folder for parquet shards")
    dump.add_argument("--heads", choices=["all", "mean", "max"], default="mean", help="keep every head, or reduce (default: mean)")
    dump.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="how attention is observed (default: sdpa, the fast path)")
    dump.add_argument("--batch-size", type=int, default=1)
    dump.add_argument("--limit", type=int, default=None, help="only the first N questions")
    dump.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    dump.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    dump.add_argument("--seed", type=int, default=0)
    dump.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    dump.add_argument("--quiet", action="store_true", help="do not print the per-layer summary")
    dump.add_argument("--shard", default=None, metavar="I/N", type=_shard_argument,
                      help="handle only questions I, I+N, I+2N, ... (0-based; for schedulers without torchrun); "
                      "under torchrun the shard is the rank")
    dump.add_argument("--resume", action="store_true",
                      help="continue a dump in --out: skip the samples it already holds (finished or failed)")
    dump.add_argument("--fail-fast", action="store_true",
                      help="stop at the first bad sample (default: list it in --out/_errors-*.jsonl and go on)")
    dump.add_argument("--batches-per-file", type=int, default=64,
                      help="commit a shard file every N batches; a kill loses at most the open file (default: 64)")
    dump.add_argument("--seconds-per-file", type=float, default=600.0,
                      help="also commit the open shard file after this many seconds (default: 600)")
    dump.set_defaults(run=_cmd_dump)

    errors = commands.add_parser("errors", help="list the samples a dump left out, with their reasons")
    errors.add_argument("path", type=Path, help="a dump folder")
    errors.set_defaults(run=_cmd_errors)

    demo = commands.add_parser(
        "demo",
        help="the main job: statistics of the demo model on 64 ShapesVQA test samples, then the summary",
        description="Build the demo model (cached after the first run) and the ShapesVQA test split if missing, "
        "dump the attention statistics of one question per test image to parquet and print the per-layer summary.",
        epilog="examples:\n  dyvte-stats demo\n  dyvte-stats demo --samples 8 --heads all --out runs/demo-heads\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder, replaced when the new dump is complete (default: runs/demo)")
    demo.add_argument("--data", type=Path, default=None, help="folder of the ShapesVQA splits (default: .cache/shapesvqa in the repository)")
    demo.add_argument("--samples", type=int, default=64, help="number of test questions, one per image (default: 64)")
    demo.add_argument("--heads", choices=["all", "mean", "max"], default="all", help="default: all (the layer x head figure needs them)")
    demo.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(run=_cmd_demo)

    validate = commands.add_parser("validate", help="check a parquet file or folder against the schema")
    validate.add_argument("path", type=Path)
    validate.set_defaults(run=_cmd_validate)

    summary = commands.add_parser("summary", help="print per-layer mean attention masses of a dump")
    summary.add_argument("path", type=Path)
    summary.set_defaults(run=_cmd_summary)

    schema = commands.add_parser("schema", help="print the statistics schema (columns, dtypes, units)")
    schema.set_defaults(run=_cmd_schema)

    tiny = commands.add_parser("tiny-model", help="save a tiny random LLaVA with a local processor (for trying things)")
    tiny.add_argument("--out", required=True, type=Path)
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--image-size", type=int, default=28, help="pixels; (size/14)^2 image tokens")
    tiny.set_defaults(run=_cmd_tiny_model)

    stages = commands.add_parser("stages", help="find the three inference stages per sample and for the data set")
    stages.add_argument("stats", type=Path, help="statistics folder or file (a dump)")
    stages.add_argument("--out", required=True, type=Path, help="parquet file for the per-sample and consensus stages")
    _add_stage_settings(stages)
    stages.set_defaults(run=_cmd_stages)

    plot = commands.add_parser("plot", help="draw one figure of a dump to PNG or SVG")
    plot.add_argument("stats", type=Path, help="statistics folder or file (a dump)")
    plot.add_argument("--kind", required=True, choices=["stages", "heads", "boundaries", "entropy"])
    plot.add_argument("--out", required=True, type=Path, help="output file, .png or .svg")
    _add_stage_settings(plot)
    plot.set_defaults(run=_cmd_plot)

    figures = commands.add_parser("figures", help="every figure of a dump, as figures/<kind>.png (behind `make figures`)")
    figures.add_argument("stats", type=Path, nargs="?", default=Path("runs/demo"), help="statistics folder (default: runs/demo, from `make demo`)")
    figures.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: figures)")
    _add_stage_settings(figures)
    figures.set_defaults(run=_cmd_figures)
    return parser


def toolkit_errors() -> tuple[type[Exception], ...]:
    """The bad-input errors of the analysis half: a command line prints them as one line, exit 2."""
    from analysis.adapters import UnsupportedModelError
    from analysis.data import DataError
    from analysis.demo_model import DemoModelUnavailable
    from analysis.layout import LayoutError
    from analysis.plots import PlotError
    from analysis.recorder import RecordingError
    from analysis.schema import SchemaError
    from analysis.stages import StageError

    return (DataError, LayoutError, SchemaError, UnsupportedModelError, RecordingError, DemoModelUnavailable,
            StageError, PlotError, FileNotFoundError)


def run_command(
    program: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None, errors: tuple[type[Exception], ...]
) -> int:
    """Parse ``argv`` and run the chosen subcommand; an error in ``errors`` prints one line and returns 2.

    SIGTERM (``kill``, a scheduler's time limit) stops the command like Ctrl-C: the writers' context
    managers close, so every finished file keeps its final name, and the command returns 130.
    """
    args = parser.parse_args(argv)
    with _sigterm_as_keyboard_interrupt():
        try:
            return int(args.run(args))
        except errors as error:
            print(f"{program} {args.command}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{program} {args.command}: stopped; the files finished so far are kept", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _sigterm_as_keyboard_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dyvte-stats`` and ``python -m analysis``; errors print one line and exit 2."""
    return run_command("dyvte-stats", build_parser(), argv, toolkit_errors())


if __name__ == "__main__":
    sys.exit(main())
