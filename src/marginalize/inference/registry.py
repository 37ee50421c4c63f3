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

import contextlib
import dataclasses
import difflib
import logging
import random
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pyro
import torch

from marginalize._validation import OptionError, check_device, check_options, check_seed
from marginalize.inference import checkpoint
from marginalize.inference.posterior import Posterior
from marginalize.inference.problem import Problem, prepare

__all__ = ["Method", "register", "methods", "get_method", "fit", "method_info"]

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


@contextlib.contextmanager
def isolated(seed: int):
    """Own param-store scope and RNG states (torch, Python, NumPy): nothing leaks between fits.

    Seeds as ``pyro.set_rng_seed(seed)`` does (NumPy gets ``seed % 2**32``, so derived seeds
    of any size work).
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    with torch.random.fork_rng(devices=devices), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 - as pyro.set_rng_seed
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002


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
    with isolated(seed), checkpoint.session(cls.name, opts, seed, problem):
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
