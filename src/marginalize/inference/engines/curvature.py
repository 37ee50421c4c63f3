"""The curvature of the per-datum loss at a point: what step sizes are stable there.

:func:`sharpness` is the largest eigenvalue ``lambda_max`` of the Hessian of
``-log p(y, z) / N`` (power iteration with Hessian-vector products on at most
:data:`CURVATURE_ROWS` rows, in chunks sized from the model's measured activation memory:
:func:`curvature_subset`). Gradient descent with momentum ``mu`` on a quadratic of that
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

import contextlib
import logging
import math

import torch

from marginalize.core.problem import Problem, check_rows, out_of_memory
from marginalize.errors import is_out_of_memory
from marginalize.inference.engines.objectives import FULL, Batch
from marginalize.models.module import BatchStatistics

__all__ = [
    "CURVATURE_ROWS",
    "CURVATURE_BYTES",
    "STABILITY_FRACTION",
    "curvature_rows",
    "curvature_subset",
    "curvature_error",
    "sgd_mode",
    "sharpness",
]

log = logging.getLogger(__name__)

#: rows used to estimate the curvature (a random subset beyond this, scaled to the data)
CURVATURE_ROWS = 2048
#: activation bytes one chunk of those rows may use (a double backward keeps about three
#: times a forward's)
CURVATURE_BYTES = 64 * 2**20
#: the fraction of SGD's stability limit ``2 (1 + momentum) / lambda_max`` that an automatic
#: step size takes
STABILITY_FRACTION = 0.25


def curvature_rows(problem: Problem, generator: torch.Generator) -> torch.Tensor | None:
    """At most :data:`CURVATURE_ROWS` random rows of in-memory data (None: all of them)."""
    if problem.n <= CURVATURE_ROWS:
        return None
    return torch.randperm(problem.n, generator=generator)[:CURVATURE_ROWS].to(problem.device)


def curvature_subset(problem: Problem, generator: torch.Generator) -> list[tuple[Batch, float]]:
    """At most ``CURVATURE_ROWS`` rows of the data as ``(minibatch, weight)`` pairs whose
    weighted log joints sum to the log joint of those rows scaled to the data
    (``sum_c w_c log p(z, batch_c) = log p(z) + N / R sum_rows log p(y | z)``), in chunks that
    bound memory (:func:`~marginalize.core.problem.check_rows`, for a double backward). In
    memory: a random subset (every row when there are fewer; one full batch when one chunk
    holds them); from a data loader: its first minibatches."""
    n = problem.n
    rows = check_rows(problem.model, problem.example[0], CURVATURE_BYTES)
    if problem.in_memory:
        if n <= CURVATURE_ROWS and n <= rows:
            return [(FULL, 1.0)]
        idx = torch.arange(n) if n <= CURVATURE_ROWS else None
        if idx is None:
            idx = torch.randperm(n, generator=generator)[:CURVATURE_ROWS]
        idx = idx.to(problem.device)
        total = idx.shape[0]
        return [
            (Batch(part, n / part.shape[0]), part.shape[0] / total)
            for part in torch.split(idx, rows)
        ]
    got, xs, ys = 0, [], []
    for x, y in problem.batches(rows):
        take = min(x.shape[0], CURVATURE_ROWS - got)
        xs.append(x[:take])
        ys.append(y[:take])
        got += take
        if got >= CURVATURE_ROWS:
            break
    x, y = torch.cat(xs), torch.cat(ys)  # the loader's minibatches regrouped in chunks
    return [
        (Batch(None, n / xc.shape[0], x=xc, y=yc), xc.shape[0] / got)
        for xc, yc in zip(torch.split(x, rows), torch.split(y, rows), strict=True)
    ]


@contextlib.contextmanager
def sgd_mode(problem: Problem):
    """BatchNorm layers in train mode (the loss SGD sees), running statistics untouched."""
    if not problem.stateful or problem.state is None:
        yield
        return
    problem.training = BatchStatistics(problem.state)
    try:
        yield
    finally:
        problem.training = None


def _loss(problem: Problem, z: torch.Tensor, batch: Batch, weight: float) -> torch.Tensor:
    return -weight * problem.log_joint_batch(z, batch) / problem.n


def curvature_error(what: str, e: BaseException):
    """The error for an allocation failure while estimating ``what``."""
    return out_of_memory(
        f"the automatic step size ({what})",
        e,
        "pass the step size (swag_lr=, lr=), or use a smaller network or chunk (the estimate "
        f"uses at most {CURVATURE_ROWS} rows in chunks sized from the model's activation memory)",
    )


def sharpness(
    problem: Problem, z: torch.Tensor, generator: torch.Generator, iters: int = 20
) -> float:
    """Largest Hessian eigenvalue of the loss ``-log_joint(z) / N`` at ``z`` (power iteration
    with Hessian-vector products; at most ``CURVATURE_ROWS`` rows, scaled to the data, in
    chunks that bound memory: a chunk's graph at a time). NaN when the Hessian cannot be
    evaluated; an allocation failure raises ``OutOfMemoryError``."""
    parts = curvature_subset(problem, generator)
    z = z.detach().clone().requires_grad_(True)
    v = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    v = v / v.norm()
    lam = math.nan
    try:
        with sgd_mode(problem):
            if len(parts) == 1:  # one graph, differentiated again at every iteration
                batch, w = parts[0]
                (g,) = torch.autograd.grad(_loss(problem, z, batch, w), z, create_graph=True)

                def hvp(u):
                    return torch.autograd.grad(g, z, u, retain_graph=True)[0]

            else:

                def hvp(u):
                    out = torch.zeros_like(z)
                    for batch, w in parts:
                        (gc,) = torch.autograd.grad(
                            _loss(problem, z, batch, w), z, create_graph=True
                        )
                        out += torch.autograd.grad(gc, z, u)[0]
                    return out

            for _ in range(iters):
                hv = hvp(v)
                norm = hv.norm()
                if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
                    break
                lam = float(v @ hv)
                v = hv / norm
    except RuntimeError as e:  # a model whose graph cannot be differentiated twice
        if is_out_of_memory(e):
            raise curvature_error("the curvature estimate", e) from e
        log.info("no curvature estimate (%s)", e)
        return math.nan
    return abs(lam)
