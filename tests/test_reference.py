"""The reference harness (``marginalize bench reference``): quantiles and W2, building a
(tiny) NUTS reference, scoring a method against it, stale references and the command line."""

import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from marginalize import OptionError
from marginalize.benchmarks import build_parser
from marginalize.benchmarks import reference as R

TINY_NUTS = {"num_chains": 2, "num_warmup": 30, "num_samples": 30, "max_tree_depth": 5}


def test_mixture_quantiles_of_one_gaussian_and_of_a_mixture():
    u = R.levels(50)
    q = R.mixture_quantiles(np.array([[1.0]]), np.array([[2.0]]), u)
    assert np.allclose(q[0], 1.0 + 2.0 * norm.ppf(u), atol=1e-9)
    means, sds = np.array([[-1.0], [2.0]]), np.array([[0.5], [1.0]])
    q = R.mixture_quantiles(means, sds, u)[0]
    cdf = 0.5 * (norm.cdf(q, -1.0, 0.5) + norm.cdf(q, 2.0, 1.0))
    assert np.allclose(cdf, u, atol=1e-9)


def test_w2_between_gaussians_is_closed_form():
    """W2(N(m1, s1^2), N(m2, s2^2)) = sqrt((m1 - m2)^2 + (s1 - s2)^2); the midpoint rule on
    K levels truncates the tails, an error below 1% at K = NUM_LEVELS."""
    u = R.levels()
    qa = R.mixture_quantiles(np.array([[0.0, 1.0]]), np.array([[1.0, 1.0]]), u)
    qb = R.mixture_quantiles(np.array([[0.5, 1.0]]), np.array([[2.0, 1.0]]), u)
    w2 = R.w2_from_quantiles(qa, qb)
    assert w2[0] == pytest.approx(math.sqrt(0.25 + 1.0), rel=1e-2)
    assert w2[1] == pytest.approx(0.0, abs=1e-9)


def test_every_problem_loads_with_its_model():
    for name, p in R.PROBLEMS.items():
        xtr, ytr, xte, yte = p.tensors()
        assert xtr.shape[1] == xte.shape[1] == p.in_features, name
        assert xtr.shape[0] == ytr.shape[0] and xte.shape[0] == yte.shape[0]
        assert p.model().task == p.task
        assert json.loads(json.dumps(p.config()))["name"] == name


def test_build_score_and_stale_reference(tmp_path):
    meta = R.build_reference("gap", out=tmp_path, overrides=TINY_NUTS)
    for k in ("rhat_max", "ess_bulk_min", "seconds", "test_ll"):
        assert math.isfinite(meta[k]), k
    arrays, meta2 = R.load_reference("gap", tmp_path)
    assert arrays["quantiles"].shape == (61, R.NUM_LEVELS) and meta2["nuts"] == {
        **R.PROBLEMS["gap"].nuts,
        **TINY_NUTS,
    }
    # the reference scored against itself: W2 0
    assert R.compare(arrays, arrays)["w2"] == 0.0
    rows = R.score(
        ["gap"], ["map"], out=tmp_path, options={"map": {"steps": 50}}, jsonl=tmp_path / "r.jsonl"
    )
    assert rows[0]["w2"] > 0 and math.isfinite(rows[0]["test_ll"])
    again = R.score(
        ["gap"], ["map"], out=tmp_path, options={"map": {"steps": 50}}, jsonl=tmp_path / "r.jsonl"
    )
    assert again[0]["seconds"] == rows[0]["seconds"]  # reused, not refitted
    md = R.to_markdown(rows, argv=["x"], out=tmp_path)
    assert "| map |" in md and "reference (NUTS)" in md and "| gap |" in md
    meta2["config"]["hidden"] = [3]
    (tmp_path / "reference" / "gap.json").write_text(json.dumps(meta2))
    with pytest.raises(OptionError, match="rebuild"):
        R.load_reference("gap", tmp_path)
    with pytest.raises(OptionError, match="no reference"):
        R.score(["two_moons"], ["map"], out=tmp_path)


def test_classification_scores():
    ref = {"probs": np.array([[0.9, 0.1], [0.4, 0.6]]), "y_test": np.array([0, 1])}
    summ = {"probs": np.array([[0.6, 0.4], [0.7, 0.3]]), "log_pred": np.log([0.6, 0.3])}
    s = R.compare(summ, ref)
    assert s["agreement"] == 0.5 and s["tv"] == pytest.approx((0.3 + 0.3) / 2)
    assert s["accuracy"] == 0.5 and s["test_ll"] == pytest.approx(np.log([0.6, 0.3]).mean())


def test_cli_options():
    args = build_parser().parse_args(["reference", "--score-only", "--problems", "gap"])
    assert args.score_only and args.problems == ["gap"] and not args.rebuild
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reference", "--score-only", "--build-only"])
    with pytest.raises(OptionError, match="unknown"):
        R._problem("moons")


def test_committed_references_are_converged_and_current():
    """Every committed reference passed the harness's bar (function-space R-hat and bulk
    ESS at every test input, no divergences) and was built from the problem as it is
    defined now (a changed problem makes it stale)."""
    from pathlib import Path

    res = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "reference"
    built = sorted(res.glob("*.json"))
    assert built, "no committed reference"
    for path in built:
        meta = json.loads(path.read_text())
        assert meta["converged"] and meta["divergences"] == 0, path.name
        assert meta["rhat_max"] <= R.RHAT_MAX and meta["ess_bulk_min"] >= R.ESS_MIN, path.name
        assert meta["config"] == R._problem(meta["problem"]).config(), path.name
        assert (res / f"{meta['problem']}.npz").exists()
