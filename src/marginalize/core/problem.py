"""What every method is handed: the model, validated data, the layout and a log joint.

``Problem.log_joint(z)`` is the unnormalized log posterior of the flat unconstrained vector
(Jacobian of the transforms included), batched over leading dims of ``z``: pure torch for the
builders' models, the compiled log joint (``core/compiled``) for plain model functions, and
a Pyro trace for those that cannot be compiled.

A plain model function is taken as users write it (:func:`prepare` reads its contract from a
trace and wraps it in a :class:`UserModel`): the observed site may have any name (``"y"``,
``"obs"``, ...), global weight sites may carry batch dims instead of ``.to_event`` (NumPyro
style) or sit in plates other than the data plate, ``pyro.deterministic`` sites are recorded,
and integer labels keep working for observation families that need float values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import site_is_subsample

from marginalize._isolation import no_validation
from marginalize._validation import check_x, check_y
from marginalize.core.layout import Layout, _is_latent, check_sites
from marginalize.errors import DataError, ModelError
from marginalize.models.base import BNN

__all__ = [
    "Problem",
    "UserModel",
    "prepare",
    "canonical_model",
    "scale_obs",
    "trace_model",
    "observation_dist",
    "detect_task",
]

log = logging.getLogger(__name__)

#: the name every method reads the observation site by (a :class:`UserModel` renames the
#: user's observed site to it while the model runs)
OBS = "y"


class _ScaleObs(Messenger):
    """Multiply the log likelihood by ``scale`` (minibatch -> full data): every observed site
    inside a plate (the observation site ``"y"``, and any other observation in the data
    plate); priors, which sit outside every plate, are not scaled."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def _process_message(self, msg):
        if msg["type"] == "sample" and (
            msg["name"] == OBS or (msg["is_observed"] and msg["cond_indep_stack"])
        ):
            if not msg["infer"].get("_deterministic") and not isinstance(msg["fn"], _Subsample):
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


# ---- the contract of a user's model function ----------------------------------------------
class _Canonical(Messenger):
    """While a user's model runs: its observed site is named ``"y"``, and the batch dims of
    the global latent sites in ``event_sites`` (no ``.to_event``, or inside a plate that is not
    the data plate) become event dims, so that each such site is one draw of one weight
    array, as in the builders' models."""

    def __init__(self, obs_site: str, event_sites: frozenset[str]):
        super().__init__()
        self.obs_site = obs_site
        self.event_sites = event_sites

    def _process_message(self, msg):
        if msg["type"] != "sample":
            return
        name = msg["name"]
        if name == self.obs_site and name != OBS:
            msg["name"] = OBS
        elif name in self.event_sites:
            msg["cond_indep_stack"] = ()  # plates outside the data plate only (prepare checks)
            k = len(msg["fn"].batch_shape)
            if k:
                msg["fn"] = msg["fn"].to_event(k)


class _RefuseSubsample(Messenger):
    """Refuse ``pyro.plate(..., subsample_size=B)`` before Pyro draws a subsample."""

    def _process_message(self, msg):
        fn = msg["fn"]
        if (
            msg["type"] == "sample"
            and isinstance(fn, _Subsample)
            and fn.subsample_size is not None
            and msg["value"] is None
        ):
            raise ModelError(
                f"the model subsamples its own plate: pyro.plate({msg['name']!r}, {fn.size}, "
                f"subsample_size={fn.subsample_size}). marginalize drives minibatches itself "
                "(NUTS, Laplace and predictions need every row, at any number of inputs): "
                "remove subsample_size (and the indexing by the plate's indices) and pass "
                f"batch_size={fn.subsample_size} to mz.fit instead"
            )


