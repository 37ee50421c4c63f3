"""What every method is handed: the model, validated data, the layout and a log joint.

``Problem.log_joint(z)`` is the unnormalized log posterior of the flat unconstrained vector
(Jacobian of the transforms included), batched over leading dims of ``z``: pure torch for the
builders' models, the compiled log joint (``core/compiled``) for plain model functions, and
a Pyro trace for those that cannot be compiled.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from marginalize._validation import check_x, check_y
from marginalize.core.layout import Layout, _is_latent
from marginalize.errors import DataError, ModelError
from marginalize.models.base import BNN

__all__ = ["Problem", "prepare", "scale_obs", "trace_model", "observation_dist", "detect_task"]

log = logging.getLogger(__name__)


class _ScaleObs(Messenger):
    """Multiply the log likelihood of site ``"y"`` by ``scale`` (minibatch -> full data)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] == "y":
            msg["scale"] = msg["scale"] * self.scale


def scale_obs(model: Callable, scale: float) -> Callable:
    """Wrap ``model`` so only the observation site is scaled (priors are not)."""

    def scaled(*args, **kwargs):
        with _ScaleObs(scale):
            return model(*args, **kwargs)

    return scaled


def observation_dist(d: dist.Distribution) -> dist.Distribution:
    """Strip Pyro's wrappers (Masked, Independent, Expanded) to the observation family."""
    while True:
        if isinstance(d, (dist.MaskedDistribution, dist.Independent)):
            d = d.base_dist
        elif isinstance(d, torch.distributions.Independent):
            d = d.base_dist
        elif hasattr(dist, "ExpandedDistribution") and isinstance(d, dist.ExpandedDistribution):
            d = d.base_dist
        else:
            return d


def detect_task(d: dist.Distribution) -> str:
    base = observation_dist(d)
    if isinstance(
        base,
        (
            torch.distributions.Categorical,
            torch.distributions.OneHotCategorical,
            torch.distributions.Bernoulli,
        ),
    ):
        return "classification"
    return "regression"


def trace_model(model: Callable, x: torch.Tensor, y: torch.Tensor | None):
    """Trace the model once and check the contract; return the trace."""
    try:
        tr = poutine.trace(model).get_trace(x, y)
    except (DataError, ModelError):
        raise
    except Exception as e:
        raise ModelError(
            f"the model raised {type(e).__name__} when called as model(x, y) with x of shape "
            f"{tuple(x.shape)}: {e}"
        ) from e
    if "y" not in tr.nodes or tr.nodes["y"]["type"] != "sample":
        raise ModelError(
            "the model has no sample site named 'y'; observations must be "
            "pyro.sample('y', ..., obs=y) inside pyro.plate('data', N)"
        )
    ysite = tr.nodes["y"]
    if y is not None and not ysite["is_observed"]:
        raise ModelError("site 'y' is not observed: pass obs=y to pyro.sample('y', ...)")
    if not ysite["cond_indep_stack"]:
        raise ModelError("site 'y' must be inside pyro.plate('data', N) so it can be minibatched")
    for name, node in tr.nodes.items():
        if not _is_latent(node):
            continue
        if node["cond_indep_stack"]:
            raise ModelError(
                f"latent site {name!r} is inside a plate: marginalize supports global latent "
                "variables (weights, scales) only"
            )
        if node["fn"].support.is_discrete:
            raise ModelError(
                f"latent site {name!r} is discrete; only continuous latents are supported"
            )
    return tr


@contextlib.contextmanager
def _no_validation():
    """Skip distribution argument checks in hot loops (they cost time and raise mid-trajectory)."""
    old = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(old)


