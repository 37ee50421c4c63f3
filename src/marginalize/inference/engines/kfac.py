"""Layer-wise Gauss-Newton curvature of dense and convolutional layers: K-FAC factors and the
exact GGN of a few layers, from each layer's inputs and output gradients.

A *layer* is a Bayesian weight (and optional bias) that acts linearly on its input: a dense
layer of a builder MLP or CNN, a convolution of the CNN builder, or an ``nn.Linear`` /
``nn.Conv2d`` (``groups=1``, zero padding) of :func:`~marginalize.models.bayesian`. A pass
over a chunk of rows records, per layer, its input ``a`` and a zero tensor ``e`` added to its
output ``s`` (so ``d f / d e = d f / d s``; for a module through forward hooks, for the
builders by running their layers one by one). Nothing before the first recorded layer keeps
a graph, so a last layer costs one forward pass of the body per chunk and a backward pass
through that layer only. With ``L_n L_n^T`` the Hessian of ``-log p(y_n | f_n)`` in output
space (one column ``l_k`` per output, see ``laplace``), ``g_{nk} = d (f_n . l_{nk}) / d s_n``:

* positions: a dense layer has one per row (or one per element of extra leading dims, e.g. a
  sequence); a convolution one per output pixel, with the input patch ``a_{np}`` its unfolded
  receptive field (``F.unfold``: channels-major, as the weight's ``(out, in * kh * kw)``);
  the bias adds a 1 to every ``a``;
* :func:`kfac`: ``A = sum_{n,p} a a^T / (N P)`` and ``G = sum_{n,p,k} g g^T``, so that
  ``A (x) G ~ sum_{n,p,k} (a a^T) (x) (g g^T)`` (Martens & Grosse 2015; for convolutions the
  "expand" convention, patches as extra batch positions: Grosse & Martens 2016,
  Eschenhagen et al. 2023). For one dense layer with one output (a Gaussian regression
  head) ``G`` is a scalar and ``A (x) G`` is the exact GGN;
* :func:`exact_ggn`: the dense GGN ``sum_{n,k} m m^T`` of the layers together, with
  ``m_{nk} = vec(sum_p a_{np} g_{npk}^T)`` per layer (exact, cross-layer terms included):
  last-layer Laplace of any network (``k x k``, ``k`` the last layer's weights and bias).

Coordinates: each layer has a grid ``pos`` ``(r, c)`` of positions in the free vector, rows
the layer's inputs (the bias last), columns its outputs, row-major as in
:class:`~marginalize.core.approximations.Kronecker`. Accumulation is in the dtype the
parameters are given in (``laplace`` gives K-FAC float32 parameters when the problem is
float32, and eigendecomposes the factors in float64; tests/test_kfac.py checks the float32
factors against float64 ones to a relative 1e-4 on a small conv net). Chunks of rows come
from the caller (sized from the model's measured activation memory).

Examples
--------
>>> import torch, marginalize as mz
>>> model = mz.models.mlp(3, hidden=[4])
>>> offsets = {"layer2.weight": 0, "layer2.bias": 4}  # the last layer is free
>>> [(layer.name, layer.kind, tuple(layer.pos.shape)) for layer in find_layers(model, offsets.get)]
[('layer2', 'linear', (5, 1))]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from marginalize.errors import OptionError
from marginalize.models.base import BNN
from marginalize.models.builders import MLP, dense
from marginalize.models.cnn import CNN
from marginalize.models.module import ModuleBNN

__all__ = ["KLayer", "find_layers", "find_norms", "kfac", "exact_ggn", "supports"]

log = logging.getLogger(__name__)


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


def _record(model: BNN, params, x: torch.Tensor, state, layers: list[KLayer]):
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


def _patches(layer: KLayer, a: torch.Tensor) -> torch.Tensor:
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


def _outputs(layer: KLayer, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as ``(B, P, c)``."""
    if layer.kind == "conv":
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


