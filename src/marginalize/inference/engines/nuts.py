"""Pure-PyTorch No-U-Turn sampler and static HMC over a flat parameter vector.

This module implements, from the published algorithms,

* the multinomial No-U-Turn sampler (Hoffman & Gelman 2014, with the
  multinomial trajectory sampling and generalised no-U-turn criterion of
  Betancourt 2017): biased progressive sampling between the old tree and a new
  subtree, uniform (multinomial) sampling inside a subtree, the U-turn
  criterion written with the momentum sum ``rho`` and the velocities
  ``M^{-1} p`` at the ends, plus the two extra checks across every merge
  boundary that Stan performs; a leaf whose energy error exceeds 1000 is a
  divergence and stops the trajectory;
* static (fixed-length) HMC with a Metropolis correction;
* Stan-style warmup: dual averaging of the log step size and windowed
  estimation of a diagonal or dense inverse mass matrix.

Everything works on a flat ``(D,)`` tensor of any floating dtype on any device;
the only coupling to the model is a ``potential_and_grad`` callable returning
``U(z) = -log density`` and its gradient.  Each leapfrog step costs exactly one
call of that callable: the gradient at the current point is carried over from
the step (or transition) that produced it.

All randomness comes from the ``torch.Generator`` passed in.  Its state is part
of :class:`NUTSState`, so a run can be stopped after any iteration and resumed
to give bitwise the same draws as an uninterrupted run (given a deterministic
potential).

Warmup schedule
---------------
Iterations ``0 .. num_warmup - 1`` are warmup, ``num_warmup .. num_warmup +
num_samples - 1`` are sampling; the schedule is *absolute*, so a resumed call
uses the same two numbers and starts at ``state.iteration``.

* Step size: dual averaging (gamma=0.05, t0=10, kappa=0.75,
  ``mu = log(10 * eps0)``) towards ``target_accept`` over all warmup
  iterations, restarted after every mass-matrix update.  At the end of warmup
  the step size is fixed to ``exp(log_step_size_avg)``.
* Mass matrix: an initial fast buffer of 75 iterations, slow windows of 25, 50,
  100, ... iterations (a window is extended to the start of the terminal buffer
  when the next, doubled window would not fit before it), a terminal buffer of
  50 iterations.  When ``75 + 25 + 50 > num_warmup`` the three are shrunk in
  Stan's proportions (15 % / 75 % / 10 % of ``num_warmup``); with fewer than 20
  warmup iterations only the step size is adapted.  At the end of every window
  the inverse mass becomes the regularised estimate
  ``n/(n+5) * var + 1e-3 * 5/(n+5)`` (dense: ``n/(n+5) * cov + 1e-3 * 5/(n+5) * I``),
  the step size is searched afresh (Hoffman & Gelman 2014, alg. 4) and dual
  averaging restarts.  (Stan differs only in never extending the first
  window.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from marginalize.errors import warn

__all__ = ["NUTSState", "SamplingInterrupted", "run_sampler"]

logger = logging.getLogger(__name__)

PotentialAndGrad = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: energy error beyond which a leapfrog step counts as divergent
MAX_DELTA_ENERGY = 1000.0
#: dual-averaging constants (Hoffman & Gelman 2014, sec. 3.2)
DA_GAMMA = 0.05
DA_T0 = 10.0
DA_KAPPA = 0.75
#: Stan's default warmup windows
INIT_BUFFER = 75
TERM_BUFFER = 50
BASE_WINDOW = 25
#: below this many warmup iterations the mass matrix is not adapted
MIN_WARMUP_FOR_MASS = 20
#: default trajectory length of static HMC (a quarter period of a unit Gaussian)
DEFAULT_TRAJECTORY_LENGTH = 0.5 * math.pi

_UNIFORM_CHUNK = 64
_STATE_FORMAT = 1
_NEG_INF = float("-inf")
_INF = float("inf")


# --------------------------------------------------------------------------- #
# public containers
# --------------------------------------------------------------------------- #
@dataclass
class NUTSState:
    """Everything needed to resume sampling exactly.

    Attributes
    ----------
    z : torch.Tensor
        ``(D,)`` current position (unconstrained).
    step_size : float
        Step size the next iteration will use.
    inverse_mass : torch.Tensor
        ``(D,)`` diagonal inverse mass matrix, or ``(D, D)`` when dense.
    iteration : int
        Iterations done so far (warmup + sampling).
    adapt : dict
        Dual-averaging and mass-adaptation accumulators (plain tensors, floats,
        ints and strings only).
    rng_state : torch.Tensor or None
        ``generator.get_state()`` (a ``uint8`` tensor) after ``iteration``
        iterations; restored into the generator on resume when not ``None``.

    Notes
    -----
    Tensors are shared with the sampler, never modified in place after the
    state was made; copy them if you intend to mutate them.
    """

    z: torch.Tensor
    step_size: float
    inverse_mass: torch.Tensor
    iteration: int
    adapt: dict = field(default_factory=dict)
    rng_state: torch.Tensor | None = None

    def state_dict(self) -> dict:
        """Return a dict of tensors/floats/ints/strings/dicts.

        Returns
        -------
        dict
            Safe for ``torch.save`` and ``torch.load(..., weights_only=True)``.
        """
        return {
            "format": _STATE_FORMAT,
            "z": self.z,
            "step_size": float(self.step_size),
            "inverse_mass": self.inverse_mass,
            "iteration": int(self.iteration),
            "adapt": dict(self.adapt),
            "rng_state": self.rng_state,
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> NUTSState:
        """Rebuild a state from :meth:`state_dict` output.

        Parameters
        ----------
        d : dict
            As returned by :meth:`state_dict` (possibly after a save/load).

        Returns
        -------
        NUTSState
        """
        fmt = int(d.get("format", _STATE_FORMAT))
        if fmt != _STATE_FORMAT:
            raise ValueError(f"unsupported NUTSState format {fmt}")
        return cls(
            z=d["z"],
            step_size=float(d["step_size"]),
            inverse_mass=d["inverse_mass"],
            iteration=int(d["iteration"]),
            adapt=dict(d.get("adapt") or {}),
            rng_state=d.get("rng_state"),
        )


class SamplingInterrupted(Exception):
    """Raised by :func:`run_sampler` when it is interrupted (``KeyboardInterrupt``).

    Attributes
    ----------
    state : NUTSState
        State after the last completed iteration; pass it back as ``state=`` to
        continue exactly where the run stopped.
    draws : torch.Tensor
        ``(n, D)`` draws kept by the interrupted call so far.
    stats : dict of str to torch.Tensor
        Per-draw statistics of those draws, each of shape ``(n,)``.
    """

    def __init__(
        self,
        state: NUTSState,
        draws: torch.Tensor,
        stats: dict[str, torch.Tensor],
        message: str = "sampling interrupted",
    ) -> None:
        super().__init__(message)
        self.state = state
        self.draws = draws
        self.stats = stats

    def __reduce__(self):  # keep the exception picklable
        return (type(self), (self.state, self.draws, self.stats, str(self)))


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == _NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


def _mass_windows(num_warmup: int) -> list[tuple[int, int]]:
    """Slow adaptation windows ``[start, end)`` for a warmup of ``num_warmup``."""
    if num_warmup < MIN_WARMUP_FOR_MASS:
        return []
    init, term, base = INIT_BUFFER, TERM_BUFFER, BASE_WINDOW
    if init + base + term > num_warmup:
        init = int(0.15 * num_warmup)
        term = int(0.1 * num_warmup)
        base = num_warmup - (init + term)
    end = num_warmup - term
    windows: list[tuple[int, int]] = []
    start, width = init, base
    while start < end:
        stop = start + width
        if stop + 2 * width > end:  # the next (doubled) window would not fit
            stop = end
        windows.append((start, stop))
        start, width = stop, 2 * width
    return windows


def _new_adapt(num_warmup: int, step_size: float, inverse_mass: torch.Tensor) -> dict:
    return {
        "num_warmup": int(num_warmup),
        "mu": math.log(10.0 * step_size),
        "log_step_size_avg": 0.0,
        "s_bar": 0.0,
        "counter": 0,
        "mass_n": 0,
        "mass_mean": torch.zeros(
            inverse_mass.shape[0], dtype=inverse_mass.dtype, device=inverse_mass.device
        ),
        "mass_m2": torch.zeros_like(inverse_mass),
    }


# --------------------------------------------------------------------------- #
# the transition kernels
# --------------------------------------------------------------------------- #
class _Kernel:
    """Leapfrog integrator, NUTS and HMC transitions for a fixed metric."""

    def __init__(
        self,
        potential_and_grad: PotentialAndGrad,
        inverse_mass: torch.Tensor,
        generator: torch.Generator,
        max_tree_depth: int,
    ) -> None:
        self.pg = potential_and_grad
        self.gen = generator
        self.max_depth = max_tree_depth
        self._ubuf: list[float] = []
        self._upos = 0
        self.n_leapfrog = 0
        self.sum_accept = 0.0
        self.divergent = False
        self.set_inverse_mass(inverse_mass)

    # -- metric ------------------------------------------------------------ #
    def set_inverse_mass(self, inverse_mass: torch.Tensor) -> None:
        """Install a new metric; raises (leaving the old one) if it is not positive definite."""
        if inverse_mass.ndim == 2:
            chol = torch.linalg.cholesky(inverse_mass)  # M^{-1} = L L^T
            eye = torch.eye(
                inverse_mass.shape[0], dtype=inverse_mass.dtype, device=inverse_mass.device
            )
            # p = L^{-T} e has covariance (L L^T)^{-1} = M
            mom = torch.linalg.solve_triangular(chol.mT, eye, upper=True)
        else:
            if not bool((inverse_mass > 0).all() & torch.isfinite(inverse_mass).all()):
                raise ValueError("diagonal inverse mass must be positive and finite")
            mom = inverse_mass.rsqrt()
        #: the metric as a tensor (what the state stores); ``minv`` is it in the kernel's
        #: own array type
        self.inverse_mass = inverse_mass
        self.minv = self.native(inverse_mass)
        self._mom = self.native(mom)
        self.dense = inverse_mass.ndim == 2
        self.dim = inverse_mass.shape[0]
        self.dtype = inverse_mass.dtype
        self.device = inverse_mass.device

    # -- array primitives (torch here; NumPy in _NumpyKernel) ---------------- #
    @staticmethod
    def native(t: torch.Tensor):
        """A tensor as the kernel's array type."""
        return t

    @staticmethod
    def tensor(a) -> torch.Tensor:
        """A kernel array as a tensor (shares memory where it can)."""
        return a

    @staticmethod
    def _axpy(y, x, a: float):
        """``y + a * x``."""
        return torch.add(y, x, alpha=a)

    @staticmethod
    def _dot(a, b) -> float:
        return float(torch.dot(a, b))

    @staticmethod
    def _mv(m, x):
        return torch.mv(m, x)

    @staticmethod
    def _gram(rows, cols) -> list[list[float]]:
        """``stack(rows) @ stack(cols).T`` as nested lists."""
        return torch.mm(torch.stack(rows), torch.stack(cols).mT).tolist()

    def velocity(self, p):
        return self._mv(self.minv, p) if self.dense else self.minv * p

    def sample_momentum(self):
        e = self.native(
            torch.randn(self.dim, generator=self.gen, dtype=self.dtype, device=self.device)
        )
        return self._mv(self._mom, e) if self.dense else e * self._mom

    # -- randomness ---------------------------------------------------------- #
    def new_iteration(self) -> None:
        """Forget buffered uniforms so each iteration starts from the generator."""
        self._ubuf = []
        self._upos = 0

    def uniform(self) -> float:
        pos = self._upos
        if pos >= len(self._ubuf):
            self._ubuf = torch.rand(
                _UNIFORM_CHUNK, generator=self.gen, dtype=torch.float64, device=self.device
            ).tolist()
            pos = 0
        self._upos = pos + 1
        return self._ubuf[pos]

    # -- integrator ---------------------------------------------------------- #
    def _drift(self, z, p, eps: float):
        """``z + eps * M^{-1} p``."""
        if self.dense:
            return torch.addmv(z, self.minv, p, alpha=eps)
        return torch.addcmul(z, self.minv, p, value=eps)

    def potential(self, z):
        u, g = self.pg(z)
        if g.requires_grad:
            g = g.detach()
        return float(u), g

    def find_step_size(self, z, u0: float, g0, eps: float) -> float:
        """Heuristic initial step size (Hoffman & Gelman 2014, algorithm 4).

        Doubles (halves) ``eps`` while one leapfrog step from ``z`` with a fixed
        momentum has a Metropolis ratio above (below) 1/2.
        """
        p0 = self.sample_momentum()
        h0 = u0 + 0.5 * self._dot(p0, self.velocity(p0))

        def log_ratio(e: float) -> float:
            p = self._axpy(p0, g0, -0.5 * e)
            z1 = self._drift(z, p, e)
            u1, g1 = self.potential(z1)
            p = self._axpy(p, g1, -0.5 * e)
            h1 = u1 + 0.5 * self._dot(p, self.velocity(p))
            d = h0 - h1
            return _NEG_INF if math.isnan(d) else d

        lr = log_ratio(eps)
        direction = 1 if lr > -math.log(2.0) else -1
        for _ in range(100):
            if not direction * lr > -direction * math.log(2.0):
                break
            new = eps * 2.0 if direction == 1 else eps * 0.5
            if not (1e-12 < new < 1e7):
                logger.warning("step-size search stopped at the bound %g", eps)
                break
            eps = new
            lr = log_ratio(eps)
        else:
            logger.warning("step-size search did not converge; using %g", eps)
        return eps

    # -- NUTS ---------------------------------------------------------------- #
    # In the tree, ``g`` is the gradient for a diagonal metric and the pair
    # ``(gradient, M^{-1} gradient)`` for a dense one: carrying the
    # preconditioned force lets a dense leapfrog step use one matrix-vector
    # product instead of two.
    def _leaf(self, z, p, v, g, eps: float):
        """One leapfrog step: ``(z, p, v, g, U, kinetic energy)`` at the new point."""
        half = -0.5 * eps
        axpy = self._axpy
        if self.dense:
            gr, w = g
            p = axpy(p, gr, half)
            v = axpy(v, w, half)
            z = axpy(z, v, eps)
            u, gr = self.potential(z)
            w = self._mv(self.minv, gr)
            p = axpy(p, gr, half)
            v = axpy(v, w, half)
            return z, p, v, (gr, w), u, 0.5 * self._dot(p, v)
        p = axpy(p, g, half)
        z = self._drift(z, p, eps)
        u, g = self.potential(z)
        p = axpy(p, g, half)
        v = self.minv * p
        return z, p, v, g, u, 0.5 * self._dot(p, v)

    def _no_uturn(self, va_beg, pa_end, va_end, rho_a, pb_beg, vb_beg, vb_end, rho_b) -> bool:
        """Generalised no-U-turn checks for merging tree ``a`` with the later tree ``b``.

        Checks the merged tree (momentum sum ``rho_a + rho_b``) and, as Stan
        does, ``a`` extended by the first point of ``b`` and ``b`` extended by
        the last point of ``a``.  All the dot products come from one 4x4
        Gram matrix.
        """
        g0, g1, g2, g3 = self._gram(
            (va_beg, vb_end, vb_beg, va_end), (rho_a, rho_b, pb_beg, pa_end)
        )
        return (
            g0[0] + g0[1] > 0.0
            and g1[0] + g1[1] > 0.0  # merged tree
            and g0[0] + g0[2] > 0.0
            and g2[0] + g2[2] > 0.0  # a + first of b
            and g3[1] + g3[3] > 0.0
            and g1[1] + g1[3] > 0.0
        )  # last of a + b

    def _build(self, z, p, v, g, depth: int, eps: float, h0: float):
        """Build a subtree of ``2**depth`` leapfrog steps outward from ``(z, p)``.

        Returns ``None`` when the subtree diverged or contains a U-turn, otherwise
        ``(z_end, p_end, v_end, g_end, p_beg, v_beg, rho, log_weight, sample)``
        with ``sample = (z, U, g, H)`` drawn multinomially inside the subtree
        (``v`` are velocities ``M^{-1} p``, ``rho`` the momentum sum).
        """
        if depth == 0:
            z, p, v, g, u, kin = self._leaf(z, p, v, g, eps)
            h = u + kin
            self.n_leapfrog += 1
            if h != h:  # NaN
                h = _INF
            d = h0 - h
            self.sum_accept += 1.0 if d > 0.0 else math.exp(d)
            if -d > MAX_DELTA_ENERGY:
                self.divergent = True
                return None
            return (z, p, v, g, p, v, p, d, (z, u, g, h))

        left = self._build(z, p, v, g, depth - 1, eps, h0)
        if left is None:
            return None
        z1, p1, v1, g1, pb1, vb1, rho1, lw1, s1 = left
        right = self._build(z1, p1, v1, g1, depth - 1, eps, h0)
        if right is None:
            return None
        z2, p2, v2, g2, pb2, vb2, rho2, lw2, s2 = right

        lw = _logaddexp(lw1, lw2)
        sample = s2 if (lw2 > lw or self.uniform() < math.exp(lw2 - lw)) else s1
        rho = rho1 + rho2
        if depth == 1:  # two single leaves: the boundary checks equal the plain one
            if not (self._dot(vb1, rho) > 0.0 and self._dot(v2, rho) > 0.0):
                return None
        elif not self._no_uturn(vb1, p1, v1, rho1, pb2, vb2, v2, rho2):
            return None
        return (z2, p2, v2, g2, pb1, vb1, rho, lw, sample)

    def nuts(self, z0, u0: float, g0, eps: float):
        """One multinomial NUTS transition.

        Returns ``(z, U, g, H, tree_depth, accept_stat, n_leapfrog, diverging)``.
        """
        self.new_iteration()
        self.n_leapfrog = 0
        self.sum_accept = 0.0
        self.divergent = False

        p0 = self.sample_momentum()
        v0 = self.velocity(p0)
        h0 = u0 + 0.5 * self._dot(p0, v0)
        if self.dense:
            g0 = (g0, self._mv(self.minv, g0))
        # backward (b) and forward (f) edges of the tree
        zb = zf = z0
        pb = pf = p0
        vb = vf = v0
        gb = gf = g0
        rho = p0
        log_w = 0.0
        sample = (z0, u0, g0, h0)
        depth = 0
        while depth < self.max_depth:
            forward = self.uniform() > 0.5
            if forward:
                sub = self._build(zf, pf, vf, gf, depth, eps, h0)
            else:
                sub = self._build(zb, pb, vb, gb, depth, -eps, h0)
            if sub is None:
                break
            z_e, p_e, v_e, g_e, p_s, v_s, rho_sub, lw_sub, s_sub = sub
            depth += 1

            # biased progressive sampling between the old tree and the new subtree
            if lw_sub > log_w or self.uniform() < math.exp(lw_sub - log_w):
                sample = s_sub
            log_w = _logaddexp(log_w, lw_sub)

            if forward:  # time order: old tree, then subtree (built from p_s to p_e)
                a = (vb, pf, vf, rho)
                b = (p_s, v_s, v_e, rho_sub)
                zf, pf, vf, gf = z_e, p_e, v_e, g_e
            else:  # time order: subtree (p_e is its earliest point), then old tree
                a = (v_e, p_s, v_s, rho_sub)
                b = (pb, vb, vf, rho)
                zb, pb, vb, gb = z_e, p_e, v_e, g_e
            rho = rho + rho_sub
            if depth == 1:
                if not (self._dot(vb, rho) > 0.0 and self._dot(vf, rho) > 0.0):
                    break
            elif not self._no_uturn(*a, *b):
                break

        z, u, g, h = sample
        if self.dense:
            g = g[0]
        return z, u, g, h, depth, self.sum_accept / self.n_leapfrog, self.n_leapfrog, self.divergent

    # -- static HMC ---------------------------------------------------------- #
    def hmc(self, z0, u0: float, g0, eps: float, n_steps: int):
        """One static-HMC transition of ``n_steps`` leapfrog steps.

        Returns ``(z, U, g, H, 0, accept_prob, n_leapfrog, diverging)``.
        """
        self.new_iteration()
        p0 = self.sample_momentum()
        v0 = self.velocity(p0)
        h0 = u0 + 0.5 * self._dot(p0, v0)
        z, p, v, u = z0, p0, v0, u0
        done = 0
        finite = True
        if self.dense:
            g = (g0, self._mv(self.minv, g0))
            for _ in range(n_steps):
                z, p, v, g, u, _ = self._leaf(z, p, v, g, eps)
                done += 1
                if not math.isfinite(u):
                    finite = False
                    break
        else:  # the velocity is only needed at the end
            axpy, drift, potential, half, g = (
                self._axpy,
                self._drift,
                self.potential,
                -0.5 * eps,
                g0,
            )
            for _ in range(n_steps):
                p = axpy(p, g, half)
                z = drift(z, p, eps)
                u, g = potential(z)
                p = axpy(p, g, half)
                done += 1
                if not math.isfinite(u):
                    finite = False
                    break
            v = self.minv * p
        h = u + 0.5 * self._dot(p, v) if finite else _INF
        if h != h:
            h = _INF
        d = h0 - h
        diverging = -d > MAX_DELTA_ENERGY
        accept = 1.0 if d > 0.0 else math.exp(d)
        if self.uniform() < accept:
            return z, u, (g[0] if self.dense else g), h, 0, accept, done, diverging
        return z0, u0, g0, h0, 0, accept, done, diverging


