"""Stage detection on synthetic curves with known boundaries, degenerate curves, data sets and the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from stage_data import step_curve, synthetic_statistics, write_statistics

from analysis.cli import main
from analysis.stages import (
    DATASET,
    STAGES,
    StageError,
    StageSettings,
    detect_dataset_stages,
    detect_stages,
    fit_quality,
    read_stages,
    sample_curves,
    smooth,
)

PAPER_LEVELS = (0.6, 0.08, 0.2)  # early fusion high, intra-modality low, reasoning up again
DEMO_CURVE = [0.60, 0.12, 0.05, 0.94, 0.88, 0.81, 0.74, 0.83, 0.75, 0.69, 0.54, 0.06, 0.06, 0.04, 0.05, 0.11, 0.04,
              0.05, 0.04, 0.05, 0.03, 0.05, 0.04, 0.06, 0.04, 0.05, 0.04, 0.05, 0.06, 0.05]  # measured, then extended


def spans(result) -> list[tuple[int, int] | None]:
    return [(s.first_layer, s.last_layer) if s.present else None for s in result.stages]


@pytest.mark.parametrize(("b1", "b2", "n_layers"), [(4, 18, 32), (1, 5, 12), (2, 4, 6), (10, 29, 30), (3, 8, 40)])
def test_clean_three_stage_curves_give_their_boundaries_exactly(b1, b2, n_layers):
    result = detect_stages(step_curve(PAPER_LEVELS, [b1, b2], n_layers))
    assert spans(result) == [(0, b1 - 1), (b1, b2 - 1), (b2, n_layers - 1)]
    assert result.boundaries == {"intra_modality": b1, "multimodal_reasoning": b2}
    assert result.quality == pytest.approx(1.0)
    assert [s.reason for s in result.stages] == ["", "", ""]


def test_a_one_layer_stage_needs_smoothing_off():
    curve = step_curve(PAPER_LEVELS, [2, 3], 6)
    assert spans(detect_stages(curve)) == [(0, 1), (2, 5), None]  # the median takes layer 2 for a spike
    assert spans(detect_stages(curve, StageSettings(smoothing=1))) == [(0, 1), (2, 2), (3, 5)]


def test_boundaries_within_one_layer_under_noise():
    rng = np.random.default_rng(7)
    for _ in range(60):
        b1 = int(rng.integers(1, 10))
        b2 = int(rng.integers(b1 + 3, 29))
        curve = step_curve(PAPER_LEVELS, [b1, b2], 32) + rng.normal(0, 0.02, 32)
        result = detect_stages(curve)
        found = result.boundaries
        assert found["intra_modality"] is not None and abs(found["intra_modality"] - b1) <= 1, (b1, b2, found)
        assert found["multimodal_reasoning"] is not None and abs(found["multimodal_reasoning"] - b2) <= 1, (b1, b2, found)
        assert result.quality > 0.8


def test_pure_noise_never_gets_stages():
    rng = np.random.default_rng(3)
    for _ in range(40):
        result = detect_stages(0.1 + rng.normal(0, 0.02, 32))
        assert not any(s.present for s in result.stages)
        assert {s.reason_code for s in result.stages} <= {"flat", "no_stages", "no_low_stage"}


def test_one_layer_spike_does_not_make_a_stage():
    curve = step_curve((0.6, 0.05), [3], 24)
    curve[12] = 0.5
    result = detect_stages(curve)
    assert spans(result) == [(0, 2), (3, 23), None]
    assert result.stage("multimodal_reasoning").reason_code == "no_rise"


def test_demo_model_curve_falls_and_stays_low():
    """The demo model after projector alignment: high through layer 10 (with a dip at 1-2), then low."""
    result = detect_stages(np.array(DEMO_CURVE))
    assert spans(result) == [(0, 10), (11, 29), None]
    reasoning = result.stage("multimodal_reasoning")
    assert reasoning.reason.startswith("no_rise: text->image does not rise again")
    assert result.quality > StageSettings().min_quality


def test_falling_curve_without_rise_has_no_reasoning_stage():
    layers = np.arange(20)
    curve = 0.05 + 0.55 / (1 + np.exp(2.0 * (layers - 5.5)))  # monotone decreasing, sharp drop at 5-6
    result = detect_stages(curve)
    assert spans(result) == [(0, 5), (6, 19), None]
    assert result.stage("multimodal_reasoning").reason_code == "no_rise"


def test_rising_curve_has_no_early_fusion():
    result = detect_stages(step_curve((0.05, 0.4), [8], 20))
    assert spans(result) == [None, (0, 7), (8, 19)]
    assert result.stage("early_fusion").reason.startswith("no_drop:")
    assert result.boundaries == {"intra_modality": None, "multimodal_reasoning": 8}


def test_linear_ramp_is_not_split_into_made_up_stages():
    result = detect_stages(np.linspace(0.7, 0.05, 24))
    assert not any(s.present for s in result.stages)
    assert all(s.reason_code == "no_stages" for s in result.stages)
    assert result.quality < StageSettings().min_quality
    assert all(s.first_layer is None and s.last_layer is None for s in result.stages)


@pytest.mark.parametrize("curve", [np.full(16, 0.3), 0.3 + np.random.default_rng(0).normal(0, 0.005, 16)])
def test_flat_curve_has_no_stages(curve):
    result = detect_stages(curve)
    assert [s.reason_code for s in result.stages] == ["flat"] * 3
    assert result.quality == 0.0


@pytest.mark.parametrize("n_layers", [0, 1, 2])
def test_too_short_curves(n_layers):
    result = detect_stages(np.linspace(0.6, 0.1, n_layers))
    assert [s.reason_code for s in result.stages] == ["too_short"] * 3
    assert f"{n_layers} layer(s)" in result.stages[0].reason


def test_nan_names_the_layers():
    curve = step_curve(PAPER_LEVELS, [3, 10], 16)
    curve[[4, 7]] = np.nan
    result = detect_stages(curve)
    assert [s.present for s in result.stages] == [False] * 3
    assert result.stages[1].reason == "nan: text->image is NaN at layer(s) [4, 7]"
    assert all(s.reason_code == "nan" for s in detect_stages(np.full(8, np.nan)).stages)


def test_layer_numbers_come_from_the_index_and_profiles_from_every_curve():
    layers = np.arange(10, 30)
    text_image = step_curve(PAPER_LEVELS, [4, 12], 20)
    curves = pd.DataFrame({"text->image": text_image, "text->text": 1 - text_image}, index=layers)
    result = detect_stages(curves)
    assert spans(result) == [(10, 13), (14, 21), (22, 29)]
    intra = result.stage("intra_modality")
    assert intra.profile["text->text"] == pytest.approx(0.92)
    assert intra.profile["text->text"] > intra.profile["text->image"]
    assert intra.level == pytest.approx(0.08)


def test_another_boundary_curve_and_its_absence():
    curves = {"last->image": step_curve(PAPER_LEVELS, [2, 9], 14), "text->image": np.full(14, 0.1)}
    result = detect_stages(curves, StageSettings(boundary_curve="last->image"))
    assert spans(result) == [(0, 1), (2, 8), (9, 13)]
    with pytest.raises(StageError, match=r"expected a 'entropy:text' curve \(the boundary curve\), found curves \['last->image', 'text->image'\]"):
        detect_stages(curves, StageSettings(boundary_curve="entropy:text"))


def test_min_stage_layers_drops_a_one_layer_stage():
    curve = step_curve(PAPER_LEVELS, [3, 15], 16)
    assert spans(detect_stages(curve)) == [(0, 2), (3, 14), (15, 15)]
    assert spans(detect_stages(curve, StageSettings(min_stage_layers=2))) == [(0, 2), (3, 15), None]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"smoothing": 2}, "expected smoothing to be an odd number of layers >= 1, found 2"),
        ({"min_contrast": 0}, "expected min_contrast > 0, found 0"),
        ({"min_quality": 1.5}, r"expected min_quality in \[0, 1\], found 1.5"),
        ({"boundary_curve": "text"}, "expected boundary_curve like 'text->image' or 'entropy:text', found 'text'"),
    ],
)
def test_settings_are_checked(kwargs, message):
    with pytest.raises(StageError, match=message):
        StageSettings(**kwargs)


def test_smoothing_and_quality_building_blocks():
    step = step_curve((1.0, 0.0), [5], 10)
    assert np.array_equal(smooth(step, 3), step)  # a median keeps a step where it is
    assert smooth(np.array([0.0, 0.0, 1.0, 0.0, 0.0]), 3).tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert fit_quality(step, 0, 5) == pytest.approx(1.0)
    assert fit_quality(np.arange(10.0), 3, 7) == 0.0


def test_sample_curves_average_the_heads_when_there_is_no_mean_row():
    statistics = synthetic_statistics(np.array([step_curve(PAPER_LEVELS, [3, 9], 12)]), heads=3)
    per_head = statistics[statistics["head"] >= 0]
    with_mean = sample_curves(statistics)
    without_mean = sample_curves(per_head)
    assert list(with_mean.index.names) == ["sample_id", "layer"]
    np.testing.assert_allclose(without_mean["text->image"], with_mean["text->image"], atol=1e-9)
    assert {"text->image", "last->image", "text->text", "image->image", "entropy:text"} <= set(with_mean.columns)
    with pytest.raises(StageError, match="expected statistics rows, found an empty table"):
        sample_curves(statistics.iloc[:0])


def dataset_curves(rng: np.random.Generator) -> tuple[np.ndarray, list[int], list[int]]:
    """Ten samples: nine with stages (boundaries vary per sample), one flat."""
    firsts, seconds, curves = [3, 4, 5, 4, 3, 4, 5, 4, 6], [14, 15, 16, 15, 17, 15, 14, 16, 15], []
    for b1, b2 in zip(firsts, seconds):
        curves.append(step_curve(PAPER_LEVELS, [b1, b2], 24) + rng.normal(0, 0.01, 24))
    curves.append(np.full(24, 0.1))
    return np.array(curves), firsts, seconds


def test_dataset_boundary_distribution_and_consensus():
    curves, firsts, seconds = dataset_curves(np.random.default_rng(0))
    result = detect_dataset_stages(synthetic_statistics(curves))
    assert len(result.per_sample) == 3 * 10 and result.n_layers == 24
    assert sorted(result.boundaries.query("boundary == 'intra_modality'")["layer"]) == sorted(firsts)
    assert sorted(result.boundaries.query("boundary == 'multimodal_reasoning'")["layer"]) == sorted(seconds)
    consensus = result.consensus.set_index("stage")
    assert consensus.loc["early_fusion", ["first_layer", "last_layer"]].tolist() == [0, int(np.median(firsts)) - 1]
    assert consensus.loc["intra_modality", ["first_layer", "last_layer"]].tolist() == [4, 14]
    assert consensus.loc["multimodal_reasoning", ["first_layer", "last_layer"]].tolist() == [15, 23]
    assert consensus["present_fraction"].tolist() == [0.9, 0.9, 0.9]
    assert (consensus["sample_id"] == DATASET).all() and (consensus["scope"] == "dataset").all()
    flat = result.per_sample[result.per_sample["sample_id"] == "s09"]
    assert flat["reason"].str.startswith("flat:").all()
    summary = result.boundary_summary().set_index("boundary")
    assert summary.loc["first layer of intra-modality modelling", "samples"] == "9/10"
    assert summary.loc["first layer of multimodal reasoning", "median"] == 15
    assert result.sample_table().loc["s09", "early fusion"] == "absent (flat)"


def test_consensus_leaves_out_a_stage_most_samples_lack():
    rng = np.random.default_rng(1)
    curves = [step_curve(PAPER_LEVELS, [4, 12], 20) + rng.normal(0, 0.01, 20) for _ in range(3)]
    curves += [step_curve(PAPER_LEVELS[:2], [4], 20) + rng.normal(0, 0.01, 20) for _ in range(7)]
    result = detect_dataset_stages(synthetic_statistics(np.array(curves)))
    consensus = result.consensus.set_index("stage")
    assert not consensus.loc["multimodal_reasoning", "present"]
    reason = consensus.loc["multimodal_reasoning", "reason"]
    assert reason == "no_rise: present in 3 of 10 samples (< min_present_fraction 50%); absent as no_rise in 7"
    assert consensus.loc["intra_modality", ["first_layer", "last_layer"]].tolist() == [4, 19]
    assert consensus.loc["multimodal_reasoning", "present_fraction"] == pytest.approx(0.3)


def test_cli_stages_writes_per_sample_and_consensus(tmp_path, capsys):
    curves, _, _ = dataset_curves(np.random.default_rng(2))
    stats = write_statistics(synthetic_statistics(curves), tmp_path / "stats")
    out = tmp_path / "out" / "stages.parquet"
    assert main(["stages", str(stats), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "intra-modality modelling  layers 4-14, present in 90% of samples" in printed
    assert "first layer of multimodal reasoning" in printed and f"to {out}" in printed
    table, metadata = read_stages(out)
    assert len(table) == 33 and set(table["scope"]) == {"sample", "dataset"}
    assert table.loc[table["scope"] == "dataset", "stage"].tolist() == list(STAGES)
    assert metadata["settings"]["smoothing"] == 3 and metadata["source"] == str(stats)
    assert main(["stages", str(stats), "--out", str(out), "--min-contrast", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "multimodal reasoning      absent (" in printed and "present in 0 of 10 samples" in printed


def test_cli_stages_errors_are_one_line(tmp_path, capsys):
    assert main(["stages", str(tmp_path / "missing"), "--out", str(tmp_path / "s.parquet")]) == 2
    assert "expected a parquet file or a folder of statistics shards" in capsys.readouterr().err
    stats = write_statistics(synthetic_statistics(np.full((1, 6), 0.2)), tmp_path / "stats")
    assert main(["stages", str(stats), "--out", str(tmp_path / "s.parquet"), "--smoothing", "4"]) == 2
    assert "dyvte-stats stages: error: expected smoothing to be an odd number" in capsys.readouterr().err
    assert main(["stages", str(stats), "--out", str(tmp_path / "s.parquet"), "--curve", "system->video"]) == 2
    assert "expected a 'system->video' curve (the boundary curve)" in capsys.readouterr().err


def test_read_stages_rejects_other_parquet(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(StageError, match="expected a stage table"):
        read_stages(tmp_path / "other.parquet")
