"""A compiled log joint for plain Pyro model functions.

:meth:`Problem.log_joint <marginalize.core.problem.Problem.log_joint>` of a plain model
function runs the model under Pyro's handlers (``condition``, ``trace``) and sums the sites'
log densities: correct for any model, but on a small network almost all of its cost is
Python (the handler stack, distribution objects, argument checks), and NUTS evaluates it a
million times per fit. This module captures that computation once and evaluates it after
that without Pyro:

1. **Capture.** ``make_fx`` (``torch.fx.experimental.proxy_tensor``) records the ATen
   operations of ``grad_and_value`` of the traced log joint (the same function
   ``Problem.log_joint`` evaluates: the unpacking of ``z``, the Jacobians of the constraint
   transforms, every site's ``log_prob`` with Pyro's scale and mask, the minibatch scale
   of the likelihood), functionalized, optionally under ``vmap`` for a batch of ``z``. Pyro
   and the model's Python run only while recording. A model whose Python branches on the
   values of its latents cannot be recorded (reading a tensor's value while recording
   raises); that, and any other failure, is caught.
2. **Simplify.** Everything that does not depend on ``z`` (the data's own transformations,
   the priors' constant parameters, ``log`` of constant scales, the gradient's seed) is
   evaluated once; constant operands that are a single repeated number become scalars; then
   identities (``x + 0``, ``x * 1``, a ``view`` to the same shape), chains of scalar products
   and sums of scalar-shifted terms are folded, common subexpressions merged, dead code
   removed, and the gradient's pieces of ``z`` are written into one vector (one
   ``concatenate`` instead of a zero vector per site).
3. **Emit.** The remaining operations are written out as a Python function. On the CPU in
   float32/float64 the function computes in NumPy (an operation costs a fraction of a
   microsecond of overhead against several for a torch operation; operations NumPy has no
   counterpart for are run by torch on the same memory); elsewhere it calls the ATen
   operations directly. :meth:`Problem.numpy_potential` hands the NumPy version to the NUTS
   and HMC transitions, which already run in NumPy.
4. **Check.** The model is recorded twice at different points and the two recordings must be
   the same operations; the compiled value and gradient must equal the Pyro trace's at three
   points (float tolerance). Otherwise the Pyro path is used. Either way, one INFO message
   on the ``marginalize.core.compiled`` logger says which path was taken and why.

Why this design (measured on a 1-50-1 tanh BNN written as a plain function, 100 points,
one thread; ``benchmarks/nuts_vs_numpyro.py``): the Pyro trace costs about 1 ms per
gradient; the recorded graph run as an ``fx.GraphModule`` (about 250 ATen calls) about as
much, since each call dispatches through torch; TorchInductor's C++ compilation of the same
graph took a minute to compile on this machine and still ~130 us per call; a replay of
``(distribution, value)`` pairs cannot reach the model's own computation of the likelihood's
parameters. The simplified graph (about 50 operations) in NumPy is 20-40 us per
gradient, and recording plus checking takes about a second.

Batches of ``z`` (chains, SVI particles, draws) are recorded under ``torch.func.vmap``: the
model's code sees one ``z`` and needs no batch awareness; a model that ``vmap`` cannot run
(data-dependent shapes, in-place writes into captured tensors) falls back to a loop.

Examples
--------
>>> import torch, pyro, pyro.distributions as dist
>>> from marginalize.core.problem import prepare
>>> def model(x, y=None):
...     w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
...     s = pyro.sample("s", dist.HalfNormal(1.0))
...     with pyro.plate("data", x.shape[0]):
...         pyro.sample("y", dist.Normal(x @ w, s), obs=y)
>>> x = torch.randn(20, 2); y = x.sum(1)
>>> pb = prepare(model, x, y)
>>> cp = CompiledLogJoint(pb)
>>> z = pb.init_from_prior(0)
>>> u, g = cp.potential_and_grad(z)
>>> bool(torch.allclose(-u, pb.log_joint_traced(z)))
True
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from marginalize.core.compiled.codegen import _np_dtype, _NumpyEmitter, _TorchEmitter
from marginalize.core.compiled.graph import CaptureError, _from_fx, _Graph
from marginalize.core.compiled.simplify import _Simplifier

__all__ = ["CompiledLogJoint", "CaptureError", "capture_graph"]

log = logging.getLogger(__name__)

#: relative tolerance of the check against the Pyro trace (value and gradient), per dtype
_RTOL = {torch.float64: 1e-8, torch.float32: 2e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}

# ------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------
_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_capture():
    """No argument validation (it reads tensor values), no RNG consumed, one capture at a time
    (the Pyro handler stack is global)."""
    dist_cls = torch.distributions.Distribution
    check = dist_cls._validate_sample
    with _CAPTURE_LOCK, _no_validation(), torch.random.fork_rng(devices=[]):
        # distributions made before (e.g. a PyroModule's PyroSample priors) keep the setting
        # they were made with: their sample checks read values, which recording cannot
        dist_cls._validate_sample = _no_check
        try:
            yield
        finally:
            dist_cls._validate_sample = check


def _no_check(self, value) -> None:
    return None


@contextlib.contextmanager
def _no_validation():
    """Distribution argument checks off (``Problem``'s own switch; this package does not
    import ``core.problem``, which imports it)."""
    import pyro

    old = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(old)


def capture_graph(fn: Callable, example_inputs: list[torch.Tensor]) -> _Graph:
    """Record ``fn(*example_inputs)`` (a tuple of tensors) as a simplified :class:`_Graph`.

    Raises
    ------
    CaptureError
        When the function cannot be recorded (it reads values of its inputs, uses an
        operation the recorder does not support, ...).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with _quiet_capture():
            gm = make_fx(torch.func.functionalize(fn, remove="mutations"))(*example_inputs)
            graph = _from_fx(gm, example_inputs)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to record means: use the Pyro path
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CaptureError(f"{type(e).__name__}: {msg[:300]}") from e
    return _Simplifier(graph).run()


