"""Training and evaluation code of the demo model (analysis.demo.training), on a tiny LLaVA.

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

from analysis.demo import training as dt  # noqa: E402
from analysis.data import build_prompt, load_image, read_questions  # noqa: E402
from analysis.demo.model import apply_demo_weights  # noqa: E402
from analysis.demo.shapes import QUESTION_TYPES, write_split  # noqa: E402
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava, tiny_processor  # noqa: E402

SPEC = TinyLlavaSpec(num_kv_heads=2)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return write_split(tmp_path_factory.mktemp("shapes"), "train", 6, seed=11, image_size=84)


@pytest.fixture
def tiny():
    return tiny_llava(SPEC), tiny_processor(SPEC.image_size)


def _config(**changes) -> dt.TrainConfig:
    base = dict(steps=6, batch_size=2, warmup=1, rank=4, extra_per_type=1, image_size=SPEC.image_size, ground_images=0,
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


def test_each_branch_is_the_inference_prompt_followed_by_the_answer(split, tiny):
    model, processor = tiny
    questions = [q for q in read_questions(split / "questions.jsonl") if q.images[0] == read_questions(
        split / "questions.jsonl")[0].images[0]]
    turns = [(q.category, q.text, q.answer) for q in questions]
    encoded = dt.encode_branches(processor, turns, model.config.image_token_id, 4)
    assert encoded.categories == tuple(q.category for q in questions)
    for question, branch, labels in zip(questions, encoded.branches, encoded.labels):
        prompt = processor(images=load_image(split, question.images[0]), text=build_prompt(processor, question),
                           return_tensors="pt")["input_ids"][0].tolist()
        ids = encoded.prefix + branch
        assert ids[:len(prompt)] == prompt
        assert int(sum(t == model.config.image_token_id for t in ids)) == 4  # this question's image only
        answer = [t for t, label in zip(branch, labels) if label != dt.IGNORE]
        assert answer == branch[len(prompt) - len(encoded.prefix):]
        assert processor.tokenizer.decode(answer).replace("<|im_end|>", "").strip() == question.answer


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_branched_loss_equals_separate_single_turn_losses(split, tiny, attention):
    model, processor = tiny
    model.set_attn_implementation(attention)
    first = read_questions(split / "questions.jsonl")[0]
    turns = [(q.category, q.text, q.answer) for q in read_questions(split / "questions.jsonl")
             if q.images[0] == first.images[0]]
    assert len(turns) >= 3 and len({len(t[1]) for t in turns}) > 1  # branches of different lengths: padding
    encoded = dt.encode_branches(processor, turns, model.config.image_token_id, 4)
    pixels = processor.image_processor(load_image(split, first.images[0]), return_tensors="pt")["pixel_values"]
    features = dt.image_features(model, pixels)
    loss, count, _ = dt.branched_answer_loss(model, encoded, features, pad_token_id=0)
    expected, expected_count = torch.zeros(()), 0
    for branch, labels in zip(encoded.branches, encoded.labels):
        ids = torch.tensor([encoded.prefix + branch])
        target = torch.tensor([[dt.IGNORE] * len(encoded.prefix) + labels])[:, 1:]
        logits = model(input_ids=ids, pixel_values=pixels).logits[:, :-1]
        expected = expected + torch.nn.functional.cross_entropy(logits[target != dt.IGNORE], target[target != dt.IGNORE],
                                                                reduction="sum")
        expected_count += int((target != dt.IGNORE).sum())
    assert int(count) == expected_count
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


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
    questions = read_questions(split / "questions.jsonl")[:8]
    assert len({q.images[0] for q in questions}) < len(questions)  # several questions continue one prefill
    predictions = dt.predict_demo(model, processor, questions, split, max_new_tokens=3, progress=False)
    assert dt.predict_demo(model, processor, questions, split, max_new_tokens=3, progress=False,
                           batch_size=3) == predictions
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
    assert "--steps" in out and "python -m analysis.demo.training train" in out


def test_grounding_targets_mark_the_patches_a_shape_covers():
    from PIL import Image, ImageDraw

    from analysis.demo.shapes import COLOURS, Scene, SceneObject

    image = Image.new("RGB", (56, 56), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([14, 28, 41, 55], fill=COLOURS["red"])  # patches (row 2-3, column 1-2)
    scene = Scene(56, (255, 255, 255), (SceneObject("red", "square", "large", 14, 28, 28),))
    words = {w: torch.full((3,), float(i)) for i, w in enumerate([".", "large", "red", "square"])}
    targets, is_shape = dt.grounding_targets(scene, image, side=56, patch=14, words=words)
    expected = torch.zeros(16, dtype=torch.bool)
    expected[[9, 10, 13, 14]] = True
    assert torch.equal(is_shape, expected)
    assert torch.equal(targets[9], torch.full((3,), 2.0))  # mean of "large", "red", "square"
    assert torch.equal(targets[0], words["."])


def test_grounding_stage_fits_the_projector_to_the_words(split):
    from analysis.demo.shapes import read_scenes

    model, processor = tiny_llava(SPEC), tiny_processor(SPEC.image_size)
    examples = dt.pack_split(split, extra_per_type=0, seed=0)
    before = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    result = dt.ground_projector(model, processor, examples, split, read_scenes(split), images=6, steps=30, lr=1e-2,
                                 seed=0, batch_patches=64, progress=False)
    assert result["images"] == 6 and result["held_out_images"] == 1
    assert 0.0 <= result["colour_nearest"] <= 1.0 and 0.0 <= result["shape_nearest"] <= 1.0
    after = model.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.model.multi_modal_projector.parameters())
