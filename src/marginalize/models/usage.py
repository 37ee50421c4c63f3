"""How a model uses its weight sites: which axis of each weight holds the layer's input units.

Two methods need to know this: MC dropout masks the *input units* of a layer (a slice of the
weight along its input axis), and the default initialization draws a weight with a standard
deviation ``1 / sqrt(fan_in)`` (LeCun; PyTorch's ``nn.Linear`` uses the same fan-in). The axis
is not a property of the shape: ``x @ W`` stores weights as ``(in, out)``, ``F.linear`` and
``PyroModule[nn.Linear]`` as ``(out, in)``, a convolution as ``(out, in, kh, kw)``, and a
square weight looks the same either way. So it is *detected from how the weight meets the
data*: :func:`trace_usage` runs the model once on a few rows of ``x`` under a
:class:`~torch.overrides.TorchFunctionMode` that follows each real-valued site through views
(``.T``, ``transpose``, ``permute``, ``reshape``, elementwise scaling ...) to the first
contraction it enters (``F.linear``, ``matmul``/``@``, ``mm``, ``addmm``, ``baddbmm``,
``einsum``, ``conv*d``, ``tensordot``), and reads the contracted axis there. The other operand
says whether the layer's inputs are the data themselves (``meets_data``: the first layer) or
hidden units. A 1-D site added to a layer's output (``F.linear``'s bias argument, or
``h @ W + b``) is recorded as that layer's bias.

Builder models (:class:`~marginalize.models.base.BNN`) declare the same information through
``site_usage``; :func:`site_usage` asks the model first and traces otherwise.

Examples
--------
>>> import torch, pyro, pyro.distributions as dist
>>> def model(x, y=None):
...     w1 = pyro.sample("w1", dist.Normal(0., 1.).expand([8, 3]).to_event(2))   # (out, in)
...     w2 = pyro.sample("w2", dist.Normal(0., 1.).expand([8, 1]).to_event(2))   # (in, out)
...     f = (torch.tanh(torch.nn.functional.linear(x, w1)) @ w2).squeeze(-1)
...     with pyro.plate("data", x.shape[0]):
...         pyro.sample("y", dist.Normal(f, 0.1), obs=y)
>>> use = trace_usage(model, torch.randn(4, 3))
>>> use["w1"].input_axis, use["w1"].fan_in, use["w1"].meets_data
(1, 3, True)
>>> use["w2"].input_axis, use["w2"].fan_in, use["w2"].meets_data
(0, 8, False)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from torch.overrides import TorchFunctionMode

__all__ = ["SiteUse", "site_usage", "trace_usage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteUse:
    """How one latent site enters the network.

    role : {"weight", "bias"}
    input_axis : int or None
        For a weight: the axis of the site's value whose entries multiply the layer's input
        units (None when several axes are contracted at once, e.g. an einsum over two
        indices).
    fan_in : int
        Number of inputs each output unit of the layer sums over.
    meets_data : bool
        For a weight: the layer's inputs are the model's data ``x`` (the first layer), not
        hidden units.
    layer : str or None
        For a bias: the weight site whose layer output it is added to.
    """

    role: str
    input_axis: int | None
    fan_in: int
    meets_data: bool = False
    layer: str | None = None


def site_usage(model: Callable, x: torch.Tensor) -> dict[str, SiteUse]:
    """Site name -> :class:`SiteUse` for the weights and biases of ``model``.

    Models that know their layers (builders) answer through their own ``site_usage(x)``;
    any other model is traced once on ``x`` (:func:`trace_usage`). Sites absent from the
    result were not seen entering a contraction.
    """
    own = getattr(model, "site_usage", None)
    if callable(own):
        return own(x)
    return trace_usage(model, x)


# names (``func.__name__``) of the operations the tracker understands
_MATMUL = {"matmul", "__matmul__", "mm", "bmm", "mv", "inner"}
_ADDMM = {"addmm", "addmv", "baddbmm", "addbmm"}
_CONV = {"conv1d", "conv2d", "conv3d"}
_CONV_T = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
#: operations whose output is no longer "the data" even when no tracked weight enters them
#: (they mix inputs through their own, possibly fixed, parameters)
_MIXING = (
    _MATMUL
    | _ADDMM
    | _CONV
    | _CONV_T
    | {
        "linear",
        "__rmatmul__",
        "einsum",
        "tensordot",
        "bilinear",
        "embedding",
        "embedding_bag",
        "lstm",
        "gru",
        "rnn_tanh",
        "rnn_relu",
        "multi_head_attention_forward",
        "scaled_dot_product_attention",
    }
)
_ADD = {"add", "__add__", "__radd__", "add_", "__iadd__"}


def _name(func) -> str:
    owner = getattr(func, "__self__", None)
    if type(func).__name__ == "method-wrapper" and type(owner).__name__ == "getset_descriptor":
        return owner.__name__  # a property such as Tensor.T / Tensor.mT
    return getattr(func, "__name__", "")


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


class _Weight:
    """A tensor derived from site ``site``: ``axes[i]`` is the site axis of the tensor's axis i."""

    __slots__ = ("site", "axes")

    def __init__(self, site: str, axes: tuple[int | None, ...]):
        self.site, self.axes = site, axes


