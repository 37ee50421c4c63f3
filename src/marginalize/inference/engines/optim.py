"""Optimizers over one flat parameter tensor, for the training loop.

Each optimizer owns the parameters (``params``: the current point, a plain tensor) and keeps
the state *before* its last update, so the loop can go back one step without copying anything
each step: :class:`Adam` and :class:`SGD` write every update out of place into a second set of
buffers and swap, and :meth:`undo` swaps back. :class:`LBFGS` (full-batch, quasi-Newton with a
strong-Wolfe line search, ``torch.optim.LBFGS``) keeps a cheap snapshot instead.

The learning rate at step ``t`` (1-based) is ``lr * schedule(t) * backoff``: ``schedule`` is any
function of the step (:func:`exponential` decays from ``lr`` to ``lr * lr_final`` at the last
step, as Pyro's ``ClippedAdam`` with ``lrd``), ``backoff`` is halved by each rollback of the
non-finite-loss policy.

Examples
--------
>>> import torch
>>> opt = Adam(torch.zeros(3), lr=0.1)
>>> opt.step(torch.tensor([1.0, -1.0, 0.0]))
>>> opt.params
tensor([-0.1000,  0.1000,  0.0000])
>>> opt.undo(); opt.params
tensor([0., 0., 0.])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["FlatOptimizer", "Adam", "SGD", "LBFGS", "exponential", "constant"]

Closure = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: torch's fused Adam kernel (an ATen op; absent from some builds)
_FUSED_ADAM = getattr(torch, "_fused_adam_", None)


def exponential(lr_final: float, steps: int) -> Callable[[int], float]:
    """``schedule(t) = lr_final ** (t / steps)``: 1 before the first step, ``lr_final`` at the
    last."""
    decay = float(lr_final) ** (1.0 / max(int(steps), 1))
    return lambda t: decay**t


def constant(t: int) -> float:
    """The constant schedule."""
    return 1.0


class FlatOptimizer:
    """Base class: ``params``, ``step(grad, closure=None)``, ``undo()``, ``lr``, ``backoff``,
    ``state_dict()`` / ``load_state_dict()``."""

    #: whether the optimizer needs the full batch (a line search compares losses)
    full_batch_only = False

    params: torch.Tensor

    def __init__(self, lr: float, schedule: Callable[[int], float]):
        self.base_lr = float(lr)
        self.schedule = schedule
        self.backoff = 1.0
        self.t = 0

    def lr_at(self, t: int) -> float:
        return self.base_lr * self.schedule(t) * self.backoff

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.lr_at(self.t + 1)

    def step(
        self, grad: torch.Tensor, loss: float | None = None, closure: Closure | None = None
    ) -> None:
        """Update ``params`` from the gradient ``grad`` at the current point (``loss``: the
        objective there; ``closure(params) -> (loss, grad)``: for optimizers that search)."""
        raise NotImplementedError

    def undo(self) -> None:
        """Back to the state before the last :meth:`step` (once)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Make the state consistent after a :meth:`step` interrupted by ``KeyboardInterrupt``."""

    #: why the last :meth:`step` failed although the gradient was finite (a line search that met
    #: only non-finite values), or None
    failure: str | None = None

    def evaluation(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(loss, grad)`` at ``params`` if the optimizer already computed them, else None."""
        return None

    @property
    def can_undo(self) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, st: dict) -> None:
        raise NotImplementedError


def _clip(grad: torch.Tensor, clip_value: float | None, clip_norm: float | None) -> torch.Tensor:
    if clip_value is not None and math.isfinite(clip_value):
        grad = grad.clamp(-clip_value, clip_value)
    if clip_norm is not None and math.isfinite(clip_norm):
        norm = float(torch.linalg.vector_norm(grad))
        if norm > clip_norm:
            grad = grad * (clip_norm / (norm + 1e-6))
    return grad


