"""Epoch time of fits fed by a DataLoader against a hand-written torch loop (issue 24).

``mz.models.nets.resnet`` (three stages of ``--blocks`` BasicBlocks, width ``--width``:
ResNet-20 at 3 and 16) on ``--n`` images of ``datasets.images.cifar_like``, read by a
``DataLoader`` over ``ImageDataset(augment=True)`` (random crop after padding 4, horizontal
flip), minibatches of ``--batch``, float32, one thread. Unlike ``benchmarks/scale.py`` (whole
fits, one per subprocess), this isolates what one more epoch costs. Rows:

* **torch loop**: the module in train mode, Adam, the loss marginalize minimizes for MAP
  (cross-entropy summed over the minibatch and scaled by ``N / B``, plus the Normal(0, 1)
  prior's ``|w|^2 / 2``), one pass of the loader;
* **map**, **ensemble** (a member), **mc-dropout**, **svi-meanfield**:
  ``mz.fit(model, loader, ...)`` (swag's steps are map's; its automatic rate's curvature
  estimate is a set-up cost: see ``benchmarks/scale.py``). Each
  figure is ``(T(2 passes) - T(1 pass))``: what one more epoch costs, so the set-up (data
  checks, the final BatchNorm statistics pass) cancels; the set-up itself is reported apart.

Rounds are interleaved and each figure is the median over rounds (``--rounds``); ratios are of
medians from the same run. The goals of issue 24 (CPU): <= 1.1x the torch loop for map,
ensemble members and mc-dropout; <= 1.3x for svi-meanfield.

Run: ``python benchmarks/loader_epoch.py`` (ResNet-20 defaults: ``--n 2048`` takes some minutes
on one thread; ``--n 512 --blocks 1 --width 8`` for a quick look).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import marginalize as mz  # noqa: E402
from marginalize.datasets.images import ImageDataset, cifar_like  # noqa: E402
from marginalize.models.nets import resnet  # noqa: E402


def torch_epoch(net: nn.Module, loader: DataLoader, n: int) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for xb, yb in loader:
        opt.zero_grad()
        nll = F.cross_entropy(net(xb), yb, reduction="sum") * (n / xb.shape[0])
        prior = sum(p.square().sum() for p in net.parameters()) / 2
        (nll + prior).backward()
        opt.step()


METHODS = {
    "map": {"method": "map", "lr": 1e-3},
    "ensemble (a member)": {"method": "ensemble", "num_members": 1, "lr": 1e-3},
    "mc-dropout": {"method": "mc-dropout", "lr": 1e-3},
    "svi-meanfield": {"method": "svi-meanfield", "lr": 1e-3},
}


def fit_seconds(model, loader, name: str, epochs: int) -> float:
    kw = dict(METHODS.get(name, {}))
    kw["epochs"] = epochs
    t0 = C.CLOCK()
    mz.fit(model, loader, progress=False, seed=0, **kw)
    return C.CLOCK() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    C.single_thread()
    x, y = cifar_like(args.n, seed=0)
    loader = DataLoader(ImageDataset(x, y, augment=True), batch_size=args.batch, shuffle=True)
    depth = 6 * args.blocks + 2
    torch.manual_seed(0)
    net = resnet(depth, width=args.width)
    model = mz.models.bayesian(net, prior=mz.priors.Normal(1.0), likelihood="categorical")
    names = list(METHODS)
    times: dict[str, list[float]] = {k: [] for k in ["torch loop", *names]}
    setup: dict[str, list[float]] = {k: [] for k in names}
    torch_epoch(resnet(depth, width=args.width), loader, args.n)  # warm-up
    fit_seconds(model, loader, "map", 1)
    for _ in range(args.rounds):
        ref = resnet(depth, width=args.width)
        t0 = C.CLOCK()
        torch_epoch(ref, loader, args.n)
        times["torch loop"].append(C.CLOCK() - t0)
        for name in names:
            one = fit_seconds(model, loader, name, 1)
            two = fit_seconds(model, loader, name, 2)
            times[name].append(two - one)
            setup[name].append(2 * one - two)
    ref_t = statistics.median(times["torch loop"])
    rows = [["torch loop", f"{ref_t:.2f}", "1.00", ""]]
    for name in names:
        t = statistics.median(times[name])
        rows.append([name, f"{t:.2f}", f"{t / ref_t:.2f}", f"{statistics.median(setup[name]):.2f}"])
    params = sum(p.numel() for p in net.parameters())
    body = (
        f"ResNet ({args.blocks} blocks per stage, width {args.width}: {params:,} weights, "
        f"BatchNorm), {args.n} images 3x32x32, DataLoader with random crop + flip, batch "
        f"{args.batch}, {len(loader)} minibatches per epoch, median of {args.rounds} rounds.\n\n"
        + C.table(["run", "s per epoch", "x torch loop", "set-up s (checks, BN pass)"], rows)
    )
    C.report(
        "loader_epoch",
        "Epoch time from a DataLoader: marginalize vs a hand-written torch loop",
        body,
        notes=[
            "the machine is shared with other jobs: CPU time of this process, one thread",
            "set-up = T(1 epoch) - (T(2) - T(1)): the data checks (first minibatch), the final "
            "pass recomputing BatchNorm statistics at the fitted weights, and Python set-up",
        ],
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
