"""What a fit reports about itself: :class:`FitInfo` (``Posterior.info``), typed.

Every method fills the fields that apply to it and leaves the others ``None`` (or empty):

* optimization: ``loss`` (the loss per step; for ensembles and MultiSWAG the mean over
  members, each member's trace in ``member_loss``), ``steps_done``, ``converged``, ``stopped``
  (a :class:`Stop`: the fit ended early, interrupted or on a non-finite loss), ``rollbacks``
  (:class:`Rollback` records of ``on_nan="rollback"``), ``engine`` (``"fast"``: a fused torch
  path; ``"generic"``: ``Problem.log_joint``; ``"pyro"``: a Pyro guide under ``Trace_ELBO``);
* MCMC: ``sample_stats`` (per-draw statistics, ``(chain, draw)`` tensors with ArviZ's names),
  ``num_divergences``;
* prediction: ``predictive`` (``"glm"``: through the network linearized at the MAP, Laplace;
  ``"sample"``: through the network itself), ``temperature`` (see
  :func:`marginalize.temperature_scale`);
* ``bayesian_sites`` (subset inference) and ``details``: plain values particular to a method
  (Laplace's ``hessian``, ``structure``, ``prior_precision``, ``log_evidence``; SWAG's
  ``num_collected``...).

``FitInfo`` is also readable as a mapping (``info["loss"]``, ``info.get("stopped")``, ``"loss"
in info``), with the method's ``details`` as further keys, and :meth:`FitInfo.to_dict` /
:meth:`FitInfo.from_dict` turn it into plain values for files and back (files written before
``FitInfo`` existed load the same way).

Examples
--------
>>> info = FitInfo(loss=torch.tensor([3.0, 2.0]), stopped=Stop(step=2, reason="interrupted"))
>>> info.interrupted, info["stopped"].step, "loss" in info, "sample_stats" in info
(True, 2, True, False)
>>> FitInfo.from_dict(info.to_dict()).stopped
Stop(step=2, reason='interrupted', part=None)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["FitInfo", "Stop", "Rollback"]


@dataclass
class Stop:
    """Why and where a fit ended before its last step.

    step : int
        The step (or iteration) it stopped at.
    reason : str
        ``"interrupted"`` (Ctrl-C) or ``"non-finite loss (nan)"`` and the like.
    part : str or None
        Which part of a composite fit: ``"member 2"``, ``"swag collect"``, ``"chain 1"``...
    """

    step: int
    reason: str
    part: str | None = None

    @property
    def interrupted(self) -> bool:
        return self.reason == "interrupted"

    def __str__(self) -> str:
        where = f"{self.part}, " if self.part else ""
        return f"{self.reason} ({where}step {self.step})"

    def __getitem__(self, key: str):
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key, default)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Rollback:
    """One rollback of ``on_nan="rollback"``: at ``step``, back to the last good state, with the
    learning rate ``lr`` from then on."""

    step: int
    lr: float

    def __getitem__(self, key: str):
        return getattr(self, key)


_TENSORS = ("loss", "member_loss", "map_loss")


@dataclass
class FitInfo:
    """What a fit reports about itself (see the module docstring for each field)."""

    loss: torch.Tensor | None = None
    member_loss: torch.Tensor | None = None
    steps_done: int | None = None
    converged: bool | None = None
    stopped: Stop | None = None
    rollbacks: list[Rollback] = field(default_factory=list)
    engine: str | None = None
    predictive: str = "sample"
    temperature: float | None = None
    temperature_nll: list[float] | None = None
    sample_stats: dict[str, torch.Tensor] | None = None
    num_divergences: int | None = None
    bayesian_sites: list[str] | None = None
    map_loss: torch.Tensor | None = None
    fit_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    # ---- derived -----------------------------------------------------------------------------
    @property
    def interrupted(self) -> bool:
        """Whether Ctrl-C ended the fit early."""
        return self.stopped is not None and self.stopped.interrupted

    # ---- read as a mapping -------------------------------------------------------------------
    def _fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name != "details"]

    def _present(self, name: str) -> bool:
        v = getattr(self, name)
        if name == "predictive":
            return True
        return v is not None and not (isinstance(v, list) and not v)

    def keys(self) -> list[str]:
        """Names of the fields that are set, then the method's ``details``."""
        return [n for n in self._fields() if self._present(n)] + list(self.details)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str):
        if key in self.details:
            return self.details[key]
        if key in self._fields() and self._present(key):
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: str, value) -> None:
        if key in self._fields():
            setattr(self, key, value)
        else:
            self.details[key] = value

    def setdefault(self, key: str, value):
        if key not in self:
            self[key] = value
        return self[key]

    def items(self):
        return [(k, self[k]) for k in self.keys()]

    # ---- plain values ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain values (tensors, numbers, strings, lists, dicts) for a file."""
        out: dict[str, Any] = {}
        for name in self._fields():
            if not self._present(name):
                continue
            v = getattr(self, name)
            if name == "stopped":
                v = v.to_dict()
            elif name == "rollbacks":
                v = [{"step": r.step, "lr": r.lr} for r in v]
            out[name] = v
        out.update(self.details)
        return out

    @classmethod
    def from_dict(cls, d: dict | None) -> FitInfo:
        """The inverse of :meth:`to_dict` (also reads the info dicts of older files)."""
        d = dict(d or {})
        kw: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"details"}
        for name in list(d):
            if name in names:
                kw[name] = d.pop(name)
        st = kw.get("stopped")
        if isinstance(st, dict):
            st = dict(st)
            part = st.pop("part", None)
            if part is None:  # older files: {"member": 1, "step": ..} or {"members": [...]}
                extra = {k: v for k, v in st.items() if k not in ("step", "reason")}
                part = ", ".join(f"{k} {v}" for k, v in extra.items()) or None
            kw["stopped"] = Stop(int(st.get("step", 0)), str(st.get("reason", "")), part)
        elif st is not None and not isinstance(st, Stop):
            kw["stopped"] = Stop(0, str(st))
        kw["rollbacks"] = [
            r if isinstance(r, Rollback) else Rollback(int(r["step"]), float(r["lr"]))
            for r in (kw.get("rollbacks") or [])
        ]
        if kw.get("predictive") is None:
            kw.pop("predictive", None)
        return cls(**kw, details=d)

    def replace(self, **changes) -> FitInfo:
        """A copy with some fields changed."""
        return dataclasses.replace(self, details=dict(self.details), **changes)

    def __repr__(self) -> str:
        return "FitInfo(" + ", ".join(f"{k}={_short(self[k])}" for k in self.keys()) + ")"


def _short(v) -> str:
    """A one-line summary of a field's value for ``repr``."""
    if isinstance(v, torch.Tensor):
        return f"tensor(shape={tuple(v.shape)})" if v.numel() > 1 else repr(float(v))
    if isinstance(v, dict):
        return "{" + ", ".join(map(str, v)) + "}"
    if isinstance(v, (list, tuple)) and len(v) > 3:
        return f"[{len(v)} items]"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_short(u) for u in v) + "]"
    if isinstance(v, float):
        return f"{v:.6g}"
    return repr(v)
