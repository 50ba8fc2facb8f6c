"""`dyvte-exit`: the command line of the exit half. Thin shells over plain functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EPILOG = """examples:
  dyvte-exit sweep --model demo --questions .cache/shapesvqa/train/questions.jsonl \\
      --image-folder .cache/shapesvqa/train --out runs/sweep --features hidden --limit 256
  dyvte-exit train --sweep runs/sweep --model demo --out runs/gates --hidden-width 2048 --epochs 1
  torchrun --nproc-per-node 4 -m exit.cli sweep --model demo --questions q.jsonl --image-folder img/ --out runs/sweep
  torchrun --nproc-per-node 2 -m exit.cli train --sweep runs/sweep --model demo --out runs/gates   # data-parallel
  dyvte-exit train --online --model demo --questions .cache/shapesvqa/train/questions.jsonl \\
      --image-folder .cache/shapesvqa/train --out runs/gates-online --batch-size 8 --lr 6e-5
  dyvte-exit eval --model demo --questions .cache/shapesvqa/test/questions.jsonl \
      --image-folder .cache/shapesvqa/test --gates runs/gates --out runs/eval \
      --method none --method dyvte --method dyvte:0.7 --method static:14 --method fastv:2:0.5 \
      --method vtw --calibration-questions .cache/shapesvqa/val/questions.jsonl \
      --calibration-image-folder .cache/shapesvqa/val
  dyvte-exit figures runs/eval --out figures
  dyvte-exit generate --model demo --gates runs/gates --image .cache/shapesvqa/val/images/000000.png \\
      --question "What colour is the triangle? Answer with one word."
