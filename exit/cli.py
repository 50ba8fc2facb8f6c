"""`dyvte-exit`: the command line of the exit half. Thin shells over plain functions.

The shared options (model, questions, batch size, seed, progress) come from the parent parsers of
``analysis.options``, each subcommand's ``--help`` ends with its own examples, and
``analysis.options.run_command`` turns every toolkit error into one line and exit status 2.
``eval`` checks its methods (``exit.methods``) completely before the model loads: the syntax and
ranges first, then the layers against the checkpoint's config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.errors import UsageError
from analysis.options import (
    batch_options,
    command_line,
    model_options,
    non_negative_int,
    positive_int,
    progress_option,
    question_options,
    run_command,
    seed_option,
    subcommand,
)
from exit.methods import CALIBRATION, GATES, METHOD_FORMS

if TYPE_CHECKING:
    from analysis.data import Question
    from exit.methods import ExitMethod, MethodSpec

SWEEP_EXAMPLES = [
    "dyvte-exit sweep --model demo --questions .cache/shapesvqa/train/questions.jsonl \\",
    "    --image-folder .cache/shapesvqa/train --out runs/sweep --features hidden --limit 256",
    "torchrun --nproc-per-node 4 -m exit.cli sweep --model demo --questions q.jsonl --image-folder img/ --out runs/sweep",
]
FEATURES_EXAMPLES = [
    "dyvte-exit features --model demo --questions runs/exit-demo/test-questions.jsonl \\",
    "    --image-folder .cache/shapesvqa/test --table runs/exit-demo/test-table --features both --batch-size 4 --resume",
]
JOIN_STATS_EXAMPLES = [
    "dyvte-stats dump --model demo --questions runs/exit-demo/train-questions.jsonl --image-folder .cache/shapesvqa/train \\",
    "    --out runs/train-stats --heads all --batch-size 4",
    "dyvte-exit join-stats --stats runs/train-stats --table runs/exit-demo/train-table",
    "dyvte-exit train --sweep runs/exit-demo/train-table --model demo --features history --out runs/gates-history",
]
TRAIN_EXAMPLES = [
    "dyvte-exit train --sweep runs/sweep --model demo --out runs/gates --hidden-width 2048 --epochs 1",
    "torchrun --nproc-per-node 2 -m exit.cli train --sweep runs/sweep --model demo --out runs/gates   # data-parallel",
    "dyvte-exit train --online --model demo --questions .cache/shapesvqa/train/questions.jsonl \\",
    "    --image-folder .cache/shapesvqa/train --out runs/gates-online --batch-size 8 --lr 6e-5",
]
EVAL_EXAMPLES = [
    "dyvte-exit eval --model demo --questions .cache/shapesvqa/test/questions.jsonl \\",
    "    --image-folder .cache/shapesvqa/test --gates runs/gates --out runs/eval \\",
    "    --method none --method dyvte --method dyvte:0.7 --method static:14 --method fastv:2:0.5 \\",
    "    --method vtw --calibration-questions .cache/shapesvqa/val/questions.jsonl \\",
    "    --calibration-image-folder .cache/shapesvqa/val",
    "dyvte-exit eval --model demo --questions q.jsonl --image-folder img/ --method none,static:6,fastv:2:0.5 --limit 64",
    "dyvte-exit eval ... --out runs/eval --resume              # after a stop: finish every method",
    "dyvte-exit eval ... --out runs/eval --add --method static:20   # one more method beside the others",
]
FIGURES_EXAMPLES = ["dyvte-exit figures runs/eval --out figures"]
FRONTIER_EXAMPLES = [
    "dyvte-exit frontier --table runs/test-table --out runs/frontier --figures figures",
    "dyvte-exit frontier --table runs/test-table --gates hidden=runs/gates-hidden --gates history=runs/gates-history \\",
    "    --tau-table runs/val-table --vtw-layer 20 --out runs/frontier",
    "dyvte-exit frontier --table runs/test-table --gates seeds=runs/gates-s0,runs/gates-s1,runs/gates-s2 --out runs/f2",
    "dyvte-exit frontier --table runs/test-table --runs runs/eval-fastv --runs shared=runs/eval-shared --out runs/f3",
]
GENERATE_EXAMPLES = [
    "dyvte-exit generate --model demo --gates runs/gates --image .cache/shapesvqa/val/images/000000.png \\",
    '    --question "What colour is the triangle? Answer with one word."',
]
GATES_HELP = ("a gate folder (the train command's --out), or comma-separated folders of one recipe (seeds, say): "
              "their p(exit) averaged")
EPILOG = "examples:\n" + "\n".join(
    f"  {line}" for lines in (SWEEP_EXAMPLES, FEATURES_EXAMPLES, JOIN_STATS_EXAMPLES, TRAIN_EXAMPLES, EVAL_EXAMPLES,
                              FIGURES_EXAMPLES, FRONTIER_EXAMPLES, GENERATE_EXAMPLES)
    for line in lines
)

NEED_OPTIONS: dict[str, str] = {
    GATES: "expected --gates FOLDER for the methods {methods}, found none",
    CALIBRATION: "expected --calibration-questions (and --calibration-image-folder) for {methods}, found none; "
                 "calibrate on data other than the evaluation questions, or give the layer as 'vtw:K'",
}
"""The usage error of each need of a method (``exit.methods``) that no option provides."""


def tau_value(text: str) -> float:
    """argparse type: a threshold on p(exit) in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), found {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), found {value:g}")
    return value


