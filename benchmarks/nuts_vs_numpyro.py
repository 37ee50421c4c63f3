"""``nuts`` effective samples per second against NumPyro's NUTS, on builder and plain models.

Two problems, each sampled by NumPyro and by marginalize in the same process:

* ``mlp``: a 1-50-1 tanh MLP, Normal(0, 1) priors on every weight and bias, Gaussian
  likelihood with a learned noise scale (HalfNormal(1) prior), 100 points of
  ``sin(2x) + 0.1 e`` on ``[-2, 2]``. marginalize runs it twice: as the ``mlp`` builder (the
  closed-form potential of ``core/potentials.py``) and as a plain Pyro model function (the
  compiled log joint of ``core/compiled.py``; its compilation is inside the timed fit);
* ``bnn-example``: the network of NumPyro's ``examples/bnn.py`` (3 polynomial features of
  ``x``, two tanh layers of 5 units, no biases, Normal(0, 1) weights, a Gamma(3, 1) prior on
  the noise precision; 100 points of its ``get_data``) written as a plain Pyro function.

float32, one chain per run, one CPU thread for every sampler (XLA is told to use one
thread, and the process is pinned to one core). ESS is ArviZ's bulk ESS of every latent
coordinate (weight space; the median and minimum) and of the network output at 25 inputs
(function space). NumPyro is run once more than the seeds: its first run includes JAX's
compilation (what a user sees), the others reuse it.

Run: ``python benchmarks/nuts_vs_numpyro.py`` (100 warm-up + 100 draws, three seeds) or
``--full`` (the issue's 200 + 200); ``--models mlp`` for one problem. Without NumPyro/JAX
(``pip install marginalize[bench]``) the NumPyro rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

# one XLA thread, set before JAX is imported (the torch side runs with one thread too)
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as pdist  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import marginalize as mz  # noqa: E402

HIDDEN = 50
N = 100
X_GRID = np.linspace(-2.5, 2.5, 25, dtype=np.float32)[:, None]


# ---- the problems --------------------------------------------------------------------------
def mlp_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.linspace(-2.0, 2.0, N)[:, None]
    y = np.sin(2.0 * x[:, 0]) + 0.1 * rng.standard_normal(N)
    return x.astype(np.float32), y.astype(np.float32)


def mlp_plain(x, y=None):
    """The 1-50-1 network as a plain Pyro model function."""
    w1 = pyro.sample("w1", pdist.Normal(0.0, 1.0).expand([1, HIDDEN]).to_event(2))
    b1 = pyro.sample("b1", pdist.Normal(0.0, 1.0).expand([HIDDEN]).to_event(1))
    w2 = pyro.sample("w2", pdist.Normal(0.0, 1.0).expand([HIDDEN, 1]).to_event(2))
    b2 = pyro.sample("b2", pdist.Normal(0.0, 1.0).expand([1]).to_event(1))
    noise = pyro.sample("noise", pdist.HalfNormal(1.0))
    f = (torch.tanh(x @ w1 + b1) @ w2 + b2)[:, 0]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", pdist.Normal(f, noise), obs=y)


def mlp_net(x, p, xp=np):
    """Network output at ``x`` ``(G, 1)`` for stacked draws ``p`` (site -> (S, ...))."""
    h = xp.tanh(x[None] @ p["w1"] + p["b1"][:, None, :])
    return (h @ p["w2"])[..., 0] + p["b2"]


BNN_HIDDEN, BNN_FEATURES = 5, 3


def bnn_features(t):
    """NumPyro's bnn example: ``x`` to the powers 0, 1, 2."""
    return np.power(t[:, None], np.arange(BNN_FEATURES)).astype(np.float32)


def bnn_data():
    """The data of NumPyro's ``examples/bnn.py`` (``get_data``: N = 100, D_X = 3), rebuilt
    from its description: a cubic-ish curve plus noise, standardized."""
    rng = np.random.RandomState(0)
    t = np.linspace(-1, 1, N)
    x = bnn_features(t)
    w = 0.5 * rng.randn(BNN_FEATURES)
    y = x @ w + 0.5 * np.power(0.5 + t, 2.0) * np.sin(4.0 * t)
    y = y + 0.05 * rng.randn(N)
    y = (y - y.mean()) / y.std()
    return x.astype(np.float32), y.astype(np.float32)


