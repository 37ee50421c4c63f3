"""``ensemble``: deep ensembles as a mixture of independent MAP fits.

Each member is a MAP fit (:func:`~marginalize.inference.engines.training.fit_point`)
run in its own :func:`~marginalize.inference.engines.seeding.isolated` scope with its own seed, so
members differ in their initialization (option ``init``, a random fan-in scaled start by
default) and their minibatch order. The result is
an equal-weight ``Mixture`` of ``Delta`` points; each member is a chain, so R-hat across
members says whether they found the same function.

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
from dataclasses import dataclass

from marginalize.core.approximations import Delta, Mixture
from marginalize.errors import warn
from marginalize.inference.engines import interrupt
from marginalize.inference.engines.distributed import run_members
from marginalize.inference.engines.options import integer, option
from marginalize.inference.engines.seeding import isolated, member_seed
from marginalize.inference.engines.training import MAPOptions, Trained, fit_point, stack_losses
from marginalize.inference.registry import Method, register

__all__ = ["Ensemble"]

log = logging.getLogger(__name__)


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

    def run(self, problem, opts, seed, progress):
        map_opts = MAPOptions(
            **{f.name: getattr(opts, f.name) for f in dataclasses.fields(MAPOptions)}
        )

        def member(k):
            sk = member_seed(seed, k)
            with isolated(sk):
                z, run, engine = fit_point(problem, map_opts, sk, progress, desc=f"member {k + 1}")
            return Delta(z), {"run": run.to_state(), "engine": engine}

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
        return Mixture(members), info


def _trained(record: dict) -> Trained:
    return Trained.from_state(record["run"], None, None)
