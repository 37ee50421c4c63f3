"""``laplace``: a Gaussian at the MAP whose precision is the curvature of the log joint.

Stages: a MAP fit (the ``map`` method with this method's SVI options), an L-BFGS polish of
it in float64 (``refine_steps``), then the precision ``P`` at the mode, over the flat
unconstrained vector:

* ``hessian="ggn"``: the generalized Gauss-Newton ``J^T Lambda J`` over the weights that move
  the model's output (``J`` the Jacobian of the output, ``Lambda`` the Hessian of the negative
  log likelihood in output space, eigenvalues clipped at 0) plus the prior's Hessian there;
  the other sites (a learned noise scale, prior scales) get their exact Hessian block,
  eigenvalues clipped; the cross terms between the two groups are dropped. The output is the
  network output of a builder model, and for a plain model function the location, logits or
  log rate of its observation site's distribution as a function of the latent sites (see
  ``core/linearized.py``); its weights are the real-valued sites that move it. Families
  without one (Gamma, Beta, ...) get ``hessian="exact"``. Per-example Jacobians are
  vmapped, or computed one input at a time where ``torch.func`` cannot batch a layer
  (LSTM, GRU).
* ``hessian="exact"``: the autograd Hessian in float64 (any model), as
  ``clip(H_likelihood) + H_prior`` with the likelihood part's eigenvalues clipped at 0 (the
  Hessian of a BNN at its MAP is usually indefinite, which is why Pyro's
  ``AutoLaplaceApproximation`` fails on BNNs), then any remaining non-positive eigenvalue of
  the sum clipped at ``1e-8`` times the largest one (with a warning).

``structure`` is ``"full"`` (covariance ``P^-1`` as a Cholesky factor; up to 5000 Bayesian
coordinates), ``"diag"`` (variances ``1 / diag(P)``) or ``"kron"`` (K-FAC of the dense and
convolutional layers of builder MLPs and CNNs and of ``nn.Linear`` / ``nn.Conv2d`` layers of
``mz.models.bayesian(module)``: per layer ``A (x) G`` with ``A`` the mean outer product of
the layer's inputs, a 1 appended for the bias, for a convolution its unfolded patches taken
as extra batch positions, Grosse & Martens 2016, and ``G`` the summed GGN of its outputs,
exact per class through a square root of the output Hessian, plus the prior precision; see
``engines/kfac.py``). The factors are gathered in the problem's dtype (float32: its error
against float64 factors is below 1e-4 relative, tests/test_kfac.py) and eigendecomposed in
float64. A module's BatchNorm affine parameters get their exact GGN diagonal (in eval mode a
BatchNorm layer is ``w xhat + b`` per channel, read from the same recorded pass); other
coordinates that move the output (embeddings, ...) a diagonal GGN from per-example
Jacobians. laplace-torch instead leaves BatchNorm parameters at the MAP: do that with
``bayesian_sites`` or ``bayesian(sites=...)``. The likelihood's own sites get the diagonal of
their inverted exact block. ``bayesian_sites`` / ``subset="last_layer"`` restrict all of
this to some sites, the rest held at the MAP. When the Bayesian coordinates are whole dense
or convolutional layers (last-layer Laplace of any network), ``"full"`` computes their GGN
from the layers' inputs and output gradients: one pass of the network's body per chunk of
rows, no graph through it, and the posterior keeps the ``k x k`` factor of those ``k``
coordinates only.

The posterior predicts through the output linearized at the MAP (``predictive="glm"``, the
default wherever the output is known, see ``core/linearized.py``), by default in closed form
(``link_approx="probit"``: exact for Gaussian likelihoods, the probit approximation for
classification; no weights are drawn, and last-layer Laplace needs one pass to the last
hidden layer), or by Monte Carlo (``link_approx="mc"``). Pushing Laplace draws through the
nonlinear network (``predictive="sample"``) spreads the function wherever the data leave
weights at the prior's scale; on the ``gap`` data with a 1-32-1 net that gave an epistemic
std of 0.75 next to the data against 0.03 for the linearized predictive (noise 0.1).

``prior_precision`` multiplies the prior precision of the real-valued (weight) coordinates
by a scalar ``alpha`` after the fit (the MAP is not refitted), or chooses ``alpha`` by
maximizing the Laplace evidence ``log p(y) ~ log p(y, theta*) + D/2 log 2 pi - 1/2 log det
P(alpha)``, where ``log p(theta*)`` changes with ``alpha`` as a Gaussian prior does (exact
for the builders' Normal priors) and ``log det P(alpha)`` is closed form for ``diag`` and
``kron`` and a Cholesky per evaluation for ``full``.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 40)[:, None]; y = 2 * x[:, 0] + 0.1 * torch.randn(40)
>>> model = mz.models.mlp(1, hidden=[], likelihood=mz.likelihoods.Gaussian(noise=0.1))
>>> post = mz.fit(model, x, y, method="laplace", steps=300, progress=False)
>>> post.approximation.covariance().shape
torch.Size([2, 2])
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
from pyro import poutine

from marginalize.core.approximations import Gaussian, Kronecker
from marginalize.core.info import FitInfo
from marginalize.core.linearized import (
    LINK_APPROXIMATIONS,
    OutputMap,
    network_mask,
    observation_node,
    output_jacobian,
    output_map,
)
from marginalize.core.problem import Problem, _no_validation, check_rows, out_of_memory
from marginalize.errors import DataError, FitError, ModelError, OptionError, is_out_of_memory, warn
from marginalize.inference.engines import distributed, kfac
from marginalize.inference.engines.options import choice, either, integer, number, option
from marginalize.inference.engines.subsites import (
    BayesianSites,
    SubProblem,
    map_point,
    resolve_sites,
    run_on_sites,
    unwrap,
)
from marginalize.inference.engines.training import MAPOptions
from marginalize.inference.registry import Method, register
from marginalize.models.base import BNN

__all__ = ["Laplace", "LaplaceOptions"]

log = logging.getLogger(__name__)

#: the most Bayesian coordinates a dense (full or exact) curvature is computed for
MAX_DENSE = 5000
#: bytes a chunk of the Jacobian may use
_CHUNK_BYTES = 64 * 2**20


@dataclass
class LaplaceOptions(BayesianSites, MAPOptions):
    """Options of ``laplace``: those of ``map`` for the MAP stage (steps, lr, ...), plus the
    curvature, its structure and the predictive."""

    hessian: str = option(
        "auto",
        choice("auto", "ggn", "exact"),
        "curvature: generalized Gauss-Newton or the exact Hessian with clipped eigenvalues; "
        "'auto': ggn wherever the model's output is known (builder models; plain functions "
        "whose observation family has a location, logits or a rate: Normal, StudentT, "
        "Laplace, Cauchy, LogNormal, Bernoulli, Binomial, NegativeBinomial, Categorical, "
        "Poisson, Exponential), else exact",
    )
    structure: str = option(
        "auto",
        choice("auto", "full", "diag", "kron"),
        "covariance structure; 'kron' (K-FAC of dense and convolutional layers: builder MLPs "
        "and CNNs, nn.Linear and nn.Conv2d layers of bayesian(module)) needs hessian='ggn'; "
        "'auto': full up to 2000 Bayesian coordinates, else kron (models with such layers) or "
        "diag",
    )
    subset: str = option(
        "all", choice("all", "last_layer"), "shorthand for bayesian_sites='last_layer'"
    )
    prior_precision: float | str = option(
        1.0,
        either(
            number(0, 1e12),
            choice("marginal_likelihood"),
            what=("a positive number or 'marginal_likelihood'"),
        ),
        "multiplier of the weights' prior precision (1.0: the model's prior), or "
        "'marginal_likelihood' to tune it by maximizing the Laplace evidence",
    )
    refine_steps: int = option(
        100, integer(0, 10**6), "L-BFGS iterations polishing the MAP in float64 (0: none)"
    )
    predictive: str = option(
        "auto",
        choice("auto", "glm", "sample"),
        "how draws predict: 'glm' through the model's output linearized at the MAP (see "
        "`core/linearized.py`), 'sample' through the network itself; 'auto': glm wherever "
        "the output is known (as for hessian), else sample",
    )
    link_approx: str = option(
        "probit",
        choice(*LINK_APPROXIMATIONS),
        "how the glm predictive integrates over the Gaussian of the outputs: 'probit' in "
        "closed form, without drawing weights (exact for a Gaussian likelihood, the probit "
        "approximation for Bernoulli, MacKay 1992, and its per-class extension for softmax "
        "outputs, Gibbs 1997; Daxberger et al. 2021); 'mc' by Monte Carlo over weight draws "
        "through the linearized output (num_samples of predict)",
    )

    def validate(self):
        super().validate()
        if self.structure == "kron" and self.hessian == "exact":
            raise OptionError(
                "structure: 'kron' is a Gauss-Newton approximation: use hessian='ggn' or 'auto'"
            )
        if self.subset == "last_layer":
            if self.bayesian_sites not in (None, "last_layer"):
                raise OptionError(
                    "subset: 'last_layer' conflicts with bayesian_sites; give only one"
                )
            self.bayesian_sites, self.subset = "last_layer", "all"


# ---- log densities of the free coordinates ------------------------------------------------
#: activation bytes one chunk of rows may use in a curvature pass (per-example Jacobians and
#: double backward passes keep a few times a forward's)
_TARGET_BYTES = 64 * 2**20


class _Target:
    """``log p(y | theta)`` and ``log p(theta) + log|J|`` of the free coordinates ``theta``,
    the likelihood summed over the data chunk by chunk (in-memory rows, or a data loader's
    minibatches), so no call of the network sees every row. A network with BatchNorm layers
    is evaluated in eval mode at the problem's running statistics (``problem.state``), as
    laplace-torch does."""

    def __init__(self, problem: Problem, theta: torch.Tensor, dtype: torch.dtype):
        base, embed, idx = unwrap(problem)
        self.problem, self.base, self.dtype = problem, base, dtype
        self.model = base.model
        full = embed(theta.detach())
        self.zfull = full.to(dtype)
        self.free = idx if idx is not None else torch.arange(full.shape[-1], device=full.device)
        self.n = base.n
        self.state = None
        if base.stateful and base.state is not None:
            self.state = {
                k: v.to(dtype) if v.is_floating_point() else v for k, v in base.state.items()
            }
        self.rows = check_rows(self.model, base.example[0], _TARGET_BYTES)
        self.example = self._cast(*base.example)

    def _cast(self, x, y):
        x = x.to(self.dtype) if x.is_floating_point() else x  # integer ids stay
        y = y.to(self.dtype) if torch.is_floating_point(y) else y
        return x, y

    def chunks(self, share: bool = False):
        """The data in chunks of at most ``self.rows`` rows, ``(x, y)`` in the target's dtype;
        ``share``: this rank's share of them in a distributed run."""
        base = self.base
        if share and distributed.is_distributed():
            if base.in_memory:
                part = distributed.row_share(self.n)
                x, y = base.x[part], base.y[part]
                for i in range(0, x.shape[0], self.rows):
                    yield self._cast(x[i : i + self.rows], y[i : i + self.rows])
                return
            me, world = distributed.rank(), distributed.world_size()
            for i, (x, y) in enumerate(base.batches(self.rows)):
                if i % world == me:
                    yield self._cast(x, y)
            return
        for x, y in base.batches(self.rows):
            yield self._cast(x, y)

    def full(self, theta: torch.Tensor) -> torch.Tensor:
        z = self.zfull.expand(*theta.shape[:-1], self.zfull.shape[-1])
        return z.index_copy(-1, self.free, theta)

    def params(self, theta):
        return self.base.layout.unpack_with_log_det(self.full(theta))

    def log_lik_on(self, theta: torch.Tensor, x, y) -> torch.Tensor:
        """``sum log p(y | x, theta)`` over the rows ``(x, y)``."""
        params, _ = self.params(theta)
        if isinstance(self.model, BNN):
            kw = {} if self.state is None else {"state": self.state}
            return self.model.log_likelihood(params, x, y, **kw).sum(-1)
        tr = poutine.trace(poutine.condition(self.model, data=params)).get_trace(x, y)
        node = observation_node(tr, self.base.layout)
        return node["fn"].log_prob(node["value"]).sum()

    def log_prior(self, theta: torch.Tensor) -> torch.Tensor:
        params, ladj = self.params(theta)
        if isinstance(self.model, BNN):
            return self.model.log_prior(params) + ladj
        x, y = self.example
        tr = poutine.trace(poutine.condition(self.model, data=params)).get_trace(x, y)
        lp = sum(
            tr.nodes[s.name]["fn"].log_prob(tr.nodes[s.name]["value"]).sum()
            for s in self.base.layout.sites
        )
        return lp + ladj

    def log_lik(self, theta: torch.Tensor) -> torch.Tensor:
        """The whole log likelihood (chunk by chunk; no graph is kept across chunks unless
        ``theta`` requires a gradient)."""
        total = None
        for x, y in self.chunks():
            part = self.log_lik_on(theta, x, y)
            total = part if total is None else total + part
        return total

    def parts(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_lik(theta), self.log_prior(theta)

    def log_joint(self, theta):
        ll, lp = self.parts(theta)
        return ll + lp

    def hessian(self, part: str, theta: torch.Tensor, index: torch.Tensor | None = None):
        """The Hessian of ``"lik"`` (summed chunk by chunk), ``"prior"`` or ``"joint"`` at
        ``theta``, over the coordinates ``index`` (all: None)."""
        t0 = theta.detach()

        def put(t):
            return t if index is None else t0.index_copy(0, index, t)

        arg = t0 if index is None else t0[index]
        out = None
        if part in ("prior", "joint"):
            out = _hessian(lambda t: self.log_prior(put(t)), arg)
        if part in ("lik", "joint"):
            for x, y in self.chunks():
                h = _hessian(lambda t, x=x, y=y: self.log_lik_on(put(t), x, y), arg)
                out = h if out is None else out + h
        return out

    def grad_joint(self, theta: torch.Tensor) -> torch.Tensor:
        """The gradient of the log joint, one chunk's graph at a time."""
        t = theta.detach().requires_grad_(True)
        with _no_validation():
            (g,) = torch.autograd.grad(self.log_prior(t), t)
            for x, y in self.chunks():
                g = g + torch.autograd.grad(self.log_lik_on(t, x, y), t)[0]
        return g


def _hessian(fn, theta: torch.Tensor) -> torch.Tensor:
    if not theta.numel():  # no coordinates in this group (e.g. only constrained latents)
        return theta.new_zeros(0, 0)
    with _no_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            h = torch.autograd.functional.hessian(fn, theta, vectorize=True)
        except Exception as e:  # noqa: BLE001 - vmap cannot run some models; loop instead
            if is_out_of_memory(e):
                raise out_of_memory(
                    "laplace: the Hessian (hessian='exact' or a small block)", e
                ) from e
            h = torch.autograd.functional.hessian(fn, theta)
    return (h + h.T) / 2


def _psd(h: torch.Tensor, floor: float = 0.0) -> tuple[torch.Tensor, int]:
    """Symmetric ``h`` with eigenvalues below ``floor`` raised to it; and how many were."""
    lam, q = torch.linalg.eigh(h)
    k = int((lam < floor).sum())
    return (q * lam.clamp_min(floor)) @ q.T, k


def _clip_precision(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``p`` with eigenvalues below ``1e-8`` times the largest raised to that floor."""
    lam = torch.linalg.eigvalsh(p)
    if not lam.numel():
        return p, 0
    floor = 1e-8 * float(lam.abs().max())
    if float(lam.min()) > floor:
        return p, 0
    return _psd(p, max(floor, torch.finfo(p.dtype).tiny))


def _grad(fn, theta):
    t = theta.detach().requires_grad_(True)
    with _no_validation():
        (g,) = torch.autograd.grad(fn(t), t)
    return g


def _refine(target: _Target, theta: torch.Tensor, steps: int) -> tuple[torch.Tensor, dict]:
    """Polish the mode with L-BFGS on ``-log p(y, theta) / N`` (each evaluation a pass over
    the data in chunks); keep the start if it gets worse."""
    t = theta.detach().clone().requires_grad_(True)
    n = target.n

    def value():
        with torch.no_grad():
            return float(-target.log_joint(t) / n)

    with _no_validation():
        before = value()
        if steps:
            opt = torch.optim.LBFGS(
                [t],
                lr=1.0,
                max_iter=steps,
                history_size=50,
                tolerance_grad=1e-12,
                tolerance_change=1e-15,
                line_search_fn="strong_wolfe",
            )

            def closure():
                opt.zero_grad()
                loss = -target.log_prior(t) / n
                loss.backward()
                total = loss.detach()
                for x, y in target.chunks():  # one chunk's graph at a time
                    part = -target.log_lik_on(t, x, y) / n
                    part.backward()
                    total = total + part.detach()
                return total

            try:
                opt.step(closure)
            except (RuntimeError, ValueError) as e:  # pragma: no cover - a failed line search
                if is_out_of_memory(e):
                    raise out_of_memory("laplace: the float64 refinement (refine_steps)", e) from e
                warn("laplace: L-BFGS refinement failed (%s); using the MAP as found", e)
        after = value() if steps else before  # no step taken: the same pass twice otherwise
    if not math.isfinite(after) or after > before:
        return theta.detach(), {"before": before * n, "after": before * n}
    return t.detach(), {"before": before * n, "after": after * n}


# ---- curvature structures -----------------------------------------------------------------
class _Dense:
    def __init__(self, p1: torch.Tensor, b: torch.Tensor):
        self.p1, self.b = p1, b

    def precision(self, alpha):
        return self.p1 + torch.diag((alpha - 1.0) * self.b)

    def logdet(self, alpha):
        l, info = torch.linalg.cholesky_ex(self.precision(alpha))
        return 2 * torch.log(torch.diagonal(l)).sum() if int(info) == 0 else torch.tensor(math.inf)

    def approximation(self, loc, alpha, dtype):
        lam, q = torch.linalg.eigh(self.precision(alpha))
        cov = (q / lam.clamp_min(torch.finfo(lam.dtype).tiny)) @ q.T
        l = torch.linalg.cholesky((cov + cov.T) / 2)
        return Gaussian(loc.to(dtype), scale_tril=l.to(dtype))


class _Diag:
    def __init__(self, p1: torch.Tensor, b: torch.Tensor):
        self.p1, self.b = p1, b

    def logdet(self, alpha):
        p = self.p1 + (alpha - 1.0) * self.b
        return torch.log(p).sum() if bool((p > 0).all()) else torch.tensor(math.inf)

    def approximation(self, loc, alpha, dtype):
        return Gaussian(loc.to(dtype), (self.p1 + (alpha - 1.0) * self.b).rsqrt().to(dtype))


class _Kron:
    def __init__(self, dim, layers, other_idx, other_prec, diag_idx=None, diag_ggn=None, b=None):
        self.dim, self.layers = dim, layers  # layers: dicts idx, a, qa, g, qg, p, shape
        self.other_idx, self.other_prec = other_idx, other_prec
        # coordinates outside the layers that move the output: GGN diagonal + prior
        self.diag_idx = other_idx[:0] if diag_idx is None else diag_idx
        self.diag_ggn, self.diag_prior = diag_ggn, None if b is None else b[self.diag_idx]

    def _eig(self, layer, alpha):
        return layer["a"][:, None] * layer["g"][None, :] + alpha * layer["p"]

    def _diag(self, alpha):
        return (self.diag_ggn + alpha * self.diag_prior).clamp_min(
            torch.finfo(self.diag_ggn.dtype).tiny
        )

    def logdet(self, alpha):
        total = sum(torch.log(self._eig(layer, alpha)).sum() for layer in self.layers)
        if self.other_idx.numel():
            total = total + torch.linalg.slogdet(self.other_prec)[1]
        if self.diag_idx.numel():
            total = total + torch.log(self._diag(alpha)).sum()
        return total

    def approximation(self, loc, alpha, dtype):
        scale = torch.zeros(self.dim, dtype=torch.float64, device=loc.device)
        if self.other_idx.numel():
            scale[self.other_idx] = torch.linalg.inv(self.other_prec).diagonal().sqrt()
        if self.diag_idx.numel():
            scale[self.diag_idx] = self._diag(alpha).rsqrt().to(scale.dtype)
        blocks = [
            {
                "idx": layer["idx"],
                "qa": layer["qa"].to(dtype),
                "qg": layer["qg"].to(dtype),
                "s": self._eig(layer, alpha).rsqrt().to(dtype),
            }
            for layer in self.layers
        ]
        return Kronecker(loc.to(dtype), scale.to(dtype), blocks)


# ---- GGN pieces ----------------------------------------------------------------------------
def _output_factor(
    target: _Target,
    z: torch.Tensor,
    omap: OutputMap,
    x: torch.Tensor,
    y: torch.Tensor,
    f: torch.Tensor | None = None,
) -> torch.Tensor:
    """``L`` ``(B, O, O)`` with ``L_n L_n^T`` the (clipped) Hessian of ``-log p(y_n | f_n)``
    in output space, for the rows ``(x, y)`` (outputs ``f`` when already computed)."""
    if f is None:
        with torch.no_grad(), _no_validation():
            f = omap.forward(z, x)
    f = f.detach().requires_grad_(True)
    with _no_validation():
        nll = -omap.dist(f, z, x).log_prob(y).sum()
        (g,) = torch.autograd.grad(nll, f, create_graph=True)
        rows = []
        for o in range(f.shape[-1]):
            (h,) = torch.autograd.grad(g[:, o].sum(), f, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(f) if h is None else h)
    hess = torch.stack(rows, 1).detach()  # (B, O, O)
    lam, q = torch.linalg.eigh((hess + hess.transpose(1, 2)) / 2)
    return q * lam.clamp_min(0).sqrt().unsqueeze(1)


def _ggn(
    target: _Target, theta: torch.Tensor, net: torch.Tensor, omap: OutputMap, diag_only: bool
) -> torch.Tensor:
    """``J^T Lambda J`` over the free coordinates ``net`` (full matrix or its diagonal), with
    ``J`` the Jacobian of the model's output (the network output; for a plain function its
    observation distribution's loc or logits), computed chunk by chunk of the data, each in
    blocks of inputs that bound the Jacobian's memory."""
    z = target.full(theta.detach())
    cols = target.free[net]
    dn = net.numel()
    acc = theta.new_zeros(dn) if diag_only else theta.new_zeros(dn, dn)
    for x, y in target.chunks(share=True):  # several processes: each sums its share of rows
        lfac = _output_factor(target, z, omap, x, y)
        out_dim = lfac.shape[1]
        block = max(1, _CHUNK_BYTES // (8 * out_dim * max(dn, 1)))
        for start in range(0, x.shape[0], block):
            stop = min(start + block, x.shape[0])
            j = output_jacobian(omap, z, x[start:stop], cols)  # (B, O, Dn)
            m = torch.einsum("bok,bod->bkd", lfac[start:stop], j).reshape(-1, dn)
            acc += (m * m).sum(0) if diag_only else m.T @ m
    return distributed.sum_over_ranks(acc)


def _layers(problem: Problem, model) -> list[kfac.KLayer]:
    """The dense and convolutional layers among the free coordinates (see ``engines/kfac``)."""
    layout = problem.layout
    return kfac.find_layers(model, lambda n: layout[n].offset if n in layout else None)


def _factor_fn(target: _Target, theta: torch.Tensor, omap: OutputMap):
    """``(f, x, y) -> L`` ``(B, O, O)`` of a chunk (in the target's dtype)."""
    z = target.full(theta.detach())

    def factor(f, x, y):
        return _output_factor(target, z, omap, x, y, f.detach().to(target.dtype))

    return factor


# ---- the method -----------------------------------------------------------------------------
@register("laplace")
class Laplace(Method):
    summary = (
        "Laplace approximation: a Gaussian at the MAP with GGN or clipped exact-Hessian precision."
    )
    cost = (
        "training: MAP + one curvature pass (full: O(N D^2 + D^3); diag: O(N D); kron: "
        "O(N H^2 + H^3) per layer); prediction: one batched pass per chunk of draws"
    )
    reference = (
        "MacKay 1992; Ritter, Botev & Barber 2018 (K-FAC Laplace); Grosse & Martens 2016 "
        "(K-FAC of convolutions); Daxberger et al. 2021, Laplace Redux"
    )

    Options = LaplaceOptions

    def check(self, problem, opts, given):
        super().check(problem, opts, given)
        if not problem.in_memory and given.get("refine_steps"):
            raise DataError(
                "laplace: refine_steps polishes the MAP by full-batch L-BFGS in float64, which "
                "needs the data in memory; with a data loader it is skipped (leave refine_steps "
                "out, or 0)"
            )

    def run(self, problem, opts, seed, progress):
        hessian, predictive, structure, omap = self._plan(problem, opts, seed)
        if opts.bayesian_sites is not None:
            return run_on_sites(self, problem, opts, seed, progress)
        info = FitInfo()
        if "init" in problem.meta:
            z = problem.meta["init"]
            moved = problem.meta.get("map_steps", 1) > 0
        else:
            z, map_run = map_point(problem, opts, seed, progress)
            info = map_run.info()
            if info.stopped is not None:
                info.stopped.part = "MAP stage"
            moved = map_run.steps_done > 0
            if moved and problem.stateful:  # BatchNorm statistics at the MAP
                problem.refresh_state(z)
        target = _Target(problem, z, torch.float64)
        try:
            with _no_validation():
                z64 = z.to(torch.float64)
                target.log_lik_on(z64, *target.example) + target.log_prior(z64)
        except (RuntimeError, TypeError) as e:
            warn("laplace: the model does not evaluate in float64 (%s); using %s", e, problem.dtype)
            target = _Target(problem, z, problem.dtype)
        if omap is not None:
            omap.state = target.state
        steps = opts.refine_steps if moved and unwrap(problem)[0].in_memory else 0
        try:
            theta, refine = _refine(target, z.to(target.dtype), steps)
            if steps != opts.refine_steps:
                refine["skipped"] = (
                    "the data come from a loader" if moved else "no MAP stage ran (steps=0)"
                )
            curv, extra = self._curvature(problem, target, theta, hessian, structure, omap)
            alpha = (
                1.0
                if opts.prior_precision == "marginal_likelihood"
                else float(opts.prior_precision)
            )
            # the log joint at theta is the refinement's last value (one pass over the data)
            evidence = self._evidence_fn(target, theta, curv, extra["b"], -refine["after"])
            if opts.prior_precision == "marginal_likelihood":
                alpha = self._tune(evidence, extra["b"])
            approx = curv.approximation(theta, alpha, problem.dtype)
            log_evidence = float(evidence(alpha))
        except torch.linalg.LinAlgError as e:
            where = (
                f"; the MAP stage stopped early ({info.stopped}), lower lr"
                if info.stopped is not None
                else "; train the MAP longer (steps) or check the data scale and priors"
            )
            raise FitError(f"laplace: the curvature at the MAP is not usable ({e}){where}") from e
        info.predictive = predictive
        info.details.update(
            refine=refine,
            hessian=hessian,
            structure=structure,
            prior_precision=alpha,
            link_approx=opts.link_approx,
            log_evidence=log_evidence,
            num_clipped=extra["clipped"],
        )
        return approx, info

    # -- what to compute, decided before any fitting
    def _plan(self, problem, opts, seed) -> tuple[str, str, str, OutputMap | None]:
        base = unwrap(problem)[0]
        if isinstance(base.model, BNN):
            omap = OutputMap(base.model, base.layout, True)
        else:
            omap = output_map(base.model, base.layout, base.example[0], base.init_from_prior(seed))
        known = omap is not None
        hessian = opts.hessian if opts.hessian != "auto" else ("ggn" if known else "exact")
        why = (
            "needs the model's output: a builder model, or a plain function whose observation "
            "family has a location, logits or a rate (Normal, StudentT, Laplace, Cauchy, "
            "LogNormal, Bernoulli, Binomial, NegativeBinomial, Categorical, Poisson, Exponential)"
        )
        if hessian == "ggn" and not known:
            raise ModelError(f"laplace: hessian='ggn' {why}; use hessian='exact'")
        predictive = (
            opts.predictive if opts.predictive != "auto" else ("glm" if known else "sample")
        )
        if predictive == "glm" and not known:
            raise ModelError(f"laplace: predictive='glm' {why}; use predictive='sample'")
        if opts.bayesian_sites is not None and not isinstance(problem, SubProblem):
            names = resolve_sites(problem, opts.bayesian_sites)
            dim = sum(problem.layout[n].size for n in names)
        else:
            dim = problem.layout.size
        layered = kfac.supports(base.model) and bool(_layers(base, base.model))
        structure = opts.structure
        if structure == "auto":
            structure = (
                "full" if dim <= 2000 else ("kron" if layered and hessian == "ggn" else "diag")
            )
        if structure == "kron" and not layered:
            raise ModelError(
                "laplace: structure='kron' (K-FAC) needs a builder MLP or CNN (mz.models.mlp, "
                "mz.models.cnn) or mz.models.bayesian(module) with Bayesian nn.Linear or "
                "nn.Conv2d layers; use structure='diag'"
            )
        if (structure == "full" or hessian == "exact") and dim > MAX_DENSE:
            raise OptionError(
                f"laplace: structure={structure!r} with hessian={hessian!r} needs a dense "
                f"{dim}x{dim} matrix (limit {MAX_DENSE}); use hessian='ggn' with structure='diag' "
                "or 'kron', or bayesian_sites='last_layer'"
            )
        return hessian, predictive, structure, omap

    # -- curvature
    def _curvature(self, problem, target, theta, hessian, structure, omap):
        dim = theta.numel()
        real = torch.zeros(dim, dtype=torch.bool)
        for s in problem.layout.sites:
            if s.is_real:
                real[s.offset : s.offset + s.size] = True
        clipped = 0
        if hessian == "exact":
            h_lik, clipped = _psd(-target.hessian("lik", theta))
            h_pri = -target.hessian("prior", theta)
            b = torch.where(
                real.to(theta.device), h_pri.diagonal(), torch.zeros_like(theta)
            ).clamp_min(0)
            p1 = h_lik + h_pri
            lam = torch.linalg.eigvalsh(p1)
            floor = 1e-8 * float(lam.abs().max())
            if float(lam.min()) <= 0:
                bad = int((lam <= floor).sum())
                warn(
                    "laplace: %d eigenvalue(s) of the precision are not positive after adding the "
                    "prior; clipped to %.3g",
                    bad,
                    floor,
                )
                p1, _ = _psd(p1, floor)
            if structure == "full":
                return _Dense(p1, b), {"b": b, "clipped": clipped}
            return _Diag(p1.diagonal().clone(), b), {"b": b, "clipped": clipped}
        diag_only = structure == "diag"
        h_prior = None  # the prior's Hessian over ``net`` when it is not diagonal (plain models)
        if omap.vectorized:
            # builder models: the prior is diagonal on the layers' real coordinates
            v = real.to(theta.dtype).to(theta.device)
            t = theta.detach().requires_grad_(True)
            with _no_validation():
                (g,) = torch.autograd.grad(target.log_prior(t), t, create_graph=True)
                (hv,) = torch.autograd.grad(g @ v, t)
            b = torch.where(real.to(theta.device), -hv, torch.zeros_like(theta)).clamp_min(0)
            net = torch.nonzero(real & (b > 0).cpu()).reshape(-1).to(theta.device)
            other = torch.nonzero(~(real & (b > 0).cpu())).reshape(-1).to(theta.device)
            b = torch.zeros_like(theta).index_copy(0, net, b[net])
        else:
            # plain functions: GGN over the real coordinates that move the output, with the
            # prior's exact Hessian there; exact Hessian block for the rest (a noise scale)
            first = next(iter(target.chunks()))[0]
            moved = network_mask(omap, target.full(theta), first)[target.free].cpu()
            net = torch.nonzero(real & moved).reshape(-1).to(theta.device)
            other = torch.nonzero(~(real & moved)).reshape(-1).to(theta.device)

            h_prior = -target.hessian("prior", theta, net)
            b = torch.zeros_like(theta).index_copy(0, net, h_prior.diagonal().clamp_min(0))
        h_other = theta.new_zeros(0, 0)
        if other.numel():
            h_other = -target.hessian("joint", theta, other)
            lam = torch.linalg.eigvalsh(h_other)
            floor = 1e-8 * float(lam.abs().max()) if lam.numel() else 0.0
            if lam.numel() and float(lam.min()) <= floor:
                clipped += int((lam <= floor).sum())
                h_other, _ = _psd(h_other, max(floor, torch.finfo(theta.dtype).tiny))
        try:
            layers = _layers(problem, target.model) if omap.vectorized else []
        except OptionError:  # a layer with only its weight or its bias free
            if structure == "kron":
                raise
            layers = []
        if structure == "kron":
            return self._kron(problem, target, theta, omap, layers, net, b, other, h_other, clipped)
        if layers:
            layout = problem.layout
            layers = layers + kfac.find_norms(
                target.model, lambda n: layout[n].offset if n in layout else None
            )
        covered = torch.cat([k.pos.reshape(-1) for k in layers]).to(net.device) if layers else None
        if (
            net.numel()
            and covered is not None
            and torch.equal(covered.sort().values, net.sort().values)
        ):
            # whole dense, conv and BatchNorm layers (last-layer Laplace of any network): their
            # exact GGN (or its diagonal) from the layers' inputs and output gradients, one
            # pass of the network per chunk, no graph before the first of them
            g_cov, order = kfac.exact_ggn(
                target.model,
                target.params(theta.detach())[0],
                layers,
                target.chunks(share=True),
                _factor_fn(target, theta, omap),
                target.state,
                diag=diag_only,
            )
            g_cov = distributed.sum_over_ranks(g_cov.detach())
            where = torch.searchsorted(net, order.to(net.device))
            g_net = torch.zeros_like(g_cov)
            if diag_only:
                g_net[where] = g_cov
            else:
                g_net[where[:, None], where[None, :]] = g_cov
        elif net.numel():
            g_net = _ggn(target, theta, net, omap, diag_only)
        else:  # no real-valued site moves the output: every latent is in the exact block
            g_net = theta.new_zeros(0) if diag_only else theta.new_zeros(0, 0)
        if h_prior is None:
            p_net = g_net + b[net] if diag_only else g_net + torch.diag(b[net])
        else:
            p_net = g_net + (h_prior.diagonal() if diag_only else h_prior)
            if not diag_only:
                p_net, k = _clip_precision(p_net)
                clipped += k
        if diag_only:
            p1 = b.clone()
            p1[net] = p_net.clamp_min(torch.finfo(theta.dtype).tiny)
            if other.numel():
                p1[other] = h_other.diagonal()
            return _Diag(p1, b), {"b": b, "clipped": clipped}
        p1 = torch.zeros(dim, dim, dtype=theta.dtype, device=theta.device)
        p1[net[:, None], net[None, :]] = p_net
        if other.numel():
            p1[other[:, None], other[None, :]] = h_other
        return _Dense(p1, b), {"b": b, "clipped": clipped}

    @staticmethod
    def _kron(problem, target, theta, omap, layers, net, b, other, h_other, clipped):
        """K-FAC blocks of the dense and convolutional layers (factors gathered in the
        problem's dtype, eigendecomposed in the target's); a diagonal GGN for the other
        coordinates that move the output (BatchNorm affine parameters, embeddings)."""
        dim = theta.numel()
        layout = problem.layout
        norms = kfac.find_norms(target.model, lambda n: layout[n].offset if n in layout else None)
        covered = set(torch.cat([k.pos.reshape(-1) for k in layers]).tolist()) if layers else set()
        normed = torch.cat([k.pos.reshape(-1) for k in norms]) if norms else net[:0].cpu()
        covered |= set(normed.tolist())
        rest = torch.tensor(
            [i for i in net.tolist() if i not in covered], dtype=torch.long, device=net.device
        )
        dtype = problem.dtype if problem.dtype.is_floating_point else target.dtype
        params = {
            k: v.to(dtype) if v.is_floating_point() else v
            for k, v in target.params(theta.detach())[0].items()
        }
        state = target.state
        if state is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        chunks = (
            (x.to(dtype) if x.is_floating_point() else x, y) for x, y in target.chunks(share=True)
        )
        factor = _factor_fn(target, theta, omap)
        factors = []
        if layers or norms:
            factors = kfac.kfac(
                target.model,
                params,
                layers + norms,
                chunks,
                lambda f, x, y: factor(f, x.to(target.dtype) if x.is_floating_point() else x, y),
                state,
            )
        out = []
        norm_diag = [
            distributed.sum_over_ranks(f[0].detach()).reshape(-1) for f in factors[len(layers) :]
        ]
        for layer, (a_sum, count, g_mat) in zip(layers, factors[: len(layers)], strict=True):
            count = float(distributed.sum_over_ranks(count))
            a_mat = distributed.sum_over_ranks(a_sum.detach()).to(theta.dtype) / max(count, 1.0)
            g_mat = distributed.sum_over_ranks(g_mat.detach()).to(theta.dtype)
            pos = layer.pos.to(theta.device)
            p = b[pos.reshape(-1)]
            if float(p.max() - p.min()) > 1e-6 * float(p.max()):
                warn(
                    "laplace: the prior precision varies within layer %s; K-FAC uses its mean",
                    layer.name,
                )
            a_eig, qa = torch.linalg.eigh(a_mat)
            g_eig, qg = torch.linalg.eigh(g_mat)
            out.append(
                {
                    "idx": pos.reshape(-1),
                    "a": a_eig.clamp_min(0),
                    "qa": qa,
                    "g": g_eig.clamp_min(0),
                    "qg": qg,
                    "p": float(p.mean()),
                }
            )
        diag = theta.new_zeros(0)
        if rest.numel():
            log.info(
                "laplace: structure='kron' gives %d coordinates outside dense, convolutional "
                "and BatchNorm layers (embeddings, ...) a diagonal GGN block from Jacobians",
                rest.numel(),
            )
            diag = _ggn(target, theta, rest, omap, True)
        if norms:  # BatchNorm affine parameters: their exact GGN diagonal
            rest = torch.cat([normed.to(rest.device), rest])
            diag = torch.cat([torch.cat(norm_diag).to(theta.dtype), diag])
        curv = _Kron(dim, out, other, h_other, rest, diag, b)
        return curv, {"b": b, "clipped": clipped, "layers": out}

    # -- evidence
    @staticmethod
    def _evidence_fn(target: _Target, theta, curv, b, log_joint: float | None = None):
        if log_joint is None:
            with torch.no_grad(), _no_validation():
                ll, lp = target.parts(theta)
            log_joint = float(ll + lp)
        g = _grad(target.log_prior, theta)
        mask = b > 0
        # Gaussian prior with precision alpha * b: (theta - mu)^2 b = g^2 / b on those coordinates
        quad = float(((g[mask] ** 2) / b[mask]).sum())
        k = int(mask.sum())
        d = theta.numel()
        const = log_joint + 0.5 * d * math.log(2 * math.pi)

        def evidence(alpha: float) -> float:
            ld = float(curv.logdet(alpha))
            return const + 0.5 * k * math.log(alpha) - 0.5 * (alpha - 1.0) * quad - 0.5 * ld

        return evidence

    @staticmethod
    def _tune(evidence, b) -> float:
        from scipy.optimize import minimize_scalar

        if not bool((b > 0).any()):
            raise ModelError(
                "laplace: prior_precision='marginal_likelihood' tunes the prior precision of "
                "real-valued weights, and the Bayesian sites have none (only constrained "
                "latents such as scales, positive factors or simplex weights, whose curvature "
                "is taken in the unconstrained space): give prior_precision a number (1.0: the "
                "model's prior)"
            )

        def objective(log_alpha):
            v = evidence(math.exp(log_alpha))
            return -v if math.isfinite(v) else 1e300

        res = minimize_scalar(
            objective,
            bounds=(math.log(1e-4), math.log(1e4)),
            method="bounded",
            options={"xatol": 1e-6},
        )
        return float(math.exp(res.x))