def non_negative(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, found {text!r}") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, found {value:g}")
    return value


def _cmd_sweep(args: argparse.Namespace) -> int:
    from analysis.data import read_questions
    from analysis.distributed import all_sum, barrier, distributed, local_device
    from analysis.io import check_output_folder
    from analysis.loading import check_loadable, load_model, provenance
    from exit.sweep import SWEEP_TABLE, LabelRule, read_sweep, run_sweep

    if not args.resume:
        check_output_folder(args.out)
    config = check_loadable(args.model, local_device(args.device))
    if args.answers:
        from analysis.adapters import resolve_adapter
        from exit.answers import check_answerable

        check_answerable(resolve_adapter(config.model_type), config)  # before the weights load
    questions = read_questions(args.questions, limit=args.limit)
    with distributed() as group:  # data-parallel under torchrun: each process sweeps every n-th question
        model, processor = load_model(args.model, dtype=args.dtype, device=local_device(args.device), attention=args.attn)
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
            answers=args.answers,
            resume=args.resume,
        )
        rows, samples, errors = all_sum([run.rows, run.samples, run.errors])
        barrier()
    if group.index != 0:
        return 0
    print(f"wrote {int(rows)} rows for {int(samples)} samples to {run.out_dir}")
    if errors:
        print(f"{int(errors)} question(s) could not be swept and were left out; their reasons are in "
              f"{run.out_dir}/_errors-*.jsonl", file=sys.stderr)
    finished_before = args.resume and any(run.out_dir.glob(f"{SWEEP_TABLE}-*.parquet"))
    if not rows and not finished_before:
        raise UsageError(f"expected at least one question to sweep, found all {int(errors)} failing "
                         f"(listed in {run.out_dir}/_errors-*.jsonl)")
    if not rows:
        print(f"nothing left to sweep: {run.out_dir} already holds every question (--resume)")
    frame = read_sweep(run.out_dir)
    print("fraction of samples whose exit after the layer is safe (label), by layer")
    print(frame.groupby("layer")["label"].mean().to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from analysis.data import read_questions
    from analysis.loading import check_loadable, load_model
    from exit.feature_pass import feature_pass_plan, run_feature_pass

    questions = read_questions(args.questions, limit=args.limit)
    plan = feature_pass_plan(args.table, questions, args.features, args.resume)  # before the weights load
    if not plan.todo:
        print(f"nothing left to do: every question of {args.table} has its {args.features} features (--resume)")
        return 0
    check_loadable(args.model, args.device)
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, attention=args.attn)
    run = run_feature_pass(model, processor, questions, args.image_folder, args.table, features=args.features,
                           batch_size=args.batch_size, progress=not args.no_progress, resume=args.resume)
    print(f"wrote the {args.features} features of {run.samples} questions to {len(run.files)} shards in {args.table}")
    if run.errors:
        print(f"{run.errors} question(s) could not be loaded and were left out; their reasons are in "
              f"{args.table}/_errors-*.jsonl", file=sys.stderr)
    return 0


