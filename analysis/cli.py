"""`dyvte-stats`: the command line of the analysis half. Thin shells over plain functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.options import (
    ATTENTION_CHOICES,
    HEAD_CHOICES,
    batch_options,
    command_line,
    model_options,
    non_negative_int,
    positive_int,
    progress_option,
    question_options,
    run_command,
    seed_option,
    shard_argument,
    subcommand,
)

if TYPE_CHECKING:
    from analysis.stages import StageSettings

DUMP_EXAMPLES = [
    "dyvte-stats dump --model llava-hf/llava-1.5-7b-hf --questions questions.jsonl \\",
    "    --image-folder images/ --out stats/ --heads all --attn sdpa --batch-size 4 --dtype bfloat16 --device cuda",
    "dyvte-stats dump --model ./my-checkpoint --questions q.jsonl --image-folder img/ --out stats/ --limit 64",
    "torchrun --nproc-per-node 4 -m analysis dump --model ./ckpt --questions q.jsonl --image-folder img/ --out stats/",
    "dyvte-stats dump --model ./ckpt --questions q.jsonl --image-folder img/ --out stats/ --shard 2/8   # task 2 of 8",
    "dyvte-stats dump --model ./ckpt --questions q.jsonl --image-folder img/ --out stats/ --resume     # after a kill",
    "dyvte-stats dump --model ./ckpt --questions q.jsonl --image-folder img/ --out stats/ --generate 8 # answer tokens too",
]

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
    from analysis.distributed import Shard, all_sum, barrier, distributed, local_device
    from analysis.dump import dump_statistics, prepare_owned_folder, summarize
    from analysis.io import check_output_folder, read_statistics
    from analysis.loading import check_loadable, load_model

    check_output_folder(args.out)
    questions = read_questions(args.questions, limit=args.limit, require_image=args.fail_fast)
    args.stop_hint = "; run the same command with --resume to continue" if not args.resume else ""
    with distributed() as group:
        if args.shard is not None and group.count > 1:
            raise DataError(f"expected either --shard or torchrun, found --shard {args.shard[0]}/{args.shard[1]} "
                            f"under torchrun (rank {group.index} of {group.count})")
        shard = Shard(*args.shard) if args.shard is not None else group
        device = local_device(args.device) if group.count > 1 else args.device
        check_loadable(args.model, device)
        if not args.resume:
            prepare_owned_folder(args.out, shard, resume=False)  # a folder holding a dump is refused now
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
            generate=args.generate,
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
    from analysis.demo.job import run_demo

    result = run_demo(args.out, args.data, samples=args.samples, heads=args.heads, attention=args.attn,
                      progress=not args.no_progress, generate=args.generate)
    print(f"wrote {result.dump.rows} rows for {result.dump.samples} ShapesVQA test samples "
          f"({result.questions}) to {result.dump.out_dir}")
    print("ShapesVQA splits (question files for dyvte-exit sweep / train / eval): "
          + ", ".join(f"{name} {folder}/questions.jsonl" for name, folder in result.splits.items()))
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
    from analysis.testing.tiny import TinyLlavaSpec, save_tiny_llava

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


def _add_dump(commands: Any) -> None:
    dump = subcommand(
        commands, "dump", "record attention statistics of a question file to parquet", DUMP_EXAMPLES,
        parents=[model_options(), question_options(), batch_options(1), seed_option(), progress_option()],
    )
    dump.add_argument("--out", required=True, type=Path, help="output folder for parquet shards")
    dump.add_argument("--heads", choices=HEAD_CHOICES, default="mean", help="keep every head, or reduce (default: mean)")
    dump.add_argument("--quiet", action="store_true", help="do not print the per-layer summary")
    dump.add_argument("--shard", default=None, metavar="I/N", type=shard_argument,
                      help="handle only questions I, I+N, I+2N, ... (0-based; for schedulers without torchrun); "
                      "under torchrun the shard is the rank")
    dump.add_argument("--resume", action="store_true",
                      help="continue a dump in --out: skip the samples it already holds (finished or failed)")
    dump.add_argument("--fail-fast", action="store_true",
                      help="stop at the first bad sample (default: list it in --out/_errors-*.jsonl and go on)")
    dump.add_argument("--batches-per-file", type=positive_int, default=64,
                      help="commit a shard file every N batches; a kill loses at most the open file (default: 64)")
    dump.add_argument("--seconds-per-file", type=float, default=600.0,
                      help="also commit the open shard file after this many seconds (default: 600)")
    dump.add_argument("--generate", type=non_negative_int, default=0, metavar="N",
                      help="also record the attention of up to N greedy answer tokens per sample (query group "
                      "'generated', one step each; generate() with the KV cache); default: 0, the prompt only")
    dump.set_defaults(run=_cmd_dump)


def _add_demo(commands: Any) -> None:
    demo = subcommand(
        commands, "demo",
        "the main job: statistics of the demo model on 64 ShapesVQA test samples, then the summary",
        ["dyvte-stats demo", "dyvte-stats demo --samples 8 --heads all --out runs/demo-heads"],
        parents=[progress_option()],
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"),
                      help="output folder, replaced when the new dump is complete (default: runs/demo)")
    demo.add_argument("--data", type=Path, default=None,
                      help="folder of the ShapesVQA splits (default: .cache/shapesvqa in the repository)")
    demo.add_argument("--samples", type=positive_int, default=64,
                      help="number of test questions, one per image (default: 64)")
    demo.add_argument("--heads", choices=HEAD_CHOICES, default="all",
                      help="default: all (the layer x head figure needs them)")
    demo.add_argument("--attn", choices=ATTENTION_CHOICES, default=ATTENTION_CHOICES[0],
                      help="how attention runs and is observed (default: sdpa)")
    demo.add_argument("--generate", type=non_negative_int, default=4, metavar="N",
                      help="also record the attention of up to N greedy answer tokens (default: 4; 0: the prompt only)")
    demo.set_defaults(run=_cmd_demo)


def _add_folder_commands(commands: Any) -> None:
    errors = subcommand(commands, "errors", "list the samples a dump left out, with their reasons", ["dyvte-stats errors stats/"])
    errors.add_argument("path", type=Path, help="a dump folder")
    errors.set_defaults(run=_cmd_errors)
    validate = subcommand(commands, "validate", "check a parquet file or folder against the schema",
                          ["dyvte-stats validate stats/"])
    validate.add_argument("path", type=Path, help="a parquet file or a folder of them")
    validate.set_defaults(run=_cmd_validate)
    summary = subcommand(commands, "summary", "print per-layer mean attention masses of a dump", ["dyvte-stats summary stats/"])
    summary.add_argument("path", type=Path, help="a dump folder or statistics file")
    summary.set_defaults(run=_cmd_summary)
    schema = subcommand(commands, "schema", "print every table's schema (columns, dtypes, units, versions)",
                        ["dyvte-stats schema"])
    schema.set_defaults(run=_cmd_schema)
    tiny = subcommand(commands, "tiny-model", "save a tiny random LLaVA with a local processor (for trying things)",
                      ["dyvte-stats tiny-model --out /tmp/tiny-llava"])
    tiny.add_argument("--out", required=True, type=Path, help="folder to save the model and processor into")
    tiny.add_argument("--layers", type=positive_int, default=4, help="decoder layers (default: 4)")
    tiny.add_argument("--image-size", type=positive_int, default=28,
                      help="image side in pixels; (size/14)^2 image tokens (default: 28)")
    tiny.set_defaults(run=_cmd_tiny_model)


def _add_stage_commands(commands: Any) -> None:
    stages = subcommand(commands, "stages", "find the three inference stages per sample and for the data set",
                        ["dyvte-stats stages stats/ --out stages.parquet"])
    stages.add_argument("stats", type=Path, help="statistics folder or file (a dump)")
    stages.add_argument("--out", required=True, type=Path, help="parquet file for the per-sample and consensus stages")
    _add_stage_settings(stages)
    stages.set_defaults(run=_cmd_stages)
    plot = subcommand(commands, "plot", "draw one figure of a dump to PNG or SVG",
                      ["dyvte-stats plot stats/ --kind stages --out stages.svg"])
    plot.add_argument("stats", type=Path, help="statistics folder or file (a dump)")
    plot.add_argument("--kind", required=True, choices=["stages", "heads", "boundaries", "entropy", "answer"],
                      help="which figure")
    plot.add_argument("--out", required=True, type=Path, help="output file, .png or .svg")
    _add_stage_settings(plot)
    plot.set_defaults(run=_cmd_plot)
    figures = subcommand(commands, "figures", "every figure of a dump, as figures/<kind>.png (behind `make figures`)",
                         ["dyvte-stats figures runs/demo --out figures/"])
    figures.add_argument("stats", type=Path, nargs="?", default=Path("runs/demo"),
                         help="statistics folder (default: runs/demo, from `make demo`)")
    figures.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: figures)")
    _add_stage_settings(figures)
    figures.set_defaults(run=_cmd_figures)


def build_parser() -> argparse.ArgumentParser:
    """The ``dyvte-stats`` parser: one subcommand per job, each with its own examples."""
    return command_line("dyvte-stats", "Record per-layer attention statistics of multimodal LLMs and study them.", EPILOG,
                        (_add_dump, _add_demo, _add_folder_commands, _add_stage_commands))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dyvte-stats`` and ``python -m analysis``; errors print one line and exit 2."""
    return run_command("dyvte-stats", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