class UserModel:
    """A user's Pyro model function with its contract resolved by :func:`prepare`.

    Callable as ``model(x, y=None)`` like the function it wraps (``fn``), which runs under a
    handler that names its observed site ``"y"`` (whatever the user called it,
    ``obs_site``) and makes the batch dims of the global latent sites ``event_sites`` event
    dims. Integer ``y`` becomes ``y_dtype`` for observation families whose densities need
    float values (Bernoulli, Poisson, ...). ``deterministic`` lists the
    ``pyro.deterministic`` sites, which :meth:`marginalize.Posterior.sample` records.

    Attributes
    ----------
    fn : callable
        The user's model.
    obs_site : str
        The name of its observed site.
    event_sites : frozenset of str
        Latent sites whose batch dims are read as event dims.
    deterministic : tuple of str
        Names of its ``pyro.deterministic`` sites.
    y_dtype : torch.dtype or None
        The dtype integer targets are converted to (None: kept).
    """

    def __init__(
        self,
        fn: Callable,
        obs_site: str = OBS,
        event_sites=(),
        deterministic=(),
        y_dtype: torch.dtype | None = None,
    ):
        self.fn = fn
        self.obs_site = obs_site
        self.event_sites = frozenset(event_sites)
        self.deterministic = tuple(deterministic)
        self.y_dtype = y_dtype
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def coerce_y(self, y):
        """``y`` as the model's observation site takes it (integer labels to ``y_dtype``)."""
        if (
            isinstance(y, torch.Tensor)
            and self.y_dtype is not None
            and not torch.is_floating_point(y)
        ):
            return y.to(self.y_dtype)
        return y

    def __call__(self, x, y=None):
        with _Canonical(self.obs_site, self.event_sites):
            return self.fn(x, self.coerce_y(y))

    def __repr__(self) -> str:
        extra = "" if self.obs_site == OBS else f", obs_site={self.obs_site!r}"
        return f"UserModel({self.__name__}{extra})"


def _raw_trace(fn: Callable, x: torch.Tensor, y: torch.Tensor | None):
    try:
        with _RefuseSubsample():
            return poutine.trace(fn).get_trace(x, y)
    except (DataError, ModelError):
        raise
    except Exception as e:
        raise ModelError(
            f"the model raised {type(e).__name__} when called as model(x, y) with x of shape "
            f"{tuple(x.shape)}: {e}"
        ) from e


def _is_observation(node) -> bool:
    return (
        node["type"] == "sample"
        and node["is_observed"]
        and not site_is_subsample(node)
        and not node["infer"].get("is_auxiliary")
        and not node["infer"].get("_deterministic")
    )


def _choose_obs_site(fn, tr, x, y, obs_site: str | None) -> str:
    observed = [n for n, node in tr.nodes.items() if _is_observation(node)]
    if obs_site is not None:
        if not isinstance(obs_site, str):
            raise ModelError(f"obs_site: expected a site name (str), got {obs_site!r}")
        node = tr.nodes.get(obs_site)
        if node is None or node["type"] != "sample":
            raise ModelError(
                f"obs_site={obs_site!r}: the model has no sample site of that name; its "
                f"observed sites are {observed}"
            )
        if not node["is_observed"]:
            raise ModelError(
                f"site {obs_site!r} is not observed: pass obs=y to pyro.sample({obs_site!r}, ...)"
            )
        return obs_site
    cands = observed
    if len(cands) > 1:  # keep the sites that y feeds: the others are fixed observations
        try:
            with torch.random.fork_rng(devices=[]):
                free = _raw_trace(fn, x, None).nodes
            narrowed = [n for n in cands if n in free and not free[n]["is_observed"]]
        except (DataError, ModelError):
            narrowed = []
        cands = narrowed or cands
    if len(cands) > 1:
        raise ModelError(
            f"the model has {len(cands)} observed sites ({', '.join(map(repr, cands))}); "
            "marginalize fits one observation site: choose it with "
            f"mz.fit(..., obs_site={cands[0]!r}) (the others stay in the log joint as fixed "
            "observations)"
        )
    if not cands:
        for name in (OBS, "obs"):
            node = tr.nodes.get(name)
            if node is not None and node["type"] == "sample" and _is_latent(node):
                raise ModelError(
                    f"site {name!r} is not observed: pass obs=y to pyro.sample({name!r}, ...)"
                )
        raise ModelError(
            "the model has no observed sample site (no sample site named 'y' or otherwise); "
            "observations must be pyro.sample('y', ..., obs=y) inside pyro.plate('data', N)"
        )
    return cands[0]


