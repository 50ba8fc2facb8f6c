"""Every parquet table the toolkit writes, written down once: columns, dtypes, units, version.

:data:`TABLES` is the registry (name -> :class:`TableSpec`). The analysis half writes two tables
side by side in a dump folder:
- statistics: one row per (sample_id, layer, head, query_group, key_group);
- samples: one row per sample (token counts, question id, image paths).
The exit half's tables (the exit sweep, the evaluation's per-question rows and its summary) are
registered here too, so every file the toolkit writes is validated the same way. Each parquet
file carries key-value metadata: ``dyvte.table`` (which table), ``dyvte.schema_version`` (that
table's version) and ``dyvte.provenance`` (JSON: model, library versions, git revision, attention
path, dtype, seed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from analysis.errors import DyVTEError
from analysis.vocabulary import KEY_GROUPS, QUERY_GROUPS

if TYPE_CHECKING:
    import torch

    from analysis.layout import TokenLayout

SCHEMA_VERSION = 1
TABLE_KEY = b"dyvte.table"
VERSION_KEY = b"dyvte.schema_version"
PROVENANCE_KEY = b"dyvte.provenance"


class SchemaError(DyVTEError, ValueError):
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
    Column("n_query", pa.int32(), "tokens", "number of queries in the query group (at this layer: fewer after an exit)"),
    Column("n_key", pa.int32(), "tokens", "number of keys in the key group (at this layer: 0 for a group that left)"),
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

@dataclass(frozen=True)
class TableSpec:
    """One registered table.

    Attributes:
        name: the ``dyvte.table`` metadata value, also the shard file prefix (``name-00000.parquet``).
        version: the table's schema version (``dyvte.schema_version``); bump it when columns change.
        columns: the fixed columns, in order.
        description: what one row is.
        open_columns: (prefix, dtype) pairs: further columns whose names start with the prefix are
            allowed after the fixed ones (for instance one accuracy column per question type).
        family: how an error message names a file of this kind ("DyVTE statistics", ...).
    """

    name: str
    version: int
    columns: tuple[Column, ...]
    description: str
    open_columns: tuple[tuple[str, pa.DataType], ...] = ()
    family: str = ""

    @property
    def expected_phrase(self) -> str:
        return self.family or f"an {self.name} table"

    def arrow_schema(self, provenance: dict[str, Any] | None = None, extra: Sequence[str] = ()) -> pa.Schema:
        """The arrow schema with the toolkit's metadata; ``extra`` names open columns to add."""
        metadata = {TABLE_KEY: self.name.encode(), VERSION_KEY: str(self.version).encode()}
        if provenance is not None:
            metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode()
        fields = [pa.field(c.name, c.dtype, nullable=False) for c in self.columns]
        fields += [pa.field(name, self._open_dtype(name, "schema"), nullable=False) for name in extra]
        return pa.schema(fields, metadata=metadata)

    def _open_dtype(self, name: str, where: str) -> pa.DataType:
        for prefix, dtype in self.open_columns:
            if name.startswith(prefix):
                return dtype
        raise SchemaError(
            f"{where}: expected {self.name} columns {[c.name for c in self.columns]}"
            + (f" then columns starting with {[p for p, _ in self.open_columns]}" if self.open_columns else "")
            + f", found an extra column {name!r}"
        )

    def check_columns(self, schema: pa.Schema, where: str) -> None:
        """Raise SchemaError unless ``schema``'s columns are this table's (names and dtypes, in order)."""
        expected = [(c.name, c.dtype) for c in self.columns]
        found = [(f.name, f.type) for f in schema]
        if found[: len(expected)] != expected or (len(found) > len(expected) and not self.open_columns):
            raise SchemaError(
                f"{where}: expected {self.name} columns {[f'{n}:{t}' for n, t in expected]}, "
                f"found {[f'{n}:{t}' for n, t in found]}"
            )
        for name, dtype in found[len(expected):]:
            if self._open_dtype(name, where) != dtype:
                raise SchemaError(f"{where}: expected column {name!r} of type {self._open_dtype(name, where)}, found {dtype}")


TABLES: dict[str, TableSpec] = {}
"""Every table the toolkit writes, by name (see :func:`register_table`)."""


def register_table(spec: TableSpec) -> TableSpec:
    """Add a table to :data:`TABLES` (one name, one spec) and return it."""
    if spec.name in TABLES and TABLES[spec.name] != spec:
        raise SchemaError(f"expected one definition of table {spec.name!r}, found a second, different one")
    TABLES[spec.name] = spec
    return spec


