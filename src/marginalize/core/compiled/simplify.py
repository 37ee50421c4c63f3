"""Simplification of a recorded log joint (internal to :mod:`marginalize.core.compiled`).

Constant folding, identities, scalars out of broadcasts and sums, chains of scalar factors,
sums of scalars with joined prior dot products, one product per layer, the rank-one
backward of a single output unit, common subexpressions, dead code and the gradient of
``z`` in one piece. Every rewrite keeps each node's value at the recording point exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from marginalize.core.compiled.graph import (  # noqa: F401
    _ADD,
    _DIV,
    _ELEMENTWISE_BINARY,
    _MUL,
    _NARY,
    _RESHAPES,
    _SHAPE_ONLY,
    _SUB,
    _SUM_ALL,
    _UNARY,
    _VIEWS,
    _broadcast_source,
    _Graph,
    _is_num,
    _is_random,
    _map_args,
    _Node,
    _nodes_in,
    _op_name,
    _tensor,
    _uniform_scalar,
    aten,
)

__all__ = ["_Simplifier"]


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
        if self._merge_assembled_sums():
            for _ in range(6):
                self.changed = False
                self._rewrite()
                self._cse()
                g.dce()
                if not self.changed:
                    break
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

    # -- adjacent sums in the gradient vector -------------------------------------------------
    def _merge_assembled_sums(self) -> bool:
        """Adjacent pieces of a 1-D gradient that are sums of adjacent pieces of the same two
        tensors (a layer's weight and bias: prior gradient plus likelihood gradient) become
        one sum, written once."""
        changed = False
        for a in list(self.g.nodes):
            if a.kind != "call" or a.target != "assemble" or len(a.args[0]) != 1:
                continue
            shape, entries = a.args
            if not all(
                len(idx) == 1 and isinstance(idx[0], slice) and idx[0].step in (None, 1)
                for idx, _ in entries
            ):
                continue
            ordered = sorted(entries, key=lambda e: e[0][0].start or 0)
            groups: list[list] = []
            for idx, v in ordered:
                sl = idx[0]
                lo, hi = sl.start or 0, min(shape[0], sl.stop)
                pieces = self._sum_of_flat_pieces(v)
                last = groups[-1] if groups else None
                if (
                    last is not None
                    and pieces is not None
                    and last[-1][3] is not None
                    and last[-1][1] == lo
                ):
                    prev = last[-1][3]
                    joined = self._adjacent(prev, pieces)
                    if joined is not None:
                        last.append((lo, hi, v, joined))
                        continue
                groups.append([(lo, hi, v, pieces)])
            if all(len(grp) == 1 for grp in groups):
                continue
            new_entries = []
            for grp in groups:
                if len(grp) == 1:
                    lo, hi, v, _ = grp[0]
                    new_entries.append(((slice(lo, hi, None),), v))
                    continue
                (x1, a1, _), (x2, a2, _) = grp[0][3]
                (_, _, b1), (_, _, b2) = grp[-1][3]
                left = self._flat_piece_node(x1, a1, b1, before=a)
                right = self._flat_piece_node(x2, a2, b2, before=a)
                total = self._new(aten.add.Tensor, (left, right), before=a)
                new_entries.append(((slice(grp[0][0], grp[-1][1], None),), total))
            a.args = (shape, new_entries)
            changed = True
        return changed

    @staticmethod
    def _adjacent(prev, pieces):
        """``pieces`` continuing ``prev`` (both pairs of ``(base, lo, hi)``), in either order
        of the sum's operands: the pair in ``prev``'s order, else ``None``."""
        for cand in (pieces, pieces[::-1]):
            if all(p[0] is c[0] and p[2] == c[1] for p, c in zip(prev, cand, strict=True)):
                return (prev[0][0], prev[0][1], cand[0][2]), (prev[1][0], prev[1][1], cand[1][2])
        return None

    def _sum_of_flat_pieces(self, v):
        """``((x, lo, hi), (y, lo, hi))`` when ``v`` is ``a + b`` with ``a`` and ``b`` the flat
        (C-order) elements ``lo:hi`` of tensors ``x`` and ``y``, else ``None``."""
        if not (isinstance(v, _Node) and v.kind == "call" and v.target is aten.add.Tensor):
            return None
        if v.kwargs or len(v.args) != 2 or not v.val.is_floating_point():
            return None
        out = []
        for p in v.args:
            pt = _tensor(p)
            if pt is None or pt.numel() != v.val.numel() or pt.dtype != v.val.dtype:
                return None
            out.append(self._flat_piece(p))
        return tuple(out)

    @staticmethod
    def _flat_piece(p: _Node) -> tuple:
        """``(x, lo, hi)``: ``p`` is the flat elements ``lo:hi`` of ``x`` (through reshapes
        and first-axis slices)."""
        if p.kind == "call" and p.target in _RESHAPES:
            return _Simplifier._flat_piece(p.args[0])
        if p.kind == "call" and p.target in (aten.slice.Tensor, aten.select.int):
            q = p.args[0]
            qt = _tensor(q)
            dim = p.args[1] if len(p.args) > 1 else 0
            if qt is not None and qt.dim() > 0 and dim % qt.dim() == 0:
                n0 = qt.shape[0]
                row = qt[0].numel() if n0 else 0
                if p.target is aten.select.int:
                    i = p.args[2] % n0 if n0 else 0
                    lo_r, hi_r = i, i + 1
                else:
                    step = p.args[4] if len(p.args) > 4 else 1
                    start = p.args[2] if len(p.args) > 2 and p.args[2] is not None else 0
                    stop = p.args[3] if len(p.args) > 3 and p.args[3] is not None else n0
                    if step != 1 or not (_is_num(start) and _is_num(stop)):
                        return (p, 0, p.val.numel())
                    lo_r = max(0, start + n0 if start < 0 else start)
                    hi_r = min(n0, stop + n0 if stop < 0 else stop)
                x, lo, _ = _Simplifier._flat_piece(q)
                return (x, lo + lo_r * row, lo + hi_r * row)
        return (p, 0, p.val.numel())

    def _flat_piece_node(self, x: _Node, lo: int, hi: int, *, before: _Node) -> _Node:
        flat = x if x.val.dim() == 1 else self._new(aten.view.default, (x, [-1]), before=before)
        if lo == 0 and hi == flat.val.numel():
            return flat
        return self._new(aten.slice.Tensor, (flat, 0, lo, hi), before=before)

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