@dataclass
class Problem:
    """A model with its (validated) training data."""

    model: Callable
    x: torch.Tensor
    y: torch.Tensor
    layout: Layout
    task: str
    num_classes: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def vectorized(self) -> bool:
        return isinstance(self.model, BNN)

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def log_joint(self, z: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(w(z), y | x) + log|J|``; with ``idx`` a minibatch scaled to the full data.

        Batched over leading dims of ``z`` and differentiable in ``z``. Plain model functions
        are evaluated by their compiled log joint (``core/compiled``) where the model could be
        compiled, else by :meth:`log_joint_traced`."""
        if self.vectorized:
            x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
            scale = 1.0 if idx is None else self.n / len(idx)
            params, ladj = self.layout.unpack_with_log_det(z)
            return self.model.log_joint(params, x, y, obs_scale=scale) + ladj
        compiled = self.compiled()
        out = None if compiled is None else compiled.log_joint(z, idx)
        return self.log_joint_traced(z, idx) if out is None else out

    def log_joint_traced(self, z: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`log_joint` by a Pyro trace of the model (a loop over leading dims of ``z``)."""
        x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
        scale = 1.0 if idx is None else self.n / len(idx)
        if z.dim() != 1:
            return torch.stack(
                [self.log_joint_traced_on(zi, x, y, scale) for zi in z.reshape(-1, z.shape[-1])]
            ).reshape(z.shape[:-1])
        return self.log_joint_traced_on(z, x, y, scale)

    def log_joint_traced_on(self, z: torch.Tensor, x, y, scale: float) -> torch.Tensor:
        """The Pyro-trace log joint of one ``z`` on data ``(x, y)``, the likelihood times
        ``scale`` (what ``core/compiled.py`` records)."""
        params, ladj = self.layout.unpack_with_log_det(z)
        model = scale_obs(self.model, scale) if scale != 1.0 else self.model
        tr = poutine.trace(poutine.condition(model, data=params)).get_trace(x, y)
        return tr.log_prob_sum() + ladj

    def compiled(self):
        """The compiled log joint of a plain model function (``core/compiled``), or ``None``
        for builder models, subclasses with their own ``log_joint`` and when
        ``meta["compiled"] = False``."""
        if "_compiled" not in self.__dict__:
            comp = None
            if (
                not self.vectorized
                and self.meta.get("compiled", True)
                and type(self).log_joint is Problem.log_joint
            ):
                from marginalize.core.compiled import CompiledLogJoint

                comp = CompiledLogJoint(self)
            self.__dict__["_compiled"] = comp
        return self.__dict__["_compiled"]

    def fast_potential(self):
        """The closed-form potential with an analytic gradient (``core/potentials.py``)
        for builder MLPs with the package's priors and likelihoods, else ``None``. Set
        ``meta["fast_potential"] = False`` to always use the general path."""
        if "_fast" not in self.__dict__:
            fast = None
            if self.meta.get("fast_potential", True) and type(self).log_joint is Problem.log_joint:
                from marginalize.core.potentials import fast_potential

                fast = fast_potential(self)
            self.__dict__["_fast"] = fast
        return self.__dict__["_fast"]

    def numpy_potential(self):
        """:meth:`potential_and_grad` on NumPy arrays (``(D,) ndarray -> (float, ndarray)``)
        for a float32/float64 problem on the CPU, else ``None``; NUTS and HMC then run their
        transitions in NumPy. It is the fast potential's own NumPy version where there is one,
        otherwise the torch potential behind a zero-copy conversion (the NumPy transitions
        save more than the conversion costs)."""
        if self.device.type != "cpu" or self.dtype not in (torch.float32, torch.float64):
            return None
        fast = self.fast_potential()
        if fast is not None and fast.numpy_dtype == self.dtype:
            return fast.numpy_potential_and_grad
        compiled = None if fast is not None else self.compiled()
        numpy_pg = None if compiled is None else compiled.numpy_potential()
        if numpy_pg is not None:
            return numpy_pg
        pg = self.potential_and_grad

        def potential(zn: np.ndarray) -> tuple[float, np.ndarray]:
            u, g = pg(torch.from_numpy(zn))
            return float(u), g.detach().numpy()

        return potential

    def potential_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``U(z) = -log_joint(z)`` and its gradient; an invalid point gives ``U = inf``."""
        fast = self.fast_potential()
        if fast is not None:
            return fast.potential_and_grad(z)
        compiled = self.compiled()
        out = None if compiled is None else compiled.potential_and_grad(z)
        if out is not None:
            return out
        z = z.detach().requires_grad_(True)
        with _no_validation():
            try:
                u = -self.log_joint(z)
            except ValueError:  # e.g. a scale underflowed to 0 far out in a tail
                return z.new_tensor(math.inf), torch.zeros_like(z)
            if not torch.isfinite(u):
                return z.new_tensor(math.inf), torch.zeros_like(z)
            (g,) = torch.autograd.grad(u, z)
        return u.detach(), g

    def init_from_prior(self, generator_seed: int) -> torch.Tensor:
        """A draw of the latent sites from the prior, packed (unconstrained)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed)  # torch only: pyro.set_rng_seed reseeds NumPy too
            tr = poutine.trace(self.model).get_trace(self.x[:2], None)
        return self.layout.pack({s.name: tr.nodes[s.name]["value"] for s in self.layout.sites}).to(
            self.device, self.dtype
        )


