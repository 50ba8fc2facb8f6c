"""exit.frontier: exit-layer rules, lookups in the exit table, label rules, bootstrap intervals and
the frontier folder, on a hand-made exit table of 4 questions and 5 layers with known answers; and
the two exit-table figures of exit.plots."""

from __future__ import annotations

import math
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis.errors import UsageError  # noqa: E402
from analysis.plots import PlotError  # noqa: E402
from analysis.schema import EVALUATION  # noqa: E402
from exit.frontier import (  # noqa: E402
    FRONTIER_FILE,
    LABEL_RULES,
    bootstrap_interval,
    category_static_exits,
    category_static_layers,
    chance_agreement,
    dyvte_lookups,
    dyvte_tau_summary,
    exit_table_layers,
    first_exit_over,
    frontier_methods,
    frontier_summary,
    informed_oracle_exits,
    join_exit_tables,
    lookup_rows,
    monotone,
    oracle_exits,
    paired_difference_interval,
    rule_exits,
    rule_method_name,
    static_exits,
    write_frontier_folder,
)
from exit.plots import make_exit_figures, plot_accuracy_by_exit_layer, plot_oracle_exit_layers, read_evaluation  # noqa: E402
from exit.surgery import NO_EXIT  # noqa: E402

L = 5
# question -> (category, answer, the prediction after each exit layer 0..4; layer 4 = the full model)
QUESTIONS = {
    "q1": ("colour", "red", ["blue", "red", "red", "red", "red"]),      # right from layer 1 on
    "q2": ("colour", "blue", ["green", "green", "blue", "green", "green"]),  # full model wrong, layer 2 right
    "q3": ("count", "2", ["3", "3", "3", "3", "3"]),                   # never right, always the full answer
    "q4": ("count", "4", ["1", "2", "4", "4", "4"]),                   # right (and the full answer) from layer 2
}
FLOPS = [0.2 + 0.8 * (k + 1) / L for k in range(L)]  # 0.36, 0.52, 0.68, 0.84, 1.0


def flops(k: int) -> float:
    return FLOPS[k]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def answers() -> pd.DataFrame:
    rows = []
    for number, (sample, (category, answer, predictions)) in enumerate(QUESTIONS.items()):
        for k, prediction in enumerate(predictions):
            rows.append({"sample_id": sample, "layer": np.int32(k), "category": category, "answer": answer,
                         "prediction": prediction, "correct": prediction == answer,
                         "same_as_full": prediction == predictions[-1], "tokens": 40 + number,
                         "image_tokens": 16, "relative_prefill_flops": flops(k)})
    return pd.DataFrame(rows)


# paper labels (agreement 1.0 = safe, 0.5 = not) per question and layer
PAPER_LABELS = {"q1": [0, 1, 0, 1, 1], "q2": [0, 0, 0, 0, 1], "q3": [1, 1, 1, 1, 1], "q4": [1, 0, 1, 1, 1]}


@pytest.fixture
def sweep() -> pd.DataFrame:
    rows = [{"sample_id": s, "layer": k, "agreement": 1.0 if safe else 0.5, "ce_exit": 1.0, "ce_full": 1.0,
             "ce_ratio": 1.0, "label": bool(safe)}
            for s, labels in PAPER_LABELS.items() for k, safe in enumerate(labels)]
    return pd.DataFrame(rows)[::-1].reset_index(drop=True)  # another row order than the exit table


def test_exit_table_layers_checks_every_sample_has_every_layer(answers):
    assert exit_table_layers(answers) == L
    with pytest.raises(UsageError, match="'q2' with 4 rows"):
        exit_table_layers(answers.drop(index=answers.index[(answers["sample_id"] == "q2") & (answers["layer"] == 3)]))
    with pytest.raises(UsageError, match="once each"):
        exit_table_layers(pd.concat([answers, answers.iloc[[0]]]))


def test_static_lookup_reproduces_the_exit_table_rows(answers):
    rows = lookup_rows(answers, "static:2", static_exits(answers, 2))
    assert list(rows.columns) == [c.name for c in EVALUATION.columns]
    at_two = answers[answers["layer"] == 2].reset_index(drop=True)
    assert rows["question_id"].tolist() == at_two["sample_id"].tolist()
    for column in ("category", "answer", "prediction", "correct", "tokens", "image_tokens", "relative_prefill_flops"):
        assert rows[column].tolist() == at_two[column].tolist(), column
    assert (rows["method"] == "static:2").all() and (rows["exit_layer"] == 2).all()
    assert rows["correct"].tolist() == [True, True, False, True]
    # not timed: -1 for the integer timing columns, NaN for the float ones
    assert (rows[["batch", "batch_rows", "decode_steps"]] == -1).all().all()
    assert rows[["batch_seconds", "prefill_seconds", "decode_seconds"]].isna().all().all()


