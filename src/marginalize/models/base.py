"""The base class of the builders' models: a Pyro model that also evaluates batched weights.

A :class:`BNN` is callable as ``model(x, y=None)`` like any plain Pyro model (weights are
``pyro.sample`` sites with explicit priors; observations are site ``"y"`` inside
``pyro.plate("data", N)``). It also exposes the same computation as pure functions of a
dictionary of weights that carry leading draw dimensions, which the inference methods and
the prediction path use to evaluate S posterior draws in one batched pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from marginalize.errors import ModelError
from marginalize.models.likelihoods import Likelihood, likelihood_from_config
from marginalize.models.priors import Prior, prior_from_config
from marginalize.models.usage import SiteUse

__all__ = ["BNN", "LayerSpec", "model_from_config", "measure_bytes"]


class _CountBytes(TorchDispatchMode):
    """Sums the bytes of every tensor an operation returns while active."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.total += t.numel() * t.element_size()
        return out


def measure_bytes(fn) -> int:
    """Bytes of all tensors the operations of ``fn()`` return (at least 1): a probe of the
    activation memory of one forward pass."""
    counter = _CountBytes()
    with counter:
        fn()
    return max(1, counter.total)


@dataclass(frozen=True)
class LayerSpec:
    """One Bayesian layer: its weight/bias shapes, fan-in and ArviZ dim names."""

    name: str
    weight_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    fan_in: int
    weight_dims: tuple[str, ...]
    bias_dims: tuple[str, ...] | None = None
    #: the weight axis whose units MC dropout masks (the layer's inputs)
    input_axis: int = 0


