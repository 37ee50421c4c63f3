"""Builders that return Pyro BNN models: :func:`mlp` (each builder class is registered with
:func:`~marginalize.models.base.builder`).

Examples
--------
>>> import torch, pyro, marginalize as mz
>>> model = mz.models.mlp(3, hidden=[8], likelihood="gaussian")
>>> tr = pyro.poutine.trace(model).get_trace(torch.randn(5, 3))
>>> [n for n in tr.nodes if n.startswith("layer1")]
['layer1.weight', 'layer1.bias']
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from marginalize._validation import plain_ints, plain_number
from marginalize.errors import DataError, ModelError
from marginalize.models.base import BNN, LayerSpec, builder
from marginalize.models.likelihoods import Likelihood, get_likelihood
from marginalize.models.priors import Prior, resolve_priors

__all__ = ["MLP", "mlp", "ACTIVATIONS"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "gelu": F.gelu,
    "silu": F.silu,
    "softplus": F.softplus,
    "leaky_relu": F.leaky_relu,
    "identity": lambda h: h,
}

#: in-place versions, used on a layer's fresh output when no gradient is being recorded: the
#: activation then reuses that buffer, which keeps a prediction chunk's working set in cache
_INPLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "sigmoid": torch.sigmoid_,
    "elu": functools.partial(F.elu, inplace=True),
    "silu": functools.partial(F.silu, inplace=True),
    "leaky_relu": F.leaky_relu_,
    "identity": lambda h: h,
}


def dense(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``h @ w + b`` where ``w`` may carry leading draw dims: ``(N, i) x (*B, i, o) -> (*B, N, o)``.

    With one draw dim and a 3-D ``h`` this is a single ``baddbmm`` (the fastest batched form
    on the CPU); otherwise broadcasting ``matmul``.
    """
    if (
        b is not None
        and w.dim() == 3
        and w.shape[0] == 1
        and (h.dim() == 2 or (h.dim() == 3 and h.shape[0] == 1))
    ):
        # one draw (prediction at many inputs runs draw by draw): a plain 2-D addmm
        return torch.addmm(b[0], h[0] if h.dim() == 3 else h, w[0]).unsqueeze(0)
    if b is not None and w.dim() == 3 and h.dim() == 3 and h.shape[0] == w.shape[0]:
        if w.shape[1] == 1 and h.stride(0) == 0:
            # one input feature, shared by the draws: an outer product, one fused multiply-add
            return torch.addcmul(b.unsqueeze(-2), h[:1], w)
        if w.shape[2] == 1:  # one output: bmm, then the bias in place, beats baddbmm's broadcast
            return torch.bmm(h, w).add_(b.unsqueeze(-2))
        return torch.baddbmm(b.unsqueeze(-2), h, w)
    out = h @ w
    return out if b is None else out + b.unsqueeze(-2)


