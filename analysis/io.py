"""Streaming parquet output and validated reading of the statistics.

An output folder holds shard files ``statistics-00000.parquet``, ``samples-00000.parquet``, ...
Each batch becomes one row group of the current shard; a shard is closed after
``batches_per_shard`` batches (or ``seconds_per_shard`` seconds). A shard is written under a
hidden temporary name and renamed when it is complete, so an interrupted run leaves only complete
files in the folder (and whatever shards were finished before the interruption stay valid).

Several processes can write into one folder (``--shard i/n``, torchrun): each writes shards named
with its tag, ``statistics-shard001of002-00000.parquet``, so names never collide, and readers see
one table. Samples that failed are listed in ``_errors-[TAG-]NNNNN.jsonl`` files committed with the
shard they belong to (the leading underscore keeps pyarrow's data-set discovery away from them).
Commit order inside a shard: statistics, errors, then samples, so the samples shards are the
record of finished samples that ``--resume`` relies on; a statistics shard without its samples
shard (a kill between the renames) is an orphan that ``clean_incomplete`` removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.errors import UsageError
from analysis.schema import (
    DUMP_TABLES,
    PROVENANCE_KEY,
    SchemaError,
    arrow_schema,
    file_version,
    upgraded,
    validate_arrow_schema,
)


@contextmanager
def replaced_when_complete(folder: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``folder`` that replaces ``folder`` when the block ends
    without an exception; after an exception the staging folder is removed and ``folder`` is left
    as it was, so a complete earlier result is never lost to an interrupted new one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Raise UsageError unless ``path`` can be an output folder: not a file, and the folder (or,
    when it does not exist yet, its nearest existing parent) writable. Cheap: run it before a
    model loads, so a bad ``--out`` costs no model loading."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"expected {option} to be a folder (new or existing), found a file at {path}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UsageError(f"expected {option} inside a folder, found the file {existing} in its path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"expected {option} {path} to be writable, found {existing} without write permission")
    return path


ERRORS_PREFIX = "_errors"
SHARD_NAME = re.compile(r"^(?P<table>[A-Za-z_]+)-(?:(?P<tag>shard\d+of\d+)-)?(?P<seq>\d{5,})\.(?P<ext>parquet|jsonl)$")


def shard_tag(index: int, count: int) -> str:
    """The file-name tag of shard ``index`` of ``count`` (``""`` for a single process)."""
    if not 0 <= index < count:
        raise ValueError(f"expected a shard index in 0..{count - 1}, found {index}")
    return "" if count == 1 else f"shard{index:03d}of{count:03d}"


def tag_count(tag: str) -> int:
    """How many shards the run that wrote files with ``tag`` had (1 for the untagged name)."""
    return int(tag.rsplit("of", 1)[1]) if tag else 1


def shard_file_name(table: str, tag: str, seq: int, ext: str = "parquet") -> str:
    """``statistics-00003.parquet`` or ``statistics-shard001of002-00003.parquet`` (``table`` may be ``_errors``)."""
    return f"{table}-{tag + '-' if tag else ''}{seq:05d}.{ext}"


def parse_shard_file(path: str | Path) -> tuple[str, str, int] | None:
    """(table, tag, sequence number) of a shard file name, or None for any other name."""
    match = SHARD_NAME.match(Path(path).name)
    return (match["table"], match["tag"] or "", int(match["seq"])) if match else None


class AtomicFile:
    """A file written under a hidden temporary name beside its final path and renamed onto it.

    ``partial`` (``.<name>.partial`` in the same folder) is where the writer writes; ``commit()``
    renames it to ``path`` in one step, so no reader ever sees a half-written file under a final
    name, and a kill leaves only a hidden partial file (``clean_incomplete`` removes those). As a
    context manager it commits when the block succeeds and discards the partial file otherwise.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(f".{self.path.name}.partial")

    def commit(self) -> Path:
        """Rename the partial file onto the final path; return the final path."""
        os.replace(self.partial, self.path)
        return self.path

    def discard(self) -> None:
        """Remove the partial file, if any."""
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through an :class:`AtomicFile`."""
    with AtomicFile(path) as file:
        file.partial.write_text(text, encoding="utf-8")
    return file.path


class ParquetShard:
    """One parquet file of a registered table, written row group by row group, committed atomically.

    The file is opened under its hidden partial name at the first ``write`` and renamed to its
    final name by ``close()``, which a writer calls when the shard is full, at the end, and also
    after an exception (so the row groups finished so far are kept). Every table written is
    checked against the table's schema first.
    """

    def __init__(self, path: str | Path, schema: pa.Schema) -> None:
        self.file = AtomicFile(path)
        self.schema = schema
        self.table = validate_arrow_schema(schema, str(path))
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    @property
    def path(self) -> Path:
        return self.file.path

    def write(self, table: pa.Table, row_group_size: int | None = None) -> None:
        """Append ``table`` as one row group (or several of ``row_group_size`` rows)."""
        validate_arrow_schema(table.schema.with_metadata(self.schema.metadata), f"{self.table} batch", self.table)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.file.partial, self.schema)
        self._writer.write_table(table.replace_schema_metadata(self.schema.metadata), row_group_size=row_group_size)
        self.rows += table.num_rows

    def close(self) -> Path | None:
        """Commit the file under its final name; None if nothing was written."""
        if self._writer is None:
            return None
        self._writer.close()
        self._writer = None
        return self.file.commit()


class StatisticsWriter:
    """Write statistics and sample tables batch by batch into shard files under ``out_dir``.

    Use as a context manager; on exit (also after an exception) the open shards are completed.
    ``tag`` (from ``shard_tag``) names this process's shards when several write into one folder;
    ``record_error`` lists a failed sample in the errors file committed with the current shard.
    """

    def __init__(
        self,
        out_dir: str | Path,
        provenance: dict[str, Any],
        batches_per_shard: int = 64,
        *,
        tag: str = "",
        seconds_per_shard: float | None = None,
    ) -> None:
        if batches_per_shard < 1:
            raise ValueError(f"expected at least 1 batch per shard, found {batches_per_shard}")
        self.out_dir = Path(out_dir)
        self.provenance = provenance
        self.batches_per_shard = batches_per_shard
        self.seconds_per_shard = seconds_per_shard
        self.tag = tag
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shard = self._next_free_shard()
        self._shards: dict[str, ParquetShard] = {}
        self._errors: list[dict[str, Any]] = []
        self._batches_in_shard = 0
        self._started = time.monotonic()
        self.files: list[Path] = []
        self.rows_written = 0
        self.samples_written = 0
        self.errors_written = 0

    def _next_free_shard(self) -> int:
        taken = [parsed[2] for p in self.out_dir.iterdir() if (parsed := parse_shard_file(p)) and parsed[1] == self.tag]
        return max(taken, default=-1) + 1

    def _path(self, table: str, ext: str = "parquet") -> Path:
        return self.out_dir / shard_file_name(table, self.tag, self._shard, ext)

    def write(self, statistics: pa.Table, samples: pa.Table) -> None:
        """Append one batch: one row group in each of the current statistics and samples shards.

        Ctrl-C and SIGTERM wait until both row groups are written: a stop between them would
        commit the batch's statistics without its samples, and ``--resume`` would write them twice.
        """
        for table_name, table in (("statistics", statistics), ("samples", samples)):
            validate_arrow_schema(table.schema, f"{table_name} batch", table_name)
        with signals_held():
            if not self._shards:
                self._shards = {
                    name: ParquetShard(self._path(name), arrow_schema(name, self.provenance)) for name in DUMP_TABLES
                }
            for table_name, table in (("statistics", statistics), ("samples", samples)):
                self._shards[table_name].write(table, row_group_size=max(1, table.num_rows))
            self.rows_written += statistics.num_rows
            self.samples_written += samples.num_rows
            self._count_batch()

    def record_error(self, entry: dict[str, Any]) -> None:
        """List one failed sample (a JSON-serialisable dict with at least ``sample_id`` and ``reason``)."""
        if "sample_id" not in entry or "reason" not in entry:
            raise ValueError(f"expected an error entry with sample_id and reason, found keys {sorted(entry)}")
        self._errors.append(entry)
        self.errors_written += 1
        self._count_batch()

    def _count_batch(self) -> None:
        self._batches_in_shard += 1
        too_old = self.seconds_per_shard is not None and time.monotonic() - self._started >= self.seconds_per_shard
        if self._batches_in_shard >= self.batches_per_shard or too_old:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if not self._shards and not self._errors:
            return
        # Commit order: statistics, errors, samples (the samples shard marks the shard finished).
        if "statistics" in self._shards:
            self._commit(self._shards["statistics"])
        if self._errors:
            lines = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in self._errors)
            self.files.append(atomic_write_text(self._path(ERRORS_PREFIX, ext="jsonl"), lines))
        if "samples" in self._shards:
            self._commit(self._shards["samples"])
        self._shards = {}
        self._errors = []
        self._batches_in_shard = 0
        self._started = time.monotonic()
        self._shard += 1

    def _commit(self, shard: ParquetShard) -> None:
        path = shard.close()
        if path is not None:
            self.files.append(path)

    def close(self) -> None:
        self._finish_shard()

    def __enter__(self) -> StatisticsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver the first that came, so that the
    block runs whole. (Python-level: the handlers are swapped; a signal mask would not hold a
    signal that another thread receives.) Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: arrived.append(number)) for number in HELD_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        if arrived:
            signal.raise_signal(arrived[0])


def shard_files(out_dir: str | Path) -> list[tuple[Path, str, str, int]]:
    """Every shard file of a dump folder as (path, table, tag, sequence number), sorted by name."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in sorted(out_dir.iterdir()):
        parsed = parse_shard_file(path)
        if parsed is not None:
            found.append((path, *parsed))
    return found