def bnn_plain(x, y=None):
    """NumPyro's examples/bnn.py model as a plain Pyro model function."""
    w1 = pyro.sample("w1", pdist.Normal(0.0, 1.0).expand([x.shape[1], BNN_HIDDEN]).to_event(2))
    w2 = pyro.sample("w2", pdist.Normal(0.0, 1.0).expand([BNN_HIDDEN, BNN_HIDDEN]).to_event(2))
    w3 = pyro.sample("w3", pdist.Normal(0.0, 1.0).expand([BNN_HIDDEN, 1]).to_event(2))
    prec = pyro.sample("prec_obs", pdist.Gamma(3.0, 1.0))
    f = (torch.tanh(torch.tanh(x @ w1) @ w2) @ w3)[:, 0]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", pdist.Normal(f, prec.rsqrt()), obs=y)


BNN_GRID = bnn_features(np.linspace(-1.3, 1.3, 25))


def bnn_net(x, p, xp=np):
    h = xp.tanh(xp.tanh(x[None] @ p["w1"]) @ p["w2"])
    return (h @ p["w3"])[..., 0]


# ---- ESS -----------------------------------------------------------------------------------
def ess_summary(weights: np.ndarray, f: np.ndarray) -> dict:
    """ArviZ bulk ESS of every weight (``(1, S, D)``) and of the function values (``(1, S, G)``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        ew = az.ess(az.convert_to_dataset({"w": weights}), method="bulk")["w"].values
        ef = az.ess(az.convert_to_dataset({"f": f}), method="bulk")["f"].values
    return {
        "w_med": float(np.median(ew)),
        "w_min": float(np.min(ew)),
        "f_med": float(np.median(ef)),
        "f_min": float(np.min(ef)),
    }


def _summarize(p: dict, net, grid, samples: int) -> dict:
    """ESS of the stacked draws ``p`` (site -> (S, ...) NumPy arrays)."""
    weights = np.concatenate([v.reshape(samples, -1) for v in p.values()], 1)
    f = net(grid, p)
    return ess_summary(weights[None].astype(np.float64), f[None].astype(np.float64))


# ---- marginalize ---------------------------------------------------------------------------
class _CompileTimer(logging.Handler):
    """Notes when the compiled log joint reported it was ready (its compile time)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.t = None

    def emit(self, record):
        if self.t is None and "compiled log joint" in record.getMessage():
            self.t = time.perf_counter()


def run_marginalize(model, x, y, warmup, samples, seed, net, grid, names=None):
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    timer = _CompileTimer()
    logger = logging.getLogger("marginalize.core.compiled")
    logger.addHandler(timer)
    old = logger.level
    logger.setLevel(logging.INFO)
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        post = mz.fit(
            model,
            xt,
            yt,
            method="nuts",
            num_warmup=warmup,
            num_samples=samples,
            num_chains=1,
            seed=seed,
            progress=False,
        )
    finally:
        logger.removeHandler(timer)
        logger.setLevel(old)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    draws = {k: v[0].double().numpy() for k, v in post.sample(samples).items()}
    if names:
        draws = {names[k]: v for k, v in draws.items() if k in names}
    st = post.info["sample_stats"]
    return {
        "wall": wall,
        "cpu": cpu,
        "compile": None if timer.t is None else timer.t - w0,
        **_summarize(draws, net, grid, samples),
        "steps": float(st["n_steps"].double().mean()),
        # warm-up steps are not recorded (by either sampler): counted at the sampling rate
        "total_steps": float(st["n_steps"].double().mean()) * (warmup + samples),
        "eps": float(st["step_size"][0, -1]),
        "div": int(st["diverging"].sum()),
    }


