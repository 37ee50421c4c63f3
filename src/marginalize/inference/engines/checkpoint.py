"""Checkpoints of long fits: save every N steps or draws and on Ctrl-C, then resume exactly.

A fit with ``checkpoint=PATH`` writes its state to ``PATH`` every ``checkpoint_every`` SVI
steps or MCMC iterations, when it is interrupted (Ctrl-C), and when each part of it ends.
:func:`resume` continues from that file to **bitwise the same result** as an uninterrupted fit
with the same seed (on the same device and library versions)::

    post = mz.fit(model, x, y, method="nuts", seed=0, checkpoint="fit.ckpt", checkpoint_every=50)
    # ... Ctrl-C, a crash or a preempted job ...
    post = mz.resume("fit.ckpt", model, x, y)      # same draws as if never interrupted

A fresh fit refuses to overwrite an existing checkpoint (that file may hold hours of work):
continue it with :func:`resume`, or delete it.

How it works. A fit is a sequence of *segments*: each run of the training loop
(:func:`~marginalize.inference.engines.training.train`: one per SVI fit, ensemble member, SWAG
phase, MAP stage...) and each MCMC chain is one, numbered in the order the method runs them.
A segment saves either its finished result or its state in progress; on resume, finished
segments are restored without recomputing and the segment in progress continues from its state.
Segments run inside a member of
:func:`~marginalize.inference.engines.distributed.run_members` (ensemble members, SWAG runs,
MCMC chains) are keyed by the member (``m{k}.{j}:{kind}``), the others by their order in the
fit (``{j}:{kind}``), so a checkpoint does not depend on which process ran a member.

Distributed runs (several processes, see ``docs/guide/distributed.md``): rank 0 writes
``PATH`` with every segment it knows; rank ``r > 0`` writes ``PATH.rank{r}`` with only the
member segments it runs (the others are computed identically on every rank). After the
members are gathered rank 0 knows them all: at the end of the fit it writes the complete
``PATH`` and deletes the ``PATH.rank*`` files. :func:`pending` reads ``PATH`` and every
``PATH.rank*`` beside it and keeps, per segment, the finished one or else the one saved last,
so a fit can be resumed by any number of processes (on a file system all ranks share).

What is saved, all as plain tensors:

* training: the optimizer's state (parameters, moments, step count, learning-rate backoff, and
  the state before its last update), the objective's noise generator, the state of a per-step
  callback (SWAG's moments), the loss trace, the rollbacks, the number of steps done and the
  global RNG states (torch, Python ``random``, NumPy, and CUDA when used). The minibatch order is
  a function of ``(seed, step)``: its generator is replayed to the saved step.
* MCMC: per chain ``NUTSState.state_dict()`` (position, step size, metric, adaptation
  accumulators and the chain's generator state) plus the draws and sampler statistics so far.

The path is checked before fitting (its folder must exist and accept a new file); a write that
fails later (a full disk) is a warning, and the fit goes on and returns its result.
Files are written atomically (temporary file + rename) and verified on load (format, version,
SHA-256 of the content; ``torch.load(weights_only=True)``): see :mod:`marginalize._files`.
Ctrl-C during training takes effect at the end of the current step (press it twice to stop at once;
the file then keeps the last completed checkpoint), so the saved state is always consistent.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import glob
import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marginalize._files import check_path, digest, read_verified, write_verified
from marginalize.errors import DataError, FileFormatError, ModelError, OptionError, warn
from marginalize.inference.engines import interrupt

__all__ = [
    "pending",
    "session",
    "segment",
    "member",
    "member_segments",
    "adopt",
    "rank_file",
    "deferred_interrupt",
    "restore_error",
    "rng_state",
    "set_rng_state",
    "FORMAT",
    "VERSION",
]

log = logging.getLogger(__name__)

FORMAT = "marginalize.checkpoint"
VERSION = 3  # 2: member segments keyed by member (distributed runs); 3: training-loop segments

_ACTIVE: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "mz_checkpoint", default=None
)
_PENDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mz_resume", default=None)


# ---- RNG state as plain tensors ----------------------------------------------------------
def rng_state(device: torch.device | None = None) -> dict:
    """The global RNG states (torch, Python ``random``, NumPy, CUDA) as plain tensors."""
    version, keys, gauss = random.getstate()
    _, np_keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - the global state
    st = {
        "torch": torch.get_rng_state(),
        "random": {
            "version": int(version),
            "keys": torch.tensor(keys, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if device is not None and device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(st["torch"])
    r = st["random"]
    random.setstate((r["version"], tuple(int(k) for k in r["keys"].tolist()), r["gauss"]))
    n = st["numpy"]
    np.random.set_state(  # noqa: NPY002
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    if "cuda" in st and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


# ---- Ctrl-C at a safe point ----------------------------------------------------------------
class _Interrupt:
    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` here if Ctrl-C was pressed (see ``engines/interrupt.py``)."""
        interrupt.check()


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[_Interrupt]:
    """Within the block, Ctrl-C only asks the fit to stop; :meth:`_Interrupt.check` raises
    ``KeyboardInterrupt`` at the next safe point; a second Ctrl-C interrupts at once (the
    fit-wide behaviour of :func:`marginalize.inference.engines.interrupt.scope`)."""
    with interrupt.scope():
        yield _Interrupt()


