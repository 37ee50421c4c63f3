"""Guide-based methods trained by SVI: ``map``, ``svi-meanfield``, ``svi-lowrank``.

The model never changes: each method is a Pyro autoguide on the same model, trained by
:func:`run_svi` (minibatches with the likelihood scaled to the full data, ClippedAdam,
progress bar, non-finite loss handling), then read out as an approximation over the flat
unconstrained vector.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median, init_to_sample
from tqdm.auto import tqdm

from marginalize._validation import OptionError
from marginalize.inference.approximations import Delta, Gaussian
from marginalize.inference.problem import Problem, _ScaleObs
from marginalize.inference.registry import Method, register

__all__ = ["SVIOptions", "run_svi", "FitError", "INIT"]

log = logging.getLogger(__name__)

INIT = {"prior": init_to_sample, "median": init_to_median}


class FitError(RuntimeError):
    """A fit could not continue (e.g. the loss became NaN and ``on_nan="raise"``)."""


@dataclass
class SVIOptions:
    """Options shared by SVI-trained methods.

    steps : number of optimizer steps; lr : Adam learning rate; lr_final : learning rate at the
    last step as a fraction of ``lr`` (exponential decay); batch_size : minibatch size (None:
    full batch); num_particles : ELBO samples per step; clip_norm : gradient norm clip;
    init : "prior" (a prior draw) or "median"; on_nan : "stop" (keep the last good parameters
    and stop, with a warning) or "raise".
    """

    steps: int = 2000
    lr: float = 1e-2
    lr_final: float = 0.1
    batch_size: int | None = None
    num_particles: int = 1
    clip_norm: float = 10.0
    init: str = "prior"
    on_nan: str = "stop"

    def __post_init__(self):
        _check_int("steps", self.steps, 1)
        _check_int("num_particles", self.num_particles, 1)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1)
        for name in ("lr", "clip_norm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise OptionError(f"{name}: expected a positive number, got {v!r}")
        if not (0 < self.lr_final <= 1):
            raise OptionError(f"lr_final: expected a fraction in (0, 1], got {self.lr_final!r}")
        if self.init not in INIT:
            raise OptionError(f"init: expected one of {sorted(INIT)}, got {self.init!r}")
        if self.on_nan not in ("stop", "raise"):
            raise OptionError(f"on_nan: expected 'stop' or 'raise', got {self.on_nan!r}")


def _check_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise OptionError(f"{name}: expected an integer >= {minimum}, got {v!r}")


def _batches(n: int, batch_size: int | None, steps: int, generator: torch.Generator, device):
    """Yield minibatch index tensors (an epoch-wise permutation), or None for full batch."""
    if batch_size is None or batch_size >= n:
        for _ in range(steps):
            yield None
        return
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield perm[start : start + batch_size]
            done += 1


def run_svi(problem: Problem, guide: Callable, opts: SVIOptions, seed: int, progress: bool,
            *, desc: str = "svi", elbo=None) -> dict:
    """Train ``guide`` on ``problem.model`` by SVI; return info with the loss trace.

    Parameters live in the current Pyro param store (the caller's isolated scope). On a
    non-finite loss the parameters of the last finite step are restored.
    """
    n = problem.n
    scaler = _ScaleObs(1.0)

    def model(x, y):
        with scaler:
            return problem.model(x, y)

    def scaled_guide(x, y):
        return guide(x, y)

    decay = opts.lr_final ** (1.0 / max(opts.steps, 1))
    optim = pyro.optim.ClippedAdam({"lr": opts.lr, "clip_norm": opts.clip_norm, "lrd": decay})
    elbo = elbo or Trace_ELBO(num_particles=opts.num_particles)
    svi = SVI(model, scaled_guide, optim, loss=elbo)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    store = pyro.get_param_store()
    last_good: dict[str, torch.Tensor] = {}
    stopped = None
    bar = tqdm(total=opts.steps, desc=desc, disable=not progress, leave=False)
    try:
        for step, idx in enumerate(_batches(n, opts.batch_size, opts.steps, gen, problem.device)):
            if idx is None:
                xb, yb, scaler.scale = problem.x, problem.y, 1.0
            else:
                xb, yb, scaler.scale = problem.x[idx], problem.y[idx], n / len(idx)
            if step > 0:
                for k, v in store.named_parameters():
                    if k in last_good:
                        last_good[k].copy_(v.detach())
                    else:
                        last_good[k] = v.detach().clone()
            loss = svi.step(xb, yb)
            if not math.isfinite(loss):
                msg = (f"{desc}: the loss became {loss} at step {step}; "
                       + ("keeping the parameters of the last finite step" if step else "at the start"))
                if step:
                    with torch.no_grad():
                        for k, v in store.named_parameters():
                            if k in last_good:
                                v.copy_(last_good[k])
                if opts.on_nan == "raise" or step == 0:
                    raise FitError(msg + ". Lower lr, or check the data scale and priors.")
                log.warning(msg)
                stopped = {"step": step, "reason": f"non-finite loss ({loss})"}
                break
            losses.append(loss)
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{loss:.4g}")
    except KeyboardInterrupt:
        log.warning("%s: interrupted at step %d; keeping the parameters reached", desc, len(losses))
        stopped = {"step": len(losses), "reason": "interrupted"}
    finally:
        bar.close()
    info = {"loss": torch.tensor(losses, dtype=torch.float64), "steps_done": len(losses)}
    if stopped:
        info["stopped"] = stopped
    return info


def _guide_loc_scale_normal(guide: AutoNormal, problem: Problem):
    locs, scales = [], []
    for s in problem.layout.sites:
        loc, scale = guide._get_loc_and_scale(s.name)
        locs.append(loc.detach().reshape(-1))
        scales.append(scale.detach().reshape(-1))
    return torch.cat(locs), torch.cat(scales)


@register("map")
class MAP(Method):
    summary = "Maximum a posteriori point estimate (AutoDelta trained by SVI)."
    cost = "training: one forward/backward per step; prediction: one forward pass"
    reference = "the regularized maximum-likelihood baseline of every BNN paper"

    @dataclass
    class Options(SVIOptions):
        pass

    def run(self, problem, opts, seed, progress):
        guide = AutoDelta(problem.model, init_loc_fn=INIT[opts.init])
        info = run_svi(problem, guide, opts, seed, progress, desc="map")
        with torch.no_grad():
            values = guide.median(problem.x, problem.y)
        return Delta(problem.layout.pack(values)), info


@register("svi-meanfield")
class MeanField(Method):
    summary = "Mean-field Gaussian variational inference (AutoNormal; Bayes by Backprop)."
    cost = "training: ~2x MAP per step; prediction: one batched pass per chunk of draws"
    reference = "Blundell et al. 2015, Weight Uncertainty in Neural Networks"

    @dataclass
    class Options(SVIOptions):
        """Plus: init_scale (initial posterior std), analytic_kl (closed-form KL where the
        prior allows it: TraceMeanField_ELBO)."""

        init_scale: float = 0.01
        analytic_kl: bool = True

        def __post_init__(self):
            super().__post_init__()
            if not self.init_scale > 0:
                raise OptionError(f"init_scale: expected > 0, got {self.init_scale!r}")

    def run(self, problem, opts, seed, progress):
        guide = AutoNormal(problem.model, init_loc_fn=INIT[opts.init], init_scale=float(opts.init_scale))
        elbo = (TraceMeanField_ELBO if opts.analytic_kl else Trace_ELBO)(num_particles=opts.num_particles)
        info = run_svi(problem, guide, opts, seed, progress, desc="svi-meanfield", elbo=elbo)
        loc, scale = _guide_loc_scale_normal(guide, problem)
        return Gaussian(loc, scale), info


@register("svi-lowrank")
class LowRank(Method):
    summary = "Gaussian VI with diagonal plus rank-r covariance (AutoLowRankMultivariateNormal)."
    cost = "training: O(D r) per step on top of MAP; prediction: one batched pass per chunk"
    reference = "Rezende et al. 2014; Ong, Nott & Smith 2018 (factor covariance VI)"

    @dataclass
    class Options(SVIOptions):
        """Plus: rank (of the covariance factor), init_scale."""

        rank: int = 10
        init_scale: float = 0.01

        def __post_init__(self):
            super().__post_init__()
            _check_int("rank", self.rank, 1)
            if not self.init_scale > 0:
                raise OptionError(f"init_scale: expected > 0, got {self.init_scale!r}")

    def run(self, problem, opts, seed, progress):
        guide = AutoLowRankMultivariateNormal(
            problem.model, init_loc_fn=INIT[opts.init], init_scale=float(opts.init_scale),
            rank=min(opts.rank, problem.layout.size),
        )
        info = run_svi(problem, guide, opts, seed, progress, desc="svi-lowrank")
        names = list(guide._unconstrained_shapes)
        if names != problem.layout.names:  # pragma: no cover - guards Pyro internals
            raise RuntimeError(f"latent order differs between guide {names} and layout {problem.layout.names}")
        with torch.no_grad():
            s = guide.scale.detach()
            factor = guide.cov_factor.detach() * s.unsqueeze(-1)
        return Gaussian(guide.loc.detach().clone(), s.clone(), cov_factor=factor), info
