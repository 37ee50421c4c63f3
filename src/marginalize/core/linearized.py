"""A model's output as a function of its flat parameters, and the Jacobian of that output.

With ``f(x; z)`` the model's output (a builder's network output; for a plain model function
the location, logits or log rate of its observation distribution, see :class:`OutputMap`),
Laplace's curvature (``inference/methods/laplace.py``) and the linearized (GLM) predictive
(``core/predictive/glm.py``) work with ``f`` and its Jacobian ``J = df/dz`` at the MAP.
Jacobians are computed in chunks of inputs (a vmapped ``jacrev`` for builder models;
reverse-mode ``autograd.functional.jacobian`` for plain functions).

Examples
--------
>>> import torch, marginalize as mz
>>> from marginalize.core.problem import prepare
>>> model = mz.models.mlp(1, hidden=[3])
>>> pb = prepare(model, torch.randn(6, 1), torch.randn(6))
>>> omap = output_map(model, pb.layout)
>>> z0 = pb.init_from_prior(0)
>>> cols = torch.arange(pb.layout.size - 1)  # every weight, not the noise scale
>>> output_jacobian(omap, z0, torch.randn(4, 1), cols).shape
torch.Size([4, 1, 10])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine

from marginalize.core.layout import check_sites
from marginalize.core.problem import _no_validation, observation_dist
from marginalize.errors import ModelError, is_out_of_memory
from marginalize.models.base import BNN

__all__ = [
    "LINK_APPROXIMATIONS",
    "JACOBIAN_BYTES",
    "OutputMap",
    "output_family",
    "output_map",
    "output_jacobian",
    "network_mask",
    "observation_node",
]

#: values of ``link_approx``: closed form (probit for classification) or Monte Carlo
LINK_APPROXIMATIONS = ("probit", "mc")
#: bytes a chunk of Jacobian rows may use
JACOBIAN_BYTES = 64 * 2**20


# ---- the model's output ---------------------------------------------------------------------
def output_family(base) -> tuple[str, Callable, Callable] | None:
    """``(name, output(base), rebuild(f, base))`` for an observation family: the output is
    its location, its logits or its log rate (the natural parameter of a Poisson)."""
    D = torch.distributions

    def loc(b):
        return b.loc

    def logits(b):
        return b.logits

    def log_rate(b):
        return torch.log(b.rate)

    if isinstance(base, D.Normal):
        return "loc", loc, lambda f, b: dist.Normal(f, b.scale)
    if isinstance(base, D.StudentT):
        return "loc", loc, lambda f, b: dist.StudentT(b.df, f, b.scale)
    if isinstance(base, D.Laplace):
        return "loc", loc, lambda f, b: dist.Laplace(f, b.scale)
    if isinstance(base, D.Cauchy):
        return "loc", loc, lambda f, b: dist.Cauchy(f, b.scale)
    if isinstance(base, D.LogNormal):
        return "loc", loc, lambda f, b: dist.LogNormal(f, b.scale)
    if isinstance(base, D.Bernoulli):
        return "logits", logits, lambda f, b: dist.Bernoulli(logits=f)
    if isinstance(base, D.Binomial):
        return "logits", logits, lambda f, b: dist.Binomial(b.total_count, logits=f)
    if isinstance(base, D.NegativeBinomial):
        return "logits", logits, lambda f, b: dist.NegativeBinomial(b.total_count, logits=f)
    if isinstance(base, D.Categorical) and not isinstance(base, D.OneHotCategorical):
        return "logits", logits, lambda f, b: dist.Categorical(logits=f)
    if isinstance(base, D.Poisson):
        return "log_rate", log_rate, lambda f, b: dist.Poisson(torch.exp(f))
    if isinstance(base, D.Exponential):
        return "log_rate", log_rate, lambda f, b: dist.Exponential(torch.exp(f))
    return None


@dataclass
class OutputMap:
    """The model's output ``f(z, x)`` ``(N, O)`` as a function of the flat vector ``z``, and
    the observation distribution given ``f``.

    Builder models: ``f`` is the network output and the distribution the model's likelihood;
    ``forward`` takes batched ``z`` ``(*B, D)``. Plain model functions: ``f`` is the output
    parameter of the observation site's distribution (``loc`` of a Normal, StudentT, Laplace,
    Cauchy or LogNormal; ``logits`` of a Bernoulli, Binomial, NegativeBinomial or
    Categorical; the log rate of a Poisson or Exponential), read from a trace at ``z`` (``z``
    of shape ``(D,)``); the distribution is rebuilt from that trace with ``f`` in its place.
    """

    model: Any
    layout: Any
    vectorized: bool
    family: str = ""
    #: the trace's observation distribution had this many extra event dims (``to_event``)
    event_dims: int = 0
    scalar: bool = True
    #: the network's weight-dependent state (BatchNorm statistics) for builder models, or None
    state: Mapping[str, torch.Tensor] | None = None

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.vectorized:
            params = self.layout.unpack(z)
            if self.state is None:
                return self.model.forward(params, x)
            return self.model.forward(params, x, self.state)
        base, _ = self.observation(z, x)
        f = output_family(base)[1](base)
        return f.unsqueeze(-1) if self.scalar else f.reshape(f.shape[0], -1)

    def observation(self, z: torch.Tensor, x: torch.Tensor):
        """A plain model's observation distribution at ``z`` (``(D,)``) and ``x``: the
        distribution family itself and the site's distribution (with its wrappers)."""
        tr = poutine.trace(poutine.condition(self.model, data=self.layout.unpack(z))).get_trace(
            x, None
        )
        check_sites(self.layout, tr, f"at inputs of shape {tuple(x.shape)}")  # core/layout.py
        d = observation_node(tr, self.layout)["fn"]
        return observation_dist(d), d

    def dist(self, f: torch.Tensor, z: torch.Tensor, x: torch.Tensor | None = None):
        """Observation distribution with output ``f``; the other parameters at ``z``."""
        if self.vectorized:
            return self.model.likelihood.dist(f, self.layout.unpack(z))
        base, _ = self.observation(z, x)
        _, output, rebuild = output_family(base)
        g = f[..., 0] if self.scalar else f.reshape(*f.shape[:-1], *output(base).shape[1:])
        d = rebuild(g, base)
        return d.to_event(self.event_dims) if self.event_dims else d

    def network_sites(self) -> list[str] | None:
        """Sites that can change ``f`` (builder models: the layers' weights and biases);
        ``None`` for a plain function (found from the Jacobian instead)."""
        if not self.vectorized:
            return None
        names = []
        for spec in self.model.layer_specs():
            names.append(f"{spec.name}.weight")
            if spec.bias_shape is not None:
                names.append(f"{spec.name}.bias")
        return [n for n in names if n in self.layout]