_DATA = "data"


class _Out:
    """The output of a contraction with weight site ``site`` (its layer's pre-activation)."""

    __slots__ = ("site",)

    def __init__(self, site: str):
        self.site = site


def _map_axes(name: str, args, kwargs, w: torch.Tensor, axes, out: torch.Tensor):
    """The site axes of ``out``, an operation ``name`` applied to the weight-derived ``w``."""
    nd = w.dim()
    if name in ("t", "t_") and nd <= 2:
        return tuple(reversed(axes))
    if name == "T":
        return tuple(reversed(axes))
    if name in ("mT", "mH", "adjoint") and nd >= 2:
        return (*axes[:-2], axes[-1], axes[-2])
    if name in ("transpose", "swapaxes", "swapdims", "transpose_"):
        rest = list(args[1:]) + [kwargs[k] for k in ("dim0", "dim1") if k in kwargs]
        if len(rest) >= 2 and args and args[0] is w:
            i, j = int(rest[0]) % nd, int(rest[1]) % nd
            a = list(axes)
            a[i], a[j] = a[j], a[i]
            return tuple(a)
        return None
    if name == "permute" and args and args[0] is w:
        dims = args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
            dims = dims[0]
        dims = dims or kwargs.get("dims", ())
        if len(dims) == nd:
            return tuple(axes[int(d) % nd] for d in dims)
        return None
    if tuple(out.shape) == tuple(w.shape):
        return tuple(axes)
    # same non-singleton sizes in the same order (unsqueeze, squeeze, a reshape adding 1s)
    src = [(s, a) for s, a in zip(w.shape, axes, strict=True) if s != 1]
    dst = [s for s in out.shape if s != 1]
    if [s for s, _ in src] == dst:
        it = iter(src)
        return tuple(next(it)[1] if s != 1 else None for s in out.shape)
    # broadcasting against a larger operand: align from the right
    if out.dim() >= nd and all(
        ws in (1, os) for ws, os in zip(w.shape, out.shape[out.dim() - nd :], strict=True)
    ):
        lead = (None,) * (out.dim() - nd)
        tail = tuple(
            a if ws == os else None
            for ws, os, a in zip(w.shape, out.shape[out.dim() - nd :], axes, strict=True)
        )
        return lead + tail
    return None


def _einsum_axis(eq: str, ops, k: int) -> tuple[int | None, int] | None:
    """``(axis, fan_in)`` of operand ``k`` of an einsum: its one contracted subscript."""
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    subs = lhs.split(",")
    if len(subs) != len(ops):
        return None
    if "->" not in eq:
        letters = [c for c in lhs if c.isalpha()]
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    mine = subs[k]
    others = "".join(s for i, s in enumerate(subs) if i != k)
    contracted = [c for c in mine if c.isalpha() and c in others and c not in rhs]
    if not contracted:
        return None
    shape = ops[k].shape
    # positions: letters before "..." count from the left, after it from the right
    head, dots, tail = mine.partition("...")
    pos = {c: i for i, c in enumerate(head)}
    if dots:
        pos.update({c: len(shape) - len(tail) + i for i, c in enumerate(tail)})
    if any(c not in pos for c in contracted):
        return None
    fan = math.prod(shape[pos[c]] for c in contracted)
    if len(contracted) > 1:
        return None, fan
    return pos[contracted[0]], fan