class _NumpyKernel(_Kernel):
    """:class:`_Kernel` with NumPy arrays, for CPU runs whose potential has a NumPy version.

    A leapfrog step of a small network is a handful of operations on vectors of a few
    hundred numbers, where a torch operation's dispatch (several microseconds) costs more
    than its arithmetic; NumPy's is a fraction of that. The algorithm is the shared one: only
    the array primitives differ, and the random numbers still come from the torch generator
    (so states, resuming and seeds behave as on the torch path). Floating-point warnings far
    out in a tail (float32 overflow) are silenced: such a point has ``U = inf``.
    """

    def __init__(self, potential_and_grad, inverse_mass, generator, max_tree_depth) -> None:
        self._scaled: tuple[float, np.ndarray | None] = (math.nan, None)
        super().__init__(potential_and_grad, inverse_mass, generator, max_tree_depth)

    def set_inverse_mass(self, inverse_mass: torch.Tensor) -> None:
        super().set_inverse_mass(inverse_mass.detach().cpu())
        self._scaled = (math.nan, None)

    @staticmethod
    def native(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    @staticmethod
    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a)

    @staticmethod
    def _axpy(y, x, a: float):
        t = x * a
        t += y
        return t

    @staticmethod
    def _dot(a, b) -> float:
        return float(a @ b)

    @staticmethod
    def _mv(m, x):
        return m @ x

    @staticmethod
    def _gram(rows, cols) -> list[list[float]]:
        n = len(rows)  # one concatenate (a C call; np.stack costs three times as much here)
        a = np.concatenate((*rows, *cols)).reshape(2 * n, -1)
        return (a[:n] @ a[n:].T).tolist()

    def _drift(self, z, p, eps: float):
        if self.dense:
            t = self.minv @ p
            t *= eps
        else:  # eps * M^{-1} is kept for the (two) step sizes of the current transition
            e, scaled = self._scaled
            if e != eps:
                scaled = self.minv * eps
                self._scaled = (eps, scaled)
            t = scaled * p
        t += z
        return t

    def potential(self, z):
        return self.pg(z)

    def _leaf(self, z, p, v, g, eps: float):
        if self.dense:
            return super()._leaf(z, p, v, g, eps)
        # the diagonal step with the primitives inlined: it runs a million times per fit
        e, scaled = self._scaled
        if e != eps:
            scaled = self.minv * eps
            self._scaled = (eps, scaled)
        half = -0.5 * eps
        ph = g * half  # the momentum after the first half step
        ph += p
        z1 = scaled * ph
        z1 += z
        u, g = self.pg(z1)
        p = g * half
        p += ph
        v = self.minv * p
        return z1, p, v, g, u, 0.5 * float(p @ v)

    def _build(self, z, p, v, g, depth: int, eps: float, h0: float):
        """:meth:`_Kernel._build` with its two most frequent cases written out for a diagonal
        metric: a single leaf, and a subtree of two leaves (half of all merges). The
        arithmetic, the random numbers drawn and their order are those of the general
        recursion, so the draws are the same."""
        if self.dense or depth > 1:
            return super()._build(z, p, v, g, depth, eps, h0)
        e, scaled = self._scaled
        if e != eps:
            scaled = self.minv * eps
            self._scaled = (eps, scaled)
        half = -0.5 * eps
        minv, pg = self.minv, self.pg
        # first leaf
        ph = g * half
        ph += p
        z1 = scaled * ph
        z1 += z
        u1, g1 = pg(z1)
        p1 = g1 * half
        p1 += ph
        v1 = minv * p1
        h1 = u1 + 0.5 * float(p1 @ v1)
        self.n_leapfrog += 1
        if h1 != h1:  # NaN
            h1 = _INF
        d1 = h0 - h1
        self.sum_accept += 1.0 if d1 > 0.0 else math.exp(d1)
        if -d1 > MAX_DELTA_ENERGY:
            self.divergent = True
            return None
        if depth == 0:
            return (z1, p1, v1, g1, p1, v1, p1, d1, (z1, u1, g1, h1))
        # second leaf
        ph = g1 * half
        ph += p1
        z2 = scaled * ph
        z2 += z1
        u2, g2 = pg(z2)
        p2 = g2 * half
        p2 += ph
        v2 = minv * p2
        h2 = u2 + 0.5 * float(p2 @ v2)
        self.n_leapfrog += 1
        if h2 != h2:
            h2 = _INF
        d2 = h0 - h2
        self.sum_accept += 1.0 if d2 > 0.0 else math.exp(d2)
        if -d2 > MAX_DELTA_ENERGY:
            self.divergent = True
            return None
        lw = _logaddexp(d1, d2)
        if d2 > lw or self.uniform() < math.exp(d2 - lw):
            sample = (z2, u2, g2, h2)
        else:
            sample = (z1, u1, g1, h1)
        rho = p1 + p2
        if not (float(v1 @ rho) > 0.0 and float(v2 @ rho) > 0.0):
            return None
        return (z2, p2, v2, g2, p1, v1, rho, lw, sample)

    def find_step_size(self, z, u0, g0, eps):
        with np.errstate(all="ignore"):
            return super().find_step_size(z, u0, g0, eps)

    def nuts(self, z0, u0, g0, eps):
        with np.errstate(all="ignore"):
            return super().nuts(z0, u0, g0, eps)

    def hmc(self, z0, u0, g0, eps, n_steps):
        with np.errstate(all="ignore"):
            return super().hmc(z0, u0, g0, eps, n_steps)


