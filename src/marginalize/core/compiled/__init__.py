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
2. **Simplify** (``simplify.py``). Everything that does not depend on ``z`` (the data's own
   transformations, the priors' constant parameters, ``log`` of constant scales, the
   gradient's seed) is evaluated once; constants repeating one number and broadcasts of
   scalars become scalars; identities, chains of scalar factors and scalar shifts inside
   sums are folded; the log density's sum of scalars is regrouped by coefficient, and the
   sums of squares of adjacent slices of ``z`` with one coefficient (independent Normal
   priors of one scale) become one dot product; a constant-input layer ``C @ W + b`` is one
   product ``[C, 1] @ [W; b]`` and its weight and bias gradients one product too; the
   gradient reaching a hidden layer from a single output unit skips the ``(N, H)`` outer
   product; common subexpressions are merged, dead code removed, and the gradient's pieces
   of ``z`` written into one vector.
3. **Emit** (``codegen.py``). The remaining operations (about 75 for a one-hidden-layer
   network, from about 250 recorded) are written out as a Python function. On the CPU in
   float32/float64 it computes in NumPy (a fraction of a microsecond per operation against
   several for a torch operation; 0-d values as Python floats; results written into
   operands nobody else uses; operations without a NumPy form run by torch on the same
   memory); elsewhere it calls the ATen operations directly. :meth:`Problem.numpy_potential`
   hands the NumPy version to the NUTS and HMC transitions, which run in NumPy already.
4. **Check.** The model is recorded twice at different points and the two recordings must
   be the same operations; the compiled value and gradient must equal the Pyro trace's at
   three other points (float tolerance); a model with ``pyro.param`` sites is not compiled
   (their values would be frozen). Otherwise the Pyro path is used. Either way one INFO
   message on this module's logger says which path was taken and why.

Why this design: the options were measured on a 1-50-1 tanh BNN written as a plain
function (100 points, float32, one thread, CPU time on a shared 2-core machine): the Pyro
trace costs about 1 ms per value and gradient (3.5 ms when the machine was busiest); the
same recording run as an ``fx.GraphModule`` (about 250 ATen calls, each dispatched through
torch) about 2 ms; TorchInductor's C++ compilation of it took a minute and still ran ~130 us
per call; ``torch.jit``/TorchScript keeps the per-operation dispatch; a replay of
``(distribution, value)`` pairs cannot reach the model's own computation of the likelihood's
parameters. The simplified graph in NumPy costs ~26 us (the builder's hand-written NumPy
potential, ``core/potentials.py``: ~20 us); recording and checking take about 0.5 s per
model after a one-time ~2 s import of torch's recorder.

Batches of ``z`` (chains, SVI particles) are recorded under ``torch.func.vmap``: the model's
code sees one ``z`` and needs no batch awareness. The batched graph loses the rewrites that
need scalars, so for each batch shape the faster of it and a loop over the unbatched
function is measured and kept (one ``z``: the unbatched function). Evaluating several NUTS
chains together with a batched potential does not pay off here: four ``z`` cost about as
much per ``z`` as one (``benchmarks/log_joint.py`` shows the batched cost), while the
transitions' own Python work per chain stays the same.

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

from marginalize._isolation import no_validation as _no_validation
from marginalize.core.compiled.codegen import _np_dtype, _NumpyEmitter, _TorchEmitter
from marginalize.core.compiled.graph import CaptureError, _from_fx, _Graph
from marginalize.core.compiled.simplify import _Simplifier
from marginalize.errors import warn

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
            data = [] if rows is None else [d.numpy() for d in self._example_rows(rows)]
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
        data = [] if rows is None else self._example_rows(rows)
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

    def _example_rows(self, rows: int) -> list[torch.Tensor]:
        """``rows`` rows of the data (repeating it when a minibatch is larger)."""
        pb = self.problem
        idx = torch.arange(rows, device=pb.device) % pb.n
        return [pb.x[idx], pb.y[idx]]

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
        idx = None if rows is None else torch.arange(rows, device=pb.device) % pb.n
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
                except Exception as e:  # noqa: BLE001 - whatever fails: the Pyro path
                    comp = None
                    why = str(e) if isinstance(e, CaptureError) else f"{type(e).__name__}: {e}"
                    if not batch and rows is None:
                        self.ok, self.reason = False, why
                    self._say(
                        f"{self._model_name()}: log joint by the Pyro trace "
                        f"({self._describe(key)}): the model cannot be compiled: {why}"
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

    def _try(self, comp: _Compiled, z: torch.Tensor, idx: torch.Tensor | None):
        """:meth:`_call`, or ``None`` after the compiled code raised (then every later call
        uses the Pyro path: a shape that depends on the values, say, broke it)."""
        try:
            return self._call(comp, z, idx)
        except Exception as e:  # noqa: BLE001 - the Pyro path takes over
            self._failed(e)
            return None

    def _failed(self, e: Exception) -> None:
        with self._lock:
            self.ok = False
            self.reason = f"its compiled code raised {type(e).__name__}: {e}"
            self._cache = dict.fromkeys(self._cache)
        warn(
            "%s: the compiled log joint raised %s (%s); using the Pyro trace from now on",
            self._model_name(),
            type(e).__name__,
            str(e)[:200],
        )

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
        # one signature with the gradient serves both (a value-only graph would be a second
        # compilation, e.g. for the initial point of a sampler, to save a few microseconds)
        comp = self.compiled(batch, rows, True)
        if comp is None:
            return None
        out = self._try(comp, z, idx)
        if out is None:
            return None
        u, g = (t.to(z.device) for t in out)
        if not (z.requires_grad and torch.is_grad_enabled()):
            return -u
        return _LogJoint.apply(z, u, g, self.problem, idx)

    def potential_and_grad(self, z: torch.Tensor):
        """``(U, dU/dz)`` with ``U = -log joint`` (``U = inf`` at an invalid point), or
        ``None`` when not compiled."""
        comp = self.compiled((), None, True)
        if comp is None:
            return None
        out = self._try(comp, z, None)
        if out is None:
            return None
        u, g = out
        if not bool(torch.isfinite(u)):
            return z.new_tensor(math.inf), torch.zeros_like(z)
        return u.to(z.device), g.to(z.device)

    def numpy_potential(self):
        """``(D,) ndarray -> (U, dU/dz)`` in NumPy, or ``None`` when not compiled in NumPy.

        Floating-point warnings are the caller's to silence (the samplers do). Should the
        compiled code raise, this call and every later one use the Pyro trace."""
        comp = self.compiled((), None, True)
        if comp is None or not comp.numpy:
            return None
        fn = comp.fn
        isfinite = math.isfinite
        inf = math.inf
        pb = self.problem
        state = {"failed": False}

        def fallback(zn: np.ndarray) -> tuple[float, np.ndarray]:
            u, g = pb.potential_and_grad(torch.from_numpy(zn))
            return float(u), g.detach().numpy()

        def potential(zn: np.ndarray) -> tuple[float, np.ndarray]:
            if state["failed"]:
                return fallback(zn)
            try:
                u, g = fn(zn)
            except Exception as e:  # noqa: BLE001 - the Pyro path takes over
                state["failed"] = True
                self._failed(e)
                return fallback(zn)
            u = float(u)
            if not isfinite(u):
                return inf, np.zeros_like(zn)
            return u, g

        return potential


class _LogJoint(torch.autograd.Function):
    """The compiled log joint ``-u`` with its compiled gradient ``-g`` as the backward (one
    evaluation for both)."""

    @staticmethod
    def forward(ctx, z, u, g, problem, idx):
        ctx.save_for_backward(z, g)
        ctx.problem, ctx.idx = problem, idx
        return -u

    @staticmethod
    def backward(ctx, grad_out):
        z, g = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the Pyro path instead
            with torch.enable_grad():
                v = ctx.problem.log_joint_traced(z, ctx.idx)
                (dv,) = torch.autograd.grad(v.sum(), z, create_graph=True)
            return grad_out.unsqueeze(-1) * dv, None, None, None, None
        return -grad_out.unsqueeze(-1) * g, None, None, None, None


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
