"""Shared fixtures: tiny random LLaVA models (MHA and GQA) and batches built by the real processor."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from analysis.data import Question, build_prompt  # noqa: E402
from analysis.testing.families import RowSpec, tiny_family_batch, tiny_family_model  # noqa: E402
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava, tiny_processor  # noqa: E402

IMAGE_SIZE = 28  # 4 image tokens per image


@dataclass
class Batch:
    name: str
    inputs: dict[str, torch.Tensor]


def make_batch(processor, questions: list[Question]) -> dict[str, torch.Tensor]:
    colours = ["red", "blue", "green", "yellow"]
    images = [Image.new("RGB", (40, 30), colours[i % 4]) for i, q in enumerate(questions) for _ in q.images]
    prompts = [build_prompt(processor, q) for q in questions]
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


BATCH_CASES = {
    "batch1": [Question("a", ("x.png",), "What colour is the square?")],
    "batch2_left_padding": [
        Question("a", ("x.png",), "What colour?"),
        Question("b", ("y.png",), "Is there a large circle on the left of the picture?"),
    ],
    "two_images": [Question("c", ("x.png", "y.png"), "Which image is brighter?")],
}


@pytest.fixture(scope="session")
def processor():
    return tiny_processor(IMAGE_SIZE)


@pytest.fixture(scope="session", params=["mha", "gqa"])
def attention_kind(request) -> str:
    return request.param


def tiny_spec(kind: str) -> TinyLlavaSpec:
    return TinyLlavaSpec(num_heads=4, num_kv_heads=4 if kind == "mha" else 2, image_size=IMAGE_SIZE)


@pytest.fixture(scope="session")
def tiny_specs():
    """``tiny_specs(kind)``: the TinyLlavaSpec of tiny_models' model of that kind (to build another copy)."""
    return tiny_spec


@pytest.fixture(scope="session")
def tiny_models():
    """Lazily built tiny models keyed by (kind, attn_implementation)."""
    cache: dict[tuple[str, str], torch.nn.Module] = {}

    def get(kind: str, implementation: str = "sdpa") -> torch.nn.Module:
        if (kind, implementation) not in cache:
            cache[(kind, implementation)] = tiny_llava(tiny_spec(kind), attn_implementation=implementation)
        return cache[(kind, implementation)]

    return get


@pytest.fixture(params=sorted(BATCH_CASES))
def batch(request, processor) -> Batch:
    return Batch(request.param, make_batch(processor, BATCH_CASES[request.param]))


@pytest.fixture(scope="session")
def case_inputs(processor):
    """Inputs of a named BATCH_CASES entry, built once per name: ``case_inputs("batch1")``."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            cache[name] = make_batch(processor, BATCH_CASES[name])
        return cache[name]

    return get


FAMILY_ROWS = (RowSpec(system=3, images=1, text=5), RowSpec(system=2, images=2, text=3))
"""The rows every family test runs: one image after a 3-token system prompt, and two images after a
shorter one (so the batch is left-padded and holds three images)."""


@pytest.fixture(scope="module")
def family_case():
    """(model, batch of FAMILY_ROWS) per supported family, built once per test module; the model runs
    SDPA unless a test switches it (and switches it back)."""
    cache: dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}

    def get(model_type: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        if model_type not in cache:
            model = tiny_family_model(model_type, num_kv_heads=2)
            cache[model_type] = (model, tiny_family_batch(model, FAMILY_ROWS))
        return cache[model_type]

    return get
