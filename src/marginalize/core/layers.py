"""The layers of a network whose curvature can be read from one recorded pass: dense and
convolutional layers (builder MLPs and CNNs; ``nn.Linear`` and ``nn.Conv2d`` of
:func:`~marginalize.models.bayesian`) and a module's BatchNorm layers.

:func:`record` runs the network on a chunk of rows at one set of weights and keeps, per
layer, its input ``a`` and a zero tensor ``e`` added to its output (``d f / d e = d f / d s``),
through forward hooks on a module or by running a builder's layers one by one; nothing before
the first recorded layer keeps a graph. With the output gradients ``g`` of a backward pass,
the Jacobian of the output with respect to a dense or convolutional layer's weights is
``sum_p a_p g_p^T`` over its positions ``p`` (a row, or an output pixel with its unfolded
input patch: :func:`patches`), and for a BatchNorm layer in eval mode (``w xhat + b`` per
channel) ``sum_p g_p xhat_p`` and ``sum_p g_p``. Used by Laplace's K-FAC and layer-wise GGN
(``inference/engines/kfac.py``) and by the GLM predictive's Jacobians (:func:`jacobian`).

Coordinates: each layer has a grid ``pos`` ``(r, c)`` of positions in a flat vector, rows the
layer's inputs (the bias last), columns its outputs, row-major as in
:class:`~marginalize.core.approximations.Kronecker`; a BatchNorm layer ``(rows, C)``, the
weight's row then the bias's.

Examples
--------
>>> import torch, marginalize as mz
>>> model = mz.models.mlp(3, hidden=[4])
>>> offsets = {"layer2.weight": 0, "layer2.bias": 4}  # the last layer is free
>>> [(layer.name, layer.kind, tuple(layer.pos.shape)) for layer in find_layers(model, offsets.get)]
[('layer2', 'linear', (5, 1))]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from marginalize.errors import OptionError
from marginalize.models.base import BNN
from marginalize.models.builders import MLP, dense
from marginalize.models.cnn import CNN
from marginalize.models.module import ModuleBNN

__all__ = [
    "KLayer",
    "supports",
    "find_layers",
    "find_norms",
    "record",
    "patches",
    "outputs",
    "layer_jacobian",
    "jacobian",
]


@dataclass
class KLayer:
    """One layer: ``kind`` ``"linear"`` or ``"conv"``, its position grid ``pos`` ``(r, c)``
    (inputs + bias row, outputs), and for a convolution the ``F.unfold`` arguments."""

    name: str
    kind: str
    pos: torch.Tensor
    bias: bool
    unfold: dict | None = None
    #: for a ``"same"``-padded convolution with an odd total padding: ``F.pad`` widths
    pre_pad: tuple[int, int, int, int] | None = None


def supports(model) -> bool:
    """Whether the model's layers can be recorded (builder MLP or CNN, or a module)."""
    return isinstance(model, (MLP, CNN, ModuleBNN))


def _grid(offset: int, shape: tuple[int, int], transpose: bool) -> torch.Tensor:
    rows, cols = shape
    g = torch.arange(offset, offset + rows * cols).reshape(rows, cols)
    return g.T.contiguous() if transpose else g


