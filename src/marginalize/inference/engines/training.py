"""The training loop under every optimization-based method.

:func:`train` minimizes an :class:`~marginalize.inference.engines.objectives.Objective` with a
flat optimizer (:mod:`~marginalize.inference.engines.optim`) and owns everything around the
steps, once for every method (``map``, ``svi-meanfield``, ``svi-lowrank``, ``mc-dropout``,
``bbb``, the phases of ``swag``/``multiswag``, ``ensemble`` members, the MAP stage of
``laplace`` and of ``bayesian_sites``, ``init="map"`` of MCMC):

* **minibatches**: an epoch-wise permutation of the rows from a generator seeded by the fit
  (``batch_size=None``: the full batch); the objective scales the minibatch likelihood by
  ``N / B`` to the full data;
* **non-finite values** (``on_nan``): a step whose loss or gradient is non-finite, or whose
  update makes the parameters non-finite, is a failed step. The *last good state* is the one
  before the update that led there (parameters and optimizer state), so its loss was finite.
  ``"stop"`` returns it (with a warning), ``"rollback"`` goes back to it, halves the learning
  rate and continues (every rollback halves it again; after :data:`MAX_ROLLBACKS` it stops),
  ``"raise"`` raises :class:`~marginalize.errors.FitError`. A non-finite value at the very first
  step always raises ``FitError``, with advice;
* **Ctrl-C** (:mod:`~marginalize.inference.engines.interrupt`): one press stops the fit at the
  end of the current step (every loop of a composite fit stops), a second press at once; either
  way the fit keeps the state after its last completed step and says so
  (``stopped.reason == "interrupted"``);
* **checkpoints** (:mod:`~marginalize.inference.engines.checkpoint`): every run of the loop is
  one segment of the fit's checkpoint, saved every ``checkpoint_every`` steps, on Ctrl-C and at
  its end, and resumed bitwise (parameters, optimizer and objective state, minibatch order,
  RNG states, and the state of a per-step ``callback`` such as SWAG's moments);
* **data-parallel** in a distributed run (an initialized ``torch.distributed`` group, e.g.
  under ``torchrun``, outside ensemble members and chains, which are spread over the ranks
  instead): each rank evaluates its shard of every minibatch and the gradients are summed
  with one ``all_reduce`` (:class:`~marginalize.inference.engines.distributed.DataParallel`);
* **one progress bar** (tqdm on a terminal; without one a line on stderr every 30 s of a long
  run, :mod:`~marginalize.inference.engines.progress`; silent when ``progress=False``);
* **one convergence check**: a deterministic objective (full batch, no Monte Carlo noise) stops
  once its loss changes by less than ``tol`` (relative) for a few steps in a row; a stochastic
  one is judged at the end by the trend of its loss (:func:`loss_trend`). A full-batch fit that
  ends unconverged warns at fit time, naming what to change, and says so in ``converged``.

:func:`fit_point` is the MAP fit other methods start from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from marginalize.core.info import FitInfo, Rollback, Stop
from marginalize.core.problem import Problem, _no_validation
from marginalize.errors import (
    DataError,
    FitError,
    OptionError,
    OutOfMemoryError,
    is_out_of_memory,
    warn,
)
from marginalize.inference.engines import checkpoint, distributed, interrupt
from marginalize.inference.engines.init import INIT, init_loc_fn, initial_z
from marginalize.inference.engines.objectives import (
    Batch,
    Objective,
    PointObjective,
    PyroObjective,
    closed_form,
)
from marginalize.inference.engines.optim import LBFGS, Adam, FlatOptimizer, exponential
from marginalize.inference.engines.options import (
    Options,
    choice,
    file_path,
    integer,
    number,
    option,
)
from marginalize.inference.engines.progress import progress_bar
from marginalize.models.module import BatchStatistics

__all__ = [
    "train",
    "fit_point",
    "adam",
    "resolve_engine",
    "init_loc_fn",
    "TrainOptions",
    "MAPOptions",
    "checkpoint_option",
    "checkpoint_every_option",
    "ENGINES",
    "Trained",
    "batch_order",
    "LoaderBatches",
    "loss_trend",
    "initial_z",
    "stack_losses",
    "INIT",
    "ON_NAN",
    "MAX_ROLLBACKS",
    "LOSS_RTOL",
    "MAX_LR",
]

log = logging.getLogger(__name__)

#: the non-finite-loss policies
ON_NAN = ("stop", "rollback", "raise")
#: with ``on_nan="rollback"``, how many times a run may roll back before it stops
MAX_ROLLBACKS = 10
#: a loss trace whose mean fell by more than this (relative) over its last tenth is not converged
LOSS_RTOL = 1e-3
#: consecutive small changes that stop a deterministic objective
PATIENCE = 3
#: the largest learning rate an option accepts (larger ones are typing mistakes: 1e308 overflows
#: the first step whatever the problem; a merely too large one is what ``on_nan`` handles)
MAX_LR = 1e12


@dataclass
class Trained:
    """The outcome of one run of :func:`train`.

    params : the parameters reached (the last good state); loss : ``(steps_done,)`` float64,
    the loss at each good step; stopped : why the run ended early, or None; rollbacks;
    converged : True, False or None (too short to tell); lr : the learning rate at the end.
    """

    params: torch.Tensor
    loss: torch.Tensor
    stopped: Stop | None = None
    rollbacks: list[Rollback] = field(default_factory=list)
    converged: bool | None = None
    lr: float = math.nan

    @property
    def steps_done(self) -> int:
        return int(self.loss.shape[0])

    @property
    def interrupted(self) -> bool:
        return self.stopped is not None and self.stopped.interrupted

    def info(self, **fields) -> FitInfo:
        """A :class:`FitInfo` with this run's optimization fields (and ``fields``)."""
        kw = {
            "loss": self.loss,
            "steps_done": self.steps_done,
            "converged": self.converged,
            "stopped": self.stopped,
            "rollbacks": list(self.rollbacks),
        }
        kw.update(fields)
        return FitInfo(**kw)

    def to_state(self) -> dict:
        return {
            "params": self.params,
            "loss": self.loss,
            "stopped": None if self.stopped is None else self.stopped.to_dict(),
            "rollbacks": [{"step": r.step, "lr": r.lr} for r in self.rollbacks],
            "converged": -1 if self.converged is None else int(self.converged),
            "lr": float(self.lr),
        }

    @classmethod
    def from_state(cls, st: dict, device=None, dtype=None) -> Trained:
        stopped = st["stopped"]
        conv = int(st["converged"])
        params = st["params"]
        return cls(
            params=params if device is None else params.to(device, dtype),
            loss=st["loss"],
            stopped=None if stopped is None else Stop(**stopped),
            rollbacks=[Rollback(int(r["step"]), float(r["lr"])) for r in st["rollbacks"]],
            converged=None if conv < 0 else bool(conv),
            lr=float(st["lr"]),
        )


