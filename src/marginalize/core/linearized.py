"""The linearized (GLM) predictive of a Gaussian posterior around its mean.

With ``f(x; z)`` the network output, each posterior draw ``z_s`` predicts with
``f_lin(x; z_s) = f(x; z0) + J(x) (z_s - z0)`` (``z0``: the approximation's ``loc``, ``J`` the
Jacobian there), computed as a batched Jacobian-vector product. Sites outside the network
(a learned noise scale) enter the likelihood with their drawn values. This is the predictive
that goes with a Laplace approximation (Immer, Korzepa & Bauer 2021): sampling the weights
and running the nonlinear network instead puts large function-space variance along the
directions the data leave at the prior's scale. A posterior uses it when
``info.predictive == "glm"`` (``laplace`` sets it by default for builder models).

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 40)[:, None]; y = torch.sin(3 * x[:, 0])
>>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="laplace", steps=100, progress=False)
>>> post.info.predictive
'glm'
"""

from __future__ import annotations

import torch

from marginalize.errors import ModelError

__all__ = ["linearized_dist"]


def linearized_dist(post, z: torch.Tensor, x: torch.Tensor):
    """The observation distribution of draws ``z`` ``(S, D)`` under the linearized network."""
    model, layout = post.model, post.layout
    z0 = getattr(post.approximation, "loc", None)
    if z0 is None or not hasattr(model, "forward"):
        raise ModelError(
            "the linearized (glm) predictive needs a builder model and a Gaussian posterior"
        )

    def f(zz):
        return model.forward(layout.unpack(zz), x)

    def jvp(t):
        return torch.func.jvp(f, (z0,), (t,))

    f0, jv = torch.func.vmap(jvp)(z - z0)
    return model.likelihood.dist(f0 + jv, layout.unpack(z))