# ------------------------------------------------------------------------------------------
# the compiled log joint of a problem
# ------------------------------------------------------------------------------------------
class _BlasLimit:
    """Holds NumPy's BLAS to ``n`` threads while compiled code runs, as torch is: OpenBLAS's
    own threads can stall products of a few hundred rows by milliseconds when the cores are
    busy. The library handles are found once (``threadpoolctl``); setting the count is one
    C call. ``limit(n)`` returns a context of its own (safe across threads)."""

    def __init__(self):
        self._libs: list | None = None

    def libs(self) -> list:
        if self._libs is None:
            try:
                from threadpoolctl import ThreadpoolController

                ctl = ThreadpoolController()
                self._libs = [c for c in ctl.lib_controllers if c.user_api == "blas"]
            except Exception:  # noqa: BLE001 - without it, BLAS keeps its own setting
                self._libs = []
        return self._libs

    def limit(self, n: int) -> _BlasScope:
        return _BlasScope(self.libs(), max(1, int(n)))


class _BlasScope:
    __slots__ = ("libs", "n", "saved")

    def __init__(self, libs: list, n: int):
        self.libs, self.n, self.saved = libs, n, []

    def __enter__(self):
        for lib in self.libs:
            old = lib.num_threads
            self.saved.append(old)
            if old != self.n:
                lib.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        for lib, old in zip(self.libs, self.saved, strict=False):
            if old != self.n:
                lib.set_num_threads(old)
        return False


_BLAS = _BlasLimit()


class _Compiled:
    """One compiled signature: ``fn(z[, x, y]) -> (U, dU/dz)`` or ``(U,)`` with ``U`` the
    negated log joint (the potential), as arrays of the kind it was emitted for."""

    def __init__(self, fn: Callable, numpy: bool, graph: _Graph, source: str, bridged):
        self.fn = fn
        self.numpy = numpy
        self.graph = graph
        self.source = source
        self.bridged = sorted(set(bridged))
        self.num_ops = sum(1 for n in graph.nodes if n.kind == "call")
        #: a batched signature evaluated as a loop over the unbatched function
        self.looped = False


def _looped(single: _Compiled, batch: tuple[int, ...]) -> _Compiled:
    """A batched signature as a loop over the unbatched NumPy function."""
    fn = single.fn

    def looped(z, *data):
        flat = z.reshape(-1, z.shape[-1])
        outs = [fn(zi, *data) for zi in flat]
        return tuple(
            np.stack([o[i] for o in outs]).reshape(*batch, *np.shape(outs[0][i]))
            for i in range(len(outs[0]))
        )

    comp = _Compiled(looped, True, single.graph, single.source, single.bridged)
    comp.looped = True
    return comp