def clean_incomplete(out_dir: str | Path, owns: Any = lambda tag: True) -> list[Path]:
    """Remove what an interrupted writer left behind: hidden ``.*.partial`` files and statistics
    shards without their samples shard, for every tag for which ``owns(tag)`` is true.

    Call it only for tags no live process is writing (a process owns its own tag; the tags of a
    run with another shard count belong to no live process). Returns the removed paths.
    """
    out_dir = Path(out_dir)
    removed: list[Path] = []
    if not out_dir.is_dir():
        return removed
    for path in sorted(out_dir.glob(".*.partial")):
        parsed = parse_shard_file(path.name[1:].removesuffix(".partial"))
        if parsed is not None and owns(parsed[1]):
            path.unlink(missing_ok=True)
            removed.append(path)
    files = shard_files(out_dir)
    committed = {(tag, seq) for _, table, tag, seq in files if table == "samples"}
    for path, table, tag, seq in files:
        if table == "statistics" and (tag, seq) not in committed and owns(tag):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def finished_samples(out_dir: str | Path) -> set[str]:
    """Ids of the samples a dump folder already holds: those in samples shards and in errors files.

    Raises:
        SchemaError: a samples shard is corrupt or of another schema (version); an errors file is
            not JSON lines.
    """
    done: set[str] = set()
    for path, table, _, _ in shard_files(out_dir):
        if table == "samples":
            found, _ = read_schema(path)
            if found != "samples":
                raise SchemaError(f"{path}: expected a samples table, found a {found} table")
            try:
                done.update(pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist())
            except (pa.ArrowInvalid, OSError) as error:
                raise SchemaError(f"{path}: expected readable parquet row groups, found corrupt data ({error})") from error
        elif table == ERRORS_PREFIX:
            done.update(str(entry["sample_id"]) for entry in _read_error_lines(path))
    return done


