"""BNN models: priors, likelihoods and builders that produce Pyro models with explicit priors."""

from marginalize.models import likelihoods, priors
from marginalize.models.base import BNN, LayerSpec, model_from_config
from marginalize.models.builders import MLP, mlp

__all__ = ["BNN", "LayerSpec", "MLP", "mlp", "model_from_config", "likelihoods", "priors"]
