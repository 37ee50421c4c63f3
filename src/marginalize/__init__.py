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
    "models", "priors", "likelihoods", "fit", "methods", "method_info", "register", "load",
    "Posterior", "Prediction", "DataError", "ModelError", "OptionError", "FileFormatError",
]
