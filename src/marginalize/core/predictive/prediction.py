"""The result of ``predict``: posterior predictive summaries at some inputs.

Examples
--------
>>> import torch
>>> from marginalize.core.predictive import entropy
>>> p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
>>> pred = Prediction("classification", p, 10, probs=p, entropy=entropy(p),
...                   expected_entropy_fn=lambda: entropy(p))
>>> pred.mutual_info
tensor([0., 0.])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from marginalize._validation import check_probability
from marginalize.core.predictive.mixture import JoinedMixture, PredictiveMixture
from marginalize.errors import DataError, OptionError

__all__ = ["Prediction"]


@dataclass
class Prediction:
    """Posterior predictive summaries at some inputs.

    Regression: ``mean``, ``std`` (total), ``epistemic`` (std of the per-draw means) and
    ``aleatoric`` (root mean per-draw noise variance), with
    ``std**2 == epistemic**2 + aleatoric**2``. Where a draw's predictive mean or variance does
    not exist (heavy tails: a Student-t with ``df <= 1`` or ``df <= 2``), ``predict`` warns
    (:class:`~marginalize.core.predictive.MomentWarning`), names them in ``missing_moments``,
    says what it reported instead in ``notes``, and reports the median for that draw's mean
    and, for every draw, the half-width of the central 68.27% interval (the standard deviation
    for a normal) in place of the noise standard deviation; quantiles, ``log_predictive`` and
    predictive draws are exact as always.

    Classification: ``probs`` (mean class probabilities, also ``mean``), ``entropy`` of the
    mean (total uncertainty), ``expected_entropy`` (aleatoric) and ``mutual_info``
    (``entropy - expected_entropy``, epistemic; the BALD score).

    A closed-form predictive (Laplace's GLM predictive with ``link_approx="probit"``) computes
    ``expected_entropy`` and ``mutual_info`` on first access (they need draws; the
    probabilities do not).

    Regression also gives the quantiles of the posterior predictive itself, the equal-weight
    mixture over draws ``p(y | x, D) = (1/S) sum_s p(y | x, w_s)`` (not a Gaussian with the
    predictive mean and std): :meth:`quantile`, :meth:`interval` and :meth:`cdf` (PIT values).
    They are defined where the std is not (e.g. Student-t noise with ``df <= 2``).

    Examples
    --------
    >>> import torch, marginalize as mz
    >>> x = torch.linspace(-1, 1, 30)[:, None]; y = x[:, 0] + 0.1 * torch.randn(30)
    >>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="svi-meanfield", steps=200,
    ...               progress=False)
    >>> pred = post.predict(x[:4], num_samples=100)
    >>> lo, hi = pred.interval(0.9)
    >>> bool((lo < pred.quantile(0.5)).all() and (pred.quantile(0.5) < hi).all())
    True
    >>> pred.quantile([0.05, 0.5, 0.95]).shape
    torch.Size([3, 4])
    """

    task: str
    mean: torch.Tensor
    num_draws: int
    std: torch.Tensor | None = None
    epistemic: torch.Tensor | None = None
    aleatoric: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    #: per-draw outputs ``(chain, draw, N, ...)`` when asked for (``return_draws=True``)
    draws: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    #: what was reported in place of moments that do not exist (empty when none)
    notes: tuple[str, ...] = ()
    #: the moments (``"mean"``, ``"variance"``) that do not exist for some draw (heavy tails)
    missing_moments: tuple[str, ...] = ()
    #: computes ``expected_entropy`` when it is first read (classification)
    expected_entropy_fn: Callable[[], torch.Tensor] | None = field(
        default=None, repr=False, compare=False
    )
    #: builds the predictive mixture (the same draws) for quantiles; set by ``predict``
    mixture_fn: Callable[[], PredictiveMixture | JoinedMixture] | None = field(
        default=None, repr=False, compare=False
    )

    @cached_property
    def expected_entropy(self) -> torch.Tensor | None:
        """Classification: the mean over draws of each draw's predictive entropy (aleatoric);
        computed on first read where it needs draws (closed forms)."""
        return None if self.expected_entropy_fn is None else self.expected_entropy_fn()

    @cached_property
    def mutual_info(self) -> torch.Tensor | None:
        """Classification: ``entropy - expected_entropy`` (epistemic; the BALD score)."""
        ee = self.expected_entropy
        return None if ee is None else (self.entropy - ee).clamp_min(0)

    @cached_property
    def _mixture(self) -> PredictiveMixture | JoinedMixture:
        if self.mixture_fn is None:
            raise OptionError("this Prediction was not made by Predictive.predict")
        return self.mixture_fn()

    def mixture(self) -> PredictiveMixture | JoinedMixture:
        """The predictive mixture over the draws (built on first use, then kept).

        Holds the observation distribution of every draw at every input (memory of the order
        of ``num_draws x N`` parameters of the family).
        """
        if self.task != "regression":
            raise OptionError(
                "quantiles and intervals are for regression; for classification use probs"
            )
        return self._mixture

    def quantile(self, q) -> torch.Tensor:
        """Quantile(s) ``q`` in (0, 1) of the posterior predictive of y at each input.

        Shape ``mean.shape`` for one ``q``, ``(len(q), *mean.shape)`` for a sequence. Exact
        (bisection on the mixture CDF) for families with a CDF; Monte Carlo otherwise.

        Raises
        ------
        OptionError
            For classification, or ``q`` outside (0, 1).
        """
        mix = self.mixture()
        try:
            return mix.quantile(q).to(self.mean.dtype)
        except ValueError as e:
            raise OptionError(str(e)) from None

    def interval(self, level: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
        """Central posterior predictive interval ``(lower, upper)`` holding ``level`` of the
        predictive mass at each input (quantiles ``(1 -+ level) / 2``)."""
        level = check_probability("level", level)
        q = self.quantile([(1 - level) / 2, (1 + level) / 2])
        return q[0], q[1]

    def cdf(self, y) -> torch.Tensor:
        """The predictive CDF at observed ``y`` (PIT values, uniform when calibrated)."""
        mix = self.mixture()
        t = torch.as_tensor(y, device=self.mean.device)
        if t.shape != self.mean.shape:
            raise DataError(f"y: expected shape {tuple(self.mean.shape)}, got {tuple(t.shape)}")
        return mix.cdf(t).to(self.mean.dtype)

    def __repr__(self) -> str:
        shape = tuple(self.mean.shape)
        return f"Prediction(task={self.task!r}, shape={shape}, num_draws={self.num_draws})"