# ---- the session of one fit --------------------------------------------------------------
class Segment:
    """One resumable part of a fit (an SVI run or an MCMC chain).

    ``saved`` is ``None`` for a fresh start, else ``{"done": bool, "state": dict}`` from the file.
    """

    def __init__(self, sess: _Session, key: str, label: str, saved: dict | None):
        self.session = sess
        self.key = key
        self.label = label
        self.saved = saved

    @property
    def every(self) -> int:
        return self.session.every

    def due(self, done: int) -> bool:
        """Whether a periodic checkpoint is due after ``done`` steps or iterations."""
        return done > 0 and done % self.session.every == 0

    def save(self, state: dict) -> None:
        """Write ``state`` (this segment in progress) with every finished segment."""
        self._store(False, state)

    def finish(self, state: dict) -> None:
        """Record this segment's result (cloned: the caller may keep mutating its tensors)."""
        self._store(True, state)

    def _store(self, done: bool, state: dict) -> None:
        old = self.session.segments.get(self.key) or {}
        self.session.segments[self.key] = {
            "label": self.label,
            "done": done,
            "state": _clone(_cpu(state)),
            # how often this segment was saved: on resume, the copy saved last wins
            "seq": int(old.get("seq", 0)) + 1,
        }
        self.session.write(member=self.key.startswith("m"))

    def interrupt(self, state: dict | None) -> None:
        """Save ``state`` (None: keep the last checkpoint) and stop the rest of the fit."""
        if state is not None:
            self.save(state)
        self.session.interrupted = True
        warn(
            "checkpoint saved to %s (%s); continue with mz.resume(%r, model, x, y)",
            self.session.file,
            self.label,
            str(self.session.path),
        )


def rank_file(path: Path, rank: int) -> Path:
    """The checkpoint file of rank ``rank`` of a distributed run (``path`` for rank 0)."""
    return path if rank == 0 else path.with_name(f"{path.name}.rank{rank}")


def _rank_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.rank*"))


class _Session:
    def __init__(self, path: Path, every: int, header: dict, saved: dict, rank: int = 0):
        self.path = path
        self.every = every
        self.header = header
        self.saved = saved
        self.segments: dict[str, dict] = dict(saved)
        self.counter = 0
        self.used = 0
        self.interrupted = False
        self.complete = False
        self.broken = False
        self.rank = rank
        self.file = rank_file(path, rank)
        #: (prefix, next index) of the member scopes entered (see :func:`member`)
        self.members: list[list] = []

    def segment(self, kind: str, label: str) -> Segment:
        if self.interrupted:
            raise KeyboardInterrupt("an earlier part of this fit was interrupted")
        if self.members:
            scope = self.members[-1]
            key = f"{scope[0]}{scope[1]}:{kind}"
            scope[1] += 1
        else:
            key = f"{self.counter}:{kind}"
            self.counter += 1
        self.used += 1
        saved = self.saved.get(key)
        if saved is not None and not {"done", "state"} <= set(saved):
            raise FileFormatError(f"{self.path}: segment {key} is incomplete")
        return Segment(self, key, label, saved)

    def write(self, member: bool = True) -> None:
        """Write this rank's file: everything on rank 0; on rank ``r > 0`` the member
        segments only (the others are identical on rank 0), and nothing for the others. A
        failed write is a warning (the fit goes on), and later writes are skipped."""
        if self.broken:
            return
        if self.rank == 0:
            segments = self.segments
        elif not member:
            return
        else:
            segments = {k: v for k, v in self.segments.items() if k.startswith("m")}
        try:
            write_verified(
                {**self.header, "complete": self.complete, "segments": segments}, self.file
            )
        except OSError as e:
            self.broken = True
            warn(
                "checkpoint: cannot write %s (%s); the fit continues without checkpoints",
                self.file,
                e,
            )


