"""``mz.load_run``: a command-line run reused from Python on new rows of a table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import marginalize as mz
from marginalize.cli import main


def _table(n=160, seed=0):
    g = np.random.default_rng(seed)
    size = g.uniform(50, 150, n)
    colour = g.choice(["red", "blue", "green"], n)
    # a target in its own units (thousands), linear in the size, shifted by the colour
    price = 1000 + 20 * size + np.where(colour == "red", 300.0, 0.0) + g.normal(0, 20, n)
    return pd.DataFrame({"size": size, "colour": colour, "price": price})


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    _table().to_csv(d / "houses.csv", index=False)
    rc = main(
        [
            "fit", "--data", str(d / "houses.csv"), "--target", "price", "--model", "linear",
            "--method", "map", "--save", str(d / "fits"), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    return d / "fits"


def test_load_run_predicts_new_rows_in_the_target_units(saved_run):
    """The saved encoding and standardization are applied to a new table (its columns in
    another order, one colour only): predictions in the target's units follow the truth."""
    run = mz.load_run(saved_run)
    new = pd.DataFrame({"colour": ["red", "blue", "green"], "size": [100.0, 100.0, 60.0]})
    truth = np.array([1000 + 2000 + 300, 1000 + 2000, 1000 + 1200])
    got = run.predict(new)
    assert list(got.index) == list(new.index) and got.name == "price"
    assert np.abs(got.to_numpy() - truth).max() < 60  # noise SD 20, 128 training rows
    band = run.predict_interval(new, 0.9)
    assert (band["lower"] < band["mean"]).all() and (band["mean"] < band["upper"]).all()
    assert np.allclose(band["mean"], got, rtol=1e-6)
    # the same numbers by hand: the encoding, the fit and the target's scale
    x = torch.as_tensor(run.encoding.transform(new), dtype=run["map"].dtype)
    mean = run["map"].predict(x).mean.double().numpy()
    assert np.allclose(run.y_mean + run.y_std * mean, got.to_numpy(), rtol=1e-6)


def test_load_run_names_what_is_wrong(saved_run, tmp_path):
    run = mz.load_run(saved_run)
    with pytest.raises(mz.OptionError, match="did you mean 'map'"):
        run.predict(pd.DataFrame({"size": [1.0], "colour": ["red"]}), method="mapp")
    with pytest.raises(mz.OptionError, match="predict_proba: for classification"):
        run.predict_proba(pd.DataFrame({"size": [1.0], "colour": ["red"]}))
    with pytest.raises(mz.DataError, match="categories not seen in training: \\['purple'\\]"):
        run.predict(pd.DataFrame({"size": [1.0], "colour": ["purple"]}))
    with pytest.raises(mz.DataError, match="no column.*'colour'"):
        run.predict(pd.DataFrame({"size": [1.0]}))
    with pytest.raises(FileNotFoundError, match="run.json"):
        mz.load_run(tmp_path)
