"""The linearized (GLM) predictive of a Gaussian posterior around its mean.

With ``f(x; z)`` the model's output (see :mod:`marginalize.core.linearized`), each posterior
draw ``z_s`` predicts with ``f_lin(x; z_s) = f(x; z0) + J(x) (z_s - z0)`` (``z0``: the
approximation's ``loc``, ``J`` the Jacobian there). This is the predictive that goes with a
Laplace approximation (MacKay 1992; Immer, Korzepa & Bauer 2021): sampling the weights and
running the nonlinear network instead puts large function-space variance along the
directions the data leave at the prior's scale. A posterior uses it when
``info.predictive == "glm"`` (``laplace`` sets it by default).

Under a Gaussian posterior ``N(z0, Sigma)`` the linearized output at one input is Gaussian,
``f ~ N(f(x; z0), J Sigma J^T)``, so the predictive has closed forms (``link_approx``):

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
uncertain weights are the last layer of a builder MLP (``bayesian_sites="last_layer"``) or the
``nn.Linear`` of a module whose output is the network's output (checked on example rows at the
linearization point and at other weights of that layer), the network runs once to the last
hidden layer (for a module: one forward pass with a hook on that layer's input) and the rest is
small linear algebra on the features ``phi`` (``f = phi W + b`` is linear in the last layer):
``phi Sigma_o phi^T`` per output for a dense covariance, ``(phi^2) s^2`` for a diagonal one, and
for a K-FAC (Kronecker) one ``((phi Q_A)^2 S^2) (Q_G^2)^T`` with the eigenbases of its factors.
Otherwise the Jacobian of the uncertain coordinates is computed in chunks of inputs and
contracted with a square root of ``Sigma``: where they are whole dense, convolutional or
BatchNorm layers (K-FAC Laplace of a conv net) from one recorded forward pass and a backward
pass per output (``core/layers.py``), else from per-example Jacobians. Every quantity here is
computed for one block of inputs at a time (:class:`GLMBlock`), so memory does not grow with the
number of inputs.

Examples
--------
>>> import torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 40)[:, None]; y = torch.sin(3 * x[:, 0])
>>> post = mz.fit(mz.models.mlp(1, hidden=[8]), x, y, method="laplace", steps=100, progress=False)
>>> glm = post.predictive.linearized
>>> glm.closed_form, glm.link_approx
(True, 'probit')
>>> mu, var = glm.block(x[:5]).moments()
>>> mu.shape, var.shape
(torch.Size([5, 1]), torch.Size([5, 1]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
from torch import nn

from marginalize.core import layers
from marginalize.core.approximations import Approximation, Gaussian, Kronecker
from marginalize.core.layout import Layout
from marginalize.core.linearized import (
    JACOBIAN_BYTES,
    OutputMap,
    network_mask,
    output_jacobian,
    output_map,
)
from marginalize.core.predictive.summaries import entropy
from marginalize.core.problem import _no_validation
from marginalize.errors import ModelError, OptionError, is_out_of_memory
from marginalize.models.base import BNN
from marginalize.models.builders import MLP, dense
from marginalize.models.module import ModuleBNN

__all__ = ["LinearizedPredictive", "GLMState", "GLMBlock", "probit_probs", "QUADRATURE_NODES"]

#: Gauss-Hermite nodes for a scalar noise scale's posterior
QUADRATURE_NODES = 20


@dataclass
class GLMState:
    """What the linearized predictive needs from a posterior, computed once."""

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
    #: the same as per-output blocks side by side, (r, c r), for variances only
    grid_diag_blocks: torch.Tensor | None = None
    #: likelihood coordinates (noise scales) with posterior variance, and their variances
    other: torch.Tensor | None = None
    other_var: torch.Tensor | None = None
    #: the grid's standard deviations (r, c) for the features path with a diagonal
    scale_grid: torch.Tensor | None = None
    #: constrained values of every site at z0
    params0: dict = field(default_factory=dict)
    #: for a module: the name of the ``nn.Linear`` whose inputs are the features
    head: str | None = None
    #: recorded layers whose positions are exactly ``cols`` (Jacobians from one recorded
    #: pass, see ``core/layers.py``), else None
    layers: list | None = None


def _coordinate_variance(approx: Approximation) -> torch.Tensor:
    if isinstance(approx, Gaussian) and approx.scale_tril is not None:
        return (approx.scale_tril**2).sum(-1)
    return approx.variance()


def _factor_rows(approx: Gaussian, cols: torch.Tensor) -> torch.Tensor:
    """The rows of ``approx.cov_factor`` for the coordinates ``cols`` (zeros where a factor
    stored for ``approx.idx`` only has none)."""
    cf = approx.cov_factor
    if approx.idx is None:
        return cf[cols]
    where = torch.full((approx.dim,), -1, dtype=torch.long, device=cf.device)
    where[approx.idx] = torch.arange(approx.idx.numel(), device=cf.device)
    pos = where[cols]
    out = cf.new_zeros(cols.numel(), cf.shape[-1])
    hit = pos >= 0
    out[hit] = cf[pos[hit]]
    return out


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


class LinearizedPredictive:
    """The GLM predictive of a Gaussian approximation (see the module docstring).

    Parameters
    ----------
    model : callable
        A builder model or a plain model function (its :class:`UserModel`).
    layout : Layout
    approximation : Gaussian or Kronecker
        The posterior; ``loc`` is the linearization point.
    task : str
    link_approx : str
        ``"probit"`` (closed forms) or ``"mc"`` (draws through the linearized network).
    temperature : float, optional
        A fitted temperature (logits divided, noise scale multiplied by it).
    example : torch.Tensor, optional
        A few training inputs: a plain model function is traced on them.
    inputs : callable, optional
        Returns an iterable of chunks of training inputs: a plain model function's output
        sites are found on them (one backward pass per chunk; without them, on ``example``).
    state : mapping, optional
        The network's fitted state (BatchNorm statistics) at the linearization point.

    Raises
    ------
    ModelError
        (on first use) A non-Gaussian approximation, or a model whose output cannot be found.
    """

    def __init__(
        self,
        model: Callable,
        layout: Layout,
        approximation: Approximation,
        *,
        task: str,
        link_approx: str = "probit",
        temperature: float | None = None,
        example: torch.Tensor | None = None,
        inputs: Callable[[], Iterable[torch.Tensor]] | None = None,
        state: Mapping[str, torch.Tensor] | None = None,
    ):
        self.model = model
        self.layout = layout
        self.approximation = approximation
        self.task = task
        self.link_approx = link_approx
        self.temperature = 1.0 if temperature is None else float(temperature)
        self.example = None if example is None else example[:2]
        self.inputs = inputs
        self.fitted_state = state
        #: False once ``torch.func`` failed to batch the network's forward-mode products
        self.jvp_ok = True

    # ---- what is computed once ---------------------------------------------------------
    @cached_property
    def state(self) -> GLMState:
        """The linearization point, the uncertain coordinates and a square root of their
        covariance (``ModelError`` where the GLM predictive does not apply)."""
        approx = self.approximation
        if not isinstance(approx, (Gaussian, Kronecker)):
            raise ModelError(
                "the linearized (glm) predictive needs a Gaussian posterior (laplace), got a "
                f"{type(approx).__name__} approximation"
            )
        z0 = approx.loc
        omap = output_map(self.model, self.layout, self.example, z0)
        if omap is None:
            raise ModelError(
                "the linearized (glm) predictive needs the model's output: a builder model, or "
                "a plain function whose observation family has a location, logits or a rate "
                "(Normal, StudentT, Laplace, Cauchy, LogNormal, Bernoulli, Binomial, "
                "NegativeBinomial, Categorical, Poisson, Exponential); use predictive='sample'"
            )
        omap.state = self.fitted_state
        var = _coordinate_variance(approx)
        net = self._network_mask(omap, z0)
        uncertain = var > 0
        cols = torch.nonzero(net & uncertain).reshape(-1)
        other = torch.nonzero(~net & uncertain).reshape(-1)
        st = GLMState(omap, z0, cols, "diag", other=other, other_var=var[other])
        st.params0 = self.layout.unpack(z0)
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
                parts.append(_factor_rows(approx, cols))
            r = torch.cat(parts, 1)
            st.factor = r[:, (r != 0).any(0)]  # drop the columns of fixed coordinates
        st.grid = self._last_layer_grid(cols, st)
        if st.grid is not None and st.kind == "factor":
            pos = torch.searchsorted(cols, st.grid.reshape(-1))
            r = st.factor[pos]
            rr, cc = st.grid.shape
            st.grid_cov = (r @ r.T).reshape(rr, cc, rr, cc)
            st.grid_diag_blocks = (
                st.grid_cov.diagonal(dim1=1, dim2=3).permute(0, 2, 1).reshape(rr, cc * rr)
            ).contiguous()
        if st.grid is not None and st.kind == "diag":
            pos = torch.searchsorted(cols, st.grid.reshape(-1))
            st.scale_grid = st.scale[pos].reshape(st.grid.shape)
        if st.grid is None and omap.vectorized:
            st.layers = self._recorded_layers(cols)
        return st

    def _recorded_layers(self, cols: torch.Tensor) -> list | None:
        """The dense, convolutional and BatchNorm layers whose positions are exactly the
        uncertain coordinates ``cols`` (their Jacobian then comes from one recorded pass and
        a backward pass per output), else ``None``."""
        model = self.model
        if cols.numel() == 0 or not layers.supports(model):
            return None
        layout = self.layout

        def offset(name):
            return layout[name].offset if name in layout else None

        try:
            found = layers.find_layers(model, offset) + layers.find_norms(model, offset)
        except OptionError:
            return None
        wanted = set(cols.tolist())
        keep = [k for k in found if wanted & set(k.pos.reshape(-1).tolist())]
        if not keep:
            return None
        pos = torch.cat([k.pos.reshape(-1) for k in keep]).to(cols.device)
        if pos.numel() != cols.numel() or not torch.equal(pos.sort().values, cols):
            return None
        return keep

    def _network_mask(self, omap: OutputMap, z0: torch.Tensor) -> torch.Tensor:
        if omap.vectorized:
            return network_mask(omap, z0, None)
        if self.inputs is None and self.example is None:
            raise ModelError("the glm predictive of a plain model function needs its data")
        # a backward pass per chunk of the training inputs (without them: the example rows)
        chunks = self.inputs() if self.inputs is not None else [self.example]
        mask = None
        for xb in chunks:
            m = network_mask(omap, z0, xb)
            mask = m if mask is None else mask | m
        return mask

    def _last_layer_grid(self, cols: torch.Tensor, st: GLMState) -> torch.Tensor | None:
        """The (fan_in + 1, fan_out) positions of the last layer (a builder MLP's, or the
        ``nn.Linear`` of a module whose output is the network's output) when those are
        exactly the uncertain output coordinates (bias as the last row), else ``None``."""
        model = self.model
        if cols.numel() == 0:
            return None
        if type(model) is MLP:
            spec = model.layer_specs()[-1]
            w = self.layout[f"{spec.name}.weight"]
            fan_in, fan_out = spec.weight_shape
            grid = torch.arange(w.offset, w.offset + w.size, device=cols.device).reshape(
                fan_in, fan_out
            )
            bias = f"{spec.name}.bias" if spec.bias_shape is not None else None
        elif isinstance(model, ModuleBNN):
            found = self._module_head(cols)
            if found is None:
                return None
            grid, bias, st.head = found
        else:
            return None
        if bias is not None:
            b = self.layout[bias]
            grid = torch.cat(
                [grid, torch.arange(b.offset, b.offset + b.size, device=cols.device)[None]]
            )
        if grid.numel() != cols.numel() or not torch.equal(grid.reshape(-1).sort().values, cols):
            return None
        if isinstance(model, ModuleBNN) and not self._head_is_output(st, grid):
            return None
        if st.kind == "kron":
            if len(st.blocks) != 1 or not torch.equal(st.blocks[0]["idx"], grid.reshape(-1)):
                return None
        return grid

    def _module_head(self, cols: torch.Tensor) -> tuple[torch.Tensor, str | None, str] | None:
        """The weight grid ``(in, out)`` and bias site of the module's ``nn.Linear`` whose
        weight holds the first uncertain coordinate."""
        model: ModuleBNN = self.model
        first = int(cols[0])
        for spec in model.layer_specs():
            wname = f"{spec.name}.weight"
            if wname not in self.layout:
                continue
            w = self.layout[wname]
            if not w.offset <= first < w.offset + w.size:
                continue
            try:
                mod = model.module.get_submodule(spec.name)
            except AttributeError:
                return None
            if not isinstance(mod, nn.Linear):
                return None
            out_f, in_f = spec.weight_shape
            grid = torch.arange(w.offset, w.offset + w.size, device=cols.device)
            bias = f"{spec.name}.bias"
            return grid.reshape(out_f, in_f).T, bias if bias in self.layout else None, spec.name
        return None

    def _head_is_output(self, st: GLMState, grid: torch.Tensor) -> bool:
        """Whether the network's output is ``features @ z[grid]`` on the example rows, at the
        linearization point and with other values of the layer (the layer is the output)."""
        if self.example is None or not torch.is_floating_point(st.z0):
            return False
        try:
            phi = _module_features(self, st, grid, self.example)
        except (RuntimeError, ModelError):
            return False
        if phi is None or phi.dim() != 2 or phi.shape[1] != grid.shape[0]:
            return False
        g = torch.Generator(device=st.z0.device).manual_seed(0)
        z1 = st.z0.clone()
        z1[grid.reshape(-1)] = torch.randn(
            grid.numel(), generator=g, dtype=z1.dtype, device=z1.device
        )
        with torch.no_grad(), _no_validation():
            for z in (st.z0, z1):
                f = st.omap.forward(z, self.example)
                lin = phi @ z[grid]
                if f.shape != lin.shape or not torch.allclose(f, lin, rtol=1e-4, atol=1e-5):
                    return False
        return True

    @cached_property
    def bernoulli(self) -> bool:
        """One logit per input (a Bernoulli likelihood) rather than a softmax."""
        st = self.state
        if st.omap.vectorized:
            return self.model.likelihood.kind == "bernoulli"
        return st.omap.family == "logits" and st.omap.scalar

    @cached_property
    def closed_form(self) -> bool:
        """Whether predictions are in closed form: ``link_approx`` other than ``"mc"``, a
        Gaussian approximation, and a Gaussian regression likelihood or a Bernoulli or
        Categorical one."""
        if self.link_approx == "mc":
            return False
        if not isinstance(self.approximation, (Gaussian, Kronecker)):
            return False
        if self.task == "classification":
            return True
        if isinstance(self.model, BNN):
            return self.model.likelihood.kind == "gaussian"
        try:
            st = self.state
        except ModelError:
            return False
        if st.omap.family != "loc" or self.example is None:
            return False
        with torch.no_grad(), _no_validation():
            base, _ = st.omap.observation(st.z0, self.example)
        return isinstance(base, torch.distributions.Normal)

    @cached_property
    def outputs(self) -> int:
        """Number of outputs ``O`` of ``f`` per input."""
        model = self.model
        if isinstance(model, BNN):
            return model.likelihood.net_outputs(model.out_features)
        st = self.state
        with torch.no_grad(), _no_validation():
            return int(st.omap.forward(st.z0, self.example[:1]).shape[-1])

    def row_bytes(self, units: int, itemsize: int) -> int:
        """Bytes one input needs per draw: its activations (twice: a forward-mode tangent
        rides along) and its rows of the Jacobian of the uncertain coordinates."""
        st = self.state
        k = st.cols.numel() if st.grid is None else 0
        return (2 * units + self.outputs * k) * itemsize

    def block(self, x: torch.Tensor) -> GLMBlock:
        """The linearized predictive at a block of inputs ``x`` ``(B, ...)``."""
        return GLMBlock(self, x)

    def squeeze(self, t: torch.Tensor) -> torch.Tensor:
        """``(N, O)`` -> the prediction's shape: ``(N,)`` for one regression target."""
        model = self.model
        if isinstance(model, BNN):
            return t[..., 0] if model.out_features == 1 and t.shape[-1] == 1 else t
        return t[..., 0] if self.state.omap.scalar else t


class GLMBlock:
    """The linearized predictive at one block of inputs: the features or the Jacobian there
    are computed once (on first use) and shared by every chunk of draws."""

    def __init__(self, glm: LinearizedPredictive, x: torch.Tensor):
        self.glm = glm
        self.x = x

    @cached_property
    def features(self) -> torch.Tensor:
        """Inputs of the last layer at ``z0`` with a column of ones for the bias: ``(B, r)``."""
        model = self.glm.model
        if isinstance(model, ModuleBNN):
            st = self.glm.state
            return _module_features(self.glm, st, st.grid, self.x)
        params = self.glm.state.params0
        specs = model.layer_specs()
        h = self.x
        with torch.no_grad():
            for spec in specs[:-1]:
                w, b = params[f"{spec.name}.weight"], params.get(f"{spec.name}.bias")
                h = model.act(dense(h, w, b))
        if specs[-1].bias_shape is not None:
            h = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)
        return h

    @cached_property
    def output_and_jacobian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``f(x; z0)`` ``(B, O)`` and ``J`` ``(B, O, K)`` of the uncertain coordinates."""
        st = self.glm.state
        with torch.no_grad():
            f0 = st.omap.forward(st.z0, self.x)
        return f0, self.jacobian(self.x)

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """``J`` ``(B, O, K)`` of the uncertain coordinates at the rows ``x``: from one
        recorded pass where they are whole layers (``core/layers.py``), else per-example
        Jacobians (``core/linearized.py``)."""
        glm, st = self.glm, self.glm.state
        if st.layers is not None:
            try:
                return layers.jacobian(glm.model, st.params0, x, st.omap.state, st.layers, st.cols)[
                    1
                ]
            except (RuntimeError, NotImplementedError) as e:
                if is_out_of_memory(e):
                    raise
                st.layers = None  # a module the recording cannot run: per-example Jacobians
        return output_jacobian(st.omap, st.z0, x, st.cols)

    # ---- moments of the linearized output -----------------------------------------------
    def moments(self, full_cov: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(B, O)`` and variance ``(B, O)`` (or covariance ``(B, O, O)`` with
        ``full_cov``) of the linearized output under the Gaussian posterior."""
        st = self.glm.state
        if st.grid is not None:
            return self._moments_features(full_cov)
        with torch.no_grad():
            f0 = st.omap.forward(st.z0, self.x)
        n, o = f0.shape
        if st.cols.numel() == 0:
            z = f0.new_zeros(n, o, o) if full_cov else torch.zeros_like(f0)
            return f0, z
        chunk = max(1, JACOBIAN_BYTES // (8 * o * max(st.cols.numel(), 1)))
        out = []
        for i in range(0, n, chunk):
            j = self.jacobian(self.x[i : i + chunk])
            b = _project(st, j)  # (n, O, K)
            out.append(b @ b.transpose(1, 2) if full_cov else (b * b).sum(-1))
        return f0, torch.cat(out)

    def _moments_features(self, full_cov: bool):
        st = self.glm.state
        phi = self.features  # (N, r)
        f0 = phi @ st.z0[st.grid]  # the last layer's weights (in, out), bias as the last row
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
        t = (phi @ st.grid_diag_blocks).reshape(-1, c, r)  # one matrix product for every output
        # phi_n^T Sigma_o phi_n as a broadcast product and a sum (einsum's batched matrix-vector
        # products took 0.8 ms of 3.5 on digits, this 0.17)
        return f0, (t * phi[:, None, :]).sum(-1)

    # ---- the closed-form predictive ------------------------------------------------------
    def _noise_nodes(self, f0: torch.Tensor):
        """Quadrature (or Monte Carlo) nodes of the aleatoric variance: ``(weights (Q,),
        variances (Q, N, O))`` over the posterior of the likelihood's own coordinates."""
        st = self.glm.state
        other = st.other
        if other.numel() == 0:
            return f0.new_ones(1), self._aleatoric(st.z0[None], f0)
        if other.numel() == 1:
            t, w = np.polynomial.hermite.hermgauss(QUADRATURE_NODES)
            nodes = st.z0[other] + math.sqrt(2.0) * st.other_var.sqrt() * f0.new_tensor(t)[:, None]
            weights = f0.new_tensor(w / math.sqrt(math.pi))
        else:
            g = torch.Generator(device=f0.device).manual_seed(0)
            e = torch.randn(64, other.numel(), generator=g, dtype=f0.dtype, device=f0.device)
            nodes = st.z0[other] + e * st.other_var.sqrt()
            weights = f0.new_full((64,), 1 / 64)
        z = st.z0.expand(nodes.shape[0], -1).clone()
        z[:, other] = nodes
        return weights, self._aleatoric(z, f0)

    def _aleatoric(self, z: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        """Noise variance ``(Q, N, O)`` of the observation distribution at each row of ``z``."""
        st = self.glm.state
        if st.omap.vectorized:
            params = self.glm.layout.unpack(z)
            loc, var = self.glm.model.likelihood.moments(f0.expand(z.shape[0], *f0.shape), params)
            var = var.expand_as(loc).reshape(z.shape[0], f0.shape[0], -1)
            return var.expand(z.shape[0], *f0.shape)
        out = []
        for zq in z:
            base, _ = st.omap.observation(zq, self.x)
            out.append(base.variance.reshape(f0.shape[0], -1).expand_as(f0))
        return torch.stack(out)

    def regression(self) -> dict[str, torch.Tensor]:
        """``mean``, ``epistemic`` and ``aleatoric`` variances of the closed-form regression
        predictive at the block (the prediction's shapes)."""
        t = self.glm.temperature
        with torch.no_grad():
            f0, var = self.moments()
            weights, ale = self._noise_nodes(f0)
            ale = torch.einsum("q,qno->no", weights, ale) * t * t
        sq = self.glm.squeeze
        return {"mean": sq(f0), "epistemic": sq(var), "aleatoric": sq(ale)}

    def probs(self) -> torch.Tensor:
        """Class probabilities ``(B, C)`` by the probit approximation."""
        t = self.glm.temperature
        with torch.no_grad():
            f0, var = self.moments()
            return probit_probs(f0 / t, var / (t * t), self.glm.bernoulli)

    def expected_entropy(self, probs: torch.Tensor, num_samples: int, generator) -> torch.Tensor:
        """``E[H(p(y | f))]`` over ``num_samples`` draws of the output Gaussian (no network
        passes), capped at ``H(probs)`` (see below)."""
        t = self.glm.temperature
        with torch.no_grad():
            mu, cov = self.moments(full_cov=True)
            mu, cov = mu / t, cov / (t * t)
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            jitter = 1e-10 * cov.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-30)
            chol, _ = torch.linalg.cholesky_ex(cov + jitter[:, None, None] * eye)
            e = torch.randn(
                num_samples, *mu.shape, generator=generator, dtype=mu.dtype, device=mu.device
            )
            f = mu + torch.einsum("nij,snj->sni", chol, e)
            if self.glm.bernoulli:
                p1 = torch.sigmoid(f[..., 0])
                pd = torch.stack([1 - p1, p1], -1)
            else:
                pd = torch.softmax(f, -1)
            # the probit probabilities and the Monte Carlo expected entropy are two
            # approximations: where they disagree so that E[H] exceeds H[probs], the epistemic
            # part is 0 and the aleatoric part H[probs], keeping entropy = aleatoric + epistemic
            return torch.minimum(entropy(pd).mean(0), entropy(probs))

    def log_predictive(self, y: torch.Tensor) -> torch.Tensor:
        """``log p(y_n | x_n, data)`` per observation under the closed-form predictive."""
        t = self.glm.temperature
        with torch.no_grad():
            f0, var = self.moments()
            if self.glm.task == "regression":
                weights, ale = self._noise_nodes(f0)
                total = var + ale * t * t  # (Q, N, O)
                yy = y.reshape(f0.shape)
                lp = torch.distributions.Normal(f0, total.sqrt()).log_prob(yy).sum(-1)  # (Q, N)
                return torch.logsumexp(lp + weights.log()[:, None], 0)
            probs = probit_probs(f0 / t, var / (t * t), self.glm.bernoulli)
            yi = y.long().reshape(-1, 1)
            return probs.clamp_min(torch.finfo(probs.dtype).tiny).log().gather(-1, yi)[:, 0]

    # ---- draws through the linearized network --------------------------------------------
    def dist(self, z: torch.Tensor):
        """The observation distribution of draws ``z`` ``(S, D)`` under the linearized output,
        batch shape ``(S, B, ...)`` (not tempered)."""
        st = self.glm.state
        z0 = st.z0
        if st.grid is not None:  # the output is linear in the last layer: f = phi W + b exactly
            w = z[:, st.grid.reshape(-1)].reshape(z.shape[0], *st.grid.shape)
            return st.omap.dist(self.features @ w, z)
        if st.omap.vectorized and self.glm.jvp_ok:
            x = self.x

            def jvp(t):
                return torch.func.jvp(lambda zz: st.omap.forward(zz, x), (z0,), (t,))

            try:
                f0, jv = torch.func.vmap(jvp)(z - z0)
                return st.omap.dist(f0 + jv, z)
            except (RuntimeError, NotImplementedError) as e:
                if is_out_of_memory(e):
                    raise
                self.glm.jvp_ok = False  # layers torch.func cannot batch: a Jacobian instead
        f0, j = self.output_and_jacobian
        flin = f0 + torch.einsum("nok,sk->sno", j, (z - z0)[:, st.cols])
        if st.omap.vectorized:
            return st.omap.dist(flin, z)
        if st.other.numel() == 0 or st.omap.family == "logits":  # one rebuild over the draws
            return st.omap.dist(flin, st.z0, self.x)
        return StackedDraws([st.omap.dist(flin[s], z[s], self.x) for s in range(z.shape[0])])


def _module_features(
    glm: LinearizedPredictive, st: GLMState, grid: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """A module's last-layer inputs ``(B, r)`` at ``z0`` (a forward hook on its
    ``nn.Linear`` ``st.head``; one forward pass, no graph), ones appended for the bias."""
    mod = glm.model.module.get_submodule(st.head)
    got: list[torch.Tensor] = []
    handle = mod.register_forward_hook(lambda _m, inp, _o: got.append(inp[0]))
    try:
        with torch.no_grad(), _no_validation():
            st.omap.forward(st.z0, x)
    finally:
        handle.remove()
    if len(got) != 1:
        raise ModelError("the last layer ran more than once in one forward pass")
    h = got[0]
    if grid.shape[0] == h.shape[-1] + 1:
        h = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], -1)
    return h


def _project(st: GLMState, j: torch.Tensor) -> torch.Tensor:
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


class StackedDraws(dist.TorchDistribution):
    """Per-draw observation distributions of a plain model stacked along a leading draw dim
    (each draw has its own noise scale)."""

    def __init__(self, parts: list[Any]):
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
