"""Closed-form log joint and analytic gradient of builder MLPs over the flat vector ``z``.

``Problem.log_joint`` evaluates a builder model through its priors' and likelihood's
distribution objects, and ``Problem.potential_and_grad`` differentiates that with autograd:
correct for every model, but on a small network (a 1-50-1 MLP on 100 points) almost all of
its cost is Python and dispatch overhead. NUTS calls the gradient a million times, so for
the :class:`~marginalize.models.builders.MLP` builder with the package's priors
(``Normal``, ``ScaledNormal``, ``Hierarchical``) and likelihoods (``Gaussian``,
``Heteroscedastic``, ``Categorical``, ``Bernoulli``) this module computes the same
quantity from precomputed views of ``z``:

* each layer's weight and bias are adjacent in ``z`` (weight ``(fan_in, out)`` row-major,
  then the bias), so one ``(fan_in + 1, out)`` view holds both and one matrix product with
  inputs that carry a trailing column of ones gives ``h @ W + b``, and its gradient;
* log densities are written out in closed form (no distribution objects);
* the gradient is back-propagated by hand (no autograd tape), with the activation's own
  backward kernel.

:func:`fast_potential` returns ``None`` for anything else (plain model functions, custom
priors or likelihoods, subclasses that change ``forward``), and callers fall back to the
general path. The tests check both paths give the same numbers (float64, 1e-10).

Examples
--------
>>> import torch, marginalize as mz
>>> from marginalize.core.problem import prepare
>>> x = torch.randn(20, 2, dtype=torch.float64); y = x.sum(1)
>>> pb = prepare(mz.models.mlp(2, hidden=[8], activation="tanh"), x, y)
>>> fast = fast_potential(pb)
>>> z = pb.init_from_prior(0)
>>> u, g = fast.potential_and_grad(z)
>>> bool(torch.allclose(u, -pb.log_joint(z)))
True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributions.transforms import AffineTransform, ComposeTransform, ExpTransform

from marginalize.models.builders import MLP, dense
from marginalize.models.likelihoods import Bernoulli, Categorical, Gaussian, Heteroscedastic
from marginalize.models.priors import Hierarchical, Normal, ScaledNormal

__all__ = ["FlatMLP", "blas_threads", "fast_potential", "supports"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)

_aten = torch.ops.aten

#: activation -> backward ``(dh, a, h) -> da`` with ``a`` the pre-activation, ``h = act(a)``
_ACT_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "tanh": lambda dh, a, h: _aten.tanh_backward.default(dh, h),
    "sigmoid": lambda dh, a, h: _aten.sigmoid_backward.default(dh, h),
    "relu": lambda dh, a, h: _aten.threshold_backward.default(dh, h, 0),
    "identity": lambda dh, a, h: dh,
    "elu": lambda dh, a, h: _aten.elu_backward.default(dh, 1.0, 1, 1, False, a),
    "gelu": lambda dh, a, h: _aten.gelu_backward.default(dh, a),
    "silu": lambda dh, a, h: _aten.silu_backward.default(dh, a),
    "softplus": lambda dh, a, h: _aten.softplus_backward.default(dh, a, 1, 20),
    "leaky_relu": lambda dh, a, h: _aten.leaky_relu_backward.default(dh, a, 0.01, False),
}


class _Data(NamedTuple):
    x: torch.Tensor
    x_aug: torch.Tensor  # x with a trailing column of ones
    x_aug_t: torch.Tensor  # its transpose, contiguous
    y: torch.Tensor
    y_col: torch.Tensor | None  # real targets as (N, T)
    y_index: torch.Tensor | None  # class labels as (N, 1)
    y_onehot: torch.Tensor | None


#: the NumPy version is used while the widest activation has at most this many numbers: up to
#: there it beats the torch version (1.2-2x at 5,000-100,000 numbers with few input features,
#: even with its BLAS on one thread); beyond, the arithmetic dominates and torch's own kernels
#: are the better choice
_NP_MAX_ELEMENTS = 50_000


def blas_threads(n: int):
    """A context that limits NumPy's BLAS to ``n`` threads (``threadpoolctl``; a no-op without
    it). Samplers running the NumPy potential use it with torch's thread count, so that
    OpenBLAS does not start threads of its own on larger products."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=max(1, int(n)), user_api="blas")


def _np_sigmoid(a):
    return 0.5 * (np.tanh(0.5 * a) + 1.0)


def _np_tanh_deriv(h):
    s = h * h
    np.subtract(1.0, s, out=s)
    return s