STATISTICS = register_table(TableSpec(
    "statistics", SCHEMA_VERSION, STATISTICS_COLUMNS, "one row per sample, layer, head, query group and key group",
    family="DyVTE statistics",
))
SAMPLES = register_table(TableSpec(
    "samples", SCHEMA_VERSION, SAMPLE_COLUMNS, "one row per sample of a dump", family="DyVTE statistics"
))
EXIT_SWEEP = register_table(TableSpec(
    "exit_sweep",
    1,
    (
        Column("sample_id", pa.string(), "", "identifier of the sample (the question id)"),
        Column("layer", pa.int32(), "index", "exit after this decoder layer (0 = first); L-1 = no removal"),
        Column("agreement", pa.float32(), "fraction", "answer tokens whose argmax equals the full model's"),
        Column("ce_exit", pa.float32(), "nats / token", "mean answer cross-entropy with the image removed after the layer"),
        Column("ce_full", pa.float32(), "nats / token", "mean answer cross-entropy of the full model"),
        Column("ce_ratio", pa.float32(), "ratio", "ce_exit / ce_full"),
        Column("label", pa.bool_(), "", "exit is safe: agreement > min_agreement and ce_ratio < max_ce_ratio"),
        Column("n_answer", pa.int32(), "tokens", "answer tokens (teacher-forced)"),
        Column("n_image", pa.int32(), "tokens", "image tokens removed after the layer"),
        Column("n_kept", pa.int32(), "tokens", "tokens left in the layers after the exit"),
    ),
    "one row per sample and exit layer of `dyvte-exit sweep` (teacher-forced labels)",
))
EXIT_ANSWERS = register_table(TableSpec(
    "exit_answers",
    1,
    (
        Column("sample_id", pa.string(), "", "identifier of the sample (the question id)"),
        Column("layer", pa.int32(), "index", "the image tokens left after this decoder layer; L-1 = no exit"),
        Column("category", pa.string(), "", "the question's category ('uncategorised' when it has none)"),
        Column("answer", pa.string(), "", "the reference answer"),
        Column("prediction", pa.string(), "", "the greedy answer generated with that exit (KV cache, stripped)"),
        Column("correct", pa.bool_(), "", "exact match of prediction and answer (analysis.scoring.exact_match)"),
        Column("same_as_full", pa.bool_(), "", "the prediction equals the no-exit prediction (layer L-1)"),
        Column("tokens", pa.int32(), "tokens", "prompt length without padding"),
        Column("image_tokens", pa.int32(), "tokens", "image tokens of the prompt"),
        Column("relative_prefill_flops", pa.float64(), "ratio",
               "decoder prefill FLOPs of the static exit after the layer over the stock model's (exit.flops)"),
    ),
    "one row per sample and exit layer of `dyvte-exit sweep --answers N`: the answer generated with the "
    "image tokens removed after the layer (the exit table)",
))
EVALUATION = register_table(TableSpec(
    "evaluation",
    1,
    (
        Column("method", pa.string(), "", "the exit method as written on the command line (exit.methods)"),
        Column("question_id", pa.string(), "", "question_id of the question file"),
        Column("category", pa.string(), "", "the question's category ('uncategorised' when it has none)"),
        Column("answer", pa.string(), "", "the reference answer"),
        Column("prediction", pa.string(), "", "the model's answer (greedy, stripped)"),
        Column("correct", pa.bool_(), "", "exact match of prediction and answer (analysis.scoring.exact_match)"),
        Column("exit_layer", pa.int64(), "index", "layer after which the row's last image token left; -1 = never"),
        Column("tokens", pa.int64(), "tokens", "prompt length without padding"),
        Column("image_tokens", pa.int64(), "tokens", "image tokens of the prompt"),
        Column("relative_prefill_flops", pa.float64(), "ratio",
               "decoder prefill FLOPs under the method over the stock model's (exit.flops)"),
        Column("batch", pa.int64(), "index", "the batch the row was answered in"),
        Column("batch_seconds", pa.float64(), "s", "wall time of that batch's generate()"),
        Column("batch_rows", pa.int64(), "rows", "rows of that batch"),
        Column("prefill_seconds", pa.float64(), "s", "the batch's wall time up to the first next-token scores"),
        Column("decode_seconds", pa.float64(), "s", "the batch's wall time after the prefill"),
        Column("decode_steps", pa.int64(), "forwards", "decoding forwards of the batch (generated length - 1)"),
    ),
    "one row per question of one exit method (`dyvte-exit eval --out`: eval-<method>.parquet)",
    family="DyVTE exit evaluation rows",
))
EVALUATION_SUMMARY = register_table(TableSpec(
    "evaluation_summary",
    1,
    (
        Column("method", pa.string(), "", "the exit method as written on the command line (exit.methods)"),
        Column("questions", pa.int64(), "questions", "questions answered"),
        Column("num_layers", pa.int64(), "layers", "decoder layers of the model"),
        Column("accuracy_overall", pa.float64(), "fraction", "exact-match accuracy over all questions"),
        Column("mean_exit_layer", pa.float64(), "index", "mean exit layer; a row that never exits counts as L-1"),
        Column("exited_share", pa.float64(), "fraction", "rows whose image tokens all left"),
        Column("relative_prefill_flops", pa.float64(), "ratio", "mean over the rows of relative_prefill_flops"),
        Column("seconds", pa.float64(), "s", "wall time of generate() over all batches"),
        Column("prefill_seconds", pa.float64(), "s", "prefill wall time over all batches"),
        Column("decode_seconds", pa.float64(), "s", "decoding wall time over all batches"),
        Column("decode_tokens_per_second", pa.float64(), "tokens / s", "decoded tokens (every row's) per second"),
    ),
    "one line per exit method of an evaluation (`dyvte-exit eval --out`: summary.parquet)",
    open_columns=(("accuracy_", pa.float64()),),
    family="DyVTE exit evaluation summary",
))
DUMP_TABLES: tuple[str, ...] = ("statistics", "samples")
"""The tables of a dump folder, written side by side, shard by shard."""


