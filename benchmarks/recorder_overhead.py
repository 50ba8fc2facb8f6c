"""Time and peak-memory overhead of recording attention statistics, against a plain SDPA forward.

What it measures
----------------
One prefill (``logits_to_keep=1``, fp32, CPU, ``torch.no_grad``) of a tiny random LLaVA whose
decoder is LLaMA-shaped (256 wide, 8 layers, 4 heads, 4 KV heads, intermediate 688 by default)
on a 336 x 336 image (576 image tokens) and a chat prompt with 64 non-image tokens after the
image, run six ways:

  (a) plain      the model under SDPA, no recorder: the baseline;
  (b) fast       ``with record_attention(model, layout, attention="sdpa"): model(...)``
                 (the switch to the observing attention function and back is inside the timing):
                 the statistics from one fused attention call per layer (values = key-group
                 indicators and keys, with the kernel's log-normaliser);
  (b2) recomputed the same with ``fused=False``: q k^T and exp recomputed beside SDPA in query
                 chunks (the previous default, kept where a device has no fused kernel);
  (c) peers      the way other toolkits record: the whole model in eager attention and
                 ``output_attentions=True`` (every layer's map returned); the switch
                 ``model.set_attn_implementation("eager")`` and back is done outside the timing,
                 as such a model is loaded eager once;
  (d) eager      ``record_attention(model, layout, attention="eager")``: eager decoder attention,
                 weights reduced in a forward hook;
  (f) floor      (a) followed by the fused statistics kernel alone, once per decoder layer on the
                 first layer's recorded query and key (``analysis.stats.fused_kernel_inputs``):
                 what (b) would cost if the recorder did nothing but the kernel call, the floor of
                 the fused design on this machine.

Time: after a warm-up, ``--rounds`` rounds each run every variant once, interleaved (the order
rotates from round to round so that no variant always follows the same one); the median wall time
per variant and its ratio over (a) are printed. Targets (issue 17): fast <= 1.2x on the tiny LLaVA,
<= 1.1x on the demo model.

Kernel floors: then three calls of the fused kernel alone on the first layer's recorded query and key,
timed interleaved: at the model's own head width (the model's attention call, and the least an exact
entropy costs beside it: values = keys), the fast recorder's statistics call ([keys | indicators]) and
one shared call that would replace the model's ([V | K | indicators], q and k zero-padded to that
width, since the CPU kernel needs equal widths). Each design's kernel time per forward is printed
against the budget the time target leaves (``kernel_floors``): a design over it cannot meet the
target on this machine, whatever the code around the kernel does.

Peak extra memory: torch has no peak-memory counter for CPU, so the peak is read from the
profiler. Under ``torch.profiler.profile(profile_memory=True)`` PyTorch's CPU allocator
(``c10::ProfiledCPUMemoryReporter``) reports every allocation and free of a tensor storage made
while profiling as an Allocation event carrying ``alloc_size`` (negative for a free) and
``total_allocated`` (the reporter's running total of live bytes allocated during profiling; blocks
that existed before profiling are not counted, their frees do not lower it). The peak of one
variant is ``max(total_allocated) - total before the first event``: bytes alive at the worst
moment of the block over what was alive when it began. Taking the maximum of the reported running
totals needs no ordering of events that share a timestamp. The running sum of ``alloc_size`` in
time order is computed as well and must agree. The method is validated before use: a bare
allocation of a known size, and the plain forward with a pre-hook that allocates a tensor of known
size kept until the forward ends, must show exactly that size (extra over the plain forward).
Limits: only storage allocated through PyTorch's CPU allocator is seen (scratch memory that
oneDNN/MKL/OpenMP allocate on their own is not), and allocations made on threads that do not
carry the profiler's state (intra-op worker threads) are not reported; the validation and the
determinism check (each variant measured twice) guard against gross errors. Extra = peak of a
variant - peak of (a). Target: fast extra <= one layer's head x query x key fp32 map
(heads * seq * seq * 4 bytes).

``--breakdown`` also profiles where the fast path's extra time goes: aten ops' self CPU time in
(b) minus in (a), and ``observed_group_sums`` of one layer timed on its own.
``--demo`` repeats the measurement on ``analysis.demo.model.load_demo_model()`` when it loads
(skipped with a message otherwise).

``--device`` and ``--dtype`` run the models elsewhere and in another type (GPU timings wait for the
device before each clock read; GPU peaks come from the CUDA allocator's own counter), and
``--preset llava-1.5-7b`` shapes the random model's decoder as LLaVA-1.5-7B's (issue 17's GPU
figure: bf16, target <= 1.1x). A device without a fused statistics kernel in
``analysis.stats.FUSED_KERNELS`` runs the recomputed path; the script prints which kernel ran and
leaves out the kernel floors there.

Run::

    .venv/bin/python benchmarks/recorder_overhead.py
    .venv/bin/python benchmarks/recorder_overhead.py --breakdown --demo
    python benchmarks/recorder_overhead.py --preset llava-1.5-7b --device cuda --dtype bfloat16

Threads: torch's default (printed).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Kineto prints "profiler_start/stop" lines on every profile at its USDT level (5); 6 silences them.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from analysis.adapters import resolve_adapter  # noqa: E402
from analysis.hooks import OBSERVED_SDPA, Hook, attached  # noqa: E402
from analysis.layout import IMAGE, SYSTEM, TEXT, TokenLayout, token_layout  # noqa: E402
from analysis.recorder import default_query_chunk, observed_group_sums, record_attention  # noqa: E402
from analysis.stats import FUSED_KERNELS, fused_kernel_inputs  # noqa: E402
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava, tiny_processor  # noqa: E402

TIME_TARGETS = {"tiny": 1.2, "demo": 1.1, "llava-1.5-7b": 1.1}
"""The fast recorder's time targets over a plain SDPA forward, per benchmarked model."""
PRESETS = {
    # The decoder of LLaVA-1.5-7B (Vicuna-7B) with 576 image tokens; the vision tower stays tiny: the
    # recorder observes the decoder only, and a real tower's cost would only lower every ratio.
    "llava-1.5-7b": {"hidden_size": 4096, "intermediate_size": 11008, "layers": 32, "heads": 32, "kv_heads": 32,
                     "image_size": 336},
}
"""Decoder shapes of real checkpoints for the random model (``--preset``), as defaults of the shape flags."""
FirstLayer = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", float]
"""(query, key, attention mask, scaling) that the decoder's first attention passes to the observers,
captured once per benchmarked model (``capture_first_layer``); every layer's shapes are the first's."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FILLER = (
    "Look at the picture carefully and tell me which objects are in the foreground, which are in "
    "the background, what colours they have and where each of them is placed in the scene."
)

# --------------------------------------------------------------------------------------------
# prompt


def build_inputs(processor: Any, text_tokens: int, image_size: int) -> tuple[dict[str, torch.Tensor], str]:
    """Processor inputs for one image and a question chosen so that the layout's text group (the
    non-image tokens after the image, template included) has ``text_tokens`` tokens if possible."""
    image = Image.new("RGB", (image_size, image_size), (200, 80, 40))
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def encode(question: str) -> tuple[dict[str, torch.Tensor], int]:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = dict(processor(images=[image], text=[prompt], return_tensors="pt"))
        counts = layout_counts(token_layout(inputs["input_ids"], inputs.get("attention_mask"), image_token_id))
        return inputs, counts["text"]

    words = FILLER.split()
    best: tuple[int, dict[str, torch.Tensor], str] | None = None
    for n in range(1, len(words) + 1):  # a few dozen tokenizations at most
        question = " ".join(words[:n])
        inputs, found = encode(question)
        if best is None or abs(found - text_tokens) < best[0]:
            best = (abs(found - text_tokens), inputs, question)
        if found >= text_tokens:
            break
    assert best is not None
    # A byte-level tokenizer can be trimmed to the exact count character by character.
    _, inputs, question = best
    for _ in range(200):
        _, found = encode(question)
        if found == text_tokens or len(question) <= 1:
            break
        if found > text_tokens:
            question = question[:-1].rstrip() or question[:1]
        else:
            break
    inputs, _ = encode(question)
    return inputs, question


def layout_counts(layout: TokenLayout) -> dict[str, int]:
    group = layout.group[0]
    return {
        "system": int((group == SYSTEM).sum()),
        "image": int((group == IMAGE).sum()),
        "text": int((group == TEXT).sum()),
        "total": layout.seq_len,
    }


# --------------------------------------------------------------------------------------------
# variants


@dataclass
class Variant:
    name: str
    label: str
    run: Callable[[], None]
    setup: Callable[[], None] = lambda: None  # untimed, before each run
    teardown: Callable[[], None] = lambda: None  # untimed, after each run


def make_variants(model: Any, inputs: dict[str, torch.Tensor], layout: TokenLayout, num_layers: int,
                  first_layer: FirstLayer) -> list[Variant]:
    adapter = resolve_adapter(model)
    base = adapter.attention_implementation(model)
    if base != "sdpa":
        raise SystemExit(f"expected the model to be loaded with SDPA attention, found {base!r}")

    def plain() -> None:
        with torch.no_grad():
            out = model(**inputs, logits_to_keep=1)
        del out

    def recorded(path: str, fused: bool = True) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), record_attention(model, layout, attention=path, fused=fused) as recording:
                out = model(**inputs, logits_to_keep=1)
            del out
            if len(recording.records) != num_layers:
                raise RuntimeError(f"expected {num_layers} layer records, found {len(recording.records)}")

        return run

    def peers() -> None:
        with torch.no_grad():
            out = model(**inputs, logits_to_keep=1, output_attentions=True)
        if out.attentions is None or len(out.attentions) != num_layers or out.attentions[0] is None:
            raise RuntimeError("expected one attention map per decoder layer from output_attentions=True")
        del out

    # The floor of the fused design: the plain forward plus the statistics kernel alone, once per
    # layer at the recorded shapes (every layer's are the first's), with nothing else of the recorder.
    query, key, mask, scaling = first_layer
    floors = []
    if query.device.type in FUSED_KERNELS:
        kernel_args = fused_kernel_inputs(query, key, mask, layout.to(query.device).key_membership())
        kernel = FUSED_KERNELS[query.device.type]

        def floor() -> None:
            plain()
            with torch.no_grad():
                for _ in range(num_layers):
                    out = kernel(kernel_args[0], kernel_args[1], kernel_args[1], kernel_args[2], scaling)
            del out

        floors.append(Variant("f", "floor: (a) + kernel alone", floor))

    return [
        Variant("a", "plain SDPA forward", plain),
        *floors,
        Variant("b", "fast recorder (fused kernel)", recorded("sdpa")),
        Variant("b2", "fast recorder (recomputed)", recorded("sdpa", fused=False)),
        Variant(
            "c",
            "eager + output_attentions",
            peers,
            setup=lambda: model.set_attn_implementation("eager"),
            teardown=lambda: model.set_attn_implementation("sdpa"),
        ),
        Variant("d", "eager recorder", recorded("eager")),
    ]


def check_recorder_leaves_logits(model: Any, inputs: dict[str, torch.Tensor], layout: TokenLayout) -> str:
    """Raise unless the fast recorder leaves the logits bit-identical; return the statistics kernel it ran."""
    with torch.no_grad():
        plain = model(**inputs, logits_to_keep=1).logits
        with record_attention(model, layout, attention="sdpa") as recording:
            fast = model(**inputs, logits_to_keep=1).logits
    if not torch.equal(plain, fast):
        raise RuntimeError("the fast recorder changed the logits")
    return str(recording.kernel)


def wait_for(device: torch.device) -> None:
    """Block until the device has finished the work queued so far (a GPU runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# time


def time_variants(variants: list[Variant], rounds: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    def once(variant: Variant) -> float:
        variant.setup()
        try:
            gc.collect()
            wait_for(device)
            start = time.perf_counter()
            variant.run()
            wait_for(device)
            return time.perf_counter() - start
        finally:
            variant.teardown()

    for _ in range(warmup):
        for variant in variants:
            once(variant)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for variant in order:
            times[variant.name].append(once(variant))
    return times


# --------------------------------------------------------------------------------------------
# memory


def _allocation_events(prof: Any) -> list[Any]:
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append(node)
        stack.extend(node.children)
    events.sort(key=lambda node: node.start_time_ns)
    return events


def peak_bytes(fn: Callable[[], None], device: torch.device = torch.device("cpu")) -> int:
    """Peak bytes of tensor storage alive during ``fn`` over those alive when it began: on a GPU
    from the CUDA allocator's own peak counter, on the CPU from the profiler (see the docstring)."""
    gc.collect()
    if device.type == "cuda":
        wait_for(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        wait_for(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = _allocation_events(prof)
    if not events:
        return 0
    first = events[0].extra_fields
    baseline = first.total_allocated - first.alloc_size
    peak_total = max(event.extra_fields.total_allocated for event in events) - baseline
    running = peak_sum = 0
    for event in events:
        running += event.extra_fields.alloc_size
        peak_sum = max(peak_sum, running)
    if peak_sum != peak_total:
        print(f"    note: running sum of alloc_size peaks at {mb(peak_sum)}, reported totals at {mb(peak_total)}")
    return max(peak_total, peak_sum)


def measure_peak(variant: Variant, device: torch.device, repeats: int = 2) -> int:
    peaks = []
    for _ in range(repeats):
        variant.setup()
        try:
            peaks.append(peak_bytes(variant.run, device))
        finally:
            variant.teardown()
    if len(set(peaks)) > 1:
        print(f"    note: {variant.label}: peaks differ between repeats: {[mb(p) for p in peaks]}; the largest is used")
    return max(peaks)


def validate_memory_method(model: Any, plain: Variant) -> bool:
    """A known allocation must show its exact size, alone and as extra over the plain forward."""
    known = 12_345_678
    ok = True

    def bare() -> None:
        block = torch.empty(known, dtype=torch.uint8)
        small = torch.empty(1000, dtype=torch.uint8)
        del block, small

    found = peak_bytes(bare)
    ok &= found == known + 1000
    verdict = "OK" if found == known + 1000 else "MISMATCH"
    print(f"  validation, bare allocation of {known + 1000} B: measured {found} B: {verdict}")

    held: list[torch.Tensor] = []

    def allocate(module: Any, args: Any) -> None:
        held.append(torch.empty(known, dtype=torch.uint8))

    def release(module: Any, args: Any, output: Any) -> None:
        held.clear()

    plain_peak = measure_peak(plain, torch.device("cpu"))
    with attached(model, [Hook("", allocate, kind="forward_pre"), Hook("", release)]):
        with_block = measure_peak(plain, torch.device("cpu"))
    extra = with_block - plain_peak
    ok &= extra == known
    print(
        f"  validation, plain forward + {known} B held for the whole forward: extra measured {extra} B: "
        f"{'OK' if extra == known else 'MISMATCH'}"
    )
    return bool(ok)


def capture_first_layer(model: Any, inputs: dict[str, torch.Tensor]) -> FirstLayer:
    """Query, key, mask and scaling that the decoder's first attention passes to the observers."""
    captured: dict[str, Any] = {}

    def observer(module: Any, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float) -> None:
        captured.setdefault("args", (query.clone(), key.clone(), None if mask is None else mask.clone(), scaling))

    adapter = resolve_adapter(model)
    previous = adapter.attention_implementation(model)
    with attached(model, [Hook(adapter.attention_paths(model)[0], observer, kind="attention_observer")]):
        adapter.set_attention_implementation(model, OBSERVED_SDPA)
        try:
            with torch.no_grad():
                model(**inputs, logits_to_keep=1)
        finally:
            adapter.set_attention_implementation(model, previous)
    return captured["args"]


def observer_peak(first_layer: FirstLayer, layout: TokenLayout) -> int:
    """Peak bytes of ``observed_group_sums`` alone on the first layer's query and key."""
    query, key, mask, scaling = first_layer
    on_device = layout.to(query.device)
    qm, km = on_device.query_membership(), on_device.key_membership()
    chunk = default_query_chunk(query.shape[2])

    def run() -> None:
        with torch.no_grad():
            sums = observed_group_sums(query, key, mask, scaling, qm, km, chunk)
        del sums

    run()
    return peak_bytes(run, query.device)


# --------------------------------------------------------------------------------------------
# breakdown


def breakdown(model: Any, first_layer: FirstLayer, layout: TokenLayout, variants: dict[str, Variant], top: int) -> None:
    """Aten ops' self CPU time in the fast path minus in the plain forward; one layer's observer alone."""

    def self_times(variant: Variant, repeats: int = 3) -> dict[str, float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                variant.run()
        return {row.key: row.self_cpu_time_total / repeats / 1000 for row in prof.key_averages()}

    plain = self_times(variants["a"])
    fast = self_times(variants["b"])
    delta = sorted(((fast.get(k, 0.0) - plain.get(k, 0.0), k) for k in set(plain) | set(fast)), reverse=True)
    total = sum(fast.values()) - sum(plain.values())
    print(f"  self CPU ms per forward, fast recorder minus plain (profiled; sum of deltas {total:.1f} ms):")
    print(f"    {'op':<48} {'plain':>8} {'fast':>8} {'delta':>8}")
    for value, key in delta[:top]:
        print(f"    {key[:48]:<48} {plain.get(key, 0.0):8.2f} {fast.get(key, 0.0):8.2f} {value:8.2f}")

    query, key, mask, scaling = first_layer
    adapter = resolve_adapter(model)
    on_device = layout.to(query.device)
    qm, km = on_device.query_membership(), on_device.key_membership()
    chunk = default_query_chunk(query.shape[2])
    mask_text = "None (plain causal)" if mask is None else f"{mask.dtype} {tuple(mask.shape)}"
    with torch.no_grad():
        for _ in range(2):
            observed_group_sums(query, key, mask, scaling, qm, km, chunk)
        samples = []
        for _ in range(10):
            start = time.perf_counter()
            observed_group_sums(query, key, mask, scaling, qm, km, chunk)
            samples.append(time.perf_counter() - start)
    layers = len(adapter.decoder_layers(model))
    one = statistics.median(samples) * 1000
    print(
        f"  observed_group_sums alone, one layer (q {tuple(query.shape)}, mask {mask_text}, chunk {chunk}): "
        f"{one:.2f} ms median, x {layers} layers = {one * layers:.1f} ms"
    )


# --------------------------------------------------------------------------------------------
# kernel floors


def kernel_floors(first_layer: FirstLayer, layout: TokenLayout, num_layers: int, plain_seconds: float,
                  time_target: float, rounds: int = 20) -> None:
    """What the statistics cost at least with this kernel, whatever the recorder does around it.

    Three calls of the fused kernel alone on the first layer's recorded query and key, timed
    interleaved (median of ``rounds``):
      model width   q, k, v of the model's head width: the model's own attention call, and the
                    least an exact entropy costs beside it (it needs every score once more: values
                    = keys, no group columns);
      statistics    the fast recorder's call: values [keys | key-group indicators], q zero-padded;
      shared        one call for the model's output and the statistics: values [V | K | indicators];
                    the kernel needs equal head widths, so q and k are zero-padded to that width too.
                    It would replace the model's own call (and change its output's last bits).
    Each design's extra per forward is set against the budget the time target leaves over the plain
    forward: a design whose kernel calls alone exceed it cannot meet the target on this machine.
    The key stands in for V (same shape, so the same cost). All three run in fp32, the recorder's
    precision: under a bf16 or fp16 model the model's own call is cheaper than the first line.
    """
    query, key, mask, scaling = first_layer
    if query.device.type not in FUSED_KERNELS:
        print(f"\nkernel floors: no fused statistics kernel for {query.device.type} (analysis.stats.FUSED_KERNELS)")
        return
    kernel = FUSED_KERNELS[query.device.type]
    statistics_query, statistics_values, kernel_mask = fused_kernel_inputs(
        query, key, mask, layout.to(query.device).key_membership())
    width = statistics_values.shape[-1]
    query, key = query.float(), key.float()
    shared_values = torch.cat([key, statistics_values], dim=-1)
    shared_query = torch.cat([query, query.new_zeros(()).expand(*query.shape[:3], width)], dim=-1)
    calls = {
        f"model width ({query.shape[-1]})": lambda: kernel(query, key, key, kernel_mask, scaling),
        f"statistics ({width})": lambda: kernel(statistics_query, statistics_values, statistics_values, kernel_mask,
                                                scaling),
        f"shared ({shared_values.shape[-1]})": lambda: kernel(shared_query, shared_values, shared_values, kernel_mask,
                                                              scaling),
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():  # warm-up
            call()
        for r in range(rounds):
            names = list(calls)
            for name in names[r % len(names):] + names[: r % len(names)]:
                wait_for(query.device)
                start = time.perf_counter()
                calls[name]()
                wait_for(query.device)
                samples[name].append(time.perf_counter() - start)
    model_ms, statistics_ms, shared_ms = (statistics.median(samples[name]) * 1000 for name in calls)
    plain_ms = plain_seconds * 1000
    budget = (time_target - 1) * plain_ms
    print(f"\nkernel calls alone, one layer at the recorded shapes (median of {rounds} interleaved rounds):")
    for name in calls:
        print(f"  {name:<20} {statistics.median(samples[name]) * 1000:7.2f} ms")
    print(f"  the target {time_target}x leaves {budget:.1f} ms per forward beyond the plain forward "
          f"({plain_ms:.1f} ms, {num_layers} layers); the kernel calls alone of each design, per forward:")
    designs = {
        "statistics call beside the model's (the fast recorder)": statistics_ms,
        "entropy alone beside the model's (no group columns)": model_ms,
        "shared call instead of the model's (minus the model's)": shared_ms - model_ms,
    }
    for label, per_layer in designs.items():
        extra = per_layer * num_layers
        print(f"    {label:<56} {extra:7.1f} ms = at least {1 + extra / plain_ms:.2f}x "
              f"({'within' if extra <= budget else 'over'} the budget)")


# --------------------------------------------------------------------------------------------
# report


def print_load(when: str) -> None:
    """Other processes on the machine skew timings: say how busy it was."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cpus = os.cpu_count() or 1
    warning = "  (other work is running: timings are contended, compare ratios only)" if load > 0.5 else ""
    print(f"load average (1 min) {when}: {load:.2f} on {cpus} CPUs{warning}")


def mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def benchmark(
    title: str,
    model: Any,
    processor: Any,
    args: argparse.Namespace,
    rounds: int,
    image_size: int,
    time_target: float,
) -> dict[str, Any]:
    adapter = resolve_adapter(model)
    text_config = adapter.text_config(model)
    num_layers = len(adapter.decoder_layers(model))
    heads = text_config.num_attention_heads
    parameter = next(model.parameters())
    inputs, question = build_inputs(processor, args.text_tokens, image_size)
    inputs = {name: value.to(parameter.device, dtype=parameter.dtype if value.is_floating_point() else None)
              for name, value in inputs.items()}
    layout = token_layout(inputs["input_ids"], inputs.get("attention_mask"), adapter.image_token_id(model))
    counts = layout_counts(layout)
    seq = counts["total"]
    layer_map = heads * seq * seq * 4

    print(f"\n=== {title} ===")
    print(
        f"decoder: hidden {text_config.hidden_size}, intermediate {text_config.intermediate_size}, "
        f"layers {num_layers}, heads {heads}, kv heads {text_config.num_key_value_heads}; "
        f"dtype {next(model.parameters()).dtype}, device {next(model.parameters()).device}"
    )
    print(f"question ({len(question)} chars): {question!r}")
    print(
        f"tokens: system {counts['system']}, image {counts['image']}, text {counts['text']} "
        f"(non-image tokens after the image, last included), total {seq}; logits_to_keep=1"
    )
    print(f"one layer's head x query x key fp32 map: {heads} x {seq} x {seq} x 4 B = {layer_map} B ({mb(layer_map)})")

    kernel = check_recorder_leaves_logits(model, inputs, layout)
    print(f"the fast recorder leaves the logits bit-identical; its statistics kernel: {kernel}")
    first_layer = capture_first_layer(model, inputs)
    variants = make_variants(model, inputs, layout, num_layers, first_layer)

    threads = torch.get_num_threads()
    print(f"\ntime (median of {rounds} interleaved rounds after {args.warmup} warm-up rounds; threads {threads}):")
    times = time_variants(variants, rounds, args.warmup, parameter.device)
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    for variant in variants:
        samples = times[variant.name]
        ratio = medians[variant.name] / medians["a"]
        met = "MET" if ratio <= time_target else "NOT MET"
        target = f"   target <= {time_target}x: {met}" if variant.name == "b" else ""
        print(
            f"  ({variant.name}) {variant.label:<27} {medians[variant.name] * 1000:9.2f} ms "
            f"[min {min(samples) * 1000:8.2f}, max {max(samples) * 1000:8.2f}]  {ratio:5.2f}x{target}"
        )
    switch = []
    for _ in range(5):
        start = time.perf_counter()
        model.set_attn_implementation("eager")
        model.set_attn_implementation("sdpa")
        switch.append(time.perf_counter() - start)
    print(f"  (switching eager and back, excluded from (c): {statistics.median(switch) * 1000:.2f} ms)")
    kernel_floors(first_layer, layout, num_layers, medians["a"], time_target)

    on_gpu = parameter.device.type == "cuda"
    if on_gpu:
        print("\npeak memory (the CUDA allocator's peak counter, torch.cuda.max_memory_allocated):")
        valid = True
    else:
        print("\npeak memory (CPU tensor storage via the profiler's allocation events; see the docstring):")
        valid = validate_memory_method(model, variants[0])
    peaks = {variant.name: measure_peak(variant, parameter.device) for variant in variants}
    for variant in variants:
        extra = peaks[variant.name] - peaks["a"]
        line = f"  ({variant.name}) {variant.label:<27} peak {mb(peaks[variant.name]):>12}   extra over (a) {mb(extra):>12}"
        line += f"  = {extra / layer_map:5.2f} x one layer's map"
        if variant.name == "b":
            line += f"   target <= 1 map ({mb(layer_map)}): {'MET' if extra <= layer_map else 'NOT MET'}"
        print(line)
    alone = observer_peak(first_layer, layout)
    print(
        f"  observed_group_sums alone on one layer (query chunk {default_query_chunk(seq)}): peak {mb(alone)} "
        f"= {alone / layer_map:.2f} x one layer's map (the fast path's side buffers; (b)'s extra is smaller when "
        "they fit under the plain forward's own peak)"
    )
    if not valid:
        print("  WARNING: the memory method failed its validation on this machine; treat the numbers above with care")

    if args.breakdown and on_gpu:
        print("\nwhere the fast recorder's extra time goes: --breakdown profiles CPU time only, skipped on a GPU")
    elif args.breakdown:
        print("\nwhere the fast recorder's extra time goes:")
        breakdown(model, first_layer, layout, {v.name: v for v in variants}, args.top)
    return {"medians": medians, "peaks": peaks, "layer_map": layer_map}


def main(argv: list[str] | None = None) -> int:
    presets = argparse.ArgumentParser(add_help=False)
    presets.add_argument("--preset", choices=sorted(PRESETS),
                         help="the random model's decoder shaped as this checkpoint's (the shape flags still override it)")
    preset = presets.parse_known_args(argv)[0].preset
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[presets])
    parser.add_argument("--device", default="cpu", help="where the models run, e.g. cuda (GPU timings wait for the "
                        "device before reading the clock)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the models' weights and inputs")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=688, help="LLaMA-like: about 8/3 x hidden, multiple of 16")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=336, help="336 gives (336/14)^2 = 576 image tokens")
    parser.add_argument("--text-tokens", type=int, default=64, help="non-image tokens after the image")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true", help="profile where the fast recorder's extra time goes")
    parser.add_argument("--top", type=int, default=12, help="ops listed by --breakdown")
    parser.add_argument("--demo", action="store_true", help="also measure the demo model (analysis.demo.model)")
    parser.add_argument("--demo-rounds", type=int, default=3)
    if preset is not None:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"expected a torch device such as cpu or cuda for --device, found {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("expected a usable GPU for --device cuda, found torch.cuda.is_available() False")
    dtype = DTYPES[args.dtype]

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()} (intra-op, torch default), interop {torch.get_num_interop_threads()}"
    )
    print_load("at start")
    spec = TinyLlavaSpec(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        image_size=args.image_size,
    )
    model = tiny_llava(spec, attn_implementation="sdpa", device=device, dtype=dtype)
    processor = tiny_processor(args.image_size)
    title = f"random LLaVA, decoder shaped as {preset}" if preset else "tiny LLaVA"
    benchmark(f"{title} {spec}", model, processor, args, args.rounds, args.image_size, TIME_TARGETS[preset or "tiny"])
    del model

    if args.demo:
        try:
            from analysis.demo.model import load_demo_model
        except ImportError as error:
            print(f"\n=== demo model: skipped, analysis.demo.model is not importable ({error}) ===")
            return 0
        try:
            start = time.perf_counter()
            demo_model, demo_processor = load_demo_model(attn_implementation="sdpa")
            demo_model = demo_model.to(device=device, dtype=dtype).eval()
            print(f"\n(demo model loaded in {time.perf_counter() - start:.1f} s)")
        except Exception as error:  # any failure to load is a skip, not a benchmark failure
            print(f"\n=== demo model: skipped, it did not load: {type(error).__name__}: {error} ===")
            return 0
        crop = getattr(demo_processor.image_processor, "crop_size", None)
        demo_size = crop["height"] if crop else 336
        benchmark("demo model (analysis.demo.model)", demo_model, demo_processor, args, args.demo_rounds, demo_size,
                  TIME_TARGETS["demo"])
    print_load("at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
