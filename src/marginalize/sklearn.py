"""scikit-learn estimators: a Bayesian MLP fitted by any marginalize method, as a regressor or
a classifier that works in ``Pipeline``, ``GridSearchCV`` and ``cross_val_score``.

``BNNRegressor`` and ``BNNClassifier`` build ``mz.models.mlp`` on the data they are given,
standardize the inputs (and a regression target) with the training rows' mean and SD, fit it
with ``mz.fit(method=...)`` and predict with the posterior predictive: ``predict`` (the
predictive mean, or the most probable class), ``predict_proba``, ``predict(X,
return_std=True)`` and ``predict_interval`` in the target's units. The fitted
:class:`marginalize.Posterior` is ``posterior_`` (ArviZ, the report, ...).

They follow scikit-learn's estimator contract (``get_params`` / ``set_params`` / ``clone``,
input validation, ``n_features_in_``, ``feature_names_in_``, ``classes_``) and pass the checks
of ``sklearn.utils.estimator_checks`` (run by the test suite; the ones that cannot apply are
listed, with the reason, in :data:`EXPECTED_FAILED_CHECKS`).

Examples
--------
>>> import numpy as np
>>> from sklearn.model_selection import cross_val_score
>>> from marginalize.sklearn import BNNRegressor
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(80, 3)); y = X[:, 0] - 2 * X[:, 1] + 0.1 * rng.normal(size=80)
>>> reg = BNNRegressor(method="map", hidden=(8,), options={"steps": 300})
>>> mean, std = reg.fit(X, y).predict(X[:2], return_std=True)
>>> mean.shape, std.shape
((2,), (2,))
>>> bool(cross_val_score(reg, X, y, cv=3).mean() > 0.9)
True
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_random_state, validate_data

__all__ = ["BNNRegressor", "BNNClassifier", "EXPECTED_FAILED_CHECKS"]

#: checks of ``sklearn.utils.estimator_checks`` that do not apply, with the reason (passed as
#: ``expected_failed_checks`` to ``check_estimator`` / ``parametrize_with_checks``). Empty: every
#: check scikit-learn runs on these estimators passes; those on ``sample_weight`` are not run,
#: since ``fit`` takes none (the likelihood weighs every row once).
EXPECTED_FAILED_CHECKS: dict[str, str] = {}


def _seed(random_state) -> int:
    """The fit's seed: an int as given; None or a RandomState draws one (scikit-learn's
    convention: None is not reproducible)."""
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        return int(random_state) % 2**32
    return int(check_random_state(random_state).randint(0, 2**31 - 1))


class _BNN(BaseEstimator):
    """What the regressor and the classifier share: the network, the method and the fit."""

    def __init__(
        self,
        method: str = "map",
        hidden=(50,),
        *,
        activation: str = "relu",
        prior_gain: float = 1.0,
        options: Mapping | None = None,
        num_samples: int = 200,
        standardize: bool = True,
        random_state=0,
        device=None,
        progress: bool = False,
    ):
        self.method = method
        self.hidden = hidden
        self.activation = activation
        self.prior_gain = prior_gain
        self.options = options
        self.num_samples = num_samples
        self.standardize = standardize
        self.random_state = random_state
        self.device = device
        self.progress = progress

    # ---- scikit-learn's contract ----------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        tags.input_tags.allow_nan = False
        return tags

    # ---- shared steps ---------------------------------------------------------------------
    def _check_params(self) -> list[int]:
        from marginalize.errors import OptionError

        hidden = [self.hidden] if isinstance(self.hidden, numbers.Integral) else self.hidden
        try:
            widths = [int(h) for h in hidden]
        except (TypeError, ValueError):
            raise OptionError(
                f"hidden: expected a sequence of layer widths, e.g. (50,), got {self.hidden!r}"
            ) from None
        if any(w < 1 for w in widths) or any(w != h for w, h in zip(widths, hidden, strict=True)):
            raise OptionError(f"hidden: widths must be positive integers, got {self.hidden!r}")
        if self.options is not None and not isinstance(self.options, Mapping):
            raise OptionError(
                f"options: expected a mapping of the method's options (e.g. {{'steps': 2000}}), "
                f"got {type(self.options).__name__}"
            )
        if (
            isinstance(self.num_samples, bool)
            or not isinstance(self.num_samples, numbers.Integral)
            or self.num_samples < 1
        ):
            raise OptionError(f"num_samples: expected an integer >= 1, got {self.num_samples!r}")
        return widths

    def _inputs(self, X, reset: bool) -> torch.Tensor:
        X = validate_data(self, X, reset=reset, dtype=np.float64, ensure_min_samples=1)
        return self._to_model(X)

    def _to_model(self, X: np.ndarray) -> torch.Tensor:
        x = np.array(X, dtype=np.float64)  # a copy: read-only or memory-mapped arrays are fine
        if self.standardize:
            x = (x - self.x_mean_) / self.x_scale_
        return torch.as_tensor(x, dtype=torch.get_default_dtype())

    def _fit(self, X: np.ndarray, y: np.ndarray, out: int, likelihood):
        import marginalize as mz

        widths = self._check_params()
        X = np.array(X, dtype=np.float64)
        if self.standardize:
            sd = X.std(0)
            self.x_mean_, self.x_scale_ = X.mean(0), np.where(sd > 0, sd, 1.0)
        else:
            self.x_mean_, self.x_scale_ = np.zeros(X.shape[1]), np.ones(X.shape[1])
        model = mz.models.mlp(
            X.shape[1],
            widths,
            out,
            likelihood=likelihood,
            prior=mz.priors.ScaledNormal(gain=self.prior_gain),
            activation=self.activation,
        )
        self.posterior_ = mz.fit(
            model,
            self._to_model(X),
            y,
            method=self.method,
            seed=_seed(self.random_state),
            device=self.device,
            progress=self.progress,
            **dict(self.options or {}),
        )
        return self

    def _predictive(self, X):
        check_is_fitted(self, "posterior_")
        x = self._inputs(X, reset=False)
        return self.posterior_.predict(
            x.to(self.posterior_.device, self.posterior_.dtype),
            num_samples=self.num_samples,
            seed=0,
        )


class BNNRegressor(RegressorMixin, _BNN):
    """A Bayesian MLP regressor fitted by any marginalize method (``mz.methods()``).

    Parameters
    ----------
    method : str
        The inference method (``"map"``, ``"svi-meanfield"``, ``"laplace"``, ``"ensemble"``,
        ``"nuts"``, ...).
    hidden : sequence of int
        Hidden layer widths (``()``: Bayesian linear regression).
    activation : str
        ``"relu"``, ``"tanh"``, ... (see :func:`marginalize.models.mlp`).
    prior_gain : float
        Weight prior ``N(0, gain^2 / fan_in)`` (:class:`marginalize.priors.ScaledNormal`).
    noise : float or None
        Gaussian noise SD on the standardized scale; None learns it (a HalfNormal(1) prior).
    options : mapping, optional
        The method's options (``{"steps": 3000}``, ``{"num_samples": 300}``, ...).
    num_samples : int
        Posterior draws per prediction.
    standardize : bool
        Standardize the inputs and the target with the training rows' mean and SD (the
        predictions are in the target's units either way).
    random_state : int, RandomState or None
        Seeds the fit (None: a fresh seed each fit, as scikit-learn does).
    device : str, optional
        ``"cpu"`` or ``"cuda"``.
    progress : bool
        Progress bars during the fit.

    Attributes
    ----------
    posterior_ : marginalize.Posterior
        The fit, on the standardized scale.
    y_mean_, y_scale_ : float
        The target's standardization.
    n_features_in_, feature_names_in_
        As scikit-learn sets them.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import PolynomialFeatures
    >>> x = np.linspace(-2, 2, 60)[:, None]; y = x[:, 0] ** 2
    >>> pipe = make_pipeline(PolynomialFeatures(2), BNNRegressor(hidden=(), options={"steps": 500}))
    >>> round(pipe.fit(x, y).score(x, y), 2)
    1.0
    """

    def __init__(
        self,
        method: str = "map",
        hidden=(50,),
        *,
        activation: str = "relu",
        prior_gain: float = 1.0,
        noise: float | None = None,
        options: Mapping | None = None,
        num_samples: int = 200,
        standardize: bool = True,
        random_state=0,
        device=None,
        progress: bool = False,
    ):
        super().__init__(
            method,
            hidden,
            activation=activation,
            prior_gain=prior_gain,
            options=options,
            num_samples=num_samples,
            standardize=standardize,
            random_state=random_state,
            device=device,
            progress=progress,
        )
        self.noise = noise

    def fit(self, X, y):
        """Fit the network to ``X`` ``(n_samples, n_features)`` and ``y`` ``(n_samples,)``."""
        import marginalize as mz

        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True, ensure_min_samples=2)
        y = np.asarray(y, dtype=np.float64)
        if self.standardize:
            sd = float(y.std())
            self.y_mean_, self.y_scale_ = float(y.mean()), (sd if sd > 0 else 1.0)
        else:
            self.y_mean_, self.y_scale_ = 0.0, 1.0
        y_model = torch.as_tensor(
            (y - self.y_mean_) / self.y_scale_, dtype=torch.get_default_dtype()
        )
        return self._fit(X, y_model, 1, mz.likelihoods.Gaussian(noise=self.noise))

    def _units(self, t: torch.Tensor, shift: bool = True) -> np.ndarray:
        a = t.detach().cpu().double().numpy().reshape(-1)
        return a * self.y_scale_ + (self.y_mean_ if shift else 0.0)

    def predict(self, X, return_std: bool = False):
        """The predictive mean ``(n_samples,)`` in the target's units; with ``return_std``
        also the predictive standard deviation (epistemic and aleatoric)."""
        pred = self._predictive(X)
        mean = self._units(pred.mean)
        if not return_std:
            return mean
        return mean, self._units(pred.std, shift=False)

    def predict_interval(self, X, level: float = 0.9) -> np.ndarray:
        """The central ``level`` predictive interval, ``(n_samples, 2)`` (lower, upper) in the
        target's units (quantiles of the predictive mixture)."""
        lo, hi = self._predictive(X).interval(level)
        return np.stack([self._units(lo), self._units(hi)], axis=1)