def prepare(model: Callable, x, y, *, device=None) -> Problem:
    """Validate ``x``/``y`` against the model and build the :class:`Problem`."""
    if not callable(model):
        raise ModelError(f"model must be callable as model(x, y=None), got {type(model).__name__}")
    if device is None and isinstance(x, torch.Tensor):
        device = x.device
    x_t = check_x("x", x, device=device)
    y_t = check_y(y, x_t.shape[0], device=device)
    num_classes = None
    if isinstance(model, BNN):
        x_t = model.check_input(x_t, "x")
        lik = model.likelihood
        targets = model.out_features
        if lik.task == "classification":
            num_classes = targets if lik.kind == "categorical" else 2
        y_t = lik.check_y(y_t, targets)
        if torch.is_floating_point(y_t):  # regression targets, Bernoulli labels
            y_t = y_t.to(x_t.dtype)
    else:
        if torch.is_floating_point(y_t):
            y_t = y_t.to(x_t.dtype)
    with torch.random.fork_rng(devices=[]):
        tr = trace_model(model, x_t, y_t)
        # latent shapes must not depend on the number of data points
        tr2 = trace_model(model, x_t[:1], y_t[:1])
    for name, node in tr.nodes.items():
        if name in tr2.nodes and _is_latent(node):
            if tr2.nodes[name]["value"].shape != node["value"].shape:
                raise ModelError(
                    f"latent site {name!r} changes shape with the number of data points"
                )
    dims = model.site_dims() if isinstance(model, BNN) else None
    layout = Layout.from_trace(tr, dims)
    if layout.size == 0:
        raise ModelError("the model has no latent sample sites (nothing to infer)")
    ysite = tr.nodes["y"]
    task = model.task if isinstance(model, BNN) else detect_task(ysite["fn"])
    if task == "classification" and num_classes is None:
        base = observation_dist(ysite["fn"])
        if isinstance(base, torch.distributions.Bernoulli):
            num_classes = 2
        else:
            num_classes = int(
                base.logits.shape[-1] if hasattr(base, "logits") else base.probs.shape[-1]
            )
        if not torch.is_floating_point(y_t) or isinstance(base, torch.distributions.Categorical):
            if int(y_t.min()) < 0 or int(y_t.max()) >= num_classes:
                raise DataError(
                    f"y: labels must lie in [0, {num_classes - 1}] for the model's "
                    f"{num_classes} classes"
                )
    try:
        lp = ysite["fn"].log_prob(ysite["value"])
    except Exception as e:
        raise DataError(
            f"y: does not fit the model's observation distribution "
            f"{type(observation_dist(ysite['fn'])).__name__}: {e}"
        ) from e
    if not bool(torch.isfinite(lp).all()):
        raise DataError("y: has values outside the support of the model's observation distribution")
    return Problem(model, x_t, y_t, layout, task, num_classes)
