"""Observation models: how the network output ``f`` becomes a distribution over ``y``.

Every likelihood works on outputs with any number of leading batch (draw) dimensions:
``f`` has shape ``(*batch, N, out_features)`` and the returned distribution has batch shape
``(*batch, N)`` (vector targets are one event).

Examples
--------
>>> import torch, marginalize as mz
>>> lik = mz.likelihoods.Categorical(num_classes=3)
>>> lik.dist(torch.zeros(5, 3), {}).probs.shape
torch.Size([5, 3])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from marginalize._validation import plain_number
from marginalize.errors import DataError, ModelError

__all__ = [
    "Likelihood",
    "Gaussian",
    "Heteroscedastic",
    "Categorical",
    "Bernoulli",
    "get_likelihood",
    "likelihood_from_config",
]


def _align(p: torch.Tensor, f_batch_ndim: int) -> torch.Tensor:
    """Reshape a per-draw scalar ``(*batch)`` to broadcast against ``(*batch, N[, D])``."""
    return p.reshape(p.shape + (1,) * f_batch_ndim)


class Likelihood:
    """Base class. ``task`` is ``"regression"`` or ``"classification"``."""

    task: str = "regression"
    kind: str = "likelihood"

    def net_outputs(self, targets: int) -> int:
        """How many network outputs this likelihood needs for ``targets`` targets/classes."""
        return targets

    def sample_params(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Draw the likelihood's own latent sites (e.g. a learned noise scale)."""
        return {}

    def log_prob_params(
        self, params: Mapping[str, torch.Tensor], like: torch.Tensor
    ) -> torch.Tensor:
        """Log density of the likelihood's own sites; ``like`` has the batch shape to return."""
        return like.new_zeros(like.shape)

    def latent_sites(self) -> list[str]:
        return []

    def dist(self, f: torch.Tensor, params: Mapping[str, torch.Tensor]) -> dist.Distribution:
        raise NotImplementedError

    def moments(
        self, f: torch.Tensor, params: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mean and variance of ``y`` (the variance broadcastable to the mean) straight from the
        network output, or ``None`` where only :meth:`dist` gives them. Prediction uses it to
        skip building a distribution per chunk of draws."""
        return None

    def check_y(self, y: torch.Tensor, targets: int) -> torch.Tensor:
        """Validate and convert targets; raise :class:`DataError` naming the problem."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def __repr__(self) -> str:
        args = {k: v for k, v in self.config().items() if k != "kind"}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def _check_real_targets(y: torch.Tensor, targets: int, name: str) -> torch.Tensor:
    if not torch.is_floating_point(y):
        y = y.to(torch.get_default_dtype())
    if targets == 1 and y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if targets == 1 and y.dim() != 1:
        raise DataError(
            f"y: a {name} likelihood with one target expects shape (N,), got {tuple(y.shape)}"
        )
    if targets > 1 and (y.dim() != 2 or y.shape[1] != targets):
        raise DataError(
            f"y: expected shape (N, {targets}) for {targets} targets, got {tuple(y.shape)}"
        )
    return y


class _RealOutput(Likelihood):
    targets_: int = 1

    def _loc(self, f: torch.Tensor, targets: int) -> torch.Tensor:
        return f[..., 0] if targets == 1 else f

    @staticmethod
    def _finish(d: dist.Distribution, f: torch.Tensor, targets: int) -> dist.Distribution:
        return d if targets == 1 else d.to_event(1)


class Gaussian(_RealOutput):
    """Homoscedastic Gaussian noise, fixed or learned.

    Parameters
    ----------
    noise : float or None
        Fixed observation noise standard deviation; ``None`` learns it as the latent site
        ``"noise"`` with prior ``HalfNormal(noise_prior_scale)``.
    noise_prior_scale : float
    """

    kind = "gaussian"

    def __init__(self, noise: float | None = None, noise_prior_scale: float = 1.0):
        noise, noise_prior_scale = plain_number(noise), plain_number(noise_prior_scale)
        if noise is not None and not (noise > 0 and math.isfinite(noise)):
            raise ModelError(f"Gaussian likelihood: noise must be positive, got {noise!r}")
        if not noise_prior_scale > 0:
            raise ModelError("Gaussian likelihood: noise_prior_scale must be positive")
        self.noise = None if noise is None else float(noise)
        self.noise_prior_scale = float(noise_prior_scale)

    def _noise_prior(self, like):
        return dist.HalfNormal(like.new_tensor(self.noise_prior_scale))

    def latent_sites(self) -> list[str]:
        return [] if self.noise is not None else ["noise"]

    def sample_params(self, like):
        if self.noise is not None:
            return {}
        return {"noise": pyro.sample("noise", self._noise_prior(like))}

    def log_prob_params(self, params, like):
        if self.noise is not None:
            return like.new_zeros(like.shape)
        return self._noise_prior(params["noise"]).log_prob(params["noise"])

    def dist(self, f, params):
        targets = f.shape[-1]
        loc = self._loc(f, targets)
        if self.noise is not None:
            scale = loc.new_tensor(self.noise)
        else:
            noise = params["noise"]
            scale = _align(noise, loc.dim() - noise.dim())
        return self._finish(dist.Normal(loc, scale), f, targets)

    def moments(self, f, params):
        loc = self._loc(f, f.shape[-1])
        if self.noise is not None:
            return loc, loc.new_tensor(self.noise**2)
        noise = params["noise"]
        return loc, _align(noise, loc.dim() - noise.dim()).square()

    def check_y(self, y, targets):
        return _check_real_targets(y, targets, "gaussian")

    def config(self):
        return {"kind": self.kind, "noise": self.noise, "noise_prior_scale": self.noise_prior_scale}


class Heteroscedastic(_RealOutput):
    """Gaussian whose mean and scale are both network outputs.

    ``scale = softplus(f2) + min_scale``.
    """

    kind = "heteroscedastic"

    def __init__(self, min_scale: float = 1e-3):
        min_scale = plain_number(min_scale)
        if (
            isinstance(min_scale, bool)
            or not isinstance(min_scale, (int, float))
            or not (0 <= min_scale < math.inf)
        ):
            raise ModelError(
                f"Heteroscedastic likelihood: min_scale must be a number >= 0, got {min_scale!r}"
            )
        self.min_scale = float(min_scale)

    def net_outputs(self, targets):
        return 2 * targets

    def dist(self, f, params):
        targets = f.shape[-1] // 2
        loc = self._loc(f[..., :targets], targets)
        scale = F.softplus(self._loc(f[..., targets:], targets)) + self.min_scale
        return self._finish(dist.Normal(loc, scale), f, targets)

    def moments(self, f, params):
        targets = f.shape[-1] // 2
        scale = F.softplus(self._loc(f[..., targets:], targets)) + self.min_scale
        return self._loc(f[..., :targets], targets), scale.square()

    def check_y(self, y, targets):
        return _check_real_targets(y, targets, "heteroscedastic")

    def config(self):
        return {"kind": self.kind, "min_scale": self.min_scale}


def _check_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    if torch.is_floating_point(y):
        if not torch.equal(y, y.round()):
            raise DataError("y: class labels must be integers, got non-integer floats")
        y = y.long()
    elif y.dtype == torch.bool:
        y = y.long()
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise DataError(f"y: class labels must have shape (N,), got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"y: labels must lie in [0, {num_classes - 1}] for {num_classes} classes, "
            f"got values in [{int(y.min())}, {int(y.max())}]"
        )
    return y.long()


class Categorical(Likelihood):
    """Softmax over ``num_classes`` logits (``num_classes`` net outputs)."""

    task = "classification"
    kind = "categorical"

    def __init__(self, num_classes: int | None = None):
        num_classes = plain_number(num_classes)
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ModelError(
                f"Categorical likelihood: num_classes must be an int >= 2, got {num_classes!r}"
            )
        self.num_classes = num_classes

    def dist(self, f, params):
        return dist.Categorical(logits=f)

    def check_y(self, y, targets):
        return _check_labels(y, targets)

    def config(self):
        return {"kind": self.kind, "num_classes": self.num_classes}


class Bernoulli(Likelihood):
    """Binary labels in {0, 1} from one logit."""

    task = "classification"
    kind = "bernoulli"

    def net_outputs(self, targets):
        return 1

    def dist(self, f, params):
        return dist.Bernoulli(logits=f[..., 0])

    def check_y(self, y, targets):
        return _check_labels(y, 2).to(torch.get_default_dtype())


_KINDS = {c.kind: c for c in (Gaussian, Heteroscedastic, Categorical, Bernoulli)}


def get_likelihood(spec: str | Likelihood) -> Likelihood:
    """A likelihood from its name (``"gaussian"``, ``"heteroscedastic"``, ``"categorical"``,
    ``"bernoulli"``) or the object itself."""
    if isinstance(spec, Likelihood):
        return spec
    if isinstance(spec, str) and spec in _KINDS:
        return _KINDS[spec]()
    raise ModelError(f"unknown likelihood {spec!r}; known: {sorted(_KINDS)} or a Likelihood object")


def likelihood_from_config(cfg: Mapping[str, Any]) -> Likelihood:
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind not in _KINDS:
        raise ModelError(f"unknown likelihood kind {kind!r}")
    return _KINDS[kind](**cfg)
