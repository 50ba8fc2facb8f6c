"""Training and evaluation code of the demo model (analysis.demo_training), on a tiny LLaVA.

Cheap: a 4-layer hidden-64 model, 28 px images (4 image tokens) and a 6-image ShapesVQA split.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from analysis import demo_training as dt  # noqa: E402
from analysis.data import build_prompt, load_image, read_questions  # noqa: E402
from analysis.demo_model import apply_demo_weights  # noqa: E402
from analysis.shapes import QUESTION_TYPES, write_split  # noqa: E402
from analysis.tiny import TinyLlavaSpec, tiny_llava, tiny_processor  # noqa: E402

SPEC = TinyLlavaSpec(num_kv_heads=2)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return write_split(tmp_path_factory.mktemp("shapes"), "train", 6, seed=11, image_size=84)


@pytest.fixture
def tiny():
    return tiny_llava(SPEC), tiny_processor(SPEC.image_size)


def _config(**changes) -> dt.TrainConfig:
    base = dict(steps=6, batch_size=2, warmup=1, rank=4, extra_per_type=1, image_size=SPEC.image_size,
                bf16=False, lr_projector=1e-2, lr_lora=1e-2)
    return dt.TrainConfig(**{**base, **changes})


def test_pack_split_groups_questions_by_image(split):
    examples = dt.pack_split(split, extra_per_type=2, seed=0)
    questions = read_questions(split / "questions.jsonl")
    assert [e.image for e in examples] == sorted({q.images[0] for q in questions})
    for example in examples:
        texts = [t[1] for t in example.turns]
        assert len(texts) == len(set(texts))  # no repeated question
        own = {q.text for q in questions if q.images[0] == example.image}
        assert own <= set(texts) and len(texts) > len(own)
        assert {t[0] for t in example.turns} <= set(QUESTION_TYPES)
    assert dt.pack_split(split, extra_per_type=2, seed=0) == examples
    assert dt.pack_split(split, extra_per_type=2, seed=1) != examples


def test_first_turn_matches_the_inference_prompt(split, tiny):
    model, processor = tiny
    question = read_questions(split / "questions.jsonl")[0]
    inputs = processor(images=load_image(split, question.images[0]), text=build_prompt(processor, question),
                       return_tensors="pt")
    turns = [("colour", question.text, question.answer), ("count", "How many shapes are there?", "3")]
    ids, labels, categories = dt.encode_conversation(processor, turns, model.config.image_token_id, 4)
    prompt = inputs["input_ids"][0].tolist()
    assert ids[:len(prompt)].tolist() == prompt
    assert categories == ["colour", "count"]
    labelled = processor.tokenizer.decode(ids[labels != dt.IGNORE])
    assert labelled.replace(" ", "") == question.answer + "3"
    assert int((ids == model.config.image_token_id).sum()) == 4  # image once, in the first turn


def test_image_features_are_what_the_model_projects(tiny):
    model, _ = tiny
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    features = dt.image_features(model, pixels)
    with torch.no_grad():
        expected = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="default").pooler_output[0]
        torch.testing.assert_close(model.model.multi_modal_projector(features)[0], expected, rtol=0, atol=0)


def test_fresh_adapters_leave_logits_unchanged_and_leave_no_hook(tiny):
    model, _ = tiny
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        adapters = dt.LoraAdapters(model, rank=4)
        with adapters.attached(model):
            during = model(input_ids=ids).logits
            assert _hook_count(model) == len(adapters.paths)
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    assert len(adapters.paths) == SPEC.num_layers * len(dt.LORA_TARGETS)
    assert _hook_count(model) == 0


def _hook_count(model) -> int:
    # transformers installs its own output-capturing hooks on first use: count only ours (closures named "lora_hook")
    return sum(h.__name__ == "lora_hook" for m in model.modules() for h in m._forward_hooks.values())


def test_merged_adapters_equal_the_hooked_model(tiny, tmp_path):
    model, _ = tiny
    adapters = dt.LoraAdapters(model, rank=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in adapters.B:
            b.normal_(0, 0.1)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), adapters.attached(model):
        hooked = model(input_ids=ids).logits
    path = dt.save_demo_weights(tmp_path / "w.safetensors", model, adapters, {"steps": 3})
    assert sum(k.startswith(dt.LORA_PREFIX) for k in load_file(str(path))) == 2 * len(adapters.paths)
    apply_demo_weights(model, path)  # projector (unchanged) + merged B @ A
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, hooked, rtol=1e-5, atol=1e-5)


def test_training_lowers_the_loss_and_is_deterministic(split, tmp_path):
    examples = dt.pack_split(split, extra_per_type=1, seed=0)
    runs = []
    for name in ("a", "b"):
        model, processor = tiny_llava(SPEC), tiny_processor(SPEC.image_size)
        adapters, records = dt.train_demo(model, processor, examples, split, _config(), tmp_path / name, progress=False)
        runs.append((model, adapters, records))
    (model_a, adapters_a, records_a), (model_b, adapters_b, records_b) = runs
    assert [r["loss"] for r in records_a] == [r["loss"] for r in records_b]
    assert records_a[-1]["loss"] < records_a[0]["loss"]
    for x, y in zip(model_a.model.multi_modal_projector.parameters(), model_b.model.multi_modal_projector.parameters()):
        assert torch.equal(x, y)
    saved = load_file(str(tmp_path / "a" / "demo_weights.safetensors"))
    assert torch.equal(saved["model.multi_modal_projector.linear_1.weight"],
                       model_a.model.multi_modal_projector.linear_1.weight)
    assert len((tmp_path / "a" / "log.jsonl").read_text().splitlines()) == 6
    assert json.loads((tmp_path / "a" / "config.json").read_text())["steps"] == 6
    assert _hook_count(model_a) == 0


def test_standardised_projector_centres_and_matches_text_norms(tiny):
    model, _ = tiny
    features = 5 + 3 * torch.randn(2, 4, SPEC.vision_hidden_size, generator=torch.Generator().manual_seed(0))
    first = model.model.multi_modal_projector.linear_1
    old_bias = first.bias.detach().clone()
    norms = dt.standardise_projector(model, features)
    assert norms["projected_norm_after"] == pytest.approx(norms["text_embedding_norm"], rel=1e-4)
    with torch.no_grad():  # linear_1 now sees centred channels: the mean feature maps to the old bias
        torch.testing.assert_close(first(features.reshape(-1, SPEC.vision_hidden_size).mean(0)), old_bias,
                                   rtol=0, atol=1e-4)


def test_training_continues_from_saved_weights(split, tmp_path):
    examples = dt.pack_split(split, extra_per_type=1, seed=0)
    model, processor = tiny_llava(SPEC), tiny_processor(SPEC.image_size)
    adapters, _ = dt.train_demo(model, processor, examples, split, _config(steps=2), tmp_path / "a", progress=False)
    saved = str(tmp_path / "a" / "demo_weights.safetensors")
    again, _ = dt.train_demo(tiny_llava(SPEC), processor, examples, split, _config(steps=2, init_weights=saved),
                             None, progress=False)
    fresh = dt.LoraAdapters(tiny_llava(SPEC), rank=4)
    fresh.load_factors(load_file(saved))
    for (path, (a, b)), (_, (a2, b2)) in zip(adapters.deltas().items(), fresh.deltas().items()):
        torch.testing.assert_close(b2 @ a2, b @ a, msg=path)


def test_lr_schedule_warms_up_and_decays():
    config = _config(steps=100, warmup=10, min_lr_ratio=0.1)
    factors = [dt._lr_factor(step, config) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_cached_prefix_decoding_matches_generate(split, tiny):
    model, processor = tiny
    questions = read_questions(split / "questions.jsonl")[:4]
    predictions = dt.predict_demo(model, processor, questions, split, max_new_tokens=3, progress=False)
    for question in questions:
        inputs = processor(images=load_image(split, question.images[0]), text=build_prompt(processor, question),
                           return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert predictions[question.question_id] == expected.strip()


def test_evaluate_demo_reports_every_type_and_limits_images(split, tiny):
    model, processor = tiny
    result = dt.evaluate_demo(model, processor, split, limit=3, max_new_tokens=2, progress=False)
    assert result["images"] == 3 and result["questions"] == len(result["predictions"])
    assert set(result["accuracy"]) <= set(QUESTION_TYPES) | {"overall"} and "overall" in result["accuracy"]
    blank = dt.evaluate_demo(model, processor, split, limit=3, blank_image=True, max_new_tokens=2, progress=False)
    assert blank["blank_image"] and blank["questions"] == result["questions"]
    chance = dt.chance_by_type(split)
    assert chance["uniform"]["exists"] == pytest.approx(0.5) or chance["uniform"]["exists"] == 1.0
    assert 0 < chance["majority"]["overall"] <= 1


def test_command_line_help_lists_examples(capsys):
    with pytest.raises(SystemExit):
        dt.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--steps" in out and "python -m analysis.demo_training train" in out
