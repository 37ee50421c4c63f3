"""marginalize: Bayesian neural networks as Pyro models, inference chosen by name.

>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 20)[:, None]; y = 2 * x[:, 0]
>>> model = mz.models.mlp(1, hidden=[8], likelihood="gaussian")
>>> post = mz.fit(model, x, y, method="map", steps=50, progress=False)
>>> post.predict(x).mean.shape
torch.Size([20])
>>> {"map", "nuts", "svi-meanfield", "laplace", "ensemble"} <= set(mz.methods())
True
"""

import logging

from marginalize import models
from marginalize.errors import DataError, FileFormatError, FitError, ModelError, OptionError
from marginalize.inference import fit, method_info, methods, register, resume
from marginalize.io import load
from marginalize.models import likelihoods, priors
from marginalize.posterior import Posterior, Prediction
from marginalize.temperature import temperature_scale

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
    "FitError",
    "resume",
    "temperature_scale",
]

# Names provided by the diagnostics package, imported on first use (keeps `import
# marginalize` light: ArviZ and matplotlib load only when needed).
_LAZY = {
    "report": "marginalize.diagnostics.report",
    "compare": "marginalize.diagnostics.stats",
    "prior_functions": "marginalize.diagnostics.functions",
    "posterior_functions": "marginalize.diagnostics.functions",
    "prior_scale_sweep": "marginalize.diagnostics.functions",
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
