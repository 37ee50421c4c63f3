"""Code generation for the compiled log joint (internal to :mod:`marginalize.core.compiled`).

A simplified graph becomes a Python function: NumPy calls on the CPU (0-d values as Python
floats; operations without a NumPy form run by torch on the same memory), or direct ATen
calls on any device.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from marginalize.core.compiled.graph import (  # noqa: F401
    _ADD,
    _DIV,
    _MUL,
    _SUB,
    _SUM_ALL,
    _Graph,
    _is_num,
    _Node,
    _op_name,
    _tensor,
    aten,
)

__all__ = ["_NumpyEmitter", "_TorchEmitter", "_np_dtype"]


def _lit(v, env: dict) -> str:
    """Python source for a literal argument."""
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, int):
        return repr(v)
    if isinstance(v, float):
        if math.isfinite(v):
            return repr(v)
        env["_math"] = math
        return "_math.inf" if v > 0 else ("-_math.inf" if v < 0 else "_math.nan")
    if isinstance(v, (list, tuple)):
        inner = ", ".join(_lit(x, env) for x in v)
        return f"({inner},)" if isinstance(v, tuple) else f"[{inner}]"
    if isinstance(v, slice):
        return f"slice({_lit(v.start, env)}, {_lit(v.stop, env)}, {_lit(v.step, env)})"
    if isinstance(v, str):
        return repr(v)
    name = f"_k{len(env)}"
    env[name] = v
    return name


def _np_dtype(dt: torch.dtype):
    return torch.empty((), dtype=dt).numpy().dtype


class _NumpyEmitter:
    """Writes a graph as NumPy code; operations without a NumPy form run in torch."""

    def __init__(self, graph: _Graph, out_dtype: torch.dtype):
        self.g = graph
        self.env: dict[str, Any] = {"np": np, "_bridge": _bridge, "_h": _np_helpers()}
        self.lines: list[str] = []
        self.names: dict[int, str] = {}
        self.out_dtype = out_dtype
        self.bridged: list[str] = []
        #: squares only summed (emitted as one dot product by their sum)
        self.fused: set[int] = set()
        #: nodes whose array was allocated by their own operation (may be overwritten)
        self.fresh: set[int] = set()
        for n in graph.nodes:
            x = n.args[0] if n.kind == "call" and n.target is _SUM_ALL else None
            if (
                isinstance(x, _Node)
                and x.kind == "call"
                and x.users == 1
                and x.val.is_floating_point()
                and (
                    x.target is aten.square.default
                    or (x.target is aten.pow.Tensor_Scalar and x.args[1] == 2)
                )
            ):
                self.fused.add(id(x))

    def arg(self, a) -> str:
        if isinstance(a, _Node):
            v = a.val
            if a.kind == "const" and isinstance(v, torch.Tensor) and v.dim() == 0:
                if v.dtype in (torch.float32, torch.float64, torch.int64, torch.bool):
                    return _lit(v.item(), self.env)  # a weak Python number, as torch treats it
            return self.names[id(a)]
        if isinstance(a, (list, tuple)) and any(isinstance(x, _Node) for x in a):
            inner = ", ".join(self.arg(x) for x in a)
            return f"[{inner}]"
        return _lit(a, self.env)

    def emit(self) -> Callable:
        g = self.g
        params = []
        for i, n in enumerate(g.inputs):
            self.names[id(n)] = f"a{i}"
            params.append(f"a{i}")
        for n in g.nodes:
            if n.kind == "input":
                continue
            name = f"v{n.id}"
            self.names[id(n)] = name
            if n.kind == "const":
                self.env[f"c{n.id}"] = _const_to_numpy(n.val)
                self.names[id(n)] = f"c{n.id}"
                continue
            if id(n) in self.fused:
                continue
            line = self.inplace(n)
            if line is None and _is_float_scalar(n):
                # 0-d values are Python floats: their arithmetic costs a third of NumPy's
                line = _py_expr(self, n)
                if line is None:
                    line = f"float({self.expr(n)})"
            if line is None:
                line = self.expr(n)
                if (
                    n.target in _FRESH
                    and isinstance(n.val, torch.Tensor)
                    and n.val.dim() > 0
                    and not line.isidentifier()
                    and not line.startswith("np.asarray(")
                ):
                    self.fresh.add(id(n))
            if "\n" in line:  # statements ending with the assignment of the name
                *pre, last = line.split("\n")
                self.lines.extend(f"    {p}" for p in pre)
                line = last
            self.lines.append(f"    {name} = {line}")
        outs = []
        dt = _lit(_np_dtype(self.out_dtype), self.env)
        for o in g.outputs:
            name = self.arg(o)
            if isinstance(o, _Node) and isinstance(o.val, torch.Tensor) and o.val.dim() > 0:
                # NumPy's type promotion can differ from torch's (0-d arrays are not weak)
                self.lines.append(f"    if {name}.dtype != {dt}:")
                self.lines.append(f"        {name} = {name}.astype({dt})")
            outs.append(name)
        src = f"def _compiled({', '.join(params)}):\n" + "\n".join(self.lines)
        src += f"\n    return ({', '.join(outs)},)\n"
        self.source = src
        loc: dict[str, Any] = {}
        exec(compile(src, "<marginalize.compiled>", "exec"), self.env, loc)  # noqa: S102
        return loc["_compiled"]

    def _reusable(self, a, n: _Node) -> bool:
        """``a`` is a fresh array used only by ``n``, of ``n``'s shape and floating dtype."""
        return (
            isinstance(a, _Node)
            and id(a) in self.fresh
            and a.users == 1
            and isinstance(a.val, torch.Tensor)
            and a.val.shape == n.val.shape
            and a.val.dtype == n.val.dtype
            and a.val.is_floating_point()
        )

    def inplace(self, n: _Node) -> str | None:
        """The operation written into the memory of an operand nobody else uses (saves an
        allocation per elementwise operation on large arrays), or ``None``."""
        if not isinstance(n.val, torch.Tensor) or n.val.dim() == 0 or n.kwargs:
            return None
        t = n.target
        fn = _INPLACE_BINARY.get(t)
        if fn is not None and len(n.args) == 2:
            for a in n.args:
                if self._reusable(a, n):
                    self.fresh.add(id(n))
                    x, y = (self.arg(v) for v in n.args)
                    return f"{fn}({x}, {y}, out={self.arg(a)})"
            return None
        if t in (aten.rsub.Scalar, aten.rsub.Tensor) and self._reusable(n.args[0], n):
            self.fresh.add(id(n))
            x = self.arg(n.args[0])
            return f"np.subtract({self.arg(n.args[1])}, {x}, out={x})"
        fn = _INPLACE_UNARY.get(t)
        if fn is not None and len(n.args) == 1 and self._reusable(n.args[0], n):
            self.fresh.add(id(n))
            x = self.arg(n.args[0])
            return f"{fn}({x}, out={x})"
        return None

    def expr(self, n: _Node) -> str:
        t = n.target
        rule = _NP_RULES.get(t)
        if rule is not None:
            out = rule(self, n)
            if out is not None:
                return out
        if t == "assemble":
            return self.assemble(n)
        if t is operator.getitem:
            return f"{self.arg(n.args[0])}[{n.args[1]}]"
        # no NumPy form: run the ATen operation on the same memory
        self.bridged.append(_op_name(t))
        op = _lit(t, self.env)
        args = "".join(f"{self.arg(a)}, " for a in n.args)
        kw = ", ".join(f"{k!r}: {self.arg(v)}" for k, v in n.kwargs.items())
        return f"_bridge({op}, ({args}), {{{kw}}})"

    def assemble(self, n: _Node) -> str:
        shape, entries = n.args
        dtype = _lit(_np_dtype(n.val.dtype), self.env)
        name = f"v{n.id}"
        # entries that write disjoint slices of one axis, covering it: no zeros needed
        tiling = bool(entries) and all(
            all(isinstance(s, slice) and s == slice(None) for s in idx[:-1])
            and isinstance(idx[-1], slice)
            and idx[-1].step in (None, 1)
            for idx, _ in entries
        )
        if tiling:
            dims = {len(idx) - 1 for idx, _ in entries}
            tiling = len(dims) == 1
        if tiling:
            d = dims.pop()
            entries = sorted(entries, key=lambda e: e[0][-1].start or 0)
            pos = 0
            for idx, _ in entries:
                sl = idx[-1]
                if (sl.start or 0) != pos:
                    tiling = False
                    break
                pos = shape[d] if sl.stop is None else min(sl.stop, shape[d])
            tiling = tiling and pos == shape[d]
        lines = [f"{name} = np.{'empty' if tiling else 'zeros'}({shape!r}, {dtype})"]
        op = "=" if tiling else "+="
        for idx, v in entries:
            target = torch.zeros(shape)[idx].shape
            src = self.arg(v)
            if isinstance(v, _Node) and isinstance(v.val, torch.Tensor):
                if v.val.dim() > 0 and tuple(v.val.shape) != tuple(target):
                    src = f"{src}.reshape({tuple(target)!r})"
            lines.append(f"{name}[{_index_text(idx)}] {op} {src}")
        return "\n".join(lines) + f"\n{name}"


