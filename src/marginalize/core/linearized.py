"""The linearized (GLM) predictive of a Gaussian posterior around its mean.

With ``f(x; z)`` the model's output (a builder's network output; for a plain model function
the location or logits of its observation distribution, see :class:`OutputMap`), each
posterior draw ``z_s`` predicts with ``f_lin(x; z_s) = f(x; z0) + J(x) (z_s - z0)`` (``z0``:
the approximation's ``loc``, ``J`` the Jacobian there). This is the predictive that goes with
a Laplace approximation (MacKay 1992; Immer, Korzepa & Bauer 2021): sampling the weights and
running the nonlinear network instead puts large function-space variance along the
directions the data leave at the prior's scale. A posterior uses it when
``info.predictive == "glm"`` (``laplace`` sets it by default).

Under a Gaussian posterior ``N(z0, Sigma)`` the linearized output at one input is Gaussian,
``f ~ N(f(x; z0), J Sigma J^T)``, so the predictive has closed forms
(``info["link_approx"]``, a detail of the fit):

* ``"probit"`` (default): regression with a Gaussian likelihood is exact: mean ``f(x; z0)``,
  epistemic variance ``diag(J Sigma J^T)``, aleatoric variance the noise variance averaged
  over the noise scale's posterior (Gauss-Hermite quadrature over its marginal; the log
  predictive density is the same quadrature over a Gaussian per node). Classification uses
  the probit approximation of the logistic-Gaussian integral,
  ``p(y=1) ~ sigmoid(mu / sqrt(1 + pi/8 var))`` (MacKay 1992), and for a softmax its
  per-class extension ``p ~ softmax(mu_c / sqrt(1 + pi/8 var_c))`` (Gibbs 1997; the
  "probit" of Daxberger et al. 2021, Laplace Redux). The epistemic split of classification
  (``expected_entropy``, ``mutual_info``) has no closed form: it is computed on first access
  from ``num_samples`` draws of the output Gaussian (no network passes).
* ``"mc"``: Monte Carlo over draws of the weights pushed through the linearized network.

Costs. The covariance ``J Sigma J^T`` is computed without drawing weights. When the only
uncertain weights are the last layer of a builder MLP (``bayesian_sites="last_layer"``), the
network runs once to the last hidden layer and the rest is small linear algebra on the
features ``phi`` (``f = phi W + b`` is linear in the last layer): ``phi Sigma_o phi^T`` per
output for a dense covariance, ``(phi^2) s^2`` for a diagonal one, and for a K-FAC
(Kronecker) one ``((phi Q_A)^2 S^2) (Q_G^2)^T`` with the eigenbases of its factors. Otherwise
the Jacobian of the uncertain coordinates is computed in chunks of inputs (a vmapped
``jacrev`` for builder models; reverse-mode ``autograd.functional.jacobian`` for plain
functions) and contracted with a square root of ``Sigma``.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 40)[:, None]; y = torch.sin(3 * x[:, 0])
>>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="laplace", steps=100, progress=False)
>>> post.info.predictive, post.info["link_approx"]
('glm', 'probit')
>>> mu, var = glm_moments(post, x[:5])
>>> mu.shape, var.shape
(torch.Size([5, 1]), torch.Size([5, 1]))
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
from pyro import poutine

from marginalize.core.approximations import Approximation, Gaussian, Kronecker
from marginalize.core.layout import check_sites
from marginalize.core.predictive import entropy
from marginalize.core.problem import _no_validation, observation_dist
from marginalize.errors import ModelError
from marginalize.models.base import BNN
from marginalize.models.builders import MLP, dense

__all__ = [
    "LINK_APPROXIMATIONS",
    "OutputMap",
    "output_map",
    "output_jacobian",
    "glm_moments",
    "glm_closed_form",
    "closed_form_predict",
    "closed_form_log_predictive",
    "linearized_dist",
    "network_mask",
    "observation_node",
    "probit_probs",
]

#: values of ``link_approx``: closed form (probit for classification) or Monte Carlo
LINK_APPROXIMATIONS = ("probit", "mc")
#: bytes a chunk of Jacobian rows may use
_CHUNK_BYTES = 64 * 2**20
#: Gauss-Hermite nodes for a scalar noise scale's posterior
_QUADRATURE_NODES = 20


# ---- the model's output ---------------------------------------------------------------------
def _family(base) -> tuple[str, Callable, Callable] | None:
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
    #: builder models with BatchNorm: the running statistics ``forward`` runs with
    state: Any = None

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.vectorized:
            if self.state is not None:
                return self.model.forward(self.layout.unpack(z), x, self.state)
            return self.model.forward(self.layout.unpack(z), x)
        base, _ = self._trace(z, x)
        f = _family(base)[1](base)
        return f.unsqueeze(-1) if self.scalar else f.reshape(f.shape[0], -1)

    def _trace(self, z, x):
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
        base, _ = self._trace(z, x)
        _, output, rebuild = _family(base)
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
    fam = _family(base)
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
        chunk = max(1, _CHUNK_BYTES // (8 * out_dim * max(cols.numel(), 1)))
        t = z0[cols]
        try:
            return torch.cat([jac(t, x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])
        except (RuntimeError, NotImplementedError):
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
        except Exception:  # noqa: BLE001 - vmap cannot run some models; loop instead
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


# ---- the covariance of the uncertain coordinates --------------------------------------------
@dataclass
class _State:
    """What prediction needs from a posterior, computed once per approximation."""

    omap: OutputMap
    z0: torch.Tensor
    #: coordinates with posterior variance that can change the output
    cols: torch.Tensor
    #: "diag" (scale), "factor" (Sigma = R R^T), "kron" (blocks) over ``cols``
    kind: str
    scale: torch.Tensor | None = None
    factor: torch.Tensor | None = None
    blocks: list[dict] = field(default_factory=list)
    #: the last layer's (r, c) grid of positions when the features path applies
    grid: torch.Tensor | None = None
    #: dense covariance of the grid (r, c, r, c) for the features path with a factor
    grid_cov: torch.Tensor | None = None
    #: likelihood coordinates (noise scales) with posterior variance, and their variances
    other: torch.Tensor | None = None
    other_var: torch.Tensor | None = None
    #: the grid's standard deviations (r, c) for the features path with a diagonal
    scale_grid: torch.Tensor | None = None
    #: constrained values of every site at z0
    params0: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)


def _coordinate_variance(approx: Approximation, idx: torch.Tensor) -> torch.Tensor:
    if isinstance(approx, Gaussian):
        if approx.scale_tril is not None:
            return (approx.scale_tril[idx] ** 2).sum(-1)
        v = approx.scale[idx] ** 2
        if approx.cov_factor is not None:
            v = v + (approx.cov_factor[idx] ** 2).sum(-1)
        return v
    return approx.variance()[idx]


def _state(post) -> _State:
    approx = post.approximation
    key = id(approx)
    cached = post.__dict__.get("_glm_state")
    if cached is not None and cached[0] == key:
        return cached[1]
    if not isinstance(approx, (Gaussian, Kronecker)):
        raise ModelError(
            "the linearized (glm) predictive needs a Gaussian posterior (laplace), got a "
            f"{type(approx).__name__} approximation"
        )
    layout = post.layout
    z0 = approx.loc
    x_probe = post.data[0][:2] if post.data is not None else None
    omap = output_map(post.model, layout, x_probe, z0)
    if omap is not None and getattr(post, "state", None):  # BatchNorm statistics at the mode
        omap.state = {k: v[0] for k, v in post.state.items()}
    if omap is None:
        raise ModelError(
            "the linearized (glm) predictive needs the model's output: a builder model, or a "
            "plain function whose observation family has a location, logits or a rate "
            "(Normal, StudentT, Laplace, Cauchy, LogNormal, Bernoulli, Binomial, "
            "NegativeBinomial, Categorical, Poisson, Exponential); use predictive='sample'"
        )
    var = _all_variance(approx)
    uncertain = var > 0
    if not omap.vectorized and post.data is None:
        raise ModelError("the glm predictive of a plain model function needs its data")
    net = network_mask(omap, z0, post.data[0] if post.data is not None else None)
    cols = torch.nonzero(net & uncertain).reshape(-1)
    other = torch.nonzero(~net & uncertain).reshape(-1)
    st = _State(omap, z0, cols, "diag", other=other, other_var=var[other])
    st.params0 = layout.unpack(z0)
    if isinstance(approx, Kronecker):
        st.kind = "kron"
        st.scale = approx.scale[cols]
        st.blocks = [b for b in approx.blocks if net[b["idx"]].all()]
    elif approx.scale_tril is None and approx.cov_factor is None:
        st.scale = approx.scale[cols]
    else:
        st.kind = "factor"
        parts = []
        if approx.scale_tril is not None:
            parts.append(approx.scale_tril[cols])
        else:
            if bool((approx.scale[cols] != 0).any()):
                parts.append(torch.diag(approx.scale[cols]))
            parts.append(approx.cov_factor[cols])
        r = torch.cat(parts, 1)
        st.factor = r[:, (r != 0).any(0)]  # drop the columns of fixed coordinates
    st.grid = _last_layer_grid(post, cols, st)
    if st.grid is not None and st.kind == "factor":
        pos = torch.searchsorted(cols, st.grid.reshape(-1))
        r = st.factor[pos]
        rr, cc = st.grid.shape
        st.grid_cov = (r @ r.T).reshape(rr, cc, rr, cc)
    if st.grid is not None and st.kind == "diag":
        st.scale_grid = st.scale[torch.searchsorted(cols, st.grid.reshape(-1))].reshape(
            st.grid.shape
        )
    post.__dict__["_glm_state"] = (key, st)
    return st


def _all_variance(approx) -> torch.Tensor:
    if isinstance(approx, Gaussian) and approx.scale_tril is not None:
        return (approx.scale_tril**2).sum(-1)
    return approx.variance()


def _last_layer_grid(post, cols: torch.Tensor, st: _State) -> torch.Tensor | None:
    """The (fan_in + 1, fan_out) positions of a builder MLP's last layer when those are
    exactly the uncertain output coordinates (bias as the last row), else ``None``."""
    model = post.model
    if type(model) is not MLP or cols.numel() == 0:
        return None
    spec = model.layer_specs()[-1]
    layout = post.layout
    w = layout[f"{spec.name}.weight"]
    fan_in, fan_out = spec.weight_shape
    grid = torch.arange(w.offset, w.offset + w.size, device=cols.device).reshape(fan_in, fan_out)
    if spec.bias_shape is not None:
        b = layout[f"{spec.name}.bias"]
        grid = torch.cat(
            [grid, torch.arange(b.offset, b.offset + b.size, device=cols.device)[None]]
        )
    if grid.numel() != cols.numel() or not torch.equal(grid.reshape(-1).sort().values, cols):
        return None
    if st.kind == "kron":
        if len(st.blocks) != 1 or not torch.equal(st.blocks[0]["idx"], grid.reshape(-1)):
            return None
    return grid


def _features(post, st: _State, x: torch.Tensor) -> torch.Tensor:
    """Inputs of the last layer at ``z0`` with a column of ones for the bias: ``(N, r)``."""
    model: MLP = post.model
    params = st.params0
    specs = model.layer_specs()
    h = x
    for spec in specs[:-1]:
        h = model.act(dense(h, params[f"{spec.name}.weight"], params.get(f"{spec.name}.bias")))
    if specs[-1].bias_shape is not None:
        h = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)
    return h


def glm_moments(post, x: torch.Tensor, full_cov: bool = False):
    """Mean ``(N, O)`` and variance ``(N, O)`` (or covariance ``(N, O, O)`` with
    ``full_cov``) of the linearized output at inputs ``x`` under the Gaussian posterior."""
    st = _state(post)
    with torch.no_grad():
        if st.grid is not None:
            return _moments_features(post, st, x, full_cov)
        f0 = st.omap.forward(st.z0, x)
    n, o = f0.shape
    if st.cols.numel() == 0:
        z = f0.new_zeros(n, o, o) if full_cov else torch.zeros_like(f0)
        return f0, z
    chunk = max(1, _CHUNK_BYTES // (8 * o * max(st.cols.numel(), 1)))
    out = []
    for i in range(0, n, chunk):
        j = output_jacobian(st.omap, st.z0, x[i : i + chunk], st.cols)
        b = _project(st, j)  # (n, O, K)
        out.append(b @ b.transpose(1, 2) if full_cov else (b * b).sum(-1))
    return f0, torch.cat(out)


def _project(st: _State, j: torch.Tensor) -> torch.Tensor:
    """``J R`` for a square root ``R`` of the covariance of ``cols``: ``(N, O, K)``."""
    if st.kind == "diag":
        return j * st.scale
    if st.kind == "factor":
        return j @ st.factor
    parts = []
    covered = torch.zeros(st.cols.numel(), dtype=torch.bool, device=j.device)
    for b in st.blocks:
        pos = torch.searchsorted(st.cols, b["idx"])
        covered[pos] = True
        r, c = b["s"].shape
        jb = j[..., pos].reshape(*j.shape[:2], r, c)
        t = b["qa"].T @ jb @ b["qg"] * b["s"]
        parts.append(t.reshape(*j.shape[:2], r * c))
    rest = ~covered
    if bool(rest.any()):
        parts.append(j[..., rest] * st.scale[rest])
    return torch.cat(parts, -1)


def _moments_features(post, st: _State, x, full_cov: bool):
    phi = _features(post, st, x)  # (N, r)
    params = st.params0
    spec = post.model.layer_specs()[-1]
    f0 = phi[:, : spec.weight_shape[0]] @ params[f"{spec.name}.weight"]
    if spec.bias_shape is not None:
        f0 = f0 + params[f"{spec.name}.bias"]
    if st.kind == "kron":
        b = st.blocks[0]
        a = phi @ b["qa"]  # (N, r)
        w = (a * a) @ (b["s"] * b["s"])  # (N, c)
        if full_cov:
            return f0, torch.einsum("ol,nl,pl->nop", b["qg"], w, b["qg"])
        return f0, w @ (b["qg"] * b["qg"]).T
    if st.kind == "diag":
        var = (phi * phi) @ (st.scale_grid * st.scale_grid)
        return f0, torch.diag_embed(var) if full_cov else var
    cov = st.grid_cov  # (r, c, r, c)
    r, c = cov.shape[:2]
    if full_cov:
        m = (phi @ cov.reshape(r, -1)).reshape(-1, c, r, c)  # (N, c, r, c)
        # a broadcast product and a sum: einsum lowers this to N tiny batched products
        return f0, (m * phi[:, None, :, None]).sum(2)
    m = st.cache.get("grid_diag_blocks")
    if m is None:  # (r, c r): the per-output blocks Sigma[:, o, :, o] side by side
        m = cov.diagonal(dim1=1, dim2=3).permute(0, 2, 1).reshape(r, c * r).contiguous()
        st.cache["grid_diag_blocks"] = m
    t = (phi @ m).reshape(-1, c, r)  # one matrix product for every output
    # phi_n^T Sigma_o phi_n as a broadcast product and a sum (einsum's batched matrix-vector
    # products took 0.8 ms of 3.5 on digits, this 0.17)
    return f0, (t * phi[:, None, :]).sum(-1)


# ---- the closed-form predictive --------------------------------------------------------------
def probit_probs(mu: torch.Tensor, var: torch.Tensor, bernoulli: bool) -> torch.Tensor:
    """Class probabilities ``(N, C)`` of Gaussian logits by the probit approximation.

    ``bernoulli``: one logit per input, ``sigmoid(mu / sqrt(1 + pi/8 var))`` (MacKay 1992);
    otherwise ``softmax(mu_c / sqrt(1 + pi/8 var_c))`` (Gibbs 1997; Daxberger et al. 2021).
    """
    kappa = torch.rsqrt(1.0 + math.pi / 8.0 * var)
    if bernoulli:
        p = torch.sigmoid(mu[..., 0] * kappa[..., 0])
        return torch.stack([1 - p, p], -1)
    return torch.softmax(mu * kappa, -1)


def _bernoulli(post, st: _State) -> bool:
    if st.omap.vectorized:
        return post.model.likelihood.kind == "bernoulli"
    return st.omap.family == "logits" and st.omap.scalar


def glm_closed_form(post) -> bool:
    """Whether ``post`` predicts in closed form: a glm posterior with ``link_approx`` other
    than ``"mc"``, and a Gaussian regression likelihood or a Bernoulli/Categorical one."""
    if post.info.get("predictive") != "glm" or post.info.get("link_approx", "probit") == "mc":
        return False
    if not isinstance(post.approximation, (Gaussian, Kronecker)):
        return False
    if post.task == "classification":
        return True
    model = post.model
    if isinstance(model, BNN):
        return model.likelihood.kind == "gaussian"
    try:
        st = _state(post)
    except ModelError:
        return False
    if st.omap.family != "loc":
        return False
    if "_glm_normal" not in post.__dict__:
        post.__dict__["_glm_normal"] = _is_normal(post, st)
    return post.__dict__["_glm_normal"]


def _is_normal(post, st) -> bool:
    with torch.no_grad(), _no_validation():
        base, _ = st.omap._trace(st.z0, post.data[0][:2])
    return isinstance(base, torch.distributions.Normal)


def _noise_nodes(post, st: _State, f0: torch.Tensor, x: torch.Tensor):
    """Quadrature (or Monte Carlo) nodes of the aleatoric variance: ``(weights (Q,),
    variances (Q, N, O))`` over the posterior of the likelihood's own coordinates."""
    other = st.other
    if other.numel() == 0:
        return f0.new_ones(1), _aleatoric(post, st, st.z0[None], f0, x)
    if other.numel() == 1:
        t, w = np.polynomial.hermite.hermgauss(_QUADRATURE_NODES)
        nodes = st.z0[other] + math.sqrt(2.0) * st.other_var.sqrt() * f0.new_tensor(t)[:, None]
        weights = f0.new_tensor(w / math.sqrt(math.pi))
    else:
        g = torch.Generator(device=f0.device).manual_seed(0)
        e = torch.randn(64, other.numel(), generator=g, dtype=f0.dtype, device=f0.device)
        nodes = st.z0[other] + e * st.other_var.sqrt()
        weights = f0.new_full((64,), 1 / 64)
    z = st.z0.expand(nodes.shape[0], -1).clone()
    z[:, other] = nodes
    return weights, _aleatoric(post, st, z, f0, x)


