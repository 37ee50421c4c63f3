"""Ctrl-C for a whole fit: the first press asks every loop of the fit to stop at its next safe
point, a second press stops at once.

:func:`scope` is entered once per fit (by :func:`marginalize.fit`); inside it the first SIGINT
only sets a flag, so a fit made of several parts (ensemble members, SWAG phases, the MAP stage of
``bayesian_sites``, MCMC chains) stops as a whole after one press: every training loop checks
:func:`requested` before each step and ends there, and composite methods check it between their
parts. The fit then returns what it reached, with ``info.stopped.reason == "interrupted"``. A
second press raises ``KeyboardInterrupt`` where the program is (a loop catches it and keeps the
state after its last completed step).

Outside the main thread (where Python cannot set signal handlers), and where the SIGINT handler
was not set from Python or is ignored, the handler is left alone and Ctrl-C behaves as usual.

Examples
--------
>>> from marginalize.inference.engines import interrupt
>>> with interrupt.scope() as flag:
...     interrupt.requested()
False
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = ["Flag", "scope", "requested", "request", "check"]

log = logging.getLogger(__name__)


class Flag:
    """Whether Ctrl-C was pressed during the fit (``requested``) and how often."""

    def __init__(self):
        self.requested = False
        self.presses = 0


_FLAG: contextvars.ContextVar[Flag | None] = contextvars.ContextVar("mz_interrupt", default=None)


@contextlib.contextmanager
def scope() -> Iterator[Flag]:
    """Catch Ctrl-C for the block (re-entrant: an inner scope shares the outer flag)."""
    outer = _FLAG.get()
    if outer is not None:
        yield outer
        return
    flag = Flag()
    token = _FLAG.set(flag)
    old = None
    install = threading.current_thread() is threading.main_thread()
    if install:
        old = signal.getsignal(signal.SIGINT)
        install = old is not None and old is not signal.SIG_IGN

    def handler(signum, frame):
        flag.presses += 1
        if flag.requested:
            raise KeyboardInterrupt("interrupted (Ctrl-C pressed twice)")
        flag.requested = True
        # acknowledged on stderr at every press (a warning would show once per line of the
        # user's code, and a warnings-as-errors filter would raise inside the handler)
        log.warning("Ctrl-C: stopping at the end of the current step (press again to stop at once)")
        if sys.stderr is not None and not logging.getLogger().hasHandlers():
            sys.stderr.write(
                "marginalize: Ctrl-C: stopping at the end of the current step "
                "(press again to stop at once)\n"
            )

    if install:
        signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        if install:
            signal.signal(signal.SIGINT, old)
        _FLAG.reset(token)


def requested() -> bool:
    """Whether the current fit was asked to stop (Ctrl-C, or :func:`request`)."""
    flag = _FLAG.get()
    return flag is not None and flag.requested


def request() -> None:
    """Ask the current fit to stop at its next safe point (as one Ctrl-C does)."""
    flag = _FLAG.get()
    if flag is not None:
        flag.requested = True


def check() -> None:
    """Raise ``KeyboardInterrupt`` if the fit was asked to stop (for loops that stop by it)."""
    if requested():
        raise KeyboardInterrupt("interrupted (Ctrl-C)")
