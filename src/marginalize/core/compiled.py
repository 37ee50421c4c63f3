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
>>> x = torch.randn(20, 2, dtype=torch.float64); y = x.sum(1)
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
import operator
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["CompiledLogJoint", "CaptureError", "capture_graph"]

log = logging.getLogger(__name__)

aten = torch.ops.aten

#: relative tolerance of the check against the Pyro trace (value and gradient), per dtype
_RTOL = {torch.float64: 1e-8, torch.float32: 2e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


class CaptureError(Exception):
    """The model's log joint could not be compiled (the reason is the message)."""


# ------------------------------------------------------------------------------------------
# the graph
# ------------------------------------------------------------------------------------------
class _Node:
    """One value of the graph: an input, a constant, or an operation on earlier nodes."""

    __slots__ = ("id", "kind", "target", "args", "kwargs", "val", "users")

    def __init__(self, kind: str, target=None, args=(), kwargs=None, val=None):
        self.id = -1
        self.kind = kind  # "input" | "const" | "call"
        self.target = target  # an OpOverload, operator.getitem, or a string for our own ops
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.val = val  # value at the recording point (a tensor, a tuple, or a number)
        self.users = 0

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        if self.kind != "call":
            return f"%{self.id}<{self.kind}>"
        return f"%{self.id} = {_op_name(self.target)}{self.args}"


def _op_name(target) -> str:
    if isinstance(target, str):
        return target
    if target is operator.getitem:
        return "getitem"
    return str(target)


def _shape(v) -> tuple[int, ...] | None:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _map_args(obj, fn):
    if isinstance(obj, _Node):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_args(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_args(v, fn) for k, v in obj.items()}
    return obj


def _nodes_in(obj) -> list[_Node]:
    out: list[_Node] = []
    _map_args(obj, out.append)
    return out


class _Graph:
    """A straight-line program: inputs, nodes in execution order, outputs."""

    def __init__(self, inputs: list[_Node], nodes: list[_Node], outputs: list[_Node]):
        self.inputs = inputs
        self.nodes = nodes
        self.outputs = outputs

    def signature(self) -> list:
        """The operations and their literal arguments (no values): equal for two recordings
        of the same computation."""
        ids = {n: i for i, n in enumerate(self.nodes)}

        def lit(a):
            return _map_args(a, lambda n: ("%", ids.get(n, -1)))

        return [
            (n.kind, _op_name(n.target), lit(n.args), lit(n.kwargs), _shape(n.val))
            for n in self.nodes
        ] + [("out", [ids.get(o, -1) for o in self.outputs])]

    def count_users(self) -> None:
        for n in self.nodes:
            n.users = 0
        for n in self.nodes:
            for a in _nodes_in((n.args, n.kwargs)):
                a.users += 1
        for o in self.outputs:
            o.users += 1

    def dce(self) -> None:
        live: set[int] = set()
        stack = list(self.outputs)
        while stack:
            n = stack.pop()
            if id(n) in live:
                continue
            live.add(id(n))
            stack.extend(_nodes_in((n.args, n.kwargs)))
        self.nodes = [n for n in self.nodes if id(n) in live or n.kind == "input"]
        self.count_users()

    def renumber(self) -> None:
        for i, n in enumerate(self.nodes):
            n.id = i


def _is_random(target) -> bool:
    return hasattr(target, "tags") and torch.Tag.nondeterministic_seeded in target.tags


def _from_fx(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> _Graph:
    """Our graph from a ``make_fx`` recording, with every node's value at the inputs."""
    values: dict[torch.fx.Node, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    with torch.no_grad():
        _Recorder(gm).run(*example_inputs)
    mapping: dict[torch.fx.Node, _Node] = {}
    inputs, nodes, outputs = [], [], []

    def conv(a):
        if isinstance(a, torch.fx.Node):
            return mapping[a]
        if isinstance(a, (list, tuple)):
            return type(a)(conv(x) for x in a)
        if isinstance(a, dict):
            return {k: conv(v) for k, v in a.items()}
        return a

    for fn in gm.graph.nodes:
        if fn.op == "placeholder":
            node = _Node("input", val=values[fn])
            inputs.append(node)
        elif fn.op == "get_attr":
            node = _Node("const", val=values[fn])
        elif fn.op == "call_function":
            node = _Node("call", fn.target, conv(fn.args), conv(fn.kwargs), values[fn])
        elif fn.op == "output":
            outputs = list(conv(fn.args[0]))
            continue
        else:  # pragma: no cover - make_fx emits only the kinds above
            raise CaptureError(f"unexpected graph node {fn.op}")
        mapping[fn] = node
        nodes.append(node)
    g = _Graph(inputs, nodes, outputs)
    g.renumber()
    g.count_users()
    return g


# ------------------------------------------------------------------------------------------
# simplification
# ------------------------------------------------------------------------------------------
#: operations that only rename or reshape their first argument
_VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.expand.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
    aten.contiguous.default,
    aten._to_copy.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.view_copy.default,
    aten.expand_copy.default,
    aten.unsqueeze_copy.default,
    aten.squeeze_copy.dim,
    aten.squeeze_copy.dims,
}
#: operations whose value depends only on the shapes of their tensor arguments
_SHAPE_ONLY = {
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.new_empty.default,
}
_ADD = {aten.add.Tensor, aten.add.Scalar}
_SUB = {aten.sub.Tensor, aten.sub.Scalar}
_MUL = {aten.mul.Tensor, aten.mul.Scalar}
_DIV = {aten.div.Tensor, aten.div.Scalar}
_ELEMENTWISE_BINARY = _ADD | _SUB | _MUL | _DIV
_SUM_ALL = aten.sum.default


def _uniform_scalar(v) -> float | int | bool | None:
    """The single number a constant tensor repeats, as a Python number, else ``None``."""
    if isinstance(v, (bool, int, float)):
        return v
    if not isinstance(v, torch.Tensor) or v.numel() == 0 or v.is_complex():
        return None
    flat = v.reshape(-1)
    first = flat[0]
    if v.numel() > 1 and not bool((flat == first).all()):
        return None
    if bool(torch.isnan(first)) if v.is_floating_point() else False:
        return None
    return first.item()


#: elementwise operations of one tensor (``op(expand(x)) == expand(op(x))``)
_UNARY = {
    aten.neg.default,
    aten.exp.default,
    aten.log.default,
    aten.log1p.default,
    aten.expm1.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.reciprocal.default,
    aten.abs.default,
    aten.sign.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.square.default,
    aten.pow.Tensor_Scalar,
    aten.lgamma.default,
    aten.digamma.default,
    aten.erf.default,
    aten.erfc.default,
    aten.sin.default,
    aten.cos.default,
    aten.relu.default,
    aten.softplus.default,
    aten.logical_not.default,
    aten.ge.Scalar,
    aten.gt.Scalar,
    aten.le.Scalar,
    aten.lt.Scalar,
    aten.eq.Scalar,
    aten.ne.Scalar,
    aten.log2.default,
}
#: elementwise operations of several tensors (broadcasting)
_NARY = _ELEMENTWISE_BINARY | {
    aten.pow.Tensor_Tensor,
    aten.maximum.default,
    aten.minimum.default,
    aten.where.self,
    aten.xlogy.Tensor,
    aten.ge.Tensor,
    aten.gt.Tensor,
    aten.le.Tensor,
    aten.lt.Tensor,
    aten.eq.Tensor,
    aten.ne.Tensor,
    aten.rsub.Scalar,
    aten.rsub.Tensor,
}


_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _broadcast_source(a):
    """``p`` when ``a`` is ``expand(p)`` or a reshape of a 0-d ``p`` (a broadcast of a
    smaller tensor), else ``None``."""
    if not isinstance(a, _Node) or a.kind != "call" or _tensor(a) is None:
        return None
    if a.target is aten.expand.default and _tensor(a.args[0]) is not None:
        return a.args[0]
    if a.target in _RESHAPES and _tensor(a.args[0]) is not None and a.args[0].val.dim() == 0:
        return a.args[0]
    return None


def _is_num(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _tensor(a) -> torch.Tensor | None:
    return a.val if isinstance(a, _Node) and isinstance(a.val, torch.Tensor) else None


class _Simplifier:
    """Constant folding and algebraic rewrites on a :class:`_Graph` (in execution order).

    Every rewrite keeps each node's value at the recording point (``val``) exact, so later
    rules can rely on shapes and dtypes; new nodes get their values by running their
    operation on their arguments' values.
    """

    def __init__(self, graph: _Graph):
        self.g = graph
        self.changed = False

    def run(self) -> _Graph:
        g = self.g
        for _ in range(12):
            self.changed = False
            self._fold_constants()
            self._rewrite()
            self._cse()
            g.dce()
            if not self.changed:
                break
        for extra in (self._merge_column_sums, self._rank_one_backward, self._scalar_sums):
            self.changed = False
            extra()
            for _ in range(12):
                self._fold_constants()
                self._rewrite()
                self._cse()
                g.dce()
                if not self.changed:
                    break
                self.changed = False
        self._assemble()
        g.dce()
        g.renumber()
        return g

    # -- helpers ------------------------------------------------------------------------------
    def _scalar(self, a):
        """``a`` as a scalar operand: a Python number, a constant repeating one number (as that
        number), a 0-d floating node; else ``None``."""
        if _is_num(a):
            return a
        if isinstance(a, _Node):
            v = a.val
            if a.kind == "const":
                c = _uniform_scalar(v)
                return c if _is_num(c) else None
            if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point():
                return a
        return None

    def _new(self, target, args, kwargs=None, *, before: _Node) -> _Node:
        """A new node computing ``target(*args)``, placed before ``before``."""
        kwargs = kwargs or {}

        def val(a):
            return a.val if isinstance(a, _Node) else a

        with torch.no_grad():
            v = target(*_map_args(args, val), **_map_args(kwargs, val))
        node = _Node("call", target, args, kwargs, v)
        i = self.g.nodes.index(before)
        self.g.nodes.insert(i, node)
        for a in _nodes_in((args, kwargs)):
            a.users += 1
        self.changed = True
        return node

    def _scalar_op(self, target, a, b, *, before: _Node):
        """``a op b`` for two scalar operands (a number when both are numbers)."""
        if _is_num(a) and _is_num(b):
            if target is aten.mul.Tensor:
                return a * b
            if target is aten.add.Tensor:
                return a + b
            if target is aten.div.Tensor and b != 0:
                return a / b
            return None
        if _is_num(a):
            a, b = b, a
            if target is aten.div.Tensor:
                return None
        return self._new(target, (a, b), before=before)

    def _set(self, n: _Node, target, args, kwargs=None) -> _Node:
        n.target, n.args, n.kwargs = target, tuple(args), dict(kwargs or {})
        self.changed = True
        return n

    # -- constants ------------------------------------------------------------------------------
    def _fold_constants(self) -> None:
        for n in self.g.nodes:
            if n.kind != "call" or _is_random(n.target):
                continue
            args = _nodes_in((n.args, n.kwargs))
            if n.target in _SHAPE_ONLY or all(a.kind == "const" for a in args):
                n.kind, n.target, n.args, n.kwargs = "const", None, (), {}
                self.changed = True

    # -- rewrites -------------------------------------------------------------------------------
    def _rewrite(self) -> None:
        g = self.g
        g.count_users()
        repl: dict[int, Any] = {}

        def sub(a):
            while isinstance(a, _Node) and id(a) in repl:
                a = repl[id(a)]
            return a

        for n in list(g.nodes):
            if n.kind != "call":
                continue
            n.args = _map_args(n.args, sub)
            n.kwargs = _map_args(n.kwargs, sub)
            if not isinstance(n.val, torch.Tensor):
                continue
            r = self._rule(n)
            if r is not None and r is not n:
                repl[id(n)] = r
                self.changed = True
        outs = []
        for o in g.outputs:
            o = sub(o)
            if not isinstance(o, _Node):
                o = _Node("const", val=torch.as_tensor(o))
                g.nodes.insert(0, o)
            outs.append(o)
        g.outputs = outs

    def _rule(self, n: _Node):
        t, a, val = n.target, n.args, n.val
        if t in _VIEWS:
            x = _tensor(a[0])
            if x is not None and x.shape == val.shape and x.dtype == val.dtype:
                return a[0]
            # a view of a view: one reshape
            if (
                t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
                and isinstance(a[0], _Node)
                and a[0].kind == "call"
                and a[0].target in (aten.view.default, aten._unsafe_view.default)
            ):
                return self._set(n, t, (a[0].args[0], *a[1:]), n.kwargs)
            return None
        if t is aten.cat.default:
            return self._cat_of_slices(n)
        if t is aten.pow.Tensor_Scalar and _is_num(a[1]):
            if a[1] == 1 and _tensor(a[0]) is not None and a[0].val.shape == val.shape:
                return a[0]
            if a[1] == 2:
                return self._set(n, aten.square.default, (a[0],))
        if t in _UNARY:
            return self._unary(n)
        if t in _NARY:
            r = self._drop_expand(n)
            if r is not None:
                return r
            if t is aten.add.Tensor and len(a) == 2 and not n.kwargs:
                r = self._affine(n)
                if r is not None:
                    return r
            if t in _ELEMENTWISE_BINARY and len(a) == 2:
                return self._binary(n)
            return None
        if t is _SUM_ALL or (
            t is aten.sum.dim_IntList
            and n.kwargs.get("dtype") is None
            and val.dim() == 0
            and not (a[2] if len(a) > 2 else n.kwargs.get("keepdim", False))
        ):
            return self._sum_all(n)
        if (
            t is aten.sum.dim_IntList
            and n.kwargs.get("dtype") is None
            and val.numel() == 1
            and _tensor(a[0]) is not None
            and a[0].val.dtype == val.dtype
        ):  # a sum to one element: the sum of all, reshaped
            total = self._new(_SUM_ALL, (a[0],), before=n)
            return self._set(n, aten.view.default, (total, list(val.shape)))
        return None

    def _unary(self, n: _Node):
        x = n.args[0]
        if not isinstance(x, _Node) or x.kind != "call":
            return None
        src = _broadcast_source(x)
        if src is not None:
            # op(expand(p)) = expand(op(p)): the operation on the smaller tensor
            inner = self._new(n.target, (src, *n.args[1:]), n.kwargs, before=n)
            return self._set(n, aten.expand.default, (inner, list(n.val.shape)))
        if n.target is aten.neg.default:
            if x.target is aten.neg.default:
                return x.args[0]
            if x.target in _MUL and len(x.args) == 2 and self._scalar(x.args[1]) is not None:
                s = self._scalar(x.args[1])
                neg = -s if _is_num(s) else self._new(aten.neg.default, (s,), before=n)
                return self._set(n, aten.mul.Tensor, (x.args[0], neg))
        return None

    def _small(self, a, before: _Node):
        """The smaller tensor an operand is a broadcast of: ``p`` for ``expand(p)``, a 0-d
        constant for a constant repeating one number; else ``None``."""
        if not isinstance(a, _Node) or not isinstance(a.val, torch.Tensor) or a.val.dim() == 0:
            return None
        src = _broadcast_source(a)
        if src is not None:
            return src
        if a.kind == "const":
            c = _uniform_scalar(a.val)
            if c is not None:
                node = _Node("const", val=torch.tensor(c, dtype=a.val.dtype))
                self.g.nodes.insert(self.g.nodes.index(before), node)
                return node
        return None

    def _drop_expand(self, n: _Node):
        """In a broadcasting operation an operand ``expand(p)`` can be ``p`` when another
        operand has the result's shape; when every tensor operand is an expand (or a constant
        repeating one number), the operation runs on the small tensors and its result is
        expanded."""
        out = n.val
        args = list(n.args)
        tensors = [i for i, a in enumerate(args) if _tensor(a) is not None]
        is_expand = {
            i
            for i in tensors
            if args[i].val.dim() > 0
            and (
                _broadcast_source(args[i]) is not None
                or (args[i].kind == "const" and _uniform_scalar(args[i].val) is not None)
            )
        }
        real_expands = [i for i in is_expand if args[i].kind == "call"]
        full = [i for i in tensors if i not in is_expand and args[i].val.shape == out.shape]
        if full and real_expands:
            for i in real_expands:
                args[i] = _broadcast_source(args[i])
            return self._set(n, n.target, args, n.kwargs)
        if full or not is_expand:
            return None
        if not real_expands and all(args[i].kind == "const" for i in tensors):
            return None  # constants: folded
        for i in is_expand:
            args[i] = self._small(args[i], n)
        small = self._new(n.target, args, n.kwargs, before=n)
        if small.val.shape == out.shape:
            return small
        return self._set(n, aten.expand.default, (small, list(out.shape)))

    def _cat_of_slices(self, n: _Node):
        """Joining consecutive slices of one vector along the first axis: one slice, reshaped
        (e.g. a layer's weight and bias stored next to each other in ``z``)."""
        parts = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if n.val.dim() == 0 or dim % n.val.dim() != 0 or len(parts) < 2:
            return None
        base, pos, start = None, None, None
        for p in parts:
            q = p
            while (
                isinstance(q, _Node)
                and q.kind == "call"
                and q.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
            ):
                q = q.args[0]
            if not (isinstance(q, _Node) and q.kind == "call" and q.target is aten.slice.Tensor):
                return None
            src, d = q.args[0], q.args[1] if len(q.args) > 1 else 0
            lo = q.args[2] if len(q.args) > 2 else None
            hi = q.args[3] if len(q.args) > 3 else None
            step = q.args[4] if len(q.args) > 4 else 1
            st = _tensor(src)
            if st is None or st.dim() != 1 or d != 0 or step != 1 or not _is_num(lo):
                return None
            if not _is_num(hi) or hi - lo != p.val.numel():
                return None
            if base is None:
                base, start = src, lo
            elif src is not base or lo != pos:
                return None
            pos = hi
        piece = self._new(aten.slice.Tensor, (base, 0, start, pos), before=n)
        return self._set(n, aten.view.default, (piece, list(n.val.shape)))

    def _affine(self, n: _Node):
        """``C @ W + b`` with constant inputs ``C`` (N, K): one product ``[C, 1] @ [W; b]``
        (a network's first layer: no separate pass to add the bias, and no outer product
        when ``K = 1``)."""
        for m, b in (n.args, n.args[::-1]):
            if not (isinstance(m, _Node) and m.kind == "call" and m.target is aten.mm.default):
                continue
            c, w = m.args
            bt, wt = _tensor(b), _tensor(w)
            if not (isinstance(c, _Node) and c.kind == "const") or bt is None or wt is None:
                continue
            if m.users != 1 or not c.val.is_floating_point() or c.val.dtype != wt.dtype:
                continue
            h = wt.shape[1]
            if tuple(bt.shape) not in ((h,), (1, h)) or n.val.shape != m.val.shape:
                continue
            if wt.numel() + bt.numel() >= n.val.numel():  # copying [W; b] would cost more
                continue
            ones = torch.ones(c.val.shape[0], 1, dtype=c.val.dtype, device=c.val.device)
            c_aug = _Node("const", val=torch.cat([c.val, ones], 1))
            self.g.nodes.insert(self.g.nodes.index(n), c_aug)
            row = self._new(aten.view.default, (b, [1, h]), before=n) if bt.dim() == 1 else b
            wb = self._new(aten.cat.default, ([w, row], 0), before=n)
            return self._set(n, aten.mm.default, (c_aug, wb))
        return None

    def _binary(self, n: _Node):
        """Uniform constants become scalars; identities; chains of scalar factors."""
        t = n.target
        x, y = n.args
        out = n.val
        alpha = n.kwargs.get("alpha", 1)
        if isinstance(alpha, _Node) or not _is_num(alpha) and alpha is not None:
            return None
        # a constant operand that repeats one number and does not widen the result
        for i in (0, 1):
            p, q = (x, y) if i == 0 else (y, x)
            if isinstance(p, _Node) and p.kind == "const":
                c = self._scalar(p)
                qt = _tensor(q)
                if (
                    _is_num(c)
                    and qt is not None
                    and qt.shape == out.shape
                    and qt.dtype == out.dtype
                ):
                    if i == 0:
                        x = c
                    else:
                        y = c
                    self.changed = True
        if alpha != 1 and _is_num(y):
            y, alpha = y * alpha, 1
        kw = {} if alpha == 1 else {"alpha": alpha}
        n.args, n.kwargs = (x, y), kw
        if alpha != 1:
            return None
        xt, yt = _tensor(x), _tensor(y)
        same_x = xt is not None and xt.shape == out.shape and xt.dtype == out.dtype
        same_y = yt is not None and yt.shape == out.shape and yt.dtype == out.dtype
        sy, sx = self._scalar(y), self._scalar(x)
        if t in _ADD or t in _SUB:
            add = t in _ADD
            if same_x and _is_num(y) and y == 0:
                return x
            if add and same_y and _is_num(x) and x == 0:
                return y
            # x + (-y) = x - y, (-x) + y = y - x, x - (-y) = x + y
            if isinstance(y, _Node) and y.kind == "call" and y.target is aten.neg.default:
                tgt = aten.sub.Tensor if add else aten.add.Tensor
                return self._set(n, tgt, (x, y.args[0]))
            if add and isinstance(x, _Node) and x.kind == "call" and x.target is aten.neg.default:
                return self._set(n, aten.sub.Tensor, (y, x.args[0]))
            return None
        if t in _MUL:
            if same_x and _is_num(y) and y == 1:
                return x
            if same_y and _is_num(x) and x == 1:
                return y
            if sx is not None and sy is None:  # the scalar on the right
                x, y, sx, sy = y, x, sy, sx
                n.args = (x, y)
            if sy is None or not isinstance(x, _Node):
                return None
            if same_x and _is_num(sy) and sy == -1:
                return self._set(n, aten.neg.default, (x,))
            if x.kind == "call" and len(x.args) == 2 and not x.kwargs:
                inner = self._scalar(x.args[1])
                if x.target in _MUL and inner is not None:
                    s = self._scalar_op(aten.mul.Tensor, inner, sy, before=n)
                    if s is not None:
                        return self._set(n, aten.mul.Tensor, (x.args[0], s))
                if x.target in _DIV and inner is not None and _is_num(sy):
                    s = self._scalar_op(aten.div.Tensor, sy, inner, before=n)
                    if s is not None:
                        return self._set(n, aten.mul.Tensor, (x.args[0], s))
            if x.kind == "call" and x.target is aten.neg.default:
                s = -sy if _is_num(sy) else self._new(aten.neg.default, (sy,), before=n)
                return self._set(n, aten.mul.Tensor, (x.args[0], s))
            return None
        if t in _DIV:
            if same_x and _is_num(y) and y == 1:
                return x
            if _is_num(y) and y != 0 and out.is_floating_point() and xt is not None:
                return self._set(n, aten.mul.Tensor, (x, 1.0 / y))
        return None

    def _sum_all(self, n: _Node):
        """The sum of all elements: scalar operations move outside the sum (``sum(x * s) =
        sum(x) * s``, ``sum(x - s) = sum(x) - s * numel``), a sum of a broadcast is a multiple
        of the smaller sum, and reshapes before a full sum are dropped."""
        x = n.args[0]
        if n.target is not _SUM_ALL:
            return self._set(n, _SUM_ALL, (x,))
        xt = _tensor(x)
        if xt is None:
            return None
        if xt.dim() == 0 and xt.dtype == n.val.dtype:
            return x
        if x.kind != "call":
            return None
        t = x.target
        if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
            return self._set(n, _SUM_ALL, (x.args[0],))
        if t in (aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default):
            return self._set(n, _SUM_ALL, (x.args[0],))
        if t is aten.sum.dim_IntList and x.kwargs.get("dtype") is None:
            return self._set(n, _SUM_ALL, (x.args[0],))
        if t is aten.expand.default and _tensor(x.args[0]) is not None:
            small = x.args[0]
            k = xt.numel() // max(small.val.numel(), 1)
            inner = self._new(_SUM_ALL, (small,), before=n)
            return inner if k == 1 else self._set(n, aten.mul.Tensor, (inner, k))
        if t is aten.neg.default:
            inner = self._new(_SUM_ALL, (x.args[0],), before=n)
            return self._set(n, aten.neg.default, (inner,))
        if t not in _ELEMENTWISE_BINARY or len(x.args) != 2 or x.kwargs:
            return None
        p, s = x.args
        if self._scalar(p) is not None and self._scalar(s) is None and (t in _MUL or t in _ADD):
            p, s = s, p
        s = self._scalar(s)
        pt = _tensor(p)
        if s is None or pt is None or pt.shape != xt.shape or not pt.is_floating_point():
            return None
        inner = self._new(_SUM_ALL, (p,), before=n)
        if t in _MUL or t in _DIV:
            return self._set(n, aten.mul.Tensor if t in _MUL else aten.div.Tensor, (inner, s))
        k = xt.numel()
        shift = s * k if _is_num(s) else self._new(aten.mul.Tensor, (s, k), before=n)
        if t in _SUB and x.args[0] is not p:  # s - p
            return self._set(n, aten.sub.Tensor, (shift, inner))
        return self._set(n, aten.add.Tensor if t in _ADD else aten.sub.Tensor, (inner, shift))

    # -- products sharing an operand ------------------------------------------------------------
    def _merge_column_sums(self) -> None:
        """``sum(G, 0)`` next to ``C @ G`` with a constant ``C``: one product ``[C; 1] @ G``
        and two slices of it (a layer's weight and bias gradients from one matrix product)."""
        g = self.g
        g.count_users()
        for n in list(g.nodes):
            if n.kind != "call" or n.target is not aten.sum.dim_IntList or n.kwargs:
                continue
            gmat = n.args[0]
            dims = n.args[1] if len(n.args) > 1 else None
            gt = _tensor(gmat)
            if (
                gt is None
                or gt.dim() != 2
                or not gt.is_floating_point()
                or list(dims or [])
                not in (
                    [0],
                    [-2],
                )
            ):
                continue
            keep = bool(n.args[2]) if len(n.args) > 2 else False
            partner = next(
                (
                    m
                    for m in g.nodes
                    if m.kind == "call"
                    and m.target is aten.mm.default
                    and m.args[1] is gmat
                    and isinstance(m.args[0], _Node)
                    and m.args[0].kind == "const"
                    and m.args[0].val.dtype == gt.dtype
                    and g.nodes.index(m) > g.nodes.index(gmat)
                ),
                None,
            )
            if partner is None:
                continue
            c = partner.args[0].val
            k = c.shape[0]
            ones = torch.ones(1, c.shape[1], dtype=c.dtype, device=c.device)
            c1 = _Node("const", val=torch.cat([c, ones], 0))
            first = min(g.nodes.index(n), g.nodes.index(partner))
            g.nodes.insert(first, c1)
            both = self._new(aten.mm.default, (c1, gmat), before=g.nodes[first + 1])
            self._set(partner, aten.slice.Tensor, (both, 0, 0, k))
            if keep:
                self._set(n, aten.slice.Tensor, (both, 0, k, k + 1))
            else:
                self._set(n, aten.select.int, (both, 0, k))

    def _rank_one_backward(self) -> None:
        """``K @ ((a b^T) * D)`` with a column ``a`` and a row ``b`` (the gradient reaching a
        hidden layer from a single output unit): ``((K * a^T) @ D) * b``, without the
        ``(N, H)`` outer product."""
        g = self.g
        g.count_users()
        for n in list(g.nodes):
            if n.kind != "call" or n.target is not aten.mm.default:
                continue
            k, gm = n.args
            if _tensor(k) is None or _tensor(gm) is None or gm.kind != "call" or gm.users != 1:
                continue
            t = gm.target
            if t is aten.tanh_backward.default:
                outer, h = gm.args
                d = self._new(aten.square.default, (h,), before=n)
                d = self._new(aten.rsub.Scalar, (d, 1), before=n)
            elif t is aten.sigmoid_backward.default:
                outer, h = gm.args
                d = self._new(aten.rsub.Scalar, (h, 1), before=n)
                d = self._new(aten.mul.Tensor, (d, h), before=n)
            elif t in _MUL and len(gm.args) == 2 and _tensor(gm.args[1]) is not None:
                outer, d = gm.args
            else:
                continue
            if not (
                isinstance(outer, _Node)
                and outer.kind == "call"
                and (outer.target in _MUL or outer.target is aten.mm.default)
                and outer.users == 1
                and len(outer.args) == 2
                and not outer.kwargs
            ):
                continue
            a, b = outer.args
            if _tensor(a) is None or _tensor(b) is None:
                continue
            if (
                a.val.dim() == 2
                and a.val.shape[1] == 1
                and b.val.dim() == 2
                and b.val.shape[0] == 1
            ):
                pass
            elif (
                b.val.dim() == 2
                and b.val.shape[1] == 1
                and a.val.dim() == 2
                and a.val.shape[0] == 1
            ):
                a, b = b, a
            else:
                continue
            if d.val.shape != gm.val.shape or k.val.dim() != 2:
                continue
            at = self._new(aten.t.default, (a,), before=n)
            ka = self._new(aten.mul.Tensor, (k, at), before=n)
            prod = self._new(aten.mm.default, (ka, d), before=n)
            self._set(n, aten.mul.Tensor, (prod, b))

    # -- scalar sums ------------------------------------------------------------------------------
    def _scalar_sums(self) -> None:
        """Sums of scalars (the log density is one) as ``sum_j c_j * (t_j1 + t_j2 + ...) + k``:
        constants added once, one product per coefficient, and sums of squares of adjacent
        slices of one vector with the same coefficient (independent Normal priors with one
        scale) as one sum of squares of the joined slice."""
        g = self.g
        g.count_users()
        linear = {id(n) for n in g.nodes if self._is_linear_scalar(n)}
        if not linear:
            return
        roots = []
        users: dict[int, list[_Node]] = {}
        for n in g.nodes:
            for a in _nodes_in((n.args, n.kwargs)):
                users.setdefault(id(a), []).append(n)
        for n in g.nodes:
            if id(n) not in linear:
                continue
            if n in g.outputs or any(id(u) not in linear for u in users.get(id(n), [])):
                roots.append(n)
        for r in roots:
            terms, const = self._expand_linear(r, linear)
            if sum(1 for _ in terms) <= 2:
                continue
            self._rebuild(r, terms, const)

    def _is_linear_scalar(self, n: _Node) -> bool:
        if n.kind != "call" or _tensor(n) is None or n.val.dim() != 0:
            return False
        if not n.val.is_floating_point() or n.kwargs:
            return False
        if n.target in _ADD or n.target in _SUB:
            return len(n.args) == 2
        if n.target is aten.neg.default:
            return True
        if n.target in _MUL:
            return len(n.args) == 2 and (_is_num(n.args[0]) or _is_num(n.args[1]))
        return False

    def _expand_linear(self, n, linear) -> tuple[dict, float]:
        """``n`` as ``{term: coefficient}`` and a constant."""
        terms: dict[int, list] = {}
        const = 0.0

        def walk(a, c):
            nonlocal const
            if _is_num(a):
                const += c * a
                return
            if a.kind == "const" and a.val.dim() == 0:
                const += c * float(a.val)
                return
            if id(a) not in linear:
                if id(a) in terms:
                    terms[id(a)][1] += c
                else:
                    terms[id(a)] = [a, c]
                return
            t = a.target
            if t in _ADD or t in _SUB:
                walk(a.args[0], c)
                walk(a.args[1], c if t in _ADD else -c)
            elif t is aten.neg.default:
                walk(a.args[0], -c)
            else:  # a product with a number
                x, k = (a.args[1], a.args[0]) if _is_num(a.args[0]) else a.args
                walk(x, c * k)

        walk(n, 1.0)
        return terms, const

    def _rebuild(self, root: _Node, terms: dict, const: float) -> None:
        groups: dict[float, list[_Node]] = {}
        for node, c in terms.values():
            if c != 0:
                groups.setdefault(c, []).append(node)
        pieces = []
        for c, nodes in groups.items():
            nodes = self._join_squares(nodes, root)
            acc = nodes[0]
            for m in nodes[1:]:
                acc = self._new(aten.add.Tensor, (acc, m), before=root)
            if c != 1:
                acc = self._new(aten.mul.Tensor, (acc, c), before=root)
            pieces.append(acc)
        if not pieces:
            return
        acc = pieces[0]
        for m in pieces[1:-1] if const == 0 else pieces[1:]:
            acc = self._new(aten.add.Tensor, (acc, m), before=root)
        if const != 0:
            self._set(root, aten.add.Tensor, (acc, const))
        elif len(pieces) > 1:
            self._set(root, aten.add.Tensor, (acc, pieces[-1]))
        else:
            self._set(root, aten.mul.Tensor, (acc, 1.0))

    def _join_squares(self, nodes: list[_Node], before: _Node) -> list[_Node]:
        """Sums of squares of adjacent slices of one vector become one."""
        spans, rest = [], []
        for m in nodes:
            sl = self._square_of_slice(m)
            (spans if sl is not None else rest).append((sl, m))
        if len(spans) < 2:
            return nodes
        spans.sort(key=lambda e: (id(e[0][0]), e[0][1]))
        out = [m for _, m in rest]
        i = 0
        while i < len(spans):
            (base, lo, hi), m = spans[i]
            j = i + 1
            while j < len(spans) and spans[j][0][0] is base and spans[j][0][1] == hi:
                hi = spans[j][0][2]
                j += 1
            if j == i + 1:
                out.append(m)
            else:
                piece = self._new(aten.slice.Tensor, (base, 0, lo, hi), before=before)
                sq = self._new(aten.square.default, (piece,), before=before)
                out.append(self._new(_SUM_ALL, (sq,), before=before))
            i = j
        return out

    @staticmethod
    def _square_of_slice(m: _Node):
        """``(base, lo, hi)`` when ``m`` is the sum of squares of a slice of a 1-D ``base``."""
        if m.kind != "call" or m.target is not _SUM_ALL:
            return None
        sq = m.args[0]
        if not (isinstance(sq, _Node) and sq.kind == "call" and sq.target is aten.square.default):
            return None
        q = sq.args[0]
        while isinstance(q, _Node) and q.kind == "call" and q.target in _RESHAPES:
            q = q.args[0]
        if not (isinstance(q, _Node) and q.kind == "call" and q.target is aten.slice.Tensor):
            return None
        base = q.args[0]
        d = q.args[1] if len(q.args) > 1 else 0
        lo = q.args[2] if len(q.args) > 2 else None
        hi = q.args[3] if len(q.args) > 3 else None
        step = q.args[4] if len(q.args) > 4 else 1
        if _tensor(base) is None or base.val.dim() != 1 or d != 0 or step != 1:
            return None
        if not (_is_num(lo) and _is_num(hi)) or hi - lo != q.val.numel():
            return None
        return base, lo, hi

    # -- common subexpressions ------------------------------------------------------------------
    def _cse(self) -> None:
        g = self.g
        seen: dict[Any, _Node] = {}
        repl: dict[int, _Node] = {}

        def key_of(a):
            if isinstance(a, _Node):
                return ("%", id(a))
            if isinstance(a, (list, tuple)):
                return (type(a).__name__, tuple(key_of(x) for x in a))
            if isinstance(a, dict):
                return ("dict", tuple(sorted((k, key_of(v)) for k, v in a.items())))
            if isinstance(a, float) and math.isnan(a):
                return ("nan",)
            return (type(a).__name__, repr(a))

        for n in g.nodes:
            n.args = _map_args(n.args, lambda a: repl.get(id(a), a))
            n.kwargs = _map_args(n.kwargs, lambda a: repl.get(id(a), a))
            if n.kind != "call" or _is_random(n.target):
                continue
            k = (_op_name(n.target), key_of(n.args), key_of(n.kwargs))
            if k in seen:
                repl[id(n)] = seen[k]
                self.changed = True
            else:
                seen[k] = n
        g.outputs = [repl.get(id(o), o) for o in g.outputs]

    # -- the gradient of z in one piece ---------------------------------------------------------
    def _assemble(self) -> None:
        """Sums of ``slice_backward``/``select_backward`` into the same shape become one
        ``assemble`` node: a list of ``(index, value)`` written into one array."""
        g = self.g
        g.count_users()

        def entries_of(a):
            if not isinstance(a, _Node) or a.kind != "call":
                return None
            if a.target == "assemble":
                return a.args[1]
            if a.target is aten.slice_backward.default:
                grad, sizes, dim, start, end, step = a.args
                idx = (slice(None),) * dim + (slice(start, end, step),)
                return [(idx, grad)]
            if a.target is aten.select_backward.default:
                grad, sizes, dim, index = a.args
                idx = (slice(None),) * dim + (index,)
                return [(idx, grad)]
            return None

        for n in g.nodes:
            if n.kind != "call":
                continue
            if n.target in (aten.slice_backward.default, aten.select_backward.default):
                v = n.args[0]
                while (
                    isinstance(v, _Node)
                    and v.kind == "call"
                    and v.target
                    in (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
                    and v.users == 1
                ):
                    v = v.args[0]
                n.args = (v, *n.args[1:])
                shape = tuple(n.val.shape)
                ((idx, v),) = entries_of(n)
                # a slice or select that covers the whole array is a reshape
                covers = all(
                    (isinstance(s, slice) and s == slice(None))
                    or (
                        isinstance(s, slice)
                        and s.step in (None, 1)
                        and s.start in (0, None)
                        and (s.stop is None or s.stop >= shape[d])
                    )
                    or (not isinstance(s, slice) and shape[d] == 1)
                    for d, s in enumerate(idx)
                )
                if covers:
                    n.target, n.args, n.kwargs = aten.reshape.default, (v, list(shape)), {}
                else:
                    n.target, n.args, n.kwargs = "assemble", (shape, [(idx, v)]), {}
                continue
            if n.target is aten.add.Tensor and not n.kwargs and len(n.args) == 2:
                x, y = n.args
                ex, ey = entries_of(x), entries_of(y)
                if (
                    ex is not None
                    and ey is not None
                    and x.users == 1
                    and y.users == 1
                    and x.val.shape == y.val.shape == n.val.shape
                ):
                    n.target, n.args = "assemble", (tuple(n.val.shape), list(ex) + list(ey))


# ------------------------------------------------------------------------------------------
# code generation
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------
_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_capture():
    """No argument validation (it reads tensor values), no RNG consumed, one capture at a time
    (the Pyro handler stack is global)."""
    from marginalize.core.problem import _no_validation

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
        from marginalize.core.problem import _no_validation

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