def _conv_args(mod: nn.Conv2d) -> tuple[dict, tuple[int, int, int, int] | None] | None:
    if mod.groups != 1 or mod.padding_mode != "zeros":
        return None
    args = {"kernel_size": mod.kernel_size, "dilation": mod.dilation, "stride": mod.stride}
    pad = mod.padding
    if isinstance(pad, str):
        if pad == "valid":
            return {**args, "padding": 0}, None
        # "same" (stride 1): total padding dilation * (k - 1), the odd one on the right/bottom
        tot = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size, strict=True)]
        if all(t % 2 == 0 for t in tot):
            return {**args, "padding": (tot[0] // 2, tot[1] // 2)}, None
        pads = (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2)
        return {**args, "padding": 0}, pads
    return {**args, "padding": pad}, None


def find_layers(model: BNN, offset: Callable[[str], int | None]) -> list[KLayer]:
    """The recordable layers whose weight is among the free sites.

    ``offset(site)`` is the site's offset in the free vector, ``None`` when it is not free.
    Other free sites (BatchNorm affine parameters, embeddings, ...) are left to the caller.

    Raises
    ------
    OptionError
        A layer with only its weight or only its bias free.
    """
    out: list[KLayer] = []
    if not supports(model):
        return out
    for spec in model.layer_specs():
        wname, bname = f"{spec.name}.weight", f"{spec.name}.bias"
        wo, bo = offset(wname), offset(bname)
        if wo is None and bo is None:
            continue
        has_bias = spec.bias_shape is not None
        if wo is None or (has_bias and bo is None):
            raise OptionError(
                f"structure='kron': bayesian_sites must hold whole layers; {spec.name!r} "
                "has only its weight or only its bias selected"
            )
        shape = tuple(spec.weight_shape)
        unfold, pre_pad = None, None
        if isinstance(model, ModuleBNN):
            try:
                mod = model.module.get_submodule(spec.name)
            except AttributeError:
                continue
            if isinstance(mod, nn.Linear) and len(shape) == 2:
                kind, grid = "linear", _grid(wo, shape, True)  # torch's (out, in)
            elif isinstance(mod, nn.Conv2d) and len(shape) == 4:
                got = _conv_args(mod)
                if got is None:
                    continue
                unfold, pre_pad = got
                kind, grid = "conv", _grid(wo, (shape[0], shape[1] * shape[2] * shape[3]), True)
            else:
                continue
        elif len(shape) == 2:  # the builders' dense layers: (in, out)
            kind, grid = "linear", _grid(wo, shape, False)
        else:  # the CNN builder's convolutions: (out, in, k, k), "same" padding
            k = model.kernel_size
            unfold = {"kernel_size": (k, k), "dilation": 1, "stride": 1, "padding": k // 2}
            kind, grid = "conv", _grid(wo, (shape[0], shape[1] * shape[2] * shape[3]), True)
        if has_bias:
            grid = torch.cat([grid, torch.arange(bo, bo + grid.shape[1])[None]])
        out.append(KLayer(spec.name, kind, grid, has_bias, unfold, pre_pad))
    return out


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def find_norms(model: BNN, offset: Callable[[str], int | None]) -> list[KLayer]:
    """A module's BatchNorm layers (running statistics, affine) with a free weight or bias:
    kind ``"norm"``, ``pos`` ``(rows, C)`` (the weight's positions, then the bias's). In eval
    mode such a layer is ``y = w xhat + b`` per channel, so its GGN diagonal is exact from the
    recorded ``xhat`` and output gradients (:func:`kfac` returns it)."""
    out: list[KLayer] = []
    if not isinstance(model, ModuleBNN):
        return out
    for name, mod in model.module.named_modules():
        if not isinstance(mod, _NORMS) or not mod.affine or not mod.track_running_stats:
            continue
        wo, bo = offset(f"{name}.weight"), offset(f"{name}.bias")
        rows = [torch.arange(o, o + mod.num_features) for o in (wo, bo) if o is not None]
        if rows:
            out.append(
                KLayer(name, "norm", torch.stack(rows), bo is not None, {"w": wo is not None})
            )
    return out


# ---- recording ----------------------------------------------------------------------------
class _Taps:
    def __init__(self, layers: list[KLayer]):
        self.by_name = {layer.name: layer for layer in layers}
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {
            n: [] for n in self.by_name
        }

    def __call__(self, name: str, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        e = torch.zeros_like(s, requires_grad=True)
        self.calls[name].append((a.detach(), e))
        return s + e

    def leaves(self) -> list[torch.Tensor]:
        return [e for calls in self.calls.values() for _, e in calls]


def record(model: BNN, params, x: torch.Tensor, state, layers: list[KLayer]):
    """The output ``f`` ``(B, O)`` with the layers' inputs and output leaves recorded."""
    taps = _Taps(layers)
    if isinstance(model, ModuleBNN):
        handles = []
        for layer in layers:
            mod = model.module.get_submodule(layer.name)

            def hook(m, inp, out, name=layer.name, norm=layer.kind == "norm"):
                a = inp[0]
                if norm:  # eval mode: xhat from the running statistics (the state given)
                    shape = [1, -1] + [1] * (a.dim() - 2)
                    mean, var = m.running_mean.reshape(shape), m.running_var.reshape(shape)
                    a = (a - mean) / torch.sqrt(var + m.eps)
                return taps(name, a, out)

            handles.append(mod.register_forward_hook(hook))
        try:
            f = model.forward(params, x) if state is None else model.forward(params, x, state)
        finally:
            for h in handles:
                h.remove()
        return f, taps
    h = x
    if isinstance(model, CNN):
        k = model.kernel_size
        for i in range(1, len(model.channels) + 1):
            name = f"conv{i}"
            s = F.conv2d(h, params[f"{name}.weight"], params[f"{name}.bias"], padding=k // 2)
            if name in taps.by_name:
                s = taps(name, h, s)
            h = model.act(s)
            p = model.pool
            if p is not None and h.shape[-2] >= p and h.shape[-1] >= p:  # as the builder
                h = F.max_pool2d(h, model.pool)
        h = h.reshape(h.shape[0], -1)
        specs = model.layer_specs()[len(model.channels) :]
    else:
        specs = model.layer_specs()
    for j, spec in enumerate(specs):
        s = dense(h, params[f"{spec.name}.weight"], params.get(f"{spec.name}.bias"))
        if spec.name in taps.by_name:
            s = taps(spec.name, h, s)
        h = model.act(s) if j < len(specs) - 1 else s
    return h, taps


def patches(layer: KLayer, a: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as ``(B, P, r)``: positions ``P``, a 1 appended for the bias."""
    if layer.kind == "conv":
        if layer.pre_pad is not None:
            a = F.pad(a, layer.pre_pad)
        a = F.unfold(a, **layer.unfold).transpose(1, 2)  # (B, L, C kh kw)
    else:
        a = a.reshape(a.shape[0], -1, a.shape[-1])
    if layer.bias:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], -1)
    return a


def outputs(layer: KLayer, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as ``(B, P, c)``."""
    if layer.kind == "conv":
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def layer_jacobian(
    layer: KLayer, a: torch.Tensor, g: torch.Tensor, ap: torch.Tensor | None = None
) -> torch.Tensor:
    """``d (f . v) / d theta`` over the layer's ``pos`` (row-major), ``(B, pos.numel())``,
    from one call's recorded input ``a`` and output gradient ``g`` of ``f . v`` (``ap``: the
    input's :func:`patches`, when already computed)."""
    if layer.kind == "norm":
        g3 = g.reshape(a.shape[0], a.shape[1], -1)
        rows = [(g3 * a.reshape(g3.shape)).sum(-1)] if layer.unfold["w"] else []
        if layer.bias:
            rows.append(g3.sum(-1))
        return torch.stack(rows, 1).reshape(a.shape[0], -1)
    ap = patches(layer, a) if ap is None else ap
    gp = outputs(layer, g)
    return torch.einsum("bpi,bpo->bio", ap, gp).reshape(ap.shape[0], -1)


def jacobian(
    model: BNN, params, x: torch.Tensor, state, layers: list[KLayer], cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output ``f`` ``(B, O)`` and its Jacobian ``(B, O, len(cols))`` with respect to the
    coordinates ``cols`` (sorted), which the layers' positions must cover exactly: one
    recorded forward pass and ``O`` backward passes through the recorded layers (rows do not
    mix: eval mode)."""
    where = torch.searchsorted(cols, torch.cat([k.pos.reshape(-1) for k in layers]).to(cols.device))
    with torch.enable_grad():
        f, taps = record(model, params, x, state, layers)
        leaves = taps.leaves()
        n, o_dim = f.shape
        jac = f.new_zeros(n, o_dim, cols.numel())
        pre = {  # each call's patches, unfolded once for every output
            (layer.name, c): patches(layer, a)
            for layer in layers
            if layer.kind != "norm"
            for c, (a, _e) in enumerate(taps.calls[layer.name])
        }
        for o in range(o_dim):
            got = torch.autograd.grad(
                f[:, o].sum(), leaves, retain_graph=o < o_dim - 1, allow_unused=True
            )
            i, start = 0, 0
            for layer in layers:
                size = layer.pos.numel()
                m = None
                for c, (a, e) in enumerate(taps.calls[layer.name]):
                    g = torch.zeros_like(e) if got[i] is None else got[i]
                    t = layer_jacobian(layer, a, g, pre.get((layer.name, c)))
                    m = t if m is None else m + t
                    i += 1
                if m is not None:
                    jac[:, o, where[start : start + size]] = m.detach()
                start += size
    return f.detach(), jac
