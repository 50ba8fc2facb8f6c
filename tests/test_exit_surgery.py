"""Visual-token exit surgery against a hand-written reference, row-alone runs and cached decoding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from analysis import resolve_adapter, token_layout
from analysis.hooks import Hook, attached, attached_count
from analysis.layout import IMAGE, PADDING
from exit import ExitSurgeryError, VisualExit, compact_layout, visual_token_exit

IMPLEMENTATIONS = ["eager", "sdpa"]
# Per batch case: exit plans (one entry per row; None = no exit).
PLANS = {
    "batch1": [[1], [0]],
    "batch2_left_padding": [[0, 2], [1, None], [2, 2]],
    "two_images": [[2], [0]],
}
TOLERANCE = 1e-5


def layout_of(model, inputs):
    return token_layout(inputs["input_ids"], inputs["attention_mask"], resolve_adapter(model).image_token_id(model))


def with_positions(inputs):
    """Position ids as generate() makes them (left padding starts each row at 0)."""
    positions = inputs["attention_mask"].long().cumsum(-1) - 1
    return {**inputs, "position_ids": positions.clamp_min(0)}


def masked_image_reference(model, inputs, plan):
    """The reference: in every layer after a row's exit, that row's image keys are masked for every query.

    The 4-D masks are written by hand here (causal, padding, image keys), independent of the surgery.
    """
    layout = layout_of(model, inputs)
    group = layout.group
    seq = layout.seq_len
    exits = torch.tensor([-1 if k is None else k for k in plan])
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    eager = resolve_adapter(model).attention_implementation(model) == "eager"
    paths = resolve_adapter(model).layer_paths(model)

    def hook_for(layer):
        def hook(module, args, kwargs):
            removed = (group == IMAGE) & ((exits >= 0) & (exits < layer))[:, None]
            keys = (group != PADDING) & ~removed
            allowed = causal[None, None] & keys[:, None, None, :]
            if eager:
                mask = torch.zeros(allowed.shape, dtype=args[0].dtype).masked_fill(~allowed, torch.finfo(args[0].dtype).min)
            else:
                mask = allowed
            return args, {**kwargs, "attention_mask": mask}

        return hook

    first = min((k for k in plan if k is not None), default=len(paths))
    hooks = [Hook(path, hook_for(i), kind="forward_pre", with_kwargs=True) for i, path in enumerate(paths) if i > first]
    with torch.no_grad(), attached(model, hooks):
        return model(**inputs).logits


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_removal_equals_masking_image_keys(tiny_models, attention_kind, batch, implementation):
    model = tiny_models(attention_kind, implementation)
    inputs = with_positions(batch.inputs)
    layout = layout_of(model, inputs)
    kept = (layout.group != PADDING) & (layout.group != IMAGE)
    for plan in PLANS[batch.name]:
        expected = masked_image_reference(model, inputs, plan)
        for compact in (True, False):
            with torch.no_grad(), visual_token_exit(model, plan, compact=compact) as surgery:
                found = model(**inputs).logits
            assert surgery.exit_layers == plan
            assert found.shape == expected.shape
            error = (found - expected)[kept].abs().max().item()
            assert error <= TOLERANCE, (plan, compact, error)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_layers_after_the_exit_cache_no_image_keys(tiny_models, case_inputs, implementation):
    model = tiny_models("gqa", implementation)
    inputs = case_inputs("batch2_left_padding")
    layout = layout_of(model, inputs)
    kept = ((layout.group != PADDING) & (layout.group != IMAGE)).sum(1).max().item()
    with torch.no_grad(), visual_token_exit(model, [1, 2]):
        cache = model(**inputs, use_cache=True).cache
    lengths = [cache.layers[i].keys.shape[2] for i in range(len(cache.layers))]
    assert lengths == [layout.seq_len] * 3 + [kept]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_padded_batch_equals_each_row_alone(tiny_models, case_inputs, attention_kind, implementation):
    model = tiny_models(attention_kind, implementation)
    inputs = with_positions(case_inputs("batch2_left_padding"))
    layout = layout_of(model, inputs)
    for plan in PLANS["batch2_left_padding"]:
        with torch.no_grad(), visual_token_exit(model, plan):
            together = model(**inputs).logits
        for row, exit_layer in enumerate(plan):
            real = inputs["attention_mask"][row].bool()
            alone_inputs = {
                "input_ids": inputs["input_ids"][row : row + 1, real],
                "attention_mask": inputs["attention_mask"][row : row + 1, real],
                "pixel_values": inputs["pixel_values"][row : row + 1],
            }
            with torch.no_grad(), visual_token_exit(model, exit_layer):
                alone = model(**alone_inputs).logits[0]
            kept = (layout.group[row] != IMAGE)[real]
            error = (together[row, real][kept] - alone[kept]).abs().max().item()
            assert error <= TOLERANCE, (plan, row, error)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_exit_and_exit_after_last_layer_are_bit_identical(tiny_models, batch, implementation):
    model = tiny_models("gqa", implementation)
    last = len(resolve_adapter(model).decoder_layers(model)) - 1
    rows = batch.inputs["input_ids"].shape[0]
    with torch.no_grad():
        stock = model(**batch.inputs).logits
        for plan in (None, [None] * rows, last, [last] * rows):
            with visual_token_exit(model, plan):
                assert torch.equal(model(**batch.inputs).logits, stock), plan
        stock_tokens = model.generate(**batch.inputs, max_new_tokens=3, do_sample=False)
        with visual_token_exit(model, [last] * rows):
            assert torch.equal(model.generate(**batch.inputs, max_new_tokens=3, do_sample=False), stock_tokens)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("plan", [[1, 2], [0, None], [2, 2]])
def test_cached_generate_equals_recomputation(tiny_models, case_inputs, attention_kind, implementation, plan):
    model = tiny_models(attention_kind, implementation)
    inputs = case_inputs("batch2_left_padding")
    image_id = resolve_adapter(model).image_token_id(model)
    steps = 4
    with torch.no_grad(), visual_token_exit(model, plan):
        generated = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            suppress_tokens=[image_id],
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt = inputs["input_ids"].shape[1]
    assert generated.sequences.shape[1] == prompt + steps
    for step in range(steps):
        ids = generated.sequences[:, : prompt + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones(ids.shape[0], step, dtype=torch.long)], dim=1)
        recompute = with_positions({"input_ids": ids, "attention_mask": mask, "pixel_values": inputs["pixel_values"]})
        with torch.no_grad(), visual_token_exit(model, plan):
            logits = model(**recompute).logits[:, -1]
        cached = generated.logits[step]
        assert (logits - cached).abs().max().item() <= TOLERANCE, step
        logits[:, image_id] = -torch.inf
        logits[:, model.config.text_config.eos_token_id] = -torch.inf  # min_new_tokens suppresses it
        assert torch.equal(logits.argmax(-1), generated.sequences[:, prompt + step])


def test_no_hook_left_behind(tiny_models, case_inputs):
    model = tiny_models("mha", "sdpa")
    inputs = case_inputs("batch1")
    with torch.no_grad():
        model(**inputs)  # transformers attaches its own output-capturing hooks on the first forward
    before = attached_count(model)
    with visual_token_exit(model, 1):
        assert attached_count(model) > before
        with visual_token_exit(model, 2):
            pass
        assert attached_count(model) > before
    assert attached_count(model) == before
    with pytest.raises(RuntimeError, match="boom"), visual_token_exit(model, 1):
        raise RuntimeError("boom")
    assert attached_count(model) == before
    handle = visual_token_exit(model, [0]).attach()
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    handle.remove()
    assert attached_count(model) == before


def reporting(adapter, implementation):
    """A copy of ``adapter`` that reports ``implementation`` as the decoder's attention."""

    class Reporting(type(adapter)):
        def attention_implementation(self, model):
            return implementation

    return Reporting(**{f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter) if f.init})