def _time_of(fn, z, data, calls: int = 3) -> float:
    """Best of a few calls (seconds, CPU time of the process)."""
    with np.errstate(all="ignore"), _BLAS.limit(torch.get_num_threads()):
        fn(z, *data)
        best = math.inf
        for _ in range(calls):
            t = time.process_time()
            fn(z, *data)
            best = min(best, time.process_time() - t)
    return best


class CompiledLogJoint:
    """The log joint of a plain-model :class:`~marginalize.core.problem.Problem`, compiled.

    Parameters
    ----------
    problem : Problem
        A problem whose model is a plain Pyro model function. Its Pyro-trace log joint
        (:meth:`~marginalize.core.problem.Problem.log_joint_traced_on`) is what is recorded,
        and :meth:`~marginalize.core.problem.Problem.log_joint_traced` what it is checked
        against.

    Attributes
    ----------
    ok : bool
        False once the model was found not capturable (every call then uses the Pyro path).
    reason : str
        Why the Pyro path is used (empty while ``ok``).

    Notes
    -----
    Signatures (a batch shape of ``z``; the full data or a minibatch size; with or without
    the gradient) are compiled on first use and cached; a signature that cannot be compiled
    or fails the check is evaluated on the Pyro path from then on. Each decision is logged
    once at INFO on this module's logger.
    """

    def __init__(self, problem):
        self.problem = problem
        self.ok = True
        self.reason = ""
        self._cache: dict[Any, _Compiled | None] = {}
        self._reported: set[str] = set()
        self.numpy = problem.device.type == "cpu" and problem.dtype in (
            torch.float32,
            torch.float64,
        )
        self._checked_structure = False
        self._lock = threading.RLock()

    # -- building -------------------------------------------------------------------------------
    def _target(self, rows: int | None) -> Callable:
        """The function to record: ``z (D,) -> U`` on the full data (the data are constants of
        the graph), or ``(z, x, y) -> U`` on ``rows`` rows, the likelihood scaled to the full
        data; ``U`` is the negated log joint."""
        pb = self.problem
        if rows is None:
            x, y = pb.x, pb.y

            def full(z):
                return -pb.log_joint_traced_on(z, x, y, 1.0)

            return full
        scale = pb.n / rows

        def part(z, x, y):
            return -pb.log_joint_traced_on(z, x, y, scale)

        return part

    def _build(self, key) -> _Compiled:
        batch, rows, grad = key
        if not self._checked_structure:
            self._check_sites()
        single = None
        if batch and self.numpy:
            single = self.compiled((), rows, grad)
            if single is None:
                raise CaptureError(self.reason or "the unbatched log joint is not compiled")
            if math.prod(batch) == 1:  # one z: the unbatched function
                return _looped(single, batch)
        comp = self._capture(key)
        if single is not None:
            # a batched graph loses the rewrites that need scalars (sums of priors, one
            # product per layer); on small models a loop over the unbatched one is faster:
            # measure both, keep the faster
            looped = _looped(single, batch)
            z = self._example_z(batch).numpy()
            data = (
                []
                if rows is None
                else [self.problem.x[:rows].numpy(), self.problem.y[:rows].numpy()]
            )
            if _time_of(looped.fn, z, data) < _time_of(comp.fn, z, data):
                return looped
        return comp

    def _capture(self, key) -> _Compiled:
        batch, rows, grad = key
        pb = self.problem
        f = self._target(rows)
        if grad:

            def one(z, *data):
                g, v = torch.func.grad_and_value(lambda zz: f(zz, *data))(z)
                return v, g
        else:

            def one(z, *data):
                return (f(z, *data),)

        if batch:
            nb = len(batch)

            def fn(z, *data):
                flat = z.reshape(-1, z.shape[-1])
                outs = torch.func.vmap(lambda zz: one(zz, *data))(flat)
                return tuple(o.reshape(*z.shape[:nb], *o.shape[1:]) for o in outs)
        else:
            fn = one
        z0 = self._example_z(batch)
        data = [] if rows is None else [pb.x[:rows], pb.y[:rows]]
        graph = capture_graph(fn, [z0, *data])
        if not self._checked_structure and not batch and rows is None:
            # a second recording elsewhere must be the same computation
            again = capture_graph(fn, [self._example_z(batch, shift=1), *data])
            if again.signature() != graph.signature():
                raise CaptureError(
                    "its operations change with the values of its latent sites "
                    "(Python control flow on their values)"
                )
            self._checked_structure = True
        emitter = (_NumpyEmitter if self.numpy else _TorchEmitter)(graph, pb.dtype)
        run = emitter.emit()
        return _Compiled(run, self.numpy, graph, emitter.source, emitter.bridged)

    def _check_sites(self) -> None:
        """Parameters (``pyro.param``) would be frozen into the graph at their current
        values, and may change between calls: such a model is not compiled."""
        from pyro import poutine

        pb = self.problem
        with _quiet_capture():
            tr = poutine.trace(pb.model).get_trace(pb.x[:2], pb.y[:2])
        params = [name for name, node in tr.nodes.items() if node["type"] == "param"]
        if params:
            raise CaptureError(
                f"it has parameter sites (pyro.param: {', '.join(params[:5])}), whose values "
                "may change between calls"
            )

    def _example_z(self, batch: tuple[int, ...], shift: int = 0) -> torch.Tensor:
        """A recording point: a prior draw (finite density), one per batch element."""
        pb = self.problem
        n = math.prod(batch) if batch else 1
        zs = [pb.init_from_prior(7919 + 31 * shift + i) for i in range(n)]
        return torch.stack(zs).reshape(*batch, -1) if batch else zs[0]

    def _check(self, comp: _Compiled, key) -> None:
        """The compiled value (and gradient) equal the Pyro trace's at three points; raise
        :class:`CaptureError` otherwise."""
        batch, rows, grad = key
        pb = self.problem
        rtol = _RTOL.get(pb.dtype, 1e-3)
        idx = None if rows is None else torch.arange(rows, device=pb.device)
        for shift in (2, 3, 4):
            z = self._example_z(batch, shift)
            out = self._call(comp, z, idx)
            zr = z.detach().requires_grad_(grad)
            with _no_validation(), torch.enable_grad():
                ref = -pb.log_joint_traced(zr, idx)
                ref_g = torch.autograd.grad(ref.sum(), zr)[0] if grad else None
            ref = ref.detach()
            if not bool(torch.isfinite(ref).all()):
                continue
            if not _close(out[0], ref, rtol):
                raise CaptureError(
                    "its compiled log density differs from the Pyro trace's "
                    f"({_first_diff(out[0], ref)})"
                )
            if grad and not _close(out[1], ref_g, rtol):
                raise CaptureError(
                    "its compiled gradient differs from the Pyro trace's "
                    f"({_first_diff(out[1], ref_g)})"
                )

    def compiled(self, batch: tuple[int, ...], rows: int | None, grad: bool) -> _Compiled | None:
        """The compiled function of one signature, or ``None`` (use the Pyro path)."""
        key = (tuple(batch), rows, bool(grad))
        comp = self._cache.get(key, False)
        if comp is not False:
            return comp
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            comp = None
            if self.ok:
                try:
                    comp = self._build(key)
                    self._check(comp, key)
                except CaptureError as e:
                    comp = None
                    if not batch and rows is None:
                        self.ok, self.reason = False, str(e)
                    self._say(
                        f"{self._model_name()}: log joint by the Pyro trace "
                        f"({self._describe(key)}): the model cannot be compiled: {e}"
                    )
                else:
                    bridged = f"; by torch: {', '.join(comp.bridged)}" if comp.bridged else ""
                    loop = ", a loop over z" if comp.looped else ""
                    self._say(
                        f"{self._model_name()}: compiled log joint ({self._describe(key)}; "
                        f"{comp.num_ops} operations in {'NumPy' if comp.numpy else 'torch'}"
                        f"{loop}{bridged})"
                    )
            else:
                self._say(
                    f"{self._model_name()}: log joint by the Pyro trace "
                    f"({self._describe(key)}): {self.reason}"
                )
            self._cache[key] = comp
        return comp

    def _model_name(self) -> str:
        m = self.problem.model
        name = getattr(m, "__qualname__", None) or getattr(m, "__name__", type(m).__name__)
        return f"plain model {name!r}"

    def _describe(self, key) -> str:
        batch, rows, grad = key
        parts = ["value and gradient" if grad else "value"]
        parts.append("full data" if rows is None else f"minibatches of {rows}")
        if batch:
            parts.append(f"z batched {tuple(batch)}")
        return ", ".join(parts)

    def _say(self, msg: str) -> None:
        if msg not in self._reported:
            self._reported.add(msg)
            log.info(msg)

    # -- calling ----------------------------------------------------------------------------------
    def _call(self, comp: _Compiled, z: torch.Tensor, idx: torch.Tensor | None):
        """``(U, dU/dz)`` or ``(U,)`` as tensors of the problem's dtype."""
        pb = self.problem
        data = [] if idx is None else [pb.x[idx], pb.y[idx]]
        if comp.numpy:
            args = [z.detach().cpu().numpy()] + [d.numpy() for d in data]
            with np.errstate(all="ignore"), _BLAS.limit(torch.get_num_threads()):
                outs = comp.fn(*args)
            dt = _np_dtype(pb.dtype)
            return tuple(torch.from_numpy(np.asarray(o, dtype=dt)) for o in outs)
        return tuple(o.to(pb.dtype) for o in comp.fn(z.detach(), *data))

    def log_joint(self, z: torch.Tensor, idx: torch.Tensor | None = None):
        """``log p(w(z), y | x) + log|J|`` batched over leading dims of ``z``, differentiable
        in ``z`` (first order); ``None`` when this signature is not compiled or inside a
        ``torch.func`` transform (the caller then uses the Pyro path)."""
        pb = self.problem
        if (
            torch._C._are_functorch_transforms_active()
            or z.dim() == 0
            or z.shape[-1] != pb.layout.size
            or z.dtype != pb.dtype
            or z.device != pb.device
        ):
            return None
        if idx is not None and (
            not isinstance(idx, torch.Tensor)
            or idx.dim() != 1
            or idx.dtype in (torch.bool, torch.uint8)
            or idx.is_floating_point()
        ):
            return None  # index tensors only (a mask selects a varying number of rows)
        batch = tuple(z.shape[:-1])
        rows = None if idx is None else int(idx.shape[0])
        grad = z.requires_grad and torch.is_grad_enabled()
        comp = self.compiled(batch, rows, grad)
        if comp is None:
            return None
        if not grad:
            return -self._call(comp, z, idx)[0].to(z.device)
        return _LogJoint.apply(z, self, comp, idx)

    def potential_and_grad(self, z: torch.Tensor):
        """``(U, dU/dz)`` with ``U = -log joint`` (``U = inf`` at an invalid point), or
        ``None`` when not compiled."""
        comp = self.compiled((), None, True)
        if comp is None:
            return None
        u, g = self._call(comp, z, None)
        if not bool(torch.isfinite(u)):
            return z.new_tensor(math.inf), torch.zeros_like(z)
        return u.to(z.device), g.to(z.device)

    def numpy_potential(self):
        """``(D,) ndarray -> (U, dU/dz)`` in NumPy, or ``None`` when not compiled in NumPy.

        Floating-point warnings are the caller's to silence (the samplers do)."""
        comp = self.compiled((), None, True)
        if comp is None or not comp.numpy:
            return None
        fn = comp.fn
        isfinite = math.isfinite
        inf = math.inf

        def potential(zn: np.ndarray) -> tuple[float, np.ndarray]:
            u, g = fn(zn)
            u = float(u)
            if not isfinite(u):
                return inf, np.zeros_like(zn)
            return u, g

        return potential