def test_no_exit_is_the_last_layer_and_written_as_no_exit(answers):
    full = lookup_rows(answers, "none", static_exits(answers, L - 1))
    assert (full["exit_layer"] == NO_EXIT).all()
    assert full["relative_prefill_flops"].tolist() == [1.0] * 4
    assert full["prediction"].tolist() == ["red", "green", "3", "4"]
    # NO_EXIT as the exit layer reads the same row as L-1
    same = lookup_rows(answers, "none", pd.Series(NO_EXIT, index=["q1", "q2", "q3", "q4"]))
    pd.testing.assert_frame_equal(full, same)


def test_lookup_keeps_the_order_of_the_exit_layers_and_rejects_bad_ones(answers):
    rows = lookup_rows(answers, "mixed", pd.Series({"q3": 0, "q1": 1}))
    assert rows["question_id"].tolist() == ["q3", "q1"]
    assert rows["exit_layer"].tolist() == [0, 1]
    assert rows["relative_prefill_flops"].tolist() == [flops(0), flops(1)]
    with pytest.raises(UsageError, match=r"found \[5\]"):
        lookup_rows(answers, "bad", pd.Series({"q1": 5}))
    with pytest.raises(UsageError, match="found 1 others"):
        lookup_rows(answers, "bad", pd.Series({"q9": 1}))
    with pytest.raises(UsageError, match="more than once"):
        lookup_rows(answers, "bad", pd.Series([1, 2], index=["q1", "q1"]))


def test_static_exits_reject_a_layer_past_the_last(answers):
    assert static_exits(answers, 0).to_dict() == {"q1": 0, "q2": 0, "q3": 0, "q4": 0}
    with pytest.raises(UsageError, match="0..4"):
        static_exits(answers, L)


def test_oracle_same_picks_the_earliest_layer_with_the_full_answer(answers):
    exits = oracle_exits(answers, "same")
    assert exits.to_dict() == {"q1": 1, "q2": 0, "q3": 0, "q4": 2}
    # by construction its answers are the full model's
    oracle = lookup_rows(answers, "oracle", exits)
    full = lookup_rows(answers, "none", static_exits(answers, L - 1))
    assert oracle["prediction"].tolist() == full["prediction"].tolist()


def test_oracle_correct_picks_the_earliest_correct_layer_or_the_last(answers):
    exits = oracle_exits(answers, "correct")
    assert exits.to_dict() == {"q1": 1, "q2": 2, "q3": L - 1, "q4": 2}
    rows = lookup_rows(answers, "oracle[correct]", exits)
    assert rows["exit_layer"].tolist() == [1, 2, NO_EXIT, 2]
    assert rows["correct"].tolist() == [True, True, False, True]
    with pytest.raises(UsageError, match="keep"):
        oracle_exits(answers, "best")


def test_category_static_layers_take_the_cheapest_layers_within_the_drop(answers):
    # full model: q1 and q4 right (2 of 4). Colour is 2 right at layer 2 only; count 1 right from layer 2.
    # Within 1 point 2 answers must stay right: colour at 2 with count at 0 (FLOPs 2 x 0.68 + 2 x 0.36)
    # beats colour at 1 with count at 2 (2 x 0.52 + 2 x 0.68); colour at 0 cannot reach 2.
    assert category_static_layers(answers) == {"colour": 2, "count": 0}
    assert category_static_layers(answers, max_drop=100) == {"colour": 0, "count": 0}
    assert category_static_layers(answers, max_drop=25) == {"colour": 1, "count": 0}  # 1 right is enough
    with pytest.raises(UsageError, match="max_drop >= 0"):
        category_static_layers(answers, max_drop=-1)