# ---- minibatches ------------------------------------------------------------------------------
def batch_order(
    n: int,
    batch_size: int | None,
    steps: int,
    generator: torch.Generator,
    device,
    start: int = 0,
) -> Iterator[Batch]:
    """The minibatches of steps ``start, ..., steps - 1``: an epoch-wise permutation of the rows
    (the last incomplete batch of an epoch is dropped), or the full batch.

    The permutations of skipped epochs are still drawn, so the order depends only on the
    generator's seed and the step (this is how a resumed fit gets the same minibatches).
    """
    if batch_size is None or batch_size >= n:
        full = Batch(None, 1.0)
        for _ in range(start, steps):
            yield full
        return
    per_epoch = n // batch_size
    scale = n / batch_size
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
                yield Batch(perm[first : first + batch_size], scale)
            done += 1


def is_full_batch(n: int, batch_size: int | None) -> bool:
    return batch_size is None or batch_size >= n


class LoaderBatches:
    """The minibatches of a data loader for steps ``start, ..., steps - 1``: the loader's own
    batches, pass after pass (a new pass starts when one ends), each converted by
    ``Problem.rows`` and scaled by ``N / B`` to the full data.

    For checkpoints (``track``) it records, at the start of every pass, the global RNG states
    (torch, Python, NumPy: a DataLoader draws its shuffle and its workers' seeds from torch's,
    and transforms run in the main process draw from it too) and the states of the loader's
    own generators, with the number of batches of the pass that completed steps took, and
    the RNG states before the batch of the step in progress. A resumed fit restores those
    states, starts the pass again and skips the batches already taken, so it reads the same
    minibatches as the uninterrupted fit wherever the loader's randomness comes from those
    generators (shuffling, random crops and flips of ``torchvision``-style transforms, workers
    seeded by the loader). A loader with randomness of its own elsewhere gives new minibatches
    for the rest of the interrupted pass; parameters, optimizer and objective state are
    restored exactly either way.
    """

    def __init__(
        self,
        problem: Problem,
        steps: int,
        start: int = 0,
        saved: dict | None = None,
        track: bool = False,
    ):
        self.problem, self.steps, self.start = problem, int(steps), int(start)
        self.data = problem.data
        self.saved = saved
        self.track = track
        self.pass_state: dict | None = None
        self.pos = 0  # batches of the current pass handed out
        self.handed = int(start)  # steps handed a batch
        self.before: dict | None = None  # RNG states before the last batch was read

    def _snapshot(self) -> dict:
        return {
            "rng": checkpoint.rng_state(self.problem.device),
            "gens": [g.get_state() for g in self.data.generators()],
        }

    def _restore(self, snap: dict) -> None:
        checkpoint.set_rng_state(snap["rng"], self.problem.device)
        for g, st in zip(self.data.generators(), snap["gens"], strict=False):
            g.set_state(st)

    def state_dict(self, done: int) -> dict:
        """Where the loader stands after ``done`` completed steps."""
        extra = self.handed - int(done)  # a batch read for a step that did not complete
        return {
            "pass": self.pass_state,
            "pos": self.pos - extra,
            "rng": self.before if extra else None,
        }

    def __iter__(self) -> Iterator[Batch]:
        skip, after_skip = 0, None
        saved = self.saved
        if saved is not None and saved.get("pass") is not None and self.start < self.steps:
            self._restore(saved["pass"])  # the pass starts again as it did
            skip = int(saved["pos"])
            self.pass_state = saved["pass"]
            after_skip = saved.get("rng")
        resumed = self.pass_state is not None
        n = self.problem.n
        while self.handed < self.steps:
            if not resumed and self.track:
                self.pass_state = self._snapshot()
            resumed = False
            self.pos = 0
            it = iter(self.data.chunks(None))
            got = False
            while self.handed < self.steps:
                if skip == 0 and after_skip is not None:
                    checkpoint.set_rng_state(after_skip, self.problem.device)
                    after_skip = None
                if self.track and skip == 0:
                    self.before = checkpoint.rng_state(self.problem.device)
                try:
                    xb, yb = next(it)
                except StopIteration:
                    break
                got = True
                self.pos += 1
                if skip:  # taken by steps before the checkpoint
                    skip -= 1
                    continue
                x, y = self.problem.rows(xb, yb)
                self.handed += 1
                yield Batch(None, n / x.shape[0], x=x, y=y)
            if not got:
                raise DataError("x: the data loader yielded no minibatch in a pass")


