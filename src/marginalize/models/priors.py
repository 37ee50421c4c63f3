"""Weight priors for the builders' models.

A prior is applied per layer: it draws the layer's weight and bias as ``pyro.sample`` sites
(and any hyperparameters it has as sites of their own) and can evaluate the same log density
without Pyro, on weights with any number of leading batch (draw) dimensions.

Examples
--------
>>> import marginalize as mz
>>> mz.priors.Normal(scale=1.0)
Normal(scale=1.0)
>>> mz.priors.ScaledNormal(gain=2.0).scale_for(fan_in=4)
1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch

from marginalize._validation import plain_number
from marginalize.errors import ModelError

__all__ = ["Prior", "Normal", "ScaledNormal", "Hierarchical", "resolve_priors", "prior_from_config"]


def _trailing(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append ``ndim`` singleton dims so a per-draw scale broadcasts over a weight's event dims."""
    return scale.reshape(scale.shape + (1,) * ndim)


class Prior:
    """Base class: a prior over one layer's weight and bias."""

    kind: str = "prior"

    def sample_layer(
        self,
        layer: str,
        weight_shape: tuple[int, ...],
        bias_shape: tuple[int, ...] | None,
        fan_in: int,
        like: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw ``{layer}.weight`` (and ``{layer}.bias``) as Pyro sample sites."""
        scale = self._scale(layer, fan_in, like)
        w = pyro.sample(
            f"{layer}.weight",
            dist.Normal(like.new_zeros(()), scale).expand(weight_shape).to_event(len(weight_shape)),
        )
        b = None
        if bias_shape is not None:
            b = pyro.sample(
                f"{layer}.bias",
                dist.Normal(like.new_zeros(()), scale).expand(bias_shape).to_event(len(bias_shape)),
            )
        return w, b

    def log_prob_layer(
        self,
        layer: str,
        params: Mapping[str, torch.Tensor],
        fan_in: int,
        weight_ndim: int,
        has_bias: bool,
    ) -> torch.Tensor:
        """Log density of the layer's sites in ``params`` (leading batch dims kept)."""
        w = params[f"{layer}.weight"]
        batch_ndim = w.dim() - weight_ndim
        lp, scale = self._hyper_log_prob(layer, params, fan_in, w, batch_ndim)
        scale_w = _trailing(scale, weight_ndim) if scale.dim() else scale
        lp = lp + dist.Normal(0.0, scale_w).log_prob(w).flatten(batch_ndim).sum(-1)
        if has_bias:
            b = params[f"{layer}.bias"]
            scale_b = _trailing(scale, 1) if scale.dim() else scale
            lp = lp + dist.Normal(0.0, scale_b).log_prob(b).sum(-1)
        return lp

    # hooks -------------------------------------------------------------------------------
    def _scale(self, layer: str, fan_in: int, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _hyper_log_prob(self, layer, params, fan_in, w, batch_ndim):
        return w.new_zeros(w.shape[:batch_ndim]), w.new_tensor(self._fixed_scale(fan_in))

    def _fixed_scale(self, fan_in: int) -> float:
        raise NotImplementedError

    def hyper_sites(self, layer: str) -> list[str]:
        """Names of the hyperparameter sites this prior adds for ``layer``."""
        return []

    def config(self) -> dict[str, Any]:
        """A JSON-serializable description (``prior_from_config`` rebuilds the prior)."""
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in asdict(self).items())  # type: ignore[call-overload]
        return f"{type(self).__name__}({args})"


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(repr=False)
class Normal(Prior):
    """Independent ``N(loc=0, scale^2)`` on every weight and bias.

    Parameters
    ----------
    scale : float
        Standard deviation (the ``alpha`` of Wilson & Izmailov 2020, section 5).
    """

    scale: float = 1.0
    kind = "normal"

    def __post_init__(self) -> None:
        self.scale = plain_number(self.scale)
        if not (_is_real(self.scale) and self.scale > 0 and math.isfinite(self.scale)):
            raise ModelError(
                f"Normal prior: scale must be a positive finite number, got {self.scale!r}"
            )

    def _fixed_scale(self, fan_in: int) -> float:
        return float(self.scale)

    def _scale(self, layer, fan_in, like):
        return like.new_tensor(self._fixed_scale(fan_in))


@dataclass(repr=False)
class ScaledNormal(Prior):
    """Fan-in scaled Normal: ``scale = gain / sqrt(fan_in)`` (He/LeCun-style prior).

    Keeps the prior variance of pre-activations independent of layer width.

    Examples
    --------
    >>> ScaledNormal(gain=1.0).scale_for(fan_in=100)
    0.1
    """

    gain: float = 1.0
    kind = "scaled_normal"

    def __post_init__(self) -> None:
        self.gain = plain_number(self.gain)
        if not (_is_real(self.gain) and self.gain > 0 and math.isfinite(self.gain)):
            raise ModelError(
                f"ScaledNormal prior: gain must be positive and finite, got {self.gain!r}"
            )

    def scale_for(self, fan_in: int) -> float:
        return float(self.gain) / math.sqrt(fan_in)

    _fixed_scale = scale_for

    def _scale(self, layer, fan_in, like):
        return like.new_tensor(self.scale_for(fan_in))


_HYPERPRIORS = {
    "half_normal": lambda s: dist.HalfNormal(s),
    "half_cauchy": lambda s: dist.HalfCauchy(s),
    "log_normal": lambda s: dist.LogNormal(torch.zeros_like(s), s),
}


@dataclass(repr=False)
class Hierarchical(Prior):
    """Per-layer scale with its own hyperprior: ``s_l ~ H(hyperscale)``, ``w ~ N(0, (s_l c_l)^2)``.

    ``c_l`` is ``1/sqrt(fan_in)`` when ``fan_in_scaled`` (the default), else 1. The scale is a
    latent site ``{layer}.scale`` shared by the layer's weight and bias.

    Parameters
    ----------
    hyperprior : {"half_normal", "half_cauchy", "log_normal"}
    hyperscale : float
        Scale of the hyperprior.
    fan_in_scaled : bool
    """

    hyperprior: str = "half_normal"
    hyperscale: float = 1.0
    fan_in_scaled: bool = True
    kind = "hierarchical"

    def __post_init__(self) -> None:
        self.hyperscale = plain_number(self.hyperscale)
        self.fan_in_scaled = plain_number(self.fan_in_scaled)
        if not isinstance(self.fan_in_scaled, bool):
            raise ModelError(
                "Hierarchical prior: fan_in_scaled must be True or False, got "
                f"{self.fan_in_scaled!r}"
            )
        if self.hyperprior not in _HYPERPRIORS:
            raise ModelError(
                f"Hierarchical prior: unknown hyperprior {self.hyperprior!r}; "
                f"known: {sorted(_HYPERPRIORS)}"
            )
        if not (
            _is_real(self.hyperscale) and self.hyperscale > 0 and math.isfinite(self.hyperscale)
        ):
            raise ModelError(
                f"Hierarchical prior: hyperscale must be positive, got {self.hyperscale!r}"
            )

    def _hyper(self, like: torch.Tensor):
        return _HYPERPRIORS[self.hyperprior](like.new_tensor(float(self.hyperscale)))

    def _c(self, fan_in: int) -> float:
        return 1.0 / math.sqrt(fan_in) if self.fan_in_scaled else 1.0

    def hyper_sites(self, layer: str) -> list[str]:
        return [f"{layer}.scale"]

    def _scale(self, layer, fan_in, like):
        s = pyro.sample(f"{layer}.scale", self._hyper(like))
        return s * self._c(fan_in)

    def _hyper_log_prob(self, layer, params, fan_in, w, batch_ndim):
        s = params[f"{layer}.scale"]
        return self._hyper(w).log_prob(s), s * self._c(fan_in)


_KINDS = {cls.kind: cls for cls in (Normal, ScaledNormal, Hierarchical)}


def prior_from_config(cfg: Mapping[str, Any]) -> Prior:
    """Rebuild a prior from :meth:`Prior.config`."""
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind not in _KINDS:
        raise ModelError(f"unknown prior kind {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind](**cfg)


def resolve_priors(
    prior: Prior | Mapping[str, Prior] | None, layers: list[str]
) -> dict[str, Prior]:
    """Map every layer name to its prior.

    ``prior`` is one prior for all layers, or a mapping from layer name to prior with an
    optional ``"default"`` entry for the layers it does not name (default: ``Normal(1.0)``).
    """
    if prior is None:
        prior = Normal(1.0)
    if isinstance(prior, Prior):
        return {name: prior for name in layers}
    if not isinstance(prior, Mapping):
        raise TypeError(
            f"prior must be a Prior or a mapping of layer name to Prior, got {type(prior)}"
        )
    unknown = set(prior) - set(layers) - {"default"}
    if unknown:
        raise ModelError(
            f"prior names unknown layers {sorted(unknown)}; layers are {layers} (or 'default')"
        )
    default = prior.get("default", Normal(1.0))
    out = {name: prior.get(name, default) for name in layers}
    for name, p in out.items():
        if not isinstance(p, Prior):
            raise TypeError(f"prior for layer {name!r} must be a Prior, got {type(p)}")
    return out