@contextlib.contextmanager
def member(k: int) -> Iterator[None]:
    """Segments started inside the block belong to member (or chain) ``k`` of the fit: their
    keys do not depend on what ran before them, nor on which process runs them."""
    sess = _ACTIVE.get()
    if sess is None:
        yield
        return
    outer = sess.members[-1][0] if sess.members else ""
    sess.members.append([f"{outer}m{int(k)}.", 0])
    try:
        yield
    finally:
        sess.members.pop()


def member_segments(k: int) -> dict[str, dict]:
    """The saved segments of member ``k`` in the active checkpointed fit (``{}`` if none)."""
    sess = _ACTIVE.get()
    if sess is None:
        return {}
    prefix = (sess.members[-1][0] if sess.members else "") + f"m{int(k)}."
    return {key: v for key, v in sess.segments.items() if key.startswith(prefix)}


def adopt(segments: dict[str, dict], interrupted: bool = False) -> None:
    """Take in segments another rank ran (gathered); ``interrupted``: a rank was interrupted,
    so the checkpoint must not be marked complete."""
    sess = _ACTIVE.get()
    if sess is None:
        return
    sess.segments.update(segments)
    if interrupted:
        sess.interrupted = True


def segment(kind: str, label: str) -> Segment | None:
    """The next segment of the active checkpointed fit, or ``None`` when not checkpointing.

    Raises ``KeyboardInterrupt`` when an earlier segment of this fit was interrupted.
    """
    sess = _ACTIVE.get()
    return None if sess is None else sess.segment(kind, label)


def _header(method: str, opts: Any, seed: int, problem) -> dict:
    options = opts.record() if hasattr(opts, "record") else dataclasses.asdict(opts)
    options.pop("checkpoint", None)
    try:
        options_json = json.dumps(options, sort_keys=True)
    except TypeError as e:
        raise OptionError(
            f"checkpoint: method {method!r} has options that are not plain values "
            f"and cannot be saved ({e})"
        ) from e
    from marginalize.models.base import BNN

    model = problem.model
    return {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": str(torch.__version__),
        "method": method,
        "options": options_json,
        "seed": int(seed),
        "data_sha256": _data_digest(problem),
        "layout": json.dumps([[s.name, list(s.shape)] for s in problem.layout.sites]),
        "model_config": json.dumps(model.config(), sort_keys=True)
        if isinstance(model, BNN)
        else None,
    }


def _data_digest(problem) -> str:
    """A SHA-256 of in-memory data; of the number of rows and the loader's type for a data
    loader (its contents are not read for this)."""
    if problem.in_memory:
        return digest({"x": problem.x, "y": problem.y})
    kind = type(getattr(problem.data, "loader", problem.data)).__name__
    return digest({"n": int(problem.n), "loader": kind})


def _check_match(path: Path, saved: dict, now: dict) -> None:
    if saved.get("layout") != now["layout"]:
        raise ModelError(
            f"model: its latent sites {now['layout']} differ from those of the fit saved "
            f"in {path} ({saved.get('layout')}); pass the same model"
        )
    if saved.get("model_config") != now["model_config"]:
        raise ModelError(
            f"model: its configuration differs from the one saved in {path}; pass the same model"
        )
    if saved.get("data_sha256") != now["data_sha256"]:
        raise DataError(
            f"x, y: differ from the data the checkpoint {path} was written with; "
            "pass exactly the same data (same values, order and dtype)"
        )


