"""Progress and user-facing warnings of a fit.

Progress: a tqdm bar on a terminal, a :class:`Heartbeat` line on stderr every so often without
one, nothing with ``progress=False``. Warnings a user must act on (a fit that did not
converge, divergent transitions, an interrupted fit, a fallback that changes the result) are
:class:`~marginalize.FitWarning`\\ s attributed to the user's line, not log records.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from tqdm.auto import tqdm

import marginalize as mz
from marginalize.errors import PredictWarning, warn
from marginalize.inference.engines import distributed, progress
from marginalize.inference.engines.progress import Heartbeat, progress_bar

MODEL = mz.models.mlp(1, hidden=[3], activation="tanh")


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=g)


X, Y = _data()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---- the heartbeat ------------------------------------------------------------------------
def test_heartbeat_writes_a_line_when_the_interval_has_passed(capsys):
    bar = Heartbeat(4, "map", interval=0)
    bar.set_postfix(loss="1.5")
    bar.update(1)
    bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("marginalize: map: step 1 of 4 (25%), loss 1.5, ")
    assert lines[1].startswith("marginalize: map: step 2 of 4 (50%), loss 1.5, ")
    assert lines[-1].endswith(" s (done)") and len(lines) == 3


def test_heartbeat_is_silent_before_the_interval():
    out = io.StringIO()
    bar = Heartbeat(100, "map", interval=3600)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stderr", out)
        for _ in range(100):
            bar.update(1)
        bar.close()  # a run that never said it was alive says nothing when it ends
    assert out.getvalue() == ""


def test_progress_bar_is_tqdm_on_a_terminal_a_heartbeat_without_one_silent_when_off(
    monkeypatch, capsys
):
    bar = progress_bar(10, "map", enabled=True)  # pytest's stderr is no terminal
    assert isinstance(bar, Heartbeat) and bar.interval == progress.HEARTBEAT_SECONDS
    bar.close()
    off = progress_bar(10, "map", enabled=False)
    assert isinstance(off, tqdm) and off.disable
    off.update(5)
    off.close()
    assert capsys.readouterr().err == ""
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    bar = progress_bar(10, "map", enabled=True)
    assert isinstance(bar, tqdm) and not bar.disable
    bar.update(3)
    bar.close()
    assert "map" in term.getvalue()
    # a terminal does not make progress=False show anything
    term.seek(0)
    term.truncate()
    off = progress_bar(10, "map", enabled=False)
    off.update(3)
    off.close()
    assert term.getvalue() == ""


# ---- fits ---------------------------------------------------------------------------------
def test_progress_false_writes_nothing_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.0)  # a bar, were there one, would say
    with warnings.catch_warnings():
        warnings.simplefilter("error", mz.FitWarning)  # and this fit converges: no warning
        post = mz.fit(MODEL, X, Y, method="map", progress=False)
    assert post.info.converged is True
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "method, kw, desc",
    [
        ("map", dict(optimizer="adam", steps=30), "map"),
        ("nuts", dict(num_samples=4, num_warmup=4, num_chains=1), "nuts chain 1"),
    ],
)
def test_a_fit_without_a_terminal_says_it_is_alive(monkeypatch, capsys, method, kw, desc):
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mz.FitWarning)
        mz.fit(MODEL, X, Y, method=method, seed=0, progress=True, **kw)
    lines = capsys.readouterr().err.splitlines()
    beats = [s for s in lines if s.startswith(f"marginalize: {desc}: step ")]
    assert beats and beats[-1].endswith("(done)"), lines


# ---- warnings -----------------------------------------------------------------------------
def test_an_unconverged_fit_is_a_fit_warning_at_the_users_line():
    with pytest.warns(mz.FitWarning, match=r"map: not converged after 30 steps") as seen:
        post = mz.fit(MODEL, X, Y, method="map", optimizer="adam", steps=30, progress=False)
    assert post.info.converged is False
    ours = [w for w in seen if issubclass(w.category, mz.FitWarning)]
    assert ours and all(w.filename == __file__ for w in ours)


def test_divergent_transitions_are_a_fit_warning():
    with pytest.warns(mz.FitWarning, match=r"nuts: \d+ divergent transitions after warmup"):
        post = mz.fit(
            MODEL,
            X,
            Y,
            method="nuts",
            num_samples=20,
            num_warmup=0,
            num_chains=1,
            step_size=3.0,
            max_tree_depth=3,
            seed=0,
            progress=False,
        )
    assert post.info.num_divergences > 0


def test_warn_formats_like_logging():
    with pytest.warns(mz.FitWarning, match=r"^map: not converged after 5 steps \(50%\)$"):
        warn("%s: not converged after %d steps (%d%%)", "map", 5, 50)
    with pytest.warns(mz.FitWarning, match=r"^100% literal, no arguments$"):
        warn("100% literal, no arguments")  # no arguments: the text as it is
    with pytest.warns(PredictWarning, match="^report: x$"):
        warn("report: %s", "x", category=PredictWarning)


def test_torchrun_without_a_process_group_is_a_fit_warning(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed, "_initialized", lambda: False)
    with pytest.warns(mz.FitWarning, match="rank 1 of 2 started by torchrun"):
        distributed.check_launch()
