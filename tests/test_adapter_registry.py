"""Users' own families: an adapter registered for a model class the table does not know (a decoder
at other module paths), validated against the model, then served to the recorder and the exit."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from analysis import KEY_GROUPS, QUERY_GROUPS, record_attention, token_layout
from analysis.adapters import (
    ModelAdapter,
    UnsupportedModelError,
    adapter_problems,
    register_adapter,
    resolve_adapter,
    unregister_adapter,
)
from exit import visual_token_exit

IMAGE_TOKEN = 5
PATCH = 12


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom_vlm"

    def __init__(self, image_token_id: int = IMAGE_TOKEN, **kwargs) -> None:
        super().__init__(**kwargs)
        self.image_token_id = image_token_id


class TinyCustomVLM(PreTrainedModel):
    """An image-text model no adapter entry knows: patches -> Linear -> the image token positions of
    a Llama decoder kept at ``backbone.decoder`` (not model.language_model), its own output head."""

    config_class = TinyCustomConfig
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: TinyCustomConfig) -> None:
        super().__init__(config)
        self.vision = nn.Linear(PATCH, config.hidden_size)
        self.backbone = nn.Module()
        self.backbone.decoder = LlamaModel(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        embeds = self.backbone.decoder.embed_tokens(input_ids)
        if pixel_values is not None:
            embeds = embeds.masked_scatter((input_ids == IMAGE_TOKEN)[..., None], self.vision(pixel_values).to(embeds.dtype))
        out = self.backbone.decoder(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return CausalLMOutputWithPast(logits=self.head(out.last_hidden_state), attentions=out.attentions)


ADAPTER = ModelAdapter(model_type="tiny_custom_vlm", layers_path="backbone.decoder.layers",
                       final_norm_path="backbone.decoder.norm", text_config_key=None,
                       image_token_groups="image: the image token id x patches; other tokens by position")


@pytest.fixture()
def custom():
    torch.manual_seed(0)
    config = TinyCustomConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = TinyCustomVLM(config).eval()
    ids = torch.tensor([[1, 7, 8, *[IMAGE_TOKEN] * 6, 9, 10, 11, 12]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 6, PATCH) * 3}
    yield model, inputs
    unregister_adapter("tiny_custom_vlm")


def test_a_wrong_adapter_is_refused_with_every_problem_named(custom):
    model, _ = custom
    wrong = ModelAdapter(model_type="tiny_custom_vlm", layers_path="model.language_model.layers",
                         image_token_fields=("image_token_index",), text_config_key=None)
    problems = adapter_problems(wrong, model)
    assert any("decoder layers" in p for p in problems) and any("image token id" in p for p in problems)
    with pytest.raises(UnsupportedModelError, match="does not match the model"):
        register_adapter(wrong, model)
    with pytest.raises(UnsupportedModelError, match="unsupported model type"):
        resolve_adapter(model)  # nothing was registered
    with pytest.raises(UnsupportedModelError, match="registered already"):
        register_adapter(ModelAdapter(model_type="llava", layers_path="x"), model)
    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        register_adapter(ModelAdapter(model_type="mllama", layers_path="x"), model)


def test_a_registered_family_is_recorded_like_its_eager_attention(custom):
    model, inputs = custom
    register_adapter(ADAPTER, model)
    assert resolve_adapter(model) is ADAPTER
    layout = token_layout(inputs["input_ids"], inputs["attention_mask"], IMAGE_TOKEN)
    with torch.no_grad(), record_attention(model, layout) as recorder:
        recorded = model(**inputs).logits
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True)
    model.set_attn_implementation("sdpa")
    image = inputs["input_ids"][0] == IMAGE_TOKEN
    text = torch.zeros_like(image)
    text[9:] = True  # the text tokens after the image (the last one is also a group of its own)
    for layer, weights in enumerate(eager.attentions):
        expected = weights[0][:, text][:, :, image].sum(-1).mean(-1)  # per head: text -> image mass
        found = recorder.records[layer].mass[0, :, QUERY_GROUPS.index("text"), KEY_GROUPS.index("image")]
        assert torch.allclose(found.float(), expected.float(), atol=1e-5), layer
    assert torch.allclose(recorded, eager.logits, atol=1e-5)


def test_a_registered_family_exits_as_if_its_image_tokens_were_deleted(custom):
    model, inputs = custom
    register_adapter(ADAPTER, model)
    decoder = model.backbone.decoder
    with torch.no_grad():
        stock = model(**inputs).logits[:, -1]
        with visual_token_exit(model, len(decoder.layers) - 1):
            assert torch.equal(model(**inputs).logits[:, -1], stock)  # exit after the last layer: untouched
        for k in range(len(decoder.layers) - 1):
            with visual_token_exit(model, k):
                exited = model(**inputs).logits[:, -1]
            assert torch.allclose(exited, deleted_after(model, inputs, k), atol=1e-5), k
            assert not torch.allclose(exited, stock, atol=1e-3), k  # the image mattered there


def deleted_after(model, inputs, k):
    """Last-position logits of running the decoder's layers by hand, deleting the image tokens from
    the sequence after layer ``k`` (text tokens keep their positions)."""
    decoder, ids = model.backbone.decoder, inputs["input_ids"]
    hidden = decoder.embed_tokens(ids).masked_scatter((ids == IMAGE_TOKEN)[..., None], model.vision(inputs["pixel_values"]))
    positions = torch.arange(ids.shape[1])[None]
    keep = ids[0] != IMAGE_TOKEN
    for index, layer in enumerate(decoder.layers):
        if index == k + 1:
            hidden, positions = hidden[:, keep], positions[:, keep]
        length = hidden.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        hidden = layer(hidden, attention_mask=mask, position_ids=positions,
                       position_embeddings=decoder.rotary_emb(hidden, positions))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return model.head(decoder.norm(hidden))[:, -1]
