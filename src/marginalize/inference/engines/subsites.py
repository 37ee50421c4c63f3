"""Last-layer (subset) Bayesian inference for any method: option ``bayesian_sites``.

The recipe is the same for every method that takes the option (``svi-meanfield``,
``svi-lowrank``, ``mc-dropout``, ``laplace``, ``swag``, ``multiswag``):

1. fit a MAP point of all latent sites (the method's :meth:`map_point` hook; by default
   ``map`` with the method's SVI options);
2. build a :class:`SubProblem`: the model with the other sites conditioned on their MAP
   values (``pyro.condition``, for guides) and a log joint over the chosen coordinates of
   ``z`` only (the others fixed, batched for builder models);
3. run the method on it (``problem.meta["init"]`` holds the MAP values of the chosen
   sites: methods start there and skip their own MAP stage);
4. :func:`embed` the result into an approximation over the full ``z`` whose other
   coordinates are fixed at the MAP (zero scale, or the same point in every draw).

``bayesian_sites`` is ``"last_layer"`` (the builder's last layer; for a plain model function
the last real site with two or more dims and the 1-D real sites after it), or a list of
site names or layer-name prefixes (``"layer2"`` matches ``layer2.weight`` and
``layer2.bias``).

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 30)[:, None]; y = torch.sin(3 * x[:, 0])
>>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="svi-meanfield", steps=50,
...               bayesian_sites="last_layer", progress=False)
>>> post.info.bayesian_sites
['layer2.weight', 'layer2.bias']
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine

from marginalize.core.approximations import (
    Approximation,
    Delta,
    Dropout,
    Empirical,
    Gaussian,
    Kronecker,
    Mixture,
)
from marginalize.core.layout import Layout
from marginalize.core.problem import Problem, trace_model
from marginalize.errors import ModelError, OptionError
from marginalize.inference.engines import interrupt
from marginalize.inference.engines.options import Options, names, option
from marginalize.inference.engines.seeding import isolated
from marginalize.inference.engines.training import MAPOptions, Trained, fit_point
from marginalize.models.base import BNN

__all__ = [
    "BayesianSites",
    "SubProblem",
    "resolve_sites",
    "run_on_sites",
    "embed",
    "unwrap",
    "map_point",
]

log = logging.getLogger(__name__)


@dataclass
class BayesianSites(Options):
    """Mixin for a method's ``Options``: the option ``bayesian_sites``."""

    bayesian_sites: list[str] | str | None = option(
        None,
        names("last_layer"),
        "only these sites get the approximation, the others are held at a MAP fitted first: "
        "None (every site), 'last_layer', or a list of site names or layer-name prefixes "
        "(see `engines/subsites.py`)",
    )


def _last_layer(problem: Problem) -> list[str]:
    layout = problem.layout
    if isinstance(problem.model, BNN):
        last = problem.model.layer_specs()[-1].name
        return [n for n in (f"{last}.weight", f"{last}.bias") if n in layout]
    real = layout.real_sites()
    matrices = [i for i, s in enumerate(real) if len(s.shape) >= 2]
    if not matrices:
        raise ModelError(
            "bayesian_sites='last_layer': the model has no real-valued site with 2 or more dims "
            "(a weight matrix); name the sites instead, e.g. bayesian_sites=['w_out', 'b_out']"
        )
    i = matrices[-1]
    return [real[i].name] + [s.name for s in real[i + 1 :] if len(s.shape) == 1]


def resolve_sites(problem: Problem, spec) -> list[str]:
    """Names of the Bayesian sites selected by ``spec``, in layout order."""
    if spec == "last_layer":
        return _last_layer(problem)
    entries = [spec] if isinstance(spec, str) else list(spec)
    chosen: set[str] = set()
    for e in entries:
        hits = [n for n in problem.layout.names if n == e or n.startswith(e + ".")]
        if not hits:
            raise OptionError(
                f"bayesian_sites: {e!r} matches no latent site; sites are {problem.layout.names}"
            )
        chosen.update(hits)
    return [n for n in problem.layout.names if n in chosen]


#: what a sub-problem shares with its base problem's ``meta``
_SHARED_META = ("dtype", "device", "example", "keep_int", "labels", "method")


@dataclass
class SubProblem(Problem):
    """A problem over some sites of ``base`` with the other coordinates of ``z`` fixed.

    ``model`` is the base model with the fixed sites conditioned (for guides), ``idx`` the
    positions of the free coordinates in the full ``z`` and ``fixed`` the full ``z`` that
    supplies the others.
    """

    base: Problem | None = None
    idx: torch.Tensor | None = None
    fixed: torch.Tensor | None = None

    @classmethod
    def create(cls, base: Problem, names: list[str], z: torch.Tensor) -> SubProblem:
        keep = set(names)
        values = base.layout.unpack(z.detach())
        fixed_values = {k: v for k, v in values.items() if k not in keep}
        model = poutine.condition(base.model, data=fixed_values)
        ex_x, ex_y = base.example
        with torch.random.fork_rng(devices=[]):
            tr = trace_model(model, ex_x[:2], ex_y[:2])
        dims = base.model.site_dims() if isinstance(base.model, BNN) else None
        layout = Layout.from_trace(tr, dims)
        if layout.names != names:  # pragma: no cover - guards the model contract
            raise ModelError(f"conditioning left sites {layout.names}, expected {names}")
        idx = torch.cat(
            [
                torch.arange(base.layout[n].offset, base.layout[n].offset + base.layout[n].size)
                for n in names
            ]
        ).to(z.device)
        meta = {k: base.meta[k] for k in _SHARED_META if k in base.meta}
        meta.update(init=z.detach()[idx].clone(), init_values={n: values[n] for n in names})
        sub = cls(
            model,
            base.data,
            layout,
            base.task,
            base.num_classes,
            meta=meta,
            base=base,
            idx=idx,
            fixed=z.detach().clone(),
        )
        return sub

    @property
    def vectorized(self) -> bool:
        return self.base.vectorized

    def embed(self, z_sub: torch.Tensor) -> torch.Tensor:
        """Full ``z`` (leading dims of ``z_sub`` kept) with the free coordinates from ``z_sub``."""
        full = self.fixed.expand(*z_sub.shape[:-1], self.fixed.shape[-1])
        return (
            full.index_copy(-1, self.idx, z_sub)
            if z_sub.dim() > 1
            else self.fixed.index_copy(0, self.idx, z_sub)
        )

    def log_joint(self, z, idx=None):
        return self.base.log_joint(self.embed(z), idx)

    def log_joint_rows(self, z, x, y, scale):
        return self.base.log_joint_rows(self.embed(z), x, y, scale)

    def init_from_prior(self, generator_seed: int) -> torch.Tensor:
        return self.base.init_from_prior(generator_seed)[self.idx]