def _aleatoric(post, st: _State, z: torch.Tensor, f0: torch.Tensor, x) -> torch.Tensor:
    """Noise variance ``(Q, N, O)`` of the observation distribution at each row of ``z``."""
    if st.omap.vectorized:
        params = post.layout.unpack(z)
        loc, var = post.model.likelihood.moments(f0.expand(z.shape[0], *f0.shape), params)
        return var.expand_as(loc).reshape(z.shape[0], f0.shape[0], -1).expand(z.shape[0], *f0.shape)
    out = []
    for zq in z:
        base, _ = st.omap._trace(zq, x)
        out.append(base.variance.reshape(f0.shape[0], -1).expand_as(f0))
    return torch.stack(out)


def closed_form_predict(
    post, x: torch.Tensor, num_samples: int, generator: torch.Generator
) -> dict[str, Any]:
    """The fields of a :class:`~marginalize.posterior.Prediction` in closed form (see the
    module docstring). Classification also returns ``deferred``: computes
    ``(expected_entropy, mutual_info)`` from ``num_samples`` draws of the output Gaussian."""
    st = _state(post)
    t = post.info.get("temperature")
    t = 1.0 if t is None else float(t)
    with torch.no_grad():
        if post.task == "regression":
            f0, var = glm_moments(post, x)
            weights, ale = _noise_nodes(post, st, f0, x)
            ale = torch.einsum("q,qno->no", weights, ale) * t * t
            mean, epi, ale = (
                _squeeze_out(post, f0),
                _squeeze_out(post, var),
                _squeeze_out(post, ale),
            )
            return {
                "mean": mean,
                "std": (epi + ale).sqrt(),
                "epistemic": epi.sqrt(),
                "aleatoric": ale.sqrt(),
                "num_draws": 1,
            }
        bern = _bernoulli(post, st)
        f0, var = glm_moments(post, x)
        f0, var = f0 / t, var / (t * t)
        probs = probit_probs(f0, var, bern)

    def deferred():
        with torch.no_grad():
            mu, cov = glm_moments(post, x, full_cov=True)
            mu, cov = mu / t, cov / (t * t)
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            jitter = 1e-10 * cov.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-30)
            chol, _ = torch.linalg.cholesky_ex(cov + jitter[:, None, None] * eye)
            e = torch.randn(
                num_samples, *mu.shape, generator=generator, dtype=mu.dtype, device=mu.device
            )
            f = mu + torch.einsum("nij,snj->sni", chol, e)
            if bern:
                p1 = torch.sigmoid(f[..., 0])
                pd = torch.stack([1 - p1, p1], -1)
            else:
                pd = torch.softmax(f, -1)
            ee = entropy(pd).mean(0)
            # the probit probabilities and the Monte Carlo expected entropy are two
            # approximations: where they disagree so that E[H] exceeds H[probs], the epistemic
            # part is 0 and the aleatoric part H[probs], keeping entropy = aleatoric + epistemic
            total = entropy(probs)
            ee = torch.minimum(ee, total)
        return ee, total - ee

    return {"probs": probs, "deferred": deferred, "num_draws": num_samples}