def _contract(fn: Callable, x: torch.Tensor, y: torch.Tensor, obs_site: str | None) -> UserModel:
    """Read a model function's contract from one trace on the data (before any fitting)."""
    with torch.random.fork_rng(devices=[]):
        tr = _raw_trace(fn, x, y)
    params = [n for n, node in tr.nodes.items() if node["type"] == "param"]
    if params:
        raise ModelError(
            f"the model has parameters without a prior ({', '.join(map(repr, params[:5]))}"
            f"{', ...' if len(params) > 5 else ''}: pyro.param, or an nn.Parameter of a "
            "PyroModule not made a PyroSample). marginalize infers sample sites: give each a "
            "prior (PyroSample / pyro.sample), or wrap an nn.Module with "
            "mz.models.bayesian(module, sites=...) to hold some parameters fixed"
        )
    obs = _choose_obs_site(fn, tr, x, y, obs_site)
    if obs != OBS and OBS in tr.nodes:
        raise ModelError(
            f"the model has a site named 'y' besides its observed site {obs!r}: marginalize "
            "reads the observation as 'y', so rename the other site"
        )
    onode = tr.nodes[obs]
    # the data plate: the observation's plate over the rows of x (others, e.g. over outputs,
    # may hold weights)
    data_plates = {f.name for f in onode["cond_indep_stack"] if f.size == x.shape[0]}
    if not data_plates:
        hint = ""
        if not onode["cond_indep_stack"] and tuple(onode["fn"].event_shape)[:1] == (x.shape[0],):
            hint = (
                f"; its rows are event dims (.to_event): drop that and write "
                f"`with pyro.plate('data', x.shape[0]): pyro.sample({obs!r}, ..., obs=y)`"
            )
        raise ModelError(
            f"site {obs!r} must be inside pyro.plate('data', N) so it can be minibatched "
            f"(N = x.shape[0] = {x.shape[0]}){hint}"
        )
    event_sites = []
    for name, node in tr.nodes.items():
        if not _is_latent(node):
            continue
        if node["fn"].support.is_discrete:
            raise ModelError(
                f"latent site {name!r} is discrete; only continuous latents are supported"
            )
        frames = {f.name for f in node["cond_indep_stack"]}
        if frames & data_plates:
            raise ModelError(
                f"latent site {name!r} is inside a plate: marginalize supports global latent "
                f"variables (weights, scales) only, and {name!r} is inside the data plate "
                f"{sorted(frames & data_plates)[0]!r}"
            )
        if frames or len(node["fn"].batch_shape):
            event_sites.append(name)
    deterministic = [
        n
        for n, node in tr.nodes.items()
        if node["type"] == "sample" and node["infer"].get("_deterministic")
    ]
    y_dtype = None
    base = observation_dist(onode["fn"])
    if not torch.is_floating_point(y) and not isinstance(base, torch.distributions.Categorical):
        y_dtype = x.dtype if torch.is_floating_point(x) else torch.get_default_dtype()
    if event_sites:
        log.info(
            "model %s: the batch dims of latent sites %s are read as event dims "
            "(as with .to_event)",
            getattr(fn, "__name__", type(fn).__name__),
            event_sites,
        )
    return UserModel(fn, obs, event_sites, deterministic, y_dtype)


def canonical_model(model: Callable, x, y=None, *, obs_site: str | None = None) -> Callable:
    """``model`` in the form every method reads: builder models and :class:`UserModel` as
    they are, a plain function wrapped in a :class:`UserModel` read from a trace at ``x``
    (and ``y``; without ``y``, the model's own draw of its observation stands in: the last
    sample site inside a plate, in execution order, that the model observes when given it)."""
    if isinstance(model, (BNN, UserModel)):
        return model
    xt = check_x("x", x)
    if y is not None:
        return _contract(model, xt, check_y(y, xt.shape[0]), obs_site)
    with torch.random.fork_rng(devices=[]):
        tr = _raw_trace(model, xt, None)
    local = [n for n, node in tr.nodes.items() if _is_latent(node) and node["cond_indep_stack"]]
    for name in reversed([obs_site] if obs_site in local else local):
        value = tr.nodes[name]["value"].detach()
        if value.dim() == 0 or value.shape[0] != xt.shape[0]:
            continue
        try:
            return _contract(model, xt, value, obs_site)
        except (DataError, ModelError):
            continue
    raise ModelError(
        "the model has no observation site to read: a sample site inside pyro.plate('data', N) "
        f"that takes obs=y (sample sites inside plates: {local})"
    )