def unwrap(
    problem: Problem,
) -> tuple[Problem, Callable[[torch.Tensor], torch.Tensor], torch.Tensor | None]:
    """``(full problem, embed, idx)``; for a plain problem the identity and ``None``."""
    if isinstance(problem, SubProblem):
        return problem.base, problem.embed, problem.idx
    return problem, (lambda z: z), None


def map_point(problem: Problem, opts, seed: int, progress: bool) -> tuple[torch.Tensor, Trained]:
    """A MAP fit of all sites with the training options found in ``opts`` (the default hook)."""
    kw = {
        f.name: getattr(opts, f.name)
        for f in dataclasses.fields(MAPOptions)
        if hasattr(opts, f.name) and f.name not in ("checkpoint", "checkpoint_every")
    }
    if "optimizer" not in kw:  # the method's own optimizer settings (Adam) are not MAP's
        kw.pop("lr", None)
        kw.pop("lr_final", None)
        kw.pop("engine", None)
    with isolated(seed):
        z, run, _ = fit_point(problem, MAPOptions(**kw), seed, progress, desc="MAP stage")
    return z, run


def run_on_sites(method, problem: Problem, opts, seed: int, progress: bool):
    """Run ``method`` Bayesian over ``opts.bayesian_sites`` only, the rest at MAP.

    Called from the start of ``method.run`` when ``opts.bayesian_sites`` is set; returns
    ``(approximation over the full z, info)``. Ctrl-C during the MAP stage ends the fit there
    (a point mass at the MAP reached).
    """
    names_ = resolve_sites(problem, opts.bayesian_sites)
    inner = dataclasses.replace(opts, bayesian_sites=None)
    if len(names_) == len(problem.layout.sites):
        log.info("%s: bayesian_sites selects every site; fitting all of them", method.name)
        return method.run(problem, inner, seed, progress)
    hook = getattr(method, "map_point", None) or map_point
    z_map, map_run = hook(problem, opts, seed, progress)
    if map_run.interrupted or interrupt.requested():
        info = map_run.info(bayesian_sites=names_, map_loss=map_run.loss)
        if info.stopped is not None:
            info.stopped.part = "MAP stage"
        return Delta(z_map.detach().clone()), info
    if problem.stateful and map_run.steps_done > 0:  # the body's BatchNorm statistics at the MAP
        problem.refresh_state(z_map)
    sub = SubProblem.create(problem, names_, z_map)
    sub.meta["map_steps"] = map_run.steps_done
    with isolated(seed + 1):
        approx, info = method.run(sub, inner, seed + 1, progress)
    info = info.replace(bayesian_sites=names_, map_loss=map_run.loss)
    if info.loss is None:
        info.loss = map_run.loss
    return embed(approx, z_map, sub.idx), info


def embed(approx: Approximation, base: torch.Tensor, idx: torch.Tensor) -> Approximation:
    """An approximation over the full ``z``: ``approx`` on coordinates ``idx``, else ``base``."""
    base = base.detach()
    d = base.shape[-1]

    def put(v, fill):
        out = torch.full((d, *v.shape[1:]), fill, dtype=v.dtype, device=v.device)
        out[idx] = v
        return out

    def loc(v):
        return base.index_copy(0, idx, v)

    if isinstance(approx, Delta):
        return Delta(loc(approx.loc))
    if isinstance(approx, Gaussian):
        # the factor keeps its rows of the free coordinates only (k x r, with their positions)
        if approx.scale_tril is not None:
            return Gaussian(
                loc(approx.loc), base.new_zeros(d), cov_factor=approx.scale_tril, idx=idx
            )
        if approx.cov_factor is None:
            return Gaussian(loc(approx.loc), put(approx.scale, 0.0))
        inner = idx if approx.idx is None else idx[approx.idx]
        return Gaussian(
            loc(approx.loc), put(approx.scale, 0.0), cov_factor=approx.cov_factor, idx=inner
        )
    if isinstance(approx, Dropout):
        return Dropout(loc(approx.loc), put(approx.unit, -1), approx.num_units, approx.p)
    if isinstance(approx, Kronecker):
        blocks = [{**b, "idx": idx[b["idx"]]} for b in approx.blocks]
        return Kronecker(loc(approx.loc), put(approx.scale, 0.0), blocks)
    if isinstance(approx, Mixture):
        return Mixture([embed(c, base, idx) for c in approx.components])
    if isinstance(approx, Empirical):
        draws = base.expand(*approx.draws.shape[:2], d).index_copy(-1, idx, approx.draws)
        return Empirical(draws)
    raise TypeError(f"cannot embed a {type(approx).__name__} approximation")  # pragma: no cover
