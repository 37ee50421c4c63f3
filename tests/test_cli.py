"""The command line on the user's own data and model: a CSV of scikit-learn's diabetes data and
a model file, with --save, --json and --report; every option checked before the first fit."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import marginalize as mz
from marginalize.cli import main

USER_MODEL = textwrap.dedent(
    '''
    import pyro
    import pyro.distributions as dist


    def model(x, y=None):
        """Bayesian linear regression, written by the user."""
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w + b, sigma), obs=y)


    def small_mlp(in_features, num_classes):
        """A function returning a builder model."""
        import marginalize as mz

        return mz.models.mlp(in_features, hidden=[4], out_features=num_classes,
                             likelihood="categorical")
    '''
)


@pytest.fixture(scope="module")
def diabetes_csv(tmp_path_factory):
    from sklearn.datasets import load_diabetes

    d = tmp_path_factory.mktemp("data")
    frame = load_diabetes(as_frame=True).frame.rename(columns={"target": "progression"})
    frame.to_csv(d / "diabetes.csv", index=False)
    (d / "mymodel.py").write_text(USER_MODEL)
    return d, frame


@pytest.fixture(scope="module")
def diabetes_run(diabetes_csv, tmp_path_factory):
    d, frame = diabetes_csv
    out = tmp_path_factory.mktemp("run")
    argv = [
        "fit",
        "--data",
        str(d / "diabetes.csv"),
        "--target",
        "progression",
        "--model",
        f"{d / 'mymodel.py'}:model",
        "--method",
        "map,svi-meanfield",
        "--options",
        json.dumps(
            {"map": {"steps": 500, "lr": 0.05}, "svi-meanfield": {"steps": 500, "lr": 0.05}}
        ),
        "--num-samples",
        "50",
        "--save",
        str(out / "fits"),
        "--json",
        str(out / "results.json"),
        "--report",
        str(out / "report"),
    ]
    import io
    from contextlib import redirect_stderr, redirect_stdout

    o, e = io.StringIO(), io.StringIO()
    with redirect_stdout(o), redirect_stderr(e):
        rc = main(argv)
    return rc, o.getvalue(), e.getvalue(), out, frame


def test_cli_fits_a_users_csv_and_model_file(diabetes_run):
    rc, stdout, stderr, out, frame = diabetes_run
    assert rc == 0, stderr
    assert "\r" not in stderr and "it/s" not in stderr  # no progress bars when not a terminal
    doc = json.loads((out / "results.json").read_text())
    assert doc["task"] == "regression" and doc["target"] == "progression"
    assert doc["n_train"] + doc["n_test"] == len(frame)
    assert doc["units"] == "target" and doc["likelihood"].startswith("Normal")
    rows = {r["method"]: r for r in doc["results"]}
    assert set(rows) == {"map", "svi-meanfield"}
    sd = float(frame["progression"].std())
    for r in rows.values():
        # in the target's units: a linear model on diabetes has a test RMSE near 55 (SD 77)
        assert 35 < r["rmse"] < 0.95 * sd, r
        assert 0.6 <= r["coverage90"] <= 1.0
        assert r["nll"] == pytest.approx(r["nll"]) and math.isfinite(r["nll"])
        assert r["fit_seconds"] > 0
    # the terminal: a header, one row per method, and the findings at the end
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if "RMSE" in line and "NLL" in line)
    assert lines[head + 2].split()[0] == "map" and lines[head + 3].split()[0] == "svi-meanfield"
    assert float(lines[head + 2].split()[1]) == pytest.approx(rows["map"]["rmse"], abs=1e-3)
    assert "target's units" in stdout and "likelihood (every method): Normal" in stdout
    assert lines[-1].startswith("json:") or any(x.startswith("findings:") for x in lines[-6:])
    n_problems = len(doc["problems"])
    if n_problems:
        assert f"findings: {n_problems} problem(s)" in stdout
    else:
        assert "findings: no problems" in stdout


def test_cli_saves_fits_loadable_with_mz_load(diabetes_run):
    rc, _, _, out, _ = diabetes_run
    assert rc == 0
    import importlib.util

    run = json.loads((out / "fits" / "run.json").read_text())
    assert set(run["fits"]) == {"map", "svi-meanfield"} and len(run["x_mean"]) == 10
    spec = importlib.util.spec_from_file_location(
        "user_model_again", run["model"].rpartition(":")[0]
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    post = mz.load(run["fits"]["map"], model=module.model)
    assert post.method == "map"
    x = torch.zeros(3, 10)  # the training mean, standardized
    pred = post.predict(x)
    # the mean input predicts near the mean target: y_mean + y_std * pred
    assert abs(float(pred.mean[0])) < 0.2


def test_cli_report_has_the_table_and_the_likelihood(diabetes_run):
    rc, _, _, out, _ = diabetes_run
    assert rc == 0
    import html

    text = html.unescape((out / "report" / "report.html").read_text())
    assert "Likelihood</b> (every fit): Normal" in text
    assert "in the target's units" in text
    assert "RMSE" in text and "90% interval coverage" in text
    doc = json.loads((out / "results.json").read_text())
    # the report's table is the terminal's and the JSON's: the same numbers
    assert f"{doc['results'][0]['rmse']:.3f}" in text


def test_every_option_is_checked_before_the_first_fit(diabetes_csv, tmp_path, capsys):
    d, _ = diabetes_csv
    argv = [
        "fit", "--data", str(d / "diabetes.csv"), "--target", "progression",
        "--method", "map,nuts", "--options", '{"nuts": {"num_chain": 4}}',
        "--save", str(tmp_path / "fits"),
    ]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "nuts" in captured.err and "num_chain" in captured.err
    assert "num_chains" in captured.err  # the suggestion
    assert "fitted" not in captured.out  # map did not run first
    assert not list((tmp_path / "fits").glob("*.pt"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target", "progresion"], "did you mean 'progression'"),
        (["--target", "progression", "--model", "mlp:5", "--noise", "-1"], "--noise"),
        (["--target", "progression", "--model", "nope.py:model"], "no such file"),
        (["--target", "progression", "--test-size", "1.5"], "--test-size"),
        (["--target", "progression", "--device", "cuda:99"], "device"),
        (["--target", "progression", "--method", "nust"], "did you mean 'nuts'"),
        (["--target", "progression", "--task", "classification"], "regression target"),
    ],
)
def test_bad_input_is_a_clear_error(diabetes_csv, capsys, extra, message):
    d, _ = diabetes_csv
    assert main(["fit", "--data", str(d / "diabetes.csv"), *extra, "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("marginalize: error: ") and message in err, err


def test_missing_values_and_unknown_files(tmp_path, capsys):
    import pandas as pd

    pd.DataFrame({"a": [1.0, None, 3.0, 4.0, 5.0], "t": [1.0, 2.0, 3.0, 4.0, 5.0]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    assert main(["fit", "--data", str(tmp_path / "m.csv"), "--target", "t"]) == 2
    assert "missing values" in capsys.readouterr().err
    assert main(["fit", "--data", str(tmp_path / "none.csv"), "--target", "t"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["fit", "--data", "bostn"]) == 2
    assert "did you mean 'boston'" in capsys.readouterr().err


def test_text_target_is_classification_with_a_model_factory(diabetes_csv, tmp_path, capsys):
    """A string target column means classification; a function returning a builder model is
    called with the arguments it names; Parquet is read like CSV."""
    pytest.importorskip("pyarrow")
    import pandas as pd

    d, _ = diabetes_csv
    g = np.random.default_rng(0)
    x = g.normal(size=(90, 3))
    label = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "yes", "no")
    frame = pd.DataFrame(x, columns=["a", "b", "c"]).assign(colour=g.choice(["red", "blue"], 90))
    frame["answer"] = label
    frame.to_parquet(tmp_path / "t.parquet")
    rc = main(
        [
            "fit", "--data", str(tmp_path / "t.parquet"), "--target", "answer",
            "--model", f"{d / 'mymodel.py'}:small_mlp", "--method", "map",
            "--options", '{"map": {"steps": 400}}', "--json", str(tmp_path / "r.json"),
            "--num-samples", "20",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["task"] == "classification"
    assert "one-hot encoded" in out and "colour" in out  # the text feature
    assert doc["results"][0]["accuracy"] > 0.7
    assert "accuracy" in out and "ECE" in out


def test_one_likelihood_for_every_method_and_it_is_said(tmp_path, capsys):
    rc = main(
        [
            "fit", "--data", "sine", "--model", "mlp:8", "--method", "map,svi-meanfield",
            "--noise", "0.3", "--quick", "--json", str(tmp_path / "r.json"),
            "--num-samples", "20",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["likelihood"].startswith("Gaussian noise, SD fixed at 0.3")
    assert "likelihood (every method): Gaussian noise, SD fixed at 0.3" in out


def test_strict_makes_problems_an_error_and_quiet_prints_nothing(tmp_path, capsys):
    argv = [
        "fit", "--data", "sine", "--model", "mlp:8", "--method", "map",
        "--options", '{"map": {"steps": 40}}', "--num-samples", "10",
        "--json", str(tmp_path / "r.json"),
    ]  # fmt: skip
    assert main([*argv, "--strict", "--quiet"]) == 3  # 40 steps: the loss has not converged
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    doc = json.loads((tmp_path / "r.json").read_text())
    assert any(p["check"] == "loss not converged" for p in doc["problems"])
    assert main(argv) == 0  # without --strict the problems are reported, not an error
    out = capsys.readouterr().out
    assert "findings: 1 problem(s)" in out and "map: loss not converged" in out


def test_help_imports_no_torch():
    """`marginalize --help` must not import torch (it would take seconds)."""
    code = (
        "import sys\n"
        "from marginalize.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = [m for m in ('torch', 'pyro', 'arviz', 'pandas', 'matplotlib') "
        "if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    help_text = subprocess.run(
        [sys.executable, "-m", "marginalize.cli", "fit", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for flag in ("--data", "--target", "--model", "--save", "--json", "--device", "--strict"):
        assert flag in help_text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_device_cuda_fits_evaluates_and_reports_on_the_gpu(diabetes_csv, tmp_path):
    d, _ = diabetes_csv
    options = {
        "map": {"steps": 500},
        "svi-meanfield": {"steps": 500},
        "nuts": {"num_samples": 50, "num_warmup": 50, "max_tree_depth": 5},
    }
    rc = main(
        [
            "fit", "--data", str(d / "diabetes.csv"), "--target", "progression",
            "--model", "mlp:16", "--method", "map,svi-meanfield,nuts", "--device", "cuda",
            "--options", json.dumps(options), "--num-samples", "100", "--quiet",
            "--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "rep"),
            "--save", str(tmp_path / "fits"),
        ]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert all(0 < r["coverage90"] <= 1 and math.isfinite(r["nll"]) for r in doc["results"])
    post = mz.load(tmp_path / "fits" / "map.pt", device="cuda")
    pred = post.predict(torch.zeros(4, 10, device="cuda"), num_samples=1)
    lo, hi = pred.interval(0.9)
    assert lo.device.type == "cuda" and (lo < hi).all()


def test_a_fresh_process_shows_no_progress_bars_or_third_party_info(tmp_path):
    """Output that is not a terminal gets no progress bars, and ArviZ's import-time INFO
    lines (arviz.preview) stay hidden unless -vv asks for them."""
    cmd = [
        sys.executable, "-m", "marginalize.cli", "fit", "--data", "sine", "--model", "mlp:4",
        "--method", "map", "--options", '{"map": {"steps": 50}}', "--num-samples", "10",
        "--report", str(tmp_path / "rep"),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "INFO" not in out.stderr and "\r" not in out.stderr, out.stderr
    assert "findings:" in out.stdout
