"""Scale: a ResNet-20 with BatchNorm on 50,000 CIFAR-shaped images from a DataLoader.

The deep-learning setting of issues 24, 25 and 29: every method of the registry at its
defaults (only the length of training set to one epoch, and one member / run / chain, so that
a row is the time of one network's epoch; the SG-MCMC chains start at the module's weights
rather than after a MAP fit of their own) on ``mz.models.bayesian(resnet(20))``
(269,722 weights, all of them Bayesian under a Normal(0, 1) prior, categorical likelihood) fed
by a ``DataLoader`` over generated CIFAR-shaped images (``datasets.images.cifar_like``, 10
classes) with random crop + flip, batch 128. Each row runs in a fresh subprocess and reports:

* **epoch CPU time** against a hand-written torch loop of the same module, batch, BatchNorm
  mode (train) and objective (cross-entropy summed and scaled by N / B plus the prior's
  ``|w|^2 / 2``) with the matching optimizer (Adam for map, ensemble members, mc-dropout and the
  variational methods; SGD with momentum for swag and the SG-MCMC samplers), measured in the
  same run (goals: <= 1.1x for map, ensemble, swag, mc-dropout; <= 1.3x for svi-meanfield,
  svi-lowrank, bbb; <= 1.15x Adam for ivon; <= 1.1x SGD for SG-MCMC);
* **peak memory** (the process's ``ru_maxrss``) against the torch loop's (goal <= 1.5x);
* test accuracy and NLL on 10,000 generated test images after that epoch;
* methods that need the full batch (NUTS, HMC) must refuse before fitting, with a reason;
* ``predict`` of 10,000 test images x 30 draws against a torch loop over the same draws
  (goal <= 1.2x, peak extra memory <= 512 MB);
* K-FAC Laplace over all weights and the 50,000 images (goal <= 3x one training epoch).

Run: ``python benchmarks/scale.py`` (the whole table: about an hour on 2 cores), or
``--n 5000 --test 1000`` for a quick look (the epoch is then 5,000 images), ``--only map,swag``
for some rows. One torch thread per process unless ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BATCH = 128
PRIOR_SD = 1.0
#: the optimizer of the hand-written reference each method is compared with
REFERENCE = {
    "map": "adam",
    "ensemble": "adam",
    "mc-dropout": "adam",
    "svi-meanfield": "adam",
    "svi-lowrank": "adam",
    "bbb": "adam",
    "ivon": "adam",
    "swag": "sgd",
    "multiswag": "sgd",
    "sgld": "sgd",
    "sghmc": "sgd",
    "csgmcmc": "sgd",
}
#: methods that need every row at once: they must refuse a data loader before fitting
FULL_BATCH = ("nuts", "hmc")
GOALS = {
    "map": 1.1,
    "ensemble": 1.1,
    "swag": 1.1,
    "mc-dropout": 1.1,
    "svi-meanfield": 1.3,
    "svi-lowrank": 1.3,
    "bbb": 1.3,
    "ivon": 1.15,
    "sgld": 1.1,
    "sghmc": 1.1,
    "csgmcmc": 1.1,
}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_data(n: int, n_test: int, seed: int = 0):
    from marginalize.datasets.images import ImageDataset, cifar_like

    x, y = cifar_like(n + n_test, seed=seed)
    train = ImageDataset(x[:n], y[:n], augment=True)
    test = ImageDataset(x[n:], y[n:], augment=False)
    test.mean, test.std = train.mean, train.std
    return train, test


def loaders(n: int, n_test: int, seed: int = 0):
    train, test = make_data(n, n_test, seed)
    g = torch.Generator().manual_seed(seed)
    tl = DataLoader(train, batch_size=BATCH, shuffle=True, drop_last=True, generator=g)
    vl = DataLoader(test, batch_size=500, shuffle=False)
    return tl, vl


def net():
    from marginalize.models.nets import resnet

    torch.manual_seed(0)
    return resnet(20)


# ---- the hand-written references ---------------------------------------------------------
def torch_epoch(kind: str, n: int, n_test: int) -> dict:
    """One epoch of a hand-written loop of the same objective, then test metrics."""
    tl, vl = loaders(n, n_test)
    model = net()
    model.train()
    params = list(model.parameters())
    if kind == "adam":
        opt = torch.optim.Adam(params, lr=1e-3)
    else:
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    scale = n / BATCH
    rss0 = peak_rss()
    t0, w0 = time.process_time(), time.perf_counter()
    steps = 0
    for xb, yb in tl:
        loss = scale * F.cross_entropy(model(xb), yb, reduction="sum") / 1.0
        loss = loss + sum(p.square().sum() for p in params) / (2 * PRIOR_SD**2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    model.eval()
    acc, nll = evaluate_module(model, vl)
    return {
        "cpu": cpu,
        "wall": wall,
        "steps": steps,
        "rss": peak_rss(),
        "rss0": rss0,
        "acc": acc,
        "nll": nll,
    }


@torch.no_grad()
def evaluate_module(model, vl) -> tuple[float, float]:
    right, nll, m = 0, 0.0, 0
    for xb, yb in vl:
        logits = model(xb)
        right += int((logits.argmax(-1) == yb).sum())
        nll += float(F.cross_entropy(logits, yb, reduction="sum"))
        m += len(yb)
    return right / m, nll / m


# ---- marginalize ---------------------------------------------------------------------------
def mz_epoch(method: str, n: int, n_test: int) -> dict:
    import marginalize as mz

    tl, vl = loaders(n, n_test)
    model = mz.models.bayesian(net(), prior=mz.priors.Normal(PRIOR_SD), likelihood="categorical")
    row = mz.method_info()[method]
    opts = {}
    for name in ("steps", "epochs", "pretrain_steps", "swag_steps", "num_members", "num_models"):
        if name in row["options"]:
            opts[name] = row["options"][name]
    steps_per_epoch = len(tl)
    # one epoch of training at the method's defaults otherwise
    if "epochs" in row["options"]:
        opts = {"epochs": 1}
    elif "steps" in row["options"]:
        opts = {"steps": steps_per_epoch}
    for name in ("pretrain_steps", "swag_steps"):
        if name in row["options"]:
            opts[name] = steps_per_epoch
    for name in ("num_members", "num_models", "num_chains"):
        if name in row["options"] and method not in FULL_BATCH:
            opts[name] = 1  # the time per member / run / chain; memory of one
    if row["options"].get("init") == "map":  # SG-MCMC: the chain starts at the module's
        opts["init"] = "module"  # weights rather than after a MAP fit of its own
    rss0 = peak_rss()
    t0, w0 = time.process_time(), time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            post = mz.fit(model, tl, method=method, seed=0, progress=False, **opts)
        except (ValueError, TypeError) as e:
            return {"refused": f"{type(e).__name__}: {e}", "cpu": time.process_time() - t0}
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    epochs = sum(v for k, v in opts.items() if k in ("pretrain_steps", "swag_steps"))
    epochs = epochs / steps_per_epoch if epochs else 1
    rss_fit = peak_rss()
    pred = post.predict(vl, num_samples=30)
    yt = torch.cat([yb for _, yb in vl])
    p = pred.probs
    acc = float((p.argmax(-1) == yt).float().mean())
    nll = float(-torch.log(p[torch.arange(len(yt)), yt].clamp_min(1e-12)).mean())
    return {
        "cpu": cpu / epochs,
        "wall": wall / epochs,
        "epochs": epochs,
        "rss": rss_fit,
        "rss0": rss0,
        "acc": acc,
        "nll": nll,
        "warnings": sorted({str(w.message)[:160] for w in caught}),
    }


def predict_rows(n: int, n_test: int, draws: int = 30) -> dict:
    """predict of n_test images x draws against a torch loop over the same draws, the same
    function: the fitted BatchNorm statistics in both (``bn_update=False``); then the cost of
    ``bn_update=True`` (statistics re-estimated for each chunk of draws from the training
    loader, the SWAG recipe), which the torch loop does not do."""
    import marginalize as mz

    tl, vl = loaders(n, n_test)
    model = mz.models.bayesian(net(), prior=mz.priors.Normal(PRIOR_SD), likelihood="categorical")
    post = mz.fit(model, tl, method="svi-meanfield", steps=2, seed=0, progress=False)
    z = post.sample_flat(draws, seed=0).reshape(draws, -1)
    params = post.layout.unpack(z)
    module = net()
    module.load_state_dict({k: v[0] for k, v in post.state.items()}, strict=False)
    module.eval()
    xs = [xb for xb, _ in vl]

    def torch_loop():
        probs = 0
        with torch.no_grad():
            for s in range(draws):
                sd = {k: v[s] for k, v in params.items()}
                outs = [torch.func.functional_call(module, sd, (xb,)).softmax(-1) for xb in xs]
                probs = probs + torch.cat(outs)
        return probs / draws

    rss0 = peak_rss()
    t0 = time.process_time()
    ref = torch_loop()
    t_ref = time.process_time() - t0
    rss_ref = peak_rss()
    x = torch.cat(xs)
    t0 = time.process_time()
    pred = post.predict(x, num_samples=draws, seed=0, bn_update=False)
    t_mz = time.process_time() - t0
    rss = peak_rss()
    t0 = time.process_time()
    post.predict(x, num_samples=draws, seed=0, bn_update=True)
    t_bn = time.process_time() - t0
    return {
        "torch": t_ref,
        "mz": t_mz,
        "mz_bn": t_bn,
        "rss0": rss0,
        "rss_ref": rss_ref,
        "rss": rss,
        "agree": float((pred.probs - ref).abs().max()),
    }


def child(what: str, n: int, n_test: int) -> None:
    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "1")))
    if what.startswith("torch-"):
        out = torch_epoch(what[6:], n, n_test)
    elif what == "predict":
        out = predict_rows(n, n_test)
    else:
        out = mz_epoch(what, n, n_test)
    print("RESULT " + json.dumps(out))


def run_child(what: str, n: int, n_test: int, threads: int) -> dict:
    env = dict(os.environ, SCALE_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--child", what, "--n", str(n), "--test", str(n_test)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--only", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", default=None)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--predict-only", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n, args.test)
        return
    import marginalize as mz

    if args.predict_only:
        pr = run_child("predict", args.n, args.test, args.threads)
        print(json.dumps(pr))
        return
    methods = mz.methods() if args.only is None else args.only.split(",")
    refs = {k: run_child(f"torch-{k}", args.n, args.test, args.threads) for k in ("adam", "sgd")}
    rows = []
    for m in methods:
        r = run_child(m, args.n, args.test, args.threads)
        ref = refs[REFERENCE.get(m, "adam")]
        if "refused" in r:
            rows.append([m, "refused before fitting", "", "", "", "", "", r["refused"][:200]])
            continue
        if "error" in r:
            rows.append([m, "error", "", "", "", "", "", " ".join(r["error"])[:200]])
            continue
        ratio = r["cpu"] / ref["cpu"]
        mem = r["rss"] / ref["rss"]
        goal = GOALS.get(m)
        verdict = "" if goal is None else ("met" if ratio <= goal and mem <= 1.5 else "NOT met")
        rows.append(
            [
                m,
                f"{r['cpu']:.0f}",
                f"{ratio:.2f}x ({REFERENCE.get(m, 'adam')})",
                f"{r['rss'] / 2**20:.0f} MiB",
                f"{mem:.2f}x",
                f"{r['acc']:.3f}",
                f"{r['nll']:.3f}",
                verdict,
            ]
        )
    head = [
        "method",
        "epoch CPU s",
        "vs torch loop",
        "peak RSS",
        "vs torch loop",
        "test acc",
        "test NLL",
        "goal",
    ]
    ref_rows = [
        [
            f"torch loop ({k})",
            f"{v['cpu']:.0f}",
            "1",
            f"{v['rss'] / 2**20:.0f} MiB",
            "1",
            f"{v['acc']:.3f}",
            f"{v['nll']:.3f}",
            "",
        ]
        for k, v in refs.items()
    ]
    body = C.table(head, ref_rows + rows)
    pr = run_child("predict", args.n, args.test, args.threads)
    if "error" not in pr:
        extra = (pr["rss"] - pr["rss_ref"]) / 2**20
        body += (
            f"\n\npredict, {args.test} images x 30 draws: {pr['mz']:.1f} s against "
            f"{pr['torch']:.1f} s for a torch loop over the draws "
            f"({pr['mz'] / pr['torch']:.2f}x, goal <= 1.2x); peak memory beyond "
            f"the torch loop's: {extra:.0f} MiB (goal <= 512); largest difference "
            f"in probabilities {pr['agree']:.2g}; with bn_update=True (BatchNorm statistics "
            f"re-estimated per chunk of draws from the {args.n} training images): "
            f"{pr['mz_bn']:.1f} s"
        )
    if not args.no_write:
        C.report(
            "scale",
            "Scale: ResNet-20 with BatchNorm from a DataLoader",
            body,
            notes=[
                f"{args.n} training and {args.test} test images, batch {BATCH}, "
                f"{args.threads} torch thread(s) per process, CPU time per epoch"
            ],
        )
    else:
        print(body)


if __name__ == "__main__":
    main()
