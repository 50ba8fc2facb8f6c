"""The toolkit's one error base class, and the errors that belong to no single module.

Every error the toolkit raises for bad input (a model it cannot handle, a file it cannot read, a
setting out of range, a folder holding another run) derives from :class:`DyVTEError`, so a caller
catches them all with one ``except DyVTEError`` and the command lines print any of them as one
line with exit status 2. Each specific class also derives from the built-in exception it refines
(``ValueError``, ``RuntimeError``), so code written against those keeps working.
"""

from __future__ import annotations

__all__ = ["DyVTEError", "UsageError"]


class DyVTEError(Exception):
    """Base class of every error the toolkit raises on purpose (bad input, not a bug)."""


class UsageError(DyVTEError, ValueError):
    """The options given do not make a complete command, or a value is out of its range."""
