"""Shared pieces of the benchmark runners: method selection, summaries, markdown, headers.

Examples
--------
>>> from marginalize.benchmarks._common import mean_se, fmt_pm
>>> m, se = mean_se([1.0, 2.0, 3.0])
>>> fmt_pm(m, se, 2)
'2.00 ± 0.58'
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from marginalize._files import write_bytes
from marginalize.errors import OptionError

__all__ = [
    "mean_se",
    "fmt_pm",
    "markdown_table",
    "header",
    "select_methods",
    "results_dir",
    "method_options",
    "cpu_threads",
]

log = logging.getLogger("marginalize.benchmarks")


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean ``std(ddof=1) / sqrt(n)`` (NaN SE for one value)."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return math.nan, math.nan
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else math.nan
    return float(a.mean()), se


def fmt_pm(mean: float, se: float, digits: int = 2) -> str:
    """``"m ± se"`` (``"m"`` alone when the SE is undefined, ``"–"`` for no value)."""
    if mean is None or not math.isfinite(mean):
        return "–"
    if se is None or not math.isfinite(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are written with 4 significant digits."""

    def cell(v):
        if isinstance(v, float):
            return "–" if not math.isfinite(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def header(title: str, argv: Sequence[str] | None = None) -> str:
    """Markdown header: title, the exact command, date, machine and versions."""
    import pyro
    import torch

    import marginalize

    cmd = " ".join(shlex.quote(a) for a in (sys.argv if argv is None else argv))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"# {title}",
            "",
            f"- command: `{cmd}`",
            f"- date: {now}",
            f"- machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs "
            f"(torch threads: {torch.get_num_threads()})",
            f"- versions: python {platform.python_version()}, "
            f"marginalize {marginalize.__version__}, "
            f"torch {torch.__version__}, pyro-ppl {pyro.__version__}, numpy {np.__version__}",
            "",
        ]
    )


def select_methods(
    requested: Sequence[str] | None, exclude_by_default: Sequence[str] = ()
) -> list[str]:
    """The methods to run: ``requested`` (validated by name), or every registered method
    except ``exclude_by_default``."""
    import marginalize as mz
    from marginalize.inference.registry import get_method

    if requested:
        out = []
        for name in requested:
            for part in str(name).split(","):
                part = part.strip()
                if part:
                    get_method(part)  # raises OptionError with a suggestion
                    out.append(part)
        return list(dict.fromkeys(out))
    return [m for m in mz.methods() if m not in set(exclude_by_default)]


def method_options(
    method: str,
    table: dict[str, dict[str, Any]],
    budget: dict[str, Any],
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Options for ``method``: its row in ``table``, else the ``budget`` keys the method
    accepts (e.g. ``steps``), then ``overrides``; unknown keys raise ``OptionError``."""
    from marginalize.inference.registry import get_method

    accepted = get_method(method).option_defaults()
    if method in table:
        opts = dict(table[method])
    else:
        opts = {k: v for k, v in budget.items() if k in accepted}
        log.info("%s: no settings in the table; using %s", method, opts or "its defaults")
    opts.update(overrides or {})
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise OptionError(
            f"settings for {method!r}: unknown option(s) {unknown}; it accepts {sorted(accepted)}"
        )
    return opts


def results_dir(out: str | os.PathLike | None = None) -> Path:
    """``out``, or ``benchmarks/results`` of the source checkout, or ``./benchmarks/results``."""
    if out is not None:
        p = Path(out)
    else:
        repo = Path(__file__).resolve().parents[3]
        p = (
            repo / "benchmarks" / "results"
            if (repo / "pyproject.toml").exists()
            else Path.cwd() / "benchmarks" / "results"
        )
    p.mkdir(parents=True, exist_ok=True)
    return p


def cpu_threads(n: int | None) -> None:
    """Set torch's intra-op threads (the small models here gain nothing from more than one)."""
    import torch

    if n is not None:
        if n < 1:
            raise OptionError(f"threads: expected a positive int, got {n!r}")
        torch.set_num_threads(int(n))


def save_figure(fig, path, **kwargs) -> None:
    """A matplotlib figure written atomically (``marginalize._files``): the format from the
    suffix of ``path``; an ``OSError`` names ``path`` and leaves an old file intact."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    write_bytes(path, buf.getvalue())
