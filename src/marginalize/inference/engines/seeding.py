"""Seeding and isolation of fits: each fit (and each member, run or chain inside it) runs in
its own Pyro param-store scope with its own RNG states, seeded from one integer.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pyro
import torch

__all__ = ["isolated", "member_seed"]


@contextlib.contextmanager
def isolated(seed: int):
    """Own param-store scope and RNG states (torch, Python, NumPy): nothing leaks between fits.

    Seeds as ``pyro.set_rng_seed(seed)`` does (NumPy gets ``seed % 2**32``, so derived seeds
    of any size work).
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    with torch.random.fork_rng(devices=devices), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 - as pyro.set_rng_seed
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002


def member_seed(seed: int, k: int) -> int:
    """The seed of member (or run) ``k`` of a fit with ``seed`` (below 2**31, distinct per k)."""
    return (int(seed) * 7919 + 104729 * (k + 1)) % (2**31 - 1)
