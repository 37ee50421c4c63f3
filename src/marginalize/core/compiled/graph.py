"""The graph of the compiled log joint (internal to :mod:`marginalize.core.compiled`): nodes,
the recorded ``make_fx`` graph converted to them, and the ATen operation families the
simplifier and the code generator know."""

from __future__ import annotations

import operator
from typing import Any

import torch

__all__: list[str] = []

aten = torch.ops.aten


class CaptureError(Exception):
    """The model's log joint could not be compiled (the reason is the message)."""


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
