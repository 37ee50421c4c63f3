"""The curvature of the per-datum loss at a point: what step sizes are stable there.

:func:`sharpness` is the largest eigenvalue ``lambda_max`` of the Hessian of
``-log p(y, z) / N`` (power iteration with Hessian-vector products on at most
:data:`CURVATURE_ROWS` rows). Gradient descent with momentum ``mu`` on a quadratic of that
curvature is stable for learning rates below ``2 (1 + mu) / lambda_max``; SWAG's
``swag_lr="auto"`` and the SG-MCMC samplers' ``lr="auto"`` stay at a fraction of that limit
(:func:`stable_lr`).

Examples
--------
>>> import torch, marginalize as mz
>>> from marginalize.core.problem import prepare
>>> x = torch.randn(50, 1, dtype=torch.float64); y = 2 * x[:, 0]
>>> pb = prepare(mz.models.mlp(1, hidden=[], likelihood=mz.likelihoods.Gaussian(noise=0.5)), x, y)
>>> lam = sharpness(pb, torch.zeros(2, dtype=torch.float64), torch.Generator().manual_seed(0), 100)
>>> phi = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1)
>>> exact = torch.linalg.eigvalsh(phi.T @ phi / 0.25 + torch.eye(2)).max() / 50
>>> abs(lam - float(exact)) < 1e-4 * float(exact)
True
"""

from __future__ import annotations

import logging
import math

import torch

from marginalize.core.problem import Problem

__all__ = ["CURVATURE_ROWS", "STABILITY_FRACTION", "curvature_rows", "sharpness"]

log = logging.getLogger(__name__)

#: rows used to estimate the curvature (a random subset beyond this, scaled to the data)
CURVATURE_ROWS = 2048
#: the fraction of SGD's stability limit ``2 (1 + momentum) / lambda_max`` that an automatic
#: step size takes
STABILITY_FRACTION = 0.25


def curvature_rows(problem: Problem, generator: torch.Generator) -> torch.Tensor | None:
    """At most :data:`CURVATURE_ROWS` random rows of the data (None: all of them)."""
    if problem.n <= CURVATURE_ROWS:
        return None
    return torch.randperm(problem.n, generator=generator)[:CURVATURE_ROWS].to(problem.device)


def sharpness(
    problem: Problem, z: torch.Tensor, generator: torch.Generator, iters: int = 20
) -> float:
    """Largest Hessian eigenvalue of the loss ``-log_joint(z) / N`` at ``z`` (power iteration
    with Hessian-vector products; at most ``CURVATURE_ROWS`` rows, scaled to the data).
    NaN when the Hessian cannot be evaluated."""
    rows = curvature_rows(problem, generator)
    z = z.detach().clone().requires_grad_(True)
    try:
        (g,) = torch.autograd.grad(-problem.log_joint(z, rows) / problem.n, z, create_graph=True)
        v = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        v = v / v.norm()
        lam = math.nan
        for _ in range(iters):
            (hv,) = torch.autograd.grad(g, z, v, retain_graph=True)
            norm = hv.norm()
            if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
                break
            lam = float(v @ hv)
            v = hv / norm
    except RuntimeError as e:  # a model whose graph cannot be differentiated twice
        log.info("no curvature estimate (%s)", e)
        return math.nan
    return abs(lam)