class _LogJoint(torch.autograd.Function):
    """The compiled log joint with its compiled gradient as the backward (one evaluation)."""

    @staticmethod
    def forward(ctx, z, owner, comp, idx):
        u, g = owner._call(comp, z, idx)
        g = g.to(z.device)
        ctx.save_for_backward(z, g)
        ctx.owner, ctx.idx = owner, idx
        return -u.to(z.device)

    @staticmethod
    def backward(ctx, grad_out):
        z, g = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the Pyro path instead
            with torch.enable_grad():
                v = ctx.owner.problem.log_joint_traced(z, ctx.idx)
                (dv,) = torch.autograd.grad(v.sum(), z, create_graph=True)
            return grad_out.unsqueeze(-1) * dv, None, None, None
        return -grad_out.unsqueeze(-1) * g, None, None, None


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Equal within ``rtol`` of the larger magnitude of ``b`` (sums of many terms lose
    precision relative to their largest term, not to each element)."""
    a, b = a.double().cpu(), b.double().cpu()
    if a.shape != b.shape:
        return False
    scale = float(b[torch.isfinite(b)].abs().max()) + 1.0 if bool(torch.isfinite(b).any()) else 1.0
    same_inf = torch.isinf(a) & (a == b)
    return bool((same_inf | ((a - b).abs() <= rtol * scale)).all())


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    d = (a.double() - b.double()).abs().reshape(-1).nan_to_num(math.inf)
    i = int(torch.argmax(d))
    return f"{float(a.reshape(-1)[i]):.6g} vs {float(b.reshape(-1)[i]):.6g}"