def arrow_schema(table: str, provenance: dict[str, Any] | None = None) -> pa.Schema:
    """The arrow schema of a registered ``table`` (fixed columns) with the toolkit's metadata."""
    return TABLES[table].arrow_schema(provenance)


def validate_arrow_schema(schema: pa.Schema, where: str = "table", expected: str | None = None) -> str:
    """Check a schema (with metadata) against the registry; return which table it is.

    Args:
        expected: the table it must be (None: any registered table).

    Raises:
        SchemaError: naming what was expected and what was found.
    """
    metadata = schema.metadata or {}
    if TABLE_KEY not in metadata or VERSION_KEY not in metadata:
        what = TABLES[expected].expected_phrase if expected in TABLES else "DyVTE statistics"
        raise SchemaError(
            f"{where}: expected {what} (parquet metadata keys {TABLE_KEY.decode()} and "
            f"{VERSION_KEY.decode()}), found metadata keys {sorted(k.decode(errors='replace') for k in metadata)}"
        )
    table = metadata[TABLE_KEY].decode()
    version = metadata[VERSION_KEY].decode()
    if expected is not None and table != expected:
        raise SchemaError(f"{where}: expected a {expected} table, found a {table} table")
    if table not in TABLES:
        raise SchemaError(f"{where}: expected table to be one of {sorted(TABLES)}, found {table!r}")
    spec = TABLES[table]
    if version != str(spec.version):
        raise SchemaError(f"{where}: expected schema version {spec.version}, found version {version}")
    spec.check_columns(schema, where)
    return table


class ReducedLayer(Protocol):
    """What the statistics table needs of one recorded layer (``analysis.recorder.LayerRecord``)."""

    layer: int
    mass: torch.Tensor | None  # (batch, head, query_group, key_group)
    entropy: torch.Tensor | None  # (batch, head, query_group)
    query_counts: torch.Tensor | None  # (batch, query_group) at this layer, None: the prompt's
    key_counts: torch.Tensor | None  # (batch, key_group) at this layer, None: the prompt's


def statistics_table(
    records: Sequence[ReducedLayer],
    layout: TokenLayout,
    sample_ids: Sequence[str],
    heads: str = "mean",
) -> pa.Table:
    """Long-format statistics of one recorded batch (rows ordered sample, layer, head, groups)."""
    from analysis.stats import reduce_heads  # torch: only when a table is built, not to read a schema

    if len(sample_ids) != layout.batch_size:
        raise SchemaError(f"expected {layout.batch_size} sample ids (one per row), found {len(sample_ids)}")
    mass = np.stack([reduce_heads(r.mass, heads)[0].cpu().numpy() for r in records], axis=1)  # b l h q k
    entropy = np.stack([reduce_heads(r.entropy, heads)[0].cpu().numpy() for r in records], axis=1)  # b l h q
    head_labels = reduce_heads(records[0].mass, heads)[1]
    shape = mass.shape
    index = np.indices(shape).reshape(len(shape), -1)
    # Group sizes per (sample, layer, group): the prompt's, or the layer's own after a token exit.
    query_counts = np.stack([_counts(r.query_counts, layout.query_counts()) for r in records], axis=1)
    key_counts = np.stack([_counts(r.key_counts, layout.key_counts()) for r in records], axis=1)
    n_key = key_counts[index[0], index[1], index[4]]
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
        "n_query": pa.array(query_counts[index[0], index[1], index[3]].astype(np.int32), pa.int32()),
        "n_key": pa.array(n_key.astype(np.int32), pa.int32()),
    }
    return pa.Table.from_pydict(columns, schema=arrow_schema("statistics"))


def _counts(layer_counts: torch.Tensor | None, prompt_counts: torch.Tensor) -> np.ndarray:
    return (prompt_counts if layer_counts is None else layer_counts).cpu().numpy()


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
    """A plain-text description of every registered table (names, dtypes, units, versions)."""
    lines = ["DyVTE tables (parquet metadata dyvte.table, dyvte.schema_version, dyvte.provenance)"]
    for spec in TABLES.values():
        lines.append(f"\n{spec.name} (schema version {spec.version}): {spec.description}")
        lines += [f"  {c.name:<13} {str(c.dtype):<14} {c.unit:<20} {c.description}" for c in spec.columns]
        lines += [f"  {prefix + '*':<13} {str(dtype):<14} (one column per value)" for prefix, dtype in spec.open_columns]
    return "\n".join(lines)
