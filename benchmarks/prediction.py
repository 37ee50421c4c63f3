"""Goal 2: prediction over 1,000 posterior draws within 1.3x of the floor.

The floor is the faster of two hand-written computations of the same summaries (predictive
mean, epistemic and total variance) from the same stacked weights: a plain PyTorch loop over
the draws, and a chunked batched matmul (``baddbmm``) over chunks of draws, with the best
chunk size of a sweep. Beside it a tuned hand-written version (in-place activation, blocks of
inputs; see ``floor_tuned``). ``Posterior.predict`` is timed end to end (input checks, unpacking the
flat draws, the likelihood, the moment updates). Pyro's sequential ``Predictive`` is shown
for context at 100 inputs.

Run: ``python benchmarks/prediction.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import marginalize as mz  # noqa: E402
from marginalize.core.approximations import Empirical  # noqa: E402
from marginalize.core.problem import prepare  # noqa: E402
from marginalize.posterior import Posterior  # noqa: E402

S = 1000
INPLACE = {"tanh": torch.tanh_, "relu": torch.relu_}
NETS = {"1-50-1 tanh": (1, [50], "tanh"), "13-50-50-1 relu": (13, [50, 50], "relu")}


def make_posterior(arch, seed=0):
    d_in, hidden, act = arch
    model = mz.models.mlp(d_in, hidden=hidden, activation=act, prior=mz.priors.ScaledNormal(1.0))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, d_in, generator=g)
    y = torch.randn(20, generator=g)
    pb = prepare(model, x, y)
    draws = torch.stack([pb.init_from_prior(seed * 10007 + i) for i in range(S)]).unsqueeze(0)
    post = Posterior(model, pb.layout, Empirical(draws), method="nuts", task="regression")
    return post, model, pb.layout, draws[0]


def stacked(model, layout, z):
    """Per layer (W, b) stacked over draws, and the noise scale per draw."""
    p = layout.unpack(z)
    layers = [
        (p[f"{s.name}.weight"].contiguous(), p[f"{s.name}.bias"].contiguous())
        for s in model.layer_specs()
    ]
    return layers, p["noise"]


def floor_loop(layers, noise, x, act):
    s_mean = s_sq = 0.0
    for s in range(noise.shape[0]):
        h = x
        for k, (w, b) in enumerate(layers):
            h = torch.addmm(b[s], h, w[s])
            if k < len(layers) - 1:
                h = act(h)
        f = h[:, 0]
        s_mean = s_mean + f
        s_sq = s_sq + f * f
    mean = s_mean / noise.shape[0]
    epi = s_sq / noise.shape[0] - mean * mean
    return mean, epi + (noise * noise).mean()


def floor_batched(layers, noise, x, act, chunk):
    n_draws = noise.shape[0]
    s_mean = s_sq = 0.0
    for start in range(0, n_draws, chunk):
        stop = min(start + chunk, n_draws)
        h = x.expand(stop - start, *x.shape)
        for k, (w, b) in enumerate(layers):
            h = torch.baddbmm(b[start:stop].unsqueeze(1), h, w[start:stop])
            if k < len(layers) - 1:
                h = act(h)
        f = h[..., 0]
        s_mean = s_mean + f.sum(0)
        s_sq = s_sq + (f * f).sum(0)
    mean = s_mean / n_draws
    return mean, s_sq / n_draws - mean * mean + (noise * noise).mean()


def floor_tuned(layers, noise, x, act_, chunk, block):
    """The batched floor with what ``Posterior.predict`` does beyond it: the activation in place,
    a fused multiply-add for a one-feature first layer, ``bmm`` for a one-output last layer,
    and blocks of ``block`` inputs. ``act_`` is the in-place activation."""
    n_draws = noise.shape[0]
    outs_mean, outs_sq = [], []
    for i0 in range(0, x.shape[0], block):
        xb = x[i0 : i0 + block]
        s_mean = s_sq = 0.0
        for start in range(0, n_draws, chunk):
            stop = min(start + chunk, n_draws)
            h = None
            for k, (w, b) in enumerate(layers):
                w, b = w[start:stop], b[start:stop].unsqueeze(1)
                if k == 0 and w.shape[1] == 1:
                    h = torch.addcmul(b, xb.unsqueeze(0), w)
                elif k == 0:
                    h = torch.baddbmm(b, xb.expand(stop - start, *xb.shape), w)
                elif w.shape[2] == 1:
                    h = torch.bmm(h, w).add_(b)
                else:
                    h = torch.baddbmm(b, h, w)
                if k < len(layers) - 1:
                    h = act_(h)
            f = h[..., 0]
            s_mean = s_mean + f.sum(0)
            s_sq = s_sq + (f * f).sum(0)
        outs_mean.append(s_mean)
        outs_sq.append(s_sq)
    mean = torch.cat(outs_mean) / n_draws
    return mean, torch.cat(outs_sq) / n_draws - mean * mean + (noise * noise).mean()


def pyro_predictive_time(model, layout, z, x, n=50):
    """Pyro's sequential Predictive over ``n`` draws, scaled to S draws."""
    from pyro.infer import Predictive

    samples = {k: v[:n] for k, v in layout.unpack(z).items()}
    pred = Predictive(model, posterior_samples=samples, return_sites=["y"])
    return C.best_of(lambda: pred(x), repeats=2) * S / n


