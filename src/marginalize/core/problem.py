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
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import site_is_subsample

from marginalize._isolation import no_validation
from marginalize._validation import check_x, check_y
from marginalize.core.data import ArrayData, DataSource, LoaderData, as_data, is_loader
from marginalize.core.layout import Layout, _is_latent, check_sites
from marginalize.errors import DataError, ModelError, OutOfMemoryError, is_out_of_memory
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


def _raw_trace(fn: Callable, x: torch.Tensor, y: torch.Tensor | None, shape=None):
    try:
        with _RefuseSubsample():
            return poutine.trace(fn).get_trace(x, y)
    except (DataError, ModelError):
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise out_of_memory(f"a call of the model on {x.shape[0]} rows", e) from e
        raise ModelError(
            f"the model raised {type(e).__name__} when called as model(x, y) with x of shape "
            f"{shape or tuple(x.shape)}: {e}"
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


def _contract(
    fn: Callable, x: torch.Tensor, y: torch.Tensor, obs_site: str | None, shape=None
) -> UserModel:
    """Read a model function's contract from one trace on (a few rows of) the data, before
    any fitting; ``shape``: the whole data's, for messages."""
    shape = tuple(x.shape) if shape is None else tuple(shape)
    with torch.random.fork_rng(devices=[]):
        tr = _raw_trace(fn, x, y, shape)
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
    if len(data_plates) > 1 or (data_plates and x.shape[0] <= EXAMPLE_ROWS and x.shape[0] > 1):
        # traced on a few rows: keep the plates whose size follows the number of rows (a
        # plate over hidden units may have as many entries as the rows traced)
        try:
            with torch.random.fork_rng(devices=[]):
                one = _raw_trace(fn, x[:1], y[:1]).nodes.get(obs)
        except (DataError, ModelError):
            one = None
        if one is not None:
            sizes = {f.name: f.size for f in one["cond_indep_stack"]}
            data_plates = {p for p in data_plates if sizes.get(p) == 1} or data_plates
    if not data_plates:
        hint = ""
        if not onode["cond_indep_stack"] and tuple(onode["fn"].event_shape)[:1] == (x.shape[0],):
            hint = (
                f"; its rows are event dims (.to_event): drop that and write "
                f"`with pyro.plate('data', x.shape[0]): pyro.sample({obs!r}, ..., obs=y)`"
            )
        raise ModelError(
            f"site {obs!r} must be inside pyro.plate('data', N) so it can be minibatched "
            f"(N = x.shape[0] = {shape[0]}){hint}"
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


def trace_model(model: Callable, x: torch.Tensor, y: torch.Tensor | None, shape=None):
    """Trace the (canonical) model once and check the contract; return the trace
    (``shape``: that of the whole data, for messages)."""
    try:
        tr = poutine.trace(model).get_trace(x, y)
    except (DataError, ModelError):
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise out_of_memory(f"a call of the model on {x.shape[0]} rows", e) from e
        raise ModelError(
            f"the model raised {type(e).__name__} when called as model(x, y) with x of shape "
            f"{shape or tuple(x.shape)}: {e}"
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

#: rows the model is traced on to read its contract and the layout (the data are checked
#: against it in chunks afterwards)
EXAMPLE_ROWS = 5
#: activation bytes one call of the network may use while the data are checked
CHECK_BYTES = 64 * 2**20
#: the most rows of one call of the network while the data are checked
CHECK_ROWS = 1024
#: activation bytes one call of the network may use while BatchNorm statistics are recomputed
STATE_BYTES = 256 * 2**20


def check_rows(model: Callable, x: torch.Tensor, budget: int = CHECK_BYTES) -> int:
    """Rows per call of the network for a pass over data: ``budget`` over the measured
    activation bytes of one input (``activation_bytes_per_input`` of the model), at most
    :data:`CHECK_ROWS`."""
    measure = getattr(model, "activation_bytes_per_input", None)
    if measure is None:
        return CHECK_ROWS
    try:
        per = int(measure(x[:1]))
    except Exception as e:  # noqa: BLE001 - a probe that fails: the cap alone
        if is_out_of_memory(e):
            raise out_of_memory("the probe of the model's activation memory (one input)", e) from e
        log.debug("activation probe failed (%s: %s)", type(e).__name__, e)
        return CHECK_ROWS
    return int(max(1, min(CHECK_ROWS, budget // max(per, 1))))


def out_of_memory(step: str, e: BaseException, advice: str = "") -> OutOfMemoryError:
    """The error for an allocation failure during ``step``."""
    tail = f"; {advice}" if advice else ""
    return OutOfMemoryError(f"{step}: out of memory ({type(e).__name__}: {e}){tail}")


@dataclass
class Problem:
    """A model with its (validated) training data.

    Attributes
    ----------
    model : callable
        The canonical model (a builder model or a :class:`UserModel`).
    data : DataSource
        The training data: in-memory arrays or a data loader (``core/data.py``).
    layout : Layout
    task : str
    num_classes : int or None
    meta : dict
        ``dtype``, ``device``, ``example`` (a few converted rows), method-specific values.
    state : dict or None
        For a network with BatchNorm layers (``model.stateful``), the running statistics it
        is evaluated with (the module's own at the start; what training reached after it).
    training : BatchStatistics or None
        While set (inside the training loop's steps), a stateful network runs its BatchNorm
        layers in train mode (batch statistics) and updates this object.
    """

    model: Callable
    data: DataSource
    layout: Layout
    task: str
    num_classes: int | None = None
    meta: dict = field(default_factory=dict)
    state: dict | None = None
    training: Any = None

    @property
    def n(self) -> int:
        return self.data.n

    @property
    def in_memory(self) -> bool:
        """Whether the data are arrays held in memory (else a data loader)."""
        return self.data.in_memory

    @property
    def x(self) -> torch.Tensor:
        """The training inputs, for in-memory data (a data loader raises ``DataError``)."""
        if self.data.in_memory:
            return self.data.x
        raise self.needs_memory()

    @property
    def y(self) -> torch.Tensor:
        """The training targets, for in-memory data (a data loader raises ``DataError``)."""
        if self.data.in_memory:
            return self.data.y
        raise self.needs_memory()

    def needs_memory(self, what: str = "this step") -> DataError:
        """The error of a step that needs every row at once, for data from a loader."""
        method = self.meta.get("method", "the fit")
        return DataError(
            f"{method}: {what} needs the whole training data at once, in memory (arrays x, y), "
            f"but they come from a data loader ({self.data!r}). Use a method or option that "
            "trains on minibatches (see docs/guide/deep_learning.md), or pass the data as "
            "arrays: mz.fit(model, x, y, ...)"
        )

    @property
    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A few rows of the data, converted as the model takes them (for traces, probes)."""
        return self.meta["example"]

    @property
    def vectorized(self) -> bool:
        return isinstance(self.model, BNN)

    @property
    def stateful(self) -> bool:
        """Whether the network holds weight-dependent state (BatchNorm running statistics)."""
        return bool(getattr(self.model, "stateful", False))

    @property
    def device(self) -> torch.device:
        return self.meta["device"]

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of the fit: x's, or the default one for integer inputs."""
        return self.meta["dtype"]

    def rows(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """A minibatch ``(x, y)`` of the data (e.g. from a data loader) as the model takes
        it: on the fit's device, floats in its dtype, targets converted as ``prepare`` does
        and class labels checked against the model's classes."""
        x = x.to(self.device, non_blocking=True)
        if x.is_floating_point() or not self.meta.get("keep_int", False):
            x = x.to(self.dtype)
        y = y.to(self.device, non_blocking=True)
        model = self.model
        if isinstance(model, BNN):
            y = model.likelihood.check_y(y, model.out_features)
        elif isinstance(model, UserModel):
            y = model.coerce_y(y)
        if torch.is_floating_point(y):
            y = y.to(self.dtype)
        labels = self.meta.get("labels")
        if labels is not None and y.numel():
            _check_labels(y, labels)
        return x, y

    def batches(self, rows: int | None = None):
        """One pass over the data: ``(x, y)`` chunks of at most ``rows`` rows (a loader's own
        minibatches, split where larger), converted by :meth:`rows`."""
        if self.data.in_memory:
            n = self.n
            step = n if rows is None else max(1, int(rows))
            for i in range(0, n, step):
                yield self.x[i : i + step], self.y[i : i + step]
            return
        for xb, yb in self.data.chunks(rows):
            yield self.rows(xb, yb)

    def inputs(self, rows: int | None = None):
        """The inputs of :meth:`batches` (e.g. for BatchNorm statistics)."""
        for x, _ in self.batches(rows):
            yield x

    def state_at(self, z: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The BatchNorm running statistics of a stateful network at the points ``z``
        ``(*batch, D)``, recomputed by one pass over the training inputs in chunks sized from
        the measured activation memory (``state_from_data``): tensors with the leading dims
        ``*batch``; ``None`` for a network without.

        Raises
        ------
        OutOfMemoryError
            Names the step."""
        if not self.stateful:
            return None
        params = self.layout.unpack(z.to(self.device, self.dtype))
        draws = max(1, math.prod(z.shape[:-1]))
        rows = check_rows(self.model, self.example[0], STATE_BYTES // draws)
        try:
            return self.model.state_from_data(params, self.inputs(max(rows, 2)))
        except RuntimeError as e:
            if is_out_of_memory(e):
                raise out_of_memory(
                    f"BatchNorm statistics at the fitted weights ({rows} rows per call)", e
                ) from e
            raise

    def refresh_state(self, z: torch.Tensor) -> None:
        """``state`` recomputed at the point ``z`` ``(D,)`` (see :meth:`state_at`)."""
        if self.stateful:
            self.state = self.state_at(z)

    def _state_kw(self) -> dict:
        if not self.stateful:
            return {}
        return {"state": self.training if self.training is not None else self.state}

    def log_joint(self, z: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(w(z), y | x) + log|J|``; with ``idx`` a minibatch scaled to the full data.

        Batched over leading dims of ``z`` and differentiable in ``z``. Plain model functions
        are evaluated by their compiled log joint (``core/compiled``) where the model could be
        compiled, else by :meth:`log_joint_traced`. Needs in-memory data (see
        :meth:`log_joint_rows` for rows given)."""
        if self.vectorized:
            x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
            scale = 1.0 if idx is None else self.n / len(idx)
            params, ladj = self.layout.unpack_with_log_det(z)
            return self.model.log_joint(params, x, y, obs_scale=scale, **self._state_kw()) + ladj
        compiled = self.compiled()
        out = None if compiled is None else compiled.log_joint(z, idx)
        return self.log_joint_traced(z, idx) if out is None else out

    def log_joint_rows(self, z: torch.Tensor, x, y, scale: float) -> torch.Tensor:
        """``log p(w(z)) + scale * log p(y | x, w(z)) + log|J|`` on the rows ``(x, y)`` (a
        minibatch of a data loader: ``scale = N / B``), batched over leading dims of ``z``."""
        if self.vectorized:
            params, ladj = self.layout.unpack_with_log_det(z)
            return self.model.log_joint(params, x, y, obs_scale=scale, **self._state_kw()) + ladj
        if z.dim() != 1:
            flat = z.reshape(-1, z.shape[-1])
            out = [self.log_joint_traced_on(zi, x, y, scale) for zi in flat]
            return torch.stack(out).reshape(z.shape[:-1])
        return self.log_joint_traced_on(z, x, y, scale)

    def log_joint_batch(self, z: torch.Tensor, batch) -> torch.Tensor:
        """:meth:`log_joint` of a training-loop minibatch: rows by index (in-memory data) or
        the rows it carries (a data loader's)."""
        if getattr(batch, "x", None) is None:
            return self.log_joint(z, batch.idx)
        return self.log_joint_rows(z, batch.x, batch.y, batch.scale)

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
        for builder models, subclasses with their own ``log_joint``, data from a loader and
        when ``meta["compiled"] = False``."""
        if "_compiled" not in self.__dict__:
            comp = None
            if (
                not self.vectorized
                and self.data.in_memory
                and self.meta.get("compiled", True)
                and type(self).log_joint is Problem.log_joint
            ):
                from marginalize.core.compiled import CompiledLogJoint

                comp = CompiledLogJoint(self)
            self.__dict__["_compiled"] = comp
        return self.__dict__["_compiled"]

    def log_joint_path(self) -> str:
        """Which log joint a fit of this problem evaluated, for ``post.info["log_joint"]``:
        ``"closed form"`` (builder MLPs with the package's priors and likelihoods: an analytic
        gradient), ``"network"`` (other builders and wrapped modules: batched forwards), or for
        plain model functions ``"compiled"``, ``"compiled, Pyro trace for ..."`` or ``"Pyro
        trace"`` (not compiled: see the fit's warning)."""
        if self.vectorized:
            return "closed form" if self.__dict__.get("_fast") is not None else "network"
        comp = self.__dict__.get("_compiled")
        return "Pyro trace" if comp is None else comp.path()

    def fast_potential(self):
        """The closed-form potential with an analytic gradient (``core/potentials.py``)
        for builder MLPs with the package's priors and likelihoods, else ``None``. Set
        ``meta["fast_potential"] = False`` to always use the general path. With data from a
        loader it holds a few example rows (minibatches bring their own)."""
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
            tr = poutine.trace(self.model).get_trace(self.example[0][:2], None)
        return self.layout.pack({s.name: tr.nodes[s.name]["value"] for s in self.layout.sites}).to(
            self.device, self.dtype
        )


def prepare(
    model: Callable,
    x,
    y=None,
    *,
    n: int | None = None,
    device=None,
    obs_site: str | None = None,
) -> Problem:
    """Validate the data against the model and build the :class:`Problem`.

    The model is traced on a few rows (its contract, the layout, the shape of ``y``); then
    the data are checked against it in chunks (class labels, the support of the observation
    family, a finite log likelihood at a draw from the prior), each call of the network on at
    most :func:`check_rows` rows (sized from the model's measured activation memory), so no
    call sees every row at once. With a data loader, the first minibatch is checked this way
    and every later one as the fit reads it (labels, shapes, finite values).

    Parameters
    ----------
    model : callable
        A builder model, or a Pyro model function ``model(x, y=None)`` (wrapped in a
        :class:`UserModel`; a :class:`UserModel` is taken as it is).
    x, y : array-like or torch.Tensor, or a data loader and None
        Training inputs ``(N, ...)`` and targets ``(N, ...)``; or, as ``x``, a
        ``torch.utils.data.DataLoader`` (any re-iterable of ``(x, y)`` minibatches) with
        ``y=None``.
    n : int, optional
        Rows of a data loader that cannot tell (see :class:`~marginalize.core.data.LoaderData`).
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
    OutOfMemoryError
        A check ran out of memory (names the step).
    """
    if not callable(model):
        raise ModelError(f"model must be callable as model(x, y=None), got {type(model).__name__}")
    if isinstance(x, ArrayData):
        x, y = x.x, x.y if y is None else y
    if isinstance(x, torch.utils.data.Dataset) and not hasattr(x, "__iter__"):
        raise DataError(
            f"x: a {type(x).__name__} (a torch Dataset) is read through a DataLoader: pass "
            "DataLoader(dataset, batch_size=..., shuffle=True)"
        )
    loader = isinstance(x, LoaderData) or (not isinstance(x, DataSource) and is_loader(x))
    if not loader and n is not None:
        raise DataError("n: the number of rows is given only with a data loader as x")
    keep_int = isinstance(model, BNN) and model.integer_inputs  # e.g. token ids (Embedding)
    if loader:
        source = as_data(x, y, n=n)
        if not source.has_targets:
            raise DataError(
                "x: the data loader yields inputs without targets; a fit needs (x, y) minibatches"
            )
        x_t, y_t = next(iter(source.chunks()))  # the first minibatch is checked
        if device is not None:
            x_t, y_t = x_t.to(device), y_t.to(device)
    else:
        if y is None:
            raise DataError(
                "y: missing; pass the training targets y, or a data loader of (x, y) minibatches "
                "as x (y=None)"
            )
        if device is None and isinstance(x, torch.Tensor):
            device = x.device
        x_t = check_x("x", x, device=device, keep_int=keep_int)
        y_t = check_y(y, x_t.shape[0], device=device)
    device = x_t.device
    shape = (source.n if loader else x_t.shape[0], *x_t.shape[1:])  # for messages
    fdtype = x_t.dtype if x_t.is_floating_point() else torch.get_default_dtype()
    num_classes = None
    if isinstance(model, BNN):
        if obs_site not in (None, OBS):
            raise ModelError(
                f"obs_site={obs_site!r}: a builder model's observation site is always 'y'"
            )
        x_t = model.check_input(x_t, "x")
        keep_int = keep_int and not x_t.is_floating_point()
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
        rows = check_rows(model, x_t)
        model = _contract(model, x_t[:rows], y_t[:rows], obs_site, shape)
        y_t = model.coerce_y(y_t)
    # the contract and the layout from the first chunk of rows (all of them when they fit one
    # call), the rest of the data checked against it in chunks
    rows = check_rows(model, x_t)
    k = min(EXAMPLE_ROWS, x_t.shape[0])
    x_ex, y_ex = x_t[:k], y_t[:k]
    x_c, y_c = x_t[:rows], y_t[:rows]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            tr = trace_model(model, x_c, y_c, shape)
            # latent shapes must not depend on the number of data points
            tr2 = trace_model(model, x_c[:1], y_c[:1], shape)
    except OutOfMemoryError as e:
        raise out_of_memory(
            f"checking the data against the model ({x_c.shape[0]} rows per call)", e
        ) from e
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
    _check_obs_shape(model, ysite, y_c)
    task = model.task if isinstance(model, BNN) else detect_task(ysite["fn"])
    base = observation_dist(ysite["fn"])
    if task == "classification" and num_classes is None:
        if isinstance(base, torch.distributions.Bernoulli):
            num_classes = 2
        else:
            num_classes = int(
                base.logits.shape[-1] if hasattr(base, "logits") else base.probs.shape[-1]
            )
    labels = None
    if task == "classification" and (
        not torch.is_floating_point(y_t) or isinstance(base, torch.distributions.Categorical)
    ):
        labels = num_classes
        _check_labels(y_t, labels)
    meta = {"dtype": fdtype, "device": device, "example": (x_ex, y_ex), "keep_int": keep_int}
    meta["labels"] = labels
    if loader:
        meta["first"] = (x_t, y_t)  # the first minibatch, converted
    data = source if loader else ArrayData(x_t, y_t)
    problem = Problem(model, data, layout, task, num_classes, meta=meta)
    _check_likelihood(problem, tr, x_t, y_t, rows)
    if problem.stateful:
        problem.state = model.module_state(device, fdtype)
    return problem


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(
            f"y: labels must lie in [0, {num_classes - 1}] for the model's {num_classes} classes"
        )


def _check_likelihood(problem: Problem, tr, x: torch.Tensor, y: torch.Tensor, rows: int) -> None:
    """The observations in the support of the observation family, and a finite log
    likelihood at the prior draw of ``tr``: on every row of in-memory data (on a data
    loader's first minibatch, ``x``, ``y``), in chunks of ``rows`` rows (a chunk of another
    size must sample the fitted latent sites)."""
    model = problem.model
    latents = {name: node["value"] for name, node in tr.nodes.items() if _is_latent(node)}
    fixed = poutine.condition(model, data=latents)
    shape = tuple(x.shape)
    for i in range(0, x.shape[0], rows):
        xc, yc = x[i : i + rows], y[i : i + rows]
        try:
            if i == 0:  # the rows ``tr`` was traced on
                trc = tr
            else:
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    trc = trace_model(fixed, xc, yc, shape)
            ysite = trc.nodes[OBS]
            if xc.shape[0] != min(rows, x.shape[0]):
                check_sites(
                    problem.layout, trc, f"with {xc.shape[0]} data points (the fit has {shape[0]})"
                )
        except OutOfMemoryError as e:
            raise out_of_memory(
                f"checking the data against the model ({xc.shape[0]} rows per call)", e
            ) from e
        # checked here whatever torch's global argument validation is set to (without it,
        # e.g. Bernoulli's log_prob takes the label 2 and returns a finite number)
        d = observation_dist(ysite["fn"])
        try:
            inside = bool(d.support.check(ysite["value"]).all())
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            inside = True
        if not inside:
            raise DataError(
                "y: has values outside the support of the model's observation distribution "
                f"{type(d).__name__}"
            )
        try:
            lp = ysite["fn"].log_prob(ysite["value"])
        except Exception as e:
            raise DataError(
                f"y: does not fit the model's observation distribution {type(d).__name__}: {e}"
            ) from e
        if not bool(torch.isfinite(lp).all()):
            raise _blame_non_finite(ysite["fn"], ysite["value"], x)


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