class BNNClassifier(ClassifierMixin, _BNN):
    """A Bayesian MLP classifier (softmax likelihood) fitted by any marginalize method.

    Parameters are those of :class:`BNNRegressor` without ``noise``; the labels may be of any
    type scikit-learn accepts (``classes_`` holds them, sorted).

    Attributes
    ----------
    posterior_ : marginalize.Posterior
    classes_ : ndarray
        The class of each output (label ``k`` is ``classes_[k]``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(100, 2)); y = np.where(X[:, 0] > 0, "yes", "no")
    >>> clf = BNNClassifier(hidden=(8,), options={"steps": 300}).fit(X, y)
    >>> clf.classes_.tolist(), clf.predict_proba(X[:3]).shape
    (['no', 'yes'], (3, 2))
    >>> bool(clf.score(X, y) > 0.9)
    True
    """

    def fit(self, X, y):
        """Fit the network to ``X`` ``(n_samples, n_features)`` and labels ``y``."""
        X, y = validate_data(self, X, y, ensure_min_samples=2, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"y: a classifier needs at least 2 classes; got 1 class ({self.classes_[0]!r})"
            )
        y_model = torch.as_tensor(codes.reshape(-1), dtype=torch.long)
        return self._fit(X, y_model, len(self.classes_), "categorical")

    def predict_proba(self, X) -> np.ndarray:
        """The posterior predictive probability of each class, ``(n_samples, n_classes)``."""
        check_is_fitted(self, "posterior_")
        probs = self._predictive(X).probs.detach().cpu().double().numpy()
        probs = probs.reshape(-1, len(self.classes_))
        return probs / probs.sum(1, keepdims=True)

    def predict_log_proba(self, X) -> np.ndarray:
        """``log(predict_proba(X))``."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row (from ``classes_``)."""
        probs = self.predict_proba(X)
        return self.classes_[probs.argmax(1)]