# ---- convergence --------------------------------------------------------------------------------
def loss_trend(loss, window: float = 0.1, rtol: float = LOSS_RTOL) -> tuple[bool | None, float]:
    """Whether a loss trace has flattened out: ``(converged, relative_drop)``.

    Compares the mean loss over the last ``window`` fraction of steps with the mean over the
    ``window`` before it. Not converged when the loss still fell by more than ``rtol``
    (relative to ``max(|loss|, 1)``) and by more than three standard errors of that difference
    (so the noise of minibatch and Monte Carlo losses raises no false alarm). ``converged`` is
    None when the trace is too short (fewer than 20 finite values) to judge.

    Examples
    --------
    >>> loss_trend(torch.linspace(100.0, 10.0, 1000))[0]
    False
    >>> loss_trend(torch.full((1000,), 5.0))[0]
    True
    """
    a = np.asarray(
        loss.detach().cpu() if isinstance(loss, torch.Tensor) else loss, dtype=np.float64
    )
    if a.ndim > 1:
        results = [loss_trend(row, window, rtol) for row in a.reshape(-1, a.shape[-1])]
        worst = max(results, key=lambda r: r[1] if math.isfinite(r[1]) else -np.inf)
        judged = None if any(r[0] is None for r in results) else all(r[0] for r in results)
        return judged, worst[1]
    a = a[np.isfinite(a)]
    n = a.size
    if n < 20:
        return None, float("nan")
    w = max(2, int(round(window * n)))
    last, before = a[-w:], a[-2 * w : -w]
    drop = float(before.mean() - last.mean())
    rel = drop / max(abs(float(last.mean())), 1.0)
    se = math.sqrt(last.var(ddof=1) / last.size + before.var(ddof=1) / before.size)
    return not (rel > rtol and drop > 3 * se), rel


