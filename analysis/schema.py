"""The statistics schema, written down once: columns, dtypes, units, version, validation.

Two tables are written side by side:
- statistics: one row per (sample_id, layer, head, query_group, key_group);
- samples: one row per sample (token counts, question id, image paths).
Each parquet file carries key-value metadata: ``dyvte.table`` (which table), ``dyvte.schema_version``
and ``dyvte.provenance`` (JSON: model, library versions, git revision, attention path, dtype, seed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from analysis.layout import KEY_GROUPS, QUERY_GROUPS
from analysis.stats import reduce_heads

if TYPE_CHECKING:
    from analysis.layout import TokenLayout
    from analysis.recorder import LayerRecord

SCHEMA_VERSION = 1
TABLE_KEY = b"dyvte.table"
VERSION_KEY = b"dyvte.schema_version"
PROVENANCE_KEY = b"dyvte.provenance"


class SchemaError(ValueError):
    """A table or file does not follow the statistics schema."""


@dataclass(frozen=True)
class Column:
    name: str
    dtype: pa.DataType
    unit: str
    description: str


STATISTICS_COLUMNS: tuple[Column, ...] = (
    Column("sample_id", pa.string(), "", "identifier of the sample (the question id)"),
    Column("layer", pa.int32(), "index", "decoder layer, 0 = first"),
    Column("head", pa.int32(), "index", "attention head; -1 = mean over heads, -2 = max over heads"),
    Column("query_group", pa.string(), "", "group of the attending tokens: system, image, text, last"),
    Column("key_group", pa.string(), "", "group of the attended tokens: system, image, text"),
    Column("mass", pa.float32(), "probability", "mean over the group's queries of the summed attention over the key group"),
    Column("mass_per_key", pa.float32(), "probability / token", "mass divided by the number of keys in the key group"),
    Column("entropy", pa.float32(), "nats", "mean entropy of the query group's attention rows (same for every key group)"),
    Column("n_query", pa.int32(), "tokens", "number of queries in the query group"),
    Column("n_key", pa.int32(), "tokens", "number of keys in the key group"),
)

SAMPLE_COLUMNS: tuple[Column, ...] = (
    Column("sample_id", pa.string(), "", "identifier of the sample (the question id)"),
    Column("question_id", pa.string(), "", "question_id of the question file"),
    Column("images", pa.list_(pa.string()), "", "image paths relative to the image folder"),
    Column("question", pa.string(), "", "the question text"),
    Column("n_tokens", pa.int32(), "tokens", "prompt length without padding"),
    Column("n_system", pa.int32(), "tokens", "tokens before the first image token"),
    Column("n_image", pa.int32(), "tokens", "image tokens"),
    Column("n_text", pa.int32(), "tokens", "non-image tokens after the first image token"),
)

TABLES: dict[str, tuple[Column, ...]] = {"statistics": STATISTICS_COLUMNS, "samples": SAMPLE_COLUMNS}


def arrow_schema(table: str, provenance: dict[str, Any] | None = None) -> pa.Schema:
    """The arrow schema of ``table`` ("statistics" or "samples") with the toolkit's metadata."""
    columns = TABLES[table]
    metadata = {TABLE_KEY: table.encode(), VERSION_KEY: str(SCHEMA_VERSION).encode()}
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode()
    return pa.schema([pa.field(c.name, c.dtype, nullable=False) for c in columns], metadata=metadata)


def validate_arrow_schema(schema: pa.Schema, where: str = "table") -> str:
    """Check a schema (with metadata) against the toolkit's; return which table it is.

    Raises:
        SchemaError: naming what was expected and what was found.
    """
    metadata = schema.metadata or {}
    if TABLE_KEY not in metadata or VERSION_KEY not in metadata:
        raise SchemaError(
            f"{where}: expected DyVTE statistics (parquet metadata keys {TABLE_KEY.decode()} and "
            f"{VERSION_KEY.decode()}), found metadata keys {sorted(k.decode(errors='replace') for k in metadata)}"
        )
    table = metadata[TABLE_KEY].decode()
    version = metadata[VERSION_KEY].decode()
    if version != str(SCHEMA_VERSION):
        raise SchemaError(f"{where}: expected schema version {SCHEMA_VERSION}, found version {version}")
    if table not in TABLES:
        raise SchemaError(f"{where}: expected table to be one of {sorted(TABLES)}, found {table!r}")
    expected = [(c.name, c.dtype) for c in TABLES[table]]
    found = [(f.name, f.type) for f in schema]
    if expected != found:
        raise SchemaError(
            f"{where}: expected {table} columns {[f'{n}:{t}' for n, t in expected]}, "
            f"found {[f'{n}:{t}' for n, t in found]}"
        )
    return table