def _cmd_join_stats(args: argparse.Namespace) -> int:
    from exit.feature_pass import join_statistics
    from exit.sweep import read_shard

    files = join_statistics(args.stats, args.table)
    kind = read_shard(files[0])[3]
    samples = sum(len(read_shard(path)[2]) for path in files)
    serves = "attention and history" if kind == "attention" else kind
    print(f"wrote the {kind} features of {samples} samples of {args.stats} to {len(files)} shards in {args.table}; "
          f"`dyvte-exit train --sweep {args.table}` trains {serves} gates on them")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from analysis.distributed import distributed
    from analysis.io import check_output_folder
    from analysis.loading import check_loadable
    from exit.train import TrainSettings

    check_output_folder(args.out)
    check_loadable(args.model, args.device if args.online else "cpu")
    settings = TrainSettings(
        lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs, batch_size=args.batch_size,
        holdout_fraction=args.holdout, seed=args.seed, label_rule=args.label_rule,
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
    from analysis.distributed import local_device
    from analysis.loading import load_model
    from exit.gates import DyVTEGates, GateConfig
    from exit.sweep import LabelRule
    from exit.train import feature_shards, read_shard, train_offline, train_online_on_questions

    if args.online:
        if args.shared:
            raise UsageError("expected --shared with offline training (its input scale comes from the sweep's "
                             "features), found --online")
        if args.questions is None or args.image_folder is None:
            raise UsageError("expected --questions and --image-folder with --online, found them missing")
        questions = read_questions(args.questions, limit=args.limit)
        model, processor = load_model(args.model, dtype="float32", device=local_device(args.device), attention="sdpa")
        config = GateConfig(inputs=args.features or "hidden", hidden_width=args.hidden_width, tau=args.tau, seed=args.seed,
                            dropout=args.dropout)
        gates = DyVTEGates.for_model(model, config)
        bar = (lambda items: tqdm(items, desc="train (online)", unit="step")) if progress else None
        rule = LabelRule(args.min_agreement, args.max_ce_ratio)
        return gates, train_online_on_questions(gates, model, processor, questions, args.image_folder, settings, rule, bar)
    if args.sweep is None:
        raise UsageError("expected --sweep (a folder written by `dyvte-exit sweep`) or --online, found neither")
    model, _ = load_model(args.model, dtype="float32", device="cpu", attention="sdpa")
    kind = args.features or read_shard(feature_shards(args.sweep)[0])[3]
    gates = DyVTEGates.for_model(model, GateConfig(inputs=kind, hidden_width=args.hidden_width, tau=args.tau, seed=args.seed,
                                                   shared=args.shared, dropout=args.dropout))
    del model
    _warn_about_the_plan(gates, args.sweep, settings)
    bar = (lambda items: tqdm(items, desc="train", unit="epoch")) if progress else None
    return gates, train_offline(gates, args.sweep, settings, progress=bar)


MIN_STEPS = 20
"""Fewer optimiser steps than this, and ``dyvte-exit train`` warns that the gates will hardly learn."""
MAX_SIZE_RATIO = 10
"""A gates file more than this many times the size of the features it learns from gets a warning."""


def _warn_about_the_plan(gates: Any, sweep: Path, settings: Any) -> None:
    """Warn (stderr) when offline training would take very few steps, or write gates far larger
    than the data they learn from: the paper's defaults (width 2048, batch 128) suit a large sweep."""
    from exit.gates import gate_parameters
    from exit.train import feature_shards, offline_plan, read_shard

    examples, steps = offline_plan(sweep, settings)
    if steps < MIN_STEPS:
        print(f"warning: training would take {steps} optimiser step(s) ({examples} samples, --batch-size "
              f"{settings.batch_size}, --epochs {settings.epochs}); the gates will hardly learn: lower --batch-size "
              "or raise --epochs (a small sweep suits e.g. --batch-size 32 --epochs 40)", file=sys.stderr)
    features = read_shard(feature_shards(sweep)[0])[0]
    data_bytes = examples * features[0].numel() * 4
    gate_bytes = gate_parameters(gates) * 4
    if gate_bytes > MAX_SIZE_RATIO * data_bytes:
        print(f"warning: the gates file would be {gate_bytes / 2**20:.1f} MiB, {gate_bytes / data_bytes:.0f}x the "
              f"{data_bytes / 2**20:.1f} MiB of features they learn from; a smaller --hidden-width (e.g. 256) suits "
              "a small sweep", file=sys.stderr)


def _cmd_generate(args: argparse.Namespace) -> int:
    from analysis.data import load_image
    from analysis.loading import check_loadable, load_model
    from exit.gates import answer_with_gates, load_gate_set

    load_gate_set(args.gates)  # fail on a missing or broken gate folder before loading the model
    check_loadable(args.model, args.device)
    for path in args.image:
        if not Path(path).is_file():
            raise UsageError(f"expected an image file at {path}, found no file")
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, attention=args.attn)
    gates = load_gate_set(args.gates, model, tau=args.tau)
    images = [load_image(Path(path).parent, Path(path).name) for path in args.image]
    answer, layer = answer_with_gates(model, processor, gates, images, args.question, args.max_new_tokens)
    print(f"answer: {answer}")
    print(f"exit layer: {'none (the image was kept in every layer)' if layer is None else layer}")
    return 0