def _check_writable(path: Path) -> None:
    """``OptionError`` unless a file can be created next to ``path`` (before any fitting)."""
    folder = path.parent
    if not folder.is_dir():
        raise OptionError(f"checkpoint: the folder {folder} does not exist")
    probe = folder / f".{path.name}.{os.getpid()}.probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"0")
    except OSError as e:
        raise OptionError(
            f"checkpoint: cannot create a file in {folder} ({e.strerror or e}); choose a "
            "writable folder"
        ) from e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


@contextlib.contextmanager
def session(
    method: str, opts: Any, seed: int, problem, *, rank: int = 0
) -> Iterator[_Session | None]:
    """Checkpoint the fit run inside the block when ``opts.checkpoint`` is set (or resume it).

    ``rank``: this process's rank in a distributed fit (rank ``r > 0`` writes
    ``PATH.rank{r}``; see the module docstring)."""
    pending = _PENDING.get()
    path = getattr(opts, "checkpoint", None)
    if path is None:
        yield None
        return
    path = Path(path)
    header = _header(method, opts, seed, problem)
    if pending is None:
        if path.exists():
            raise OptionError(
                f"checkpoint: {path} already exists (from an earlier fit?); continue that fit with "
                f"mz.resume({str(path)!r}, model, x, y), or delete the file or choose another path"
            )
        stale = _rank_files(path)
        if stale:
            raise OptionError(
                f"checkpoint: {stale[0]} exists (the part of a distributed fit that another "
                f"process ran); continue that fit with mz.resume({str(path)!r}, model, x, y), or "
                "delete the files or choose another path"
            )
        _check_writable(path)
        saved = {}
    else:
        _check_match(path, pending, header)
        saved = pending["segments"]
        if not isinstance(saved, dict):
            raise FileFormatError(f"{path}: malformed checkpoint (segments)")
    sess = _Session(path, opts.checkpoint_every, header, saved, rank=rank)
    token, token_pending = _ACTIVE.set(sess), _PENDING.set(None)
    try:
        yield sess
    finally:
        _ACTIVE.reset(token)
        _PENDING.reset(token_pending)
    if sess.used == 0:
        warn("method %r did not write checkpoints (it has no resumable loop)", method)
    elif not sess.interrupted and rank == 0:
        # rank 0 holds every segment (the members were gathered): one complete file
        sess.complete = True
        sess.write()
        for f in _rank_files(path):
            f.unlink(missing_ok=True)


