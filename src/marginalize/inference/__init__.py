"""Inference methods by name: the registry, the engines the methods share, and the methods.

Importing this package registers every method (one module per method family in
``inference/methods/``).
"""

from marginalize.inference.methods import (  # noqa: F401
    bbb,
    dropout,
    ensemble,
    ivon,
    laplace,
    mcmc,
    sgmcmc,
    svi,
    swag,
)
from marginalize.inference.registry import (
    Method,
    fit,
    get_method,
    method_info,
    methods,
    register,
    resume,
)

__all__ = ["Method", "fit", "get_method", "method_info", "methods", "register", "resume"]