def default_tol(dtype: torch.dtype) -> float:
    """Relative loss change per step below which a deterministic objective has converged."""
    return 1e-10 if dtype == torch.float64 else 1e-6


# ---- the loop -----------------------------------------------------------------------------------
def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.sum()))


def train(
    objective: Objective,
    optimizer: FlatOptimizer,
    steps: int,
    *,
    n: int | None = None,
    batch_size: int | None = None,
    problem: Problem | None = None,
    seed: int = 0,
    on_nan: str = "stop",
    desc: str = "train",
    progress: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    tol: float | None = None,
    warn_unconverged: bool = True,
    advice: str = "raise steps",
) -> Trained:
    """Minimize ``objective`` with ``optimizer`` for ``steps`` steps (see the module docstring).

    Parameters
    ----------
    objective : Objective
    optimizer : FlatOptimizer
        Holds the parameters (its ``params`` at the start is the initial point).
    steps : int
        Steps (minibatches; for L-BFGS, iterations).
    n, batch_size : int, int or None
        Rows of the data (default: ``problem.n``), rows per minibatch (None: full batch).
    problem : Problem, optional
        The problem trained on. Its data loader, if the data come from one, gives the
        minibatches (:class:`LoaderBatches`; ``batch_size`` is then the loader's); a network
        with BatchNorm layers (``problem.stateful``) runs them in train mode in every step
        (batch statistics; the running statistics updated with the layers' momentum, kept
        after each good step, checkpointed, and left in ``problem.state`` at the end).
    seed : int
        Seeds the minibatch order.
    on_nan : {"stop", "rollback", "raise"}
    desc : str
        Names the run in the progress bar, warnings and checkpoints (``"map"``, ``"member 2"``).
    callback : callable, optional
        ``callback(step, params)`` after each successful update; if it has ``state_dict`` and
        ``load_state_dict``, its state is checkpointed with the run.
    tol : float, optional
        Relative change that stops a deterministic objective (default :func:`default_tol`);
        0 never stops early.
    warn_unconverged : bool
        Log a warning when a full-batch run ends unconverged.
    advice : str
        What the warning tells the user to change.

    Returns
    -------
    Trained

    Raises
    ------
    FitError
        A non-finite loss at the first step, or any with ``on_nan="raise"``.
    """
    if on_nan not in ON_NAN:  # pragma: no cover - options are validated before
        raise OptionError(f"on_nan: expected one of {ON_NAN}, got {on_nan!r}")
    if n is None:
        if problem is None:  # pragma: no cover - a programming error
            raise TypeError("train: give n or problem")
        n = problem.n
    loader = problem is not None and not problem.in_memory
    full = not loader and is_full_batch(n, batch_size)
    bn = None
    if problem is not None and problem.stateful and problem.state is not None:
        bn = BatchStatistics(problem.state)
    params = optimizer.params
    deterministic = full and not objective.stochastic
    if optimizer.full_batch_only and not deterministic:
        raise OptionError(
            f"{desc}: the L-BFGS optimizer needs a deterministic objective on the full batch "
            "(batch_size=None, in-memory data, no Monte Carlo noise); use optimizer='adam'"
        )
    tol = default_tol(params.dtype) if tol is None else tol
    # several processes (torchrun): each rank takes its shard of every minibatch
    objective = distributed.data_parallel(objective, params, n)
    seg = checkpoint.segment("train", desc)
    losses: list[float] = []
    rollbacks: list[Rollback] = []
    streak = 0
    done = 0
    loader_saved = None
    if seg is not None and seg.saved is not None:
        st = seg.saved["state"]
        try:
            if seg.saved["done"]:
                result = Trained.from_state(st["result"], params.device, params.dtype)
                optimizer.params.copy_(result.params)
                result.params = optimizer.params
                if callback is not None and "callback" in st:
                    callback.load_state_dict(st["callback"])
                if bn is not None and "bn" in st:
                    problem.state = _to(st["bn"], problem.state)
                    problem.meta["trained_state"] = result.steps_done > 0
                checkpoint.set_rng_state(st["rng"], params.device)
                seg.finish(st)
                return result
            optimizer.load_state_dict(st["optim"])
            objective.load_state_dict(st["objective"])
            if callback is not None and "callback" in st:
                callback.load_state_dict(st["callback"])
            checkpoint.set_rng_state(st["rng"], params.device)
            done = int(st["step"])
            losses = st["loss"].tolist()
            rollbacks = [Rollback(int(r["step"]), float(r["lr"])) for r in st["rollbacks"]]
            streak = int(st["streak"])
            if bn is not None and "bn" in st:
                bn.running = _to(st["bn"], bn.running)
            loader_saved = st.get("loader")
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise checkpoint.restore_error(seg, e) from e

    def state() -> dict:
        st = {
            "step": done,
            "loss": torch.tensor(losses, dtype=torch.float64),
            "rollbacks": [{"step": r.step, "lr": r.lr} for r in rollbacks],
            "streak": streak,
            "optim": optimizer.state_dict(),
            "objective": objective.state_dict(),
            "rng": checkpoint.rng_state(params.device),
        }
        if callback is not None and hasattr(callback, "state_dict"):
            st["callback"] = callback.state_dict()
        if bn is not None:
            st["bn"] = dict(bn.running)
        if batches is not None:
            st["loader"] = batches.state_dict(done)
        return st

    def closure(p: torch.Tensor):
        return objective.loss_and_grad(p, batch)

    gen = torch.Generator().manual_seed(int(seed))
    batches = (
        LoaderBatches(problem, steps, done, loader_saved, track=seg is not None) if loader else None
    )
    order = (
        batches
        if batches is not None
        else batch_order(n, batch_size, steps, gen, params.device, start=done)
    )
    stopped: Stop | None = None
    converged: bool | None = None
    in_step = False
    bar = progress_bar(steps, desc, enabled=progress, initial=done)
    with interrupt.scope(), _no_validation():
        try:
            for step, batch in enumerate(order, start=done):
                if interrupt.requested():
                    raise KeyboardInterrupt
                in_step = True
                if bn is not None:  # BatchNorm in train mode for every evaluation of the step
                    problem.training = bn
                cached = optimizer.evaluation() if deterministic else None
                if cached is not None:
                    loss_t, grad = cached
                else:
                    loss_t, grad = _evaluate(objective, optimizer.params, batch, desc, step)
                loss = float(loss_t)
                what, undone = None, False
                if not math.isfinite(loss):
                    what, reason = f"the loss became {loss}", f"non-finite loss ({loss})"
                elif not _finite(grad):
                    what, reason = "the gradient became non-finite", "non-finite gradient"
                else:
                    losses.append(loss)
                    try:
                        optimizer.step(grad, loss, closure)
                    except KeyboardInterrupt:
                        optimizer.abort()
                        raise
                    finally:
                        if bn is not None:
                            problem.training = None
                    if optimizer.failure is not None:
                        what, reason = optimizer.failure, "non-finite loss (line search)"
                        optimizer.undo()  # the state before this update is the last good one
                        undone = True
                    elif not _finite(optimizer.params):
                        what, reason = "the parameters became non-finite", "non-finite parameters"
                        optimizer.undo()  # the state before this update is the last good one
                        undone = True
                    else:
                        if bn is not None:  # the step is kept: so is its running statistics
                            bn.commit()
                        if callback is not None:
                            callback(step, optimizer.params)
                if bn is not None:
                    problem.training = None
                    bn.last = None
                if what is not None:
                    if step == 0:
                        raise FitError(
                            f"{desc}: {what} at the first step. Lower lr, check the data scale "
                            "(standardize x and y) and the priors."
                        )
                    if not undone and optimizer.can_undo:
                        # the point evaluated here is bad: back to the one before the last update
                        optimizer.undo()
                        undone = True
                    if on_nan == "rollback" and len(rollbacks) < MAX_ROLLBACKS:
                        if undone:
                            losses.pop()  # that state is evaluated again by the next step
                        optimizer.backoff *= 0.5
                        rollbacks.append(Rollback(step, optimizer.lr))
                        warn(
                            "%s: %s at step %d; rolled back to the last good state, learning "
                            "rate halved to %.3g (rollback %d of at most %d)",
                            desc,
                            what,
                            step,
                            optimizer.lr,
                            len(rollbacks),
                            MAX_ROLLBACKS,
                        )
                    else:
                        msg = f"{desc}: {what} at step {step}; kept the last good state"
                        if on_nan == "rollback":
                            msg += f" (gave up after {MAX_ROLLBACKS} rollbacks)"
                        if on_nan == "raise":
                            raise FitError(
                                msg + ". Lower lr, check the data scale (standardize x and y) "
                                "and the priors, or pass on_nan='rollback'."
                            )
                        warn(msg)
                        stopped = Stop(step, reason, None)
                        in_step = False
                        done = step + 1
                        break
                in_step = False
                done = step + 1
                bar.update(1)
                if step % 25 == 0 and losses:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
                if what is None and deterministic and len(losses) >= 2 and tol > 0:
                    change = abs(losses[-2] - losses[-1])
                    streak = streak + 1 if change <= tol * max(1.0, abs(losses[-1])) else 0
                    if streak >= PATIENCE:
                        converged = True
                        break
                if seg is not None and seg.due(done):
                    seg.save(state())
        except KeyboardInterrupt:
            warn("%s: interrupted at step %d; keeping the state reached", desc, done)
            stopped = Stop(done, "interrupted", None)
            interrupt.request()  # one Ctrl-C stops every later part of the fit too
        finally:
            bar.close()
            if bn is not None:
                problem.training = None
                problem.state = dict(bn.running)
                if losses:
                    problem.meta["trained_state"] = True
    loss_trace = torch.tensor(losses, dtype=torch.float64)
    if converged is None and stopped is None:
        if deterministic:
            converged = False if tol > 0 else loss_trend(loss_trace)[0]
        else:
            converged = loss_trend(loss_trace)[0]
        if converged is False and full and warn_unconverged:
            rel = loss_trend(loss_trace)[1]
            how = (
                f"its loss still fell by {rel:.2g} (relative) over the last tenth of the steps"
                if math.isfinite(rel) and rel > 0
                else "its loss was still changing at the last step"
            )
            warn("%s: not converged after %d steps: %s; %s", desc, len(losses), how, advice)
    result = Trained(
        params=optimizer.params,
        loss=loss_trace,
        stopped=stopped,
        rollbacks=rollbacks,
        converged=converged,
        lr=optimizer.lr,
    )
    if seg is not None:
        if stopped is not None and stopped.interrupted:
            seg.interrupt(None if in_step else state())
        else:
            fin = {"result": result.to_state(), "rng": checkpoint.rng_state(params.device)}
            if callback is not None and hasattr(callback, "state_dict"):
                fin["callback"] = callback.state_dict()
            seg.finish(fin)
    return result