def _np_sigmoid_deriv(h):
    s = 1.0 - h
    s *= h
    return s


#: activation -> (forward, derivative ``h -> act'(a)`` from the output ``h = act(a)``, as a
#: fresh array the caller may overwrite) in NumPy
_NP_ACT = {
    "tanh": (np.tanh, _np_tanh_deriv),
    "relu": (lambda a: np.maximum(a, 0.0), lambda h: (h > 0).astype(h.dtype)),
    "sigmoid": (_np_sigmoid, _np_sigmoid_deriv),
    "identity": (lambda a: a, np.ones_like),
}


@dataclass(frozen=True)
class _Layer:
    start: int  # offset of the weight in z; the bias follows it
    stop: int
    fan_in: int
    out: int
    #: fixed prior scale, or None when the scale is the latent site at ``hyper``
    scale: float | None
    hyper: int | None = None  # offset of the log-scale coordinate in z
    c: float = 1.0  # scale = exp(z[hyper]) * c
    hyperprior: str = ""
    hyperscale: float = 1.0


def supports(model) -> bool:
    """Whether :class:`FlatMLP` covers ``model`` (the ``mlp`` builder, package
    priors/likelihoods)."""
    if not isinstance(model, MLP) or type(model).forward is not MLP.forward or not model.bias:
        return False
    if model.activation not in _ACT_BACKWARD:
        return False
    if type(model.likelihood) not in (Gaussian, Heteroscedastic, Categorical, Bernoulli):
        return False
    return all(type(p) in (Normal, ScaledNormal, Hierarchical) for p in model.priors.values())


def fast_potential(problem) -> FlatMLP | None:
    """The fast log joint of ``problem`` (a :class:`~marginalize.core.problem.Problem`),
    or ``None`` when its model is not covered (callers then use the general path)."""
    if not supports(problem.model):
        return None
    try:
        x, y = (problem.x, problem.y) if problem.in_memory else problem.example
        return FlatMLP(problem.model, problem.layout, x, y)
    except _Unsupported:
        return None


class _Unsupported(Exception):
    pass