@contextlib.contextmanager
def pending(path) -> Iterator[tuple[str, dict, int]]:
    """Read the checkpoint ``path`` and make it the one the next :func:`session` continues:
    yields ``(method, options, seed)`` from its header (``options`` with ``checkpoint=path``)."""
    path = check_path(path)
    others = [] if path.is_dir() else _rank_files(path)
    payload = _merged(([path] if path.exists() or not others else []) + others)
    try:
        options = json.loads(payload["options"])
        method, seed = payload["method"], payload["seed"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise FileFormatError(
            f"{path}: malformed checkpoint header ({type(e).__name__}: {e})"
        ) from e
    options["checkpoint"] = str(path)
    token = _PENDING.set(payload)
    try:
        yield method, options, seed
    finally:
        _PENDING.reset(token)


def restore_error(seg: Segment, e: Exception) -> FileFormatError:
    """The error for a saved segment that cannot be restored."""
    if isinstance(e, FileFormatError):
        return e
    return FileFormatError(
        f"{seg.session.path}: cannot restore {seg.label} ({type(e).__name__}: {e})"
    )


def _merged(files: list[Path]) -> dict:
    """The first file's header with the segments of all files (per key: a finished one,
    else the one saved most often)."""
    payloads = [read_verified(f, FORMAT, VERSION, what="marginalize checkpoint") for f in files]
    first = payloads[0]
    keys = ("method", "options", "seed", "data_sha256", "layout", "model_config")
    segments: dict[str, dict] = {}
    for f, p in zip(files, payloads, strict=True):
        if any(p.get(k) != first.get(k) for k in keys):
            raise FileFormatError(
                f"{f}: belongs to another fit than {files[0]} (method, options, seed or data "
                "differ); delete the stale file"
            )
        segs = p.get("segments")
        if not isinstance(segs, dict):
            raise FileFormatError(f"{f}: malformed checkpoint (segments)")
        for key, seg in segs.items():
            old = segments.get(key)
            if old is None or _rank(seg) > _rank(old):
                segments[key] = seg
    return {**first, "segments": segments}


def _rank(seg) -> tuple:
    if not isinstance(seg, dict):
        return (False, 0)
    return (bool(seg.get("done")), int(seg.get("seq", 0)))


# ---- MCMC chains -------------------------------------------------------------------------
class ChainRecorder:
    """Keeps a chain's draws for periodic checkpoints and joins resumed draws to saved ones."""

    def __init__(self, seg: Segment | None, num_warmup: int):
        from marginalize.inference.engines.nuts import NUTSState

        self.seg = seg
        self.num_warmup = num_warmup
        self.prefix_draws: torch.Tensor | None = None
        self.prefix_stats: dict[str, torch.Tensor] = {}
        self.resume_state = None
        self._z: list[torch.Tensor] = []
        self._stats: dict[str, list] = {}
        if seg is not None and seg.saved is not None and not seg.saved["done"]:
            st = seg.saved["state"]
            try:
                self.resume_state = NUTSState.from_state_dict(st["state"])
                self.prefix_draws, self.prefix_stats = st["draws"], dict(st["stats"])
            except (KeyError, TypeError, ValueError) as e:
                raise FileFormatError(
                    f"{seg.session.path}: cannot restore {seg.label} ({e})"
                ) from e

    @property
    def start(self) -> int:
        return 0 if self.resume_state is None else int(self.resume_state.iteration)

    def record(self, i: int, state, info: dict | None) -> None:
        """The sampler's callback: keep kept draws; write a checkpoint when one is due."""
        if self.seg is None:
            return
        if info is not None:
            self._z.append(state.z)
            for k, v in info.items():
                self._stats.setdefault(k, []).append(v)
        if self.seg.due(i + 1):
            d, s = self._so_far()
            self.seg.save({"state": state.state_dict(), "draws": d, "stats": s})

    def _so_far(self):
        from marginalize.inference.engines.nuts import _STAT_DTYPES

        new = {k: torch.tensor(v, dtype=_STAT_DTYPES[k]) for k, v in self._stats.items()}
        if not self._z:
            return self.join(None, {})
        return self.join(torch.stack(self._z), new)

    def join(self, draws: torch.Tensor | None, stats: dict[str, torch.Tensor]):
        """Saved draws/stats (when resuming) followed by ``draws``/``stats`` of this call."""
        if self.prefix_draws is None:
            return draws, stats
        if draws is None or not len(draws):
            return self.prefix_draws.to(
                draws.device if draws is not None else "cpu"
            ), self.prefix_stats
        joined = torch.cat([self.prefix_draws.to(draws.device, draws.dtype), draws])
        return joined, {k: torch.cat([self.prefix_stats[k], stats[k]]) for k in stats}

    def finish(self, draws, stats, state) -> None:
        if self.seg is not None:
            self.seg.finish({"draws": draws, "stats": stats, "state": state.state_dict()})

    def interrupt(self, draws, stats, state) -> None:
        if self.seg is not None:
            self.seg.interrupt(
                None
                if state is None
                else {"draws": draws, "stats": stats, "state": state.state_dict()}
            )


def chain_result(seg: Segment, device, dtype):
    """A finished chain from the file: ``(draws, stats, NUTSState)``."""
    from marginalize.inference.engines.nuts import NUTSState

    st = seg.saved["state"]
    try:
        return (
            st["draws"].to(device, dtype),
            dict(st["stats"]),
            NUTSState.from_state_dict(st["state"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FileFormatError(f"{seg.session.path}: cannot restore {seg.label} ({e})") from e
