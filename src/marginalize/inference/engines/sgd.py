"""A plain torch optimization loop over minibatches (used by ``swag`` and ``bbb``).

``sgd_loop`` minimizes ``loss_fn(idx)`` (``idx``: a minibatch of row indices, or None for the
full batch, from an epoch-wise permutation) with any ``torch.optim`` optimizer, with gradient
clipping, a progress bar, a per-step callback and the same non-finite-loss policy as
:func:`~marginalize.inference.engines.training.run_svi`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from marginalize.core.problem import _no_validation
from marginalize.errors import FitError
from marginalize.inference.engines.init import initial_z
from marginalize.inference.engines.training import _batches

__all__ = ["sgd_loop", "initial_z"]

log = logging.getLogger(__name__)


def sgd_loop(
    loss_fn: Callable[[torch.Tensor | None], torch.Tensor],
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    n: int,
    batch_size: int | None,
    generator: torch.Generator,
    device,
    *,
    scheduler=None,
    clip_norm: float | None = None,
    on_nan: str = "stop",
    callback: Callable[[int], None] | None = None,
    progress: bool = False,
    desc: str = "sgd",
    loss_scale: float = 1.0,
) -> dict:
    """Run ``steps`` optimizer steps on ``loss_fn``; return ``{"loss": (steps,) float64}``.

    ``callback(step)`` runs after each successful step. On a non-finite loss or gradient the
    parameters go back to the last finite step, then the loop stops with a warning
    (``on_nan="stop"``) or raises :class:`~marginalize.errors.FitError`. The recorded
    loss is ``loss * loss_scale``.
    """
    losses: list[float] = []
    stopped = None
    last = [p.detach().clone() for p in params]
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    try:
        with _no_validation():
            for step, idx in enumerate(_batches(n, batch_size, steps, generator, device)):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(idx)
                bad = not bool(torch.isfinite(loss))
                if not bad:
                    loss.backward()
                    bad = not all(
                        bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None
                    )
                if bad:
                    with torch.no_grad():
                        for p, q in zip(params, last, strict=True):
                            p.copy_(q)
                    msg = f"{desc}: the loss became non-finite at step {step}"
                    if on_nan == "raise" or step == 0:
                        raise FitError(
                            msg + ". Lower the learning rate, or check the data scale and priors."
                        )
                    log.warning("%s; keeping the parameters of the last finite step", msg)
                    stopped = {"step": step, "reason": "non-finite loss"}
                    break
                for p, q in zip(params, last, strict=True):
                    q.copy_(p.detach())
                if clip_norm:
                    torch.nn.utils.clip_grad_norm_(params, clip_norm)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                losses.append(float(loss.detach()) * loss_scale)
                if callback is not None:
                    callback(step)
                bar.update(1)
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
    except KeyboardInterrupt:
        log.warning("%s: interrupted at step %d; keeping the parameters reached", desc, len(losses))
        stopped = {"step": len(losses), "reason": "interrupted"}
    finally:
        bar.close()
    info = {"loss": torch.tensor(losses, dtype=torch.float64)}
    if stopped:
        info["stopped"] = stopped
    return info