def observation_node(tr, layout) -> dict:
    """The observation site of a plain model's trace: ``"y"``, or else the one sample site
    inside a plate that is not a latent site of ``layout`` (observed or not)."""
    if "y" in tr.nodes and tr.nodes["y"]["type"] == "sample":
        return tr.nodes["y"]
    names = set(layout.names)
    cands = [
        n
        for n, node in tr.nodes.items()
        if node["type"] == "sample"
        and n not in names
        and node["cond_indep_stack"]
        and not node["infer"].get("is_auxiliary")
    ]
    if len(cands) != 1:
        raise ModelError(
            f"cannot tell the observation site of the model (candidates: {cands or 'none'})"
        )
    return tr.nodes[cands[0]]


def output_map(model, layout, x: torch.Tensor | None = None, z: torch.Tensor | None = None):
    """The :class:`OutputMap` of ``model``, or ``None`` when its output cannot be found (a
    plain function whose observation family has no location or logits parameter)."""
    if isinstance(model, BNN):
        return OutputMap(model, layout, True)
    if x is None or z is None:
        return None
    try:
        with _no_validation(), torch.no_grad():
            tr = poutine.trace(poutine.condition(model, data=layout.unpack(z))).get_trace(
                x[:2], None
            )
    except Exception:  # noqa: BLE001 - a model that cannot run here has no output map
        return None
    d = observation_node(tr, layout)["fn"]
    base = observation_dist(d)
    fam = output_family(base)
    if fam is None:
        return None
    param = fam[1](base)
    if param.dim() == 0 or param.shape[0] != min(2, x.shape[0]):
        return None  # the output is not one value (or vector) per example
    categorical = isinstance(base, torch.distributions.Categorical)
    scalar = param.dim() == 1 and not categorical
    if not scalar and not categorical and fam[0] == "logits":
        return None  # multi-label Bernoulli / Binomial: not one output per example
    ev = len(d.event_shape) - len(base.event_shape)
    return OutputMap(model, layout, False, fam[0], ev, scalar)


def output_jacobian(
    omap: OutputMap, z0: torch.Tensor, x: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """``J = d f(z, x) / d z[cols]`` at ``z0``, shaped ``(N, O, len(cols))``."""
    z0 = z0.detach()
    if omap.vectorized:

        def f_one(t, x1):  # one input row: per-example Jacobians keep memory linear in chunks
            return omap.forward(z0.index_copy(0, cols, t), x1[None])[0]

        jac = torch.func.vmap(torch.func.jacrev(f_one), in_dims=(None, 0))
        out_dim = omap.forward(z0, x[:1]).shape[-1]
        chunk = max(1, JACOBIAN_BYTES // (8 * out_dim * max(cols.numel(), 1)))
        t = z0[cols]
        try:
            return torch.cat([jac(t, x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])
        except (RuntimeError, NotImplementedError) as e:
            if is_out_of_memory(e):
                raise
            # layers torch.func cannot batch (fused RNN kernels): one input at a time
            return torch.stack(
                [torch.autograd.functional.jacobian(lambda tt, xi=xi: f_one(tt, xi), t) for xi in x]
            ).detach()

    def f_all(t):
        return omap.forward(z0.index_copy(0, cols, t), x)

    with _no_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            j = torch.autograd.functional.jacobian(f_all, z0[cols], vectorize=True)
        except Exception as e:  # noqa: BLE001 - vmap cannot run some models; loop instead
            if is_out_of_memory(e):
                raise
            j = torch.autograd.functional.jacobian(f_all, z0[cols])
    return j.detach()


def network_mask(omap: OutputMap, z0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Boolean ``(D,)``: the coordinates of every site that the output depends on (builder
    models: the layers; plain functions: sites whose value moves ``f`` at the inputs ``x``,
    found by one backward pass of a random projection of ``f``)."""
    layout = omap.layout
    mask = torch.zeros(layout.size, dtype=torch.bool, device=z0.device)
    names = omap.network_sites()
    if names is None:
        t = z0.detach().clone().requires_grad_(True)
        with torch.enable_grad(), _no_validation():
            f = omap.forward(t, x)
            if not f.requires_grad:  # the output depends on no latent site
                return mask
            g = torch.Generator(device=f.device).manual_seed(0)
            r = torch.rand(f.shape, generator=g, dtype=f.dtype, device=f.device) + 0.5
            (grad,) = torch.autograd.grad((f * r).sum(), t, allow_unused=True)
        if grad is None:
            return mask
        moved = grad != 0
        names = [s.name for s in layout.sites if bool(moved[s.offset : s.offset + s.size].any())]
    for n in names:
        s = layout[n]
        mask[s.offset : s.offset + s.size] = True
    return mask