@pytest.mark.parametrize("seed", range(6))
def test_category_static_layers_equal_a_search_of_every_combination(seed):
    import itertools

    rng = np.random.default_rng(seed)
    layers, categories = 4, ["a", "b", "c"]
    rows = [{"sample_id": f"q{q}", "layer": k, "category": categories[q % 3], "correct": bool(rng.random() < 0.3 + 0.15 * k),
             "relative_prefill_flops": float(rng.uniform(0.1, 0.3) * (k + 1))}
            for q in range(14) for k in range(layers)]
    table = pd.DataFrame(rows)
    for drop in (0.0, 1.0, 10.0, 30.0):
        full = table[table["layer"] == layers - 1]["correct"].sum()
        best = math.inf
        for choice in itertools.product(range(layers), repeat=3):
            picked = table[table["layer"] == table["category"].map(dict(zip(categories, choice)))]
            if picked["correct"].sum() >= full - drop / 100 * 14 - 1e-9:
                best = min(best, picked["relative_prefill_flops"].sum())
        found = category_static_layers(table, max_drop=drop)
        picked = table[table["layer"] == table["category"].map(found)]
        assert picked["correct"].sum() >= full - drop / 100 * 14 - 1e-9
        assert picked["relative_prefill_flops"].sum() == pytest.approx(best, abs=1e-12)


def test_category_static_exits_apply_the_layers_and_keep_unknown_categories_whole(answers):
    exits = category_static_exits(answers, {"colour": 1})
    assert exits.to_dict() == {"q1": 1, "q2": 1, "q3": L - 1, "q4": L - 1}
    rows = lookup_rows(answers, "static[category]", exits)
    assert rows["prediction"].tolist() == ["red", "green", "3", "4"]
    with pytest.raises(UsageError, match="category exit layers in 0..4"):
        category_static_exits(answers, {"colour": L})


def _prior_table() -> pd.DataFrame:
    """Three layers. Size: layer 0 always says "small" (a prior: it agrees with the full answer as
    often as chance), layer 1 reads the image for s3 only. Colour: layer 0 already answers right."""
    predictions = {"s1": ("size", ["small", "small", "small"]), "s2": ("size", ["small", "small", "small"]),
                   "s3": ("size", ["small", "large", "large"]), "s4": ("size", ["small", "small", "large"]),
                   "c1": ("colour", ["red", "red", "red"]), "c2": ("colour", ["blue", "blue", "blue"])}
    return pd.DataFrame([{"sample_id": s, "layer": k, "category": c, "prediction": p, "same_as_full": p == ps[-1]}
                         for s, (c, ps) in predictions.items() for k, p in enumerate(ps)])


def test_chance_agreement_is_the_agreement_of_independent_answers():
    cells = chance_agreement(_prior_table()).set_index(["category", "layer"])
    # size, layer 0: always "small"; full answers half small -> chance 1 x 0.5, observed 2 of 4
    assert cells.loc[("size", 0), ["same_as_full", "chance", "above_chance"]].tolist() == [0.5, 0.5, 0.0]
    # size, layer 1: small 3/4, large 1/4 against full small 1/2, large 1/2 -> chance 0.5; observed 3 of 4
    assert cells.loc[("size", 1), ["same_as_full", "chance"]].tolist() == [0.75, 0.5]
    # colour, layer 0: red and blue, each matching itself -> chance 0.5, observed 1
    assert cells.loc[("colour", 0), ["same_as_full", "chance", "above_chance"]].tolist() == [1.0, 0.5, 0.5]
    assert cells["questions"].tolist() == [2, 2, 2, 4, 4, 4]


def test_the_informed_oracle_skips_exits_that_agree_only_by_chance():
    table = _prior_table()
    plain = oracle_exits(table.assign(correct=True))
    informed = informed_oracle_exits(table)
    assert plain.to_dict() == {"s1": 0, "s2": 0, "s3": 1, "s4": 2, "c1": 0, "c2": 0}
    # size's layer 0 is at chance: s1 and s2 exit at layer 1 (above chance by 0.25) instead
    assert informed.to_dict() == {"s1": 1, "s2": 1, "s3": 1, "s4": 2, "c1": 0, "c2": 0}
    # a margin above every cell's excess leaves only the full model's layer
    assert informed_oracle_exits(table, margin=0.6).to_dict() == {s: 2 for s in plain.index}


def test_first_exit_over_is_strict_and_falls_back_to_no_exit():
    p = {"s1": [0.1, 0.6, 0.95, 0.2, 0.99], "s2": [0.1] * 5, "s3": [0.0, 0.9, 0.9, 0.0, 0.95]}
    frame = pd.DataFrame([{"sample_id": s, "layer": k, "p_exit": v} for s, values in p.items() for k, v in enumerate(values)])
    assert first_exit_over(frame, 0.9, L).to_dict() == {"s1": 2, "s2": 4, "s3": 4}  # 0.9 is not > 0.9
    assert first_exit_over(frame, 0.5, L).to_dict() == {"s1": 1, "s2": 4, "s3": 1}
    # a layer without a gate never fires
    assert first_exit_over(frame[frame["layer"] != 1], 0.5, L).to_dict() == {"s1": 2, "s2": 4, "s3": 2}
    with pytest.raises(UsageError, match=r"in 0..3, found \[4\]"):
        first_exit_over(frame, 0.5, L - 1)


