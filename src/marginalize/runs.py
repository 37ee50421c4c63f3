"""A command-line run reused from Python: ``mz.load_run(dir)`` on a ``marginalize fit --save``.

``marginalize fit --save DIR`` writes each fit as ``DIR/METHOD.pt`` and ``DIR/run.json``: how
a table became the model's inputs (the feature columns, the one-hot encoding of text and
categorical columns, the training split's standardization of inputs and target) and the
classes of a classification target. :func:`load_run` reads both and returns a :class:`Run`,
which applies that preprocessing to a new ``pandas.DataFrame`` and predicts in the target's
units (class names for classification): no re-implementation of the encoding or scaling.

:class:`TableEncoding` is the one piece of code that turns a table's feature columns into the
model's input columns, used by the command line when it fits and by :class:`Run` when it
predicts, so the two cannot disagree.

Examples
--------
>>> import pandas as pd
>>> train = pd.DataFrame({"size": [1.0, 2.0, 3.0], "color": ["red", "blue", "red"]})
>>> enc, x = TableEncoding.from_table(train)
>>> enc.feature_names, x.tolist()
(['size', 'color_blue', 'color_red'], [[1.0, 0.0, 1.0], [2.0, 1.0, 0.0], [3.0, 0.0, 1.0]])
>>> enc.transform(pd.DataFrame({"color": ["blue"], "size": [5.0]})).tolist()
[[5.0, 1.0, 0.0]]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marginalize.errors import DataError, FileFormatError, ModelError, OptionError
from marginalize.io import load
from marginalize.posterior import Posterior

__all__ = ["TableEncoding", "Run", "load_run", "RUN_FILE", "RUN_FORMAT"]

#: the file ``marginalize fit --save DIR`` writes beside the fits
RUN_FILE = "run.json"
#: ``run.json``'s ``format`` field (files written before it had none: read as version 0)
RUN_FORMAT = "marginalize-run"
RUN_VERSION = 1


def _plain(v: Any) -> Any:
    """A JSON-safe scalar (NumPy scalars as Python numbers)."""
    return v.item() if hasattr(v, "item") else v


@dataclass
class TableEncoding:
    """How a table's feature columns become the model's input columns.

    Attributes
    ----------
    columns : list of str
        The table's feature columns, in their order (the target excluded).
    categories : dict of str to list
        Text, categorical or other non-numeric columns, one-hot encoded: each column's
        categories seen in training (model input ``f"{column}_{category}"``).
    feature_names : list of str
        The model's input columns, in order.
    x_mean, x_std : list of float, optional
        The training split's standardization of the model's inputs (None: raw values).
    """

    columns: list[str]
    categories: dict[str, list] = field(default_factory=dict)
    feature_names: list[str] = field(default_factory=list)
    x_mean: list[float] | None = None
    x_std: list[float] | None = None

    @classmethod
    def from_table(cls, feats) -> tuple[TableEncoding, np.ndarray]:
        """The encoding of a DataFrame of feature columns, and its rows encoded ``(N, D)``
        (float64, not standardized): numeric and boolean columns as they are, every other
        column one-hot (``pandas.get_dummies``)."""
        import pandas as pd

        feats = feats.rename(columns=str)
        text = [
            c
            for c in feats.columns
            if not (pd.api.types.is_numeric_dtype(feats[c]) or pd.api.types.is_bool_dtype(feats[c]))
        ]
        categories = {}
        for c in text:
            col = feats[c]
            values = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else col
            categories[c] = sorted({_plain(v) for v in pd.unique(values)}, key=str)
        enc = cls(list(feats.columns), categories)
        coded = pd.get_dummies(feats, columns=text, dtype=np.float64) if text else feats
        enc.feature_names = [str(c) for c in coded.columns]
        return enc, coded.to_numpy(np.float64)

    def transform(self, df, *, standardize: bool = True) -> np.ndarray:
        """The model's inputs ``(N, D)`` for the rows of ``df`` (extra columns, such as the
        target, are ignored), standardized as in training unless ``standardize=False``.

        Raises
        ------
        DataError
            A feature column is missing, has missing values, or a category not seen in
            training (no silent all-zero encoding).
        """
        import pandas as pd

        if not isinstance(df, pd.DataFrame):
            raise DataError(
                f"expected a pandas DataFrame with the columns {self.columns}, got "
                f"{type(df).__name__}"
            )
        df = df.rename(columns=str)
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise DataError(
                f"the table has no column(s) {missing}; the fit used {self.columns} "
                f"(got {list(df.columns)[:20]})"
            )
        feats = df[self.columns]
        holes = {c: int(n) for c, n in feats.isna().sum().items() if n}
        if holes:
            raise DataError(f"missing values in {holes}; fill or drop them first")
        for c, seen in self.categories.items():
            new = sorted({str(_plain(v)) for v in feats[c].unique()} - {str(v) for v in seen})
            if new:
                raise DataError(
                    f"column {c!r} has categories not seen in training: {new[:10]} (known: "
                    f"{seen[:20]}); the model has no input for them"
                )
        if self.categories:  # one-hot as in training; columns aligned to the training ones
            cats = {
                c: pd.CategoricalDtype([str(v) for v in vals])
                for c, vals in self.categories.items()
            }
            coded = pd.get_dummies(
                feats.astype({c: str for c in cats}).astype(cats),
                columns=list(cats),
                dtype=np.float64,
            ).reindex(columns=self.feature_names, fill_value=0.0)
        else:
            coded = feats
        try:
            x = coded.to_numpy(np.float64)
        except (TypeError, ValueError) as e:
            raise DataError(
                f"the feature columns {self.columns} are not all numeric: {e}"
            ) from None
        if standardize and self.x_mean is not None:
            x = (x - np.asarray(self.x_mean)) / np.asarray(self.x_std)
        return x

    def to_dict(self) -> dict:
        return {
            "columns": self.columns,
            "categories": self.categories,
            "feature_names": self.feature_names,
            "x_mean": self.x_mean,
            "x_std": self.x_std,
        }


@dataclass
class Run:
    """The fits of one ``marginalize fit --save DIR`` run with their preprocessing.

    Attributes
    ----------
    fits : dict of str to Posterior
        Each method's posterior (``run["map"]`` is ``run.fits["map"]``).
    encoding : TableEncoding
        Feature columns, one-hot encoding and input standardization.
    target : str
    task : {"regression", "classification"}
    classes : list, optional
        Classification: the class of each label (label ``k`` is ``classes[k]``).
    y_mean, y_std : float, optional
        Regression: the training split's standardization of the target.
    method : str
        The fit used when no ``method`` is given (the first one the run fitted).
    """

    fits: dict[str, Posterior]
    encoding: TableEncoding
    target: str
    task: str
    classes: list | None = None
    y_mean: float | None = None
    y_std: float | None = None
    method: str = ""

    def __getitem__(self, method: str) -> Posterior:
        return self._post(method)

    def _post(self, method: str | None) -> Posterior:
        name = method or self.method
        if name not in self.fits:
            import difflib

            close = difflib.get_close_matches(str(name), list(self.fits), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OptionError(
                f"method: the run has no fit {name!r}{hint} (fits: {list(self.fits)})"
            )
        return self.fits[name]

    def inputs(self, df, method: str | None = None) -> torch.Tensor:
        """The model's inputs for the rows of ``df``: encoded and standardized as in training,
        a tensor of the fit's dtype and device."""
        post = self._post(method)
        x = self.encoding.transform(df)
        return torch.as_tensor(x, dtype=post.dtype, device=post.device)

    def prediction(self, df, method: str | None = None, *, num_samples=None, seed: int = 0):
        """The posterior predictive at the rows of ``df`` (:class:`marginalize.Prediction`,
        on the scale the model was fitted on)."""
        post = self._post(method)
        return post.predict(self.inputs(df, method), num_samples=num_samples, seed=seed)

    def _units(self, a) -> np.ndarray:
        a = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        if self.y_mean is None:
            return a
        return self.y_mean + self.y_std * a

    def predict(self, df, method: str | None = None, *, num_samples=None, seed: int = 0):
        """Point predictions for the rows of ``df``: the predictive mean in the target's units
        (regression) or the most probable class (classification, by name).

        Returns
        -------
        pandas.Series
            Indexed like ``df``, named after the target.
        """
        import pandas as pd

        pred = self.prediction(df, method, num_samples=num_samples, seed=seed)
        if self.task == "classification":
            labels = pred.probs.argmax(-1).cpu().numpy()
            values = [self.classes[k] for k in labels] if self.classes else labels
        else:
            values = self._units(pred.mean).reshape(len(df), -1)[:, 0]
        return pd.Series(values, index=df.index, name=self.target)

    def predict_proba(self, df, method: str | None = None, *, num_samples=None, seed: int = 0):
        """Classification: the posterior predictive probability of each class.

        Returns
        -------
        pandas.DataFrame
            One row per row of ``df``, one column per class (named by the class).
        """
        import pandas as pd

        if self.task != "classification":
            raise OptionError("predict_proba: for classification runs; use predict_interval")
        pred = self.prediction(df, method, num_samples=num_samples, seed=seed)
        probs = pred.probs.detach().cpu().double().numpy()
        cols = self.classes if self.classes else list(range(probs.shape[-1]))
        return pd.DataFrame(probs, index=df.index, columns=cols)

    def predict_interval(
        self, df, level: float = 0.9, method: str | None = None, *, num_samples=None, seed=0
    ):
        """Regression: the predictive mean, standard deviation and central ``level`` interval
        in the target's units.

        Returns
        -------
        pandas.DataFrame
            Columns ``mean``, ``std``, ``lower``, ``upper``, indexed like ``df``.
        """
        import pandas as pd

        if self.task != "regression":
            raise OptionError("predict_interval: for regression runs; use predict_proba")
        pred = self.prediction(df, method, num_samples=num_samples, seed=seed)
        lo, hi = pred.interval(level)
        scale = 1.0 if self.y_std is None else self.y_std
        n = len(df)
        return pd.DataFrame(
            {
                "mean": self._units(pred.mean).reshape(n, -1)[:, 0],
                "std": (pred.std.detach().cpu().double().numpy() * scale).reshape(n, -1)[:, 0],
                "lower": self._units(lo).reshape(n, -1)[:, 0],
                "upper": self._units(hi).reshape(n, -1)[:, 0],
            },
            index=df.index,
        )


