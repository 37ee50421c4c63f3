"""How many draws and inputs one network call of the predictive may take.

Every pass of the predictive evaluates chunks of ``draws x inputs``; a chunk's memory is its
activations, so chunks are sized from the bytes of activations one input makes in one draw,
measured once per input shape (:class:`ActivationMeter`: one probe forward at one and at
three inputs, the difference being the per-input part), never from weight shapes and never
as "all rows in one call". :func:`plan_chunks` turns that figure into ``(draws per chunk,
inputs per block)`` within a byte budget, so the peak memory of a prediction does not depend
on the number of inputs.

The budgets are part of the speed of prediction (measured in ``benchmarks/prediction.py``):
on the CPU a builder MLP's batched forward is memory-bound; at few inputs, many draws whose
live activations stay within the core's cache (``CPU_CHUNK_BYTES``) amortize the per-call
cost, and at many inputs one draw over large blocks of inputs (a plain loop over draws of
big matrix products, up to ``CPU_MAX_CHUNK_BYTES``) is fastest; on a GPU large chunks
amortize kernel launches (``GPU_CHUNK_BYTES``).

Examples
--------
>>> import torch
>>> meter = ActivationMeter()
>>> lin = torch.nn.Linear(4, 100)
>>> units = meter.units_per_input(lambda x: torch.relu(lin(x)), torch.randn(5, 4))
>>> units  # one Linear output of 100 numbers per input (the ReLU's output is a new tensor)
200
>>> plan_chunks(1000, 100, 4 * units, torch.device("cpu"))  # many draws at few inputs
ChunkPlan(draws=52, rows=100)
>>> plan_chunks(1000, 10**6, 4 * units, torch.device("cpu"))  # one draw at blocks of inputs
ChunkPlan(draws=1, rows=83886)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "ActivationMeter",
    "ChunkPlan",
    "plan_chunks",
    "CPU_CHUNK_BYTES",
    "CPU_MAX_CHUNK_BYTES",
    "GPU_CHUNK_BYTES",
    "MIN_DRAWS_PER_CHUNK",
]

#: bytes of live activations of one chunk on the CPU: about what stays in a core's cache
#: (measured in ``benchmarks/prediction.py``)
CPU_CHUNK_BYTES = 4 * 2**20
#: the most bytes of live activations one chunk may take on the CPU, when even one draw at
#: every input exceeds ``CPU_CHUNK_BYTES``: one draw over blocks of inputs this large (a plain
#: loop over draws, the fastest form at many inputs)
CPU_MAX_CHUNK_BYTES = 64 * 2**20
#: the same on a GPU, where large chunks amortize kernel launches (both budgets)
GPU_CHUNK_BYTES = 256 * 2**20
#: fewest draws a chunk batches over every input; when fewer fit, one draw over blocks of
#: inputs is faster (measured in ``benchmarks/prediction.py``)
MIN_DRAWS_PER_CHUNK = 8


@dataclass(frozen=True)
class ChunkPlan:
    """``draws`` per chunk and input ``rows`` per block of one pass of the predictive."""

    draws: int
    rows: int


def plan_chunks(
    n_draws: int,
    n_rows: int,
    row_bytes: int,
    device: torch.device,
    *,
    draws: int | None = None,
    budget: int | None = None,
) -> ChunkPlan:
    """Draws per chunk and inputs per block so that one chunk's activations fit the budget.

    Parameters
    ----------
    n_draws, n_rows : int
        Draws and inputs of the whole pass (``n_rows`` may be an upper bound, e.g. a loader's
        length).
    row_bytes : int
        Bytes of activations one input makes in one draw (:class:`ActivationMeter`).
    device : torch.device
        Picks the budgets (``CPU_CHUNK_BYTES`` and ``CPU_MAX_CHUNK_BYTES``, or
        ``GPU_CHUNK_BYTES``).
    draws : int, optional
        Draws per chunk asked for (``chunk_size``): the inputs are then taken in blocks that
        keep each chunk within the larger budget.
    budget : int, optional
        Bytes of one chunk's activations (default by device).

    Returns
    -------
    ChunkPlan
        With every input: as many draws as fit the budget, if that is at least
        ``MIN_DRAWS_PER_CHUNK`` (or every draw); otherwise one draw over blocks of as many
        inputs as fit the larger budget. At least one of each.
    """
    cpu = device.type == "cpu"
    if budget is None:
        budget = CPU_CHUNK_BYTES if cpu else GPU_CHUNK_BYTES
    most = max(budget, CPU_MAX_CHUNK_BYTES) if cpu else budget
    n_draws, n_rows, row_bytes = max(1, n_draws), max(1, n_rows), max(1, int(row_bytes))
    if draws is not None:
        d = max(1, min(draws, n_draws))
        return ChunkPlan(d, max(1, min(n_rows, most // (row_bytes * d))))
    fit = budget // (row_bytes * n_rows)
    if fit >= min(MIN_DRAWS_PER_CHUNK, n_draws):
        return ChunkPlan(min(fit, n_draws), n_rows)
    return ChunkPlan(1, max(1, min(n_rows, most // row_bytes)))


class _Counter(TorchFunctionMode):
    """Tracks the bytes of tensors created by torch calls while active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive]
        self.current = 0
        self.peak = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (vmap, meta)
            return
        key = storage.data_ptr()
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


class ActivationMeter:
    """Bytes of activations one input makes in one forward pass, measured once per input shape.

    The forward runs under a :class:`torch.overrides.TorchFunctionMode` that follows every
    tensor created by a torch call until it is freed; the peak of live bytes at two inputs
    minus that at one input is the part that grows with the inputs (weights, buffers and
    per-call constants cancel). With one input at hand its peak is used (an upper bound).
    Models that state their own figure (a builder's ``units_per_input``) are not probed.
    """

    def __init__(self):
        #: (input shape past the first dim, dtype) -> activation numbers per input
        self.units: dict[tuple, int] = {}

    def units_per_input(self, fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> int:
        """Numbers (tensor elements, all dtypes counted by bytes / ``x``'s float size) of
        activations per input of ``fn`` at inputs shaped like ``x``; probed once per shape."""
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self.units:
            self.units[key] = self._probe(fn, x)
        return self.units[key]

    @staticmethod
    def _peak(fn, x: torch.Tensor) -> int:
        counter = _Counter()
        with torch.no_grad(), counter:
            out = fn(x)
        del out
        return counter.peak

    def _probe(self, fn, x: torch.Tensor) -> int:
        size = torch.finfo(x.dtype).bits // 8 if x.is_floating_point() else 4
        if x.shape[0] >= 2:
            grow = self._peak(fn, x[:2]) - self._peak(fn, x[:1])
        else:
            grow = self._peak(fn, x[:1])
        return max(1, int(-(-grow // size)))
