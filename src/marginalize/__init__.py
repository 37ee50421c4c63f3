"""marginalize: Bayesian neural networks as Pyro models, inference chosen by name.

>>> import marginalize as mz
>>> model = mz.models.mlp(13, hidden=[50], likelihood="gaussian")
>>> sorted(mz.methods())[:3]
['ensemble', 'hmc', 'laplace']
"""

import logging

from marginalize import models
from marginalize._validation import DataError, ModelError, OptionError
from marginalize.inference import Posterior, Prediction, fit, method_info, methods, register
from marginalize.io import FileFormatError, load
from marginalize.models import likelihoods, priors

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

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
    "DataError",
    "ModelError",
    "OptionError",
    "FileFormatError",
]

# Names provided by the diagnostics package, imported on first use (keeps `import
# marginalize` light: ArviZ and matplotlib load only when needed).
_LAZY = {
    "report": "marginalize.diagnostics.report",
    "compare": "marginalize.diagnostics.stats",
    "prior_functions": "marginalize.diagnostics.functions",
    "posterior_functions": "marginalize.diagnostics.functions",
    "prior_scale_sweep": "marginalize.diagnostics.functions",
    "temperature_scale": "marginalize.inference.temperature",
    "resume": "marginalize.inference.checkpoint",
    "FitError": "marginalize.inference.svi",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("datasets", "diagnostics", "inference", "metrics"):
        import importlib

        mod = "marginalize.diagnostics.metrics" if name == "metrics" else f"marginalize.{name}"
        return importlib.import_module(mod)
    raise AttributeError(f"module 'marginalize' has no attribute {name!r}")