def _index_text(idx: tuple) -> str:
    parts = []
    for s in idx:
        if isinstance(s, slice):
            a = "" if s.start is None else str(s.start)
            b = "" if s.stop is None else str(s.stop)
            c = "" if s.step in (None, 1) else f":{s.step}"
            parts.append(f"{a}:{b}{c}")
        else:
            parts.append(str(int(s)))
    return ", ".join(parts) + ("," if len(parts) == 1 else "")


def _is_float_scalar(n: _Node) -> bool:
    v = n.val
    return (
        n.kind == "call"
        and isinstance(v, torch.Tensor)
        and v.dim() == 0
        and v.dtype in (torch.float32, torch.float64)
    )


def _py_expr(e: _NumpyEmitter, n: _Node) -> str | None:
    """A 0-d floating node as Python float arithmetic (``None``: no such form). Every
    tensor argument of such a node is 0-d (a Python float) or a number."""
    t, a = n.target, n.args
    if n.kwargs and set(n.kwargs) != {"alpha"}:
        return None
    if any(isinstance(x, _Node) and (_tensor(x) is None or x.val.dim() != 0) for x in a):
        return None
    e.env.update(_PY_HELPERS)
    args = [e.arg(x) for x in a]
    if t in _ADD or t in _SUB or t in (aten.rsub.Scalar, aten.rsub.Tensor):
        alpha = n.kwargs.get("alpha", 1)
        x, y = args
        if alpha != 1:
            y = f"({_lit(alpha, e.env)} * {y})"
        if t in (aten.rsub.Scalar, aten.rsub.Tensor):
            return f"({args[1]} - {x if alpha == 1 else y})"
        return f"({x} {'+' if t in _ADD else '-'} {y})"
    if t in _MUL:
        return f"({args[0]} * {args[1]})"
    if t in _DIV:
        if n.kwargs or len(a) != 2:
            return None
        if _is_num(a[1]) and a[1] != 0:
            return f"({args[0]} / {args[1]})"
        return f"_pdiv({args[0]}, {args[1]})"
    if t is aten.pow.Tensor_Scalar and _is_num(a[1]):
        if a[1] == 2:
            return f"({args[0]} * {args[0]})"
        return f"_ppow({args[0]}, {args[1]})"
    if t is aten.square.default:
        return f"({args[0]} * {args[0]})"
    if t is aten.reciprocal.default:
        return f"_pdiv(1.0, {args[0]})"
    if t is aten.rsqrt.default:
        return f"_pdiv(1.0, _psqrt({args[0]}))"
    fn = _PY_UNARY.get(t)
    if fn is not None and len(a) == 1:
        return f"{fn}({args[0]})"
    if t is aten.xlogy.Tensor:
        return f"_pxlogy({args[0]}, {args[1]})"
    if t is aten.where.self:
        return f"({args[1]} if {args[0]} else {args[2]})"
    if t is aten._to_copy.default:
        return f"float({args[0]})"
    return None


