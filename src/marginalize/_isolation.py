"""Fits independent of their surroundings: one process-wide lock over Pyro's global state.

Pyro keeps its param store, its handler stack (``poutine`` messengers, ``pyro.plate``,
``pyro.condition``) and the allocation of plate dims in module globals, and Pyro's sample sites
draw from torch's global generator, which a fit seeds. So two fits running at once in two
threads would mix their state, and a handler the caller left open around ``mz.fit`` (say
``poutine.scale`` or ``pyro.plate``) would act on every site of the fit. :func:`exclusive`
gives the code inside it that state alone: it holds a re-entrant process-wide lock (fits in
other threads wait their turn and give the results of the same fits run one after the other),
sets the caller's open handlers and plate dims aside and puts them back afterwards, and turns
gradients on (a fit called under ``torch.no_grad()`` or ``torch.inference_mode()`` still
trains).

It does not make other code safe: user code in other threads that draws from torch's global
generator while a fit runs changes that fit's draws, as it would in any Pyro program.

Examples
--------
>>> import pyro
>>> from pyro import poutine
>>> with poutine.scale(scale=10.0):
...     with exclusive():
...         print(len(pyro.poutine.runtime._PYRO_STACK))   # the caller's handler is set aside
0
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from pyro.poutine import runtime

__all__ = ["exclusive", "no_validation"]

_LOCK = threading.RLock()


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Run the block alone: under the process-wide lock, with no caller handler active and
    gradients on (see the module docstring). Re-entrant in the same thread."""
    with _LOCK:
        # Pyro keeps its handler stack and plate dims in module globals with no accessor
        stack, dims = runtime._PYRO_STACK, runtime._DIM_ALLOCATOR._stack  # noqa: SLF001
        saved_stack, saved_dims = stack[:], dims[:]
        del stack[:], dims[:]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                yield
        finally:
            stack[:] = saved_stack
            dims[:] = saved_dims


@contextlib.contextmanager
def no_validation() -> Iterator[None]:
    """Distribution argument checks off for the block (torch's default and Pyro's): hot loops
    skip their cost, and a trajectory step does not raise mid-way."""
    import pyro

    old = torch.distributions.Distribution._validate_args  # noqa: SLF001 - no getter in torch
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(old)