def _evaluate(objective: Objective, params: torch.Tensor, batch: Batch, desc: str, step: int):
    """``objective.loss_and_grad``; an allocation failure names the step and the fix."""
    try:
        return objective.loss_and_grad(params, batch)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        rows = batch.size
        size = "the full batch" if rows is None else f"minibatches of {rows} rows"
        raise OutOfMemoryError(
            f"{desc}: out of memory at step {step} on {size} ({type(e).__name__}: {e}); use "
            "a smaller batch_size (or DataLoader batch size)"
        ) from e


def _to(saved: dict, like: dict | None) -> dict:
    """Saved BatchNorm statistics on the device (and in the float dtype) of ``like``."""
    if not like:
        return dict(saved)
    out = {}
    for k, v in saved.items():
        ref = like.get(k, v)
        out[k] = v.to(ref.device, ref.dtype) if v.is_floating_point() else v.to(ref.device)
    return out


# ---- helpers for methods ------------------------------------------------------------------------
def stack_losses(losses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean over members per step, (member, step) padded with NaN)`` of loss traces."""
    n = max((len(v) for v in losses), default=0)
    out = torch.full((len(losses), n), float("nan"), dtype=torch.float64)
    for i, v in enumerate(losses):
        out[i, : len(v)] = v
    return out.nanmean(0) if n else out.new_zeros(0), out


# ---- options shared by the optimization-based methods -----------------------------------------
def checkpoint_option():
    """The ``checkpoint`` option (a field)."""
    return option(
        None,
        file_path(),
        "file to save the fit's state to (every `checkpoint_every` steps, on Ctrl-C and at "
        "the end); continue it with `mz.resume` (see `inference/engines/checkpoint.py`)",
    )


def checkpoint_every_option(default: int = 500):
    """The ``checkpoint_every`` option (a field)."""
    return option(default, integer(1), "steps (or iterations) between checkpoints")


@dataclass
class TrainOptions(Options):
    """Options of every method trained by the training loop (``engines/training.py``)."""

    steps: int = option(
        2000,
        integer(0, 10**9),
        "optimizer steps (minibatches; 0: none, the start itself, e.g. a trained network's "
        "weights with init='module')",
    )
    epochs: int | None = option(
        None,
        integer(1, 10**7, optional=True),
        "passes over the data instead of `steps` (steps = epochs x minibatches per pass: the "
        "data loader's length, or N // batch_size); give one of the two",
    )
    lr: float | None = option(1e-2, number(0, MAX_LR), "learning rate (Adam)")
    lr_final: float = option(
        0.1,
        number(0, 1),
        "learning rate at the last step as a fraction of `lr` (exponential decay)",
    )
    batch_size: int | None = option(
        None,
        integer(1, optional=True),
        "minibatch size (None: the full batch; with a data loader its own batches); the "
        "likelihood is scaled to the full data",
    )
    clip_norm: float | None = option(
        None,
        number(optional=True),
        "clamp every gradient coordinate to [-clip_norm, clip_norm] (None: no clipping)",
    )
    init: str = option(
        "auto",
        choice(*INIT),
        "starting point: 'auto' ('module' for a wrapped nn.Module, else 'scaled'), 'module' "
        "(its own weights and BatchNorm statistics), 'reset' (a fresh PyTorch initialization "
        "of it), 'scaled' (fan-in scaled weights and biases, capped by the prior SD; the prior "
        "median elsewhere; see engines/init.py), 'median' or 'prior' (a prior draw)",
    )
    on_nan: str = option(
        "stop",
        choice(*ON_NAN),
        "a non-finite loss, gradient or parameter: 'stop' (keep the last good state, with a "
        "warning), 'rollback' (back to it, halve the learning rate, continue; at most "
        f"{MAX_ROLLBACKS} times) or 'raise' (FitError)",
    )
    checkpoint: str | None = checkpoint_option()
    checkpoint_every: int = checkpoint_every_option()


ENGINES = ("auto", "fast", "generic", "pyro")
_ENGINE_DOC = (
    "'auto' (the fused torch path: closed form for builder MLPs, else `Problem.log_joint`), "
    "'fast' (the closed form, or an error), 'generic' (`Problem.log_joint`) or 'pyro' (a Pyro "
    "autoguide under Trace_ELBO: the reference path)"
)


@dataclass
class MAPOptions(TrainOptions):
    """Options of a MAP fit (``map``, ``ensemble`` members, the MAP stage of ``laplace``)."""

    lr: float | None = option(
        None,
        number(0, MAX_LR, optional=True),
        "learning rate (None: 1.0 for L-BFGS, whose line search adapts it; 0.01 for Adam)",
    )
    optimizer: str = option(
        "auto",
        choice("auto", "lbfgs", "adam"),
        "'lbfgs' (full batch: quasi-Newton with a strong-Wolfe line search, stops when the "
        "loss no longer changes), 'adam', or 'auto' (L-BFGS for the full batch of in-memory "
        "data, else Adam: minibatches, a data loader)",
    )
    engine: str = option("auto", choice(*ENGINES), _ENGINE_DOC)

    def validate(self):
        super().validate()
        if self.optimizer == "lbfgs" and self.batch_size is not None:
            raise OptionError(
                "optimizer: 'lbfgs' needs the full batch (batch_size=None); use 'adam' or 'auto' "
                "with minibatches"
            )


def resolve_engine(problem: Problem, engine: str) -> str:
    """``"fast"``, ``"generic"`` or ``"pyro"`` for the ``engine`` option on ``problem``."""
    if engine in ("pyro", "generic"):
        return engine
    fast = closed_form(problem) is not None
    if engine == "fast" and not fast:
        raise OptionError(
            "engine: 'fast' needs a builder MLP (mz.models.mlp) with the package's priors and "
            "likelihoods, on all of its sites; use engine='auto' (Problem.log_joint) or 'pyro'"
        )
    return "fast" if fast else "generic"


def adam(params: torch.Tensor, opts, steps: int | None = None, lr: float | None = None) -> Adam:
    """The Adam of the SVI-trained methods: ``lr`` decaying to ``lr * lr_final`` at the last
    step, gradients clamped elementwise at ``clip_norm``."""
    steps = opts.steps if steps is None else steps
    lr = (opts.lr if opts.lr is not None else 1e-2) if lr is None else lr
    return Adam(params, lr, exponential(opts.lr_final, steps), clip_value=opts.clip_norm)


def fit_point(
    problem: Problem,
    opts: MAPOptions,
    seed: int,
    progress: bool,
    *,
    desc: str = "map",
    warn_unconverged: bool = True,
) -> tuple[torch.Tensor, Trained, str]:
    """A MAP fit of every latent site of ``problem``: ``(z, run, engine)``.

    The mode is in the model's own parameterization (no log-Jacobian, as Pyro's ``AutoDelta``).
    The full batch is minimized by L-BFGS (``optimizer="auto"``) until the loss stops changing,
    minibatches by Adam.
    """
    engine = resolve_engine(problem, getattr(opts, "engine", "auto"))
    full = problem.in_memory and is_full_batch(problem.n, opts.batch_size)
    kind = getattr(opts, "optimizer", "auto")
    kind = ("lbfgs" if full else "adam") if kind == "auto" else kind
    guide = None
    if engine == "pyro":
        from pyro.infer import Trace_ELBO
        from pyro.infer.autoguide import AutoDelta

        guide = AutoDelta(problem.model, init_loc_fn=init_loc_fn(problem, opts.init))
        objective: Objective = PyroObjective(problem, guide, Trace_ELBO(), stochastic=False)
        z0 = objective.initial()
    else:
        objective = PointObjective(problem, jacobian=False, engine=engine)
        z0 = initial_z(problem, opts.init)
    if kind == "lbfgs":
        optimizer: FlatOptimizer = LBFGS(
            z0, 1.0 if opts.lr is None else opts.lr, exponential(opts.lr_final, opts.steps)
        )
        advice = "raise steps"
    else:
        optimizer = adam(z0, opts)
        advice = "raise steps, or use optimizer='lbfgs'" if full else "raise steps"
    run = train(
        objective,
        optimizer,
        opts.steps,
        problem=problem,
        batch_size=opts.batch_size,
        seed=seed,
        on_nan=opts.on_nan,
        desc=desc,
        progress=progress,
        advice=advice,
        warn_unconverged=warn_unconverged,
    )
    if guide is not None:
        objective.write_back(run.params)
        with torch.no_grad():
            z = problem.layout.pack(guide.median(*problem.example))
    else:
        z = run.params.clone()
    return z, run, engine