Chunks = Iterable[tuple[torch.Tensor, torch.Tensor]]
Factor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _passes(model, params, state, layers, chunks: Chunks, factor: Factor):
    """Per chunk: the recorded taps and, per output direction ``k``, the output leaves'
    gradients (one backward pass each)."""
    for x, y in chunks:
        with torch.enable_grad():
            f, taps = _record(model, params, x, state, layers)
            lfac = factor(f.detach(), x, y).to(f.dtype)  # (B, O, O)
            leaves = taps.leaves()
            grads = []
            for k in range(lfac.shape[-1]):
                got = torch.autograd.grad(
                    (f * lfac[:, :, k]).sum(),
                    leaves,
                    retain_graph=k < lfac.shape[-1] - 1,
                    allow_unused=True,
                )
                grads.append(
                    [
                        torch.zeros_like(e) if g is None else g
                        for g, e in zip(got, leaves, strict=True)
                    ]
                )
        yield taps, grads


def kfac(
    model: BNN, params, layers: list[KLayer], chunks: Chunks, factor: Factor, state=None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(A_sum, positions, G)`` per layer over the chunks: ``A = A_sum / positions`` (see the
    module docstring); for a ``"norm"`` layer ``A_sum`` is its GGN diagonal, shaped as its
    ``pos``. ``factor(f, x, y)`` gives ``L`` ``(B, O, O)`` of a chunk's outputs."""
    like = next(iter(params.values()))
    a_acc = [
        like.new_zeros(layer.pos.shape if layer.kind == "norm" else (r, r))
        for layer, (r, _) in zip(layers, (layer.pos.shape for layer in layers), strict=True)
    ]
    g_acc = [like.new_zeros(c, c) for _, c in (layer.pos.shape for layer in layers)]
    count = [0] * len(layers)
    for taps, grads in _passes(model, params, state, layers, chunks, factor):
        i = 0
        for j, layer in enumerate(layers):
            r, c = layer.pos.shape
            if layer.kind == "norm":  # exact GGN diagonal: a is xhat
                for a, _e in taps.calls[layer.name]:
                    for per_k in grads:
                        g = per_k[i].reshape(a.shape[0], a.shape[1], -1)
                        rows = [(g * a.reshape(g.shape)).sum(-1)] if layer.unfold["w"] else []
                        if layer.bias:
                            rows.append(g.sum(-1))
                        a_acc[j] += torch.stack(rows, 1).pow(2).sum(0)
                    i += 1
                continue
            for a, _e in taps.calls[layer.name]:
                a = _patches(layer, a).reshape(-1, r)
                a_acc[j] += a.T @ a
                count[j] += a.shape[0]
                for per_k in grads:
                    g = _outputs(layer, per_k[i]).reshape(-1, c)
                    g_acc[j] += g.T @ g
                i += 1
    return [(a, like.new_tensor(float(n)), g) for a, n, g in zip(a_acc, count, g_acc, strict=True)]


def exact_ggn(
    model: BNN, params, layers: list[KLayer], chunks: Chunks, factor: Factor, state=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GGN over the layers' coordinates together and their positions ``(K,)`` (the
    grids' row-major order, layer after layer)."""
    order = torch.cat([layer.pos.reshape(-1) for layer in layers])
    k_all = order.numel()
    like = next(iter(params.values()))
    acc = like.new_zeros(k_all, k_all)
    for taps, grads in _passes(model, params, state, layers, chunks, factor):
        for per_k in grads:
            i, parts = 0, []
            for layer in layers:
                m = None
                for a, _e in taps.calls[layer.name]:
                    ap, gp = _patches(layer, a), _outputs(layer, per_k[i])
                    t = torch.einsum("bpi,bpo->bio", ap, gp).reshape(ap.shape[0], -1)
                    m = t if m is None else m + t
                    i += 1
                parts.append(m)
            rows = torch.cat(parts, 1)  # (B, K): the per-example Jacobian rows, times L_n
            acc += rows.T @ rows
    return acc, order
