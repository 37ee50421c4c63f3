"""Several processes with ``torch.distributed``: members and chains spread over ranks.

Under ``torchrun`` (or any initialized default process group), :func:`run_members` runs
member ``k`` of ``num`` (an ensemble member, a SWAG run, an MCMC chain; any independent task)
on rank ``k % world_size`` and gathers every result on every rank. Each member derives its
randomness from its own seed (:func:`~marginalize.inference.engines.seeding.member_seed`, the
chain seeds of ``methods/mcmc.py``), so the gathered list is **bitwise** the one a single
process computes with the same seed, on the same machine, library versions and torch thread
count (``torchrun`` sets ``OMP_NUM_THREADS=1``: compare with ``torch.set_num_threads(1)``).
Without a process group (or inside :func:`local`), :func:`run_members` is a plain loop.

How results travel. A result is any nest of dicts, lists, tuples, tensors, NumPy arrays,
:class:`~marginalize.core.approximations.Approximation` objects (as their ``state_dict``) and
plain Python values. It is split into a JSON description and one byte buffer holding every
tensor; nothing is pickled. The buffers travel over a gloo group of this module's own (also
when the default group is NCCL: the results are small next to the training work, and gloo's
point-to-point waits take a timeout, so a missing rank can be named).

A rank that dies or hangs. Before the exchange, every rank reports to rank 0, which answers
each with the list of ranks that arrived: a rank whose process ended is seen at once (its
connections close), a rank that does not arrive within :func:`timeout` seconds (environment
variable ``MARGINALIZE_DIST_TIMEOUT``, default 1800) when that time is up; either way every
surviving rank raises a :class:`~marginalize.errors.FitError` naming it. The timeout bounds
how long a rank that finished its members waits for the slowest one: set it above the run
time of one member or chain. A member that raises on one rank ends the run on every rank:
that rank re-raises its exception, the others raise ``FitError`` naming the rank, the member
and the message.

Checkpoints (``checkpoint=PATH``) in a distributed run: see
:mod:`~marginalize.inference.engines.checkpoint` (rank 0 writes ``PATH``, rank ``r`` the
members it runs to ``PATH.rank{r}``; resumable with any number of processes).

Examples
--------
Without a process group the members run in this process, one after another:

>>> run_members(3, lambda k: {"k": k, "z": torch.full((2,), float(k))})[2]["z"]
tensor([2., 2.])
>>> decode(*encode({"a": [1, (2.5, None)], "t": torch.arange(3)}))
{'a': [1, (2.5, None)], 't': tensor([0, 1, 2])}
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from marginalize.core.approximations import Approximation, from_state
from marginalize.errors import FitError, OptionError
from marginalize.inference.engines import checkpoint
from marginalize.inference.engines.objectives import Batch, Objective

__all__ = [
    "init_from_env",
    "shutdown",
    "rank",
    "world_size",
    "is_distributed",
    "is_main",
    "local",
    "timeout",
    "owner",
    "run_members",
    "DataParallel",
    "data_parallel",
    "row_share",
    "sum_over_ranks",
    "init_from_env",
    "encode",
    "decode",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: seconds a rank waits at a gather for the others (``MARGINALIZE_DIST_TIMEOUT`` overrides)
DEFAULT_TIMEOUT = 1800.0
TIMEOUT_ENV = "MARGINALIZE_DIST_TIMEOUT"

_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("mz_dist_local", default=False)
_GROUP: dict[str, Any] = {}


# ---- ranks -------------------------------------------------------------------------------
def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of processes in the default process group (1 without one)."""
    return dist.get_world_size() if _initialized() else 1


def is_distributed() -> bool:
    """Whether :func:`run_members` spreads members over ranks here: a default process group
    with more than one rank, and not inside :func:`local` (nor inside a member)."""
    return not _LOCAL.get() and world_size() > 1


