"""The registry: inference methods by name, and :func:`fit`.

A method is a class with a ``name``, an ``Options`` dataclass (every option declared with
its default, its check and its meaning: :mod:`~marginalize.inference.engines.options`) and
``run(problem, options, seed, progress)`` returning ``(approximation, info)`` with ``info`` a
:class:`~marginalize.core.info.FitInfo`. Registration is explicit::

    @register("my-method")
    class MyMethod(Method):
        @dataclass
        class Options(TrainOptions):
            my_option: float = option(1.0, number(0, 10), "what it does")
        def run(self, problem, opts, seed, progress):
            ...
            return approximation, run.info()

``docs/ARCHITECTURE.md`` ("Adding a method") shows a complete one.

Examples
--------
>>> import marginalize as mz
>>> "nuts" in mz.methods()
True
>>> mz.fit(None, [[0.0]], [0.0], method="nust")
Traceback (most recent call last):
...
marginalize.errors.OptionError: unknown method 'nust'; did you mean 'nuts'? known: ...
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from marginalize._isolation import exclusive
from marginalize._validation import check_device, check_option_values, check_options, check_seed
from marginalize.core.approximations import Mixture
from marginalize.core.info import FitInfo
from marginalize.core.problem import Problem, prepare
from marginalize.core.scales import check_scales
from marginalize.errors import DataError, OptionError
from marginalize.inference.engines import checkpoint, distributed, interrupt
from marginalize.inference.engines.init import check_init
from marginalize.inference.engines.options import Options
from marginalize.inference.engines.seeding import isolated
from marginalize.posterior import Posterior

__all__ = [
    "Method",
    "register",
    "methods",
    "get_method",
    "fit",
    "resume",
    "method_info",
    "MethodTable",
]

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Method]] = {}


class Method:
    """Base class of inference methods (see the module docstring)."""

    name: ClassVar[str] = ""
    #: one line: what the method is
    summary: ClassVar[str] = ""
    #: training and prediction cost, in words
    cost: ClassVar[str] = ""
    #: the paper it follows
    reference: ClassVar[str] = ""
    #: float dtypes of the data it refuses, with why (e.g. MCMC in float16)
    refuses_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()
    refuses_dtypes_why: ClassVar[str] = ""

    Options: ClassVar[type[Options]] = Options

    #: why the method needs every row of the data at once (full-batch gradients at every
    #: step), or ``None``: such a method refuses a data loader before fitting
    full_data: ClassVar[str | None] = None

    def run(self, problem: Problem, opts: Any, seed: int, progress: bool) -> tuple[Any, FitInfo]:
        """Fit ``problem``: ``(approximation over z, FitInfo)``."""
        raise NotImplementedError

    def check(self, problem: Problem, opts: Any, given: dict[str, Any]) -> None:
        """What the options and the data say together, before any fitting (raise
        ``OptionError`` or ``DataError``); ``given``: the options the user passed. The base
        checks data loaders (methods that need every row at once refuse them; the minibatches
        are the loader's), ``init`` against the model, and ``steps`` against ``epochs``."""
        if not problem.in_memory:
            if self.full_data is not None:
                raise DataError(
                    f"{self.name}: {self.full_data}, so it cannot read a data loader. Use a "
                    "method that trains on minibatches (svi-meanfield, svi-lowrank, swag, "
                    "multiswag, ensemble, mc-dropout, laplace), or pass the data as arrays: "
                    f"mz.fit(model, x, y, method={self.name!r})"
                )
            if given.get("batch_size") is not None:
                raise OptionError(
                    "batch_size: with a data loader the minibatches are the loader's; set the "
                    "batch size on the DataLoader"
                )
            if getattr(opts, "optimizer", None) == "lbfgs":
                raise OptionError(
                    "optimizer: 'lbfgs' takes full-batch steps and needs the data in memory; "
                    "with a data loader use 'adam' (or 'auto', which does)"
                )
        if hasattr(opts, "init") and isinstance(opts.init, str):
            check_init(problem, opts.init)
        if problem.stateful and getattr(opts, "engine", None) == "pyro":
            raise OptionError(
                "engine: 'pyro' runs the model as a Pyro program, whose BatchNorm layers cannot "
                "train in train mode; use engine='auto' for a network with BatchNorm"
            )
        if given.get("epochs") is not None and "steps" in given:
            raise OptionError(
                "epochs: give steps or epochs, not both (epochs sets steps = epochs x "
                "minibatches per pass)"
            )

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return cls.Options.defaults()

    @classmethod
    def option_docs(cls) -> dict[str, str]:
        return cls.Options.docs()

    @classmethod
    def make_options(cls, given: dict[str, Any]):
        check_options(cls.name, given, cls.option_defaults())
        try:
            return cls.Options(**given)
        except (TypeError, ValueError) as e:
            if isinstance(e, OptionError):
                raise
            raise OptionError(f"method {cls.name!r}: {e}") from e


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a :class:`Method` reachable as ``fit(..., method=name)``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def methods() -> list[str]:
    """Names of every registered inference method, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str):
        raise OptionError(
            f"method must be a name (str), got {type(name).__name__}; known: {methods()}"
        )
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, methods(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise OptionError(f"unknown method {name!r}{hint} known: {', '.join(methods())}")
    return _REGISTRY[name]


class MethodTable(list):
    """The rows of :func:`method_info`, one dict per method in name order (a list, as it
    always was: ``for row in mz.method_info()``), also looked up by name
    (``mz.method_info()["map"]``, ``"map" in ...``, ``.keys()``, ``.values()``, ``.items()``)."""

    def __getitem__(self, key):
        if isinstance(key, str):
            for row in self:
                if row["name"] == key:
                    return row
            names = [r["name"] for r in self]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown method {key!r}{hint} known: {', '.join(names)}")
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        if isinstance(key, str):
            return any(r["name"] == key for r in self)
        return super().__contains__(key)

    def keys(self) -> list[str]:
        return [r["name"] for r in self]

    def values(self) -> list[dict[str, Any]]:
        return list(self)

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        return [(r["name"], r) for r in self]


#: activation bytes a full-batch gradient may take before the methods' default
#: ``batch_size=None`` becomes minibatches of :data:`AUTO_BATCH_SIZE` (every intermediate
#: result of a forward counted: about what its backward keeps)
FULL_BATCH_BYTES = 2**30
#: the minibatch size chosen then (the deep-learning recipes' usual 128)
AUTO_BATCH_SIZE = 128


def scaled_batch_size(problem: Problem, opts: Any, given: Mapping[str, Any]) -> int | None:
    """Defaults that scale: the minibatch size a method with ``batch_size=None`` (its default,
    the full batch) trains with when one full-batch gradient would need more than
    :data:`FULL_BATCH_BYTES` of activations (the model's measured bytes per input x N),
    else ``None`` (the default stands: small problems keep their full-batch fits). Never
    when the user chose ``batch_size`` or the L-BFGS optimizer, nor for data loaders (their
    own batches)."""
    if not problem.in_memory or "batch_size" in given or given.get("optimizer") == "lbfgs":
        return None
    if getattr(opts, "batch_size", 0) is not None:  # no such option, or one is set
        return None
    measure = getattr(problem.model, "activation_bytes_per_input", None)
    if measure is None:
        return None
    try:
        per = int(measure(problem.example[0][:1]))
    except Exception:  # noqa: BLE001 - no probe: the default stands
        return None
    if per * problem.n <= FULL_BATCH_BYTES:
        return None
    log.info(
        "%s: a full-batch gradient over %d rows needs about %.1f GiB of activations: "
        "minibatches of %d (pass batch_size= to choose)",
        getattr(opts, "name", "fit"),
        problem.n,
        per * problem.n / 2**30,
        AUTO_BATCH_SIZE,
    )
    return min(AUTO_BATCH_SIZE, problem.n)


def method_info() -> MethodTable:
    """Every method (sorted by name): a row with ``name``, ``summary``, ``options`` (name ->
    default), ``docs`` (name -> meaning), ``cost`` and ``reference``, from the method's
    declared options. A list of the rows that is also indexed by name (:class:`MethodTable`).

    Examples
    --------
    >>> import marginalize as mz
    >>> row = mz.method_info()["svi-lowrank"]
    >>> row["options"]["rank"], row["docs"]["rank"]
    (10, 'rank of the covariance factor')
    >>> [r["name"] for r in mz.method_info()] == mz.methods() == list(mz.method_info().keys())
    True
    """
    return MethodTable(
        {
            "name": n,
            "summary": c.summary,
            "options": c.option_defaults(),
            "docs": c.option_docs(),
            "cost": c.cost,
            "reference": c.reference,
        }
        for n, c in sorted(_REGISTRY.items())
    )


def fit(
    model: Callable,
    x,
    y=None,
    method: str | None = None,
    *,
    n: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    obs_site: str | None = None,
    **options: Any,
) -> Posterior:
    """Fit ``model`` to ``(x, y)`` with the inference method named ``method``.

    Parameters
    ----------
    model : callable
        A Pyro model ``model(x, y=None)`` with latent weight sites and one observed site
        (``"y"``, ``"obs"``, ...) inside ``pyro.plate("data", N)``, e.g. from
        :func:`marginalize.models.mlp` (see ``docs/guide/bring_your_own_model.md``).
    x, y : array-like or torch.Tensor; or a data loader and None
        Training inputs ``(N, ...)`` and targets ``(N, ...)``. Or, as ``x``, a
        ``torch.utils.data.DataLoader`` (any re-iterable of ``(x, y)`` minibatches) and no
        ``y``: the methods that train on minibatches take the loader's own batches (its
        shuffling and transforms, e.g. random crop and flip, run at every step); the methods
        that need every row at once (``nuts``, ``hmc``; ``map``'s L-BFGS) say so before
        fitting. See ``docs/guide/deep_learning.md``.
    method : str
        A name from :func:`methods`.
    n : int, optional
        Rows in one pass of a data loader that cannot tell (one with no sampler or data set
        with a length).
    seed : int
        In ``[0, 2**32 - 1]``. All randomness of the fit derives from it; the same seed gives
        bitwise the same result on the same device. The fit runs alone: fits in other threads
        wait for it, and Pyro handlers the caller left open (``pyro.plate``,
        ``poutine.scale``, ...) do not act on it.
    device : str or torch.device, optional
        Where to fit (default: the device of ``x``, else the CPU).
    progress : bool
        Show a progress bar.
    obs_site : str, optional
        The observed site to fit, for a model function with several (default: its one
        observed site).
    **options
        The method's options (see ``mz.method_info()``); an unknown one raises ``OptionError``.
        Every method takes ``checkpoint=PATH, checkpoint_every=N`` (except ``laplace``'s
        curvature, every part of a fit is resumable): the fit's state is saved there and
        :func:`marginalize.resume` continues it. One Ctrl-C stops the fit at the end of the
        current step and returns what it reached (``post.info.stopped``); a second stops at
        once.

    Notes
    -----
    In a distributed run (an initialized ``torch.distributed`` process group, e.g. under
    ``torchrun``), the members and chains of ``ensemble``, ``multiswag``, ``nuts``, ``hmc``,
    ``sgld`` and ``sghmc`` are spread over the ranks and gathered: every rank returns the same
    posterior, bitwise the one a single process gives with the same seed (same machine and torch
    thread count). The optimization methods train data-parallel: each rank takes its share of
    every minibatch and the gradients are summed over the ranks (equal to one process up to
    float rounding).
    Every rank must call ``fit`` with the same arguments. See ``docs/guide/distributed.md``.

    A network with BatchNorm layers (``bayesian(module)``) trains them in train mode (batch
    statistics); the posterior carries the running statistics at the fitted weights
    (``Posterior.state``, one set per chain, recomputed by one pass over the training inputs
    after training; the module's own when no optimizer step was taken).

    Returns
    -------
    Posterior

    Raises
    ------
    OptionError, DataError, ModelError
        Bad options, data or model (see ``docs/input_checks.md``), before any fitting starts.
    OutOfMemoryError
        A step ran out of memory (the message names it).
    """
    if method is None:
        raise OptionError(f"method: missing; pass method=NAME, one of {', '.join(methods())}")
    cls = get_method(method)
    opts = cls.make_options(options)
    seed = check_seed("seed", seed)
    distributed.check_launch()  # torchrun without a process group: a warning
    device = check_device(device)
    # Pyro's param store, handler stack and plate dims are process globals: one fit at a time,
    # with the caller's open handlers set aside (see marginalize._isolation)
    with exclusive():
        problem = prepare(model, x, y, n=n, device=device, obs_site=obs_site)
        problem.meta["method"] = cls.name
        method_obj = cls()
        auto_batch = scaled_batch_size(problem, opts, options)
        if auto_batch is not None:  # a full batch would not fit: minibatches (documented)
            opts.batch_size = auto_batch
        method_obj.check(problem, opts, options)
        if getattr(opts, "epochs", None) is not None:
            opts.steps = opts.epochs * problem.data.batches_per_epoch(opts.batch_size)
        check_option_values(opts, problem.dtype)
        if problem.dtype in cls.refuses_dtypes:
            raise DataError(
                f"x: the data are {str(problem.dtype)[6:]}, and {cls.name} {cls.refuses_dtypes_why}"
                "; pass x and y as float32 (x.float(), y.float()) or float64"
            )
        check_scales(problem, stacklevel=3)  # data far from the priors' scale: ScaleWarning
        # a distributed run (torchrun): members and chains are spread over the ranks
        # (engines/distributed.py); progress bars on rank 0 only
        rank = distributed.rank() if distributed.is_distributed() else 0
        progress = progress and distributed.is_main()
        with (
            interrupt.scope(),
            isolated(seed),
            checkpoint.session(cls.name, opts, seed, problem, rank=rank),
        ):
            approx, info = method_obj.run(problem, opts, seed, progress)
            # a pass over the data (a loader's shuffle and transforms): in the fit's RNG scope
            state = final_state(problem, approx)
    if not isinstance(info, FitInfo):
        info = FitInfo.from_dict(info)
    info.details.setdefault("log_joint", problem.log_joint_path())
    if auto_batch is not None:
        info.details.setdefault("batch_size", f"auto: {auto_batch} (full batch too large)")
    return Posterior(
        problem.model,
        problem.layout,
        approx,
        method=cls.name,
        task=problem.task,
        options=opts.record() if hasattr(opts, "record") else dataclasses.asdict(opts),
        info=info,
        seed=seed,
        data=(problem.x, problem.y) if problem.in_memory else problem.data,
        num_classes=problem.num_classes,
        state=state,
        example=None if problem.in_memory else problem.example,
    )


def chain_points(approx) -> torch.Tensor | None:
    """One point per chain of ``approx`` ``(C, D)`` (the mean of a Gaussian or dropout
    approximation, the point of a Delta, each component's for a mixture), or ``None`` for
    stored draws."""
    if isinstance(approx, Mixture):
        parts = [chain_points(c) for c in approx.components]
        return None if any(p is None for p in parts) else torch.cat(parts)
    loc = getattr(approx, "loc", None)
    return None if loc is None else loc.reshape(1, -1)


def final_state(problem: Problem, approx) -> dict[str, torch.Tensor] | None:
    """The BatchNorm running statistics a fitted posterior carries, ``{name: (C, ...)}`` (one
    set per chain), or ``None`` for a network without: set by the method
    (``problem.meta["final_state"]``), else recomputed at each chain's point by one pass over
    the training inputs when training changed the weights, else the start's
    (``problem.state``)."""
    if not problem.stateful:
        return None
    given = problem.meta.get("final_state")
    if given is not None:
        return given
    chains = approx.num_chains
    points = chain_points(approx)
    if problem.meta.get("trained_state") and points is not None:
        return problem.state_at(points)
    if problem.state is None:
        return None
    return {k: v.unsqueeze(0).repeat(chains, *([1] * v.dim())) for k, v in problem.state.items()}


def resume(
    path,
    model,
    x,
    y=None,
    *,
    n: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    obs_site: str | None = None,
):
    """Continue the fit saved in the checkpoint ``path`` to its end.

    The method, its options and the seed come from the file; ``model``, ``x`` and ``y`` must be
    the ones the fit started with (checked: latent sites, builder config and a SHA-256 of the
    data). The result is bitwise the one an uninterrupted fit gives. Checkpoints continue to
    be written to ``path``. A finished checkpoint gives back the finished fit without
    recomputing it.

    Parameters
    ----------
    path : str or Path
        A file written by ``mz.fit(..., checkpoint=path)``.
    model : callable
        The same model (code is never stored in files).
    x, y : array-like or torch.Tensor, or a data loader and None
        The same training data. With a data loader, the resumed fit reads the same
        minibatches as the uninterrupted one wherever the loader's randomness comes from
        torch's, Python's or NumPy's global RNG or the loader's own generators (see
        ``engines/training.py``, ``LoaderBatches``); otherwise new ones for the rest of the
        interrupted pass (parameters and optimizer state are restored exactly).
    n : int, optional
        As given to :func:`fit`.
    device : optional
        Where to continue (default: the device of ``x``).
    progress : bool
        Show a progress bar.
    obs_site : str, optional
        As given to :func:`fit` (model functions with several observed sites).

    Returns
    -------
    Posterior

    Raises
    ------
    FileNotFoundError, FileFormatError
        No such file; a truncated, corrupted or foreign file.
    ModelError, DataError
        ``model`` or ``x``/``y`` differ from the fit's.

    Examples
    --------
    >>> import torch, tempfile, os, marginalize as mz
    >>> x = torch.randn(30, 1); y = x[:, 0] + 0.1 * torch.randn(30)
    >>> model = mz.models.mlp(1, hidden=[4])
    >>> path = os.path.join(tempfile.mkdtemp(), "fit.ckpt")
    >>> post = mz.fit(model, x, y, method="map", steps=60, checkpoint=path, checkpoint_every=20,
    ...               progress=False)
    >>> again = mz.resume(path, model, x, y, progress=False)   # finished: restored, not refitted
    >>> bool(torch.equal(post.predict(x).mean, again.predict(x).mean))
    True
    """
    with checkpoint.pending(path) as (method, options, seed):
        if options.get("epochs") is not None:  # steps were set from epochs
            options.pop("steps", None)
        return fit(
            model,
            x,
            y,
            method,
            n=n,
            seed=seed,
            device=device,
            progress=progress,
            obs_site=obs_site,
            **options,
        )