# --------------------------------------------------------------------------- #
# driver
# --------------------------------------------------------------------------- #
_STAT_DTYPES = {
    "lp": torch.float64,
    "diverging": torch.bool,
    "acceptance_rate": torch.float64,
    "step_size": torch.float64,
    "tree_depth": torch.int64,
    "n_steps": torch.int64,
    "energy": torch.float64,
}


def _stats_to_tensors(lists: dict[str, list], n: int) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v[:n], dtype=_STAT_DTYPES[k]) for k, v in lists.items()}


def run_sampler(
    potential_and_grad: PotentialAndGrad,
    z0: torch.Tensor,
    *,
    num_warmup: int,
    num_samples: int,
    generator: torch.Generator,
    algorithm: str = "nuts",
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    num_steps: int | None = None,
    trajectory_length: float | None = None,
    step_size: float | None = None,
    adapt_step_size: bool = True,
    adapt_mass: str | None = "diag",
    state: NUTSState | None = None,
    callback: Callable[[int, NUTSState, dict[str, Any] | None], Any] | None = None,
    numpy_potential_and_grad: Callable[[np.ndarray], tuple[float, np.ndarray]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], NUTSState]:
    """Run NUTS or static HMC with Stan-style warmup on a flat vector.

    Parameters
    ----------
    potential_and_grad : callable
        ``z (D,) -> (U, dU/dz)`` with ``U = -log density`` (scalar tensor or
        float) and a ``(D,)`` gradient tensor.  Called exactly once per leapfrog
        step, plus once at the start of every call and once per step-size search
        trial during warmup.
    z0 : torch.Tensor
        ``(D,)`` initial position.  Its dtype and device are used for all
        computations (also when resuming from ``state``).
    num_warmup, num_samples : int
        Absolute iteration schedule: iterations ``[0, num_warmup)`` are warmup,
        ``[num_warmup, num_warmup + num_samples)`` are kept.  When resuming,
        pass the same numbers; the call continues at ``state.iteration`` (raise
        ``num_samples`` to draw more after a finished run).
    generator : torch.Generator
        Source of all randomness; must live on ``z0``'s device type.  When
        ``state`` carries a generator state it is restored into this generator.
    algorithm : {"nuts", "hmc"}
    target_accept : float
        Dual-averaging target for the mean Metropolis acceptance.
    max_tree_depth : int
        NUTS: at most ``2**max_tree_depth - 1`` leapfrog steps per iteration.
        HMC: caps the number of steps at ``2**max_tree_depth``.
    num_steps : int, optional
        HMC only: fixed number of leapfrog steps per iteration.
    trajectory_length : float, optional
        HMC only, when ``num_steps`` is None: ``n = ceil(trajectory_length /
        step_size)`` steps (at least 1, at most ``2**max_tree_depth``).  Defaults
        to ``pi / 2``, a quarter period of a Gaussian whose scales the metric
        matches (``2*pi``, Stan's and Pyro's default, is a full period there and
        brings such a trajectory back to its start).
    step_size : float, optional
        Initial step size; ``None`` searches one from 1.0 (Hoffman & Gelman
        2014, alg. 4).  Ignored when resuming.
    adapt_step_size : bool
        Dual averaging during warmup (and re-search after mass updates).
    adapt_mass : {"diag", "dense", None}
        Metric to adapt during warmup (None: identity diagonal, not adapted).
        When resuming, the metric kind is the state's.
    state : NUTSState, optional
        Resume from this state instead of ``z0``.
    callback : callable, optional
        ``callback(i, state, info)`` after every iteration ``i`` (0-based,
        absolute); ``state`` is the state after it and ``info`` is a dict of
        Python scalars with the keys of ``stats`` for kept iterations and
        ``None`` during warmup.  It may raise ``KeyboardInterrupt``.
    numpy_potential_and_grad : callable, optional
        The same potential on a ``(D,)`` NumPy array of ``z0``'s dtype, returning ``(U,
        gradient)`` as a float and an array.  When given and ``z0`` is a float32/float64 CPU
        tensor, the transitions run in NumPy (several times less overhead per leapfrog step
        on small models); ``potential_and_grad`` is then not called.  Draws, statistics
        and states are tensors either way.

    Returns
    -------
    draws : torch.Tensor
        ``(n, D)`` draws kept by this call (``n = num_samples`` for a fresh
        run), on ``z0``'s device.
    stats : dict of str to torch.Tensor
        CPU tensors of shape ``(n,)``: ``lp`` (float64, ``-U`` at the draw),
        ``diverging`` (bool), ``acceptance_rate`` (float64; NUTS: mean
        Metropolis acceptance over the tree, HMC: of the proposal),
        ``step_size`` (float64), ``tree_depth`` (int64; 0 for HMC), ``n_steps``
        (int64, leapfrog steps), ``energy`` (float64, Hamiltonian at the draw).
    final_state : NUTSState

    Raises
    ------
    SamplingInterrupted
        On ``KeyboardInterrupt`` (from the callback or the user) inside the
        iteration loop; carries the state after the last completed iteration
        and the draws/stats kept so far.
    ValueError
        On invalid arguments or a non-finite potential at the start.
    """
    if algorithm not in ("nuts", "hmc"):
        raise ValueError(f"algorithm must be 'nuts' or 'hmc', got {algorithm!r}")
    if adapt_mass not in ("diag", "dense", None):
        raise ValueError(f"adapt_mass must be 'diag', 'dense' or None, got {adapt_mass!r}")
    if num_warmup < 0 or num_samples < 0:
        raise ValueError("num_warmup and num_samples must be >= 0")
    if not 0.0 < target_accept < 1.0:
        raise ValueError("target_accept must lie in (0, 1)")
    if max_tree_depth < 1:
        raise ValueError("max_tree_depth must be >= 1")
    if num_steps is not None and num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if z0.ndim != 1 or not z0.is_floating_point():
        raise ValueError("z0 must be a 1-D floating-point tensor")
    device, dtype = z0.device, z0.dtype
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, z0 on {device}")

    total = num_warmup + num_samples
    dim = z0.shape[0]
    fresh = state is None
    if fresh:
        z = z0.detach().clone()
        inv_mass = (
            torch.eye(dim, dtype=dtype, device=device)
            if adapt_mass == "dense"
            else torch.ones(dim, dtype=dtype, device=device)
        )
        start = 0
        adapt: dict = {}
    else:
        if state.rng_state is not None:
            try:
                generator.set_state(state.rng_state)
            except RuntimeError as exc:
                raise ValueError("state.rng_state does not fit this generator") from exc
        z = state.z.detach().to(device=device, dtype=dtype)
        inv_mass = state.inverse_mass.detach().to(device=device, dtype=dtype)
        if z.shape != (dim,) or inv_mass.shape[0] != dim:
            raise ValueError("state does not match the dimension of z0")
        start = int(state.iteration)
        adapt = {
            k: (v.detach().to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v)
            for k, v in state.adapt.items()
        }
        if start < num_warmup:
            if adapt.get("num_warmup", num_warmup) != num_warmup:
                raise ValueError(
                    f"state was warmed up with num_warmup={adapt['num_warmup']}, "
                    f"cannot resume warmup with num_warmup={num_warmup}"
                )
            kind = "dense" if inv_mass.ndim == 2 else "diag"
            if adapt_mass is not None and adapt_mass != kind:
                raise ValueError(f"state has a {kind} metric, adapt_mass={adapt_mass!r}")

    use_numpy = (
        numpy_potential_and_grad is not None
        and device.type == "cpu"
        and dtype in (torch.float32, torch.float64)
    )
    try:
        if use_numpy:
            kernel = _NumpyKernel(numpy_potential_and_grad, inv_mass, generator, max_tree_depth)
        else:
            kernel = _Kernel(potential_and_grad, inv_mass, generator, max_tree_depth)
    except RuntimeError as exc:  # torch.linalg.LinAlgError
        raise ValueError("state.inverse_mass is not positive definite") from exc
    z = kernel.native(z)
    with np.errstate(all="ignore"):
        u, g = kernel.potential(z)
    if not math.isfinite(u):
        raise ValueError(f"initial point has non-finite potential ({u})")
    if tuple(g.shape) != (dim,):
        raise ValueError(f"gradient has shape {tuple(g.shape)}, expected {(dim,)}")
    if not bool(torch.isfinite(kernel.tensor(g)).all()):
        raise ValueError("initial point has non-finite gradient")

    if fresh:
        if step_size is None:
            eps = kernel.find_step_size(z, u, g, 1.0)
            logger.debug("initial step size %g", eps)
        else:
            eps = float(step_size)
    else:
        eps = float(state.step_size)
    if not eps > 0.0 or not math.isfinite(eps):
        raise ValueError(f"step size must be positive and finite, got {eps}")
    if not adapt:
        adapt = _new_adapt(num_warmup, eps, inv_mass)
    elif start >= num_warmup and adapt.get("num_warmup", 0) > start:
        # resumed mid-warmup with a shorter schedule: end the warmup now
        if adapt_step_size and adapt.get("counter", 0) > 0:
            eps = math.exp(adapt["log_step_size_avg"])
        warn(
            "warmup cut short at iteration %d (was planned for %d); step size %g",
            start,
            adapt["num_warmup"],
            eps,
        )
    adapt["num_warmup"] = int(num_warmup)

    use_hmc = algorithm == "hmc"
    traj_len = DEFAULT_TRAJECTORY_LENGTH if trajectory_length is None else float(trajectory_length)
    max_hmc_steps = 2**max_tree_depth
    adapt_metric = adapt_mass is not None and inv_mass.ndim == (2 if adapt_mass == "dense" else 1)
    windows = _mass_windows(num_warmup) if adapt_metric else []
    if adapt_metric and not windows and start < num_warmup:
        logger.info(
            "num_warmup=%d < %d: adapting the step size only", num_warmup, MIN_WARMUP_FOR_MASS
        )
    win_lo = windows[0][0] if windows else 0
    win_hi = windows[-1][1] if windows else 0
    win_ends = {stop - 1 for _, stop in windows}
    dense = inv_mass.ndim == 2

    first_kept = max(start, num_warmup)
    n_keep = max(0, total - first_kept)
    draws = torch.empty((n_keep, dim), dtype=dtype, device=device)
    stat_lists: dict[str, list] = {k: [] for k in _STAT_DTYPES}
    s_lp, s_div, s_acc = stat_lists["lp"], stat_lists["diverging"], stat_lists["acceptance_rate"]
    s_eps, s_depth, s_n, s_en = (
        stat_lists["step_size"],
        stat_lists["tree_depth"],
        stat_lists["n_steps"],
        stat_lists["energy"],
    )

    def snapshot(iteration: int) -> NUTSState:
        return NUTSState(
            z=kernel.tensor(z),
            step_size=eps,
            inverse_mass=kernel.inverse_mass,
            iteration=iteration,
            adapt=dict(adapt),
            rng_state=generator.get_state(),
        )

    commit = (snapshot(start), 0)  # (state, number of kept draws) — one atomic store
    k = 0
    try:
        for i in range(start, total):
            eps_i = eps
            if use_hmc:
                n_hmc = (
                    num_steps
                    if num_steps is not None
                    else max(1, min(max_hmc_steps, math.ceil(traj_len / eps_i)))
                )
                z, u, g, h, depth, acc, n_lf, div = kernel.hmc(z, u, g, eps_i, n_hmc)
            else:
                z, u, g, h, depth, acc, n_lf, div = kernel.nuts(z, u, g, eps_i)

            info = None
            if i < num_warmup:
                if adapt_step_size:
                    t = adapt["counter"] + 1
                    eta = 1.0 / (t + DA_T0)
                    s_bar = (1.0 - eta) * adapt["s_bar"] + eta * (target_accept - min(acc, 1.0))
                    x = adapt["mu"] - s_bar * math.sqrt(t) / DA_GAMMA
                    x = min(max(x, -700.0), 700.0)
                    w = t ** (-DA_KAPPA)
                    adapt["log_step_size_avg"] = (1.0 - w) * adapt["log_step_size_avg"] + w * x
                    adapt["s_bar"] = s_bar
                    adapt["counter"] = t
                    eps = math.exp(x)
                if win_lo <= i < win_hi:
                    n = adapt["mass_n"] + 1
                    zt = kernel.tensor(z)
                    delta = zt - adapt["mass_mean"]
                    mean = adapt["mass_mean"] + delta / n
                    if dense:
                        m2 = torch.addr(adapt["mass_m2"], delta, zt - mean)
                    else:
                        m2 = torch.addcmul(adapt["mass_m2"], delta, zt - mean)
                    adapt["mass_n"], adapt["mass_mean"], adapt["mass_m2"] = n, mean, m2
                    if i in win_ends:
                        _update_metric(kernel, adapt, dense)
                        if adapt_step_size:
                            eps = kernel.find_step_size(z, u, g, eps)
                            adapt["mu"] = math.log(10.0 * eps)
                            adapt["log_step_size_avg"] = 0.0
                            adapt["s_bar"] = 0.0
                            adapt["counter"] = 0
                        logger.debug("iteration %d: metric updated, step size %g", i, eps)
                if i == num_warmup - 1 and adapt_step_size and adapt["counter"] > 0:
                    eps = math.exp(adapt["log_step_size_avg"])
                    logger.debug("warmup done: step size %g", eps)
            else:
                draws[k] = kernel.tensor(z)
                lp = -u
                s_lp.append(lp)
                s_div.append(div)
                s_acc.append(acc)
                s_eps.append(eps_i)
                s_depth.append(depth)
                s_n.append(n_lf)
                s_en.append(h)
                k += 1
                if callback is not None:
                    info = {
                        "lp": lp,
                        "diverging": div,
                        "acceptance_rate": acc,
                        "step_size": eps_i,
                        "tree_depth": depth,
                        "n_steps": n_lf,
                        "energy": h,
                    }
            commit = (snapshot(i + 1), k)
            if callback is not None:
                callback(i, commit[0], info)
    except KeyboardInterrupt as exc:
        st, n = commit
        logger.info("sampling interrupted after iteration %d", st.iteration)
        raise SamplingInterrupted(
            st,
            draws[:n].clone(),
            _stats_to_tensors(stat_lists, n),
            f"sampling interrupted after iteration {st.iteration}",
        ) from exc

    return draws[:k], _stats_to_tensors(stat_lists, k), commit[0]


def _update_metric(kernel: _Kernel, adapt: dict, dense: bool) -> None:
    """Set the kernel's inverse mass from the window accumulators and reset them."""
    n = adapt["mass_n"]
    m2 = adapt["mass_m2"]
    if n >= 2:
        est = m2 / (n - 1)
        shrink = n / (n + 5.0)
        reg = 1e-3 * 5.0 / (n + 5.0)
        if dense:
            est = 0.5 * (est + est.mT)
            new = shrink * est + reg * torch.eye(est.shape[0], dtype=est.dtype, device=est.device)
            try:
                kernel.set_inverse_mass(new)
            except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
                logger.warning("dense metric estimate not positive definite; using its diagonal")
                kernel.set_inverse_mass(torch.diag(torch.diagonal(new).clamp_min(reg)))
        else:
            try:
                kernel.set_inverse_mass(shrink * est + reg)
            except ValueError:
                logger.warning("variance estimate not finite; keeping the previous metric")
    adapt["mass_n"] = 0
    adapt["mass_mean"] = torch.zeros_like(adapt["mass_mean"])
    adapt["mass_m2"] = torch.zeros_like(m2)