def _check_eval(args: argparse.Namespace) -> tuple[list[MethodSpec], list[Question], list[Question] | None]:
    """Everything ``eval`` can check before the model loads: the methods (syntax, ranges, duplicates,
    needs, layers against the checkpoint's config), the gate folder and the question files.
    Returns (methods, questions, calibration questions or None)."""
    from exit.methods import parse_method_specs

    # The method strings first: they need no torch, so a typo is answered at once.
    specs = parse_method_specs(args.method)
    given = {GATES: args.gates is not None, CALIBRATION: args.calibration_questions is not None}
    for need, message in NEED_OPTIONS.items():
        wanting = [spec.name for spec in specs if need in spec.needs]
        if wanting and not given[need]:
            raise UsageError(message.format(methods=", ".join(repr(name) for name in wanting)))
    if (args.resume or args.add) and args.out is None:
        raise UsageError(f"expected --out with --{'resume' if args.resume else 'add'}, found none")

    from analysis.data import read_questions
    from analysis.io import check_output_folder
    from analysis.loading import check_loadable, decoder_depth
    from exit.evaluate import EvaluationFolder, require_answers
    from exit.gates import load_gate_set

    if args.gates is not None:
        load_gate_set(args.gates)  # a broken gate folder fails before the model loads
    if args.out is not None:
        check_output_folder(args.out)
        EvaluationFolder(args.out, _folder_mode(args)).check([spec.name for spec in specs])
    check_loadable(args.model, args.device)
    num_layers = decoder_depth(args.model)
    for spec in specs:
        spec.check_layers(num_layers)
    questions = read_questions(args.questions, limit=args.limit)
    require_answers(questions)
    calibrating = any(CALIBRATION in spec.needs for spec in specs)
    return specs, questions, read_questions(args.calibration_questions) if calibrating else None


def _bind_methods(args: argparse.Namespace, specs: Sequence[MethodSpec], model: Any, processor: Any,
                  calibration_questions: Sequence[Question] | None) -> list[ExitMethod]:
    """The methods for the loaded model: its gates, and the VTW calibration when a method needs it."""
    from analysis.adapters import resolve_adapter
    from exit.evaluate import calibrate_vtw
    from exit.gates import load_gate_set

    num_layers = len(resolve_adapter(model).decoder_layers(model))
    gates = load_gate_set(args.gates, model) if args.gates is not None else None
    calibration = None
    if calibration_questions is not None:
        from tqdm import tqdm

        bar = None if args.no_progress else (lambda items: tqdm(items, desc="VTW calibration", unit="batch"))
        calibration = calibrate_vtw(model, processor, calibration_questions,
                                    args.calibration_image_folder or args.calibration_questions.parent,
                                    args.vtw_eta, args.vtw_samples, args.batch_size, bar)
        print(f"VTW: first layer with mean KL <= {args.vtw_eta:g} over {calibration.samples} calibration samples: "
              f"{calibration.layer}")
    return [spec.bind(num_layers, gates, calibration) for spec in specs]


def _folder_mode(args: argparse.Namespace) -> str:
    return "resume" if args.resume else "add" if args.add else "new"


