"""Schema validation on write and read; streaming shards; corrupt and foreign files."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from analysis import record_attention, resolve_adapter, token_layout
from analysis.io import StatisticsWriter, read_provenance, read_samples, read_statistics, validate_path
from analysis.schema import STATISTICS_COLUMNS, SchemaError, arrow_schema, samples_table
from tests.conftest import BATCH_CASES, make_batch


@pytest.fixture(scope="module")
def recorded(processor, tiny_models):
    model = tiny_models("gqa")
    inputs = make_batch(processor, BATCH_CASES["batch2_left_padding"])
    layout = token_layout(inputs["input_ids"], inputs["attention_mask"], resolve_adapter(model).image_token_id(model))
    with torch.no_grad(), record_attention(model, layout) as recording:
        model(**inputs)
    return recording, layout


def write_batches(out, recording, layout, batches, batches_per_shard=2, heads="mean"):
    with StatisticsWriter(out, {"model": "tiny"}, batches_per_shard=batches_per_shard) as writer:
        for b in range(batches):
            ids = [f"{b}-a", f"{b}-b"]
            writer.write(recording.to_table(ids, heads), samples_table(layout, ids, ids, [["x.png"], ["y.png"]], ["q1", "q2"]))
    return writer


def test_long_format_columns_and_rows(recorded):
    recording, layout = recorded
    table = recording.to_table(["a", "b"], heads="all")
    assert [f.name for f in table.schema] == [c.name for c in STATISTICS_COLUMNS]
    assert table.num_rows == 2 * 4 * 4 * 4 * 3  # samples x layers x heads x query groups x key groups
    frame = table.to_pandas()
    assert set(frame["head"]) == {0, 1, 2, 3}
    assert set(frame["query_group"]) == {"system", "image", "text", "last"}
    assert set(frame["key_group"]) == {"system", "image", "text"}
    row = frame[(frame.sample_id == "b") & (frame.layer == 2) & (frame["head"] == 3) & (frame.query_group == "last") & (frame.key_group == "image")]
    assert row["mass"].item() == pytest.approx(recording.records[2].mass[1, 3, 3, 1].item())
    assert row["n_key"].item() == layout.key_counts()[1, 1].item()
    assert row["mass_per_key"].item() == pytest.approx(row["mass"].item() / row["n_key"].item(), rel=1e-6)


def test_mean_rows_are_the_mean_over_heads(recorded):
    recording, _ = recorded
    per_head = recording.to_frame(["a", "b"], heads="all")
    mean = recording.to_frame(["a", "b"], heads="mean")
    assert set(mean["head"]) == {-1}
    expected = per_head.groupby(["sample_id", "layer", "query_group", "key_group"])["mass"].mean()
    found = mean.set_index(["sample_id", "layer", "query_group", "key_group"])["mass"]
    pd.testing.assert_series_equal(found.sort_index(), expected.sort_index(), check_names=False, rtol=1e-6)


def test_streamed_shards_read_back_as_one_validated_table(tmp_path, recorded):
    recording, layout = recorded
    writer = write_batches(tmp_path, recording, layout, batches=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{t}-{i:05d}.parquet" for t in ("samples", "statistics") for i in range(3)
    ]
    assert pq.ParquetFile(tmp_path / "statistics-00000.parquet").num_row_groups == 2  # one row group per batch
    stats = read_statistics(tmp_path)
    assert len(stats) == writer.rows_written == 5 * 2 * 4 * 1 * 4 * 3
    assert stats["mass"].dtype == "float32" and stats["layer"].dtype == "int32"
    assert len(read_samples(tmp_path)) == 10
    assert read_provenance(tmp_path / "statistics-00001.parquet") == {"model": "tiny"}
    assert all("statistics" in line or "samples" in line for line in validate_path(tmp_path))


def test_interrupted_writer_keeps_finished_shards_and_leaves_no_partial_file(tmp_path, recorded):
    recording, layout = recorded
    with pytest.raises(RuntimeError, match="killed"):
        with StatisticsWriter(tmp_path, {}, batches_per_shard=2) as writer:
            for b in range(3):
                ids = [f"{b}-a", f"{b}-b"]
                writer.write(recording.to_table(ids), samples_table(layout, ids, ids, [["x"], ["y"]], ["", ""]))
            raise RuntimeError("killed")
    assert not list(tmp_path.glob(".*"))
    assert read_statistics(tmp_path)["sample_id"].nunique() == 6


@pytest.mark.parametrize("number", ["SIGINT", "SIGTERM"])
def test_a_stop_between_a_batchs_statistics_and_samples_waits_for_both(tmp_path, recorded, monkeypatch, number):
    # the stop lands right after the statistics row group is written: committed alone, the batch's
    # rows would be in the statistics shard without its samples, and --resume would write them twice
    import signal

    from analysis.io import ParquetShard, finished_samples
    from analysis.options import _sigterm_as_keyboard_interrupt

    recording, layout = recorded
    write = ParquetShard.write

    def stop_after_statistics(self, table, row_group_size=None):
        write(self, table, row_group_size)
        if "statistics" in self.path.name:
            signal.raise_signal(getattr(signal, number))

    monkeypatch.setattr(ParquetShard, "write", stop_after_statistics)
    with _sigterm_as_keyboard_interrupt(), pytest.raises(KeyboardInterrupt):
        with StatisticsWriter(tmp_path, {}, batches_per_shard=1000) as writer:
            for b in range(3):
                ids = [f"{b}-a", f"{b}-b"]
                writer.write(recording.to_table(ids), samples_table(layout, ids, ids, [["x"], ["y"]], ["", ""]))
    assert finished_samples(tmp_path) == {"0-a", "0-b"}  # the stop came in the first batch, after all of it
    assert set(read_statistics(tmp_path)["sample_id"]) == {"0-a", "0-b"}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back


def test_writer_rejects_a_table_of_another_schema(tmp_path, recorded):
    recording, layout = recorded
    bad = recording.to_table(["a", "b"]).drop_columns(["entropy"])
    with pytest.raises(SchemaError, match="expected DyVTE statistics|expected statistics columns"):
        with StatisticsWriter(tmp_path, {}) as writer:
            writer.write(bad, samples_table(layout, ["a", "b"], ["a", "b"], [["x"], ["y"]], ["", ""]))


def test_corrupt_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "statistics-00000.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SchemaError, match=r"statistics-00000.parquet: expected a readable parquet file"):
        read_statistics(tmp_path)
    with pytest.raises(SchemaError, match="corrupt"):
        validate_path(path)


def test_truncated_file_is_an_error(tmp_path, recorded):
    recording, layout = recorded
    write_batches(tmp_path, recording, layout, batches=1)
    path = tmp_path / "statistics-00000.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SchemaError, match="statistics-00000.parquet"):
        read_statistics(tmp_path)


def test_foreign_parquet_and_other_schema_version_are_rejected(tmp_path, recorded):
    foreign = tmp_path / "statistics-00000.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(SchemaError, match="expected DyVTE statistics.*found metadata keys"):
        read_statistics(foreign)
    recording, _ = recorded
    table = recording.to_table(["a", "b"])
    metadata = dict(table.schema.metadata)
    metadata[b"dyvte.schema_version"] = b"99"
    old = tmp_path / "old.parquet"
    pq.write_table(table.replace_schema_metadata(metadata), old)
    with pytest.raises(SchemaError, match="expected schema version 2 .or an earlier one: 1., found version 99"):
        read_statistics(old)


def test_version_1_files_are_read_as_prompt_rows_of_version_2(tmp_path, recorded):
    """A dump written before decoding statistics existed (schema version 1: no step, no generated)
    reads back as the current schema, its rows the prompt's."""
    from analysis.vocabulary import PROMPT_STEP

    recording, layout = recorded
    write_batches(tmp_path / "new", recording, layout, batches=1)
    for table, dropped in (("statistics", "step"), ("samples", "generated")):
        current = pq.read_table(tmp_path / "new" / f"{table}-00000.parquet")
        old = current.drop_columns([dropped])
        metadata = {**old.schema.metadata, b"dyvte.schema_version": b"1"}
        (tmp_path / "old").mkdir(exist_ok=True)
        pq.write_table(old.replace_schema_metadata(metadata), tmp_path / "old" / f"{table}-00000.parquet")
    statistics, samples = read_statistics(tmp_path / "old"), read_samples(tmp_path / "old")
    assert (statistics["step"] == PROMPT_STEP).all() and (samples["generated"] == "").all()
    pd.testing.assert_frame_equal(statistics, read_statistics(tmp_path / "new"))
    pd.testing.assert_frame_equal(samples, read_samples(tmp_path / "new"))
    assert validate_path(tmp_path / "old")  # an older version is valid, not an error


def test_reading_samples_where_statistics_are_expected_is_an_error(tmp_path, recorded):
    recording, layout = recorded
    write_batches(tmp_path, recording, layout, batches=1)
    with pytest.raises(SchemaError, match="expected a statistics table, found a samples table"):
        read_statistics(tmp_path / "samples-00000.parquet")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="statistics-\\*.parquet shards"):
        read_statistics(tmp_path)
    assert arrow_schema("samples").metadata[b"dyvte.table"] == b"samples"
