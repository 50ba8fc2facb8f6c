"""Streaming parquet output and validated reading of the statistics.

An output folder holds shard files ``statistics-00000.parquet``, ``samples-00000.parquet``, ...
Each batch becomes one row group of the current shard; a shard is closed after
``batches_per_shard`` batches. A shard is written under a hidden temporary name and renamed when
it is complete, so an interrupted run leaves only complete files in the folder (and whatever
shards were finished before the interruption stay valid).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.schema import PROVENANCE_KEY, TABLES, SchemaError, arrow_schema, validate_arrow_schema


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


class StatisticsWriter:
    """Write statistics and sample tables batch by batch into shard files under ``out_dir``.

    Use as a context manager; on exit (also after an exception) the open shards are completed.
    """

    def __init__(self, out_dir: str | Path, provenance: dict[str, Any], batches_per_shard: int = 64) -> None:
        self.out_dir = Path(out_dir)
        self.provenance = provenance
        self.batches_per_shard = batches_per_shard
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shard = self._next_free_shard()
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._batches_in_shard = 0
        self.files: list[Path] = []
        self.rows_written = 0

    def _next_free_shard(self) -> int:
        taken = [int(p.stem.rsplit("-", 1)[1]) for p in self.out_dir.glob("statistics-*.parquet")]
        return max(taken, default=-1) + 1

    def _path(self, table: str, temporary: bool = False) -> Path:
        name = f"{table}-{self._shard:05d}.parquet"
        return self.out_dir / (f".{name}.partial" if temporary else name)

    def write(self, statistics: pa.Table, samples: pa.Table) -> None:
        """Append one batch: one row group in each of the current statistics and samples shards."""
        for table_name, table in (("statistics", statistics), ("samples", samples)):
            validate_arrow_schema(table.schema, f"{table_name} batch")
        if not self._writers:
            for table_name in TABLES:
                schema = arrow_schema(table_name, self.provenance)
                self._writers[table_name] = pq.ParquetWriter(self._path(table_name, temporary=True), schema)
        for table_name, table in (("statistics", statistics), ("samples", samples)):
            writer = self._writers[table_name]
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata), row_group_size=max(1, table.num_rows))
        self.rows_written += statistics.num_rows
        self._batches_in_shard += 1
        if self._batches_in_shard >= self.batches_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if not self._writers:
            return
        for table_name, writer in self._writers.items():
            writer.close()
            final = self._path(table_name)
            os.replace(self._path(table_name, temporary=True), final)
            self.files.append(final)
        self._writers = {}
        self._batches_in_shard = 0
        self._shard += 1

    def close(self) -> None:
        self._finish_shard()

    def __enter__(self) -> StatisticsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


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


def read_schema(file: str | Path) -> tuple[str, pa.Schema]:
    """Open one parquet file's schema and validate it; return (table name, schema).

    Raises:
        SchemaError: the file is not readable parquet, or not of this toolkit's schema/version.
    """
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowInvalid, OSError) as error:
        raise SchemaError(f"{file}: expected a readable parquet file, found a corrupt or foreign file ({error})") from error
    return validate_arrow_schema(schema, str(file)), schema


def read_table(path: str | Path, table: str = "statistics") -> pd.DataFrame:
    """Read a file or a folder of shards of ``table`` into one DataFrame, validating every file."""
    frames = []
    for file in _parquet_files(path, table):
        found, _ = read_schema(file)
        if found != table:
            raise SchemaError(f"{file}: expected a {table} table, found a {found} table")
        try:
            frames.append(pq.read_table(file).to_pandas())
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
    return lines
