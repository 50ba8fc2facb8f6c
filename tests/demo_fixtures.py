"""Fixtures shared by the demo wing's tiny-model tests: a tiny LLaVA spec, a small ShapesVQA train
split and a fresh tiny model with its processor (import the fixtures by name, as stage_data's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.demo.shapes import write_split
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava, tiny_processor

SPEC = TinyLlavaSpec(num_kv_heads=2)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return write_split(tmp_path_factory.mktemp("shapes"), "train", 6, seed=11, image_size=84)


@pytest.fixture
def tiny():
    return tiny_llava(SPEC), tiny_processor(SPEC.image_size)