@builder("mlp")
class MLP(BNN):
    """Fully connected BNN ``in_features -> hidden... -> net outputs``.

    Sites: ``layer{k}.weight`` of shape ``(fan_in, fan_out)`` and ``layer{k}.bias`` for
    ``k = 1..len(hidden)+1``, plus the prior's hyper sites and the likelihood's latent sites.
    """

    builder = "mlp"

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        likelihood: Likelihood,
        priors: Mapping[str, Prior],
        activation: str = "relu",
        bias: bool = True,
    ):
        super().__init__(likelihood, priors, out_features)
        self._in_features = int(in_features)
        self.hidden = [int(h) for h in hidden]
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.bias = bool(bias)
        widths = [self._in_features, *self.hidden, likelihood.net_outputs(out_features)]
        self._specs = [
            LayerSpec(
                name=f"layer{k + 1}",
                weight_shape=(widths[k], widths[k + 1]),
                bias_shape=(widths[k + 1],) if self.bias else None,
                fan_in=widths[k],
                weight_dims=(f"layer{k + 1}_in", f"layer{k + 1}_out"),
                bias_dims=(f"layer{k + 1}_out",),
            )
            for k in range(len(widths) - 1)
        ]

    def layer_specs(self) -> list[LayerSpec]:
        return self._specs

    @property
    def layer_names(self) -> list[str]:
        return [s.name for s in self._specs]

    def check_input(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        if x.dim() == 1 and self._in_features == 1:
            x = x[:, None]
        if x.dim() != 2 or x.shape[1] != self._in_features:
            raise DataError(
                f"{name}: this MLP takes inputs of shape (N, {self._in_features}), "
                f"got {tuple(x.shape)}"
            )
        return x

    def forward(self, params, x, state=None):
        h = x
        last = len(self._specs) - 1
        act = self.act
        if not torch.is_grad_enabled():
            act = _INPLACE.get(self.activation, act)
        for k, spec in enumerate(self._specs):
            w = params[f"{spec.name}.weight"]
            b = params.get(f"{spec.name}.bias")
            if h.dim() == 2 and w.dim() == 3:  # first layer with draws: broadcast x over them
                h = h.expand(w.shape[0], *h.shape)
            h = dense(h, w, b)  # a fresh tensor, whatever the branch
            if k < last:
                h = act(h)
        return h

    def config(self) -> dict[str, Any]:
        return {
            "builder": self.builder,
            "in_features": self._in_features,
            "hidden": self.hidden,
            "out_features": self.out_features,
            "activation": self.activation,
            "bias": self.bias,
            **self._base_config(),
        }

    @classmethod
    def from_config(cls, cfg, *, likelihood, priors):
        return cls(likelihood=likelihood, priors=priors, **cfg)

    def __repr__(self) -> str:
        arch = "-".join(map(str, [self._in_features, *self.hidden, self.out_features]))
        return f"MLP({arch}, {self.activation}, {self.likelihood!r})"


def mlp(
    in_features: int,
    hidden: Sequence[int] = (50,),
    out_features: int | None = None,
    *,
    likelihood: str | Likelihood = "gaussian",
    prior: Prior | Mapping[str, Prior] | None = None,
    activation: str = "relu",
    bias: bool = True,
) -> MLP:
    """Build a Bayesian MLP as a Pyro model ``model(x, y=None)``.

    Parameters
    ----------
    in_features : int
    hidden : sequence of int
        Hidden layer widths (empty: Bayesian linear/logistic regression).
    out_features : int, optional
        Number of regression targets (default 1) or classes (required for ``"categorical"``).
    likelihood : str or Likelihood
        ``"gaussian"`` (learned noise), ``"heteroscedastic"``, ``"categorical"``, ``"bernoulli"``,
        or an object such as ``mz.likelihoods.Gaussian(noise=0.1)``.
    prior : Prior or mapping of layer name to Prior
        E.g. ``mz.priors.Normal(1.0)`` or ``{"layer1": ScaledNormal(), "default": Normal(1.)}``.
    activation : str
        One of ``ACTIVATIONS``.

    Examples
    --------
    >>> import marginalize as mz
    >>> mz.models.mlp(13, hidden=[50], prior=mz.priors.ScaledNormal(gain=1.0))
    MLP(13-50-1, relu, Gaussian(noise=None, noise_prior_scale=1.0))
    """
    lik = get_likelihood(likelihood)
    in_features, out_features = plain_number(in_features), plain_number(out_features)
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ModelError(f"in_features must be a positive int, got {in_features!r}")
    hidden = plain_ints(hidden)
    if isinstance(hidden, int):
        hidden = [hidden]
    if (
        isinstance(hidden, (str, bytes))
        or not isinstance(hidden, Sequence)
        or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden)
    ):
        raise ModelError(f"hidden must be a sequence of positive ints, got {hidden!r}")
    if out_features is not None and (
        isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1
    ):
        raise ModelError(f"out_features must be a positive int or None, got {out_features!r}")
    if activation not in ACTIVATIONS:
        raise ModelError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    if out_features is None:
        if lik.task == "classification" and lik.kind == "categorical":
            if getattr(lik, "num_classes", None) is None:
                raise ModelError("a categorical MLP needs out_features (the number of classes)")
            out_features = lik.num_classes
        else:
            out_features = 1
    if lik.kind == "categorical":
        if lik.num_classes is None:
            lik.num_classes = out_features
        elif lik.num_classes != out_features:
            raise ModelError(
                f"out_features={out_features} but the likelihood has {lik.num_classes} classes"
            )
        if out_features < 2:
            raise ModelError("a categorical likelihood needs at least 2 classes")
    names = [f"layer{k + 1}" for k in range(len(hidden) + 1)]
    return MLP(
        in_features,
        list(hidden),
        int(out_features),
        lik,
        resolve_priors(prior, names),
        activation=activation,
        bias=bias,
    )