"""


class UsageError(ValueError):
    """The options given do not make a complete command."""


def _cmd_sweep(args: argparse.Namespace) -> int:
    from analysis.data import read_questions
    from analysis.distributed import all_sum, barrier, distributed
    from analysis.loading import load_model, provenance
    from exit.sweep import LabelRule, read_sweep, run_sweep

    questions = read_questions(args.questions, limit=args.limit)
    with distributed() as group:  # data-parallel under torchrun: each process sweeps every n-th question
        model, processor = load_model(args.model, dtype=args.dtype, device=_local_device(args.device), attention=args.attn)
        features = None if args.features == "none" else args.features
        run = run_sweep(
            model,
            processor,
            questions,
            args.image_folder,
            args.out,
            provenance={**provenance(str(args.model), model, args.attn, "none", args.seed), "features": str(features)},
            features=features,
            batch_size=args.batch_size,
            rule=LabelRule(args.min_agreement, args.max_ce_ratio),
            progress=not args.no_progress and group.index == 0,
            shard=group,
        )
        rows, samples = all_sum([run.rows, run.samples])
        barrier()
    if group.index != 0:
        return 0
    print(f"wrote {int(rows)} rows for {int(samples)} samples to {run.out_dir}")
    frame = read_sweep(run.out_dir)
    print("fraction of samples whose exit after the layer is safe (label), by layer")
    print(frame.groupby("layer")["label"].mean().to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from analysis.distributed import distributed
    from exit.train import TrainSettings

    settings = TrainSettings(
        lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs, batch_size=args.batch_size,
        holdout_fraction=args.holdout, seed=args.seed,
    )
    with distributed() as group:  # data-parallel under torchrun (gloo); one process otherwise
        gates, report = _train(args, settings, progress=not args.no_progress and group.index == 0)
    if group.index != 0:  # every process holds the same gates; the first one writes them
        return 0
    gates.save(args.out)
    (Path(args.out) / "train_report.json").write_text(report.to_json() + "\n")
    where = f" on {group.count} processes" if group.count > 1 else ""
    print(f"trained {report.steps} steps{where} on {report.train_examples} samples; saved the gates to {args.out}")
    print(f"held-out accuracy by layer ({report.heldout_samples} samples; p(exit) > {args.tau}):")
    for layer, (accuracy, positive) in enumerate(zip(report.layer_accuracy, report.layer_positive_rate)):
        shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
        rate = "n/a" if positive is None else f"{positive:.3f}"
        print(f"  layer {layer:3d}  accuracy {shown}  (share labelled exit {rate})")
    if report.tau_curve:
        import pandas as pd

        print("DyVTE replayed on the held-out samples (choose tau here, not on the test split):")
        print(pd.DataFrame(report.tau_curve).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _train(args: argparse.Namespace, settings: Any, progress: bool) -> tuple[Any, Any]:
    """Build the gates and train them (online or offline) as the options say; (gates, report)."""
    from tqdm import tqdm

    from analysis.data import read_questions
    from analysis.loading import load_model
    from exit.gates import DyVTEGates, GateConfig
    from exit.sweep import LabelRule
    from exit.train import feature_shards, read_shard, train_offline, train_online_on_questions

    if args.online:
        if args.questions is None or args.image_folder is None:
            raise UsageError("expected --questions and --image-folder with --online, found them missing")
        questions = read_questions(args.questions, limit=args.limit)
        model, processor = load_model(args.model, dtype="float32", device=_local_device(args.device), attention="sdpa")
        config = GateConfig(inputs=args.features or "hidden", hidden_width=args.hidden_width, tau=args.tau, seed=args.seed)
        gates = DyVTEGates.for_model(model, config)
        bar = (lambda items: tqdm(items, desc="train (online)", unit="step")) if progress else None
        rule = LabelRule(args.min_agreement, args.max_ce_ratio)
        return gates, train_online_on_questions(gates, model, processor, questions, args.image_folder, settings, rule, bar)
    if args.sweep is None:
        raise UsageError("expected --sweep (a folder written by `dyvte-exit sweep`) or --online, found neither")
    model, _ = load_model(args.model, dtype="float32", device="cpu", attention="sdpa")
    kind = args.features or read_shard(feature_shards(args.sweep)[0])[3]
    gates = DyVTEGates.for_model(model, GateConfig(inputs=kind, hidden_width=args.hidden_width, tau=args.tau, seed=args.seed))
    del model
    bar = (lambda items: tqdm(items, desc="train", unit="epoch")) if progress else None
    return gates, train_offline(gates, args.sweep, settings, progress=bar)


def _local_device(device: str) -> str:
    """Under torchrun, ``cuda`` means this process's GPU (``cuda:LOCAL_RANK``)."""
    import os

    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def _cmd_generate(args: argparse.Namespace) -> int:
    from analysis.data import load_image
    from analysis.loading import load_model
    from exit.gates import DyVTEGates, answer_with_gates

    gates_folder = Path(args.gates)
    DyVTEGates.load(gates_folder)  # fail on a missing or broken gate folder before loading the model
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, attention=args.attn)
    gates = DyVTEGates.load(gates_folder, model, tau=args.tau)
    images = [load_image(Path(path).parent, Path(path).name) for path in args.image]
    answer, layer = answer_with_gates(model, processor, gates, images, args.question, args.max_new_tokens)
    print(f"answer: {answer}")
    print(f"exit layer: {'none (the image was kept in every layer)' if layer is None else layer}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from analysis.adapters import resolve_adapter
    from analysis.data import read_questions
    from analysis.loading import load_model
    from exit.evaluate import calibrate_vtw, evaluate_methods, parse_method
    from exit.gates import DyVTEGates

    specs = [spec for value in args.method for spec in value.split(",") if spec]
    needs_gates = any(spec.startswith("dyvte") for spec in specs)
    needs_vtw = "vtw" in specs
    if needs_gates and args.gates is None:
        raise UsageError("expected --gates FOLDER for the dyvte methods, found none")
    if needs_vtw and args.calibration_questions is None:
        raise UsageError("expected --calibration-questions (and --calibration-image-folder) for 'vtw', found none; "
                         "calibrate on data other than the evaluation questions, or give the layer as 'vtw:K'")
    if args.gates is not None:
        DyVTEGates.load(args.gates)  # a broken gate folder fails before the model loads
    questions = read_questions(args.questions, limit=args.limit)
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, attention=args.attn)
    num_layers = len(resolve_adapter(model).decoder_layers(model))
    gates = DyVTEGates.load(args.gates, model) if args.gates is not None else None
    calibration = None
    if needs_vtw:
        calibration_questions = read_questions(args.calibration_questions)
        calibration = calibrate_vtw(model, processor, calibration_questions,
                                    args.calibration_image_folder or args.calibration_questions.parent,
                                    args.vtw_eta, args.vtw_samples, args.batch_size)
        print(f"VTW: first layer with mean KL <= {args.vtw_eta:g} over {calibration.samples} calibration samples: "
              f"{calibration.layer}")
    methods = [parse_method(spec, num_layers, gates, calibration) for spec in specs]
    progress = None if args.no_progress else (lambda name: lambda items: tqdm(items, desc=name, unit="batch"))
    _, summary = evaluate_methods(model, processor, questions, args.image_folder, methods, args.out,
                                  args.max_new_tokens, args.batch_size, progress)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out is not None:
        print(f"per-question rows and summary.parquet in {args.out}")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from exit.plots import make_exit_figures

    for path in make_exit_figures(args.folder, args.out, args.num_layers):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dyvte-exit",
        description="DyVTE visual-token exit: label exit layers, train the gates, answer with them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sweep = commands.add_parser(
        "sweep",
        help="exit labels for every question and layer (parquet) and the gate features (safetensors)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("--model", required=True, help="checkpoint id or folder, or 'demo' for the demo model")
    sweep.add_argument("--questions", required=True, type=Path,
                       help="question file (JSONL with question_id, image, text, answer)")
    sweep.add_argument("--image-folder", required=True, type=Path)
    sweep.add_argument("--out", required=True, type=Path, help="output folder (exit_sweep-*.parquet, features-*.safetensors)")
    sweep.add_argument("--features", choices=["hidden", "attention", "both", "none"], default="hidden",
                       help="gate features to cache for training (default: hidden, the paper's)")
    sweep.add_argument("--min-agreement", type=float, default=0.99, help="label: argmax agreement above this (default 0.99)")
    sweep.add_argument("--max-ce-ratio", type=float, default=1.03, help="label: cross-entropy ratio below this (default 1.03)")
    sweep.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    sweep.add_argument("--batch-size", type=int, default=1)
    sweep.add_argument("--limit", type=int, default=None, help="only the first N questions")
    sweep.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    sweep.add_argument("--device", default="cpu")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sweep.set_defaults(run=_cmd_sweep)

    train = commands.add_parser(
        "train", help="train one gate per layer on a sweep's cached features (model frozen)", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--sweep", type=Path, help="offline: folder written by `dyvte-exit sweep` (features cached)")
    train.add_argument("--online", action="store_true",
                       help="the paper's online scheme instead: one random exit layer per step, labelled on the fly")
    train.add_argument("--questions", type=Path, help="--online: question file with reference answers")
    train.add_argument("--image-folder", type=Path, help="--online: folder of the questions' images")
    train.add_argument("--features", choices=["hidden", "attention", "both"], default=None,
                       help="gate input (default: 'hidden' online, the sweep's kind offline; a sweep that cached "
                            "'both' serves all three)")
    train.add_argument("--limit", type=int, default=None, help="--online: only the first N questions")
    train.add_argument("--min-agreement", type=float, default=0.99, help="--online: label threshold (default 0.99)")
    train.add_argument("--max-ce-ratio", type=float, default=1.03, help="--online: label threshold (default 1.03)")
    train.add_argument("--device", default="cpu", help="--online: device of the model")
    train.add_argument("--model", required=True, help="the model the sweep was run on (its shape goes into the gates' config)")
    train.add_argument("--out", required=True, type=Path,
                       help="folder for gates.safetensors, gate_config.json, train_report.json")
    train.add_argument("--hidden-width", type=int, default=2048, help="gate hidden width (default 2048, the paper's)")
    train.add_argument("--tau", type=float, default=0.5, help="exit when p(exit) > tau (default 0.5)")
    train.add_argument("--lr", type=float, default=6e-5)
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--holdout", type=float, default=0.2, help="fraction of samples held out for the accuracy report")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(run=_cmd_train)

    generate = commands.add_parser(
        "generate", help="answer a question about an image with the gates; print the answer and the exit layer",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("--model", required=True)
    generate.add_argument("--gates", required=True, type=Path, help="folder written by `dyvte-exit train`")
    generate.add_argument("--image", required=True, action="append", help="image file (repeat for several images)")
    generate.add_argument("--question", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--tau", type=float, default=None, help="override the saved threshold")
    generate.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    generate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--no-progress", action="store_true", help="accepted for symmetry; generation prints no bar")
    generate.set_defaults(run=_cmd_generate)
    evaluate = commands.add_parser(
        "eval", help="accuracy, exit layers, relative prefill FLOPs and time of exit methods on a question file",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--model", required=True, help="checkpoint id or folder, or 'demo' for the demo model")
    evaluate.add_argument("--questions", required=True, type=Path, help="question file with reference answers")
    evaluate.add_argument("--image-folder", required=True, type=Path)
    evaluate.add_argument("--method", required=True, action="append",
                          help="none | static:K | vtw | vtw:K | fastv:K:R | dyvte | dyvte:TAU | dyvte+fastv:K:R "
                               "(repeat, or separate with commas; all share the loaded model)")
    evaluate.add_argument("--gates", type=Path, default=None, help="gate folder for the dyvte methods")
    evaluate.add_argument("--calibration-questions", type=Path, default=None,
                          help="question file whose first --vtw-samples questions calibrate 'vtw'")
    evaluate.add_argument("--calibration-image-folder", type=Path, default=None,
                          help="images of the calibration questions (default: the question file's folder)")
    evaluate.add_argument("--vtw-eta", type=float, default=0.1, help="VTW's KL threshold in nats (default 0.1)")
    evaluate.add_argument("--vtw-samples", type=int, default=20)
    evaluate.add_argument("--out", type=Path, default=None,
                          help="folder for eval-<method>.parquet (one row per question) and summary.parquet")
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N questions")
    evaluate.add_argument("--batch-size", type=int, default=8, help="questions about one image per batch")
    evaluate.add_argument("--max-new-tokens", type=int, default=4)
    evaluate.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    evaluate.set_defaults(run=_cmd_eval)

    figures = commands.add_parser(
        "figures",
        help="the accuracy-FLOPs frontier, the exit-layer histogram and the results table of an `eval --out` folder",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    figures.add_argument("folder", type=Path, help="folder written by `dyvte-exit eval --out`")
    figures.add_argument("--out", type=Path, default=Path("figures"), help="where frontier.png, exit_histogram.png and exit_results.md go")
    figures.add_argument("--num-layers", type=int, default=None,
                         help="decoder layers on the histogram's axis (default: from the summary)")
    figures.set_defaults(run=_cmd_figures)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dyvte-exit``; errors print one line and exit 2."""
    from analysis.cli import run_command, toolkit_errors
    from exit.gates import GateMismatchError
    from exit.surgery import ExitSurgeryError
    from exit.sweep import SweepError

    from analysis.plots import PlotError
    from exit.plots import EvaluationFolderError

    exit_errors = (GateMismatchError, ExitSurgeryError, SweepError, UsageError, EvaluationFolderError, PlotError)
    return run_command("dyvte-exit", build_parser(), argv, toolkit_errors() + exit_errors)


if __name__ == "__main__":
    sys.exit(main())