def trace_model(model: Callable, x: torch.Tensor, y: torch.Tensor | None):
    """Trace the (canonical) model once and check the contract; return the trace."""
    try:
        tr = poutine.trace(model).get_trace(x, y)
    except (DataError, ModelError):
        raise
    except Exception as e:
        raise ModelError(
            f"the model raised {type(e).__name__} when called as model(x, y) with x of shape "
            f"{tuple(x.shape)}: {e}"
        ) from e
    if OBS not in tr.nodes or tr.nodes[OBS]["type"] != "sample":
        raise ModelError(
            "the model has no sample site named 'y'; observations must be "
            "pyro.sample('y', ..., obs=y) inside pyro.plate('data', N)"
        )
    ysite = tr.nodes[OBS]
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


_no_validation = no_validation  # the switch is in marginalize._isolation (one for every layer)


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
        """The float dtype of the fit: x's, or the default one for integer inputs."""
        return (
            self.x.dtype
            if self.x.is_floating_point()
            else self.meta.get("dtype", torch.get_default_dtype())
        )

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


def prepare(model: Callable, x, y, *, device=None, obs_site: str | None = None) -> Problem:
    """Validate ``x``/``y`` against the model and build the :class:`Problem`.

    Parameters
    ----------
    model : callable
        A builder model, or a Pyro model function ``model(x, y=None)`` (wrapped in a
        :class:`UserModel`; a :class:`UserModel` is taken as it is).
    x, y : array-like or torch.Tensor
        Training inputs ``(N, ...)`` and targets ``(N, ...)``.
    device : optional
        Where the data go (default: ``x``'s device, else the CPU).
    obs_site : str, optional
        Which observed site of a model function is the observation, when it has several.

    Raises
    ------
    ModelError
        The model breaks the contract (see ``docs/guide/models.md``).
    DataError
        ``x`` or ``y`` do not fit the model, e.g. ``y`` shaped unlike the observation site.
    """
    if not callable(model):
        raise ModelError(f"model must be callable as model(x, y=None), got {type(model).__name__}")
    if device is None and isinstance(x, torch.Tensor):
        device = x.device
    keep_int = isinstance(model, BNN) and model.integer_inputs  # e.g. token ids (Embedding)
    x_t = check_x("x", x, device=device, keep_int=keep_int)
    y_t = check_y(y, x_t.shape[0], device=device)
    fdtype = x_t.dtype if x_t.is_floating_point() else torch.get_default_dtype()
    num_classes = None
    if isinstance(model, BNN):
        if obs_site not in (None, OBS):
            raise ModelError(
                f"obs_site={obs_site!r}: a builder model's observation site is always 'y'"
            )
        x_t = model.check_input(x_t, "x")
        lik = model.likelihood
        targets = model.out_features
        if lik.task == "classification":
            num_classes = targets if lik.kind == "categorical" else 2
        y_t = lik.check_y(y_t, targets)
        fdtype = x_t.dtype if x_t.is_floating_point() else fdtype  # check_input may cast x
        if torch.is_floating_point(y_t):  # regression targets, Bernoulli labels
            y_t = y_t.to(fdtype)
    else:
        if torch.is_floating_point(y_t):
            y_t = y_t.to(fdtype)
        if isinstance(model, UserModel):
            if obs_site is None or obs_site == model.obs_site:
                obs_site = model.obs_site
            model = model.fn
        model = _contract(model, x_t, y_t, obs_site)
        y_t = model.coerce_y(y_t)
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
    check_fixed_sites(model, x_t, layout, tr2)
    ysite = tr.nodes[OBS]
    _check_obs_shape(model, ysite, y_t)
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
    # checked here whatever torch's global argument validation is set to (without it, e.g.
    # Bernoulli's log_prob takes the label 2 and returns a finite number)
    try:
        inside = bool(observation_dist(ysite["fn"]).support.check(ysite["value"]).all())
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        inside = True
    if not inside:
        raise DataError(
            "y: has values outside the support of the model's observation distribution "
            f"{type(observation_dist(ysite['fn'])).__name__}"
        )
    try:
        lp = ysite["fn"].log_prob(ysite["value"])
    except Exception as e:
        raise DataError(
            f"y: does not fit the model's observation distribution "
            f"{type(observation_dist(ysite['fn'])).__name__}: {e}"
        ) from e
    if not bool(torch.isfinite(lp).all()):
        raise _blame_non_finite(ysite["fn"], ysite["value"], x_t)
    return Problem(model, x_t, y_t, layout, task, num_classes, meta={"dtype": fdtype})


