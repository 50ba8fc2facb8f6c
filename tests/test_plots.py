"""Every figure kind as PNG and SVG, the `plot` and `figures` commands, and figures of a tiny-model dump."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import pyplot as plt
from stage_data import step_curve, synthetic_statistics, tiny_dump, write_statistics  # noqa: F401 (fixture)

from analysis.cli import build_parser, main
from analysis.plots import PLOTS, PlotError, make_figures, plot_boundaries, plot_stages, save_plot
from analysis.stages import STAGE_LABELS, detect_dataset_stages

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def statistics():
    rng = np.random.default_rng(0)
    bounds = [(3, 12), (4, 13), (4, 12), (5, 14), (4, 13)]
    curves = [step_curve((0.6, 0.08, 0.2), b, 18) + rng.normal(0, 0.01, 18) for b in bounds]
    return synthetic_statistics(np.array(curves), heads=2, answer_steps=2)


@pytest.fixture(scope="module")
def stages(statistics):
    return detect_dataset_stages(statistics)


@pytest.mark.parametrize("suffix", [".png", ".svg"])
@pytest.mark.parametrize("kind", sorted(PLOTS))
def test_every_kind_writes_a_non_empty_image(statistics, stages, kind, suffix, tmp_path):
    out = save_plot(statistics, kind, tmp_path / "sub" / f"{kind}{suffix}", stages)
    data = out.read_bytes()
    assert len(data) > 5000
    if suffix == ".png":
        assert data.startswith(PNG_MAGIC)
    else:
        assert b"<svg" in data[:1000]
    assert plt.get_fignums() == []  # the figure is closed after writing


def test_stage_plot_shades_and_labels_the_detected_stages(statistics, stages):
    figure = plot_stages(statistics, stages)
    ax = figure.axes[0]
    texts = [t.get_text().replace("\n", " ") for t in ax.texts]
    assert texts == [STAGE_LABELS[s] for s in ("early_fusion", "intra_modality", "multimodal_reasoning")]
    spans = sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches if p.get_width() > 1)
    assert spans == [(-0.5, 3.5), (3.5, 12.5), (12.5, 17.5)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["text->image", "text->text", "text->system", "last->image", "image->image"]
    plt.close(figure)


def test_plots_of_a_curve_without_stages_say_so():
    flat = synthetic_statistics(np.full((3, 8), 0.2))
    figure = plot_boundaries(flat)
    ax = figure.axes[0]
    assert any("no stage boundary in any of the 3 samples" in t.get_text() for t in ax.texts)
    assert "absent: early fusion (flat), intra-modality modelling (flat), multimodal reasoning (flat)" in ax.get_title()
    plt.close(figure)


def test_heads_heatmap_needs_per_head_rows(statistics, tmp_path):
    mean_only = statistics[statistics["head"] == -1]
    with pytest.raises(PlotError, match=r"expected per-head rows \(head >= 0\) of text->image .*--heads all\), found heads \[-1\]"):
        save_plot(mean_only, "heads", tmp_path / "h.png")
    assert not (tmp_path / "h.png").exists()


def test_bad_kind_and_file_type(statistics, tmp_path):
    with pytest.raises(PlotError, match=r"expected an output file ending in .png or .svg, found 'x.pdf'"):
        save_plot(statistics, "stages", tmp_path / "x.pdf")
    with pytest.raises(PlotError, match="expected a plot kind in"):
        save_plot(statistics, "violin", tmp_path / "x.png")


def test_cli_kinds_are_the_plot_functions():
    plot = next(a for a in build_parser()._subparsers._group_actions[0].choices["plot"]._actions if a.dest == "kind")
    assert sorted(plot.choices) == sorted(PLOTS)


def test_cli_plot_end_to_end(statistics, tmp_path, capsys):
    stats = write_statistics(statistics, tmp_path / "stats")
    out = tmp_path / "stages.svg"
    assert main(["plot", str(stats), "--kind", "stages", "--out", str(out)]) == 0
    assert out.stat().st_size > 5000 and f"wrote {out}" in capsys.readouterr().out
    assert main(["plot", str(stats), "--kind", "entropy", "--out", str(tmp_path / "e.jpg")]) == 2
    assert "dyvte-stats plot: error: expected an output file ending in .png or .svg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plot", str(stats), "--kind", "violin", "--out", str(out)])


def test_figures_command_on_a_tiny_model_dump(tiny_dump, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main(["figures", str(tiny_dump), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["boundaries.png", "entropy.png", "heads.png", "stages.png", "stages.txt"]
    assert all((out / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    assert "stages of 3 samples, 6 layers" in (out / "stages.txt").read_text()
    assert printed.count("wrote ") == 5 and printed.count("skipped") == 1 and "skipped answer" in printed
    assert "dump --generate" in printed  # the one figure a dump without answer tokens cannot give, and why


def test_figures_skip_heads_without_per_head_rows(statistics, tmp_path):
    stats = write_statistics(statistics[statistics["head"] == -1], tmp_path / "stats")
    result = make_figures(stats, tmp_path / "figures")
    assert sorted(p.name for p in result.files) == ["answer.png", "boundaries.png", "entropy.png", "stages.png", "stages.txt"]
    assert list(result.skipped) == ["heads"] and "--heads all" in result.skipped["heads"]


def test_answer_curves_are_the_generated_tokens_masses(statistics):
    from stage_data import generated_masses

    from analysis.stages import answer_curves, prompt_rows, sample_curves

    curves = answer_curves(statistics)
    assert list(curves.index.names) == ["sample_id", "step", "layer"] and len(curves) == 5 * 2 * 18
    text_image = sample_curves(statistics)["text->image"]
    for (sample, _step, layer), row in curves.iloc[::7].iterrows():
        expected = generated_masses(text_image.loc[(sample, layer)])
        assert row["generated->image"] == pytest.approx(expected["image"], abs=1e-6)
        assert row["generated->generated"] == pytest.approx(expected["generated"], abs=1e-6)
    # the stages are the prompt's: the generated rows change nothing
    assert sample_curves(statistics).equals(sample_curves(prompt_rows(statistics)))


def test_figures_without_a_dump_say_run_make_demo(tmp_path, capsys):
    assert main(["figures", str(tmp_path / "runs" / "demo"), "--out", str(tmp_path / "figures")]) == 2
    error = capsys.readouterr().err
    assert "expected attention statistics (a dump folder) at" in error and "run `make demo` first" in error
    assert not (tmp_path / "figures").exists()


def test_heads_heatmap_names_every_present_stage_early_fusion_included(statistics, stages):
    from analysis.plots import plot_heads

    figure = plot_heads(statistics, stages)
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert texts == [STAGE_LABELS[s] for s in ("early_fusion", "intra_modality", "multimodal_reasoning")]
    plt.close(figure)


def test_layer_axes_have_whole_layer_ticks_on_a_short_model():
    short = synthetic_statistics(np.array([step_curve((0.6, 0.1, 0.3), (1, 2), 4)] * 3))
    for plot in (plot_stages, plot_boundaries):
        figure = plot(short)
        ticks = figure.axes[0].get_xticks()
        shown = [t for t in ticks if -0.5 <= t <= 3.5]
        assert shown and all(float(t).is_integer() for t in shown), (plot.__name__, list(ticks))
        plt.close(figure)
