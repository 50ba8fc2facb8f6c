"""`dyvte-stats`: the command line of the analysis half. Thin shells over plain functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EPILOG = """examples:
  dyvte-stats demo
  dyvte-stats dump --model llava-hf/llava-1.5-7b-hf --questions questions.jsonl \\
      --image-folder images/ --out stats/ --heads all --attn sdpa --batch-size 4 --dtype bfloat16 --device cuda
  dyvte-stats dump --model ./my-checkpoint --questions q.jsonl --image-folder img/ --out stats/ --limit 64
  dyvte-stats validate stats/
  dyvte-stats summary stats/
  dyvte-stats schema
  dyvte-stats tiny-model --out /tmp/tiny-llava
"""


def _cmd_dump(args: argparse.Namespace) -> int:
    from analysis.data import read_questions
    from analysis.dump import dump_statistics, load_model, summarize
    from analysis.io import read_statistics

    questions = read_questions(args.questions, limit=args.limit)
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, attention=args.attn)
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
        progress=not args.no_progress,
    )
    print(f"wrote {result.rows} rows for {result.samples} samples to {result.out_dir}")
    if not args.quiet:
        print(summarize(read_statistics(result.out_dir)).to_string(float_format=lambda v: f"{v:.3f}"))
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
    dump.add_argument("--model", required=True, help="checkpoint id or folder (from_pretrained)")
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
    dump.set_defaults(run=_cmd_dump)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dyvte-stats`` and ``python -m analysis``; errors print one line and exit 2."""
    from analysis.adapters import UnsupportedModelError
    from analysis.data import DataError
    from analysis.layout import LayoutError
    from analysis.recorder import RecordingError
    from analysis.schema import SchemaError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (DataError, LayoutError, SchemaError, UnsupportedModelError, RecordingError, FileNotFoundError) as error:
        print(f"dyvte-stats {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