def is_main() -> bool:
    """Rank 0 (or no process group): the process that writes files and terminal output."""
    return rank() == 0


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within the block, :func:`run_members` runs every member in this process (no
    collectives): for work only some ranks do, e.g. a benchmark split run by one rank."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def timeout() -> float:
    """Seconds a rank waits at a gather for the other ranks (see the module docstring)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise OptionError(f"{TIMEOUT_ENV}: expected a number of seconds > 0, got {raw!r}")
    return value


def owner(k: int, world: int | None = None) -> int:
    """The rank that runs member ``k`` (round robin: ``k % world``)."""
    return int(k) % (world_size() if world is None else int(world))


def init_from_env(backend: str = "gloo") -> bool:
    """Initialize the default process group from ``torchrun``'s environment variables.

    Does nothing (returns False) when the process was not started by ``torchrun`` (no
    ``WORLD_SIZE``), when it is the only process, or when a group exists already. The
    group's timeout is :func:`timeout`. With ``backend="nccl"``, each rank uses the GPU
    ``LOCAL_RANK``.

    Returns
    -------
    bool
        Whether this call created the process group (the caller then destroys it).
    """
    if _initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout()))
    return True


def check_launch() -> None:
    """Warn (:class:`~marginalize.errors.FitWarning`) when the process was started by a
    launcher of several processes (``torchrun``: ``WORLD_SIZE`` > 1) but no process group
    exists: every rank would then fit the whole problem alone, the same work K times.

    The group is not initialized here: it belongs to the user's script (its backend, its
    device binding, its timeout, its teardown, and a script that initializes its own group
    later would fail on a second one), and ``mz.fit`` is one library call in that script.
    ``marginalize fit`` (the command line, which owns its process) initializes it itself.
    """
    world = os.environ.get("WORLD_SIZE", "1")
    if _initialized() or not world.isdigit() or int(world) <= 1:
        return
    from marginalize.errors import warn

    warn(
        f"this process is rank {os.environ.get('RANK', '?')} of {world} started by torchrun "
        "(WORLD_SIZE is set), but no torch.distributed process group is initialized: every "
        "rank fits the whole problem alone. Call torch.distributed.init_process_group('gloo') "
        "(or 'nccl') before mz.fit to spread members and chains over the ranks and train "
        "data-parallel (docs/guide/distributed.md), or run the script without torchrun."
    )


def shutdown() -> None:
    """Leave the default process group together: a barrier, then ``destroy_process_group``.

    A rank that destroys its group while another rank still holds the connection (rank 0
    still writing a report, or simply later to exit) can make that other rank abort at exit
    with gloo ("terminate called without an active exception", exit code -6). Every rank
    calls this where it would call ``torch.distributed.destroy_process_group()``. Does
    nothing without a process group. The barrier runs on marginalize's own gloo group where
    a fit made one (so an NCCL default group needs no device here), else on the default
    group.
    """
    if not _initialized():
        return
    group = _GROUP.get("group") if _GROUP.get("world") is dist.group.WORLD else None
    try:
        dist.barrier(group=group)
    finally:
        _GROUP.clear()
        dist.destroy_process_group()


def _group():
    """A gloo group over all ranks, made once per default group (all ranks call this at the
    same point: the first :func:`run_members` of a run)."""
    world = dist.group.WORLD
    if _GROUP.get("world") is not world:
        # gloo also under an NCCL default group: results travel on the CPU
        try:
            group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout()))
        except Exception as e:  # a rank that never comes: DistStoreError, RuntimeError, ...
            raise FitError(
                f"distributed fit: rank {rank()} could not reach the other ranks "
                f"({_first_line(e)}). Every rank must call mz.fit with the same arguments; to "
                "fit in one process only, call it inside "
                "marginalize.inference.engines.distributed.local()"
            ) from e
        _GROUP.update(world=world, group=group)
    return _GROUP["group"]


# ---- results as JSON plus one byte buffer --------------------------------------------------
def encode(obj: Any) -> tuple[bytes, torch.Tensor]:
    """``obj`` as ``(JSON description, uint8 buffer of every tensor's bytes)``; see
    :func:`decode`. Raises ``TypeError`` for a value of another type."""
    tensors: list[torch.Tensor] = []

    def put(t: torch.Tensor) -> dict:
        t = t.detach()
        tensors.append(t.cpu().contiguous().reshape(-1).view(torch.uint8))
        return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}

    def enc(v):
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return {"__float__": repr(v)} if not math.isfinite(v) else v
        if isinstance(v, torch.Tensor):
            return {"__tensor__": {**put(v), "device": v.device.type}}
        if isinstance(v, np.ndarray):
            return {"__ndarray__": put(torch.from_numpy(np.ascontiguousarray(v)))}
        if isinstance(v, np.generic):
            return enc(v.item())
        if isinstance(v, Approximation):
            return {"__approximation__": enc(v.state_dict())}
        if isinstance(v, dict):
            return {"__dict__": [[enc(k), enc(x)] for k, x in v.items()]}
        if isinstance(v, tuple):
            return {"__tuple__": [enc(x) for x in v]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        raise TypeError(
            f"cannot send a {type(v).__name__} between ranks; results of members must be "
            "tensors, arrays, approximations and plain values in dicts, lists and tuples"
        )

    spec = json.dumps(enc(obj), allow_nan=False).encode()
    buf = torch.cat(tensors) if tensors else torch.zeros(0, dtype=torch.uint8)
    return spec, buf


def _local_device(kind: str) -> torch.device:
    if kind == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def decode(spec: bytes, buf: torch.Tensor) -> Any:
    """Inverse of :func:`encode`: tensors come back on this process's device of the kind
    they were sent from (``cuda``: the current CUDA device)."""
    offset = [0]

    def take(d: dict) -> torch.Tensor:
        dtype = getattr(torch, d["dtype"])
        shape = tuple(d["shape"])
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        raw = buf[offset[0] : offset[0] + n].clone()
        offset[0] += n
        return raw.view(dtype).reshape(shape)

    def dec(v):
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "__float__" in v:
            return float(v["__float__"])
        if "__tensor__" in v:
            d = v["__tensor__"]
            return take(d).to(_local_device(d["device"]))
        if "__ndarray__" in v:
            return take(v["__ndarray__"]).numpy()
        if "__approximation__" in v:
            return from_state(dec(v["__approximation__"]))
        if "__tuple__" in v:
            return tuple(dec(x) for x in v["__tuple__"])
        if "__dict__" in v:
            return {_key(dec(k)): dec(x) for k, x in v["__dict__"]}
        raise ValueError(f"malformed description {sorted(v)}")

    return dec(json.loads(spec.decode()))


def _key(k):
    return tuple(k) if isinstance(k, list) else k


# ---- members over ranks --------------------------------------------------------------------
def run_members(
    num: int,
    fn: Callable[[int], T],
    *,
    label: str = "member",
    stop: Callable[[T], bool] | None = None,
) -> list[T]:
    """Run ``fn(k)`` for ``k = 0 .. num - 1``; spread over the ranks in a distributed run.

    Parameters
    ----------
    num : int
        Number of members (or chains, or any independent tasks).
    fn : callable
        ``fn(k) -> result``; must derive all randomness from ``k`` (a member seed) and not
        depend on what ran before it in the process. Runs inside :func:`local` (a fit it
        makes runs in its process) and inside :func:`checkpoint.member(k)
        <marginalize.inference.engines.checkpoint.member>` (its checkpoint segments are keyed
        by ``k``). Its result must be encodable (:func:`encode`).
    label : str
        What a member is called in messages ("member", "chain", ...).
    stop : callable, optional
        ``stop(result) -> bool``: after a result for which it is True (e.g. an interrupted
        chain), the process runs no further members of its own.

    Returns
    -------
    list
        The results in the order of ``k`` (bitwise the same on every rank, and the same as
        without a process group). When ``stop`` ended a process's loop early, the members it
        did not run are missing from the list (without a process group: every member after
        the one that stopped).

    Raises
    ------
    FitError
        A rank died, hung (no answer within :func:`timeout` seconds) or raised in a member
        (that rank re-raises its own exception).
    KeyboardInterrupt
        A member was interrupted on some rank (outside its own handling of Ctrl-C).
    """
    if not is_distributed():
        out = []
        for k in range(num):
            with checkpoint.member(k):
                res = fn(k)
            out.append(res)
            if stop is not None and stop(res):
                break
        return out
    me, world = rank(), world_size()
    group = _group()
    results: dict[int, Any] = {}
    status: dict[str, Any] = {"state": "ok"}
    error: BaseException | None = None
    with local():
        for k in range(me, num, world):
            try:
                with checkpoint.member(k):
                    res = fn(k)
            except KeyboardInterrupt:
                status = {"state": "interrupted", "member": k}
                break
            except Exception as e:  # reported to every rank, re-raised here below
                status = {"state": "error", "member": k, "error": f"{type(e).__name__}: {e}"}
                error = e
                break
            results[k] = res
            if stop is not None and stop(res):
                break
    records = {
        k: {"result": v, "segments": checkpoint.member_segments(k)} for k, v in results.items()
    }
    gathered = _exchange({"status": status, "members": records, "num": num}, group, label)
    if any(g["num"] != num for g in gathered):
        raise FitError(
            f"distributed fit: the ranks asked for different numbers of {label}s "
            f"({[g['num'] for g in gathered]}); every rank must call mz.fit with the same "
            "arguments"
        )
    failed = [(r, g["status"]) for r, g in enumerate(gathered) if g["status"]["state"] != "ok"]
    for r, st in failed:
        if st["state"] == "error":
            if r == me and error is not None:
                raise error
            raise FitError(
                f"rank {r} failed in {label} {st['member']}: {st['error']} "
                f"(the run stops on every rank)"
            )
    every: dict[int, Any] = {}
    for g in gathered:
        for k, rec in g["members"].items():
            every[int(k)] = rec["result"]
            checkpoint.adopt(rec["segments"])
    if failed:  # interrupted
        r, st = failed[0]
        checkpoint.adopt({}, interrupted=True)
        raise KeyboardInterrupt(f"rank {r} was interrupted in {label} {st['member']}")
    return [every[k] for k in sorted(every)]


def _roll_call(group, label: str, wait: float) -> None:
    """Every rank reports to rank 0, which tells every rank whether all arrived: a rank whose
    process ended is seen at once, one that hangs after ``wait`` seconds. Raises ``FitError``
    naming the missing rank, on every surviving rank."""
    me, world = rank(), world_size()
    td = datetime.timedelta(seconds=wait)
    if me == 0:
        present = torch.ones(world, dtype=torch.int64)
        details = {}
        for r in range(1, world):
            token = torch.zeros(1, dtype=torch.int64)
            try:
                dist.irecv(token, src=r, group=group).wait(td)
            except RuntimeError as e:
                present[r] = 0
                details[r] = _first_line(e)
        for r in range(1, world):
            if present[r]:
                with contextlib.suppress(RuntimeError):
                    dist.isend(present, dst=r, group=group).wait(td)
        missing = [r for r in range(world) if not present[r]]
        if missing:
            raise FitError(_missing(missing, label, wait, details[missing[0]]))
        return
    verdict = torch.zeros(world, dtype=torch.int64)
    try:
        dist.isend(torch.ones(1, dtype=torch.int64), dst=0, group=group).wait(td)
        # rank 0 may be busy with its own members, then wait for each other rank in turn
        dist.irecv(verdict, src=0, group=group).wait(td * world)
    except RuntimeError as e:
        raise FitError(_missing([0], label, wait * world, _first_line(e))) from e
    missing = [r for r in range(world) if not verdict[r]]
    if missing:
        raise FitError(_missing(missing, label, wait, "reported by rank 0"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _missing(ranks: list[int], label: str, wait: float, detail: str) -> str:
    who = ", ".join(str(r) for r in ranks)
    if "timed out" in detail.lower():
        why = f"no answer within {wait:g} s ({TIMEOUT_ENV})"
    elif detail == "reported by rank 0":
        why = detail
    else:
        why = f"its process ended: {detail.split('. ')[0]}"
    return (
        f"distributed fit: rank {who} died or hung while the {label}s were gathered ({why}); "
        f"see the output of rank {who}"
    )


def _exchange(obj: Any, group, label: str) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    me, world = rank(), world_size()
    wait = timeout()
    _roll_call(group, label, wait)
    spec, buf = encode(obj)
    try:
        sizes = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(spec), buf.numel()]), group=group)
        lens = [(int(s[0]), int(s[1])) for s in sizes]
        width = max(n for n, _ in lens)
        mine = torch.zeros(width, dtype=torch.uint8)
        mine[: len(spec)] = torch.frombuffer(bytearray(spec), dtype=torch.uint8)
        specs = [torch.empty(width, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(specs, mine, group=group)
        bufs = []
        for src, (_, n) in enumerate(lens):
            b = buf if src == me else torch.empty(n, dtype=torch.uint8)
            if n:
                dist.broadcast(b, src=src, group=group)
            bufs.append(b)
    except RuntimeError as e:
        raise FitError(_lost(me, label, wait, e)) from e
    return [
        decode(s[:n].numpy().tobytes() if n else b"null", b)
        for s, (n, _), b in zip(specs, lens, bufs, strict=True)
    ]


def _lost(me: int, label: str, wait: float, e: BaseException) -> str:
    return (
        f"distributed fit: rank {me} lost the other ranks while gathering the {label}s "
        f"({_first_line(e)}); a rank died or hung ({TIMEOUT_ENV}={wait:g} s)"
    )


# ---- data-parallel training ------------------------------------------------------------------
class DataParallel(Objective):
    """An objective evaluated data-parallel over the ranks (wraps ``objective``).

    Each rank evaluates ``objective`` on its shard of the minibatch (contiguous slice ``r`` of
    ``world_size`` of the minibatch's rows; of all ``n`` rows for a full batch), with the
    likelihood scaled by ``n / b_r`` as for any minibatch of ``b_r`` rows, and the ranks sum
    ``(b_r / B) * (loss_r, grad_r)`` with one ``all_reduce``. Since every shard's loss counts
    the prior (or KL) term once and ``sum_r b_r / B = 1``, the result is the loss and gradient
    of the whole minibatch of ``B`` rows: the prior/KL counted once, the likelihood scaled to
    the full data. Every rank gets the same numbers, so the parameters stay identical on every
    rank (the optimizer runs on each). Equal to the single-process objective up to the order
    of floating-point sums, and for objectives whose noise is drawn per row (dropout masks,
    local reparameterization) up to that noise (each rank draws its shard's).
    """

    def __init__(self, objective: Objective, n: int):
        self.objective = objective
        self.n = int(n)
        self.stochastic = objective.stochastic
        self.rank, self.world = rank(), world_size()

    def shard(self, batch: Batch, device) -> tuple[Batch | None, float]:
        """This rank's part of ``batch`` and its weight ``b_r / B`` (None, 0 when empty)."""
        if batch.x is not None:  # rows from a data loader (the same minibatch on every rank)
            rows = torch.arange(batch.x.shape[0], device=batch.x.device)
            part = torch.tensor_split(rows, self.world)[self.rank]
            if len(part) == 0:
                return None, 0.0
            sub = Batch(None, self.n / len(part), x=batch.x[part], y=batch.y[part])
            return sub, len(part) / len(rows)
        idx = torch.arange(self.n, device=device) if batch.idx is None else batch.idx
        part = torch.tensor_split(idx, self.world)[self.rank]
        if len(part) == 0:
            return None, 0.0
        return Batch(part, self.n / len(part)), len(part) / len(idx)

    def loss_and_grad(self, params: torch.Tensor, batch: Batch):
        part, w = self.shard(batch, params.device)
        if part is None:
            buf = torch.zeros(params.numel() + 1, dtype=params.dtype, device=params.device)
        else:
            loss, grad = self.objective.loss_and_grad(params, part)
            buf = torch.cat([loss.reshape(1).to(grad.dtype), grad.reshape(-1)]) * w
        dist.all_reduce(buf)
        return buf[0], buf[1:].view_as(params)

    def loss(self, params, batch):  # pragma: no cover - train() calls loss_and_grad
        raise NotImplementedError("DataParallel: use loss_and_grad")

    def state_dict(self) -> dict:
        return self.objective.state_dict()

    def load_state_dict(self, st: dict) -> None:
        self.objective.load_state_dict(st)


def data_parallel(objective: Objective, params: torch.Tensor, n: int) -> Objective:
    """``objective`` data-parallel over the ranks in a distributed run (see
    :class:`DataParallel`), after making ``params`` rank 0's on every rank; ``objective``
    itself otherwise (no process group, inside :func:`local` or a member)."""
    if not is_distributed():
        return objective
    dist.broadcast(params.data, src=0)
    return DataParallel(objective, n)


def row_share(n: int) -> slice:
    """This rank's contiguous share of ``n`` rows for a data-parallel sum (every row in a
    single process, inside :func:`local` or a member)."""
    if not is_distributed():
        return slice(0, n)
    world, me = world_size(), rank()
    bounds = [(n * r) // world for r in range(world + 1)]
    return slice(bounds[me], bounds[me + 1])


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (in place; ``t`` itself without a process group): the
    total of a sum over rows each rank computed on its :func:`row_share`."""
    if is_distributed():
        dist.all_reduce(t)
    return t
