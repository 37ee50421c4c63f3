"""docs/guide/deep_learning.md runs: every code block, in order, in one namespace, with the
sizes of its first block made tiny (a ResNet of one block per stage on 8x8 images)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "guide" / "deep_learning.md"
TINY = (
    "SIZE = dict(train=64, test=16, image=8, width=4, blocks=1, epochs=1, batch=16, swag_epochs=3)"
)


def blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_code_block_runs_with_tiny_sizes():
    code = blocks(PAGE.read_text())
    assert len(code) >= 7
    first, n = re.subn(r"^SIZE = dict\(.*?\)\n", TINY + "\n", code[0], flags=re.S | re.M)
    assert n == 1, "the first block must define SIZE = dict(...)"
    ns: dict = {"__name__": "guide"}
    torch.manual_seed(0)
    for i, block in enumerate([first, *code[1:]]):
        exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), ns)  # noqa: S102
    assert ns["pred"].probs.shape == (16, 10)
    assert ns["la"].approximation.loc.shape == ns["swag"].approximation.loc.shape
    assert ns["multi"].num_chains == 3 and ns["ens"].num_chains == 3
    assert ns["multi"].state["bn.running_mean"].shape == (3, 4)
    # the Laplace approximation sits at the trained weights
    own = torch.cat([p.detach().reshape(-1) for p in ns["net"].parameters()])
    assert torch.equal(ns["la"].approximation.loc, own)