def _read_run(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: not a readable run file ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("fits"), dict):
        raise FileFormatError(f"{path}: not a run file of `marginalize fit --save` (no 'fits')")
    if doc.get("format", RUN_FORMAT) != RUN_FORMAT or int(doc.get("version", 0)) > RUN_VERSION:
        raise FileFormatError(
            f"{path}: format {doc.get('format')!r} version {doc.get('version')!r}; this "
            f"marginalize reads {RUN_FORMAT!r} up to version {RUN_VERSION}"
        )
    return doc


def load_run(path, model: Callable | Mapping[str, Callable] | None = None, *, device=None) -> Run:
    """Load the fits and preprocessing saved by ``marginalize fit --save DIR``.

    Parameters
    ----------
    path : str or Path
        The ``--save`` folder (or its ``run.json``).
    model : callable, optional
        The model function, for a run fitted with ``--model PATH.py:FUNCTION`` whose function
        is itself the Pyro model (code is never stored; builder models need nothing).
    device : optional
        Where to put the fits (default: the CPU).

    Returns
    -------
    Run

    Raises
    ------
    FileNotFoundError
        No ``run.json`` there.
    FileFormatError
        Not a run file, or a fit file that cannot be read.
    ModelError
        A plain model function is needed (``model=``) and was not given.

    Examples
    --------
    ``marginalize fit --data houses.csv --target price --method map,nuts --save fits/``, then

    >>> run = mz.load_run("fits/")                        # doctest: +SKIP
    >>> run.predict(new_houses)                           # doctest: +SKIP
    >>> run.predict_interval(new_houses, 0.9, method="nuts")  # doctest: +SKIP
    """
    folder = Path(path)
    file = folder if folder.suffix == ".json" else folder / RUN_FILE
    folder = file.parent
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: no such file; load_run reads the folder `marginalize fit --save DIR` "
            "wrote (DIR/run.json and DIR/METHOD.pt)"
        )
    doc = _read_run(file)
    enc = doc.get("encoding")
    if isinstance(enc, dict):
        encoding = TableEncoding(
            list(enc.get("columns") or enc.get("feature_names") or []),
            dict(enc.get("categories") or {}),
            list(enc.get("feature_names") or []),
            enc.get("x_mean"),
            enc.get("x_std"),
        )
    else:  # written before the encoding was recorded: numeric feature columns only
        names = list(doc.get("feature_names") or [])
        encoding = TableEncoding(names, {}, names, doc.get("x_mean"), doc.get("x_std"))
    fits: dict[str, Posterior] = {}
    for method, rel in doc["fits"].items():
        fpath = Path(rel)
        if not fpath.is_absolute():
            here = folder / fpath.name
            fpath = here if here.is_file() else fpath
        fn = model.get(method) if isinstance(model, Mapping) else model
        try:
            fits[method] = load(fpath, model=fn, device=device)
        except ModelError as e:
            if fn is not None:
                raise
            raise ModelError(
                f"{fpath}: fitted on the model function {doc.get('model')!r}; pass it: "
                f"mz.load_run({str(path)!r}, model=FUNCTION) ({e})"
            ) from None
    return Run(
        fits,
        encoding,
        str(doc.get("target", "y")),
        str(doc.get("task", "regression")),
        doc.get("classes"),
        doc.get("y_mean"),
        doc.get("y_std"),
        next(iter(fits), ""),
    )
