"""The demo model's low-rank adapters and weights file (analysis.demo.lora), on a tiny LLaVA."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from analysis.demo.lora import LORA_PREFIX, LORA_TARGETS, LoraAdapters, restore_demo_weights, save_demo_weights  # noqa: E402
from analysis.demo.model import apply_demo_weights  # noqa: E402
from analysis.testing.tiny import TinyLlavaSpec, tiny_llava  # noqa: E402

SPEC = TinyLlavaSpec(num_kv_heads=2)


@pytest.fixture
def model():
    return tiny_llava(SPEC)


def _hook_count(model) -> int:
    # transformers installs its own output-capturing hooks on first use: count only ours (closures named "lora_hook")
    return sum(h.__name__ == "lora_hook" for m in model.modules() for h in m._forward_hooks.values())


def test_fresh_adapters_leave_logits_unchanged_and_leave_no_hook(model):
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        adapters = LoraAdapters(model, rank=4)
        with adapters.applied(model):
            during = model(input_ids=ids).logits
            assert _hook_count(model) == len(adapters.paths)
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    assert len(adapters.paths) == SPEC.num_layers * len(LORA_TARGETS)
    assert _hook_count(model) == 0


def test_merged_adapters_equal_the_hooked_model(model, tmp_path):
    adapters = LoraAdapters(model, rank=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in adapters.B:
            b.normal_(0, 0.1)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), adapters.applied(model):
        hooked = model(input_ids=ids).logits
    path = save_demo_weights(tmp_path / "w.safetensors", model, adapters, {"steps": 3})
    assert sum(k.startswith(LORA_PREFIX) for k in load_file(str(path))) == 2 * len(adapters.paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no partial file left behind
    apply_demo_weights(model, path)  # projector (unchanged) + merged B @ A
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, hooked, rtol=1e-5, atol=1e-5)


def test_applied_adapters_are_removed_after_an_error(model):
    adapters = LoraAdapters(model, rank=4)
    with pytest.raises(RuntimeError, match="inside the block"):
        with adapters.applied(model):
            assert _hook_count(model) == len(adapters.paths)
            raise RuntimeError("inside the block")
    assert _hook_count(model) == 0


def test_adapters_of_a_deeper_model_attach_nothing(model):
    deeper = LoraAdapters(tiny_llava(TinyLlavaSpec(num_kv_heads=2, num_layers=SPEC.num_layers + 1)), rank=4)
    with pytest.raises(KeyError, match="no module named"):
        with deeper.applied(model):
            pass
    assert _hook_count(model) == 0


def test_restored_weights_equal_the_saved_ones(model, tmp_path):
    adapters = LoraAdapters(model, rank=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in adapters.B:
            b.normal_(0, 0.1)
    path = save_demo_weights(tmp_path / "w.safetensors", model, adapters)
    other = tiny_llava(SPEC)
    with torch.no_grad():
        for parameter in other.model.multi_modal_projector.parameters():
            parameter.add_(1.0)
    restored = LoraAdapters(other, rank=4)
    restore_demo_weights(path, other, restored)
    for key, value in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(other.model.multi_modal_projector.state_dict()[key], value), key
    for (name, (a, b)), (_, (a2, b2)) in zip(adapters.deltas().items(), restored.deltas().items()):
        torch.testing.assert_close(b2 @ a2, b @ a, msg=name)