class _DoubleBuffered(FlatOptimizer):
    """State tensors (``params`` and ``_names``) in two copies: an update writes the spare copy,
    then one assignment makes it current (a Ctrl-C cannot leave a half-updated state)."""

    def __init__(self, params, lr, schedule):
        super().__init__(lr, schedule)
        p = params.detach().clone()
        self._cur = {"params": p}
        self._spare = {"params": torch.empty_like(p)}
        self._prev_t: int | None = None

    def _add_state(self, name: str, value: torch.Tensor) -> None:
        self._cur[name] = value
        self._spare[name] = torch.empty_like(value)

    @property
    def params(self) -> torch.Tensor:
        return self._cur["params"]

    @property
    def can_undo(self) -> bool:
        return self._prev_t is not None

    def undo(self) -> None:
        """Back to the state before the last :meth:`step` (once)."""
        if self._prev_t is None:
            raise RuntimeError("nothing to undo")
        self._cur, self._spare, self.t, self._prev_t = self._spare, self._cur, self._prev_t, None

    def abort(self) -> None:
        """After an interrupted :meth:`step`: the state is the one before it or after it."""

    def _commit(self, t: int) -> None:
        self._cur, self._spare, self._prev_t, self.t = self._spare, self._cur, self.t, t

    def state_dict(self) -> dict:
        st = {
            "t": self.t,
            "backoff": self.backoff,
            "current": {k: v.clone() for k, v in self._cur.items()},
        }
        if self._prev_t is not None:
            st["previous"] = {k: v.clone() for k, v in self._spare.items()}
            st["prev_t"] = self._prev_t
        return st

    def load_state_dict(self, st: dict) -> None:
        self.t, self.backoff = int(st["t"]), float(st["backoff"])
        for n, v in st["current"].items():
            self._cur[n].copy_(v)
        self._prev_t = None
        if "previous" in st:
            for n, v in st["previous"].items():
                self._spare[n].copy_(v)
            self._prev_t = int(st["prev_t"])


