"""Data as a source of chunks: in-memory arrays, or a data loader of ``(x, y)`` minibatches.

Every pass over data (checks, training, curvature, BatchNorm statistics, prediction,
log-likelihoods for ArviZ) reads a :class:`DataSource` chunk by chunk, so no call of the network
needs every row at once and data that do not fit in memory can be used at all.

* :class:`ArrayData`: ``x`` and ``y`` as tensors (what ``mz.fit(model, x, y)`` has always
  taken);
* :class:`LoaderData`: a ``torch.utils.data.DataLoader``, or any *re-iterable* of ``(x, y)``
  minibatches (``x`` alone for inputs without targets). Each pass iterates the loader once,
  so its shuffling and its transforms (random crop, flip, ...) run as the loader defines them.
  The number of rows ``n`` is read from the loader (its sampler or data set) or given.

:func:`as_data` tells the two apart.

Examples
--------
>>> import torch
>>> from torch.utils.data import DataLoader, TensorDataset
>>> x, y = torch.randn(10, 3), torch.randn(10)
>>> src = as_data(DataLoader(TensorDataset(x, y), batch_size=4))
>>> src.n, src.in_memory
(10, False)
>>> [tuple(xb.shape) for xb, _ in src.chunks(3)]
[(3, 3), (1, 3), (3, 3), (1, 3), (2, 3)]
>>> arrays = as_data(x, y)
>>> [xb.shape[0] for xb, _ in arrays.chunks(4)]
[4, 4, 2]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from marginalize._validation import check_x, check_y
from marginalize.errors import DataError

__all__ = ["DataSource", "ArrayData", "LoaderData", "as_data", "is_loader"]


class DataSource:
    """Rows ``(x, y)`` read in chunks (see the module docstring).

    Attributes
    ----------
    n : int
        Number of rows (the ``N`` a minibatch likelihood is scaled to).
    in_memory : bool
        Whether every row is held as one tensor (``x``, ``y``); methods that need the whole
        data set at once (full-batch L-BFGS, NUTS/HMC) require it.
    has_targets : bool
        Whether the rows come with targets ``y``.
    """

    n: int
    in_memory: bool = False
    has_targets: bool = True

    def chunks(
        self, rows: int | None = None, *, device=None, dtype=None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One pass over every row in a fixed order, in chunks of at most ``rows`` rows.

        Parameters
        ----------
        rows : int, optional
            The most rows per chunk (None: the whole array; a loader's own batches).
        device, dtype : optional
            Where chunks go and the float dtype of ``x`` (integer inputs stay integers).

        Yields
        ------
        (x, y)
            ``x`` ``(B, ...)`` and ``y`` ``(B, ...)`` (``None`` without targets).
        """
        raise NotImplementedError

    def batches_per_epoch(self, batch_size: int | None = None) -> int:
        """Minibatches in one pass: the loader's own (``len(loader)``, else ``n`` over the
        size of its first batch, rounded up); for arrays ``n // batch_size`` (the training
        loop drops an incomplete last batch) or 1 for the full batch."""
        raise NotImplementedError

    def inputs(self, rows: int | None = None, *, device=None, dtype=None):
        """The inputs ``x`` of :meth:`chunks` (one pass, in chunks of at most ``rows`` rows)."""
        for x, _ in self.chunks(rows, device=device, dtype=dtype):
            yield x

    def example(self, k: int = 2) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first ``k`` rows (or fewer), for traces and probes of the model."""
        xs, ys, got = [], [], 0
        for xb, yb in self.chunks(k):
            xs.append(xb)
            ys.append(yb)
            got += xb.shape[0]
            if got >= k:
                break
        if not xs:
            raise DataError("the data have no rows")
        x = torch.cat(xs)[:k]
        y = None if ys[0] is None else torch.cat(ys)[:k]
        return x, y


class ArrayData(DataSource):
    """In-memory rows: ``x`` ``(N, ...)`` and ``y`` ``(N, ...)`` (or ``None``) as tensors."""

    in_memory = True

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None):
        self.x = x
        self.y = y
        self.n = int(x.shape[0])
        self.has_targets = y is not None

    def chunks(self, rows=None, *, device=None, dtype=None):
        step = self.n if rows is None else max(1, int(rows))
        for i in range(0, self.n, step):
            xb = self.x[i : i + step]
            yb = None if self.y is None else self.y[i : i + step]
            yield _place(xb, yb, device, dtype)

    def batches_per_epoch(self, batch_size=None):
        if batch_size is None or batch_size >= self.n:
            return 1
        return self.n // int(batch_size)

    def __repr__(self) -> str:
        return f"ArrayData(n={self.n}, x={tuple(self.x.shape)})"


class LoaderData(DataSource):
    """A re-iterable of minibatches ``(x, y)`` (or ``x`` alone) with ``n`` rows in all.

    Parameters
    ----------
    loader : iterable
        A ``torch.utils.data.DataLoader`` or any object that can be iterated more than once,
        yielding ``(x, y)`` pairs (tuples or lists) or ``x`` tensors.
    n : int, optional
        Rows per pass. Default: ``len(loader.sampler)`` (or ``len(loader.dataset)``) for a
        DataLoader; required otherwise.

    Raises
    ------
    DataError
        A one-shot iterator (a generator), or an unknown ``n``.
    """

    in_memory = False

    def __init__(self, loader: Iterable, n: int | None = None):
        if iter(loader) is loader:
            raise DataError(
                "x: a one-shot iterator (e.g. a generator) can be read only once, and every "
                "method passes over the data more than once: pass a DataLoader, or any object "
                "whose iter() starts a new pass"
            )
        self.loader = loader
        self.n = _rows_of(loader) if n is None else _check_n(n)
        first = _split(next(iter(loader), None))
        self.has_targets = first is not None and first[1] is not None

    def chunks(self, rows=None, *, device=None, dtype=None):
        for raw in self.loader:
            parts = _split(raw)
            if parts is None:
                raise DataError(
                    "x: a data loader must yield (x, y) pairs or x tensors, got "
                    f"{type(raw).__name__}"
                )
            xb, yb = parts
            xb = check_x("x", xb, keep_int=True)
            if yb is not None:
                yb = check_y(yb, xb.shape[0])
            step = xb.shape[0] if rows is None else max(1, int(rows))
            for i in range(0, xb.shape[0], step):
                yield _place(
                    xb[i : i + step], None if yb is None else yb[i : i + step], device, dtype
                )

    def batches_per_epoch(self, batch_size=None):
        try:
            return max(1, int(len(self.loader)))  # type: ignore[arg-type]
        except (TypeError, NotImplementedError):
            first = _split(next(iter(self.loader), None))
            size = 1 if first is None else max(1, int(len(first[0])))
            return max(1, -(-self.n // size))

    def generators(self) -> list[torch.Generator]:
        """The loader's own random generators (a DataLoader's ``generator`` and its sampler's),
        whose states a checkpoint saves so that a resumed fit reads the same minibatches."""
        found: list[torch.Generator] = []
        parts = [self.loader, getattr(self.loader, "sampler", None)]
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        parts += [batch_sampler, getattr(batch_sampler, "sampler", None)]
        for part in parts:
            g = getattr(part, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not h for h in found):
                found.append(g)
        return found

    def __repr__(self) -> str:
        return f"LoaderData(n={self.n}, loader={type(self.loader).__name__})"


def _place(x, y, device, dtype):
    if device is not None:
        x = x.to(device, non_blocking=True)
        y = None if y is None else y.to(device, non_blocking=True)
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    return x, y


def _split(raw: Any) -> tuple[Any, Any] | None:
    if isinstance(raw, (tuple, list)) and len(raw) in (1, 2):
        return raw[0], raw[1] if len(raw) == 2 else None
    if isinstance(raw, (torch.Tensor, np.ndarray)):
        return raw, None
    return None


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"n: expected the number of rows (a positive int), got {n!r}")
    return int(n)


def _rows_of(loader: Any) -> int:
    for attr in ("sampler", "dataset"):
        part = getattr(loader, attr, None)
        if part is not None:
            try:
                return _check_n(len(part))
            except (TypeError, NotImplementedError):
                continue
    raise DataError(
        f"x: cannot tell how many rows the {type(loader).__name__} holds (no sampler or data "
        "set with a length): pass n=NUMBER_OF_ROWS"
    )


_ARRAYS = (torch.Tensor, np.ndarray, list, tuple, str, bytes, dict)


def is_loader(obj: Any) -> bool:
    """Whether ``obj`` is a data loader (an iterable of minibatches) rather than an array."""
    if isinstance(obj, (DataSource, *_ARRAYS)) or obj is None:
        return isinstance(obj, LoaderData)
    if type(obj).__module__.startswith(("pandas", "numpy", "scipy")):
        return False
    return isinstance(obj, torch.utils.data.DataLoader) or hasattr(obj, "__iter__")


def as_data(x: Any, y: Any = None, *, n: int | None = None) -> DataSource:
    """``x`` (and ``y``) as a :class:`DataSource`.

    A :class:`DataSource` is returned as it is; a data loader (see :func:`is_loader`) becomes a
    :class:`LoaderData` (then ``y`` must be None: the targets come with the minibatches); arrays
    become an :class:`ArrayData` after the usual checks.

    Raises
    ------
    DataError
        ``y`` given with a loader; bad arrays (see ``marginalize._validation``).
    """
    if isinstance(x, DataSource):
        return x
    if is_loader(x):
        if y is not None:
            raise DataError(
                "y: a data loader yields (x, y) minibatches itself; pass y=None with a loader"
            )
        return LoaderData(x, n)
    xt = check_x("x", x, keep_int=True)
    yt = None if y is None else check_y(y, xt.shape[0], device=xt.device)
    return ArrayData(xt, yt)
