"""Wall time of 4 ensemble members, 4 NUTS chains and a data-parallel SVI fit on 1 process vs
K processes (gloo).

Each measurement launches fresh processes with the environment ``torchrun`` gives its
workers (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS=1; one torch thread
each); with one process there is no process group and the members run one after another.
The clock runs inside rank 0 around ``mz.fit`` only (process start, imports and the
process-group set-up are not counted; the gather at the end is). Runs of 1 and K processes
alternate, ``--repeats`` times; the table gives medians and the speed-up, the ratio of the
medians. Every run also records a SHA-256 of the posterior's tensors on every rank: all ranks
and the 1-process run must hold bitwise the same posterior.

The wall speed-up is bounded by the free cores: near K on an idle machine with K cores or
more, less on a shared one (the load average at the start is in the header). The CPU time of
the busiest rank (user + system, the gather included) is hardly affected by other processes:
(data-parallel training is not bitwise the 1-process fit: there the table gives the largest
difference of the predictive means at 64 test inputs instead; see docs/guide/distributed.md)
``CPU of 1 process / CPU of the busiest rank`` is the speed-up an idle machine would give.

Run: ``python benchmarks/distributed.py`` (a few minutes on 2 cores; ``--quick`` for a smoke
test; ``--procs 4`` for 4 processes; ``--name`` to write another results file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

#: the two workloads: (method, options); sized for ~10-30 s per method on one idle core
WORKLOADS = {
    "ensemble": {"num_members": 4, "steps": 800, "batch_size": 64},
    "nuts": {"num_chains": 4, "num_samples": 150, "num_warmup": 150, "max_tree_depth": 6},
    "svi-meanfield": {"steps": 200, "batch_size": 4096},
}
QUICK = {
    "ensemble": {"num_members": 4, "steps": 150, "batch_size": 64},
    "nuts": {"num_chains": 4, "num_samples": 20, "num_warmup": 20, "max_tree_depth": 4},
    "svi-meanfield": {"steps": 20, "batch_size": 4096},
}
#: trained data-parallel (each rank its share of every minibatch), not member by member
DATA_PARALLEL = {"svi-meanfield"}


def problem(method: str):
    import torch

    import marginalize as mz

    g = torch.Generator().manual_seed(0)
    n, d, hidden = {
        "ensemble": (1000, 8, [50]),
        "nuts": (200, 1, [20]),
        "svi-meanfield": (40960, 16, [200, 200]),
    }[method]
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, generator=g)
    model = mz.models.mlp(d, hidden=hidden)
    return model, x, y


def digest(post) -> str:
    """SHA-256 of the approximation's tensors (bitwise identity of two posteriors)."""
    import torch

    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, torch.Tensor):
            h.update(str((o.dtype, tuple(o.shape))).encode())
            h.update(o.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                h.update(str(k).encode())
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                feed(v)
        else:
            h.update(repr(o).encode())

    feed(post.approximation.state_dict())
    return h.hexdigest()


def worker(method: str, options: dict, out: str) -> int:
    import torch

    torch.set_num_threads(1)
    import marginalize as mz
    from marginalize.inference.engines import distributed

    created = distributed.init_from_env("gloo")
    model, x, y = problem(method)
    if created:
        torch.distributed.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    post = mz.fit(model, x, y, method=method, seed=0, progress=False, **options)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    xt = torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(1))
    mean = post.predict(xt, num_samples=32, seed=0).mean
    res = {"seconds": seconds, "cpu": cpu, "digest": digest(post), "mean": mean.tolist()}
    Path(f"{out}.rank{distributed.rank()}").write_text(json.dumps(res))
    if created:
        torch.distributed.destroy_process_group()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(method: str, options: dict, procs: int) -> dict:
    """One measurement: ``procs`` fresh processes; rank 0's time and posterior digest."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, __file__, "--worker", method, json.dumps(options), out]
        running = []
        for r in range(procs):
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
            env["OMP_NUM_THREADS"] = "1"
            if procs > 1:
                env.update(
                    RANK=str(r),
                    LOCAL_RANK=str(r),
                    WORLD_SIZE=str(procs),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                )
            running.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in running]
        if any(codes):
            raise SystemExit(f"{method} on {procs} processes failed: exit codes {codes}")
        ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(procs)]
        if len({r["digest"] for r in ranks}) != 1:
            raise SystemExit(f"{method}: the ranks hold different posteriors")
        return {**ranks[0], "cpu_max": max(r["cpu"] for r in ranks)}


def _max_diff(a: list, b: list) -> float:
    return max(abs(u - v) for u, v in zip(a, b, strict=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=2, help="processes to compare with one")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny workloads (smoke test)")
    p.add_argument("--name", default="distributed", help="results file stem")
    p.add_argument("--methods", default=None, help="comma-separated subset of the workloads")
    p.add_argument(
        "--worker", nargs=3, metavar=("METHOD", "OPTIONS", "OUT"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.worker:
        method, options, out = args.worker
        return worker(method, json.loads(options), out)
    C.single_thread()
    C.use_wall_clock(True)
    loads = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    work = QUICK if args.quick else WORKLOADS
    if args.methods:
        work = {m: work[m] for m in args.methods.split(",")}
    rows = []
    for method, options in work.items():
        times: dict[int, list[float]] = {1: [], args.procs: []}
        cpus: dict[int, list[float]] = {1: [], args.procs: []}
        digests: dict[int, set[str]] = {1: set(), args.procs: set()}
        means: dict[int, list] = {1: [], args.procs: []}
        for rep in range(args.repeats):
            for procs in (1, args.procs):  # interleaved: the machine's load hits both alike
                res = launch(method, options, procs)
                times[procs].append(res["seconds"])
                cpus[procs].append(res["cpu_max"])
                digests[procs].add(res["digest"])
                means[procs].append(res["mean"])
                print(
                    f"{method} rep {rep} procs {procs}: {res['seconds']:.2f} s wall, "
                    f"{res['cpu_max']:.2f} s CPU (busiest rank)",
                    flush=True,
                )
        one, one_cpu = statistics.median(times[1]), statistics.median(cpus[1])
        for procs in (1, args.procs):
            med, cpu = statistics.median(times[procs]), statistics.median(cpus[procs])
            same = digests[procs] == digests[1] and len(digests[1]) == 1
            if method in DATA_PARALLEL and procs > 1:
                worst = max(_max_diff(a, b) for a, b in zip(means[1], means[procs], strict=True))
                scale = max(abs(v) for v in means[1][0])
                verdict = f"data-parallel: predictive means within {worst:.1g} (scale {scale:.2g})"
            else:
                verdict = "yes" if same else "NO"
            rows.append(
                [
                    method,
                    ", ".join(f"{k}={v}" for k, v in options.items()),
                    procs,
                    f"{med:.2f}",
                    " ".join(f"{t:.2f}" for t in times[procs]),
                    f"{one / med:.2f}x",
                    f"{cpu:.2f}",
                    f"{one_cpu / cpu:.2f}x",
                    verdict,
                ]
            )
    body = C.table(
        [
            "method",
            "options",
            "processes",
            "median wall s",
            "each run, wall s",
            "wall speed-up",
            "CPU s, busiest rank",
            "CPU-bound speed-up",
            "bitwise = 1 process",
        ],
        rows,
    )
    notes = [
        f"load average when the script started: {loads:.2f} on {os.cpu_count()} logical cores "
        "(other processes share the cores when it is above 0; then the wall speed-up is "
        "bounded by the free cores)",
        "wall: time inside rank 0 around mz.fit (members or chains, then the gather); process "
        "start and imports excluded; 1-process and K-process runs interleaved; medians",
        "CPU s, busiest rank: the CPU time (user + system) of the rank that worked longest, "
        "gather included; 'CPU-bound speed-up' = CPU of 1 process / CPU of the busiest rank, "
        "the wall speed-up an idle machine with K free cores gives (little affected by load)",
    ]
    C.report(
        args.name,
        f"Distributed fits: 1 vs {args.procs} processes (torch.distributed, gloo)",
        body,
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