def measure(post, layers, noise, x, act, act_):
    """Times of the loop floor, the batched floor per chunk size, the tuned floor per chunk
    and block size, and ``Posterior.predict``."""
    n_in = x.shape[0]
    if n_in <= 1000:

        def timer(fn):
            return C.per_call(fn, min_time=0.2, repeats=3)
    else:  # one call takes a second or more: best of 3 after one warm-up

        def timer(fn):
            fn()
            return C.best_of(fn, repeats=3)

    with torch.no_grad():
        t_loop = timer(lambda: floor_loop(layers, noise, x, act))
        chunks = {}
        for chunk in (10, 50, 250, 1000) if n_in <= 1000 else (1, 10, 100):
            chunks[chunk] = timer(lambda c=chunk: floor_batched(layers, noise, x, act, c))
        tuned = {}
        blocks = (n_in,) if n_in <= 1000 else (500, 1000, 2000)
        for chunk in (16, 50, 100, 250) if n_in <= 1000 else (16, 32):
            for block in blocks:
                tuned[chunk, block] = timer(
                    lambda c=chunk, b=block: floor_tuned(layers, noise, x, act_, c, b)
                )
        t_pred = timer(lambda: post.predict(x, num_samples=S))
        pr = post.predict(x, num_samples=S)  # the same numbers as the floor?
        m_ref, v_ref = floor_batched(layers, noise, x, act, 100)
        ok = torch.allclose(pr.mean, m_ref, rtol=1e-3, atol=1e-3) and torch.allclose(
            pr.std**2, v_ref, rtol=1e-2, atol=1e-3
        )
    return t_loop, chunks, tuned, t_pred, ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    C.single_thread()
    rows = []
    ratios, tuned_ratios = [], []
    for net, arch in NETS.items():
        post, model, layout, z = make_posterior(arch)
        layers, noise = stacked(model, layout, z)
        act = model.act
        act_ = INPLACE[arch[2]]
        for n_in in (100, 10_000):
            x = torch.randn(n_in, arch[0], generator=torch.Generator().manual_seed(1))
            t_loop, chunks, tuned, t_pred, ok = measure(post, layers, noise, x, act, act_)
            best_chunk = min(chunks, key=chunks.get)
            floor = min(t_loop, chunks[best_chunk])
            best_tuned = min(tuned, key=tuned.get)
            pv = post.predictive
            plan = pv.plan(pv.inputs(x), pv.draws(S), None)
            draws_used, inputs_used = plan.draws, plan.rows
            extra = ""
            if n_in == 100:
                t_pyro = pyro_predictive_time(model, layout, z, x)
                extra = f"{C.fmt_ms(t_pyro)} ({t_pyro / floor:.0f}x)"
            ratios.append(t_pred / floor)
            tuned_ratios.append(t_pred / tuned[best_tuned])
            rows.append(
                [
                    net,
                    f"{n_in:,}",
                    C.fmt_ms(t_loop),
                    f"{C.fmt_ms(chunks[best_chunk])} (chunk {best_chunk})",
                    f"{C.fmt_ms(t_pred)} ({draws_used} draws x {inputs_used:,} inputs)",
                    f"{t_pred / floor:.2f}x",
                    f"{C.fmt_ms(tuned[best_tuned])} ({best_tuned[0]} x {best_tuned[1]:,}), "
                    f"{t_pred / tuned[best_tuned]:.2f}x",
                    "yes" if ok else "NO",
                    extra,
                ]
            )
    body = C.table(
        [
            "network",
            "inputs",
            "floor: loop (ms)",
            "floor: batched (ms)",
            "Posterior.predict (ms, chunk)",
            "ratio to floor",
            "tuned floor (ms, chunk), ratio",
            "same numbers",
            "Pyro Predictive (ms, ratio)",
        ],
        rows,
    )
    worst = max(ratios)
    notes = [
        f"{S:,} posterior draws, float32, one thread; times are the best of 3 timed loops "
        "(10,000 inputs: of 3 calls)",
        f"goal: within 1.3x of the floor; worst ratio measured {worst:.2f}x: "
        + ("met" if worst <= 1.3 else "NOT met"),
        "Pyro Predictive timed over 50 draws and scaled to 1,000",
        "the floor is the issue's: the faster of a plain loop over draws and a chunked batched "
        "matmul (`baddbmm`, best chunk of a sweep). `Posterior.predict` (through "
        "`Posterior.predictive`, the `Predictive` layer) sizes its chunks from the activations "
        "one input makes in one draw (`core/predictive/memory.py`): at few inputs as many draws "
        "as stay within 4 MiB of activations (the activation in place, a fused multiply-add for "
        "a one-feature first layer, `bmm` for a one-output last layer); when fewer than 8 draws "
        "fit with every input, one draw over blocks of up to 64 MiB of inputs (a loop of large "
        "matrix products, what the floor's loop does). The tuned floor is the batched "
        "computation written by hand without the library (best chunk and block of a sweep); "
        f"worst ratio to it: {max(tuned_ratios):.2f}x",
        "the machine was shared with other jobs (2 cores): ratios are measured in one process "
        "against a floor timed beside them, so the load mostly cancels",
    ]
    C.report(
        "prediction",
        "Prediction over 1,000 posterior draws vs the floor",
        body,
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
