"""BNN models: priors, likelihoods and builders that produce Pyro models with explicit priors."""

from marginalize.models import likelihoods, nets, priors
from marginalize.models.base import BNN, LayerSpec, model_from_config
from marginalize.models.builders import MLP, mlp
from marginalize.models.cnn import CNN, cnn
from marginalize.models.module import ModuleBNN, bayesian

__all__ = [
    "BNN",
    "LayerSpec",
    "MLP",
    "mlp",
    "CNN",
    "cnn",
    "ModuleBNN",
    "bayesian",
    "model_from_config",
    "likelihoods",
    "nets",
    "priors",
]
