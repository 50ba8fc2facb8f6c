"""Cost of the exit sweep (every layer) against one full forward, on the demo model.

What it measures
----------------
The demo LLaVA (``analysis.demo.model.load_demo_model``, 30 decoder layers, 336 px -> 576 image
tokens, fp32, CPU, SDPA, ``torch.no_grad``) on ShapesVQA validation questions, teacher-forced on
their reference answers (``exit.sweep.teacher_forced_inputs``), batch of ``--batch`` rows:

  (a) forward        ``model(**inputs)``: one full forward, logits at every position;
  (b) forward-last   ``model(**inputs, logits_to_keep=1)``: the stricter baseline;
  (c) sweep          ``exit.sweep.exit_sweep(model, inputs, answer_mask)``: labels for all 30 exit layers;
  (d) table          ``exit_sweep(..., answers=4)``: the labels plus every exit layer's generated
                     answer (up to 4 greedy tokens, ``exit.answers``), what ``dyvte-exit sweep
                     --answers 4`` computes per batch.

After one warm-up, ``--rounds`` rounds run the three interleaved (the order rotates); the median
wall time of each and the ratios sweep / forward and sweep / forward-last are printed.
Targets: sweep <= 4x one full forward; table <= 3x one full forward (issue 16).

Run::

    .venv/bin/python benchmarks/exit_sweep_cost.py --rounds 5

Threads: ``--threads`` (default: torch's default), printed. Needs the demo model's wheels and a
generated ShapesVQA validation split (``.cache/shapesvqa/val``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from analysis.data import build_prompt, load_image, read_questions  # noqa: E402
from analysis.demo.job import default_data_root  # noqa: E402
from analysis.demo.model import load_demo_model  # noqa: E402
from exit.sweep import exit_sweep, teacher_forced_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_demo_model(image_size=336)
    folder = default_data_root() / "val"
    questions = read_questions(folder / "questions.jsonl", limit=args.batch)
    prompts = [build_prompt(processor, q) for q in questions]
    images = [[load_image(folder, name) for name in q.images] for q in questions]
    inputs, answer_mask = teacher_forced_inputs(processor, prompts, images, [str(q.answer) for q in questions])
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum(1)[0])
    print(f"threads {torch.get_num_threads()}; batch {args.batch}; tokens per row {inputs['input_ids'].shape[1]}, "
          f"image tokens {image_tokens}, answer tokens {answer_mask.sum(1).tolist()}")

    variants: dict[str, Callable[[], object]] = {
        "forward": lambda: model(**inputs),
        "forward-last": lambda: model(**inputs, logits_to_keep=1),
        "sweep": lambda: exit_sweep(model, inputs, answer_mask),
        "table": lambda: exit_sweep(model, inputs, answer_mask, answers=4),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    with torch.no_grad():
        for name in names:  # warm-up
            variants[name]()
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name in names:
        print(f"{name:13s} median {median[name]:.3f} s  ({', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"sweep / forward      {median['sweep'] / median['forward']:.2f}x  (target <= 4x)")
    print(f"sweep / forward-last {median['sweep'] / median['forward-last']:.2f}x")
    print(f"table / forward      {median['table'] / median['forward']:.2f}x  (target <= 3x)")
    print(f"table / forward-last {median['table'] / median['forward-last']:.2f}x")


if __name__ == "__main__":
    main()
