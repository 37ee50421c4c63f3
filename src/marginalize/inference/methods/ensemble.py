"""``ensemble``: deep ensembles as a mixture of independent MAP fits.

Each member is a MAP fit (:func:`~marginalize.inference.engines.training.fit_map`)
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

from marginalize._validation import check_positive_int
from marginalize.core.approximations import Mixture
from marginalize.inference.engines.distributed import run_members
from marginalize.inference.engines.seeding import isolated, member_seed
from marginalize.inference.engines.training import SVIOptions, fit_map, stack_losses
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
    class Options(SVIOptions):
        """Options of ``map`` for every member (steps, lr, lr_final, batch_size, clip_norm,
        init, on_nan; num_particles is unused by a point estimate), plus:

        num_members : int
            Number of independent MAP fits (default 5), each with its own initialization
            and minibatch order (spread over the processes of a distributed run).
        """

        num_members: int = 5

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("num_members", self.num_members)

    def run(self, problem, opts, seed, progress):
        map_opts = SVIOptions(
            **{f.name: getattr(opts, f.name) for f in dataclasses.fields(SVIOptions)}
        )

        def member(k):
            sk = member_seed(seed, k)
            with isolated(sk):
                return fit_map(problem, map_opts, sk, progress)

        # spread over the ranks of a distributed run (torchrun), gathered on every rank
        results = run_members(opts.num_members, member, label="member")
        members = [approx for approx, _ in results]
        losses = [info["loss"] for _, info in results]
        stopped = [
            {"member": k, **i["stopped"]} for k, (_, i) in enumerate(results) if "stopped" in i
        ]
        mean_loss, member_loss = stack_losses(losses)
        out = {"loss": mean_loss, "member_loss": member_loss}
        if stopped:
            out["stopped"] = stopped[0] if len(stopped) == 1 else {"members": stopped}
        return Mixture(members), out
