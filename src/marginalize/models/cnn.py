"""A Bayesian convolutional network builder: :func:`cnn`.

Convolution weights are ``pyro.sample`` sites in PyTorch's layout ``(out, in, kh, kw)``;
dense weights are ``(in, out)`` as in :class:`~marginalize.models.builders.MLP`. The
forward pass evaluates S draws of the weights at once: the first convolution (whose input
is shared by every draw) is one matrix product over unfolded patches, later convolutions
are one *grouped* convolution with the S draws as groups, and activations stay in the
layout ``(N, S * channels, H, W)`` until the dense head. Draws are processed in blocks
that bound the activation memory.

Examples
--------
>>> import torch, marginalize as mz
>>> model = mz.models.cnn(1, 8, channels=[4], hidden=[16], num_classes=10)
>>> model
CNN(1x8x8, conv[4] k3 pool2, fc[16], 10 outputs, relu, Categorical(num_classes=10))
>>> params = {k: v.expand(5, *v.shape) for k, v in model.sample_params(torch.zeros(())).items()}
>>> model.forward(params, torch.randn(3, 1, 8, 8)).shape
torch.Size([5, 3, 10])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from marginalize._validation import plain_ints, plain_number
from marginalize.errors import DataError, ModelError
from marginalize.models.base import BNN, LayerSpec, builder
from marginalize.models.builders import ACTIVATIONS, dense
from marginalize.models.likelihoods import Likelihood, get_likelihood
from marginalize.models.priors import Prior, resolve_priors

__all__ = ["CNN", "cnn"]

#: bytes of activations one block of draws may use inside :meth:`CNN.forward`
BLOCK_BYTES = 128 * 2**20


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    v = plain_ints(v)
    if isinstance(v, bool):
        raise ModelError(f"{name} must be a positive int or a pair of them, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    v = tuple(v)
    if len(v) != 2 or any(isinstance(a, bool) or not isinstance(a, int) or a < 1 for a in v):
        raise ModelError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return v  # type: ignore[return-value]


@builder("cnn")
class CNN(BNN):
    """Bayesian CNN: ``[conv k x k ('same' padding) -> activation -> max-pool] * len(channels)
    -> flatten -> [dense -> activation] * len(hidden) -> dense``.

    Sites: ``conv{k}.weight`` ``(out, in, kh, kw)`` with dims ``(conv{k}_out, conv{k}_in,
    conv{k}_kh, conv{k}_kw)`` and ``conv{k}.bias``; ``fc{k}.weight`` ``(in, out)`` and
    ``fc{k}.bias`` (the last ``fc`` is the output layer); plus the prior's hyper sites and
    the likelihood's latent sites. MC dropout masks input channels of convolutions
    (``input_axis=1``) and input units of dense layers.
    """

    builder = "cnn"

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        channels: Sequence[int],
        hidden: Sequence[int],
        out_features: int,
        likelihood: Likelihood,
        priors: Mapping[str, Prior],
        kernel_size: int = 3,
        activation: str = "relu",
        pool: int | None = 2,
    ):
        super().__init__(likelihood, priors, out_features)
        self.in_channels = int(in_channels)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = [int(c) for c in channels]
        self.hidden = [int(h) for h in hidden]
        self.kernel_size = int(kernel_size)
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.pool = int(pool) if pool else None
        k = self.kernel_size
        specs: list[LayerSpec] = []
        c_in, (h, w) = self.in_channels, self.image_size
        #: per conv layer: (channels out, H, W after the convolution, pooled?)
        self._conv_shapes: list[tuple[int, int, int, bool]] = []
        for i, c_out in enumerate(self.channels, start=1):
            name = f"conv{i}"
            specs.append(
                LayerSpec(
                    name=name,
                    weight_shape=(c_out, c_in, k, k),
                    bias_shape=(c_out,),
                    fan_in=c_in * k * k,
                    weight_dims=(f"{name}_out", f"{name}_in", f"{name}_kh", f"{name}_kw"),
                    bias_dims=(f"{name}_out",),
                    input_axis=1,
                )
            )
            pooled = self.pool is not None and h >= self.pool and w >= self.pool
            self._conv_shapes.append((c_out, h, w, pooled))
            if pooled:
                h, w = h // self.pool, w // self.pool
            c_in = c_out
        self.flat_features = c_in * h * w
        widths = [self.flat_features, *self.hidden, likelihood.net_outputs(out_features)]
        for i in range(len(widths) - 1):
            name = f"fc{i + 1}"
            specs.append(
                LayerSpec(
                    name=name,
                    weight_shape=(widths[i], widths[i + 1]),
                    bias_shape=(widths[i + 1],),
                    fan_in=widths[i],
                    weight_dims=(f"{name}_in", f"{name}_out"),
                    bias_dims=(f"{name}_out",),
                )
            )
        self._specs = specs
        self._n_conv = len(self.channels)

    # ---- architecture -------------------------------------------------------------------
    def layer_specs(self) -> list[LayerSpec]:
        return self._specs

    @property
    def layer_names(self) -> list[str]:
        return [s.name for s in self._specs]

    @property
    def in_features(self) -> int:
        return self.in_channels * self.image_size[0] * self.image_size[1]

    def units_per_input(self, x: torch.Tensor | None = None) -> int:
        """Largest number of activations one input produces in one draw (chunk sizing; the
        unfolded input patches are shared by all draws and not counted)."""
        units = [c * h * w for c, h, w, _ in self._conv_shapes]
        units += [s.weight_shape[-1] for s in self._specs[self._n_conv :]]
        return max(units)

    def check_input(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """Images ``(N, C, H, W)``; flattened rows ``(N, C*H*W)`` are reshaped (C-major)."""
        c, (h, w) = self.in_channels, self.image_size
        if x.dim() == 2 and x.shape[1] == c * h * w:
            x = x.reshape(x.shape[0], c, h, w)
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise DataError(
                f"{name}: this CNN takes images of shape (N, {c}, {h}, {w}) (or flattened rows "
                f"(N, {c * h * w})), got {tuple(x.shape)}"
            )
        return x

    # ---- forward ------------------------------------------------------------------------
    def forward(
        self, params: Mapping[str, torch.Tensor], x: torch.Tensor, state=None
    ) -> torch.Tensor:
        """Outputs ``(*batch, N, net_outputs)`` for weights with leading dims ``*batch``."""
        first = params["conv1.weight"] if self._n_conv else params["fc1.weight"]
        nd = 4 if self._n_conv else 2
        batch = tuple(first.shape[: first.dim() - nd])
        s = math.prod(batch)
        names = [f"{spec.name}.{part}" for spec in self._specs for part in ("weight", "bias")]
        flat = {k: params[k].reshape(s, *params[k].shape[len(batch) :]) for k in names}
        n = x.shape[0]
        itemsize = x.element_size()
        block = max(1, BLOCK_BYTES // (3 * itemsize * max(n, 1) * self.units_per_input()))
        if s <= block:
            out = self._forward_flat(flat, x, s)
        else:
            out = torch.cat(
                [
                    self._forward_flat(
                        {k: v[i : i + block] for k, v in flat.items()}, x, min(block, s - i)
                    )
                    for i in range(0, s, block)
                ]
            )
        return out.reshape(*batch, n, out.shape[-1])

    def _forward_flat(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, s: int) -> torch.Tensor:
        """``s`` draws (leading dim of every tensor in ``p``) -> ``(s, N, net_outputs)``."""
        n = x.shape[0]
        k = self.kernel_size
        pad = k // 2
        h = x
        for i, (c_out, hh, ww, pooled) in enumerate(self._conv_shapes, start=1):
            wt, b = p[f"conv{i}.weight"], p[f"conv{i}.bias"]
            c_in = wt.shape[2]
            if i == 1:
                # shared input: one product of all draws' filters with the unfolded patches
                cols = F.unfold(h, k, padding=pad)  # (N, C_in k k, H W)
                h = torch.matmul(wt.reshape(s * c_out, c_in * k * k), cols)
                h = (h + b.reshape(s * c_out, 1)).reshape(n, s * c_out, hh, ww)
            else:
                # draws as groups: (N, s C_in, H, W) -> (N, s C_out, H, W)
                h = F.conv2d(
                    h, wt.reshape(s * c_out, c_in, k, k), b.reshape(-1), padding=pad, groups=s
                )
            h = self.act(h)
            if pooled:
                h = F.max_pool2d(h, self.pool)
        if self._n_conv:
            h = h.reshape(n, s, -1).transpose(0, 1)  # (s, N, C H W), flattened like nn.Flatten
        else:
            h = x.reshape(n, -1).expand(s, n, -1)
        fcs = self._specs[self._n_conv :]
        for j, spec in enumerate(fcs):
            h = dense(h, p[f"{spec.name}.weight"], p[f"{spec.name}.bias"])
            if j < len(fcs) - 1:
                h = self.act(h)
        return h

    # ---- config -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "builder": self.builder,
            "in_channels": self.in_channels,
            "image_size": list(self.image_size),
            "channels": self.channels,
            "hidden": self.hidden,
            "out_features": self.out_features,
            "kernel_size": self.kernel_size,
            "activation": self.activation,
            "pool": self.pool,
            **self._base_config(),
        }

    @classmethod
    def from_config(cls, cfg, *, likelihood, priors):
        cfg = dict(cfg)
        cfg["image_size"] = tuple(cfg["image_size"])
        return cls(likelihood=likelihood, priors=priors, **cfg)

    def __repr__(self) -> str:
        c, (h, w) = self.in_channels, self.image_size
        conv = f"conv{self.channels} k{self.kernel_size} pool{self.pool or 1}"
        return (
            f"CNN({c}x{h}x{w}, {conv}, fc{self.hidden}, {self.out_features} outputs, "
            f"{self.activation}, {self.likelihood!r})"
        )


def cnn(
    in_channels: int,
    image_size: int | Sequence[int],
    channels: Sequence[int] = (16, 32),
    *,
    kernel_size: int = 3,
    hidden: Sequence[int] = (64,),
    num_classes: int | None = None,
    out_features: int | None = None,
    prior: Prior | Mapping[str, Prior] | None = None,
    likelihood: str | Likelihood = "categorical",
    activation: str = "relu",
    pool: int | None = 2,
) -> CNN:
    """Build a Bayesian CNN as a Pyro model ``model(x, y=None)`` for images ``(N, C, H, W)``.

    Parameters
    ----------
    in_channels : int
    image_size : int or (int, int)
        Height and width of the input images.
    channels : sequence of int
        Output channels of each convolution (each followed by the activation and, where the
        image is still large enough, a ``pool x pool`` max-pool).
    kernel_size : int
        Odd kernel size; convolutions use 'same' zero padding.
    hidden : sequence of int
        Widths of the dense layers between the flattened features and the output layer.
    num_classes : int, optional
        Number of classes (categorical likelihood); ``out_features`` is its synonym for
        other likelihoods (default 1).
    prior : Prior or mapping of layer name (``conv1``, ..., ``fc1``, ...) to Prior
        Default ``Normal(1.0)``; e.g. ``mz.priors.Normal(alpha)`` for W&I's N(0, alpha^2).
    likelihood : str or Likelihood
        ``"categorical"`` (default), ``"bernoulli"``, ``"gaussian"``, ``"heteroscedastic"``.
    activation : str
        One of ``marginalize.models.builders.ACTIVATIONS``.
    pool : int or None
        Max-pool size after each convolution (None or 1: no pooling).

    Examples
    --------
    >>> import marginalize as mz
    >>> m = mz.models.cnn(1, 8, channels=[8, 16], hidden=[32], num_classes=10,
    ...                   prior=mz.priors.Normal(0.1))
    >>> m.layer_names
    ['conv1', 'conv2', 'fc1', 'fc2']
    """
    lik = get_likelihood(likelihood)
    in_channels, kernel_size, pool = map(plain_number, (in_channels, kernel_size, pool))
    num_classes, out_features = plain_number(num_classes), plain_number(out_features)
    channels, hidden = plain_ints(channels), plain_ints(hidden)
    for name, v in (("in_channels", in_channels),):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ModelError(f"{name} must be a positive int, got {v!r}")
    size = _pair(image_size, "image_size")
    if isinstance(channels, int):
        channels = [channels]
    if isinstance(hidden, int):
        hidden = [hidden]
    for name, seq in (("channels", channels), ("hidden", hidden)):
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in seq):
            raise ModelError(f"{name} must be a sequence of positive ints, got {seq!r}")
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ModelError(
            f"kernel_size must be a positive odd int ('same' padding), got {kernel_size!r}"
        )
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 1):
        raise ModelError(f"pool must be a positive int or None, got {pool!r}")
    if activation not in ACTIVATIONS:
        raise ModelError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    if num_classes is not None and out_features is not None and num_classes != out_features:
        raise ModelError(f"num_classes={num_classes} and out_features={out_features} disagree")
    out = num_classes if num_classes is not None else out_features
    if lik.kind == "categorical":
        out = out if out is not None else lik.num_classes
        if out is None:
            raise ModelError("a categorical CNN needs num_classes")
        if lik.num_classes is None:
            lik.num_classes = out
        elif lik.num_classes != out:
            raise ModelError(f"num_classes={out} but the likelihood has {lik.num_classes} classes")
        if out < 2:
            raise ModelError("a categorical likelihood needs at least 2 classes")
    elif out is None:
        out = 1
    names = [f"conv{i + 1}" for i in range(len(channels))]
    names += [f"fc{i + 1}" for i in range(len(hidden) + 1)]
    return CNN(
        in_channels,
        size,
        list(channels),
        list(hidden),
        int(out),
        lik,
        resolve_priors(prior, names),
        kernel_size=kernel_size,
        activation=activation,
        pool=pool if pool and pool > 1 else None,
    )
