"""``ensemble``: deep ensembles as a mixture of independent MAP fits.

Each member is a MAP fit (:func:`~marginalize.inference.engines.training.fit_point`)
run in its own :func:`~marginalize.inference.engines.seeding.isolated` scope with its own seed, so
members differ in their initialization (option ``init``: a random fan-in scaled start by
default, a fresh PyTorch initialization of a wrapped ``nn.Module``) and their minibatch order.
The result is an equal-weight ``Mixture`` of ``Delta`` points; each member is a chain, so
R-hat across members says whether they found the same function.

Networks trained elsewhere (``members``): each member starts from one of them, its weights
and its BatchNorm statistics; ``steps=0`` makes the ensemble exactly those networks (a deep
ensemble trained with your own loop, then marginalize's predictive and diagnostics).

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 30)[:, None]; y = torch.sin(3 * x[:, 0])
>>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="ensemble", num_members=3,
...               steps=50, progress=False)
>>> post.num_chains
3
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from marginalize.core.approximations import Delta, Mixture
from marginalize.errors import ModelError, OptionError, warn
from marginalize.inference.engines import interrupt
from marginalize.inference.engines.distributed import run_members
from marginalize.inference.engines.init import INIT, initial_values, module_model, resolve_init
from marginalize.inference.engines.options import choice, integer, option
from marginalize.inference.engines.seeding import isolated, member_seed
from marginalize.inference.engines.training import MAPOptions, Trained, fit_point, stack_losses
from marginalize.inference.registry import Method, register

__all__ = ["Ensemble"]

log = logging.getLogger(__name__)


def _members_check(name, v):
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not v:
        raise OptionError(
            f"{name}: expected a non-empty list of networks (nn.Modules or state dicts) or dicts "
            f"of latent site values, got {type(v).__name__}"
        )
    for i, m in enumerate(v):
        if not isinstance(m, (nn.Module, Mapping)):
            raise OptionError(
                f"{name}[{i}]: expected an nn.Module, a state dict or a dict of latent site "
                f"values, got {type(m).__name__}"
            )
    return list(v)


@register("ensemble")
class Ensemble(Method):
    summary = "Deep ensemble: an equal-weight mixture of independent MAP fits (members are chains)."
    cost = "training: num_members x MAP; prediction: one forward pass per member"
    reference = (
        "Lakshminarayanan, Pritzel & Blundell 2017, Simple and Scalable Predictive "
        "Uncertainty Estimation using Deep Ensembles; Wilson & Izmailov 2020"
    )

    @dataclass
    class Options(MAPOptions):
        """The options of ``map`` for every member, plus the number of members."""

        num_members: int = option(
            5,
            integer(1, 10**4),
            "number of independent MAP fits, each with its own initialization and minibatch order",
        )
        members: list | None = option(
            None,
            _members_check,
            "networks to start the members from, one each (num_members follows): trained "
            "nn.Modules of the wrapped module's architecture or their state_dict()s, or dicts "
            "of latent site values; with steps=0 the ensemble is these networks",
        )
        init: str = option(
            "auto",
            choice(*INIT),
            "each member's start: 'auto' ('reset' for a wrapped nn.Module: a fresh PyTorch "
            "initialization per member; else 'scaled'), 'module', 'reset', 'scaled', 'median' "
            "or 'prior' (see engines/init.py)",
        )

    def check(self, problem, opts, given):
        super().check(problem, opts, given)
        if opts.members is None:
            return
        k = len(opts.members)
        if "num_members" in given and opts.num_members != k:
            raise OptionError(
                f"num_members: {opts.num_members} given with {k} members; give one of the two"
            )
        if opts.checkpoint is not None:
            raise OptionError(
                "checkpoint: not available with members (networks are not stored in checkpoint "
                "files)"
            )
        opts.num_members = k
        problem.meta["member_starts"] = [_start(problem, m, i) for i, m in enumerate(opts.members)]

    def run(self, problem, opts, seed, progress):
        fields = {f.name: getattr(opts, f.name) for f in dataclasses.fields(MAPOptions)}
        fields["init"] = resolve_init(problem, opts.init, wrapped="reset")
        map_opts = MAPOptions(**fields)
        starts = problem.meta.pop("member_starts", None)
        first = {} if problem.state is None else dict(problem.state)

        def member(k):
            sk = member_seed(seed, k)
            problem.state = dict(first) if first else None
            if starts is not None:
                values, state = starts[k]
                with isolated(sk):  # the sites not given start from init
                    base = initial_values(problem, map_opts.init)
                problem.meta["init"] = problem.layout.pack({**base, **values}).to(
                    problem.device, problem.dtype
                )
                if state is not None and problem.stateful:
                    problem.state = state
            try:
                with isolated(sk):
                    z, run, engine = fit_point(
                        problem, map_opts, sk, progress, desc=f"member {k + 1}"
                    )
            finally:
                problem.meta.pop("init", None)
            return Delta(z), {"run": run.to_state(), "engine": engine, "state": problem.state}

        # spread over the ranks of a distributed run (torchrun), gathered on every rank; one
        # Ctrl-C ends the member it hits and the members after it
        results = run_members(
            opts.num_members,
            member,
            label="member",
            stop=lambda r: _trained(r[1]).interrupted or interrupt.requested(),
        )
        if not results:
            raise KeyboardInterrupt("interrupted before the first member started")
        members = [approx for approx, _ in results]
        runs = [_trained(r) for _, r in results]
        mean_loss, member_loss = stack_losses([r.loss for r in runs])
        stopped = next((r.stopped for r in runs if r.stopped is not None), None)
        if stopped is not None:
            k = next(i for i, r in enumerate(runs) if r.stopped is not None)
            stopped.part = f"member {k + 1}"
            if stopped.interrupted:
                warn("ensemble: interrupted; returning the %d member(s) reached", len(members))
        converged = [r.converged for r in runs]
        info = runs[0].info(loss=mean_loss, member_loss=member_loss, engine=results[0][1]["engine"])
        info.stopped = stopped
        info.steps_done = sum(r.steps_done for r in runs)
        info.converged = None if None in converged else all(converged)
        info.rollbacks = [rb for r in runs for rb in r.rollbacks]
        states = [r.get("state") for _, r in results]
        if problem.stateful and not any(r.steps_done for r in runs) and None not in states:
            # no step taken: each member keeps its own network's BatchNorm statistics
            problem.meta["final_state"] = {
                k: torch.stack([st[k] for st in states]) for k in states[0]
            }
        return Mixture(members), info


def _start(problem, member, i: int):
    """``(constrained values of some latent sites, BatchNorm statistics or None)`` of one
    entry of ``members``, on the fit's device and dtype; ``OptionError`` for an entry that
    does not fit the model."""
    model = module_model(problem)
    what = f"members[{i}]"
    if isinstance(member, nn.Module) or (
        model is not None and any(k in member for k in model.module.state_dict())
    ):
        if model is None:
            raise OptionError(
                f"{what}: an nn.Module needs a model made by mz.models.bayesian(module); give "
                "dicts of latent site values instead"
            )
        try:
            values, state = model.values_of(member, what)
        except ModelError as e:
            raise OptionError(str(e)) from e
    else:
        values, state = dict(member), None
    layout = problem.layout
    out = {}
    for name, v in values.items():
        if name not in layout:
            raise OptionError(
                f"{what}: {name!r} is not a latent site of the model; sites are {layout.names}"
            )
        t = torch.as_tensor(v).detach()
        if tuple(t.shape) != tuple(layout[name].shape):
            raise OptionError(
                f"{what}: {name!r} has shape {tuple(t.shape)}, the site's is "
                f"{tuple(layout[name].shape)}"
            )
        out[name] = t.to(problem.device, problem.dtype)
    if state is not None:
        state = {
            k: t.to(problem.device, problem.dtype)
            if t.is_floating_point()
            else t.to(problem.device)
            for k, t in state.items()
        }
    return out, state


def _trained(record: dict) -> Trained:
    return Trained.from_state(record["run"], None, None)