def _squeeze_out(post, t: torch.Tensor) -> torch.Tensor:
    """``(N, O)`` -> the prediction's shape: ``(N,)`` for one regression target."""
    model = post.model
    if isinstance(model, BNN):
        return t[..., 0] if model.out_features == 1 and t.shape[-1] == 1 else t
    return t[..., 0] if _state(post).omap.scalar else t


def closed_form_log_predictive(post, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log p(y_n | x_n, data)`` per observation under the closed-form predictive."""
    st = _state(post)
    t = post.info.get("temperature")
    t = 1.0 if t is None else float(t)
    with torch.no_grad():
        f0, var = glm_moments(post, x)
        if post.task == "regression":
            weights, ale = _noise_nodes(post, st, f0, x)
            total = var + ale * t * t  # (Q, N, O)
            yy = y.reshape(f0.shape)
            lp = torch.distributions.Normal(f0, total.sqrt()).log_prob(yy).sum(-1)  # (Q, N)
            return torch.logsumexp(lp + weights.log()[:, None], 0)
        probs = probit_probs(f0 / t, var / (t * t), _bernoulli(post, st))
        yi = y.long().reshape(-1, 1)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log().gather(-1, yi)[:, 0]


# ---- draws through the linearized network ----------------------------------------------------
def linearized_dist(post, z: torch.Tensor, x: torch.Tensor):
    """The observation distribution of draws ``z`` ``(S, D)`` under the linearized output,
    batch shape ``(S, N)``."""
    st = _state(post)
    z0 = st.z0
    if st.grid is not None:  # the output is linear in the last layer: f = phi W + b exactly
        phi = _cached(st, "phi", x, lambda: _features(post, st, x))
        w = z[:, st.grid.reshape(-1)].reshape(z.shape[0], *st.grid.shape)
        f = phi @ w
        return st.omap.dist(f, z)
    if st.omap.vectorized:

        def f(zz):
            return st.omap.forward(zz, x)

        def jvp(t):
            return torch.func.jvp(f, (z0,), (t,))

        try:
            f0, jv = torch.func.vmap(jvp)(z - z0)
            return st.omap.dist(f0 + jv, z)
        except (RuntimeError, NotImplementedError):
            pass  # layers torch.func cannot batch (fused RNN kernels): a Jacobian instead

    def jac():
        with torch.no_grad():
            f0 = st.omap.forward(z0, x)
        return f0, output_jacobian(st.omap, z0, x, st.cols)  # (N, O, K)

    f0, j = _cached(st, "jac", x, jac)
    flin = f0 + torch.einsum("nok,sk->sno", j, (z - z0)[:, st.cols])
    if st.omap.vectorized:
        return st.omap.dist(flin, z)
    return _plain_dists(st, flin, z, x)


def _cached(st: _State, name: str, x: torch.Tensor, compute: Callable):
    """``compute()`` for inputs ``x``, reused while the same, unmodified ``x`` is passed
    (the chunks of draws of one prediction)."""
    hit = st.cache.get(name)
    if hit is not None and hit[0] is x and hit[1] == x._version:
        return hit[2]
    value = compute()
    st.cache[name] = (x, x._version, value)
    return value


class _Stacked(dist.TorchDistribution):
    """Per-draw distributions of a plain model stacked along a leading draw dim."""

    def __init__(self, parts):
        self.parts = parts
        super().__init__(
            torch.Size([len(parts), *parts[0].batch_shape]), parts[0].event_shape, False
        )

    @property
    def mean(self):
        return torch.stack([p.mean for p in self.parts])

    @property
    def variance(self):
        return torch.stack([p.variance for p in self.parts])

    def log_prob(self, value):
        return torch.stack([p.log_prob(value) for p in self.parts])

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape)
        return torch.stack([p.sample(shape) for p in self.parts], len(shape))


def _plain_dists(st: _State, flin: torch.Tensor, z: torch.Tensor, x: torch.Tensor):
    """A plain model's observation distributions for linearized outputs ``(S, N, O)``; the
    other parameters (a noise scale) at each draw."""
    if st.other.numel() == 0 or st.omap.family == "logits":  # one rebuild, batched over draws
        return st.omap.dist(flin, st.z0, x)
    return _Stacked([st.omap.dist(flin[s], z[s], x) for s in range(z.shape[0])])