class Adam(_DoubleBuffered):
    """Adam as Pyro's ``ClippedAdam``: gradients clamped elementwise to ``[-clip_value,
    clip_value]`` (and/or rescaled to norm ``clip_norm``), then Adam with bias correction,
    ``denom = sqrt(v) + eps``, step ``lr * sqrt(1 - b2^t) / (1 - b1^t)``."""

    def __init__(
        self,
        params: torch.Tensor,
        lr: float,
        schedule: Callable[[int], float] = constant,
        *,
        clip_value: float | None = None,
        clip_norm: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        super().__init__(params, lr, schedule)
        self._add_state("m", torch.zeros_like(self.params))
        self._add_state("v", torch.zeros_like(self.params))
        self.clip_value, self.clip_norm = clip_value, clip_norm
        self.b1, self.b2 = betas
        self.eps = eps
        self._denom = torch.empty_like(self.params)

    #: use torch's fused Adam kernel (one pass) where it runs; else the composite update
    fused = True

    def step(self, grad, loss=None, closure=None):
        grad = _clip(grad, self.clip_value, self.clip_norm)
        t = self.t + 1
        cur, new = self._cur, self._spare
        m, v = new["m"], new["v"]
        lr = self.lr_at(t)
        if self.fused and _FUSED_ADAM is not None and math.isfinite(lr):
            # ClippedAdam's update written as torch's: eps / sqrt(1 - b2^t) in the denominator
            for k in ("params", "m", "v"):
                new[k].copy_(cur[k])
            step = torch.full((), float(t), dtype=torch.float32, device=grad.device)
            try:
                _FUSED_ADAM(
                    [new["params"]],
                    [grad],
                    [m],
                    [v],
                    [],
                    [step],
                    lr=lr,
                    beta1=self.b1,
                    beta2=self.b2,
                    weight_decay=0.0,
                    eps=self.eps / math.sqrt(1.0 - self.b2**t),
                    amsgrad=False,
                    maximize=False,
                )
                self._commit(t)
                return
            except (RuntimeError, TypeError, NotImplementedError):
                type(self).fused = False  # not on this build or device: the composite update
        torch.lerp(cur["m"], grad, 1.0 - self.b1, out=m)
        torch.mul(cur["v"], self.b2, out=v).addcmul_(grad, grad, value=1.0 - self.b2)
        torch.sqrt(v, out=self._denom).add_(self.eps)
        size = lr * math.sqrt(1.0 - self.b2**t) / (1.0 - self.b1**t)
        torch.addcdiv(cur["params"], m, self._denom, value=-size, out=new["params"])
        self._commit(t)


class SGD(_DoubleBuffered):
    """SGD with momentum as ``torch.optim.SGD`` (no dampening): ``b = momentum * b + g``
    (``b = g`` at the first step), ``params -= lr * b``; optional gradient clipping."""

    def __init__(
        self,
        params: torch.Tensor,
        lr: float,
        schedule: Callable[[int], float] = constant,
        *,
        momentum: float = 0.0,
        clip_value: float | None = None,
        clip_norm: float | None = None,
    ):
        super().__init__(params, lr, schedule)
        self._add_state("buf", torch.zeros_like(self.params))
        self.momentum = float(momentum)
        self.clip_value, self.clip_norm = clip_value, clip_norm

    def step(self, grad, loss=None, closure=None):
        grad = _clip(grad, self.clip_value, self.clip_norm)
        t = self.t + 1
        cur, new = self._cur, self._spare
        buf = new["buf"]
        if t == 1 or self.momentum == 0.0:
            buf.copy_(grad)
        else:
            torch.mul(cur["buf"], self.momentum, out=buf).add_(grad)
        torch.add(cur["params"], buf, alpha=-self.lr_at(t), out=new["params"])
        self._commit(t)


class LBFGS(FlatOptimizer):
    """Full-batch L-BFGS, one quasi-Newton iteration per step: the two-loop recursion over the
    last ``history_size`` curvature pairs and the strong-Wolfe line search of
    ``torch.optim.LBFGS`` (Nocedal & Wright 2006, algorithms 7.4 and 3.5), on the flat vector.

    The line search evaluates ``closure(params) -> (loss, grad)`` at trial points; a trial point
    with a non-finite loss or gradient counts as a very large loss, so the search backs off
    instead of stepping there. The loss and gradient at the accepted point are kept
    (:meth:`evaluation`), so the next step does not evaluate them again. Every update is out of
    place, so :meth:`undo` only restores references.
    """

    full_batch_only = True

    def __init__(
        self,
        params: torch.Tensor,
        lr: float = 1.0,
        schedule: Callable[[int], float] = constant,
        *,
        history_size: int = 10,
        max_ls: int = 25,
    ):
        super().__init__(lr, schedule)
        self.params = params.detach().clone()
        self.history_size = int(history_size)
        self.max_ls = int(max_ls)
        self._hist: tuple[list, list, list] = ([], [], [])  # y, s, 1 / (y . s)
        self._h_diag = 1.0
        self._prev: tuple | None = None  # (grad, direction, step) of the last iteration
        self._cache: tuple | None = None  # (loss, grad) at params
        self._snap: tuple | None = None

    def evaluation(self):
        """``(loss, grad)`` at ``params`` when the line search computed them, else None."""
        return self._cache

    def _state(self) -> tuple:
        return (
            self.params,
            self.t,
            tuple(list(h) for h in self._hist),
            self._h_diag,
            self._prev,
            self._cache,
        )

    def _set_state(self, st: tuple) -> None:
        self.params, self.t, hist, self._h_diag, self._prev, self._cache = st
        self._hist = tuple(list(h) for h in hist)

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        ys_, ss, ro = self._hist
        if self._prev is not None:
            g_prev, d_prev, t_prev = self._prev
            y = g - g_prev
            s = d_prev * t_prev
            ys = float(y.dot(s))
            if ys > 1e-10:  # keep the pair only where the curvature condition holds
                if len(ss) == self.history_size:
                    ys_.pop(0), ss.pop(0), ro.pop(0)
                ys_.append(y)
                ss.append(s)
                ro.append(1.0 / ys)
                self._h_diag = ys / float(y.dot(y))
        if not ss:
            return -g
        q = -g
        al = [0.0] * len(ss)
        for i in range(len(ss) - 1, -1, -1):
            al[i] = float(ss[i].dot(q)) * ro[i]
            q = q - al[i] * ys_[i]
        r = q * self._h_diag
        for i in range(len(ss)):
            be = float(ys_[i].dot(r)) * ro[i]
            r = r + (al[i] - be) * ss[i]
        return r

    def step(self, grad, loss=None, closure=None):
        from torch.optim.lbfgs import _strong_wolfe

        if closure is None or loss is None:
            raise ValueError("LBFGS needs the loss and a closure")
        self._snap = self._state()
        t_step = self.t + 1
        lr = self.lr_at(t_step)
        g = grad.detach()
        d = self._direction(g)
        gtd = g.dot(d)
        if not float(gtd) < 0:  # not a descent direction: forget the history
            self._hist = ([], [], [])
            self._h_diag = 1.0
            d = -g
            gtd = g.dot(d)
        first = self._prev is None or not self._hist[1]
        t = min(1.0, 1.0 / max(float(g.abs().sum()), 1e-300)) * lr if first else lr
        x = self.params

        bad = [False]

        def obj_func(x_, t_, d_):
            f, gr = closure(x_ + t_ * d_)
            f = float(f)
            if not math.isfinite(f) or not bool(torch.isfinite(gr).all()):
                bad[0] = True
                return 1e30, torch.zeros_like(gr)
            return f, gr.detach()

        self._in_step = True
        self.failure = None
        for _ in range(8):  # a search that met only non-finite points starts again, shorter
            bad[0] = False
            f_new, g_new, t_new, _ = _strong_wolfe(
                obj_func, x, t, d, float(loss), g, gtd, max_ls=self.max_ls
            )
            if not (bad[0] and not t_new):
                break
            t *= 1e-3
        t = t_new
        if bad[0] and not t:
            self.failure = "every point the line search tried was non-finite"
        self._prev = (g, d, t)
        self.params = x + t * d
        self._cache = (torch.as_tensor(f_new, dtype=x.dtype), g_new) if f_new < 1e30 else None
        self.t = t_step
        self._in_step = False

    _in_step = False

    @property
    def can_undo(self) -> bool:
        return self._snap is not None

    def undo(self):
        if self._snap is None:
            raise RuntimeError("nothing to undo")
        self._set_state(self._snap)
        self._snap = None
        self._cache = None

    def abort(self) -> None:
        """After an interrupted :meth:`step`: back to the state before it."""
        if self._in_step:
            self._in_step = False
            self.undo()

    def state_dict(self) -> dict:
        def pack(st):
            params, t, hist, h_diag, prev, _ = st
            return {
                "params": params.clone(),
                "t": t,
                "y": list(hist[0]),
                "s": list(hist[1]),
                "ro": list(hist[2]),
                "h_diag": h_diag,
                "prev": None if prev is None else [prev[0], prev[1], float(prev[2])],
            }

        out = {"backoff": self.backoff, "current": pack(self._state())}
        if self._snap is not None:
            out["previous"] = pack(self._snap)
        return out

    def load_state_dict(self, st: dict) -> None:
        dev, dt = self.params.device, self.params.dtype

        def to(t):
            return t.to(dev, dt)

        def unpack(d):
            prev = d["prev"]
            return (
                to(d["params"]),
                int(d["t"]),
                ([to(v) for v in d["y"]], [to(v) for v in d["s"]], [float(r) for r in d["ro"]]),
                float(d["h_diag"]),
                None if prev is None else (to(prev[0]), to(prev[1]), float(prev[2])),
                None,
            )

        self.backoff = float(st["backoff"])
        self._set_state(unpack(st["current"]))
        self._snap = unpack(st["previous"]) if "previous" in st else None
