"""Inference methods by name, the Posterior type and vectorized prediction.

Importing this package registers every method (one module per method family).
"""

from marginalize.inference import bbb, dropout, ensemble, laplace, mcmc, svi, swag  # noqa: F401
from marginalize.inference.approximations import (
    Approximation,
    Delta,
    Dropout,
    Empirical,
    Gaussian,
    Mixture,
)
from marginalize.inference.layout import Layout
from marginalize.inference.posterior import Posterior, Prediction
from marginalize.inference.registry import Method, fit, get_method, method_info, methods, register

__all__ = [
    "Approximation",
    "Delta",
    "Dropout",
    "Empirical",
    "Gaussian",
    "Mixture",
    "Layout",
    "Posterior",
    "Prediction",
    "Method",
    "fit",
    "get_method",
    "method_info",
    "methods",
    "register",
]