def test_the_tau_summary_is_the_frontier_summary_of_each_taus_lookup(answers):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame([{"sample_id": s, "layer": k, "p_exit": float(rng.random())} for s in QUESTIONS for k in range(L)])
    taus = (0.3, 0.9, 0.6)
    found = dyvte_tau_summary(answers, frame, taus, "g")
    assert list(found.index) == list(taus) and found.index.name == "tau"
    rows = {"none": lookup_rows(answers, "none", static_exits(answers, L - 1)),
            "oracle": lookup_rows(answers, "oracle", oracle_exits(answers)), **dyvte_lookups(answers, frame, taus, "g")}
    expected = frontier_summary(rows, L).set_index("method").loc[[f"g:{tau:g}" for tau in taus]]
    pd.testing.assert_frame_equal(found.reset_index(drop=True), expected.reset_index(drop=True), check_exact=True)
    assert found["share_of_oracle_saving"].notna().all()  # measured against the oracle
    assert found.loc[0.3, "mean_exit_layer"] < found.loc[0.9, "mean_exit_layer"]  # a lower tau exits earlier here


def test_monotone_labels_are_safe_from_that_layer_on():
    index = pd.MultiIndex.from_tuples([("a", 2), ("a", 0), ("a", 1), ("a", 3), ("b", 0), ("b", 1), ("b", 2), ("b", 3)],
                                      names=["sample_id", "layer"])
    labels = pd.Series([True, True, False, True, True, True, True, False], index=index)
    safe = monotone(labels)
    assert safe.index.equals(index)  # same order as given
    assert safe.tolist() == [True, False, False, True, False, False, False, False]
    with pytest.raises(UsageError, match="indexed by"):
        monotone(labels.reset_index(drop=True))


# hand-made rows for each label rule: agreement, ce_exit, ce_full, ce_ratio, same_as_full
RULE_ROWS = pd.DataFrame({
    "agreement": [1.0, 0.99, 1.0, 1.0, 0.995, 0.995],
    "ce_exit": [1.0, 1.0, 1.1, 2.06, 0.5, 1.02],
    "ce_full": [1.0, 1.0, 1.0, 2.0, 0.1, 1.0],
    "ce_ratio": [1.0, 1.0, 1.1, 1.03, 5.0, 1.02],
    "same_as_full": [True, True, False, True, True, False],
})
RULE_LABELS = {
    "paper": [True, False, False, False, False, True],  # agreement > 0.99 and ce_ratio < 1.03, both strict
    "agreement": [True, False, True, True, True, True],
    "ce+0.05": [True, True, False, False, False, True],  # ce_exit - ce_full < 0.05 nats
    "ce+0.2": [True, True, True, True, False, True],
    "answer": [True, True, False, True, True, False],
}


@pytest.mark.parametrize("rule", list(RULE_LABELS))
def test_each_label_rule_follows_its_definition(rule):
    assert LABEL_RULES[rule](RULE_ROWS).tolist() == RULE_LABELS[rule]


def test_every_label_rule_is_tested():
    assert set(LABEL_RULES) == set(RULE_LABELS)


def test_rule_exits_take_the_earliest_safe_layer_with_and_without_monotone_labels(answers, sweep):
    joined = join_exit_tables(sweep, answers)
    assert joined["sample_id"].tolist() == answers["sample_id"].tolist()  # the exit table's order
    assert LABEL_RULES["paper"](joined).tolist() == joined["label"].tolist()
    assert rule_exits(joined, "paper").to_dict() == {"q1": 1, "q2": 4, "q3": 0, "q4": 0}
    assert rule_exits(joined, "paper", monotone_labels=True).to_dict() == {"q1": 3, "q2": 4, "q3": 0, "q4": 2}
    # the answer rule without monotone labels is the "same" oracle
    assert rule_exits(joined, "answer").equals(oracle_exits(answers, "same"))
    assert rule_exits(joined, "answer", True).to_dict() == {"q1": 1, "q2": 3, "q3": 0, "q4": 2}
    with pytest.raises(UsageError, match="label rule"):
        rule_exits(joined, "loose")