def _pexp(x):
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _pexpm1(x):
    try:
        return math.expm1(x)
    except OverflowError:
        return math.inf


def _plog(x):
    return math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)


def _plog1p(x):
    return math.log1p(x) if x > -1 else (-math.inf if x == -1 else math.nan)


def _psqrt(x):
    return math.sqrt(x) if x >= 0 else math.nan


def _pdiv(a, b):
    try:
        return a / b
    except ZeroDivisionError:
        if a == 0 or a != a:
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _ppow(a, p):
    try:
        r = a**p
    except OverflowError:
        return math.inf
    except ZeroDivisionError:
        return math.inf
    return math.nan if isinstance(r, complex) else float(r)


def _psigmoid(x):
    try:
        return 1.0 / (1.0 + math.exp(-x))
    except OverflowError:
        return 0.0


def _plgamma(x):
    try:
        return math.lgamma(x)
    except (ValueError, OverflowError):
        return math.inf


def _pxlogy(a, b):
    return 0.0 if a == 0 and b == b else a * _plog(b)


_PY_HELPERS = {
    "_pexp": _pexp,
    "_pexpm1": _pexpm1,
    "_plog": _plog,
    "_plog1p": _plog1p,
    "_psqrt": _psqrt,
    "_pdiv": _pdiv,
    "_ppow": _ppow,
    "_psigmoid": _psigmoid,
    "_plgamma": _plgamma,
    "_pxlogy": _pxlogy,
    "_math": math,
}
_PY_UNARY = {
    aten.neg.default: "-",
    aten.exp.default: "_pexp",
    aten.expm1.default: "_pexpm1",
    aten.log.default: "_plog",
    aten.log1p.default: "_plog1p",
    aten.sqrt.default: "_psqrt",
    aten.tanh.default: "_math.tanh",
    aten.sigmoid.default: "_psigmoid",
    aten.abs.default: "abs",
    aten.lgamma.default: "_plgamma",
}


