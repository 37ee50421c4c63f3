"""Shared helpers of the benchmark scripts: timing, machine description, markdown output.

Every script measures marginalize against a reference computed in the same process run
(a hand-written PyTorch step, NumPyro, a bare matmul), prints a markdown table and writes it
to ``benchmarks/results/<name>.md`` together with the machine, the versions, the date and
the command that produced it.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def single_thread() -> None:
    """One CPU thread for torch (the issue's setting; also keeps runs comparable)."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average at start {os.getloadavg()[0]:.2f}"
    return (
        f"{cpu_name()}, {os.cpu_count()} logical cores{load}; GPU: {gpu}; "
        f"torch threads: {torch.get_num_threads()}"
    )


def versions(extra: dict[str, str] | None = None) -> str:
    import pyro

    import marginalize

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "marginalize": marginalize.__version__,
    }
    v.update(extra or {})
    return ", ".join(f"{k} {val}" for k, val in v.items())


#: the clock of the timings: CPU time of this process (user + system). With one torch thread
#: it equals the wall time of an idle machine and, unlike the wall time, hardly changes when
#: other processes share the cores. ``use_wall_clock(True)`` switches to ``time.perf_counter``.
CLOCK = time.process_time


def use_wall_clock(wall: bool) -> None:
    global CLOCK
    CLOCK = time.perf_counter if wall else time.process_time


def clock_name() -> str:
    return "wall time" if CLOCK is time.perf_counter else "CPU time of the process (user + system)"


def per_call(
    fn: Callable[[], object], *, min_time: float = 0.3, repeats: int = 5, warmup: int = 3
) -> float:
    """Seconds per call of ``fn``: the best of ``repeats`` timed loops of about ``min_time``
    seconds each (the minimum is the least disturbed by other processes)."""
    for _ in range(warmup):
        fn()
    n, t = 1, 0.0
    while True:  # calibrate the loop length
        t0 = CLOCK()
        for _ in range(n):
            fn()
        t = CLOCK() - t0
        if t >= min_time / 4 or n >= 1 << 20:
            break
        n *= 2
    n = max(1, int(n * min_time / max(t, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t0 = CLOCK()
        for _ in range(n):
            fn()
        best = min(best, (CLOCK() - t0) / n)
    return best


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time in seconds of ``repeats`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def report(
    name: str,
    title: str,
    body: str,
    *,
    extra_versions: dict[str, str] | None = None,
    notes: list[str] | None = None,
    write: bool = True,
) -> str:
    """Print the result (with machine, versions, date, command) and write it to results/."""
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    head = [
        f"# {title}",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {machine()}",
        f"- versions: {versions(extra_versions)}",
        f"- clock: {clock_name()}",
        "",
    ]
    text = "\n".join(head) + body.rstrip() + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(text)
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.md").write_text(text)
    return text
