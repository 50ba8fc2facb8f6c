"""analysis: record how a multimodal LLM's decoder attends across token groups.

The lower floor of the DyVTE toolkit. It knows models (``adapters``), token groups
(``layout``), how to observe attention without changing the model's outputs (``recorder``),
the mathematics of group statistics (``stats``) and how they are stored (``schema``, ``io``).
It never imports ``exit``.

Typical use::

    from analysis import token_layout, record_attention, resolve_adapter

    adapter = resolve_adapter(model)
    layout = token_layout(batch["input_ids"], batch["attention_mask"], adapter.image_token_id(model))
    with record_attention(model, layout, attention="sdpa") as recording:
        model(**batch)
    frame = recording.to_frame(sample_ids=["q1", "q2"], heads="mean")
"""

from analysis.adapters import ModelAdapter, UnsupportedModelError, resolve_adapter, supported_model_types
from analysis.layout import KEY_GROUPS, QUERY_GROUPS, LayoutError, TokenLayout, token_layout
from analysis.recorder import AttentionRecorder, LayerRecord, record_attention
from analysis.stats import HEAD_MAX, HEAD_MEAN

__version__ = "0.1.0"

__all__ = [
    "AttentionRecorder",
    "HEAD_MAX",
    "HEAD_MEAN",
    "KEY_GROUPS",
    "LayerRecord",
    "LayoutError",
    "ModelAdapter",
    "QUERY_GROUPS",
    "TokenLayout",
    "UnsupportedModelError",
    "record_attention",
    "resolve_adapter",
    "supported_model_types",
    "token_layout",
    "__version__",
]