def _const_to_numpy(v):
    if isinstance(v, torch.Tensor):
        v = v.detach()
        if v.dim() == 0 and v.dtype in (torch.float32, torch.float64):
            return v.numpy()[()]  # a NumPy scalar of the same dtype
        return v.cpu().numpy().copy() if v.dtype != torch.bfloat16 else v
    return v


def _bridge(op, args, kwargs=None):
    """Run ATen ``op`` on NumPy arrays (shared memory where NumPy allows it)."""

    def to_t(a):
        if isinstance(a, np.ndarray):
            try:
                return torch.from_numpy(a)
            except (ValueError, TypeError):
                return torch.from_numpy(np.ascontiguousarray(a))
        if isinstance(a, np.generic):
            return torch.from_numpy(np.asarray(a))
        if isinstance(a, (list, tuple)):
            return type(a)(to_t(x) for x in a)
        return a

    out = op(*to_t(args), **{k: to_t(v) for k, v in (kwargs or {}).items()})
    if isinstance(out, torch.Tensor):
        return out.numpy()
    if isinstance(out, (list, tuple)):
        return type(out)(o.numpy() if isinstance(o, torch.Tensor) else o for o in out)
    return out


class _NpHelpers:
    """Small NumPy functions the generated code calls."""

    @staticmethod
    def assemble(shape, dtype, writes):
        out = np.zeros(shape, dtype)
        for idx, v in writes:
            out[idx] += v
        return out

    @staticmethod
    def tanh_backward(g, y):
        t = np.square(y)
        np.subtract(1, t, out=t)
        np.multiply(t, g, out=t)
        return t

    @staticmethod
    def sigmoid(a):
        sc = _sc()
        if sc is not None:
            return sc.expit(a)
        return np.exp(-np.logaddexp(0, -a))

    @staticmethod
    def softplus(a, beta=1, threshold=20):
        s = a * beta if beta != 1 else a
        out = np.logaddexp(0, s)
        if beta != 1:
            out = out / beta
        return np.where(s > threshold, a, out)

    @staticmethod
    def softplus_backward(g, a, beta=1, threshold=20):
        s = a * beta if beta != 1 else a
        return np.where(s > threshold, g, g * _NpHelpers.sigmoid(s))

    @staticmethod
    def logsumexp(a, axis, keepdims):
        m = np.max(a, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
        return out if keepdims else np.squeeze(out, axis=axis)

    @staticmethod
    def log_softmax(a, dim):
        return a - _NpHelpers.logsumexp(a, dim, True)

    @staticmethod
    def log_softmax_backward(g, out, dim):
        return g - np.exp(out) * np.sum(g, axis=dim, keepdims=True)

    @staticmethod
    def softmax(a, dim):
        e = np.exp(a - np.max(a, axis=dim, keepdims=True))
        return e / np.sum(e, axis=dim, keepdims=True)

    @staticmethod
    def softmax_backward(g, out, dim):
        return out * (g - np.sum(g * out, axis=dim, keepdims=True))

    @staticmethod
    def slice_backward(g, sizes, dim, start, end, step):
        out = np.zeros(sizes, np.asarray(g).dtype)
        idx = (slice(None),) * dim + (slice(start, end, step),)
        out[idx] = g
        return out

    @staticmethod
    def index_put_acc(base, indices, values):
        out = np.array(base, copy=True)
        idx = tuple(slice(None) if i is None else i for i in indices)
        np.add.at(out, idx, values)
        return out

    @staticmethod
    def scatter_add(base, dim, index, src):
        out = np.array(base, copy=True)
        idx = list(np.indices(index.shape, sparse=True))
        idx[dim] = index
        np.add.at(out, tuple(idx), src)
        return out

    @staticmethod
    def sum(a, dims, keepdim):
        if dims is None or len(dims) == 0:
            return np.sum(a, keepdims=keepdim)
        return np.sum(a, axis=tuple(dims), keepdims=keepdim)


def _np_helpers():
    return _NpHelpers


def _sc():
    try:
        import scipy.special as sc
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn and arviz
        return None
    return sc


def _index_src(dim: int, item: str) -> str:
    return "[" + ":, " * dim + item + "]"


def _np_rules() -> dict:
    """ATen operation -> ``(emitter, node) -> NumPy source`` (or ``None``: use the bridge)."""
    r: dict = {}

    def binop(sym):
        def f(e, n):
            x, y = e.arg(n.args[0]), e.arg(n.args[1])
            alpha = n.kwargs.get("alpha", 1)
            if alpha != 1:
                y = f"({_lit(alpha, e.env)} * {y})"
            return f"({x} {sym} {y})"

        return f

    for t in _ADD:
        r[t] = binop("+")
    for t in _SUB:
        r[t] = binop("-")
    for t in _MUL:
        r[t] = binop("*")

    def div(e, n):
        if n.kwargs.get("rounding_mode"):
            return None
        return f"({e.arg(n.args[0])} / {e.arg(n.args[1])})"

    for t in _DIV:
        r[t] = div

    def rsub(e, n):
        alpha = n.kwargs.get("alpha", 1)
        x = e.arg(n.args[0]) if alpha == 1 else f"({_lit(alpha, e.env)} * {e.arg(n.args[0])})"
        return f"({e.arg(n.args[1])} - {x})"

    r[aten.rsub.Scalar] = rsub
    r[aten.rsub.Tensor] = r[aten.rsub.Scalar]

    def unary(fn):
        return lambda e, n: f"{fn}({e.arg(n.args[0])})"

    for t, fn in {
        aten.neg.default: "np.negative",
        aten.exp.default: "np.exp",
        aten.log.default: "np.log",
        aten.log1p.default: "np.log1p",
        aten.expm1.default: "np.expm1",
        aten.sqrt.default: "np.sqrt",
        aten.reciprocal.default: "np.reciprocal",
        aten.abs.default: "np.abs",
        aten.sign.default: "np.sign",
        aten.sgn.default: "np.sign",
        aten.logical_not.default: "np.logical_not",
        aten.tanh.default: "np.tanh",
        aten.sin.default: "np.sin",
        aten.cos.default: "np.cos",
        aten.square.default: "np.square",
        aten.sigmoid.default: "_h.sigmoid",
        aten.log2.default: "np.log2",
        aten.floor.default: "np.floor",
    }.items():
        r[t] = unary(fn)
    r[aten.rsqrt.default] = lambda e, n: f"(1.0 / np.sqrt({e.arg(n.args[0])}))"
    r[aten.relu.default] = lambda e, n: f"np.maximum({e.arg(n.args[0])}, 0)"

    def pow_ts(e, n):
        x, p = e.arg(n.args[0]), n.args[1]
        if isinstance(p, _Node):
            return None
        if p == 2:
            return f"np.square({x})"
        if p == 0.5:
            return f"np.sqrt({x})"
        if p == -1:
            return f"np.reciprocal({x})"
        if p == 1:
            return f"np.asarray({x})"
        return f"np.power({x}, {_lit(p, e.env)})"

    r[aten.pow.Tensor_Scalar] = pow_ts
    r[aten.pow.Tensor_Tensor] = lambda e, n: f"np.power({e.arg(n.args[0])}, {e.arg(n.args[1])})"
    r[aten.pow.Scalar] = lambda e, n: f"np.power({e.arg(n.args[0])}, {e.arg(n.args[1])})"

    sc = _sc()
    if sc is not None:
        for t, fn in {
            aten.lgamma.default: "gammaln",
            aten.digamma.default: "digamma",
            aten.erf.default: "erf",
            aten.erfc.default: "erfc",
            aten.xlogy.Tensor: "xlogy",
        }.items():

            def special(e, n, fn=fn):
                e.env["_sc"] = sc
                args = ", ".join(e.arg(a) for a in n.args)
                return f"_sc.{fn}({args})"

            r[t] = special

    def cmp(sym):
        return lambda e, n: f"({e.arg(n.args[0])} {sym} {e.arg(n.args[1])})"

    for name, sym in (
        ("ge", ">="),
        ("gt", ">"),
        ("le", "<="),
        ("lt", "<"),
        ("eq", "=="),
        ("ne", "!="),
    ):
        for ov in ("Scalar", "Tensor"):
            r[getattr(getattr(aten, name), ov)] = cmp(sym)

    def where(e, n):
        c, x, y = (e.arg(a) for a in n.args)
        if n.val.dim() == 0 and all(
            not isinstance(a, _Node) or a.val.dim() == 0 for a in n.args
        ):  # scalars: a Python conditional
            return f"({x} if {c} else {y})"
        return f"np.where({c}, {x}, {y})"

    r[aten.where.self] = where
    for name, fn in (("logical_and", "np.logical_and"), ("logical_or", "np.logical_or")):
        r[getattr(aten, name).default] = lambda e, n, fn=fn: (
            f"{fn}({e.arg(n.args[0])}, {e.arg(n.args[1])})"
        )
    r[aten.masked_fill.Scalar] = lambda e, n: (
        f"np.where({e.arg(n.args[1])}, {e.arg(n.args[2])}, {e.arg(n.args[0])})"
    )
    r[aten.maximum.default] = lambda e, n: f"np.maximum({e.arg(n.args[0])}, {e.arg(n.args[1])})"
    r[aten.minimum.default] = lambda e, n: f"np.minimum({e.arg(n.args[0])}, {e.arg(n.args[1])})"

    def clamp(e, n):
        lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min")
        hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max")
        return f"np.clip({e.arg(n.args[0])}, {e.arg(lo)}, {e.arg(hi)})"

    r[aten.clamp.default] = clamp
    r[aten.clamp_min.default] = lambda e, n: f"np.maximum({e.arg(n.args[0])}, {e.arg(n.args[1])})"
    r[aten.clamp_max.default] = lambda e, n: f"np.minimum({e.arg(n.args[0])}, {e.arg(n.args[1])})"

    # activations and their backward
    r[aten.tanh_backward.default] = lambda e, n: (
        f"_h.tanh_backward({e.arg(n.args[0])}, {e.arg(n.args[1])})"
    )
    r[aten.sigmoid_backward.default] = lambda e, n: (
        f"({e.arg(n.args[0])} * {e.arg(n.args[1])} * (1 - {e.arg(n.args[1])}))"
    )
    r[aten.threshold_backward.default] = lambda e, n: (
        f"np.where({e.arg(n.args[1])} <= {e.arg(n.args[2])}, 0, {e.arg(n.args[0])})"
    )
    r[aten.softplus.default] = lambda e, n: f"_h.softplus({', '.join(e.arg(a) for a in n.args)})"
    r[aten.softplus_backward.default] = lambda e, n: (
        f"_h.softplus_backward({', '.join(e.arg(a) for a in n.args)})"
    )
    r[aten._log_softmax.default] = lambda e, n: f"_h.log_softmax({e.arg(n.args[0])}, {n.args[1]})"
    r[aten._log_softmax_backward_data.default] = lambda e, n: (
        f"_h.log_softmax_backward({e.arg(n.args[0])}, {e.arg(n.args[1])}, {n.args[2]})"
    )
    r[aten._softmax.default] = lambda e, n: f"_h.softmax({e.arg(n.args[0])}, {n.args[1]})"
    r[aten._softmax_backward_data.default] = lambda e, n: (
        f"_h.softmax_backward({e.arg(n.args[0])}, {e.arg(n.args[1])}, {n.args[2]})"
    )

    def logsumexp(e, n):
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        return f"_h.logsumexp({e.arg(n.args[0])}, {tuple(dims)!r}, {bool(keep)})"

    r[aten.logsumexp.default] = logsumexp

    # linear algebra
    def mm(e, n):
        a, b = n.args[:2]
        if _tensor(a) is not None and _tensor(b) is not None:
            if a.val.dim() >= 2 and b.val.dim() >= 2 and a.val.shape[-1] == 1:
                # an outer product: a broadcast multiply (BLAS is slow at k = 1)
                return f"({e.arg(a)} * {e.arg(b)})"
        return f"({e.arg(a)} @ {e.arg(b)})"

    r[aten.mm.default] = mm
    r[aten.bmm.default] = r[aten.mm.default]
    r[aten.mv.default] = r[aten.mm.default]
    r[aten.matmul.default] = r[aten.mm.default]
    r[aten.dot.default] = lambda e, n: f"np.dot({e.arg(n.args[0])}, {e.arg(n.args[1])})"

    def addmm(e, n):
        beta, alpha = n.kwargs.get("beta", 1), n.kwargs.get("alpha", 1)
        c, a, b = (e.arg(x) for x in n.args[:3])
        prod = f"({a} @ {b})" if alpha == 1 else f"({alpha!r} * ({a} @ {b}))"
        return f"({prod} + {c})" if beta == 1 else f"({prod} + {beta!r} * {c})"

    r[aten.addmm.default] = addmm
    r[aten.baddbmm.default] = addmm

    # reductions
    def sum_dims(e, n):
        if n.kwargs.get("dtype") is not None:
            return None
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        dims = None if dims is None or len(dims) == 0 else tuple(dims)
        x = n.args[0]
        xv = _tensor(x)
        if xv is not None and xv.dim() >= 2 and dims is not None and len(dims) == 1:
            d = dims[0] % xv.dim()
            if xv.dtype in (torch.float32, torch.float64) and d >= xv.dim() - 2:
                # a sum over one of the last two axes is a product with a vector of ones
                ones = _lit(np.ones(xv.shape[d], _np_dtype(xv.dtype)), e.env)
                prod = f"({ones} @ {e.arg(x)})" if d == xv.dim() - 2 else f"({e.arg(x)} @ {ones})"
                if keep:
                    return f"{prod}.reshape({tuple(n.val.shape)!r})"
                return prod
        if xv is not None and xv.dim() > 0:
            return f"{e.arg(x)}.sum({dims!r}, keepdims={bool(keep)})"
        return f"np.sum({e.arg(x)}, axis={dims!r}, keepdims={bool(keep)})"

    def sum_all(e, n):
        if n.kwargs.get("dtype") is not None:
            return None
        x = n.args[0]
        if isinstance(x, _Node) and id(x) in e.fused:  # sum of squares: one dot product
            root = x.args[0]
            while (
                root.kind == "call"
                and root.target
                in (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
                and root.val.dim() != 1
            ):
                root = root.args[0]
            s = e.arg(root)
            if root.val.dim() != 1:
                s = f"{s}.ravel()"
            return f"({s} @ {s})"
        if isinstance(x, _Node) and isinstance(x.val, torch.Tensor) and x.val.dim() > 0:
            return f"{e.arg(x)}.sum()"
        return f"np.sum({e.arg(x)})"

    r[aten.sum.dim_IntList] = sum_dims
    r[_SUM_ALL] = sum_all

    def mean_dims(e, n):
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        dims = None if dims is None or len(dims) == 0 else tuple(dims)
        return f"np.mean({e.arg(n.args[0])}, axis={dims!r}, keepdims={bool(keep)})"

    r[aten.mean.dim] = mean_dims
    r[aten.mean.default] = lambda e, n: f"np.mean({e.arg(n.args[0])})"

    def amax(e, n):
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", ())
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        dims = None if dims is None or len(dims) == 0 else tuple(dims)
        return f"np.max({e.arg(n.args[0])}, axis={dims!r}, keepdims={bool(keep)})"

    r[aten.amax.default] = amax

    # shapes (the output shape is known: no -1 to resolve)
    def reshape(e, n):
        x = n.args[0]
        if isinstance(x, _Node) and isinstance(x.val, torch.Tensor) and x.val.dim() > 0:
            if n.val.dim() == 0:  # a NumPy scalar (cheaper to compute with than a 0-d array)
                return f"{e.arg(x)}.ravel()[0]"
            return f"{e.arg(x)}.reshape({tuple(n.val.shape)!r})"
        return f"np.reshape({e.arg(x)}, {tuple(n.val.shape)!r})"

    for t in (
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.unsqueeze.default,
        aten.view_copy.default,
        aten.unsqueeze_copy.default,
        aten.squeeze_copy.dim,
        aten.squeeze_copy.dims,
    ):
        r[t] = reshape
    r[aten.expand.default] = lambda e, n: (
        f"np.broadcast_to({e.arg(n.args[0])}, {tuple(n.val.shape)!r})"
    )
    r[aten.expand_copy.default] = r[aten.expand.default]

    def same(e, n):
        return e.arg(n.args[0])

    for t in (
        aten.clone.default,
        aten.alias.default,
        aten.detach.default,
        aten.lift_fresh_copy.default,
        aten.contiguous.default,
    ):
        r[t] = same

    def to_copy(e, n):
        src = n.args[0]
        if isinstance(src, _Node) and src.val.dtype == n.val.dtype:
            return e.arg(src)
        if n.val.dtype in (torch.bfloat16, torch.complex64, torch.complex128):
            return None
        return f"np.asarray({e.arg(src)}).astype({_lit(_np_dtype(n.val.dtype), e.env)})"

    r[aten._to_copy.default] = to_copy
    r[aten.t.default] = lambda e, n: f"{e.arg(n.args[0])}.T"
    r[aten.permute.default] = lambda e, n: f"np.transpose({e.arg(n.args[0])}, {tuple(n.args[1])!r})"
    r[aten.transpose.int] = lambda e, n: (
        f"np.swapaxes({e.arg(n.args[0])}, {n.args[1]}, {n.args[2]})"
    )

    def slice_(e, n):
        x, dim = n.args[0], n.args[1] if len(n.args) > 1 else 0
        start = n.args[2] if len(n.args) > 2 else None
        end = n.args[3] if len(n.args) > 3 else None
        step = n.args[4] if len(n.args) > 4 else 1
        if any(isinstance(v, _Node) for v in (start, end, step)):
            return None
        dim = dim % x.val.dim()
        s = f"{'' if start is None else start}:{'' if end is None else end}:{step}"
        return f"{e.arg(x)}{_index_src(dim, s)}"

    r[aten.slice.Tensor] = slice_

    def select(e, n):
        x, dim, i = n.args
        if isinstance(i, _Node):
            return None
        return f"{e.arg(x)}{_index_src(dim % x.val.dim(), str(i))}"

    r[aten.select.int] = select
    r[aten.slice_backward.default] = lambda e, n: (
        f"_h.slice_backward({', '.join(e.arg(a) for a in n.args)})"
    )

    def index(e, n):
        x, idx = n.args
        parts = ", ".join("slice(None)" if i is None else e.arg(i) for i in idx)
        return f"{e.arg(x)}[({parts},)]"

    r[aten.index.Tensor] = index

    def index_put(e, n):
        base, idx, vals = n.args[:3]
        acc = n.args[3] if len(n.args) > 3 else n.kwargs.get("accumulate", False)
        if not acc:
            return None
        parts = ", ".join("None" if i is None else e.arg(i) for i in idx)
        return f"_h.index_put_acc({e.arg(base)}, ({parts},), {e.arg(vals)})"

    r[aten.index_put.default] = index_put
    r[aten.gather.default] = lambda e, n: (
        f"np.take_along_axis({e.arg(n.args[0])}, {e.arg(n.args[2])}, {n.args[1]})"
    )
    r[aten.scatter_add.default] = lambda e, n: (
        f"_h.scatter_add({e.arg(n.args[0])}, {n.args[1]}, {e.arg(n.args[2])}, {e.arg(n.args[3])})"
    )
    r[aten.index_select.default] = lambda e, n: (
        f"np.take({e.arg(n.args[0])}, {e.arg(n.args[2])}, {n.args[1]})"
    )

    def cat(e, n):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        parts = ", ".join(e.arg(a) for a in n.args[0])
        return f"np.concatenate(({parts},), {dim})"

    r[aten.cat.default] = cat

    def stack(e, n):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        parts = ", ".join(e.arg(a) for a in n.args[0])
        return f"np.stack(({parts},), {dim})"

    r[aten.stack.default] = stack
    return r


_NP_RULES = _np_rules()

#: ATen operation -> NumPy ufunc written with ``out=`` into an operand's memory
_INPLACE_BINARY = {
    **dict.fromkeys(_ADD, "np.add"),
    **dict.fromkeys(_SUB, "np.subtract"),
    **dict.fromkeys(_MUL, "np.multiply"),
    **dict.fromkeys(_DIV, "np.true_divide"),
}
_INPLACE_UNARY = {
    aten.neg.default: "np.negative",
    aten.exp.default: "np.exp",
    aten.log.default: "np.log",
    aten.log1p.default: "np.log1p",
    aten.expm1.default: "np.expm1",
    aten.sqrt.default: "np.sqrt",
    aten.reciprocal.default: "np.reciprocal",
    aten.abs.default: "np.abs",
    aten.tanh.default: "np.tanh",
    aten.sin.default: "np.sin",
    aten.cos.default: "np.cos",
    aten.square.default: "np.square",
}
#: operations whose NumPy form allocates its result
_FRESH = (
    set(_INPLACE_BINARY)
    | set(_INPLACE_UNARY)
    | {
        aten.mm.default,
        aten.bmm.default,
        aten.matmul.default,
        aten.addmm.default,
        aten.baddbmm.default,
        aten.tanh_backward.default,
        aten.sigmoid_backward.default,
        aten.threshold_backward.default,
        aten.sum.dim_IntList,
        aten.where.self,
        aten.cat.default,
        aten.sigmoid.default,
        aten.rsqrt.default,
        aten.relu.default,
        aten.pow.Tensor_Tensor,
        "assemble",
    }
)


class _TorchEmitter(_NumpyEmitter):
    """Writes a graph as direct ATen calls (any device and dtype)."""

    def __init__(self, graph: _Graph, out_dtype: torch.dtype):
        super().__init__(graph, out_dtype)
        self.env = {"torch": torch}

    def emit(self) -> Callable:
        g = self.g
        params = []
        for i, n in enumerate(g.inputs):
            self.names[id(n)] = f"a{i}"
            params.append(f"a{i}")
        for n in g.nodes:
            if n.kind == "input":
                continue
            if n.kind == "const":
                self.env[f"c{n.id}"] = n.val
                self.names[id(n)] = f"c{n.id}"
                continue
            self.names[id(n)] = f"v{n.id}"
            self.lines.append(f"    v{n.id} = {self.expr(n)}")
        outs = ", ".join(self.arg(o) for o in g.outputs)
        src = f"def _compiled({', '.join(params)}):\n" + "\n".join(self.lines)
        src += f"\n    return ({outs},)\n"
        self.source = src
        loc: dict[str, Any] = {}
        exec(compile(src, "<marginalize.compiled>", "exec"), self.env, loc)  # noqa: S102
        return loc["_compiled"]

    def expr(self, n: _Node) -> str:
        t = n.target
        if t == "assemble":
            shape, entries = n.args
            self.env["_assemble"] = _torch_assemble
            writes = ", ".join(f"({_lit(idx, self.env)}, {self.arg(v)})" for idx, v in entries)
            like = self.arg(entries[0][1])
            return f"_assemble({shape!r}, {like}, ({writes},))"
        if t is operator.getitem:
            return f"{self.arg(n.args[0])}[{n.args[1]}]"
        op = _lit(t, self.env)
        args = ", ".join(self.arg(a) for a in n.args)
        kw = ", ".join(f"{k}={self.arg(v)}" for k, v in n.kwargs.items())
        return f"{op}({args}{', ' if kw else ''}{kw})"


def _torch_assemble(shape, like, writes):
    out = like.new_zeros(shape)
    for idx, v in writes:
        out[idx] += v
    return out
