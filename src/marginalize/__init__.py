"""marginalize: Bayesian neural networks as Pyro models, inference chosen by name.

>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 20)[:, None]; y = 2 * x[:, 0]
>>> model = mz.models.mlp(1, hidden=[8], likelihood="gaussian")
>>> post = mz.fit(model, x, y, method="map", steps=50, progress=False)
>>> post.predict(x).mean.shape
torch.Size([20])
>>> {"map", "nuts", "svi-meanfield", "laplace", "ensemble"} <= set(mz.methods())
True

Every public name is imported on first use (PEP 562), so ``import marginalize`` and
``marginalize --help`` do not load torch, Pyro, ArviZ or matplotlib until they are needed.
"""

import importlib
import logging
import os
import sys

from marginalize.errors import (
    DataError,
    FileFormatError,
    FitError,
    FitWarning,
    ModelError,
    OptionError,
    OutOfMemoryError,
    PredictWarning,
    ScaleWarning,
)

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _one_thread_after_fork() -> None:
    """In a child made by ``fork`` (``multiprocessing``'s default on Linux before Python 3.14,
    ``Pool`` workers, ``os.fork``): torch's CPU thread pool (OpenMP) is not fork-safe, so once
    the parent has run a parallel torch operation the child's first one hangs for ever. The
    child runs torch on one thread (``torch.set_num_threads(1)``: no pool), which is what a
    pool of worker processes wants anyway; set more threads in the child if it needs them,
    or use the ``spawn`` start method (docs/input_checks.md)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() > 1:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_after_fork)

#: public name -> the module that defines it (imported on first use)
_LAZY = {
    "fit": "marginalize.inference",
    "methods": "marginalize.inference",
    "method_info": "marginalize.inference",
    "register": "marginalize.inference",
    "resume": "marginalize.inference",
    "load": "marginalize.io",
    "load_run": "marginalize.runs",
    "Run": "marginalize.runs",
    "Posterior": "marginalize.posterior",
    "Prediction": "marginalize.posterior",
    "Predictive": "marginalize.core.predictive",
    "temperature_scale": "marginalize.temperature",
    "report": "marginalize.diagnostics.report",
    "evaluate": "marginalize.diagnostics.evaluation",
    "compare": "marginalize.diagnostics.stats",
    "prior_functions": "marginalize.diagnostics.functions",
    "posterior_functions": "marginalize.diagnostics.functions",
    "prior_scale_sweep": "marginalize.diagnostics.functions",
}
#: public submodules (``mz.models``, ``mz.priors``, ...), imported on first use
_SUBMODULES = {
    "models": "marginalize.models",
    "priors": "marginalize.models.priors",
    "likelihoods": "marginalize.models.likelihoods",
    "datasets": "marginalize.datasets",
    "diagnostics": "marginalize.diagnostics",
    "inference": "marginalize.inference",
    "metrics": "marginalize.diagnostics.metrics",
    "sklearn": "marginalize.sklearn",
}

__all__ = [
    "models",
    "priors",
    "likelihoods",
    "fit",
    "methods",
    "method_info",
    "register",
    "load",
    "Posterior",
    "Prediction",
    "Predictive",
    "DataError",
    "ModelError",
    "OptionError",
    "FileFormatError",
    "FitError",
    "OutOfMemoryError",
    "ScaleWarning",
    "FitWarning",
    "PredictWarning",
    "load_run",
    "Run",
    "resume",
    "temperature_scale",
    "evaluate",
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    else:
        raise AttributeError(f"module 'marginalize' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
