"""Layer-wise Gauss-Newton curvature of dense and convolutional layers: K-FAC factors and the
exact GGN of a few layers, from each layer's inputs and output gradients.

The layers (dense and convolutional layers of the builders, ``nn.Linear`` / ``nn.Conv2d``
with ``groups=1`` and zero padding of :func:`~marginalize.models.bayesian`, a module's
BatchNorm layers) and their recording are in :mod:`marginalize.core.layers`: one pass over a
chunk of rows keeps each layer's input ``a`` and a leaf on its output ``s``; nothing before
the first recorded layer keeps a graph, so a last layer costs one forward pass of the body
per chunk and a backward pass through that layer only. With ``L_n L_n^T`` the Hessian of
``-log p(y_n | f_n)`` in output space (one column ``l_k`` per output, see ``laplace``),
``g_{nk} = d (f_n . l_{nk}) / d s_n``:

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
  last-layer Laplace of any network (``k x k``, ``k`` the last layer's weights and bias), or
  its diagonal (``structure="diag"`` over whole layers, one layer's rows at a time);
* BatchNorm layers (eval mode, ``w xhat + b`` per channel): :func:`kfac` returns their exact
  GGN diagonal.

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

import torch

from marginalize.core.layers import (
    KLayer,
    find_layers,
    find_norms,
    layer_jacobian,
    outputs,
    patches,
    record,
    supports,
)
from marginalize.models.base import BNN

__all__ = ["KLayer", "find_layers", "find_norms", "kfac", "exact_ggn", "supports"]

log = logging.getLogger(__name__)


Chunks = Iterable[tuple[torch.Tensor, torch.Tensor]]
Factor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _gradients(f, lfac, leaves):
    """Per output direction ``k``, the leaves' gradients of ``f . l_k`` (one backward pass
    each, computed when asked: one direction's gradients alive at a time)."""
    dirs = lfac.shape[-1]
    with torch.enable_grad():
        for k in range(dirs):
            got = torch.autograd.grad(
                (f * lfac[:, :, k]).sum(), leaves, retain_graph=k < dirs - 1, allow_unused=True
            )
            yield [
                torch.zeros_like(e) if g is None else g for g, e in zip(got, leaves, strict=True)
            ]


def _passes(model, params, state, layers, chunks: Chunks, factor: Factor):
    """Per chunk: the recorded taps and an iterator over the output directions' gradients."""
    for x, y in chunks:
        with torch.enable_grad():
            f, taps = record(model, params, x, state, layers)
        lfac = factor(f.detach(), x, y).to(f.dtype)  # (B, O, O)
        yield taps, _gradients(f, lfac, taps.leaves())


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
        for j, layer in enumerate(layers):  # the input factors, once per chunk
            if layer.kind != "norm":
                r = layer.pos.shape[0]
                for a, _e in taps.calls[layer.name]:
                    a = patches(layer, a).reshape(-1, r)
                    a_acc[j] += a.T @ a
                    count[j] += a.shape[0]
        for per_k in grads:  # the output factors, one direction at a time
            i = 0
            for j, layer in enumerate(layers):
                r, c = layer.pos.shape
                for a, _e in taps.calls[layer.name]:
                    if layer.kind == "norm":  # exact GGN diagonal: a is xhat
                        a_acc[j] += layer_jacobian(layer, a, per_k[i]).pow(2).sum(0).reshape(r, c)
                    else:
                        g = outputs(layer, per_k[i]).reshape(-1, c)
                        g_acc[j] += g.T @ g
                    i += 1
    return [(a, like.new_tensor(float(n)), g) for a, n, g in zip(a_acc, count, g_acc, strict=True)]


def exact_ggn(
    model: BNN,
    params,
    layers: list[KLayer],
    chunks: Chunks,
    factor: Factor,
    state=None,
    diag: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GGN over the layers' coordinates together (``diag``: its diagonal only, one layer's
    Jacobian rows at a time) and their positions ``(K,)`` (the grids' row-major order, layer
    after layer); BatchNorm layers (:func:`~marginalize.core.layers.find_norms`) included."""
    order = torch.cat([layer.pos.reshape(-1) for layer in layers])
    k_all = order.numel()
    like = next(iter(params.values()))
    acc = like.new_zeros(k_all) if diag else like.new_zeros(k_all, k_all)
    for taps, grads in _passes(model, params, state, layers, chunks, factor):
        for per_k in grads:
            i, start, parts = 0, 0, []
            for layer in layers:
                m = None
                for a, _e in taps.calls[layer.name]:
                    t = layer_jacobian(layer, a, per_k[i])
                    m = t if m is None else m + t
                    i += 1
                size = layer.pos.numel()
                if m is None:  # the layer did not run on these rows
                    m = like.new_zeros(per_k[0].shape[0] if per_k else 0, size)
                if diag:
                    acc[start : start + size] += (m * m).sum(0)
                else:
                    parts.append(m)
                start += size
            if not diag:
                rows = torch.cat(parts, 1)  # (B, K): the per-example Jacobian rows, times L_n
                acc += rows.T @ rows
    return acc, order