def _cmd_eval(args: argparse.Namespace) -> int:
    specs, questions, calibration_questions = _check_eval(args)  # before any heavy import

    from tqdm import tqdm

    from analysis.loading import load_model, provenance
    from exit.evaluate import ERRORS_FILE, EvaluationFolder, evaluate_methods

    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, attention=args.attn)
    methods = _bind_methods(args, specs, model, processor, calibration_questions)
    progress = None if args.no_progress else (lambda name: lambda items: tqdm(items, desc=name, unit="batch"))
    _, summary = evaluate_methods(model, processor, questions, args.image_folder, methods, args.out,
                                  args.max_new_tokens, args.batch_size, progress,
                                  provenance=provenance(str(args.model), model, args.attn, "none", args.seed),
                                  mode=_folder_mode(args))
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out is not None:
        print(f"per-question rows and summary.parquet in {args.out}")
        failed = EvaluationFolder(args.out).failed()
        if failed:
            print(f"{len(failed)} question(s) could not be answered and were left out; their reasons are in "
                  f"{Path(args.out) / ERRORS_FILE}", file=sys.stderr)
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from exit.plots import make_exit_figures

    for path in make_exit_figures(args.folder, args.out, args.num_layers):
        print(f"wrote {path}")
    return 0


def _add_label_rule(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    group = parser.add_argument_group("exit labels (exit.sweep.LabelRule)")
    group.add_argument("--min-agreement", type=float, default=0.99,
                       help=f"{prefix}label: argmax agreement above this (default 0.99)")
    group.add_argument("--max-ce-ratio", type=float, default=1.03,
                       help=f"{prefix}label: cross-entropy ratio below this (default 1.03)")


GATE_INPUT_CHOICES = ("hidden", "attention", "both", "history", "hidden+history")
"""exit.gates.GATE_INPUTS, written out so that --help needs no torch (tests/test_gates.py keeps them equal)."""


def _add_sweep(commands: Any) -> None:
    sweep = subcommand(
        commands, "sweep", "exit labels for every question and layer (parquet) and the gate features (safetensors)",
        SWEEP_EXAMPLES,
        parents=[model_options(), question_options(answers=True), batch_options(1), seed_option(), progress_option()],
    )
    sweep.add_argument("--out", required=True, type=Path, help="output folder (exit_sweep-*.parquet, features-*.safetensors)")
    sweep.add_argument("--features", choices=[*GATE_INPUT_CHOICES, "none"], default="hidden",
                       help="gate features to cache for training (default: hidden, the paper's)")
    sweep.add_argument("--answers", type=non_negative_int, default=0, metavar="N",
                       help="also generate every exit layer's answer, up to N greedy tokens as `eval` does, into "
                            "exit_answers-*.parquet (the exit table; 0: off, the default; 4 = eval's default)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue a stopped sweep in --out: skip the questions its committed files hold")
    _add_label_rule(sweep)
    sweep.set_defaults(run=_cmd_sweep)


def _add_features(commands: Any) -> None:
    features = subcommand(
        commands, "features",
        "the gate features of an exit table's questions (one forward each), for a table swept or committed without them",
        FEATURES_EXAMPLES,
        parents=[model_options(), question_options(answers=True), batch_options(1), progress_option()],
    )
    features.add_argument("--table", required=True, type=Path,
                          help="folder of `dyvte-exit sweep` holding these questions: features-pass-*.safetensors go there")
    features.add_argument("--features", choices=GATE_INPUT_CHOICES, default="hidden",
                          help="gate features to compute (default: hidden, the paper's; 'both' serves every gate kind)")
    features.add_argument("--resume", action="store_true",
                          help="skip the questions that have features in --table already")
    features.set_defaults(run=_cmd_features)


def _add_join_stats(commands: Any) -> None:
    join = subcommand(
        commands, "join-stats",
        "gate features from a `dyvte-stats dump` folder, joined by sample id with an exit table's labels (no model runs)",
        JOIN_STATS_EXAMPLES,
    )
    join.add_argument("--stats", required=True, type=Path,
                      help="folder of `dyvte-stats dump` (--heads all: attention and history gates; mean: history)")
    join.add_argument("--table", required=True, type=Path,
                      help="folder of `dyvte-exit sweep` whose labels the features join: features-stats-*.safetensors go there")
    join.set_defaults(run=_cmd_join_stats)


def _add_train(commands: Any) -> None:
    train = subcommand(
        commands, "train", "train one gate per layer on a sweep's cached features (model frozen)", TRAIN_EXAMPLES,
        parents=[model_options(attention=False, dtype=False), question_options(required=False, answers=True),
                 batch_options(128, "training samples per step"), seed_option(), progress_option()],
    )
    train.add_argument("--sweep", type=Path, help="offline: folder written by `dyvte-exit sweep` (features cached)")
    train.add_argument("--online", action="store_true",
                       help="the paper's online scheme instead: one random exit layer per step, labelled on the fly "
                            "(needs --questions and --image-folder)")
    train.add_argument("--features", choices=list(GATE_INPUT_CHOICES), default=None,
                       help="gate input (default: 'hidden' online, the sweep's kind offline; a sweep that cached "
                            "'both' serves every kind)")
    train.add_argument("--out", required=True, type=Path,
                       help="folder for gates.safetensors, gate_config.json, train_report.json")
    train.add_argument("--label-rule", default="cached", metavar="RULE",
                       help="offline: the labels to learn: 'cached' (the sweep's own, default), or paper, agreement, "
                            "ce+0.05, ce+0.2, answer (needs a sweep with --answers), each optionally ',monotone'")
    train.add_argument("--hidden-width", type=positive_int, default=2048, help="gate hidden width (default 2048, the paper's)")
    train.add_argument("--shared", action="store_true",
                       help="offline: one gate for every layer (the layer's one-hot appended, inputs standardised) "
                            "instead of one per layer")
    train.add_argument("--dropout", type=tau_value, default=0.0,
                       help="dropout on the gates' hidden layer while training, in [0, 1) (default 0)")
    train.add_argument("--tau", type=tau_value, default=0.5, help="exit when p(exit) > tau, in [0, 1) (default 0.5)")
    train.add_argument("--lr", type=float, default=6e-5, help="AdamW learning rate (default 6e-5, the paper's)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    train.add_argument("--epochs", type=positive_int, default=1, help="passes over the sweep's samples (default 1)")
    train.add_argument("--holdout", type=float, default=0.2, help="fraction of samples held out for the accuracy report")
    _add_label_rule(train, "--online: ")
    train.set_defaults(run=_cmd_train)


def _add_generate(commands: Any) -> None:
    generate = subcommand(
        commands, "generate", "answer a question about an image with the gates; print the answer and the exit layer",
        GENERATE_EXAMPLES, parents=[model_options(), progress_option()],
    )
    generate.add_argument("--gates", required=True, help=GATES_HELP)
    generate.add_argument("--image", required=True, action="append", help="image file (repeat for several images)")
    generate.add_argument("--question", required=True, help="the question text (the image goes before it)")
    generate.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer tokens at most (default 32)")
    generate.add_argument("--tau", type=tau_value, default=None, help="override the saved threshold, in [0, 1)")
    generate.set_defaults(run=_cmd_generate)


def _add_eval(commands: Any) -> None:
    evaluate = subcommand(
        commands, "eval", "accuracy, exit layers, relative prefill FLOPs and time of exit methods on a question file",
        EVAL_EXAMPLES,
        parents=[model_options(), question_options(answers=True), batch_options(8, "questions about one image per batch"),
                 seed_option(), progress_option()],
    )
    evaluate.add_argument("--method", required=True, action="append",
                          help=" | ".join(METHOD_FORMS) + " (exit.methods; repeat, or separate with commas; all share "
                               "the loaded model; every method is checked before the model loads)")
    evaluate.add_argument("--gates", default=None, help=GATES_HELP + " (for the dyvte methods)")
    evaluate.add_argument("--calibration-questions", type=Path, default=None,
                          help="question file whose first --vtw-samples questions calibrate 'vtw'")
    evaluate.add_argument("--calibration-image-folder", type=Path, default=None,
                          help="images of the calibration questions (default: the question file's folder)")
    evaluate.add_argument("--vtw-eta", type=non_negative, default=0.1, help="VTW's KL threshold in nats (default 0.1)")
    evaluate.add_argument("--vtw-samples", type=positive_int, default=20, help="VTW calibration samples (default 20)")
    evaluate.add_argument("--out", type=Path, default=None,
                          help="folder for eval-<method>.parquet (one row per question) and summary.parquet")
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=4, help="answer tokens at most (default 4)")
    joining = evaluate.add_mutually_exclusive_group()
    joining.add_argument("--resume", action="store_true",
                         help="finish an evaluation in --out: skip the questions each method already answered")
    joining.add_argument("--add", action="store_true",
                         help="evaluate other methods beside those already in --out (the summary covers all)")
    evaluate.set_defaults(run=_cmd_eval)


def _add_figures(commands: Any) -> None:
    figures = subcommand(
        commands, "figures",
        "the accuracy-FLOPs frontier, the exit-layer histogram and the results table of an `eval --out` folder",
        FIGURES_EXAMPLES,
    )
    figures.add_argument("folder", type=Path, help="folder written by `dyvte-exit eval --out`")
    figures.add_argument("--out", type=Path, default=Path("figures"),
                         help="where frontier.png, exit_histogram.png and exit_results.md go")
    figures.add_argument("--num-layers", type=positive_int, default=None,
                         help="decoder layers on the histogram's axis (default: from the summary)")
    figures.set_defaults(run=_cmd_figures)


def _cmd_frontier(args: argparse.Namespace) -> int:
    from analysis.io import check_output_folder
    from exit.frontier import DEFAULT_TAUS, write_frontier
    from exit.gates import load_gate_set

    check_output_folder(args.out)
    folders = {}
    for entry in args.gates:
        name, separator, folder = entry.partition("=")
        if not separator or not name or not folder:
            raise UsageError(f"expected --gates NAME=FOLDER, found {entry!r}")
        folders[name] = folder
    runs = []
    for entry in args.runs:
        name, separator, folder = entry.partition("=")
        if not separator:
            name, folder = "", entry
        elif not (name and folder):
            raise UsageError(f"expected --runs FOLDER or --runs NAME=FOLDER, found {entry!r}")
        runs.append((name or None, folder))
    gates = {name: load_gate_set(folder) for name, folder in folders.items()}
    provenance = {"command": "dyvte-exit " + " ".join(sys.argv[1:]), "gates": folders}
    paths = write_frontier(args.table, args.out, args.figures, provenance, gates=gates, taus=args.taus or list(DEFAULT_TAUS),
                           tau_table=args.tau_table, vtw_layer=args.vtw_layer, runs=runs)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _taus(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1), found {text!r}") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1), found {text!r}")
    return values