def check_fixed_sites(model, x: torch.Tensor, layout: Layout, tr_one) -> None:
    """``ModelError`` when the model's latent sites depend on its inputs: the trace at one row
    (``tr_one``) and, for a model function, a trace at two rows without ``y`` (as prediction
    runs it) must sample exactly the fitted sites (:func:`~marginalize.core.layout.check_sites`).
    Builder models sample the same sites at any input."""
    check_sites(layout, tr_one, f"with 1 data point (the fit has {x.shape[0]})")
    if isinstance(model, BNN):
        return
    try:
        with torch.random.fork_rng(devices=[]):
            tr = poutine.trace(model).get_trace(x[:2], None)
    except Exception:  # noqa: BLE001 - a model that needs y here: prediction checks it again
        return
    check_sites(layout, tr, "when y is None (as at prediction)")


def _blame_non_finite(d: dist.Distribution, y: torch.Tensor, x: torch.Tensor) -> DataError:
    """The error for a non-finite log likelihood at a prior draw, naming its real cause: the
    model's output (x too large for the network), y outside the support, or an overflow."""
    base = observation_dist(d)
    params = {}
    for name in base.arg_constraints:
        v = getattr(base, name, None)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            params[name] = v
    x_max = f"the largest |x| is {float(x.abs().max()):.3g}" if x.is_floating_point() else ""
    for name, v in params.items():
        if not bool(torch.isfinite(v).all()):
            return DataError(
                f"x: the model's output ({type(base).__name__} {name}) is not finite at these "
                f"inputs under a draw from the prior ({x_max}): rescale x (e.g. standardize "
                "each column), or check the priors"
            )
    try:
        inside = bool(base.support.check(y).all())
    except (RuntimeError, ValueError, TypeError):
        inside = True
    if not inside:
        return DataError(
            "y: has values outside the support of the model's observation distribution"
        )
    out = max((float(v.abs().max()) for v in params.values()), default=0.0)
    y_max = float(y.abs().max()) if y.is_floating_point() and y.numel() else 0.0
    if out > 1e3 * max(1.0, y_max):
        return DataError(
            f"x: the model's output reaches {out:.3g} at these inputs under a draw from the prior "
            f"({x_max}) and its log likelihood overflows: rescale x (e.g. standardize each column)"
        )
    return DataError(
        "y: the log likelihood overflows at these values under a draw from the prior "
        f"(the largest |y| is {y_max:.3g}, the model's output {out:.3g}): rescale y "
        "(e.g. standardize it)"
    )


def _check_obs_shape(model, ysite, y: torch.Tensor) -> None:
    """The observed value must have the observation site's shape exactly: one that
    broadcasts against it (``(N, 1)`` against ``(N,)``) would give an N x N likelihood."""
    fn, value = ysite["fn"], ysite["value"]
    want = tuple(fn.batch_shape + fn.event_shape)
    got = tuple(value.shape)
    if got == want:
        return
    name = model.obs_site if isinstance(model, UserModel) else OBS
    msg = (
        f"y: the model's observation site {name!r} has shape {want} for these inputs, but the "
        f"value it observes has shape {got}"
    )
    if tuple(y.shape) != got:
        msg += f" (from y of shape {tuple(y.shape)})"
    try:
        both = tuple(torch.broadcast_shapes(want, got))
    except RuntimeError:
        both = None
    if both is not None and both != want:
        msg += f"; broadcasting them would give a {both} likelihood, not one term per observation"
    if math.prod(want) == math.prod(got):
        msg += f"; pass y reshaped to {want}"
    else:
        msg += (
            "; check that the model's output has one entry per observation (e.g. a mean of "
            "shape (N,) in pyro.plate('data', N) for y of shape (N,))"
        )
    raise DataError(msg)