def statistics_table(
    records: Sequence[LayerRecord],
    layout: TokenLayout,
    sample_ids: Sequence[str],
    heads: str = "mean",
) -> pa.Table:
    """Long-format statistics of one recorded batch (rows ordered sample, layer, head, groups)."""
    if len(sample_ids) != layout.batch_size:
        raise SchemaError(f"expected {layout.batch_size} sample ids (one per row), found {len(sample_ids)}")
    mass = np.stack([reduce_heads(r.mass, heads)[0].cpu().numpy() for r in records], axis=1)  # b l h q k
    entropy = np.stack([reduce_heads(r.entropy, heads)[0].cpu().numpy() for r in records], axis=1)  # b l h q
    head_labels = reduce_heads(records[0].mass, heads)[1]
    shape = mass.shape
    index = np.indices(shape).reshape(len(shape), -1)
    query_counts = layout.query_counts().cpu().numpy()
    key_counts = layout.key_counts().cpu().numpy()
    n_key = key_counts[index[0], index[4]]
    layers = np.array([r.layer for r in records], dtype=np.int32)
    columns = {
        "sample_id": pa.array(np.asarray(list(sample_ids), dtype=object)[index[0]], pa.string()),
        "layer": pa.array(layers[index[1]], pa.int32()),
        "head": pa.array(np.asarray(head_labels, dtype=np.int32)[index[2]], pa.int32()),
        "query_group": pa.array(np.asarray(QUERY_GROUPS, dtype=object)[index[3]], pa.string()),
        "key_group": pa.array(np.asarray(KEY_GROUPS, dtype=object)[index[4]], pa.string()),
        "mass": pa.array(mass.reshape(-1).astype(np.float32), pa.float32()),
        "mass_per_key": pa.array((mass.reshape(-1) / np.where(n_key > 0, n_key, np.nan)).astype(np.float32), pa.float32()),
        "entropy": pa.array(entropy[index[0], index[1], index[2], index[3]].astype(np.float32), pa.float32()),
        "n_query": pa.array(query_counts[index[0], index[3]].astype(np.int32), pa.int32()),
        "n_key": pa.array(n_key.astype(np.int32), pa.int32()),
    }
    return pa.Table.from_pydict(columns, schema=arrow_schema("statistics"))


def samples_table(
    layout: TokenLayout,
    sample_ids: Sequence[str],
    question_ids: Sequence[str],
    images: Sequence[Sequence[str]],
    questions: Sequence[str],
) -> pa.Table:
    """The per-sample table of one batch."""
    counts = layout.key_counts().cpu().numpy()
    n_tokens = (layout.group >= 0).sum(dim=1).cpu().numpy()
    columns = {
        "sample_id": pa.array(list(sample_ids), pa.string()),
        "question_id": pa.array(list(question_ids), pa.string()),
        "images": pa.array([list(i) for i in images], pa.list_(pa.string())),
        "question": pa.array(list(questions), pa.string()),
        "n_tokens": pa.array(n_tokens.astype(np.int32), pa.int32()),
        "n_system": pa.array(counts[:, KEY_GROUPS.index("system")].astype(np.int32), pa.int32()),
        "n_image": pa.array(counts[:, KEY_GROUPS.index("image")].astype(np.int32), pa.int32()),
        "n_text": pa.array(counts[:, KEY_GROUPS.index("text")].astype(np.int32), pa.int32()),
    }
    return pa.Table.from_pydict(columns, schema=arrow_schema("samples"))


def describe() -> str:
    """A plain-text description of both tables (names, dtypes, units)."""
    lines = [f"DyVTE statistics schema, version {SCHEMA_VERSION}"]
    for name, columns in TABLES.items():
        lines.append(f"\n{name}:")
        lines += [f"  {c.name:<13} {str(c.dtype):<14} {c.unit:<20} {c.description}" for c in columns]
    return "\n".join(lines)
