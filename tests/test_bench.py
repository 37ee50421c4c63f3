"""Smoke tests of the benchmark runners with tiny settings, and their command lines."""

import math

import matplotlib
import numpy as np
import pytest

from marginalize import OptionError
from marginalize.benchmarks import _common, build_parser, uci
from marginalize.benchmarks import active_learning as AL
from marginalize.benchmarks import classification as C

matplotlib.use("Agg")


def test_mean_se_and_formatting():
    m, se = _common.mean_se([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3)
    assert se == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1) / math.sqrt(3))
    m1, se1 = _common.mean_se([3.0])
    assert m1 == 3.0 and math.isnan(se1)
    assert _common.fmt_pm(3.0, se1) == "3.00"
    assert _common.fmt_pm(math.nan, 1.0) == "–"
    table = _common.markdown_table(["a", "b"], [[1, 0.123456]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |"]


def test_method_selection_and_options():
    assert _common.select_methods(["map,mc-dropout", "map"]) == ["map", "mc-dropout"]
    with pytest.raises(OptionError, match="did you mean 'map'"):
        _common.select_methods(["mapp"])
    default = _common.select_methods(None, exclude_by_default=("nuts", "hmc"))
    assert "map" in default and "nuts" not in default
    assert _common.method_options("map", {"map": {"steps": 5}}, {}, {"lr": 0.1}) == {
        "steps": 5,
        "lr": 0.1,
    }
    with pytest.raises(OptionError, match="unknown option"):
        _common.method_options("map", {}, {}, {"p": 0.1})
    # a method missing from the table gets the budget keys it accepts
    assert _common.method_options("map", {}, {"steps": 7, "num_samples": 3}) == {"steps": 7}


def test_every_settings_row_is_valid_for_its_method():
    import marginalize as mz

    for table in (uci.SETTINGS, C.SETTINGS):
        for m, levels in table.items():
            if m not in mz.methods():
                continue
            for level in ("small", "full"):
                opts = {k: v for k, v in levels[level].items() if k not in uci.MODEL_KEYS}
                mz.inference.get_method(m).make_options(opts)


def test_uci_runner_table(tmp_path):
    rows = uci.run(
        ["boston"],
        ["map"],
        num_splits=1,
        options={"map": {"steps": 30}},
        progress=False,
        jsonl=tmp_path / "rows.jsonl",
    )
    assert len(rows) == 1
    for k in ("rmse", "test_ll", "gaussian_ll", "coverage95", "seconds"):
        assert math.isfinite(rows[0][k]), k
    assert rows[0]["rmse"] > 0 and 0 <= rows[0]["coverage95"] <= 1
    # a point estimate's predictive is one Gaussian: both log-likelihoods agree
    assert rows[0]["test_ll"] == pytest.approx(rows[0]["gaussian_ll"], abs=1e-4)
    # resume: the stored row is reused, not refitted
    again = uci.run(
        ["boston"],
        ["map"],
        num_splits=1,
        options={"map": {"steps": 30}},
        progress=False,
        jsonl=tmp_path / "rows.jsonl",
    )
    assert again[0]["seconds"] == rows[0]["seconds"]
    md = uci.to_markdown(
        rows, title="t", full=False, options={"map": {"steps": 30}}, argv=["x"], methods=["map"]
    )
    header = "| method | splits | RMSE | test LL | Gaussian LL | cov95 | ΔLL vs map | fit s |"
    assert header in md and "| map | 1 |" in md
    assert "Gal & Ghahramani 2016" in md and "Lakshminarayanan" in md and "- command: `x`" in md


def test_uci_log_likelihood_is_in_original_units():
    x, y, _ = uci.load_regression("boston")
    a = uci.run_split(x, y, "map", 0, {"steps": 30})
    b = uci.run_split(x, 10.0 * y, "map", 0, {"steps": 30})
    # scaling the target by 10 scales RMSE by 10 and shifts the LL by -log(10)
    assert b["rmse"] == pytest.approx(10 * a["rmse"], rel=1e-4)
    assert b["test_ll"] == pytest.approx(a["test_ll"] - math.log(10), abs=1e-4)


def test_uci_datasets_load():
    for name in uci.DATASETS:
        x, y, desc = uci.load_regression(name)
        assert x.ndim == 2 and y.shape == (x.shape[0],) and np.isfinite(x).all() and desc
    with pytest.raises(OptionError, match="unknown"):
        uci.load_regression("yacht")


def test_classification_runner_table():
    rows = C.run(
        ["map", "mc-dropout"],
        ["mlp"],
        seeds=1,
        options={"map": {"steps": 40}, "mc-dropout": {"steps": 40}},
        progress=False,
    )
    assert [r["method"] for r in rows] == ["map", "mc-dropout"]
    for r in rows:
        for k in ("accuracy", "nll", "brier", "ece", "auroc_entropy"):
            assert math.isfinite(r[k]), k
        assert 0.2 < r["accuracy"] <= 1
    assert math.isnan(rows[0]["auroc_mi"])  # a point estimate has no epistemic part
    assert math.isfinite(rows[1]["auroc_mi"])
    md = C.to_markdown(rows, title="t", full=False, methods=["map", "mc-dropout"])
    assert (
        "| method | seeds | accuracy | NLL | Brier | ECE | AUROC entropy | AUROC MI | fit s |" in md
    )


def test_classification_split_has_no_ood_classes_in_training():
    xtr, ytr, xte, yte, xood = C.digits_split(0)
    assert set(np.unique(ytr)) == set(range(5)) and set(np.unique(yte)) <= set(range(5))
    assert len(xtr) + len(xte) + len(xood) == 1797


def test_active_learning_loop_and_plot(tmp_path):
    res = AL.run(seeds=1, rounds=1, acquire=5, initial=10, options={"steps": 30}, progress=False)
    assert res["labels"] == [10, 15]
    for acc in res["curves"].values():
        assert acc.shape == (1, 2) and np.isfinite(acc).all()
    # every acquisition function starts from the same labelled set and fit seed
    assert len({float(acc[0, 0]) for acc in res["curves"].values()}) == 1
    png = AL.plot_curves(res, tmp_path / "al.png")
    assert png.stat().st_size > 1000
    md = AL.to_markdown(res, title="t", plot="al.png")
    assert "| acquisition |" in md and "bald" in md


def test_bald_scores_are_mutual_information():
    class P:
        mutual_info = np.array([0.1, 0.5])
        entropy = np.array([0.9, 0.2])
        probs = np.zeros((2, 3))

    import torch

    p = P()
    p.mutual_info, p.entropy = torch.tensor(p.mutual_info), torch.tensor(p.entropy)
    rng = np.random.default_rng(0)
    assert AL.acquisition_scores(p, "bald", rng).argmax() == 1
    assert AL.acquisition_scores(p, "entropy", rng).argmax() == 0
    with pytest.raises(OptionError, match="acquisition"):
        AL.acquisition_scores(p, "margin", rng)


def test_cli_parses_bench_and_rejects_unknown_method(capsys):
    from marginalize.cli import main

    args = build_parser().parse_args(["classification", "--methods", "map", "--seeds", "2"])
    assert args.methods == ["map"] and args.seeds == 2 and not args.full
    assert main(["bench", "uci", "--methods", "mapp"]) == 2
    assert "did you mean 'map'" in capsys.readouterr().err


def test_uci_model_keys_shape_the_model_not_the_fit():
    spec, fit_opts = uci._split_options({"steps": 5, "noise": 0.3})
    assert fit_opts == {"steps": 5} and spec["noise"] == 0.3
    assert uci._model(13, spec).likelihood.noise == 0.3
    assert uci._model(13, uci._split_options({})[0]).likelihood.noise is None
    with pytest.raises(OptionError, match="noise"):
        uci._model(13, {"likelihood": "heteroscedastic", "noise": 0.3, "prior_gain": 1.0})
    # the fixed noise reaches the fit: a MAP predictive is N(mean, (0.3 * sd_y)^2), so its
    # log-likelihood follows from the RMSE alone
    from marginalize import datasets

    x, y, _ = uci.load_regression("boston")
    row = uci.run_split(x, y, "map", 0, {"steps": 5, "noise": 0.3})
    sd = 0.3 * datasets.train_test_split(x, y, test_size=0.1, seed=0)[1].std()
    expected = -0.5 * math.log(2 * math.pi * sd**2) - row["rmse"] ** 2 / (2 * sd**2)
    assert row["test_ll"] == pytest.approx(expected, abs=1e-3)


def test_paired_difference_against_baseline():
    rows = [
        {"dataset": "d", "method": "map", "split": 0, "test_ll": -3.0},
        {"dataset": "d", "method": "map", "split": 1, "test_ll": -2.0},
        {"dataset": "d", "method": "ens", "split": 0, "test_ll": -2.5},
        {"dataset": "d", "method": "ens", "split": 1, "test_ll": -1.9},
        {"dataset": "d", "method": "ens", "split": 2, "test_ll": 0.0},  # no baseline: ignored
    ]
    m, se = uci.paired_difference(rows, "d", "ens", "map")
    assert m == pytest.approx(0.3) and se == pytest.approx(0.2)
    assert all(math.isnan(v) for v in uci.paired_difference(rows, "d", "map", "map"))


def test_uci_tuned_and_defaults_protocols(monkeypatch, tmp_path):
    """``NAME:tuned`` picks its options per split on an inner validation split (the best
    validation LL among the grid), ``--defaults`` runs methods at their own options."""
    monkeypatch.setitem(uci.TUNING, "map", {"noise": [0.3, 5.0]})
    x, y, _ = uci.load_regression("boston")
    best, scores = uci.tune_split(x, y, "map", 0, {"steps": 30}, uci.TUNING["map"])
    assert best == {"noise": 0.3} and len(scores) == 2  # noise 5 SDs fits nothing
    assert max(s["val_ll"] for s in scores) == scores[0]["val_ll"]
    rows = uci.run(
        ["boston"],
        ["map:tuned"],
        num_splits=1,
        options={"map:tuned": {"steps": 30}},
        progress=False,
    )
    assert rows[0]["method"] == "map:tuned" and rows[0]["tuned"] == {"noise": 0.3}
    md = uci.to_markdown(rows, title="t", full=False, methods=["map:tuned"])
    assert "tuned per split over noise in [0.3, 5.0]; chosen: noise 0.3 x1" in md
    assert uci._options("svi-meanfield", "defaults", None) == {}
    assert uci._options("nuts", "defaults", None)["num_chains"] == 2
    assert uci.select(["all"], ())[:1] == ["bbb"] and "nuts" in uci.select(["all"], ())
    with pytest.raises(OptionError, match="no tuning grid"):
        uci.select(["bbb:tuned"], ())
