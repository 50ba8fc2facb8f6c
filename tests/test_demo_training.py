"""The demo model's training (analysis.demo.training): packing, branch encoding, the loss, the loop, the command line.

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

from analysis.data import build_prompt, load_image, read_questions  # noqa: E402
from analysis.demo import training as dt  # noqa: E402
from analysis.demo.inputs import image_features  # noqa: E402
from analysis.demo.lora import LoraAdapters  # noqa: E402
from analysis.demo.shapes import QUESTION_TYPES  # noqa: E402
from analysis.testing.tiny import tiny_llava, tiny_processor  # noqa: E402
from tests.demo_fixtures import SPEC, split, tiny  # noqa: E402,F401 (fixtures)


def _config(**changes) -> dt.TrainConfig:
    base = dict(steps=6, batch_size=2, warmup=1, rank=4, extra_per_type=1, image_size=SPEC.image_size, ground_images=0,
                bf16=False, lr_projector=1e-2, lr_lora=1e-2)
    return dt.TrainConfig(**{**base, **changes})


def _hook_count(model) -> int:
    # transformers installs its own output-capturing hooks on first use: count only ours (closures named "lora_hook")
    return sum(h.__name__ == "lora_hook" for m in model.modules() for h in m._forward_hooks.values())


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
    features = image_features(model, pixels)
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
    assert not list((tmp_path / "a").glob(".*.partial"))  # every file written whole, then renamed


def test_training_continues_from_saved_weights(split, tmp_path):
    examples = dt.pack_split(split, extra_per_type=1, seed=0)
    model, processor = tiny_llava(SPEC), tiny_processor(SPEC.image_size)
    adapters, _ = dt.train_demo(model, processor, examples, split, _config(steps=2), tmp_path / "a", progress=False)
    saved = str(tmp_path / "a" / "demo_weights.safetensors")
    again, _ = dt.train_demo(tiny_llava(SPEC), processor, examples, split, _config(steps=2, init_weights=saved),
                             None, progress=False)
    fresh = LoraAdapters(tiny_llava(SPEC), rank=4)
    fresh.load_factors(load_file(saved))
    for (path, (a, b)), (_, (a2, b2)) in zip(adapters.deltas().items(), fresh.deltas().items()):
        torch.testing.assert_close(b2 @ a2, b @ a, msg=path)


def test_lr_schedule_warms_up_and_decays():
    config = _config(steps=100, warmup=10, min_lr_ratio=0.1)
    factors = [dt._lr_factor(step, config) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_command_line_help_lists_examples(capsys):
    with pytest.raises(SystemExit):
        dt.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--steps" in out and "python -m analysis.demo.training train" in out


def test_command_line_keeps_its_defaults():
    parser = dt._parser()
    train = parser.parse_args(["train", "--out", "runs/x"])
    assert (train.steps, train.batch_size, train.seed, train.lr_projector, train.lr_lora, train.warmup, train.rank,
            train.extra_per_type, train.bf16, train.standardise_images, train.ground_images, train.ground_steps,
            train.ground_lr, train.checkpoint_minutes, train.max_minutes, train.image_size, train.threads) == (
        1150, 1, 0, 2e-3, 6e-4, 30, 8, 3, False, 16, 240, 600, 2e-3, 5.0, 110.0, 336, 2)
    assert train.init_weights is None and train.data_root == Path(".cache/shapesvqa")
    evaluate = parser.parse_args(["eval"])
    assert (evaluate.split, evaluate.limit, evaluate.weights, evaluate.blank_image, evaluate.max_new_tokens,
            evaluate.output) == ("val", None, None, False, 4, None)


def test_training_images_replays_the_images_a_run_reads(split, tmp_path, monkeypatch):
    examples = dt.pack_split(split, extra_per_type=1, seed=0)
    config = _config(steps=5, batch_size=2, standardise_images=3, seed=7)
    loaded, visited = [], []
    original_load = dt.load_image
    monkeypatch.setattr(dt, "load_image", lambda folder, name: loaded.append(name) or original_load(folder, name))

    def question_stage(model, processor, examples, order, *args, **kwargs):
        visited.extend(examples[i].image for i in order[: config.steps * config.batch_size])
        return []

    monkeypatch.setattr(dt, "_question_stage", question_stage)
    model, processor = tiny_llava(SPEC), tiny_processor(SPEC.image_size)
    dt.train_demo(model, processor, examples, split, config, tmp_path / "run", progress=False)
    replayed = dt.training_images(tiny_llava(SPEC), examples, config)
    assert list(replayed.standardise) == loaded and len(loaded) == 3
    assert list(replayed.questions) == visited and len(visited) == 10
    assert replayed.all() == {*loaded, *visited}
    other = dt.training_images(tiny_llava(SPEC), examples, _config(steps=5, batch_size=2, standardise_images=3, seed=8))
    assert other.questions != replayed.questions  # the seed decides the order: the replay is not a constant