class _Tracker(TorchFunctionMode):
    def __init__(self, weights: dict[str, torch.Tensor], x: torch.Tensor):
        super().__init__()
        self.tags: dict[int, tuple[torch.Tensor, object]] = {}
        for name, t in weights.items():
            self._tag(t, _Weight(name, tuple(range(t.dim()))))
        self._tag(x, _DATA)
        self.found: dict[str, SiteUse] = {}
        self.bias_of: dict[str, str] = {}

    def _tag(self, t, tag) -> None:
        self.tags[id(t)] = (t, tag)  # the tensor is kept, so its id is not reused

    def tag(self, t):
        hit = self.tags.get(id(t)) if isinstance(t, torch.Tensor) else None
        return hit[1] if hit is not None and hit[0] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._see(_name(func), args, kwargs, out)
        except Exception as e:  # detection must never change what the model computes
            log.debug("usage tracker: %s on %s", type(e).__name__, _name(func))
        return out

    # -- recording
    def _record(self, w, axis_in_w: int | None, fan_in: int, partner) -> str | None:
        tag = self.tag(w)
        if not isinstance(tag, _Weight):
            return None
        site = tag.site
        if site not in self.found:
            axis = None if axis_in_w is None else tag.axes[axis_in_w % w.dim()]
            self.found[site] = SiteUse(
                "weight", axis, int(fan_in), meets_data=self.tag(partner) is _DATA
            )
        return site

    def _bias(self, b, site: str | None) -> None:
        tag = self.tag(b)
        if site is not None and isinstance(tag, _Weight) and sum(n != 1 for n in b.shape) <= 1:
            self.bias_of.setdefault(tag.site, site)

    def _see(self, name: str, args, kwargs, out) -> None:
        tags = [(t, self.tag(t)) for t in _tensors(args, kwargs)]
        tags = [(t, g) for t, g in tags if g is not None]
        if not tags:
            return
        site = None
        if name == "linear":
            inp, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            site = self._record(w, -1, w.shape[-1] if w.dim() else 1, inp)
            self._bias(bias, site)
        elif name in _MATMUL or name == "__rmatmul__" or name in _ADDMM:
            if name in _ADDMM:
                bias, a, b = args[0], args[1], args[2]
            else:
                bias = None
                a, b = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
            if isinstance(self.tag(b), _Weight):
                i = -2 if b.dim() >= 2 else 0
                site = self._record(b, i, b.shape[i], a)
            elif isinstance(self.tag(a), _Weight):
                site = self._record(a, -1, a.shape[-1], b)
            self._bias(bias, site)
        elif name in _CONV or name in _CONV_T:
            inp, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            axis = 1 if name in _CONV else 0
            site = self._record(w, axis, math.prod(w.shape[1:]), inp)
            self._bias(bias, site)
        elif name == "einsum":
            ops = list(args[1:])
            if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
                ops = list(ops[0])
            for k, op in enumerate(ops):
                if isinstance(self.tag(op), _Weight):
                    hit = _einsum_axis(args[0], ops, k)
                    if hit is not None:
                        partner = next((o for i, o in enumerate(ops) if i != k), None)
                        site = self._record(op, hit[0], hit[1], partner)
                    break
        elif name == "tensordot":
            a, b = args[0], args[1]
            dims = args[2] if len(args) > 2 else kwargs.get("dims", 2)
            if dims == 1:
                if isinstance(self.tag(b), _Weight):
                    site = self._record(b, 0, b.shape[0], a)
                elif isinstance(self.tag(a), _Weight):
                    site = self._record(a, -1, a.shape[-1], b)
        if name in _MIXING:
            if site is not None and isinstance(out, torch.Tensor):
                self._tag(out, _Out(site))
            return
        if not isinstance(out, torch.Tensor):
            return
        if name in _ADD:
            outs = [g for _, g in tags if isinstance(g, _Out)]
            if outs:
                for t, g in tags:
                    if isinstance(g, _Weight):
                        self._bias(t, outs[0].site)
                self._tag(out, outs[0])
                return
        weights = [(t, g) for t, g in tags if isinstance(g, _Weight)]
        if weights:
            w, g = next(((t, g) for t, g in weights if t.shape == out.shape), weights[0])
            axes = _map_axes(name, args, kwargs, w, g.axes, out)
            if axes is not None and len(axes) == out.dim():
                self._tag(out, _Weight(g.site, axes))
            return
        if all(g is _DATA for _, g in tags):
            self._tag(out, _DATA)

    def result(self) -> dict[str, SiteUse]:
        res = dict(self.found)
        for b, w in self.bias_of.items():
            if b not in res and w in self.found:
                res[b] = SiteUse("bias", None, self.found[w].fan_in, layer=w)
        return res


def trace_usage(model: Callable, x: torch.Tensor, y: torch.Tensor | None = None):
    """Trace ``model(x)`` once and return site name -> :class:`SiteUse` (see the module
    docstring). Real-valued sites with at least one dim are followed; a model the tracker
    cannot run gives an empty result (logged at debug level), never an error."""
    x = x.detach()
    try:
        with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
            tr = poutine.trace(model).get_trace(x, None)
            weights = {}
            for name, node in tr.nodes.items():
                if node["type"] != "sample" or node["is_observed"]:
                    continue
                if node["infer"].get("is_auxiliary") or not isinstance(node["value"], torch.Tensor):
                    continue
                support = getattr(node["fn"], "support", None)
                real = getattr(support, "base_constraint", support)
                if real is torch.distributions.constraints.real and node["value"].dim() >= 1:
                    weights[name] = node["value"].detach().clone()
            if not weights:
                return {}
            xt = x.clone()
            tracker = _Tracker(weights, xt)
            with tracker:
                poutine.condition(model, data=weights)(xt, None)
    except Exception as e:
        log.debug("usage tracker: the model did not run (%s: %s)", type(e).__name__, e)
        return {}
    return tracker.result()
