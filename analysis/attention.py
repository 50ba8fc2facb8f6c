"""The attention paths: the user's choice, the decoder's implementation and how attention is observed.

A user picks one of :data:`ATTENTION_CHOICES` (``--attn`` on every command line, ``attention=`` in
Python). :func:`attention_path` maps that choice, once, to everything that depends on it: the
implementation a checkpoint is loaded with, the implementation the decoder runs while statistics
are recorded (the registered ``OBSERVED_SDPA`` function or eager attention), the kind of hook
that reads attention, and the sentence written into every output's provenance.
:func:`path_of_model` is the reverse rule, for code that observes a model the way it already runs
(the exit gates, FastV): eager weights under eager attention, else the SDPA fast path.

This module imports neither torch nor transformers, so the command lines can offer its choices
without loading them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from analysis.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

    from analysis.adapters import ModelAdapter

__all__ = [
    "OBSERVED_SDPA",
    "ATTENTION_CHOICES",
    "ATTENTION_PATHS",
    "DECODER_IMPLEMENTATIONS",
    "AttentionPath",
    "attention_path",
    "path_of_model",
    "running_attention",
]


OBSERVED_SDPA = "dyvte_observed_sdpa"
"""Name under which ``analysis.hooks`` registers the attention function that runs SDPA and calls
the module's observers."""


@dataclass(frozen=True)
class AttentionPath:
    """Everything that follows from one attention choice.

    Attributes:
        name: the user's choice ("sdpa", "eager").
        load_implementation: ``attn_implementation`` a checkpoint is loaded with.
        record_implementation: what the decoder runs while attention is recorded.
        hook_kind: how the recorder reads attention: an attention observer (query and key of the
            registered function) or a forward hook on ``self_attn`` (the weights it returns).
        description: one sentence for the provenance of every file written on this path.
    """

    name: str
    load_implementation: str
    record_implementation: str
    hook_kind: str
    description: str


ATTENTION_PATHS: dict[str, AttentionPath] = {
    "sdpa": AttentionPath(
        name="sdpa",
        load_implementation="sdpa",
        record_implementation=OBSERVED_SDPA,
        hook_kind="attention_observer",
        description=f"sdpa: decoder runs the registered attention function {OBSERVED_SDPA} (SDPA output); "
        "statistics on the side from query and key in fp32: one fused attention call whose values are the "
        "key-group indicators and the keys (with its log-normaliser), or q k^T recomputed in query chunks "
        "where the device has no such kernel (statistics_kernel says which)",
    ),
    "eager": AttentionPath(
        name="eager",
        load_implementation="eager",
        record_implementation="eager",
        hook_kind="forward",
        description="eager: decoder runs eager attention; statistics reduced from the weights returned by each self_attn",
    ),
}

ATTENTION_CHOICES: tuple[str, ...] = tuple(ATTENTION_PATHS)
"""The values of ``--attn`` and ``attention=``; the first is the default."""

DECODER_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa", OBSERVED_SDPA)
"""The decoder attention implementations the toolkit's hooks and surgery know how to handle."""


def attention_path(choice: str) -> AttentionPath:
    """The attention path of a user's choice.

    Raises:
        UsageError: ``choice`` is not one of :data:`ATTENTION_CHOICES`.
    """
    try:
        return ATTENTION_PATHS[choice]
    except (KeyError, TypeError):
        raise UsageError(f"expected attention to be one of {list(ATTENTION_CHOICES)}, found {choice!r}") from None


def path_of_model(model: nn.Module, adapter: ModelAdapter) -> AttentionPath:
    """The path that observes ``model`` without changing what it computes: eager weights when the
    decoder runs eager attention, else the SDPA fast path (whose output is SDPA's)."""
    return ATTENTION_PATHS["eager" if adapter.attention_implementation(model) == "eager" else "sdpa"]


@contextmanager
def running_attention(model: nn.Module, adapter: ModelAdapter, implementation: str | None) -> Iterator[None]:
    """Run the text decoder with ``implementation`` for the block (None: leave it), then restore it."""
    previous = adapter.attention_implementation(model)
    if implementation is not None and implementation != previous:
        adapter.set_attention_implementation(model, implementation)
    try:
        yield
    finally:
        if adapter.attention_implementation(model) != previous:
            adapter.set_attention_implementation(model, previous)
