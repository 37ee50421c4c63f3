"""Peak memory of the data checks before a fit (``core/problem.py`` ``prepare``), by N.

``prepare`` traces the model on a few rows and checks every in-memory row against it (labels,
support, a finite log likelihood at a prior draw) in chunks sized from the model's measured
activation memory, so its peak memory must not grow with the number of rows (issue 25: at
commit 31c1901 one forward over all rows took 3.5 GB at N = 10,000 for a ResNet-20). Each N
runs in a fresh subprocess (ResNet-20 of ``mz.models.nets.resnet``, ``cifar_like`` images as
float32, one thread); the peak resident memory above the data already in memory (Linux
``VmHWM`` reset before the call) is set against a hand-written reference measured the same way
in the same subprocess: one eval-mode forward of the module over 1,024 images (the largest
chunk ``prepare`` may use).

Run: ``python benchmarks/prepare_memory.py`` (a few minutes: a forward pass over every row per
N), ``--sizes 1000,2000`` for a quick look.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CHILD = r"""
import gc, json, sys, time, torch
torch.set_num_threads(1)
import marginalize as mz
from marginalize.core.problem import prepare
from marginalize.datasets.images import cifar_like
from marginalize.models.nets import resnet

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def peak_of(fn):
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
    base = status("VmRSS")
    t = time.process_time()
    fn()
    return status("VmHWM") - base, time.process_time() - t

n = int(sys.argv[1])
x, y = cifar_like(n, seed=0)
x = x.float() / 255
net = resnet(20).eval()
model = mz.models.bayesian(net, likelihood="categorical")
got, got_t = peak_of(lambda: prepare(model, x, y))  # first: freed pages would hide its peak
with torch.no_grad():
    ref, ref_t = peak_of(lambda: net(x[:1024]))
print(json.dumps({"n": n, "prepare": got, "prepare_s": got_t, "ref": ref, "ref_s": ref_t}))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2500,5000,10000")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mib = 2**20
        rows.append(
            [
                r["n"],
                f"{r['prepare'] / mib:.0f}",
                f"{r['ref'] / mib:.0f}",
                f"{r['prepare'] / max(r['ref'], 1):.2f}",
                f"{r['prepare_s']:.1f}",
            ]
        )
    body = (
        "ResNet-20 (269,722 weights, BatchNorm), cifar_like images as float32, one thread.\n\n"
        + C.table(
            [
                "N",
                "prepare: peak extra MiB",
                "torch forward of 1,024 images: peak extra MiB",
                "ratio",
                "prepare CPU s",
            ],
            rows,
        )
    )
    C.report(
        "prepare_memory",
        "Memory of the data checks before a fit, by the number of rows",
        body,
        notes=[
            "the machine is shared with other jobs (memory figures are per process)",
            "before this change (main at 5d207e7: one trace over every row) the same call took "
            "+3,004 MiB and 33 s CPU at N = 10,000 (measured on this machine, same call)",
        ],
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
