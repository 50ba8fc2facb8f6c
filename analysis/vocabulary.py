"""The statistics' vocabulary: token group names and ``head`` labels.

Kept apart (no torch, no pandas) because the layout, the schema, the statistics, the stage
detector and the command lines all need it, and the command lines must start without torch.
"""

from __future__ import annotations

QUERY_GROUPS: tuple[str, ...] = ("system", "image", "text", "last")
"""Groups of attending tokens (``query_group``); ``last`` is the final prompt token alone."""
KEY_GROUPS: tuple[str, ...] = ("system", "image", "text")
"""Groups of attended tokens (``key_group``)."""

HEAD_MEAN = -1
"""``head`` value of a row that holds the mean over heads."""
HEAD_MAX = -2
"""``head`` value of a row that holds the maximum over heads."""

HEAD_REDUCTIONS: tuple[str, ...] = ("all", "mean", "max")
"""The values of ``heads=`` / ``--heads``: keep every head (0..H-1), or one mean or max row."""

GENERATED = "generated"
"""Query group of a generated answer token (one per decoding step, ``step`` >= 0) and key group
of the generated tokens so far (the query itself included)."""
GENERATED_KEY_GROUPS: tuple[str, ...] = (*KEY_GROUPS, GENERATED)
"""Key groups of a generated token's attention: the prompt's groups, then the answer so far."""
PROMPT_STEP = -1
"""``step`` value of the prompt's rows (the prefill); a generated token's rows hold its step 0, 1, ..."""