# ---- NumPyro -------------------------------------------------------------------------------
def numpyro_runner():
    try:
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist
        from numpyro.infer import MCMC, NUTS
    except ImportError as e:
        return None, str(e)

    def mlp(x, y=None):
        w1 = numpyro.sample("w1", dist.Normal(0.0, 1.0).expand([1, HIDDEN]).to_event(2))
        b1 = numpyro.sample("b1", dist.Normal(0.0, 1.0).expand([HIDDEN]).to_event(1))
        w2 = numpyro.sample("w2", dist.Normal(0.0, 1.0).expand([HIDDEN, 1]).to_event(2))
        b2 = numpyro.sample("b2", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        noise = numpyro.sample("noise", dist.HalfNormal(1.0))
        f = (jnp.tanh(x @ w1 + b1) @ w2 + b2)[:, 0]
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(f, noise), obs=y)

    def bnn(x, y=None):  # examples/bnn.py
        w1 = numpyro.sample(
            "w1", dist.Normal(jnp.zeros((x.shape[1], BNN_HIDDEN)), jnp.ones((x.shape[1], 5)))
        )
        w2 = numpyro.sample("w2", dist.Normal(jnp.zeros((5, 5)), jnp.ones((5, 5))))
        w3 = numpyro.sample("w3", dist.Normal(jnp.zeros((5, 1)), jnp.ones((5, 1))))
        prec = numpyro.sample("prec_obs", dist.Gamma(3.0, 1.0))
        z3 = jnp.tanh(jnp.tanh(x @ w1) @ w2) @ w3
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("Y", dist.Normal(z3, 1.0 / jnp.sqrt(prec)).to_event(1), obs=y[:, None])

    models = {"mlp": mlp, "bnn-example": bnn}

    def run(problem, x, y, warmup, samples, seed, net, grid, mcmc=None):
        if mcmc is None:
            mcmc = MCMC(
                NUTS(models[problem]),
                num_warmup=warmup,
                num_samples=samples,
                num_chains=1,
                progress_bar=False,
            )
        w0, c0 = time.perf_counter(), time.process_time()
        mcmc.run(
            jax.random.PRNGKey(seed),
            x,
            y,
            extra_fields=("num_steps", "adapt_state.step_size", "diverging"),
        )
        p = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        ex = mcmc.get_extra_fields()
        steps = np.asarray(ex["num_steps"]).astype(np.float64)
        return mcmc, {
            "wall": wall,
            "cpu": cpu,
            "compile": None,
            **_summarize(p, net, grid, samples),
            "steps": float(steps.mean()),
            "total_steps": float(steps.mean()) * (warmup + samples),
            "eps": float(np.asarray(ex["adapt_state.step_size"])[-1]),
            "div": int(np.asarray(ex["diverging"]).sum()),
        }

    return run, f"numpyro {numpyro.__version__}, jax {jax.__version__}"


def pool(rs: list[dict]) -> dict:
    """Runs of one sampler: ESS, divergences and leapfrog steps summed; time is the median
    run's times the number of runs (a run slowed by another process on the machine does not
    move it); step size and steps per draw averaged."""
    out = {k: sum(r[k] for r in rs) for k in ("w_med", "w_min", "f_med", "f_min")}
    for k in ("wall", "cpu"):
        out[k] = statistics.median(r[k] for r in rs) * len(rs)
    comp = [r["compile"] for r in rs if r["compile"] is not None]
    out["compile"] = statistics.median(comp) if comp else None
    out["div"] = sum(r["div"] for r in rs)
    out["steps"] = sum(r["steps"] for r in rs) / len(rs)
    out["eps"] = sum(r["eps"] for r in rs) / len(rs)
    out["total_steps"] = sum(r["total_steps"] for r in rs)
    out["runs"] = len(rs)
    return out