class FlatMLP:
    """Log joint of an MLP builder model as a function of the flat unconstrained vector.

    Parameters
    ----------
    model : MLP
    layout : Layout
        The problem's layout (site offsets and transforms).
    x, y : torch.Tensor
        Validated training data (``Problem.x``, ``Problem.y``).
    """

    def __init__(self, model: MLP, layout, x: torch.Tensor, y: torch.Tensor):
        self.model = model
        self.layout = layout
        self.dim = layout.size
        self.act = model.act
        self.act_backward = _ACT_BACKWARD[model.activation]
        #: the activation's backward needs only its output (tanh, sigmoid, relu, identity)
        self._needs_only_output = model.activation in ("tanh", "sigmoid", "relu", "identity")
        self.layers: list[_Layer] = []
        for spec in model.layer_specs():
            w, b = layout[f"{spec.name}.weight"], layout[f"{spec.name}.bias"]
            fan_in, out = spec.weight_shape
            if b.offset != w.offset + w.size or not (w.is_real and b.is_real):
                raise _Unsupported("weight and bias are not adjacent")
            prior = model.priors[spec.name]
            if isinstance(prior, Hierarchical):
                h = layout[f"{spec.name}.scale"]
                if not _is_exp(h.transform):
                    raise _Unsupported("hyper scale transform")
                self.layers.append(
                    _Layer(
                        w.offset,
                        b.offset + b.size,
                        fan_in,
                        out,
                        None,
                        h.offset,
                        prior.scale_factor(spec.fan_in),
                        prior.hyperprior,
                        float(prior.hyperscale),
                    )
                )
            else:
                self.layers.append(
                    _Layer(
                        w.offset,
                        b.offset + b.size,
                        fan_in,
                        out,
                        float(prior.fixed_scale(spec.fan_in)),
                    )
                )
        lik = model.likelihood
        self.lik = lik
        self.kind = lik.kind
        self.noise_at: int | None = None
        if isinstance(lik, Gaussian) and lik.noise is None:
            site = layout["noise"]
            if not _is_exp(site.transform):
                raise _Unsupported("noise transform")
            self.noise_at = site.offset
        # fixed-scale weights: one precision vector over z (zero elsewhere)
        self.fixed_layers = [lay for lay in self.layers if lay.scale is not None]
        self.hier_layers = [lay for lay in self.layers if lay.scale is None]
        dtype, device = x.dtype, x.device
        prec = torch.zeros(self.dim, dtype=dtype, device=device)
        const = 0.0
        for lay in self.fixed_layers:
            n = lay.stop - lay.start
            prec[lay.start : lay.stop] = 1.0 / lay.scale**2
            const -= n * (math.log(lay.scale) + _HALF_LOG_2PI)
        self.prec = prec
        self.prior_const = const
        self.set_data(x, y)

    # ---- data ------------------------------------------------------------------------------
    def set_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Use ``(x, y)`` as the data (precomputes augmented inputs and target forms)."""
        self.full = self.data_for(x, y)
        self.n = x.shape[0]
        self._buffers: dict = {}
        self._np = self._numpy_constants()

    def _numpy_constants(self) -> dict | None:
        """Arrays for the NumPy version of the one-chain potential, or None where it does
        not apply (data off the CPU, other likelihoods or activations)."""
        d = self.full
        widest = max(lay.out for lay in self.layers)
        if (
            d.x.device.type != "cpu"
            or self.kind != "gaussian"
            or self.model.activation not in _NP_ACT
            or d.x.dtype not in (torch.float32, torch.float64)
            or self.n * widest > _NP_MAX_ELEMENTS
        ):
            return None
        act, deriv = _NP_ACT[self.model.activation]
        return {
            "dtype": d.x.dtype,
            "x_aug": d.x_aug.numpy(),
            "x_aug_t": d.x_aug_t.numpy(),
            # one output after hidden layers: the output and its residual as 1-D vectors
            "one": len(self.layers) > 1 and self.layers[-1].out == 1,
            "y": (
                d.y_col.reshape(-1)
                if len(self.layers) > 1 and self.layers[-1].out == 1
                else d.y_col
            )
            .contiguous()
            .numpy(),
            "prec": self.prec.numpy(),
            "act": act,
            "deriv": deriv,
            "plan": [
                (lay.start, lay.start + lay.fan_in * lay.out, lay.stop, lay.fan_in, lay.out)
                for lay in self.layers
            ],
            "max": float(torch.finfo(d.x.dtype).max),
        }

    def data_for(self, x: torch.Tensor, y: torch.Tensor) -> _Data:
        """The data in the forms the closed-form densities use (e.g. a minibatch)."""
        x_aug = _with_ones(x)
        y_col = y_index = y_onehot = None
        if self.kind == "categorical":
            y_index = y.long().unsqueeze(-1)
            k = self.lik.net_outputs(self.model.out_features)
            y_onehot = F.one_hot(y.long(), k).to(x.dtype)
        else:
            y = y.to(x.dtype)
            y_col = y.unsqueeze(-1) if y.dim() == 1 else y
        return _Data(x, x_aug, x_aug.T.contiguous(), y, y_col, y_index, y_onehot)

    def rows(self, idx: torch.Tensor | None) -> _Data:
        """The full data (``idx=None``) or the rows ``idx`` of it."""
        if idx is None:
            return self.full
        d = self.full

        def pick(t):
            return None if t is None else t[idx]

        x_aug = d.x_aug[idx]
        return _Data(
            d.x[idx],
            x_aug,
            x_aug.T.contiguous(),
            d.y[idx],
            pick(d.y_col),
            pick(d.y_index),
            pick(d.y_onehot),
        )

    # ---- views -------------------------------------------------------------------------------
    def _weights(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the ``(*batch, fan_in + 1, out)`` view of weight and bias (bias last)."""
        batch = z.shape[:-1]
        return [
            z[..., lay.start : lay.stop].view(*batch, lay.fan_in + 1, lay.out)
            for lay in self.layers
        ]

    def _hidden_buffer(self, k: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reusable ``(*shape[:-1], H + 1)`` buffer whose last column is ones."""
        key = (k, shape, like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = like.new_empty(*shape[:-1], shape[-1] + 1)
            buf[..., -1] = 1.0
            self._buffers[key] = buf
        return buf

    # ---- log densities (autograd-able, batched) ----------------------------------------------
    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Network output ``f``, shape ``(*batch, N, net_outputs)`` (differentiable)."""
        h = self.full.x if x is None else x
        last = len(self.layers) - 1
        flat = z.dim() == 1
        for k, lay in enumerate(self.layers):
            mid = lay.start + lay.fan_in * lay.out
            w = z[..., lay.start : mid].view(*z.shape[:-1], lay.fan_in, lay.out)
            b = z[..., mid : lay.stop]
            h = torch.addmm(b, h, w) if flat else dense(h, w, b)
            if k < last:
                h = self.act(h)
        return h

    def log_likelihood(
        self, z: torch.Tensor, data: _Data | None = None, f: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``sum_n log p(y_n | x_n, w(z))``, shape ``(*batch)`` (default: the full data)."""
        d = self.full if data is None else data
        f = self.forward(z, d.x) if f is None else f
        kind = self.kind
        if kind == "gaussian":
            r = d.y_col - f
            rss = r.square().flatten(-2).sum(-1)
            m = r.shape[-2] * r.shape[-1]
            if self.noise_at is None:
                s = self.lik.noise
                return -0.5 * rss / s**2 - m * (math.log(s) + _HALF_LOG_2PI)
            u = z[..., self.noise_at]
            return -0.5 * rss * torch.exp(-2.0 * u) - m * (u + _HALF_LOG_2PI)
        if kind == "heteroscedastic":
            t = f.shape[-1] // 2
            r = d.y_col - f[..., :t]
            s = F.softplus(f[..., t:]) + self.lik.min_scale
            return (-0.5 * (r / s).square() - torch.log(s) - _HALF_LOG_2PI).flatten(-2).sum(-1)
        if kind == "categorical":
            logp = torch.log_softmax(f, -1)
            return logp.gather(-1, d.y_index.expand(*f.shape[:-1], 1)).flatten(-2).sum(-1)
        g = f[..., 0]
        return (d.y * g - F.softplus(g)).sum(-1)

    def log_hyper(self, z: torch.Tensor) -> torch.Tensor:
        """Log prior (with the log-Jacobian) of the positive sites: layer scales and noise."""
        lp = z.new_zeros(z.shape[:-1])
        for lay in self.hier_layers:
            u = z[..., lay.hyper]
            lp = lp + _hyper_log_prob(lay.hyperprior, lay.hyperscale, u) + u
        if self.noise_at is not None:
            u = z[..., self.noise_at]
            ps = self.lik.noise_prior_scale
            lp = lp + (_LOG_2 - _HALF_LOG_2PI - math.log(ps)) - 0.5 * torch.exp(2.0 * u) / ps**2 + u
        return lp

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """Log prior density of every latent site plus the log-Jacobian of its transform."""
        lp = 0.5 * -(z.square() * self.prec).sum(-1) + self.prior_const
        for lay in self.hier_layers:
            w = z[..., lay.start : lay.stop]
            n = lay.stop - lay.start
            log_scale = z[..., lay.hyper] + math.log(lay.c)
            lp = (
                lp
                - 0.5 * w.square().sum(-1) * torch.exp(-2.0 * log_scale)
                - n * (log_scale + _HALF_LOG_2PI)
            )
        return lp + self.log_hyper(z)

    def log_joint(
        self, z: torch.Tensor, obs_scale: float = 1.0, data: _Data | None = None
    ) -> torch.Tensor:
        """``log p(w(z)) + obs_scale * log p(y | x, w(z)) + log|J|``, shape ``(*batch)``."""
        return self.log_prior(z) + obs_scale * self.log_likelihood(z, data)

    # ---- the potential with an analytic gradient ---------------------------------------------
    def potential_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``U(z) = -log_joint(z)`` and ``dU/dz`` by hand-written back-propagation.

        ``z`` is ``(D,)`` or ``(B, D)`` (several chains); an invalid point (non-finite
        potential) gives ``U = inf`` and a zero gradient.
        """
        with torch.no_grad():
            if z.dim() == 1:
                if self._np is not None and z.device.type == "cpu" and z.dtype == self._np["dtype"]:
                    # far out in a tail float32 overflows; that point gets U = inf, no warning
                    with np.errstate(over="ignore", invalid="ignore"):
                        u, g = self.numpy_potential_and_grad(z.detach().numpy())
                    return torch.scalar_tensor(u, dtype=z.dtype), torch.from_numpy(g)
                return self._flat_potential_and_grad(z.detach())
            return self._batched_potential_and_grad(z.detach())

    @property
    def numpy_dtype(self) -> torch.dtype | None:
        """The dtype :meth:`numpy_potential_and_grad` works in, or ``None`` where it does not
        apply (data off the CPU, a classification likelihood, an activation without a NumPy
        version, or activations wider than ``_NP_MAX_ELEMENTS`` numbers)."""
        return None if self._np is None else self._np["dtype"]

    def numpy_potential_and_grad(self, zn: np.ndarray) -> tuple[float, np.ndarray]:
        """:meth:`potential_and_grad` of one ``(D,)`` NumPy vector, as ``(float, ndarray)``.

        The same arithmetic as the torch version; a NumPy call on arrays of a few thousand
        numbers costs about a third of a torch operation's dispatch, and at these sizes that
        is most of the time. Only available where :attr:`numpy_dtype` is not ``None``; ``zn``
        must have that dtype. An invalid point gives ``(inf, zeros)``. Floating-point
        warnings far out in a tail are the caller's to silence (``np.errstate``): entering it
        on every call would cost a few percent here.
        """
        c = self._np
        plan = c["plan"]  # per layer: (weight start, bias start, stop, fan_in, out)
        act = c["act"]
        s0, _, e0, fi0, o0 = plan[0]
        f = c["x_aug"] @ zn[s0:e0].reshape(fi0 + 1, o0)
        hs = []
        last = len(plan) - 1
        for k in range(1, last + 1):
            s, m, e, fi, o = plan[k]
            h = act(f)
            hs.append(h)
            if k == last and c["one"]:  # one output: 1-D vectors, cheaper products
                w_out = zn[s:m]
                f = np.dot(h, w_out)
                f += zn[m]
            else:
                f = h @ zn[s:m].reshape(fi, o)
                f += zn[m:e]
        f -= c["y"]  # the residual, in place: f is a fresh array
        rv = f.reshape(-1)
        rss = float(rv @ rv)
        un = None if self.noise_at is None else float(zn[self.noise_at])
        terms = _gaussian_noise_terms(self.lik, rss, rv.shape[0], un)
        if terms is None or not abs(terms[0]) <= 0.25 * c["max"]:  # invalid point / overflow
            return math.inf, np.zeros_like(zn)
        u, inv_var, g_noise = terms
        grad = np.zeros(zn.shape[0], zn.dtype)
        if g_noise is not None:
            grad[self.noise_at] = g_noise
        f *= inv_var
        df = f  # dU/df of the current layer's output
        deriv = c["deriv"]
        k = last
        if c["one"]:
            s, m, _, _, _ = plan[k]
            h = hs[k - 1]
            np.dot(df, h, out=grad[s:m])  # h^T df
            grad[m] = df.sum()
            d = deriv(h)  # act'(a) from the output h, a fresh array
            if k == 1:
                # the first layer's gradient x_aug^T (df w^T * act'(a)) equals
                # ((x_aug^T * df^T) @ act'(a)) * w^T: no (N, H) outer product
                g0 = grad[s0:e0].reshape(fi0 + 1, o0)
                np.dot(c["x_aug_t"] * df, d, out=g0)
                g0 *= w_out
                df = None
            else:
                d *= df[:, None]
                d *= w_out
                df = d
            k -= 1
        if df is not None:
            for layer in range(k, 0, -1):
                s, m, e, fi, o = plan[layer]
                h = hs[layer - 1]
                np.matmul(h.T, df, out=grad[s:m].reshape(fi, o))
                np.add.reduce(df, 0, None, grad[m:e])  # the bias gradient (np.sum is slower)
                d = deriv(h)
                d *= df @ zn[s:m].reshape(fi, o).T
                df = d
            np.matmul(c["x_aug_t"], df, out=grad[s0:e0].reshape(fi0 + 1, o0))
        for lay in self.hier_layers:
            w = zn[lay.start : lay.stop]
            terms = _hier_prior_terms(lay, float(w @ w), float(zn[lay.hyper]))
            if terms is None:
                return math.inf, np.zeros_like(zn)
            u += terms[0]
            grad[lay.hyper] = terms[1]
            grad[lay.start : lay.stop] += w * terms[2]
        if self.fixed_layers:  # fixed-scale Gaussian priors: one precision vector over z
            gp = zn * c["prec"]
            u += 0.5 * float(gp @ zn) - self.prior_const
            grad += gp
        if not abs(u) <= c["max"]:  # also catches NaN
            return math.inf, np.zeros_like(zn)
        return u, grad

    def _flat_potential_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-chain case with as few tensor operations as possible (NUTS calls this
        about a million times: each operation saved is a few percent)."""
        d = self.full
        layers = self.layers
        last = len(layers) - 1
        act = self.act
        hs: list[torch.Tensor] = []  # activations entering layers 1..L-1
        ws: list[torch.Tensor] = []  # their weights (no bias row)
        lay = layers[0]
        f = torch.mm(d.x_aug, z[lay.start : lay.stop].view(lay.fan_in + 1, lay.out))
        for lay in layers[1:]:
            hs.append(act(f))
            mid = lay.start + lay.fan_in * lay.out
            w = z[lay.start : mid].view(lay.fan_in, lay.out)
            ws.append(w)
            f = torch.addmm(z[mid : lay.stop], hs[-1], w)
        pieces: list[tuple[int, torch.Tensor]] = []
        if self.kind == "gaussian":
            r = f - d.y_col
            rv = r.view(-1)
            rss = float(torch.dot(rv, rv))
            m = rv.shape[0]
            un = None if self.noise_at is None else float(z[self.noise_at])
            terms = _gaussian_noise_terms(self.lik, rss, m, un)
            if terms is None:
                return z.new_tensor(math.inf), torch.zeros_like(z)
            u, inv_var, g_noise = terms
            if g_noise is not None:
                pieces.append((self.noise_at, _full1(g_noise, z)))
            df = r * inv_var
        else:
            ll, df, _ = self._likelihood_and_grad(z, f, d)
            u = -float(ll)
        for k in range(last, 0, -1):
            h = hs[k - 1]
            lay = layers[k]
            pieces.append((lay.start, torch.mm(h.T, df).view(-1)))
            pieces.append((lay.start + lay.fan_in * lay.out, df.sum(0)))
            w = ws[k - 1]
            dh = df * w.view(1, -1) if lay.out == 1 else torch.mm(df, w.T)
            df = (
                self.act_backward(dh, None, h)
                if self._needs_only_output
                else self.act_backward(dh, self._pre_activation(z, k - 1, hs), h)
            )
        pieces.append((layers[0].start, torch.mm(d.x_aug_t, df).view(-1)))
        hier_inv_var = []
        for lay in self.hier_layers:
            w = z[lay.start : lay.stop]
            terms = _hier_prior_terms(lay, float(torch.dot(w, w)), float(z[lay.hyper]))
            if terms is None:
                return z.new_tensor(math.inf), torch.zeros_like(z)
            u += terms[0]
            pieces.append((lay.hyper, _full1(terms[1], z)))
            hier_inv_var.append(terms[2])
        pieces.sort(key=lambda t: t[0])
        grad = torch.cat([p for _, p in pieces])
        if self.fixed_layers:
            gp = z * self.prec
            u += 0.5 * float(torch.dot(gp, z)) - self.prior_const
            grad.add_(gp)
        for lay, inv_var in zip(self.hier_layers, hier_inv_var, strict=True):
            grad[lay.start : lay.stop].add_(z[lay.start : lay.stop], alpha=inv_var)
        if not abs(u) <= torch.finfo(z.dtype).max:  # also catches NaN
            return z.new_tensor(math.inf), torch.zeros_like(z)
        return torch.scalar_tensor(u, dtype=z.dtype, device=z.device), grad

    def _pre_activation(self, z: torch.Tensor, k: int, hs: list[torch.Tensor]) -> torch.Tensor:
        """Recompute layer ``k``'s pre-activation (only for activations whose backward needs it)."""
        lay = self.layers[k]
        if k == 0:
            return torch.mm(self.full.x_aug, z[lay.start : lay.stop].view(lay.fan_in + 1, lay.out))
        mid = lay.start + lay.fan_in * lay.out
        return torch.addmm(
            z[mid : lay.stop], hs[k - 1], z[lay.start : mid].view(lay.fan_in, lay.out)
        )

    def _batched_potential_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = z.shape[:-1]
        grad = torch.empty_like(z)
        ws = self._weights(z)
        gws = [
            grad[..., lay.start : lay.stop].view(*batch, lay.fan_in + 1, lay.out)
            for lay in self.layers
        ]
        # forward, keeping pre-activations and augmented activations
        d = self.full
        hs = [d.x_aug]
        pre = []
        last = len(ws) - 1
        h = d.x_aug
        for k, w in enumerate(ws):
            a = torch.matmul(h, w)
            if k < last:
                buf = self._hidden_buffer(k, a.shape, a)
                hk = buf[..., :-1]
                torch.tanh(a, out=hk) if self.act is torch.tanh else hk.copy_(self.act(a))
                pre.append(a)
                hs.append(buf)
                h = buf
            else:
                f = a
        # likelihood: value and dU/df
        ll, df, noise_grad = self._likelihood_and_grad(z, f, d)
        # backward through the layers into the gradient buffer
        for k in range(last, -1, -1):
            hk = hs[k]
            if k == 0 and hk.dim() == 2:
                torch.matmul(d.x_aug_t, df, out=gws[0]) if not batch else gws[0].copy_(
                    torch.matmul(d.x_aug_t, df)
                )
            elif hk.dim() == df.dim() and not batch:
                torch.mm(hk.T, df, out=gws[k])
            else:
                gws[k].copy_(torch.matmul(hk.mT, df))
            if k > 0:
                dh = torch.matmul(df, ws[k][..., :-1, :].mT)
                df = self.act_backward(dh, pre[k - 1], hs[k][..., :-1])
        # prior
        gp = z * self.prec
        u = -ll - self.prior_const + 0.5 * (gp * z).sum(-1)
        grad.add_(gp)
        for lay in self.hier_layers:
            w = z[..., lay.start : lay.stop]
            uh = z[..., lay.hyper]
            n = lay.stop - lay.start
            log_scale = uh + math.log(lay.c)
            inv_var = torch.exp(-2.0 * log_scale)
            q = w.square().sum(-1)
            u = u + 0.5 * q * inv_var + n * (log_scale + _HALF_LOG_2PI)
            grad[..., lay.start : lay.stop].addcmul_(w, inv_var.unsqueeze(-1))
            hlp, hgrad = _hyper_log_prob_and_grad(lay.hyperprior, lay.hyperscale, uh)
            u = u - hlp - uh
            grad[..., lay.hyper] = n - q * inv_var - hgrad - 1.0
        if self.noise_at is not None:
            un = z[..., self.noise_at]
            ps = self.lik.noise_prior_scale
            s2 = torch.exp(2.0 * un) / ps**2
            u = u - (_LOG_2 - _HALF_LOG_2PI - math.log(ps)) + 0.5 * s2 - un
            grad[..., self.noise_at] = noise_grad + s2 - 1.0
        if not batch:
            if not math.isfinite(float(u)):
                return u.new_tensor(math.inf), torch.zeros_like(z)
        else:
            bad = ~torch.isfinite(u)
            if bool(bad.any()):
                u = u.masked_fill(bad, math.inf)
                grad[bad] = 0.0
        return u, grad

    def _likelihood_and_grad(self, z, f, d):
        """Log likelihood ``(*batch)``, ``dU/df`` (the negated gradient) and, for a learned
        Gaussian noise, ``dU/du`` of its log scale from the likelihood."""
        kind = self.kind
        if kind == "gaussian":
            r = f - d.y_col
            rss = r.square().flatten(-2).sum(-1)
            m = r.shape[-2] * r.shape[-1]
            if self.noise_at is None:
                s = self.lik.noise
                return -0.5 * rss / s**2 - m * (math.log(s) + _HALF_LOG_2PI), r / s**2, None
            un = z[..., self.noise_at]
            inv_var = torch.exp(-2.0 * un)
            ll = -0.5 * rss * inv_var - m * (un + _HALF_LOG_2PI)
            df = r * inv_var.reshape(*inv_var.shape, 1, 1)
            return ll, df, m - rss * inv_var
        if kind == "heteroscedastic":
            t = f.shape[-1] // 2
            loc, raw = f[..., :t], f[..., t:]
            s = F.softplus(raw) + self.lik.min_scale
            r = d.y_col - loc
            zr = r / s
            ll = (-0.5 * zr.square() - torch.log(s) - _HALF_LOG_2PI).flatten(-2).sum(-1)
            d_loc = -zr / s
            d_s = (1.0 - zr.square()) / s
            return ll, torch.cat([d_loc, d_s * torch.sigmoid(raw)], -1), None
        if kind == "categorical":
            logp = torch.log_softmax(f, -1)
            ll = (logp * d.y_onehot).flatten(-2).sum(-1)
            return ll, torch.exp(logp) - d.y_onehot, None
        g = f[..., 0]
        ll = (d.y * g - F.softplus(g)).sum(-1)
        return ll, (torch.sigmoid(g) - d.y).unsqueeze(-1), None


def _gaussian_noise_terms(lik, rss: float, m: int, un: float | None):
    """Potential of a Gaussian likelihood from its residual sum of squares ``rss`` over ``m``
    values: ``(U, 1/sigma^2, dU/d un)``. ``un`` is the unconstrained log noise scale of a
    learned noise (its HalfNormal prior and log-Jacobian included), ``None`` for a fixed noise
    (then the gradient entry is ``None``). Returns ``None`` when ``exp`` overflows."""
    if un is None:
        s = lik.noise
        inv_var = 1.0 / s**2
        return 0.5 * rss * inv_var + m * (math.log(s) + _HALF_LOG_2PI), inv_var, None
    ps = lik.noise_prior_scale
    try:
        inv_var = math.exp(-2.0 * un)
        s2 = math.exp(2.0 * un) / ps**2
    except OverflowError:
        return None
    u = (
        0.5 * rss * inv_var
        + m * (un + _HALF_LOG_2PI)
        - (_LOG_2 - _HALF_LOG_2PI - math.log(ps))
        + 0.5 * s2
        - un
    )
    return u, inv_var, m - rss * inv_var + s2 - 1.0


def _hier_prior_terms(lay: _Layer, q: float, uh: float) -> tuple[float, float, float] | None:
    """A hierarchical layer's prior in the potential, from ``q = |w|^2`` and the unconstrained
    log scale ``uh``: ``(its share of U, dU/d uh, 1/scale^2)`` (``dU/dw = w / scale^2``),
    hyperprior and log-Jacobian included; ``None`` when ``exp`` overflows."""
    n = lay.stop - lay.start
    log_scale = uh + math.log(lay.c)
    try:
        inv_var = math.exp(-2.0 * log_scale)
        hlp, hgrad = _hyper_log_prob_and_grad_float(lay.hyperprior, lay.hyperscale, uh)
    except OverflowError:
        return None
    u = 0.5 * q * inv_var + n * (log_scale + _HALF_LOG_2PI) - hlp - uh
    return u, n - q * inv_var - hgrad - 1.0, inv_var


def _is_exp(t) -> bool:
    """``t`` maps ``u`` to ``exp(u)`` (possibly followed by ``+ 0``, as ``biject_to`` builds for
    ``nonnegative`` supports)."""
    if isinstance(t, ExpTransform):
        return True
    if isinstance(t, ComposeTransform) and t.parts and isinstance(t.parts[0], ExpTransform):
        rest = t.parts[1:]
        return all(
            isinstance(r, AffineTransform) and _is_number(r.loc, 0.0) and _is_number(r.scale, 1.0)
            for r in rest
        )
    return False


def _is_number(v, target: float) -> bool:
    try:
        return bool(torch.all(torch.as_tensor(v) == target))
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _full1(v: float, like: torch.Tensor) -> torch.Tensor:
    """``[v]`` in ``like``'s dtype; a value beyond the dtype's range becomes ``inf``."""
    if abs(v) > torch.finfo(like.dtype).max:
        v = math.copysign(math.inf, v)
    return torch.full((1,), v, dtype=like.dtype, device=like.device)


def _with_ones(h: torch.Tensor) -> torch.Tensor:
    return torch.cat([h, h.new_ones(*h.shape[:-1], 1)], -1)


def _hyper_log_prob(kind: str, hs: float, u: torch.Tensor) -> torch.Tensor:
    """Log density of the hyperprior at ``s = exp(u)`` (without the Jacobian)."""
    if kind == "half_normal":
        return _LOG_2 - _HALF_LOG_2PI - math.log(hs) - 0.5 * torch.exp(2.0 * u) / hs**2
    if kind == "half_cauchy":
        return _LOG_2 - math.log(math.pi) - math.log(hs) - torch.log1p(torch.exp(2.0 * u) / hs**2)
    if kind == "log_normal":
        return -u - math.log(hs) - _HALF_LOG_2PI - 0.5 * (u / hs) ** 2
    raise _Unsupported(kind)


def _hyper_log_prob_and_grad(kind: str, hs: float, u, exp=torch.exp, log1p=torch.log1p):
    """Hyperprior log density at ``exp(u)`` and its derivative in ``u`` (tensors; with
    ``math.exp``/``math.log1p`` floats, see :func:`_hyper_log_prob_and_grad_float`)."""
    if kind == "half_normal":
        s2 = exp(2.0 * u) / hs**2
        return _LOG_2 - _HALF_LOG_2PI - math.log(hs) - 0.5 * s2, -s2
    if kind == "half_cauchy":
        s2 = exp(2.0 * u) / hs**2
        return _LOG_2 - math.log(math.pi) - math.log(hs) - log1p(s2), -2.0 * s2 / (1.0 + s2)
    if kind == "log_normal":
        return -u - math.log(hs) - _HALF_LOG_2PI - 0.5 * (u / hs) ** 2, -1.0 - u / hs**2
    raise _Unsupported(kind)


def _hyper_log_prob_and_grad_float(kind: str, hs: float, u: float) -> tuple[float, float]:
    """:func:`_hyper_log_prob_and_grad` on a Python float (``math.exp`` raises
    ``OverflowError`` far out, which callers turn into an invalid point)."""
    return _hyper_log_prob_and_grad(kind, hs, u, math.exp, math.log1p)
