"""analysis: record how a multimodal LLM's decoder attends across token groups.

The lower floor of the DyVTE toolkit. Its core knows models (``adapters``, ``loading``), token
groups (``layout``), how to observe attention without changing the model's outputs (``hooks``,
``attention``, ``recorder``), the mathematics of group statistics (``stats``), how they are stored
(``schema``, ``io``) and what the stages are (``stages``, ``plots``); ``errors`` holds the one base
class of every toolkit error. The core never imports ``exit``, the dump job (``dump``), the command
line (``cli``), the demo wing (``analysis.demo``) or the testing wing (``analysis.testing``).
Names below are imported on first use, so ``import analysis`` is cheap.

Typical use::

    from analysis import token_layout, record_attention, resolve_adapter

    adapter = resolve_adapter(model)
    layout = token_layout(batch["input_ids"], batch["attention_mask"], adapter.image_token_id(model))
    with record_attention(model, layout, attention="sdpa") as recording:
        model(**batch)
    frame = recording.to_frame(sample_ids=["q1", "q2"], heads="mean")
"""

from analysis.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ModelAdapter": "analysis.adapters",
    "UnsupportedModelError": "analysis.adapters",
    "register_adapter": "analysis.adapters",
    "resolve_adapter": "analysis.adapters",
    "supported_model_types": "analysis.adapters",
    "KEY_GROUPS": "analysis.layout",
    "QUERY_GROUPS": "analysis.layout",
    "LayoutError": "analysis.layout",
    "TokenLayout": "analysis.layout",
    "token_layout": "analysis.layout",
    "AttentionRecorder": "analysis.recorder",
    "LayerRecord": "analysis.recorder",
    "record_attention": "analysis.recorder",
    "HEAD_MAX": "analysis.vocabulary",
    "HEAD_MEAN": "analysis.vocabulary",
    "DyVTEError": "analysis.errors",
    "UsageError": "analysis.errors",
    "load_model": "analysis.loading",
}

__all__ = [
    "AttentionRecorder",
    "DyVTEError",
    "UsageError",
    "load_model",
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
    "register_adapter",
    "resolve_adapter",
    "supported_model_types",
    "token_layout",
    "__version__",
]

__getattr__, __dir__ = lazy_exports("analysis", _EXPORTS)