def test_join_needs_a_sweep_row_for_every_exit_table_row(answers, sweep):
    with pytest.raises(UsageError, match="found 1 without"):
        join_exit_tables(sweep.iloc[1:], answers)


def test_frontier_methods_names_every_lookup(answers, sweep):
    methods = frontier_methods(answers, sweep, static_layers=[1, 2])
    rules = [rule_method_name(r, m) for r in LABEL_RULES for m in (False, True)]
    assert list(methods) == ["none", "static:1", "static:2", "oracle", "oracle[correct]", *rules]
    assert "oracle[paper,monotone]" in methods
    assert methods["oracle[paper,monotone]"]["exit_layer"].tolist() == [3, NO_EXIT, 0, 2]
    assert all((frame["method"] == name).all() for name, frame in methods.items())


def test_bootstrap_interval_of_a_constant_is_a_point():
    assert bootstrap_interval(np.ones(50)) == (1.0, 1.0)
    assert paired_difference_interval(np.ones(30), np.zeros(30)) == (1.0, 1.0)


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    values = np.array([1] * 30 + [0] * 70)
    low, high = bootstrap_interval(values, rounds=2000, seed=3)
    assert low < 0.3 < high
    # the normal approximation: 1.96 * sqrt(0.3 * 0.7 / 100) = 0.09 either side
    assert 0.06 < 0.3 - low < 0.12 and 0.06 < high - 0.3 < 0.12
    assert bootstrap_interval(values, rounds=2000, seed=3) == (low, high)
    assert bootstrap_interval(values, rounds=2000, seed=4) != (low, high)
    narrow = bootstrap_interval(values, level=0.5, seed=3)
    assert low < narrow[0] < narrow[1] < high


def test_paired_difference_resamples_the_same_questions_for_both():
    rng = np.random.default_rng(1)
    b = (rng.random(100) < 0.5).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:5]] = 1.0  # a is b with five more right answers
    low, high = paired_difference_interval(a, b)
    # every per-question difference is 0 or 1, so a paired resample never goes below 0; resampling
    # the two methods independently would (its interval is about +-0.14 wide)
    assert 0.0 <= low < 0.05 < high <= 0.11
    with pytest.raises(UsageError, match="100 and 99"):
        paired_difference_interval(a, b[:99])


@pytest.mark.parametrize("values, rounds, level", [(np.array([]), 10, 0.95), (np.ones(3), 0, 0.95), (np.ones(3), 10, 1.0)])
def test_bootstrap_interval_rejects_bad_arguments(values, rounds, level):
    with pytest.raises(UsageError):
        bootstrap_interval(values, rounds=rounds, level=level)


@pytest.fixture
def methods(answers) -> dict[str, pd.DataFrame]:
    return frontier_methods(answers, static_layers=[2])


def test_frontier_summary_adds_intervals_differences_and_the_oracle_share(methods):
    summary = frontier_summary(methods, L, rounds=500).set_index("method")
    assert list(summary.index) == ["none", "static:2", "oracle", "oracle[correct]"]
    assert summary["accuracy_overall"].to_dict() == {"none": 0.5, "static:2": 0.75, "oracle": 0.5, "oracle[correct]": 0.75}
    assert summary.loc["static:2", "accuracy_colour"] == 1.0 and summary.loc["static:2", "accuracy_count"] == 0.5
    assert summary.loc["oracle", "relative_prefill_flops"] == pytest.approx(np.mean([flops(1), flops(0), flops(0), flops(2)]))
    assert summary.loc["oracle[correct]", "mean_exit_layer"] == pytest.approx((1 + 2 + 4 + 2) / 4)
    assert summary.loc["oracle[correct]", "exited_share"] == 0.75
    assert (summary["accuracy_low"] <= summary["accuracy_overall"]).all()
    assert (summary["accuracy_overall"] <= summary["accuracy_high"]).all()
    assert summary["difference"].to_dict() == {"none": 0.0, "static:2": 0.25, "oracle": 0.0, "oracle[correct]": 0.25}
    assert summary.loc["none", ["difference_low", "difference_high"]].tolist() == [0.0, 0.0]
    # the oracle keeps every answer, so the difference is zero on every resample
    assert summary.loc["oracle", ["difference_low", "difference_high"]].tolist() == [0.0, 0.0]
    oracle_saving = 1 - summary.loc["oracle", "relative_prefill_flops"]
    assert summary.loc["static:2", "share_of_oracle_saving"] == pytest.approx((1 - flops(2)) / oracle_saving)
    assert summary.loc["oracle", "share_of_oracle_saving"] == pytest.approx(1.0)
    assert summary.loc["none", "share_of_oracle_saving"] == 0.0
    assert summary[["seconds", "prefill_seconds", "decode_seconds", "decode_tokens_per_second"]].isna().all().all()


