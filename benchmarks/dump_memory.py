"""Memory stays flat while a dump streams to parquet: peak RSS after 100 and after 1,000 samples.

Builds a tiny random LLaVA (``analysis.testing.tiny``) and a question file of ``--samples`` questions over a
handful of images in a temporary folder, dumps the first ``--checkpoint`` questions and reads the
process's peak resident set size (``ru_maxrss``), then continues the same dump to all questions
with ``resume=True`` and reads it again. Peak RSS never goes down, so the second figure is the peak
of the whole run; the target is that it stays within 10% of the first.

    python benchmarks/dump_memory.py                      # 1,000 samples, checkpoint at 100
    python benchmarks/dump_memory.py --samples 2000 --heads all --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Current resident set size, MiB (from /proc/self/statm; the peak where that is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mib()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_inputs(folder: Path, samples: int, image_size: int) -> tuple[Path, Path, Path]:
    """A tiny model, 8 images and ``samples`` questions of varying length under ``folder``."""
    from PIL import Image

    from analysis.testing.tiny import TinyLlavaSpec, save_tiny_llava

    model = save_tiny_llava(folder / "model", TinyLlavaSpec(num_kv_heads=2, image_size=image_size))
    images = folder / "images"
    images.mkdir()
    colours = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (48 + 8 * i, 48), colour).save(images / f"{i}.png")
    lines = [
        {"question_id": f"q{i:06d}", "image": f"{i % len(colours)}.png", "text": "What colour is it?" + " Why?" * (i % 7)}
        for i in range(samples)
    ]
    questions = folder / "questions.jsonl"
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return model, questions, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--checkpoint", type=int, default=100, help="first measurement after this many samples")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--heads", choices=["all", "mean", "max"], default="mean")
    parser.add_argument("--image-size", type=int, default=56, help="pixels of the tiny model's images; (size/14)^2 tokens")
    parser.add_argument("--batches-per-file", type=int, default=64)
    args = parser.parse_args()

    import torch

    from analysis.data import read_questions
    from analysis.dump import dump_statistics
    from analysis.io import read_samples
    from analysis.loading import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="dump-memory-") as tmp:
        model_dir, question_file, images = build_inputs(Path(tmp), args.samples, args.image_size)
        questions = read_questions(question_file)
        model, processor = load_model(model_dir)
        out = Path(tmp) / "out"
        common = dict(heads=args.heads, batch_size=args.batch_size, progress=False, batches_per_file=args.batches_per_file)
        print(f"before the dump: peak RSS {peak_rss_mib():.1f} MiB, current {current_rss_mib():.1f} MiB")
        start = time.perf_counter()
        first = dump_statistics(model, processor, questions[: args.checkpoint], images, out, **common)
        at_checkpoint = peak_rss_mib()
        print(f"after {first.samples} samples: peak RSS {at_checkpoint:.1f} MiB, current {current_rss_mib():.1f} MiB "
              f"({time.perf_counter() - start:.1f} s)")
        rest = dump_statistics(model, processor, questions, images, out, resume=True, **common)
        at_end = peak_rss_mib()
        total = len(read_samples(out))
        print(f"after {total} samples: peak RSS {at_end:.1f} MiB, current {current_rss_mib():.1f} MiB "
              f"({time.perf_counter() - start:.1f} s; {rest.rows + first.rows} statistics rows)")
        growth = at_end / at_checkpoint - 1
        verdict = "within" if growth <= 0.10 else "NOT within"
        print(f"peak RSS growth from {args.checkpoint} to {total} samples: {growth:+.1%} ({verdict} the 10% target)")


if __name__ == "__main__":
    main()
