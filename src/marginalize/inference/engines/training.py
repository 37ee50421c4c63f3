"""The training engine: the optimization loop under the SVI-trained methods.

:func:`run_svi` trains a Pyro guide on a problem's model (minibatches with the likelihood
scaled to the full data, ClippedAdam with decay, progress bar, non-finite loss handling,
checkpoints); :func:`fit_map` is the MAP fit other methods start from (ensemble members,
MCMC initialization, the MAP stage of subset inference).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from tqdm.auto import tqdm

from marginalize._validation import check_positive_int
from marginalize.core.approximations import Delta
from marginalize.core.problem import Problem, _ScaleObs
from marginalize.errors import FitError, OptionError
from marginalize.inference.engines import checkpoint
from marginalize.inference.engines.init import INIT, init_loc_fn

__all__ = ["SVIOptions", "run_svi", "fit_map", "stack_losses", "INIT", "MAX_ROLLBACKS"]

log = logging.getLogger(__name__)

#: with ``on_nan="rollback"``, how many times a fit may roll back before it stops
MAX_ROLLBACKS = 3


@dataclass
class SVIOptions:
    """Options shared by SVI-trained methods.

    steps : number of optimizer steps; lr : Adam learning rate; lr_final : learning rate at the
    last step as a fraction of ``lr`` (exponential decay); batch_size : minibatch size (None:
    full batch); num_particles : ELBO samples per step; clip_norm : elementwise gradient clip
    (None: none; Adam is scale-invariant, and clipping noisy minibatch gradients biases the fit);
    init : where the optimization starts: "scaled" (default: fan-in scaled weights and biases,
    capped by the prior SD, the prior median elsewhere; see ``engines/init.py``), "median" or
    "prior" (a prior draw); on_nan : what a non-finite loss (or non-finite
    parameters) does: "stop" (keep the last good parameters and stop, with a warning),
    "rollback" (go back to the last good parameters and optimizer state, halve the learning
    rate and continue; after ``MAX_ROLLBACKS`` rollbacks, stop) or "raise" (``FitError``);
    checkpoint : file to save the fit's state to, resumable with ``mz.resume`` (see
    ``inference/engines/checkpoint.py``); checkpoint_every : steps between checkpoints.
    """

    steps: int = 2000
    lr: float = 1e-2
    lr_final: float = 0.1
    batch_size: int | None = None
    num_particles: int = 1
    clip_norm: float | None = None
    init: str = "scaled"
    on_nan: str = "stop"
    checkpoint: str | None = None
    checkpoint_every: int = 500

    def __post_init__(self):
        check_positive_int("steps", self.steps, minimum=1)
        check_positive_int("num_particles", self.num_particles, minimum=1)
        if self.batch_size is not None:
            check_positive_int("batch_size", self.batch_size, minimum=1)
        for name in ("lr", "clip_norm"):
            v = getattr(self, name)
            if name == "clip_norm" and v is None:
                continue
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise OptionError(f"{name}: expected a positive number, got {v!r}")
        if isinstance(self.lr_final, bool) or not (
            isinstance(self.lr_final, (int, float)) and 0 < self.lr_final <= 1
        ):
            raise OptionError(f"lr_final: expected a fraction in (0, 1], got {self.lr_final!r}")
        if not isinstance(self.init, str) or self.init not in INIT:
            raise OptionError(f"init: expected one of {sorted(INIT)}, got {self.init!r}")
        if self.on_nan not in ("stop", "rollback", "raise"):
            raise OptionError(
                f"on_nan: expected 'stop', 'rollback' or 'raise', got {self.on_nan!r}"
            )
        self.checkpoint = checkpoint.check_options(self.checkpoint, self.checkpoint_every)


def _batches(
    n: int, batch_size: int | None, steps: int, generator: torch.Generator, device, start: int = 0
):
    """Yield minibatch index tensors (an epoch-wise permutation), or None for full batch.

    With ``start``, the batches of steps ``start, ..., steps - 1``: the permutations of the
    skipped epochs are still drawn, so the order only depends on the generator's seed and the
    step (this is how a resumed fit gets the same minibatches).
    """
    if batch_size is None or batch_size >= n:
        for _ in range(start, steps):
            yield None
        return
    per_epoch = n // batch_size
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        if done + per_epoch <= start:  # an epoch before the start: only advance the generator
            done += per_epoch
            continue
        perm = perm.to(device)
        for first in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            if done >= start:
                yield perm[first : first + batch_size]
            done += 1


class _LastGood:
    """The parameters (and, for rollbacks, the optimizer state) after the last good step."""

    def __init__(self, store, optim, with_optim: bool):
        self.store, self.optim, self.with_optim = store, optim, with_optim
        self.params: dict[str, torch.Tensor] = {}
        self.optim_state: dict | None = None

    @property
    def has_good(self) -> bool:
        return bool(self.params)

    def finite(self) -> bool:
        vals = [v for _, v in self.store.named_parameters()]
        return not vals or bool(torch.stack([torch.isfinite(v).all() for v in vals]).all())

    def save(self, optim_state: dict | None = None) -> None:
        with torch.no_grad():
            for k, v in self.store.named_parameters():
                if k in self.params:
                    self.params[k].copy_(v)
                else:
                    self.params[k] = v.detach().clone()
        if self.with_optim:
            self.optim_state = checkpoint._clone(
                optim_state if optim_state is not None else self.optim.get_state()
            )

    def restore(self) -> None:
        with torch.no_grad():
            for k, v in self.store.named_parameters():
                if k in self.params:
                    v.copy_(self.params[k])
        if self.with_optim and self.optim_state is not None:
            for p, opt in self.optim.optim_objs.items():
                saved = self.optim_state.get(self.store.param_name(p))
                if saved is None:
                    opt.state.clear()
                else:
                    opt.load_state_dict(checkpoint._clone(saved))

    def halve_lr(self) -> float:
        lr = math.nan
        for opt in self.optim.optim_objs.values():
            for group in opt.param_groups:
                group["lr"] *= 0.5
                lr = group["lr"]
        return lr


def _svi_step(svi: SVI, store, xb, yb) -> float:
    """One SVI step; invalid distribution arguments from non-finite values count as a NaN loss."""
    try:
        return svi.step(xb, yb)
    except (ValueError, RuntimeError) as e:
        numerical = isinstance(e, torch.linalg.LinAlgError) or (
            isinstance(e, ValueError) and str(e).startswith("Expected parameter")
        )
        if not numerical:
            raise
        for _, p in store.named_parameters():  # the step failed before zeroing its gradients
            p.grad = None
        return math.nan


def run_svi(
    problem: Problem,
    guide: Callable,
    opts: SVIOptions,
    seed: int,
    progress: bool,
    *,
    desc: str = "svi",
    elbo=None,
) -> dict:
    """Train ``guide`` on ``problem.model`` by SVI; return info with the loss trace.

    Parameters live in the current Pyro param store (the caller's isolated scope). On a
    non-finite loss (or parameters) the parameters of the last good step are restored, then
    ``opts.on_nan`` says whether to stop, roll back and continue, or raise. Ctrl-C ends the
    run at the end of the current step and returns what was reached (``info["stopped"]``).
    Inside a checkpointed fit (``opts.checkpoint``) the state is saved every
    ``opts.checkpoint_every`` steps, on Ctrl-C and at the end, and restored on resume.
    """
    n = problem.n
    scaler = _ScaleObs(1.0)

    def model(x, y):
        with scaler:
            return problem.model(x, y)

    def scaled_guide(x, y):
        return guide(x, y)

    decay = opts.lr_final ** (1.0 / max(opts.steps, 1))
    clip = math.inf if opts.clip_norm is None else opts.clip_norm
    optim = pyro.optim.ClippedAdam({"lr": opts.lr, "clip_norm": clip, "lrd": decay})
    elbo = elbo or Trace_ELBO(num_particles=opts.num_particles)
    svi = SVI(model, scaled_guide, optim, loss=elbo)
    store = pyro.get_param_store()
    seg = checkpoint.segment("svi", desc)
    good = _LastGood(store, optim, with_optim=opts.on_nan == "rollback")
    losses: list[float] = []
    rollbacks: list[dict] = []
    done = 0  # steps (minibatches) consumed
    if seg is not None and seg.saved is not None:
        status, saved = checkpoint.restore_svi(seg, guide, problem, optim, opts.batch_size)
        if status == "done":
            seg.finish(checkpoint.svi_result(store, saved, problem.device))
            return saved
        done, losses, rollbacks = saved["step"], saved["losses"].tolist(), list(saved["rollbacks"])
        good.save(saved["optim"])
    gen = torch.Generator().manual_seed(seed)
    stopped = None
    in_step = False
    bar = tqdm(total=opts.steps, initial=done, desc=desc, disable=not progress, leave=False)
    with checkpoint.deferred_interrupt() as interrupt:
        try:
            batches = _batches(n, opts.batch_size, opts.steps, gen, problem.device, start=done)
            for step, idx in enumerate(batches, start=done):
                interrupt.check()
                in_step = True
                if idx is None:
                    xb, yb, scaler.scale = problem.x, problem.y, 1.0
                else:
                    xb, yb, scaler.scale = problem.x[idx], problem.y[idx], n / len(idx)
                loss = _svi_step(svi, store, xb, yb)
                if math.isfinite(loss) and good.finite():
                    losses.append(loss)
                    good.save()
                else:
                    what = (
                        f"the loss became {loss}"
                        if not math.isfinite(loss)
                        else "the parameters became non-finite"
                    )
                    if not good.has_good:
                        raise FitError(
                            f"{desc}: {what} at the first step. Lower lr, or check the "
                            "data scale and priors."
                        )
                    good.restore()
                    if opts.on_nan == "rollback" and len(rollbacks) < MAX_ROLLBACKS:
                        lr = good.halve_lr()
                        rollbacks.append({"step": step, "lr": lr})
                        log.warning(
                            "%s: %s at step %d; rolled back to the last good parameters, "
                            "learning rate halved to %.3g (rollback %d of %d)",
                            desc,
                            what,
                            step,
                            lr,
                            len(rollbacks),
                            MAX_ROLLBACKS,
                        )
                    else:
                        msg = (
                            f"{desc}: {what} at step {step}; "
                            "keeping the parameters of the last good step"
                        )
                        if opts.on_nan == "rollback":
                            msg += f" (gave up after {MAX_ROLLBACKS} rollbacks)"
                        if opts.on_nan == "raise":
                            raise FitError(msg + ". Lower lr, or check the data scale and priors.")
                        log.warning(msg)
                        stopped = {"step": step, "reason": f"non-finite loss ({loss})"}
                        in_step = False
                        done = step + 1
                        break
                in_step = False
                done = step + 1
                bar.update(1)
                if step % 25 == 0 and losses:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
                if seg is not None and seg.due(done):
                    seg.save(
                        checkpoint.svi_state(store, optim, done, losses, rollbacks, problem.device)
                    )
        except KeyboardInterrupt:
            log.warning("%s: interrupted at step %d; keeping the parameters reached", desc, done)
            stopped = {"step": len(losses), "reason": "interrupted"}
            if in_step:  # a forced stop inside a step: go back to the state after the last one
                good.restore()
        finally:
            bar.close()
    info = {"loss": torch.tensor(losses, dtype=torch.float64), "steps_done": len(losses)}
    if rollbacks:
        info["rollbacks"] = rollbacks
    if stopped:
        info["stopped"] = stopped
    if seg is not None:
        if stopped and stopped["reason"] == "interrupted":
            seg.interrupt(
                None
                if in_step
                else checkpoint.svi_state(store, optim, done, losses, rollbacks, problem.device)
            )
        else:
            seg.finish(checkpoint.svi_result(store, info, problem.device))
    return info


def fit_map(
    problem: Problem, opts: SVIOptions, seed: int, progress: bool, *, desc: str = "map"
) -> tuple[Delta, dict]:
    """A MAP fit of every latent site (an ``AutoDelta`` trained by :func:`run_svi`) in the
    caller's isolated scope: ``(Delta at the MAP, info)``."""
    guide = AutoDelta(problem.model, init_loc_fn=init_loc_fn(problem, opts.init))
    info = run_svi(problem, guide, opts, seed, progress, desc=desc)
    with torch.no_grad():
        values = guide.median(problem.x, problem.y)
    return Delta(problem.layout.pack(values)), info


def stack_losses(losses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean over members per step, (member, step) padded with NaN)`` of loss traces."""
    n = max((len(v) for v in losses), default=0)
    out = torch.full((len(losses), n), float("nan"), dtype=torch.float64)
    for i, v in enumerate(losses):
        out[i, : len(v)] = v
    return out.nanmean(0) if n else out.new_zeros(0), out