def test_frontier_summary_without_reference_or_oracle_leaves_those_columns_empty(methods):
    summary = frontier_summary({"static:2": methods["static:2"]}, L, rounds=100)
    assert summary[["difference", "difference_low", "difference_high", "share_of_oracle_saving"]].isna().all().all()


def test_frontier_summary_refuses_methods_on_different_questions(methods):
    with pytest.raises(UsageError, match="same questions"):
        frontier_summary({"none": methods["none"], "static:2": methods["static:2"].iloc[:3]}, L)


def test_frontier_folder_reads_back_as_an_evaluation_folder(methods, tmp_path):
    out = tmp_path / "frontier"
    paths = write_frontier_folder(out, methods, {"model": "synthetic"}, L, rounds=200)
    assert sorted(p.name for p in paths) == sorted(
        ["eval-none.parquet", "eval-static_2.parquet", "eval-oracle.parquet", "eval-oracle[correct].parquet",
         "summary.parquet", FRONTIER_FILE])
    rows, summary = read_evaluation(out)  # validates both files against the registered tables
    assert summary["method"].tolist() == list(methods)
    pd.testing.assert_frame_equal(rows, pd.concat(methods.values(), ignore_index=True), check_dtype=False)
    assert summary.set_index("method")["accuracy_overall"].to_dict()["static:2"] == 0.75
    assert sorted(c for c in summary.columns if c.startswith("accuracy_")) == [
        "accuracy_colour", "accuracy_count", "accuracy_overall"]  # no interval columns posing as categories
    markdown = (out / FRONTIER_FILE).read_text(encoding="utf-8")
    assert "| 95 % interval |" in markdown and "| oracle[correct] | 4 | 75.0 % |" in markdown
    assert "| static:2 | 100.0 | 50.0 | 75.0 |" in markdown  # per category: colour, count, overall
    figures = make_exit_figures(out, tmp_path / "figures")
    assert all(p.is_file() and p.stat().st_size > 0 for p in figures)


def test_frontier_folder_refuses_a_folder_with_an_evaluation_and_mislabelled_rows(methods, tmp_path):
    write_frontier_folder(tmp_path, {"none": methods["none"]}, {}, L, rounds=10)
    with pytest.raises(UsageError, match="new or empty"):
        write_frontier_folder(tmp_path, {"static:2": methods["static:2"]}, {}, L, rounds=10)
    with pytest.raises(UsageError, match="of method 'static:1'"):
        write_frontier_folder(tmp_path / "other", {"static:1": methods["static:2"]}, {}, L, rounds=10)


def test_accuracy_by_exit_layer_draws_a_line_per_category_and_overall(answers):
    figure = plot_accuracy_by_exit_layer(answers)
    lines = figure.axes[0].get_lines()
    assert len(lines) == 3
    by_label = {line.get_label(): list(line.get_ydata()) for line in lines}
    assert by_label["all (4)"] == [0.0, 0.25, 0.75, 0.5, 0.5]
    assert by_label["colour (2)"] == [0.0, 0.5, 1.0, 0.5, 0.5]
    assert by_label["count (2)"] == [0.0, 0.0, 0.5, 0.5, 0.5]
    assert list(lines[-1].get_xdata()) == list(range(L))


def test_oracle_exit_layers_draws_a_panel_of_bars_per_category(answers):
    rows = lookup_rows(answers, "oracle[correct]", oracle_exits(answers, "correct"))  # exits 1, 2 | never, 2
    figure = plot_oracle_exit_layers(rows, num_layers=L)
    shown = [ax for ax in figure.axes if ax.get_visible()]
    assert len(shown) == 2
    heights = {ax.get_title().split(":")[0]: [bar.get_height() for bar in ax.patches] for ax in shown}
    assert heights == {"colour": [0, 0.5, 0.5, 0, 0, 0], "count": [0, 0, 0.5, 0, 0, 0.5]}  # layers 0..4, never
    assert [ax.get_title() for ax in shown] == ["colour: 2 questions, median 1.5", "count: 2 questions, median 3"]
    with pytest.raises(PlotError, match="exit layers"):
        plot_oracle_exit_layers(rows.assign(exit_layer=-2))

