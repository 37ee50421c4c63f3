"""Progress of a long fit: a tqdm bar on a terminal, a line every so often without one.

tqdm turns itself off when its stream is not a terminal (a script's output redirected to a
file, a batch job, CI, a notebook without ipywidgets), so a long fit would then print nothing
for minutes. :func:`progress_bar` gives the tqdm bar where it shows, and otherwise, when
progress was asked for, a :class:`Heartbeat`: one line on stderr every
:data:`HEARTBEAT_SECONDS` seconds of the run (``marginalize: map: step 1200 of 3000 (40%),
loss 1.234, 31 s``), none for a run shorter than that, nothing at all with
``progress=False``.

It writes to stderr itself, as tqdm does, rather than through ``logging`` (silent unless the
user configures a handler, which is the problem it solves) or ``warnings`` (a progress line is
no warning, and the default filter would show it once).

Examples
--------
>>> bar = progress_bar(100, "map", enabled=False)   # progress=False: a silent bar
>>> bar.update(1); bar.close()
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

__all__ = ["progress_bar", "Heartbeat", "HEARTBEAT_SECONDS"]

#: seconds between two progress lines when no terminal shows the bar
HEARTBEAT_SECONDS = 30.0


class Heartbeat:
    """The part of tqdm's interface the fits use (``update``, ``set_postfix``, ``close``),
    writing one line to stderr every ``interval`` seconds."""

    def __init__(self, total: int, desc: str, initial: int = 0, interval: float | None = None):
        self.total, self.desc, self.n = total, desc, initial
        self.interval = HEARTBEAT_SECONDS if interval is None else interval
        self.start = self.last = time.monotonic()
        self.postfix = ""
        self.said = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def _line(self, now: float, end: str = "") -> None:
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        stream = sys.stderr
        if stream is None:  # pragma: no cover - pythonw: no stderr at all
            return
        stream.write(
            f"marginalize: {self.desc}: step {self.n} of {self.total}{pct}{extra}, "
            f"{now - self.start:.0f} s{end}\n"
        )
        stream.flush()
        self.said = True

    def close(self) -> None:
        if self.said:  # a run that said it was alive says when it is done
            self._line(time.monotonic(), " (done)")
            self.said = False


def progress_bar(total: int, desc: str, *, enabled: bool, initial: int = 0):
    """A tqdm bar when ``enabled`` and stderr is a terminal (or a notebook's widget); a
    :class:`Heartbeat` when ``enabled`` without one; a disabled bar otherwise."""
    bar = tqdm(
        total=total, initial=initial, desc=desc, disable=None if enabled else True, leave=False
    )
    if enabled and bar.disable:
        bar.close()
        return Heartbeat(total, desc, initial)
    return bar