PROBLEMS = {
    "mlp": {
        "data": mlp_data,
        "net": mlp_net,
        "grid": X_GRID,
        "ours": {
            "marginalize nuts, mlp builder": (
                lambda: mz.models.mlp(
                    1, hidden=[HIDDEN], activation="tanh", prior=mz.priors.Normal(1.0)
                ),
                {
                    "layer1.weight": "w1",
                    "layer1.bias": "b1",
                    "layer2.weight": "w2",
                    "layer2.bias": "b2",
                    "noise": "noise",
                },
            ),
            "marginalize nuts, plain function (compiled)": (lambda: mlp_plain, None),
        },
    },
    "bnn-example": {
        "data": bnn_data,
        "net": bnn_net,
        "grid": BNN_GRID,
        "ours": {"marginalize nuts, plain function (compiled)": (lambda: bnn_plain, None)},
    },
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--full", action="store_true", help="200 warm-up + 200 draws (the issue's settings)"
    )
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="runs per sampler (seeds seed, seed+1, ...); ESS and time are pooled over them",
    )
    ap.add_argument("--models", nargs="+", choices=sorted(PROBLEMS), default=sorted(PROBLEMS))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--name", default=None, help="results file stem (default by --full)")
    ap.add_argument(
        "--no-one-core",
        dest="one_core",
        action="store_false",
        help="do not pin the process to one core (NumPyro then also uses part of a second one)",
    )
    args = ap.parse_args(argv)
    warmup = args.warmup or (200 if args.full else 100)
    samples = args.samples or (200 if args.full else 100)
    C.single_thread()
    if args.one_core and hasattr(os, "sched_setaffinity"):
        # XLA keeps a helper thread busy despite the one-thread flags (CPU time > wall time);
        # pinning the process to one core gives every sampler exactly one core
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    runner, np_versions = numpyro_runner()
    seeds = [args.seed + i for i in range(args.seeds)]
    rows, notes, per_run = [], [], []
    first = "NumPyro NUTS, first run (includes JAX compilation)"
    compiled = "NumPyro NUTS, compiled"
    if runner is None:
        notes.append(
            f"NumPyro/JAX are not installed ({np_versions}): its rows are skipped; "
            "`pip install marginalize[bench]` adds them"
        )
    for problem in args.models:
        spec = PROBLEMS[problem]
        x, y = spec["data"]()
        net, grid = spec["net"], spec["grid"]
        runs: dict[str, list[dict]] = {}
        if runner is not None:
            mcmc, r = runner(problem, x, y, warmup, samples, seeds[0], net, grid)
            runs[first] = [r]
            runs[compiled] = [
                runner(problem, x, y, warmup, samples, sd, net, grid, mcmc)[1] for sd in seeds
            ]
        for label, (make, names) in spec["ours"].items():
            runs[label] = [
                run_marginalize(make(), x, y, warmup, samples, sd, net, grid, names) for sd in seeds
            ]
        results = {name: pool(rs) for name, rs in runs.items()}
        for name, r in results.items():
            comp = "" if r["compile"] is None else f"{r['compile']:.1f}"
            rows.append(
                [
                    problem,
                    name,
                    str(r["runs"]),
                    f"{r['wall']:.1f}",
                    f"{r['cpu']:.1f}",
                    comp,
                    f"{r['steps']:.0f}",
                    f"{r['eps']:.2g}",
                    r["div"],
                    f"{r['w_med']:.0f} / {r['w_min']:.0f}",
                    f"{r['f_med']:.0f} / {r['f_min']:.0f}",
                    f"{r['w_med'] / r['wall']:.2f} / {r['w_med'] / r['cpu']:.2f}",
                    f"{r['f_med'] / r['wall']:.2f} / {r['f_med'] / r['cpu']:.2f}",
                ]
            )
        if runner is not None:
            for label in spec["ours"]:
                ours = results[label]
                for ref_label in (first, compiled):
                    ref = results[ref_label]
                    parts = []
                    for clock in ("wall", "cpu"):
                        rw = (ref["w_med"] / ref[clock]) / (ours["w_med"] / ours[clock])
                        rf = (ref["f_med"] / ref[clock]) / (ours["f_med"] / ours[clock])
                        per_step = (ours[clock] / ours["total_steps"]) / (
                            ref[clock] / ref["total_steps"]
                        )
                        parts.append(
                            f"{'wall' if clock == 'wall' else 'CPU'} time: {rw:.2f}x (weights), "
                            f"{rf:.2f}x (f(x)), per leapfrog step ours/theirs {per_step:.2f}x, "
                            "goal (within 2x) " + ("met" if max(rw, rf) <= 2 else "NOT met")
                        )
                    notes.append(
                        f"{problem}, {label} vs {ref_label}: NumPyro's ESS/s over ours, "
                        + "; ".join(parts)
                    )
        per_run.append(
            f"{problem}: "
            + "; ".join(
                f"{name}: "
                + ", ".join(f"({r['w_med']:.0f}, {r['f_med']:.0f}, {r['wall']:.1f})" for r in rs)
                for name, rs in runs.items()
            )
        )
    body = C.table(
        [
            "problem",
            "sampler",
            "runs",
            "wall (s, median run x runs)",
            "CPU (s, median run x runs)",
            "of which compilation (s, median run)",
            "leapfrog steps / draw",
            "step size",
            "divergences",
            "ESS weights (median / min, summed)",
            "ESS f(x) (median / min, summed)",
            "ESS/s weights (wall / CPU)",
            "ESS/s f(x) (wall / CPU)",
        ],
        rows,
    )
    notes += [
        f"{warmup} warm-up + {samples} draws, one chain per run, seeds {seeds[0]}.."
        f"{seeds[-1]}; ESS from one chain is noisy (a different seed moves it by tens of "
        "percent), so ESS is summed over the runs, and time is the median run's times the "
        "number of runs, before dividing",
        "ESS/s uses the median ESS over the coordinates and the wall time of the whole fit "
        "(warm-up included; for the plain function also the compilation of its log joint, "
        "which every fit does: the column 'of which compilation' is the time from the start "
        "of the fit to the compiled potential being ready)",
        "the process is pinned to one core ("
        + ("on" if args.one_core else "off: `--no-one-core`")
        + "); ESS/s and the ratios are given per wall time and per CPU time of the process: "
        "on an idle machine they agree; when other processes share the core (wall >> CPU) the "
        "CPU-time figures are the comparable ones",
        "per run (ESS weights median, ESS f(x) median, wall s): " + " | ".join(per_run),
    ]
    C.report(
        args.name or "nuts_vs_numpyro" + ("_full" if args.full else ""),
        "NUTS on BNNs: marginalize (builder and plain functions) vs NumPyro",
        body,
        extra_versions={"numpyro/jax": np_versions} if runner else None,
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