def _read_error_lines(path: Path) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise SchemaError(f"{path}:{number}: expected a JSON object per line, found invalid JSON ({error})") from error
        if not isinstance(entry, dict) or "sample_id" not in entry:
            raise SchemaError(f"{path}:{number}: expected a JSON object with a sample_id, found {line[:80]!r}")
        entries.append(entry)
    return entries


def read_errors(path: str | Path) -> pd.DataFrame:
    """The failed samples of a dump folder (every ``_errors-*.jsonl``): sample_id, question_id, images,
    error (the exception type) and reason; an empty frame with those columns when none failed."""
    entries = [entry for file, table, _, _ in shard_files(path) if table == ERRORS_PREFIX for entry in _read_error_lines(file)]
    columns = ["sample_id", "question_id", "images", "error", "reason"]
    frame = pd.DataFrame(entries)
    for column in columns:
        if column not in frame:
            frame[column] = pd.Series(dtype=object)
    return frame[columns + [c for c in frame.columns if c not in columns]]


def _parquet_files(path: str | Path, table: str) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"expected a parquet file or a folder of {table} shards at {path}, found nothing there")
    if path.is_file():
        return [path]
    files = sorted(path.glob(f"{table}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"expected {table}-*.parquet shards in folder {path}, found none")
    return files


def read_schema(file: str | Path, expected: str | None = None) -> tuple[str, pa.Schema]:
    """Open one parquet file's schema and validate it (as table ``expected`` if given); return
    (table name, schema).

    Raises:
        SchemaError: the file is not readable parquet, or not of this toolkit's schema/version, or
            not the ``expected`` table.
    """
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowInvalid, OSError) as error:
        raise SchemaError(f"{file}: expected a readable parquet file, found a corrupt or foreign file ({error})") from error
    return validate_arrow_schema(schema, str(file), expected), schema


def read_table(path: str | Path, table: str = "statistics") -> pd.DataFrame:
    """Read a file or a folder of shards of ``table`` into one DataFrame, validating every file; a
    file of an earlier schema version is read in the current one (``analysis.schema.upgraded``)."""
    frames = []
    for file in _parquet_files(path, table):
        _, schema = read_schema(file, expected=table)
        try:
            frames.append(upgraded(pq.read_table(file), table, file_version(schema)).to_pandas())
        except (pa.ArrowInvalid, OSError) as error:
            raise SchemaError(f"{file}: expected readable parquet row groups, found corrupt data ({error})") from error
    return pd.concat(frames, ignore_index=True)


def read_statistics(path: str | Path) -> pd.DataFrame:
    """The statistics table of a dump (a file or a folder of shards)."""
    return read_table(path, "statistics")


def read_samples(path: str | Path) -> pd.DataFrame:
    """The per-sample table of a dump folder."""
    return read_table(path, "samples")


def read_provenance(file: str | Path) -> dict[str, Any]:
    """The provenance recorded in one parquet file's metadata."""
    import json

    _, schema = read_schema(file)
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def validate_path(path: str | Path) -> list[str]:
    """Validate every parquet file under ``path`` (file or folder), reading all row groups.

    Returns:
        One line per file: ``<file>: <table>, <rows> rows``.

    In a dump folder, a statistics shard without its samples shard (a kill between the two
    renames of a shard; ``--resume`` cleans it up) is an error too.

    Raises:
        SchemaError or FileNotFoundError naming the first bad file.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"expected parquet files at {path}, found none")
    lines = []
    for file in files:
        table, _ = read_schema(file)
        try:
            rows = pq.read_table(file).num_rows
        except (pa.ArrowInvalid, OSError) as error:
            raise SchemaError(f"{file}: expected readable parquet row groups, found corrupt data ({error})") from error
        lines.append(f"{file}: {table}, {rows} rows")
    if path.is_dir():
        committed = {(tag, seq) for _, name, tag, seq in shard_files(path) if name == "samples"}
        for file, name, tag, seq in shard_files(path):
            if name == "statistics" and (tag, seq) not in committed:
                raise SchemaError(
                    f"{file}: expected its samples shard {shard_file_name('samples', tag, seq)} beside it, found none "
                    "(a dump killed while committing the shard); run the dump again with --resume to redo its samples"
                )
    return lines
