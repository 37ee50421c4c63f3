"""``Problem.log_joint(z, idx)`` with its gradient: plain model functions against builders.

What an SVI step (or SGD, SWAG, Bayes by Backprop) spends on the model: the log joint of
``P`` particles ``z`` ``(P, D)`` on a minibatch ``idx`` (likelihood scaled to the full
data), differentiated by ``backward()``. For the same network written two ways:

* the ``mlp`` builder (its pure-torch batched log joint, ``BNN.log_joint``), and
* a plain Pyro model function, through its compiled log joint (``core/compiled.py``),
  and through the Pyro trace it replaces (``Problem.log_joint_traced``: a loop over
  particles).

Networks: a 1-50-1 tanh regression on 100 points (full batch), and the 64-100-100-10 ReLU
classifier of ``benchmarks/svi_step.py`` on the digits data (minibatches of 128). float32,
one thread, best of several timed loops (CPU time of the process).

Run: ``python benchmarks/log_joint.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import marginalize as mz  # noqa: E402
from marginalize.core.problem import prepare  # noqa: E402


def mlp_plain(x, y=None):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([1, 50]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([50]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([50, 1]).to_event(2))
    b2 = pyro.sample("b2", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    noise = pyro.sample("noise", dist.HalfNormal(1.0))
    f = (torch.tanh(x @ w1 + b1) @ w2 + b2)[:, 0]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(f, noise), obs=y)


WIDTHS = [64, 100, 100, 10]


def digits_plain(x, y=None):
    h = x
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        w = pyro.sample(f"w{i}", dist.Normal(0.0, 1.0).expand([a, b]).to_event(2))
        c = pyro.sample(f"b{i}", dist.Normal(0.0, 1.0).expand([b]).to_event(1))
        h = h @ w + c
        if i < len(WIDTHS) - 2:
            h = torch.relu(h)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Categorical(logits=h), obs=y)


def problems():
    x = torch.linspace(-2, 2, 100)[:, None]
    y = torch.sin(2 * x[:, 0])
    mlp = mz.models.mlp(1, hidden=[50], activation="tanh", prior=mz.priors.Normal(1.0))
    ds = mz.datasets.load("digits")
    dx = torch.as_tensor(ds.x, dtype=torch.float32)
    dy = torch.as_tensor(ds.y, dtype=torch.long)
    digits = mz.models.mlp(
        64,
        hidden=[100, 100],
        activation="relu",
        likelihood="categorical",
        out_features=10,
        prior=mz.priors.Normal(1.0),
    )
    return {
        "1-50-1 tanh, 100 points, full batch": (mlp, mlp_plain, x, y, None),
        "64-100-100-10 relu, digits, batch 128": (digits, digits_plain, dx, dy, 128),
    }


def step_fn(pb, z0, batch, traced=False):
    g = torch.Generator().manual_seed(0)
    idx = None if batch is None else torch.randperm(pb.n, generator=g)[:batch]
    z = z0.clone().requires_grad_(True)
    f = pb.log_joint_traced if traced else pb.log_joint

    def step():
        z.grad = None
        (-f(z, idx).mean()).backward()

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    C.single_thread()
    rows, ratios = [], []
    for name, (builder, plain, x, y, batch) in problems().items():
        pb_b = prepare(builder, x, y)
        pb_p = prepare(plain, x, y)
        for p in args.particles:
            zb = torch.stack([pb_b.init_from_prior(i) for i in range(p)])
            zp = torch.stack([pb_p.init_from_prior(i) for i in range(p)])
            step_p = step_fn(pb_p, zp, batch)
            step_p()  # compiles this signature
            comp = pb_p.compiled().compiled((p,), batch, True)
            t_b = C.per_call(step_fn(pb_b, zb, batch), min_time=0.3, repeats=5)
            t_p = C.per_call(step_p, min_time=0.3, repeats=5)
            t_t = C.per_call(step_fn(pb_p, zp, batch, traced=True), min_time=0.3, repeats=3)
            ratios.append(t_p / t_b)
            rows.append(
                [
                    name,
                    p,
                    C.fmt_ms(t_b),
                    C.fmt_ms(t_p),
                    f"{t_p / t_b:.2f}x",
                    C.fmt_ms(t_t),
                    f"{t_t / t_b:.1f}x",
                    "NumPy" if comp is not None and comp.numpy else "Pyro trace",
                ]
            )
    body = C.table(
        [
            "network",
            "particles",
            "builder (ms)",
            "plain function, compiled (ms)",
            "ratio",
            "plain function, Pyro trace (ms)",
            "ratio",
            "compiled path",
        ],
        rows,
    )
    notes = [
        "one call is `(-problem.log_joint(z, idx).mean()).backward()` with z of shape "
        "(particles, D) requiring grad: the model's part of an SVI step",
        f"goal (issue 17): plain functions within 1.5x of the builder; worst ratio "
        f"{max(ratios):.2f}x: " + ("met" if max(ratios) <= 1.5 else "NOT met"),
    ]
    C.report(
        "log_joint",
        "log joint and gradient: plain model functions (compiled) vs builders",
        body,
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