def _add_frontier(commands: Any) -> None:
    frontier = subcommand(
        commands, "frontier",
        "the accuracy-FLOPs frontier of an exit table (`sweep --answers`) by lookup: static exits, oracles, "
        "label rules, VTW, DyVTE gates",
        FRONTIER_EXAMPLES,
    )
    frontier.add_argument("--table", required=True, type=Path, help="folder of `dyvte-exit sweep --answers N --features both`")
    frontier.add_argument("--out", required=True, type=Path,
                          help="new folder: eval-*.parquet, summary.parquet, frontier.md, label_rules.md")
    frontier.add_argument("--figures", type=Path, default=None, help="also write the figures into this folder")
    frontier.add_argument("--gates", action="append", default=[], metavar="NAME=FOLDER",
                          help="a gate set looked up on the table's cached features, FOLDER as for eval's --gates; repeat")
    frontier.add_argument("--taus", type=_taus, default=None,
                          help="DyVTE thresholds to look up, comma-separated (default: exit.frontier.DEFAULT_TAUS, 0.5 to 0.99)")
    frontier.add_argument("--tau-table", type=Path, default=None,
                          help="a validation exit table: report the tau each gate set would choose there")
    frontier.add_argument("--vtw-layer", type=int, default=None, help="VTW's exit layer, calibrated on validation questions")
    frontier.add_argument("--runs", action="append", default=[], metavar="[NAME=]FOLDER",
                          help="an `eval --out` folder over the table's questions (real runs: FastV, DyVTE + FastV, ...) whose "
                               "methods join the frontier, labelled with NAME if given (fastv[NAME]:2:0.5); repeatable")
    frontier.set_defaults(run=_cmd_frontier)


def build_parser() -> argparse.ArgumentParser:
    """The ``dyvte-exit`` parser: one subcommand per job, each with its own examples."""
    return command_line("dyvte-exit", "DyVTE visual-token exit: label exit layers, train the gates, answer with them.", EPILOG,
                        (_add_sweep, _add_features, _add_join_stats, _add_train, _add_generate, _add_eval, _add_figures,
                         _add_frontier))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dyvte-exit``; errors print one line and exit 2."""
    return run_command("dyvte-exit", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
