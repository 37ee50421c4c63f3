import os
import signal

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
torch.set_num_threads(int(os.environ.get("MARGINALIZE_TEST_THREADS", "1")))

#: Added to the seeds of the statistical tier (``seeds``, the ``seed_offset`` fixture). CI runs
#: that tier a second time with another offset, thread count and BLAS core type, so a test that
#: passes only for one seed on one machine cannot land (see ``.ci/run``).
SEED_OFFSET = int(os.environ.get("MARGINALIZE_TEST_SEED_OFFSET", "0"))


def rseed(k: int = 0) -> int:
    """Seed ``k`` of a statistical test (data, fit or draws): ``k`` plus the run's offset."""
    return SEED_OFFSET + k


def seeds(n: int) -> list[int]:
    """``n`` seeds of a sweep: a property tested over them must hold for every one."""
    return [rseed(i) for i in range(n)]


@pytest.fixture
def seed_offset() -> int:
    return SEED_OFFSET


# Shrink these options (when a method has them) for the quick contract tests.
TINY = {
    "steps": 60,
    "num_samples": 20,
    "num_warmup": 20,
    "num_chains": 2,
    "max_tree_depth": 4,
    "num_steps": 5,
    "num_members": 2,
    "num_models": 2,
    "pretrain_steps": 60,
    "swag_steps": 40,
    "collect_steps": 40,
    "init_steps": 30,
    "rank": 2,
    "max_rank": 3,
}


def tiny_options(method: str) -> dict:
    import marginalize as mz

    defaults = mz.inference.get_method(method).option_defaults()
    return {k: v for k, v in TINY.items() if k in defaults}


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _python_sigint_handler():
    """Every test sees Python's own SIGINT handler, as a program run from a terminal does.

    A process started in the background by a non-interactive shell (``cmd &``, ``nohup``, some
    CI runners) inherits SIGINT ignored, and marginalize then leaves Ctrl-C alone (see
    ``inference/engines/interrupt.py``): the Ctrl-C tests would test nothing, or loop."""
    old = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.SIG_DFL)
