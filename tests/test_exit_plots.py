"""exit.plots: reading an evaluation folder, the frontier and the exit histogram (synthetic folder
with known values from tests/exit_results_data.py, and one folder written by a tiny model)."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from exit_results_data import (  # noqa: E402, F401 (fixture)
    CATEGORIES,
    METHODS,
    NUM_LAYERS,
    QUESTIONS,
    exit_layer,
    exit_results,
    synthetic_rows,
    write_results_folder,
)

from analysis.plots import PlotError  # noqa: E402
from exit.plots import (  # noqa: E402
    EvaluationFolderError,
    category_accuracy,
    make_exit_figures,
    method_name,
    pareto_front,
    plot_exit_histogram,
    plot_frontier,
    read_evaluation,
    results_markdown,
    results_table,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.mark.parametrize("method, family, label", [
    ("none", "none", "full model"),
    ("static:6", "static", "K=6"),
    ("vtw:13", "vtw", "K=13"),
    ("fastv:2:0.5", "fastv", "K=2 R=0.5"),
    ("dyvte", "dyvte", "gates' tau"),  # the gates' saved threshold, labelled as such
    ("dyvte:0.3", "dyvte", "tau=0.3"),
    ("dyvte+fastv:2:0.75", "dyvte+fastv", "gates+K=2 R=0.75"),  # not FastV's "K=2 R=0.75"
    ("mystery:a:b", "mystery", "a:b"),
])
def test_method_names_split_into_family_and_settings(method, family, label):
    name = method_name(method)
    assert (name.family, name.label) == (family, label)


def test_read_evaluation_returns_every_row_in_summary_order(exit_results):
    rows, summary = read_evaluation(exit_results)
    assert list(summary["method"]) == list(METHODS)
    assert list(dict.fromkeys(rows["method"])) == list(METHODS)
    assert len(rows) == len(METHODS) * QUESTIONS
    pd.testing.assert_frame_equal(rows[rows["method"] == "static:3"].reset_index(drop=True), synthetic_rows("static:3"))


def test_pareto_front_keeps_only_undominated_methods():
    summary = pd.DataFrame({
        "method": ["none", "a", "b", "c", "d"],
        "accuracy_overall": [0.8, 0.7, 0.6, 0.75, 0.5],
        "relative_prefill_flops": [1.0, 0.5, 0.6, 0.7, 0.3],
    })  # b is beaten by a (cheaper and better); the rest trade cost for accuracy
    assert list(pareto_front(summary)["method"]) == ["d", "a", "c", "none"]


def test_frontier_draws_one_line_per_family_with_every_point_labelled(exit_results):
    _, summary = read_evaluation(exit_results)
    figure = plot_frontier(summary)
    ax = figure.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    expected = {"full model": ["none"], "DyVTE": ["dyvte:0.2", "dyvte:0.5", "dyvte:0.8"],
                "DyVTE + FastV": ["dyvte+fastv:1:0.5"], "VTW": ["vtw:4"], "static exit": ["static:1", "static:3"],
                "FastV": ["fastv:1:0.5", "fastv:1:0.75"]}
    for label, methods in expected.items():
        points = summary.set_index("method").loc[methods].sort_values("relative_prefill_flops")
        assert list(lines[label].get_xdata()) == pytest.approx(list(points["relative_prefill_flops"]))
        assert list(lines[label].get_ydata()) == pytest.approx(list(points["accuracy_overall"]))
    assert lines["DyVTE"].get_linestyle() == "-" and lines["full model"].get_marker() == "*"
    front = lines["frontier (not dominated)"]
    assert len(front.get_xdata()) == len(pareto_front(summary)) >= 2
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["full model", "tau=0.2", "tau=0.5", "tau=0.8", "gates+K=1 R=0.5", "K=4", "K=1", "K=3",
                            "K=1 R=0.5", "K=1 R=0.75"])
    assert set(t.get_text() for t in ax.get_legend().get_texts()) == {*expected, "frontier (not dominated)"}
    assert "10 methods, 12 questions" in ax.get_title()
    # the synthetic dyvte: higher tau, later exits, more FLOPs and more accuracy
    dyvte = summary.set_index("method").loc[["dyvte:0.2", "dyvte:0.5", "dyvte:0.8"]]
    assert dyvte["relative_prefill_flops"].is_monotonic_increasing and dyvte["accuracy_overall"].is_monotonic_increasing


def test_exit_histogram_has_a_bar_per_layer_and_a_never_bar(exit_results):
    rows, _ = read_evaluation(exit_results)
    figure = plot_exit_histogram(rows, num_layers=NUM_LAYERS)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert len(panels) == len(METHODS)
    assert all(ax.get_title().startswith(f"{method}: ") for ax, method in zip(panels, METHODS))
    for ax, method in zip(panels, METHODS):
        heights = [patch.get_height() for patch in ax.patches]
        assert len(heights) == NUM_LAYERS + 1  # layers 0..7 and "never"
        layers = [exit_layer(method, i) for i in range(QUESTIONS)]
        expected = [layers.count(k) / QUESTIONS for k in range(NUM_LAYERS)] + [layers.count(-1) / QUESTIONS]
        assert heights == pytest.approx(expected), method
    assert [patch.get_height() for patch in panels[0].patches][-1] == 1.0  # the full model never exits
    assert [patch.get_height() for patch in panels[2].patches][3] == 1.0  # static:3
    assert panels[-1].get_xticklabels()[-1].get_text() == "never"
    assert "0% exited" in panels[0].get_title() and "100% exited" in panels[1].get_title()


def test_exit_histogram_guesses_the_layers_and_selects_methods(exit_results):
    rows, _ = read_evaluation(exit_results)
    guessed = plot_exit_histogram(rows[rows["method"].isin(["none", "static:1", "vtw:4"])])
    assert [len(ax.patches) for ax in guessed.axes if ax.get_visible()] == [5 + 1] * 3  # layers 0..4 and "never"
    selected = plot_exit_histogram(rows, methods=["vtw:4", "static:1"])
    panels = [ax for ax in selected.axes if ax.get_visible()]
    assert [ax.get_title().split(": ")[0] for ax in panels] == ["vtw:4", "static:1"]
    assert [len(ax.patches) for ax in panels] == [NUM_LAYERS + 1] * 2  # the highest exit of all methods: 7
    with pytest.raises(PlotError, match="expected methods among"):
        plot_exit_histogram(rows, methods=["static:9"])
    with pytest.raises(PlotError, match="below num_layers=4"):
        plot_exit_histogram(rows, num_layers=4)


def test_category_accuracy_is_a_method_by_category_table(exit_results):
    rows, summary = read_evaluation(exit_results)
    table = category_accuracy(summary)
    assert list(table.columns) == [*CATEGORIES, "overall"] and list(table.index) == list(METHODS)
    static = rows[rows["method"] == "static:3"]
    assert table.loc["static:3", "count"] == pytest.approx(static[static["category"] == "count"]["correct"].mean())
    assert table.loc["none", "overall"] == 0.75


def test_plots_name_missing_columns():
    with pytest.raises(PlotError, match="accuracy_overall"):
        plot_frontier(pd.DataFrame({"method": ["none"], "questions": [1], "relative_prefill_flops": [1.0]}))
    with pytest.raises(PlotError, match="at least one row"):
        plot_exit_histogram(pd.DataFrame({"method": [], "exit_layer": []}))


def test_missing_and_corrupt_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected an evaluation folder .* found nothing .*dyvte-exit eval"):
        read_evaluation(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="expected summary.parquet and eval-.* found an empty folder"):
        read_evaluation(tmp_path)
    folder = write_results_folder(tmp_path / "run", methods=["none", "static:1"])
    (folder / "eval-static_1.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(EvaluationFolderError, match="eval-static_1.parquet: expected a parquet file"):
        read_evaluation(folder)
    synthetic_rows("static:1").drop(columns="exit_layer").to_parquet(folder / "eval-static_1.parquet")
    with pytest.raises(EvaluationFolderError, match="found no \\['exit_layer'\\]"):
        read_evaluation(folder)
    (folder / "eval-static_1.parquet").unlink()
    with pytest.raises(EvaluationFolderError, match="without rows \\['static:1'\\]"):
        read_evaluation(folder)


def test_files_of_another_table_or_without_metadata_are_named(tmp_path):
    import pyarrow.parquet as pq

    folder = write_results_folder(tmp_path / "run", methods=["none", "static:1"])
    synthetic_rows("static:1").to_parquet(folder / "eval-static_1.parquet")  # right columns, no metadata
    with pytest.raises(EvaluationFolderError, match="eval-static_1.parquet: expected DyVTE exit evaluation rows "
                                                    "\\(parquet metadata keys dyvte.table and dyvte.schema_version\\)"):
        read_evaluation(folder)
    write_results_folder(folder, methods=["none", "static:1"])
    summary = pq.read_table(folder / "summary.parquet")
    pq.write_table(summary, folder / "eval-static_1.parquet")
    with pytest.raises(EvaluationFolderError, match="expected the columns"):
        read_evaluation(folder)  # a summary where rows belong lacks the rows' columns
    rows = pq.read_table(folder / "eval-none.parquet")
    metadata = {**rows.schema.metadata, b"dyvte.schema_version": b"99"}
    pq.write_table(rows.replace_schema_metadata(metadata), folder / "eval-none.parquet")
    with pytest.raises(EvaluationFolderError, match="eval-none.parquet: expected schema version 1, found version 99"):
        read_evaluation(folder)


def test_every_method_kind_has_a_style_named_by_the_method_table():
    from exit.methods import METHODS
    from exit.plots import FAMILY_STYLES

    assert set(FAMILY_STYLES) == set(METHODS)
    assert all(FAMILY_STYLES[kind].label == METHODS[kind].title for kind in METHODS)


def test_make_exit_figures_writes_both_pngs_and_the_table(exit_results, tmp_path):
    files = make_exit_figures(exit_results, tmp_path / "figures")
    assert [f.name for f in files] == ["frontier.png", "exit_histogram.png", "exit_results.md"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 10_000 for f in files[:2])
    _, summary = read_evaluation(exit_results)
    assert files[2].read_text() == results_markdown(summary)


def test_results_table_compares_every_method_with_the_stock_model():
    summary = pd.DataFrame({
        "method": ["none", "static:3", "dyvte:0.9"], "questions": [10, 10, 10],
        "accuracy_overall": [0.7, 0.6, 0.75], "mean_exit_layer": [7.0, 3.0, 5.5], "exited_share": [0.0, 1.0, 0.5],
        "relative_prefill_flops": [1.0, 0.5, 0.8], "prefill_seconds": [5.0, 2.5, 4.0],
        "decode_tokens_per_second": [30.0, 33.0, 31.0],
    })
    table = results_table(summary)
    assert table["vs none"].tolist() == pytest.approx([0.0, -10.0, 5.0])
    assert table["prefill s/question"].tolist() == pytest.approx([0.5, 0.25, 0.4])
    lines = results_markdown(summary).splitlines()
    assert lines[0] == ("| method | questions | accuracy | vs none | mean exit layer | rows exited | prefill FLOPs "
                        "| prefill s/question | decode tokens/s |")
    assert lines[3] == "| static:3 | 10 | 60.0 % | -10.0 | 3.0 | 100 % | 0.50 | 0.25 | 33.0 |"
    without_reference = results_table(summary.iloc[1:])
    assert "vs none" not in without_reference.columns and len(without_reference) == 2


def test_figures_of_a_folder_written_by_evaluate_methods(tmp_path):
    """The reader and the figures take what exit.evaluate really writes (tiny random LLaVA)."""
    from analysis.data import read_questions
    from analysis.demo.shapes import write_split
    from analysis.testing.tiny import TinyLlavaSpec, tiny_llava, tiny_processor
    from exit.evaluate import evaluate_methods, parse_method

    spec = TinyLlavaSpec(num_kv_heads=2)
    split = write_split(tmp_path / "shapes", "val", 2, seed=5, image_size=84)
    questions = read_questions(split / "questions.jsonl")
    methods = [parse_method(m, spec.num_layers) for m in ("none", "static:1", "fastv:1:0.5")]
    evaluate_methods(tiny_llava(spec), tiny_processor(spec.image_size), questions, split, methods, tmp_path / "eval")
    rows, summary = read_evaluation(tmp_path / "eval")
    assert list(summary["method"]) == ["none", "static:1", "fastv:1:0.5"] and len(rows) == 3 * len(questions)
    histogram = plot_exit_histogram(rows, num_layers=spec.num_layers)
    assert [ax.patches[1].get_height() for ax in histogram.axes] == [0.0, 1.0, 0.0]  # static:1 exits after layer 1
    assert len(plot_frontier(summary).axes[0].texts) == 3
    assert [f.name for f in make_exit_figures(tmp_path / "eval", tmp_path / "figures")] == [
        "frontier.png", "exit_histogram.png", "exit_results.md"]


def test_frontier_labels_do_not_overlap_and_tell_the_methods_apart(tmp_path):
    from exit.plots import plot_frontier, read_evaluation
    from tests.exit_results_data import METHODS, write_results_folder

    _, summary = read_evaluation(write_results_folder(tmp_path / "eval", METHODS))
    figure = plot_frontier(summary)
    axes = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    notes = [t for t in axes.texts if t.get_text()]
    texts = [t.get_text() for t in notes]
    assert len(notes) == len(summary)  # every point labelled once
    assert "gates+K=1 R=0.5" in texts and "K=1 R=0.5" in texts  # DyVTE + FastV is not FastV
    boxes = [t.get_window_extent(renderer) for t in notes]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), f"labels {texts[i]!r} and {texts[j]!r} overlap"
