"""The registry: inference methods by name, and :func:`fit`.

A method is a class with a ``name``, an ``Options`` dataclass (every option with its default;
``__post_init__`` validates values) and ``run(problem, options, seed, progress)`` returning
``(approximation, info)``. Registration is explicit::

    @register("my-method")
    class MyMethod(Method):
        @dataclass
        class Options:
            steps: int = 1000
        def run(self, problem, opts, seed, progress):
            ...
            return approximation, {"loss": losses}

Examples
--------
>>> import marginalize as mz
>>> "nuts" in mz.methods()
True
>>> mz.fit(None, [[0.0]], [0.0], method="nust")
Traceback (most recent call last):
...
marginalize._validation.OptionError: unknown method 'nust'; did you mean 'nuts'? known: ...
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from marginalize._validation import check_device, check_options, check_seed
from marginalize.core.problem import Problem, prepare
from marginalize.errors import OptionError
from marginalize.inference.engines import checkpoint, distributed
from marginalize.inference.engines.seeding import isolated
from marginalize.posterior import Posterior

__all__ = ["Method", "register", "methods", "get_method", "fit", "resume", "method_info"]

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

    @dataclasses.dataclass
    class Options:
        pass

    def run(self, problem: Problem, opts: Any, seed: int, progress: bool):
        raise NotImplementedError

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(cls.Options):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

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


def method_info() -> list[dict[str, Any]]:
    """One row per method: name, summary, options with defaults, cost and reference."""
    return [
        {
            "name": n,
            "summary": c.summary,
            "options": c.option_defaults(),
            "cost": c.cost,
            "reference": c.reference,
        }
        for n, c in sorted(_REGISTRY.items())
    ]


def fit(
    model: Callable,
    x,
    y,
    method: str,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    **options: Any,
) -> Posterior:
    """Fit ``model`` to ``(x, y)`` with the inference method named ``method``.

    Parameters
    ----------
    model : callable
        A Pyro model ``model(x, y=None)`` with latent weight sites and observation site
        ``"y"`` inside ``pyro.plate("data", N)``, e.g. from :func:`marginalize.models.mlp`.
    x, y : array-like or torch.Tensor
    method : str
        A name from :func:`methods`.
    seed : int
        In ``[0, 2**32 - 1]``. All randomness of the fit derives from it; the same seed gives
        bitwise the same result on the same device.
    device : str or torch.device, optional
        Where to fit (default: the device of ``x``, else the CPU).
    progress : bool
        Show a progress bar.
    **options
        The method's options (see ``mz.method_info()``); an unknown one raises ``OptionError``.
        SVI-based methods and ``nuts``/``hmc`` take ``checkpoint=PATH, checkpoint_every=N``:
        the fit's state is saved there and :func:`marginalize.resume` continues it.

    Notes
    -----
    In a distributed run (an initialized ``torch.distributed`` process group, e.g. under
    ``torchrun``), the members and chains of ``ensemble``, ``multiswag``, ``nuts`` and ``hmc``
    are spread over the ranks and gathered: every rank returns the same posterior, bitwise the
    one a single process gives with the same seed (same machine and torch thread count).
    Every rank must call ``fit`` with the same arguments. See ``docs/guide/distributed.md``.

    Returns
    -------
    Posterior

    Raises
    ------
    OptionError, DataError, ModelError
        Bad options, data or model (see ``docs/input_checks.md``), before any fitting starts.
    """
    cls = get_method(method)
    opts = cls.make_options(options)
    seed = check_seed("seed", seed)
    device = check_device(device)
    problem = prepare(model, x, y, device=device)
    # a distributed run (torchrun): members and chains are spread over the ranks
    # (engines/distributed.py); progress bars on rank 0 only
    rank = distributed.rank() if distributed.is_distributed() else 0
    progress = progress and distributed.is_main()
    with isolated(seed), checkpoint.session(cls.name, opts, seed, problem, rank=rank):
        approx, info = cls().run(problem, opts, seed, progress)
    return Posterior(
        problem.model,
        problem.layout,
        approx,
        method=cls.name,
        task=problem.task,
        options=dataclasses.asdict(opts),
        info=info,
        seed=seed,
        data=(problem.x, problem.y),
        num_classes=problem.num_classes,
    )


def resume(path, model, x, y, *, device: str | torch.device | None = None, progress: bool = True):
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
    x, y : array-like or torch.Tensor
        The same training data.
    device : optional
        Where to continue (default: the device of ``x``).
    progress : bool
        Show a progress bar.

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
        return fit(model, x, y, method, seed=seed, device=device, progress=progress, **options)
