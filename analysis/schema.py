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
from analysis.vocabulary import GENERATED, GENERATED_KEY_GROUPS, KEY_GROUPS, PROMPT_STEP, QUERY_GROUPS

if TYPE_CHECKING:
    import torch

    from analysis.layout import TokenLayout

SCHEMA_VERSION = 2
"""The statistics and samples tables' version (2: decoding steps; files of version 1 are read as
version 2 with their prompt rows' ``step`` and an empty ``generated``)."""
TABLE_KEY = b"dyvte.table"
VERSION_KEY = b"dyvte.schema_version"
PROVENANCE_KEY = b"dyvte.provenance"


class SchemaError(DyVTEError, ValueError):
    """A table or file does not follow the statistics schema."""


@dataclass(frozen=True)
class Column:
    """One column of a registered table.

    Attributes:
        since: the table version that added the column; a file of an earlier version is read with
            the column filled with ``fill`` (what those files' rows mean in the newer schema).
    """

    name: str
    dtype: pa.DataType
    unit: str
    description: str
    since: int = 1
    fill: Any = None


STATISTICS_COLUMNS: tuple[Column, ...] = (
    Column("sample_id", pa.string(), "", "identifier of the sample (the question id)"),
    Column("layer", pa.int32(), "index", "decoder layer, 0 = first"),
    Column("head", pa.int32(), "index", "attention head; -1 = mean over heads, -2 = max over heads"),
    Column("query_group", pa.string(), "", f"group of the attending tokens: system, image, text, last; {GENERATED} "
           "for a generated answer token (one per step)"),
    Column("key_group", pa.string(), "", f"group of the attended tokens: system, image, text; {GENERATED} (the answer "
           "so far) for a generated token's rows"),
    Column("mass", pa.float32(), "probability", "mean over the group's queries of the summed attention over the key group"),
    Column("mass_per_key", pa.float32(), "probability / token", "mass divided by the number of keys in the key group"),
    Column("entropy", pa.float32(), "nats", "mean entropy of the query group's attention rows (same for every key group)"),
    Column("n_query", pa.int32(), "tokens", "number of queries in the query group (at this layer: fewer after an exit)"),
    Column("n_key", pa.int32(), "tokens", "number of keys in the key group (at this layer: 0 for a group that left)"),
    Column("step", pa.int32(), "index", f"{PROMPT_STEP} = the prompt (prefill); s >= 0 = the query is the s-th "
           "generated answer token (dump --generate)", since=2, fill=PROMPT_STEP),
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
    Column("generated", pa.string(), "", "the greedy answer whose tokens' attention was recorded (dump --generate); "
           "'' when none was", since=2, fill=""),
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

    def columns_at(self, version: int) -> tuple[Column, ...]:
        """The fixed columns a file of table version ``version`` holds."""
        return tuple(c for c in self.columns if c.since <= version)

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

    def check_columns(self, schema: pa.Schema, where: str, version: int | None = None) -> None:
        """Raise SchemaError unless ``schema``'s columns are this table's at ``version`` (default:
        the current one): names and dtypes, in order."""
        expected = [(c.name, c.dtype) for c in self.columns_at(self.version if version is None else version)]
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
    readable = [str(v) for v in range(1, spec.version + 1)]
    if version not in readable:
        raise SchemaError(f"{where}: expected schema version {spec.version}"
                          + (f" (or an earlier one: {', '.join(readable[:-1])})" if len(readable) > 1 else "")
                          + f", found version {version}")
    spec.check_columns(schema, where, int(version))
    return table


def file_version(schema: pa.Schema) -> int:
    """The table version a validated file's schema says it has."""
    return int((schema.metadata or {})[VERSION_KEY].decode())


def upgraded(table: pa.Table, name: str, version: int) -> pa.Table:
    """A table read from a file of ``version`` with the columns later versions added, filled with
    what they mean for those rows (``Column.fill``), so that every reader sees the current schema."""
    spec = TABLES[name]
    for position, column in enumerate(spec.columns):
        if column.since > version:
            table = table.add_column(position, pa.field(column.name, column.dtype, nullable=False),
                                     pa.array([column.fill] * table.num_rows, column.dtype))
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
        "step": pa.array(np.full(n_key.shape, PROMPT_STEP, dtype=np.int32), pa.int32()),
    }
    return pa.Table.from_pydict(columns, schema=arrow_schema("statistics"))


