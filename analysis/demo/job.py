"""The main job: attention statistics of the demo model on the ShapesVQA test split.

``run_demo`` is what ``make demo`` / ``dyvte-stats demo`` runs with no arguments: it generates the
ShapesVQA test split if it is not on disk yet, loads the demo model through the same
``load_model`` path as any checkpoint id (``--model demo`` resolves to the folder where the
assembled model is cached), dumps the statistics of the first question of each of the first 64
test images to parquet and returns the dump and its per-layer summary.

The output folder is written as a whole: the new dump goes to a temporary sibling folder that
replaces the old one only when it is complete, so an interrupted run never leaves a half-written
``runs/demo`` nor destroys the previous complete one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.data import Question, read_questions
from analysis.dump import DumpResult, dump_statistics, summarize
from analysis.io import read_statistics, replaced_when_complete
from analysis.loading import load_model

DEMO_MODEL_ID = "demo"
"""The model name (``analysis.loading.NAMED_MODELS``) that resolves to the demo model's folder."""

DEFAULT_OUT = Path("runs/demo")
DEFAULT_SAMPLES = 64
DEFAULT_ANSWER_TOKENS = 4
"""Answer tokens whose attention the demo records (``dyvte-stats demo --generate``): ShapesVQA
answers are one or two words."""


def default_data_root() -> Path:
    """``.cache/shapesvqa`` under the repository root (git-ignored), where ShapesVQA splits are generated."""
    return Path(__file__).resolve().parents[2] / ".cache" / "shapesvqa"


def one_question_per_image(questions: Sequence[Question], limit: int) -> list[Question]:
    """The first question of each image, in file order, until ``limit`` questions (each image once)."""
    chosen: list[Question] = []
    seen: set[tuple[str, ...]] = set()
    for question in questions:
        if question.images not in seen:
            seen.add(question.images)
            chosen.append(question)
            if len(chosen) == limit:
                break
    return chosen


@dataclass(frozen=True)
class DemoResult:
    dump: DumpResult
    summary: pd.DataFrame
    questions: Path
    splits: dict[str, Path]  # every ShapesVQA split folder (train, val, test), for the exit examples


def run_demo(
    out_dir: str | Path = DEFAULT_OUT,
    data_root: str | Path | None = None,
    samples: int = DEFAULT_SAMPLES,
    heads: str = "all",
    attention: str = "sdpa",
    progress: bool = True,
    generate: int = DEFAULT_ANSWER_TOKENS,
) -> DemoResult:
    """Dump the statistics of ``samples`` ShapesVQA test questions (one per image) of the demo model.

    All three ShapesVQA splits are made if missing (train about 20 s, val and test about 1 s): the
    test split is dumped here, and train and val are what the ``dyvte-exit`` examples sweep, train
    and calibrate on.

    Args:
        out_dir: output folder; an earlier dump there is replaced only once the new one is complete.
        data_root: where the ShapesVQA splits live (default :func:`default_data_root`).
        samples: number of questions (at most one per test image).
        heads: "all" (default: every head, which the layer x head figure needs), "mean" or "max"
            (as ``dyvte-stats dump --heads``).
        attention: "sdpa" (the fast path) or "eager".
        progress: show a progress bar.
        generate: also record the attention of up to this many greedy answer tokens (as
            ``dyvte-stats dump --generate``); 0: the prompt only.

    Raises:
        DemoModelUnavailable: the demo model's wheels are not installed (the message says how).
        ValueError: ``samples`` < 1.
    """
    from analysis.demo.shapes import QUESTIONS_FILE, ensure_split

    if samples < 1:
        raise ValueError(f"expected at least 1 sample, found {samples}")
    root = data_root or default_data_root()
    splits = {name: ensure_split(root, name) for name in ("train", "val", "test")}
    split = splits["test"]
    questions = one_question_per_image(read_questions(split / QUESTIONS_FILE), samples)
    model, processor = load_model(DEMO_MODEL_ID, attention=attention)

    out_dir = Path(out_dir)
    with replaced_when_complete(out_dir) as staging:
        result = dump_statistics(
            model, processor, questions, split, staging,
            model_id=DEMO_MODEL_ID, heads=heads, attention=attention, progress=progress, generate=generate,
        )
    dump = DumpResult(out_dir, result.samples, result.rows, [out_dir / f.name for f in result.files])
    return DemoResult(dump, summarize(read_statistics(out_dir)), split / QUESTIONS_FILE, splits)
