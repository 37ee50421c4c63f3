"""The HTML report: self-contained, readable, flags problems, renders in a real browser."""

import re
import shutil
import subprocess

import pyro
import pyro.distributions as dist
import pytest
import torch

import marginalize as mz
from conftest import rseed
from marginalize.diagnostics import functions


def _sine(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.2 * torch.randn(n, generator=g)
    return x[:36], y[:36], x[36:], y[36:]


@pytest.fixture(scope="module")
def regression_report(tmp_path_factory):
    x, y, xt, yt = _sine()
    model = mz.models.mlp(1, hidden=[8])
    posts = {
        "map": mz.fit(model, x, y, method="map", steps=150, init="prior", seed=0, progress=False),
        "svi-meanfield": mz.fit(
            model, x, y, method="svi-meanfield", steps=150, init="prior", seed=0, progress=False
        ),
        "nuts": mz.fit(
            model,
            x,
            y,
            method="nuts",
            num_samples=30,
            num_warmup=30,
            num_chains=2,
            max_tree_depth=4,
            seed=0,
            progress=False,
        ),
    }
    posts["map"].info["fit_seconds"] = 1.25
    path = mz.report(
        posts,
        xt,
        yt,
        path=tmp_path_factory.mktemp("rep") / "sub" / "r.html",
        title="sine <test>",
        num_samples=100,
        khat_samples=200,
    )
    return path, path.read_text(encoding="utf-8")


def test_report_is_self_contained(regression_report):
    path, text = regression_report
    assert path.exists() and path.name == "r.html"
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<script" not in text.lower()
    assert not re.search(r"(src|href)=\"(?!data:)", text), "external resource referenced"
    assert "http://" not in text and "https://" not in text
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(imgs) == text.count("<img") >= 6
    assert all(len(b) > 1000 for b in imgs)
    assert "sine &lt;test&gt;" in text  # title escaped


def test_report_reads_top_to_bottom(regression_report):
    _, text = regression_report
    heads = [
        "1. What was fitted",
        "2. Did inference work?",
        "3. Predictive quality",
        "4. Calibration",
        "5. Predictive checks",
        "6. The functions the prior and posterior induce",
    ]
    pos = [text.index(h) for h in heads]
    assert pos == sorted(pos)
    assert "1.2 s" in text  # recorded fit time
    for col in ("RMSE", "NLL", "90% interval coverage"):
        assert col in text
    assert "Comparison by PSIS-LOO" in text and "elpd_loo" in text
    assert re.search(r"Not in the LOO table.*map", text)
    assert "Posterior predictive over x" in text  # 1-D inputs: mean and bands over a grid
    assert "permut" in text  # weight-space R-hat caveat


def test_report_flags_an_unconverged_optimizer(regression_report):
    _, text = regression_report
    # 150 steps from a prior draw: the loss is still falling
    assert re.search(
        r'class="warn"><span class="badge-warn">[^<]*</span> <b>loss not converged', text
    )
    assert "problem(s) found" in text


def test_report_opens_in_headless_chromium(regression_report, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip(
            "chromium is not installed (make test installs Debian's chromium when apt works)"
        )
    _, text = regression_report
    probe = """<script>window.addEventListener("load", () => {
      const imgs = Array.from(document.images);
      const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
      const p = document.createElement("pre"); p.id = "imgcheck";
      p.textContent = "images=" + imgs.length + " rendered=" + ok; document.body.appendChild(p);
    });</script>"""
    page = tmp_path / "probe.html"  # the report itself stays script-free; probe a copy
    page.write_text(text.replace("</body>", probe + "</body>"), encoding="utf-8")
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.as_uri(),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    m = re.search(r"images=(\d+) rendered=(\d+)", out.stdout)
    assert m, out.stderr[-2000:]
    n, ok = int(m.group(1)), int(m.group(2))
    assert n == text.count("<img") and ok == n


def test_classification_report(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 2, generator=g)
    y = ((x[:, 0] * x[:, 1]) > 0).long()
    model = mz.models.mlp(2, hidden=[6], likelihood="categorical", out_features=2)
    posts = {
        m: mz.fit(model, x[:60], y[:60], method=m, steps=100, seed=0, progress=False)
        for m in ("map", "svi-meanfield")
    }
    text = mz.report(
        posts, x[60:], y[60:], path=tmp_path / "c.html", num_samples=50, khat_samples=100
    ).read_text()
    for s in ("accuracy", "ECE", "Brier", "Reliability diagrams", "probability of class 0"):
        assert s in text
    assert "90% interval coverage" not in text


def test_function_space_section_uses_the_functions_module(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    x, y, xt, yt = _sine()
    post = mz.fit(mz.models.mlp(1, hidden=[4]), x, y, method="map", steps=30, progress=False)
    seen = {}

    def fake(posts, x_test):
        seen["args"] = (posts, x_test)
        fig = Figure()
        fig.subplots().plot([0, 1], [1, 0])
        return {"prior and posterior functions": fig}

    monkeypatch.setattr(functions, "function_space_figures", fake, raising=False)
    text = mz.report(post, xt, yt, path=tmp_path / "a.html").read_text()
    assert "<h3>prior and posterior functions</h3>" in text
    assert list(seen["args"][0]) == ["map"] and seen["args"][1].shape == xt.shape
    monkeypatch.delattr(functions, "function_space_figures", raising=False)
    text = mz.report(post, xt, yt, path=tmp_path / "b.html").read_text()
    assert "not available in this build" in text


def test_bad_input(tmp_path):
    x, y, xt, yt = _sine()
    post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="map", steps=5, progress=False)
    with pytest.raises(mz.DataError, match="posts"):
        mz.report({}, xt, yt, path=tmp_path / "r.html")
    with pytest.raises(mz.DataError, match="posts"):
        mz.report({"a": "nope"}, xt, yt, path=tmp_path / "r.html")
    with pytest.raises(mz.DataError, match="x_test"):
        mz.report(post, torch.randn(5, 3), yt[:5], path=tmp_path / "r.html")
    with pytest.raises(mz.DataError):
        mz.report(post, xt, yt[:3], path=tmp_path / "r.html")
    clf = mz.fit(
        mz.models.mlp(1, hidden=[], likelihood="bernoulli"),
        x,
        (y > 0).long(),
        method="map",
        steps=5,
        progress=False,
    )
    with pytest.raises(mz.DataError, match="tasks"):
        mz.report({"a": post, "b": clf}, xt, yt, path=tmp_path / "r.html")


def funnel(x, y=None):
    """Neal's funnel, centred (no reparameterization); y does not depend on the latents."""
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("z", dist.Normal(0.0, torch.exp(v / 2)).expand([9]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


@pytest.mark.statistical
def test_report_flags_divergences_on_the_funnel(tmp_path, float64):
    """Divergences for every seed: no warmup and a step 20 times the funnel's widest scale
    make every trajectory's energy error explode (adapted NUTS on the funnel diverges only in
    some runs: see tests/test_nuts_kernel.py::test_funnel_diverges_and_depth_is_capped)."""
    g = torch.Generator().manual_seed(rseed())
    x, y = torch.zeros(8, 1), torch.randn(8, generator=g)
    post = mz.fit(
        funnel,
        x,
        y,
        method="nuts",
        num_samples=100,
        num_warmup=0,
        num_chains=2,
        step_size=60.0,
        max_tree_depth=5,
        seed=rseed(),
        progress=False,
    )
    n_div = int(post.info["sample_stats"]["diverging"].sum())
    assert n_div > 100
    text = mz.report(
        {"funnel": post}, x[:4], y[:4], path=tmp_path / "f.html", khat_samples=100
    ).read_text()
    assert re.search(rf'class="warn">.*?<b>divergences</b>: {n_div} of 200 draws', text)
    assert "plain Pyro model function <code>funnel</code>" in text
    assert "problem(s) found" in text


# ---- every model the fit accepts gets a report (issue 13 cases) ---------------------------
def test_report_multi_output_regression_has_metrics_per_target(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, generator=g)
    y = torch.stack([x[:, 0], 3.0 * x[:, 1]], 1) + 0.1 * torch.randn(60, 2, generator=g)
    model = mz.models.mlp(2, hidden=[], out_features=2, likelihood="gaussian")
    post = mz.fit(model, x[:40], y[:40], method="svi-meanfield", steps=200, seed=0, progress=False)
    text = mz.report(
        {"vi": post}, x[40:], y[40:], path=tmp_path / "m.html", num_samples=50, khat_samples=100
    ).read_text()
    quality = text[text.index("3. Predictive quality") : text.index("4. Calibration")]
    rows = re.findall(r"<tr>\s*<td>vi</td>\s*<td>([^<]+)</td>", quality)
    assert rows == ["y[0]", "y[1]", "all"]
    table = mz.evaluate({"vi": post}, x[40:], y[40:], num_samples=50)
    # target 1 has three times the scale of target 0: its RMSE is not target 0's
    assert table.loc[("vi", "y[1]"), "rmse"] != table.loc[("vi", "y[0]"), "rmse"]
    assert "all targets pooled" in text


def test_report_accepts_the_one_hot_format_a_model_was_fitted_with(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, generator=g)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    y = torch.nn.functional.one_hot(labels, 3).float()

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.OneHotCategorical(logits=x @ w), obs=y)

    post = mz.fit(model, x, y, method="map", steps=200, seed=0, progress=False)
    a = mz.report({"map": post}, x, y, path=tmp_path / "a.html").read_text()
    b = mz.report({"map": post}, x, labels, path=tmp_path / "b.html").read_text()
    acc = float((post.predict(x).probs.argmax(-1) == labels).double().mean())
    for text in (a, b):
        assert "accuracy" in text and f"{acc:.3f}" in text
        assert "OneHotCategorical, as written in the model function" in text


def test_report_with_infinite_predictive_variance_keeps_what_is_defined(tmp_path):
    """Student-t noise with df 1.5: the mean is defined, the variance is not; intervals,
    coverage and NLL come from the predictive mixture and stay."""

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.StudentT(1.5, x @ w, 0.3), obs=y)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 1, generator=g)
    y = x[:, 0] + 0.3 * torch.distributions.StudentT(1.5).sample((50,))
    post = mz.fit(model, x[:35], y[:35], method="svi-meanfield", steps=300, progress=False)
    text = mz.report(
        {"t": post}, x[35:], y[35:], path=tmp_path / "t.html", num_samples=50, khat_samples=100
    ).read_text()
    assert "variance is infinite" in text
    quality = text[text.index("3. Predictive quality") :]
    row = re.search(r"<tr>\s*<td>t</td>(.*?)</tr>", quality, flags=re.S).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert len(cells) == 6 and all(c not in ("&ndash;", "nan", "inf") for c in cells), cells
    assert "Posterior predictive over x" in text  # 1-D: the band figure from quantiles
    assert "StudentT (df 1.5)" in text


def test_report_states_the_likelihood_and_the_units(tmp_path):
    x, y, xt, yt = _sine()
    m1 = mz.models.mlp(1, hidden=[4], likelihood=mz.likelihoods.Gaussian(noise=0.2))
    m2 = mz.models.mlp(1, hidden=[4])
    a = mz.fit(m1, x, y, method="map", steps=30, progress=False)
    b = mz.fit(m2, x, y, method="map", steps=30, progress=False)
    one = mz.report({"a": a}, xt, yt, path=tmp_path / "1.html", y_loc=5.0, y_scale=2.0).read_text()
    assert "Likelihood</b> (every fit): Gaussian noise, SD fixed at 0.2" in one
    assert "0.4 in the target" in one and "target&#x27;s units" in one
    two = mz.report({"a": a, "b": b}, xt, yt, path=tmp_path / "2.html").read_text()
    assert "The fits use different likelihoods" in two and "SD learned" in two