class GeneratedLayer(Protocol):
    """What the statistics table needs of one layer of one decoding step (a generated token's query)."""

    layer: int
    step: int
    mass: torch.Tensor  # (batch, head, 1, len(GENERATED_KEY_GROUPS))
    entropy: torch.Tensor  # (batch, head, 1)
    key_counts: torch.Tensor  # (batch, len(GENERATED_KEY_GROUPS))


def generated_statistics_table(
    records: Sequence[GeneratedLayer],
    sample_ids: Sequence[str],
    steps: Sequence[int],
    heads: str = "mean",
) -> pa.Table:
    """Long-format statistics of the generated tokens of one recorded batch: query group
    ``generated``, one ``step`` per token, key groups GENERATED_KEY_GROUPS (rows ordered sample,
    step, layer, head, key group). Row b keeps its first ``steps[b]`` steps (its answer tokens;
    a row that stopped earlier than the batch has no rows for the steps after it stopped)."""
    from analysis.stats import reduce_heads

    if len(sample_ids) != len(steps):
        raise SchemaError(f"expected one step count per sample ({len(sample_ids)}), found {len(steps)}")
    by_step: dict[int, dict[int, GeneratedLayer]] = {}
    for record in records:
        by_step.setdefault(record.step, {})[record.layer] = record
    parts = []
    for b, sample in enumerate(sample_ids):
        for step in range(int(steps[b])):
            if step not in by_step:
                raise SchemaError(f"expected recorded decoding step {step} for sample {sample!r}, found steps "
                                  f"{sorted(by_step)}")
            layers = [by_step[step][layer] for layer in sorted(by_step[step])]
            mass = np.stack([reduce_heads(r.mass[b : b + 1], heads)[0][0, :, 0].cpu().numpy() for r in layers])  # l h k
            entropy = np.stack([reduce_heads(r.entropy[b : b + 1], heads)[0][0, :, 0].cpu().numpy() for r in layers])
            n_key = np.stack([r.key_counts[b].cpu().numpy() for r in layers])  # l k
            head_labels = np.asarray(reduce_heads(layers[0].mass[b : b + 1], heads)[1], dtype=np.int32)
            l_index, h_index, k_index = np.indices(mass.shape).reshape(3, -1)
            keys = n_key[l_index, k_index]
            parts.append({
                "sample_id": np.full(l_index.shape, sample, dtype=object),
                "layer": np.array([r.layer for r in layers], dtype=np.int32)[l_index],
                "head": head_labels[h_index],
                "query_group": np.full(l_index.shape, GENERATED, dtype=object),
                "key_group": np.asarray(GENERATED_KEY_GROUPS, dtype=object)[k_index],
                "mass": mass.reshape(-1).astype(np.float32),
                "mass_per_key": (mass.reshape(-1) / np.where(keys > 0, keys, np.nan)).astype(np.float32),
                "entropy": entropy[l_index, h_index].astype(np.float32),
                "n_query": np.ones(l_index.shape, dtype=np.int32),
                "n_key": keys.astype(np.int32),
                "step": np.full(l_index.shape, step, dtype=np.int32),
            })
    schema = arrow_schema("statistics")
    if not parts:
        return schema.empty_table()
    columns = {f.name: pa.array(np.concatenate([part[f.name] for part in parts]), f.type) for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)


def _counts(layer_counts: torch.Tensor | None, prompt_counts: torch.Tensor) -> np.ndarray:
    return (prompt_counts if layer_counts is None else layer_counts).cpu().numpy()


def samples_table(
    layout: TokenLayout,
    sample_ids: Sequence[str],
    question_ids: Sequence[str],
    images: Sequence[Sequence[str]],
    questions: Sequence[str],
    generated: Sequence[str] | None = None,
) -> pa.Table:
    """The per-sample table of one batch; ``generated``: the answers recorded with ``--generate``."""
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
        "generated": pa.array(list(generated) if generated is not None else [""] * len(sample_ids), pa.string()),
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