def test_the_handle_attaches_on_entry_only(tiny_models, case_inputs):
    model = tiny_models("mha", "sdpa")
    inputs = case_inputs("batch1")
    with torch.no_grad():
        stock = model(**inputs).logits  # also attaches transformers' own output-capturing hooks
    before = attached_count(model)
    surgery = visual_token_exit(model, [0])
    assert isinstance(surgery, VisualExit) and not surgery.is_attached and attached_count(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock), "a handle that was never entered changes nothing"
    with surgery as entered:
        assert entered is surgery and surgery.is_attached and attached_count(model) > before
        with pytest.raises(ExitSurgeryError, match="attached already"):
            surgery.attach()
        assert surgery.is_attached and attached_count(model) > before
        with torch.no_grad():
            exited = model(**inputs).logits
    assert not surgery.is_attached and attached_count(model) == before
    assert surgery.exit_layers == [0], "what the last prefill did stays readable after leaving"
    # handle use: attach() returns the handle, remove() is idempotent, the surgery is the same
    assert surgery.attach() is surgery and attached_count(model) > before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, exited)
    surgery.remove()
    surgery.remove()
    assert not surgery.is_attached and attached_count(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)
    with surgery:  # a removed handle can be entered again
        assert attached_count(model) > before
    assert attached_count(model) == before


def test_a_failing_construction_attaches_nothing(tiny_models, case_inputs):
    model = tiny_models("mha", "sdpa")
    with torch.no_grad():
        model(**case_inputs("batch1"))
    before = attached_count(model)
    adapter = resolve_adapter(model)
    with pytest.raises(ExitSurgeryError, match="no module named"):
        VisualExit(model, 1, adapter=dataclasses.replace(adapter, final_norm_path="model.language_model.no_norm"))
    with pytest.raises(ExitSurgeryError, match="flash_attention_2"):
        VisualExit(model, 1, adapter=reporting(adapter, "flash_attention_2"))
    with pytest.raises(ExitSurgeryError, match="removal layers in 0..3"):
        VisualExit(model, removals={4: torch.zeros(1, 2, dtype=torch.bool)})
    with pytest.raises(ExitSurgeryError, match="exit layer in 0..3"):
        VisualExit(model, [0, 9])
    assert attached_count(model) == before


def test_bad_plans_are_rejected(tiny_models, case_inputs):
    model = tiny_models("mha", "sdpa")
    with pytest.raises(ExitSurgeryError, match="exit layer in 0..3"):
        visual_token_exit(model, 4)
    before = attached_count(model)
    with pytest.raises(ExitSurgeryError, match="one exit layer per row"), visual_token_exit(model, [1, 2]):
        model(**case_inputs("batch1"))
    assert attached_count(model) == before


def test_compact_layout_right_aligns_kept_tokens():
    keep = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    layout = compact_layout(keep)
    assert layout.index.tolist() == [[0, 1, 2, 4], [0, 1, 2, 3]]
    assert layout.valid.tolist() == [[False, True, True, True], [True, True, True, True]]
    values = torch.arange(10.0).view(2, 5, 1)
    back = layout.scatter(layout.gather(values) * -1, values)
    assert back[..., 0].tolist() == [[0, -1, -2, 3, -4], [-5, -6, -7, -8, 9]]
