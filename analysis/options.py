"""What the two command lines share: their options (argparse parent parsers) and the error boundary.

``dyvte-stats`` (analysis.cli) and ``dyvte-exit`` (exit.cli) build their subcommands from the
parent parsers below, so an option means the same, takes the same choices (those of
``analysis.attention`` and ``analysis.loading``) and is checked the same way everywhere.
:func:`run_command` is the boundary: any :class:`~analysis.errors.DyVTEError`, and any foreign
error from files (``OSError`` and its family, safetensors, pyarrow), becomes one line on stderr
and exit status 2 (``--debug`` shows the traceback); SIGTERM and Ctrl-C stop a command with 130
and keep the files finished so far.

This module imports nothing heavy (no torch, no transformers), so ``--help`` and usage errors
answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from analysis.attention import ATTENTION_CHOICES
from analysis.errors import DyVTEError
from analysis.vocabulary import HEAD_REDUCTIONS

__all__ = [
    "ATTENTION_CHOICES",
    "DTYPE_CHOICES",
    "HEAD_CHOICES",
    "batch_options",
    "command_line",
    "debug_option",
    "is_bad_input",
    "one_line",
    "model_options",
    "non_negative_int",
    "positive_int",
    "progress_option",
    "question_options",
    "run_command",
    "seed_option",
    "shard_argument",
    "subcommand",
]

DTYPE_CHOICES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""The values of ``--dtype`` and ``dtype=`` (``analysis.loading.DTYPES`` maps them to torch dtypes)."""
HEAD_CHOICES = HEAD_REDUCTIONS


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, found {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, found {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _int_at_least(text, 0)


def shard_argument(text: str) -> tuple[int, int]:
    """argparse type of ``--shard i/n`` -> (i, n), 0 <= i < n."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 0 <= int(parts[0]) < int(parts[1]):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), found {text!r}")
    return int(parts[0]), int(parts[1])


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def model_options(*, attention: bool = True, dtype: bool = True, device: bool = True) -> argparse.ArgumentParser:
    """``--model`` and, unless turned off, ``--attn``, ``--dtype``, ``--device``."""
    parser = _parent()
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True,
                       help="checkpoint id or folder (from_pretrained), or a registered name such as 'demo'")
    if attention:
        group.add_argument("--attn", choices=ATTENTION_CHOICES, default=ATTENTION_CHOICES[0],
                           help="how attention runs and is observed (default: sdpa, the fast path)")
    if dtype:
        group.add_argument("--dtype", choices=DTYPE_CHOICES, default=DTYPE_CHOICES[0],
                           help="weights and activations dtype (default: float32)")
    if device:
        group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (under torchrun cuda is the local rank's)")
    return parser


def question_options(*, required: bool = True, answers: bool = False) -> argparse.ArgumentParser:
    """``--questions``, ``--image-folder`` and ``--limit``."""
    parser = _parent()
    group = parser.add_argument_group("questions")
    keys = "question_id, image, text, answer" if answers else "question_id, image, text"
    group.add_argument("--questions", required=required, type=Path, help=f"LLaVA question file (JSONL: {keys})")
    group.add_argument("--image-folder", required=required, type=Path,
                       help="folder the questions' image paths are relative to")
    group.add_argument("--limit", type=positive_int, default=None, help="only the first N questions")
    return parser


def batch_options(default: int, what: str = "questions per forward") -> argparse.ArgumentParser:
    """``--batch-size`` (an integer >= 1)."""
    parser = _parent()
    parser.add_argument("--batch-size", type=positive_int, default=default, help=f"{what} (default: {default})")
    return parser


def seed_option() -> argparse.ArgumentParser:
    """``--seed``."""
    parser = _parent()
    parser.add_argument("--seed", type=int, default=0, help="random seed, recorded in the provenance (default: 0)")
    return parser


def progress_option() -> argparse.ArgumentParser:
    """``--no-progress``."""
    parser = _parent()
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def debug_option() -> argparse.ArgumentParser:
    """``--debug``: show the traceback of an error instead of its one line."""
    parser = _parent()
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback instead of one line (for bug reports)")
    return parser


def subcommand(
    commands: Any, name: str, help: str, examples: Sequence[str], parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with its own examples, one per line; every subcommand
    takes ``--debug``."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) if examples else None
    return commands.add_parser(
        name, help=help, description=help[:1].upper() + help[1:] + ".", epilog=epilog,
        parents=[*parents, debug_option()], formatter_class=argparse.RawDescriptionHelpFormatter,
    )


FOREIGN_FILE_ERRORS: tuple[str, ...] = ("safetensors", "pyarrow")
"""Packages whose exceptions mean a file could not be read or written (a truncated safetensors
file, a corrupt parquet file); like ``OSError`` they are bad input, reported in one line."""


def is_bad_input(error: BaseException) -> bool:
    """A toolkit error, or a foreign error from reading or writing files (OSError and its family,
    safetensors, pyarrow): what the command lines report in one line rather than as a bug."""
    module = type(error).__module__.split(".")[0]
    return isinstance(error, (DyVTEError, OSError)) or module in FOREIGN_FILE_ERRORS


def command_line(program: str, description: str, epilog: str,
                 subcommands: Sequence[Callable[[Any], None]]) -> argparse.ArgumentParser:
    """A toolkit command line: ``program COMMAND ...``, each function of ``subcommands`` adding its
    subcommand(s) to the parser's subcommand set."""
    parser = argparse.ArgumentParser(prog=program, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in subcommands:
        add(commands)
    return parser


def run_command(program: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen subcommand (``args.run(args)``).

    A :class:`DyVTEError` or a foreign file error (:func:`is_bad_input`) prints
    ``<program> <command>: error: <message>`` on one line and returns 2 (``--debug``: the
    traceback instead); any other exception is a bug and keeps its traceback. SIGTERM (``kill``,
    a scheduler's time limit) stops the command like Ctrl-C: the writers' context managers close,
    so every finished file keeps its final name, and the command returns 130 (``args.stop_hint``,
    if a command sets it, is added to that message).
    """
    args = parser.parse_args(argv)
    with _sigterm_as_keyboard_interrupt():
        try:
            return int(args.run(args))
        except KeyboardInterrupt:
            print(f"{program} {args.command}: stopped; the files finished so far are kept"
                  f"{getattr(args, 'stop_hint', '')}", file=sys.stderr)
            return 130
        except Exception as error:
            if getattr(args, "debug", False) or not is_bad_input(error):
                raise
            print(f"{program} {args.command}: error: {one_line(error)}", file=sys.stderr)
            return 2


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a foreign error is prefixed with its type)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, DyVTEError):
        return text
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"
    return f"{type(error).__name__}: {text}"


@contextlib.contextmanager
def _sigterm_as_keyboard_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
