"""The one place where the toolkit attaches anything to a model.

``attached(model, hooks)`` checks every module path first, registers inside ``try`` and removes
everything in ``finally``: after a normal exit, an exception or nesting, no hook of the block is
left. Three kinds of attachment exist:

- torch forward hooks and forward pre-hooks on named modules;
- attention observers: callables that see the query and key states of an attention module
  running under the registered attention function ``OBSERVED_SDPA`` (SDPA's output, unchanged,
  plus a side channel). This is transformers' sanctioned extension point (AttentionInterface)
  rather than a patch of any class; the function is registered under its own name, together with
  SDPA's mask function, so a model only uses it when its attention implementation is set to it;
- layer streams: a surgery that removes tokens mid-forward (``exit.surgery``) says which prompt
  positions each decoder layer holds (:func:`layer_stream`), so observers such as the recorder
  follow the tokens that remain without importing the surgery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from analysis.attention import OBSERVED_SDPA

AttentionObserver = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], None]
"""observer(module, query, key, attention_mask, scaling); query (batch, head, q, dim), key with KV heads."""

StreamProvider = Callable[[int], "tuple[torch.Tensor, torch.Tensor] | None"]
"""provider(layer) -> (columns, present) while a prefill runs through a token-removing surgery:
(batch, slots) int64 prompt position of each slot of that decoder layer's token stream and
(batch, slots) bool True where the slot holds a token that is still there; None otherwise."""

_observers: dict[int, list[AttentionObserver]] = {}
_streams: dict[int, list[StreamProvider]] = {}


def observed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA attention whose output is exactly ``sdpa_attention_forward``'s; observers see q and k."""
    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for observer in _observers.get(id(module), ()):
        scaling = kwargs.get("scaling")
        observer(module, query, key, attention_mask, float(scaling) if scaling is not None else query.shape[-1] ** -0.5)
    return output


AttentionInterface.register(OBSERVED_SDPA, observed_sdpa_attention)
# Without a mask function under the same name the decoder would pass attention_mask=None and
# padded batches would silently attend to padding (measured on transformers 5.23: logits of a
# padded tiny Llama off by up to 0.43).
AttentionMaskInterface.register(OBSERVED_SDPA, sdpa_mask)


@dataclass(frozen=True)
class Hook:
    """One attachment: ``kind`` at the module named ``path`` (as in ``model.named_modules()``)."""

    path: str
    fn: Callable[..., Any]
    kind: Literal["forward", "forward_pre", "attention_observer", "layer_stream"] = "forward"
    with_kwargs: bool = False


class _RegistryHandle:
    """One callable in one of the registries keyed by module (observers, stream providers)."""

    def __init__(self, registry: dict[int, list[Any]], module: nn.Module, fn: Callable[..., Any]) -> None:
        self.registry, self.key, self.fn = registry, id(module), fn
        registry.setdefault(self.key, []).append(fn)

    def remove(self) -> None:
        entries = self.registry.get(self.key, [])
        if self.fn in entries:
            entries.remove(self.fn)
        if not entries:
            self.registry.pop(self.key, None)


def layer_stream(model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What a token-removing surgery attached to ``model`` (a ``layer_stream`` hook on its root
    module) says decoder layer ``layer`` holds in the running prefill, or None (no such surgery,
    or not in a prefill): the recorder observes the layers after an exit over the tokens that
    remain, without knowing the surgery."""
    for provider in _streams.get(id(model), ()):
        stream = provider(layer)
        if stream is not None:
            return stream
    return None


def missing_paths(model: nn.Module, hooks: list[Hook]) -> list[str]:
    """The hooks' module paths that name no module of ``model``, sorted (what ``attached`` checks first)."""
    modules = {name for name, _ in model.named_modules()}
    return sorted({hook.path for hook in hooks if hook.path not in modules})


def missing_paths_message(model: nn.Module, missing: list[str]) -> str:
    """The error message for paths that name no module of ``model``."""
    return (f"expected module paths of {type(model).__name__}, found no module named {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}")


@contextmanager
def attached(model: nn.Module, hooks: list[Hook]) -> Iterator[None]:
    """Attach ``hooks`` to ``model`` for the duration of the block, and always remove them.

    Raises:
        KeyError: a path names no module of the model (checked before anything is attached).
    """
    missing = missing_paths(model, hooks)
    if missing:
        raise KeyError(missing_paths_message(model, missing))
    modules = dict(model.named_modules())
    handles: list[Any] = []
    try:
        for hook in hooks:
            module = modules[hook.path]
            if hook.kind == "forward":
                handles.append(module.register_forward_hook(hook.fn, with_kwargs=hook.with_kwargs))
            elif hook.kind == "forward_pre":
                handles.append(module.register_forward_pre_hook(hook.fn, with_kwargs=hook.with_kwargs))
            elif hook.kind == "attention_observer":
                handles.append(_RegistryHandle(_observers, module, hook.fn))
            elif hook.kind == "layer_stream":
                handles.append(_RegistryHandle(_streams, module, hook.fn))
            else:
                raise ValueError(
                    f"expected hook kind forward, forward_pre, attention_observer or layer_stream, found {hook.kind!r}"
                )
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


def attached_count(model: nn.Module) -> int:
    """All hooks (transformers' own included) and observers on ``model``'s modules; tests compare it
    before and after a block to prove cleanup."""
    count = 0
    for module in model.modules():
        count += len(module._forward_hooks) + len(module._forward_pre_hooks)
        count += len(_observers.get(id(module), ())) + len(_streams.get(id(module), ()))
    return count
