import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
torch.set_num_threads(int(os.environ.get("MARGINALIZE_TEST_THREADS", "1")))

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