class BNN:
    """A Bayesian neural network as a Pyro model with explicit priors.

    Subclasses define :meth:`layer_specs` and :meth:`forward`; everything else (the Pyro
    model, the batched log joint, the predictive distribution, ArviZ dims, configs) is shared.
    """

    #: name used by :func:`model_from_config`
    builder: str = "bnn"
    #: whether integer inputs reach the model as they are (token ids); else they become floats
    integer_inputs: bool = False

    def __init__(self, likelihood: Likelihood, priors: Mapping[str, Prior], out_features: int):
        self.likelihood = likelihood
        self.priors = dict(priors)
        self.out_features = out_features

    # ---- to be provided by subclasses -------------------------------------------------
    def layer_specs(self) -> list[LayerSpec]:
        raise NotImplementedError

    def forward(
        self,
        params: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Network output ``f`` of shape ``(*batch, N, net_outputs)`` for weights with leading
        batch dims ``*batch`` (none in a plain model call).

        ``state`` is the network's weight-dependent state (see :attr:`stateful`), with the
        same leading dims as the weights or none; stateless networks ignore it."""
        raise NotImplementedError

    #: whether the network holds state that depends on its weights (BatchNorm running
    #: statistics): a prediction then needs that state for each weight draw
    #: (:meth:`state_from_data`)
    stateful: bool = False

    def state_from_data(
        self, params: Mapping[str, torch.Tensor], inputs
    ) -> dict[str, torch.Tensor] | None:
        """The weight-dependent state of the network (e.g. BatchNorm running statistics) for
        weights ``params`` with leading dims ``*batch``, estimated by one pass over ``inputs``
        (an iterable of input chunks ``(B, ...)``): tensors with the leading dims ``*batch``.
        ``None`` for a stateless network."""
        return None

    def module_state(self, device=None, dtype=None) -> dict[str, torch.Tensor] | None:
        """The state a fit starts from and trains (a wrapped module's BatchNorm running
        statistics), on ``device`` in ``dtype``; ``None`` when the network has no such
        starting state (stateless, or its state only comes from :meth:`state_from_data`)."""
        return None

    def units_per_input(self, x: torch.Tensor) -> int | None:
        """Numbers of activations one input of ``x``'s shape makes at the peak of one forward
        pass of one draw (what sizes the chunks of prediction), or ``None`` when the model
        does not state it: the predictive layer then measures it with a probe forward
        (:class:`marginalize.core.predictive.memory.ActivationMeter`)."""
        return None

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.likelihood.task

    @property
    def in_features(self) -> int | None:
        return getattr(self, "_in_features", None)

    #: whether integer inputs may stay integers (``prepare`` keeps them; ``check_input`` then
    #: decides): False for the builders, whose layers take floats
    integer_inputs: bool = False

    def check_input(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """Validate/reshape inputs for this architecture (raise ``DataError``)."""
        return x

    def sample_params(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        params: dict[str, torch.Tensor] = {}
        for spec in self.layer_specs():
            w, b = self.priors[spec.name].sample_layer(
                spec.name, spec.weight_shape, spec.bias_shape, spec.fan_in, like
            )
            params[f"{spec.name}.weight"] = w
            if b is not None:
                params[f"{spec.name}.bias"] = b
        params.update(self.likelihood.sample_params(like))
        return params

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        # weights in x's float dtype (the default one for integer inputs such as token ids)
        like = x if x.is_floating_point() else x.new_zeros((), dtype=torch.get_default_dtype())
        params = self.sample_params(like)
        f = self.forward(params, x)
        d = self.likelihood.dist(f, params)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", d, obs=y)
        return f

    def predictive_dist(
        self, params: Mapping[str, torch.Tensor], x: torch.Tensor, state=None
    ) -> dist.Distribution:
        """The distribution of ``y`` given batched weights: batch shape ``(*batch, N)``
        (``state``: as for :meth:`forward`)."""
        f = self.forward(params, x) if state is None else self.forward(params, x, state)
        return self.likelihood.dist(f, params)

    def log_prior(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Log prior density of all latent sites, shape ``(*batch)``; no Pyro involved."""
        specs = self.layer_specs()
        lp = None
        for spec in specs:
            term = self.priors[spec.name].log_prob_layer(
                spec.name, params, spec.fan_in, len(spec.weight_shape), spec.bias_shape is not None
            )
            lp = term if lp is None else lp + term
        first = params[f"{specs[0].name}.weight"]
        like = first.new_zeros(first.shape[: first.dim() - len(specs[0].weight_shape)])
        return lp + self.likelihood.log_prob_params(params, like)

    def log_likelihood(self, params, x, y, state=None) -> torch.Tensor:
        """Per-observation log likelihood, shape ``(*batch, N)``."""
        return self.predictive_dist(params, x, state).log_prob(y)

    def log_joint(self, params, x, y, *, obs_scale: float = 1.0, state=None) -> torch.Tensor:
        """``log p(w) + obs_scale * sum_n log p(y_n | x_n, w)``, shape ``(*batch)``."""
        ll = self.log_likelihood(params, x, y, state).sum(-1)
        return self.log_prior(params) + obs_scale * ll

    def activation_bytes_per_input(self, x: torch.Tensor) -> int:
        """Bytes of intermediate results one input makes in one forward pass (every
        operation's output counted, i.e. about what a backward pass keeps), measured once per
        input shape and dtype by a probe forward of ``x[:1]`` and cached.

        What every pass over data divides its memory budget by to size its chunks of rows
        (checks, training-time passes, BatchNorm statistics, prediction)."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        cache = self.__dict__.setdefault("_activation_bytes", {})
        if key not in cache:
            like = x if x.is_floating_point() else x.new_zeros((), dtype=torch.get_default_dtype())
            params = self.probe_params(like)
            with torch.no_grad():
                cache[key] = measure_bytes(lambda: self.forward(params, x[:1]))
        return cache[key]

    def probe_params(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weights of the right shapes (zeros, in ``like``'s dtype and device) for probes."""
        out = {}
        for spec in self.layer_specs():
            out[f"{spec.name}.weight"] = like.new_zeros(spec.weight_shape)
            if spec.bias_shape is not None:
                out[f"{spec.name}.bias"] = like.new_zeros(spec.bias_shape)
        return out

    def site_dims(self) -> dict[str, tuple[str, ...]]:
        """ArviZ dim names of every latent site."""
        dims: dict[str, tuple[str, ...]] = {}
        for spec in self.layer_specs():
            dims[f"{spec.name}.weight"] = spec.weight_dims
            if spec.bias_shape is not None:
                dims[f"{spec.name}.bias"] = spec.bias_dims or (f"{spec.name}_out",)
            for h in self.priors[spec.name].hyper_sites(spec.name):
                dims[h] = ()
        for s in self.likelihood.latent_sites():
            dims[s] = ()
        return dims

    def site_usage(self, x: torch.Tensor | None = None) -> dict[str, SiteUse]:
        """How each weight and bias enters the network (see :mod:`marginalize.models.usage`),
        from :meth:`layer_specs`: the first layer's inputs are the data."""
        out: dict[str, SiteUse] = {}
        for k, s in enumerate(self.layer_specs()):
            w = f"{s.name}.weight"
            out[w] = SiteUse("weight", s.input_axis, s.fan_in, meets_data=k == 0)
            if s.bias_shape is not None:
                out[f"{s.name}.bias"] = SiteUse("bias", None, s.fan_in, layer=w)
        return out

    def dropout_axes(self, inputs: bool = False, x: torch.Tensor | None = None) -> dict[str, int]:
        """For each weight site MC dropout masks, the axis of its input units.

        Hidden units only by default: the weights whose inputs are the data are left out
        unless ``inputs`` (input dropout). ``x`` (a few rows of inputs) is needed by models
        that find their layers by tracing (``bayesian(module)``).
        """
        return {
            k: u.input_axis
            for k, u in self.site_usage(x).items()
            if u.role == "weight" and u.input_axis is not None and (inputs or not u.meets_data)
        }

    def _base_config(self) -> dict[str, Any]:
        return {
            "likelihood": self.likelihood.config(),
            "priors": {k: v.config() for k, v in self.priors.items()},
        }


#: builder name -> model class, filled by :func:`builder` (rebuilds saved models from their
#: config without executing anything from the file)
BUILDERS: dict[str, type[BNN]] = {}


def builder(name: str):
    """Class decorator: register a :class:`BNN` subclass as the builder ``name`` so
    :func:`model_from_config` can rebuild its models (``config()["builder"] == name``)."""

    def deco(cls: type[BNN]) -> type[BNN]:
        if BUILDERS.get(name, cls) is not cls:
            raise ValueError(f"builder name {name!r} is already registered")
        BUILDERS[name] = cls
        return cls

    return deco


def model_from_config(cfg: Mapping[str, Any]) -> BNN:
    """Rebuild a builder model from ``model.config()`` (no code is executed from files: the
    builder is looked up in the fixed table :data:`BUILDERS`)."""
    cfg = dict(cfg)
    kind = cfg.pop("builder")
    if kind not in BUILDERS:
        raise ModelError(f"unknown model builder {kind!r}; known: {sorted(BUILDERS)}")
    lik = likelihood_from_config(cfg.pop("likelihood"))
    priors = {k: prior_from_config(v) for k, v in cfg.pop("priors").items()}
    return BUILDERS[kind].from_config(cfg, likelihood=lik, priors=priors)
