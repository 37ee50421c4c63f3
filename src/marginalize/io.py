"""Saving and loading posteriors as plain tensors: loading never executes code from the file.

The file is a ``torch.save`` of a dict holding only tensors, strings, numbers, lists and
dicts, read back with ``torch.load(..., weights_only=True)``. Builder models are stored as
their config and rebuilt from a fixed table; a plain model function must be passed to
:func:`load` (code is never stored). Files are written atomically and carry a SHA-256 of their
content, checked on load, so a truncated or corrupted file raises :class:`FileFormatError`
instead of giving a wrong posterior (see :mod:`marginalize._files`).

A file is untrusted input: every field is checked against what marginalize writes (types,
JSON fields, the approximation's kind, tensor shapes against the saved layout, dtypes, finite
values, the fit information that prediction and ArviZ read) before the model is built or any
tensor derived from the file is computed, so an edited or crafted file ends in
:class:`FileFormatError`, never in a raw exception later in ``predict``.

Examples
--------
>>> import os, tempfile, torch, marginalize as mz
>>> x = torch.linspace(-1, 1, 20)[:, None]; y = 2 * x[:, 0]
>>> post = mz.fit(mz.models.mlp(1, hidden=[]), x, y, method="map", steps=50, progress=False)
>>> folder = tempfile.mkdtemp()
>>> post.save(os.path.join(folder, "fit.pt"))
>>> again = mz.load(os.path.join(folder, "fit.pt"))
>>> bool(torch.equal(again.predict(x).mean, post.predict(x).mean))
True
>>> again.data is None  # the training data are written only with save(..., include_data=True)
True
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from marginalize._files import check_path, read_verified
from marginalize._isolation import exclusive
from marginalize._validation import check_device
from marginalize.core.approximations import from_state
from marginalize.core.data import ArrayData, as_data, is_loader
from marginalize.core.info import FitInfo
from marginalize.core.problem import prepare
from marginalize.errors import DataError, FileFormatError, ModelError
from marginalize.models.base import BNN, model_from_config
from marginalize.posterior import FORMAT, SAVE_NAME, VERSION, Posterior, save_posterior

__all__ = ["save_posterior", "load"]

_DTYPES = {"float16", "bfloat16", "float32", "float64"}
_TASKS = {"regression", "classification"}


def load(path, model: Callable | None = None, *, device=None, data=None) -> Posterior:
    """Load a posterior saved by :meth:`Posterior.save`.

    Parameters
    ----------
    path : str or Path
        The file, or a folder holding ``posterior.pt`` (what ``post.save(folder)`` writes).
    model : callable, optional
        Required when the posterior was fitted on a plain model function (code is never
        stored in the file); builder models are rebuilt from their saved config. A builder
        model given here must have the saved configuration.
    device : optional
        Where to put the draws (default: the CPU).
    data : (x, y) or data loader, optional
        The training data, for a file saved without them (``save(path)``, the default) when
        something needs them: a stateful network's BatchNorm update, the training groups of
        ``to_arviz``, PSIS k-hat. A file saved with ``include_data=True`` has its own.

    Returns
    -------
    Posterior

    Raises
    ------
    TypeError
        ``path`` is not a ``str``/``os.PathLike``.
    FileNotFoundError
        No file at ``path``.
    FileFormatError
        Not a marginalize posterior, truncated or corrupted (checksum), another version, or a
        field that marginalize never writes (an edited or crafted file).
    ModelError
        ``model`` is missing (plain model functions), has another configuration than the
        saved builder model, or does not fit the saved posterior.
    """
    path = _locate(path)
    device = check_device(device)
    payload = read_verified(path, FORMAT, VERSION, what="marginalize posterior file")
    f = _Fields(path, payload)
    user_model = model is not None
    source, (px, py) = _training_data(f, data, device)
    with exclusive():  # prepare() traces the model: Pyro's globals (marginalize._isolation)
        if f.model_config is not None:
            built = _build(path, f)
            if model is None:
                model = built
            elif isinstance(model, BNN) and model.config() is not None:
                if _canonical(model.config()) != _canonical(f.model_config):
                    raise ModelError(
                        f"model: its configuration differs from the one saved in {path} "
                        f"({_config_diff(model.config(), f.model_config)}); pass the same "
                        "model, or none to rebuild the saved one"
                    )
        elif model is None:
            raise ModelError(
                f"model: {path} was fitted on a plain model function or a bayesian(module) "
                "model; pass it as load(path, model=...)"
            )
        try:
            problem = prepare(
                model, px.to(device), py.to(device), device=device, obs_site=f.obs_site
            )
        except (DataError, ModelError) as e:
            if not user_model:
                raise FileFormatError(
                    f"{path}: the saved model and data are inconsistent ({e})"
                ) from e
            raise ModelError(f"model: does not fit the posterior saved in {path}: {e}") from e
    now = [(s.name, list(s.shape)) for s in problem.layout.sites]
    if [(s["name"], s["shape"]) for s in f.layout] != now:
        if user_model:
            raise ModelError(
                f"model: its latent sites do not match those of the posterior saved in {path}"
            )
        raise FileFormatError(f"{path}: the model's latent sites do not match the saved posterior")
    if f.info.get("predictive") == "glm" and f.approximation["kind"] not in (
        "delta",
        "gaussian",
        "kronecker",
        "dropout",
    ):
        raise FileFormatError(
            f"{path}: info['predictive'] is 'glm', which needs an approximation with a mean"
        )
    try:
        approx = from_state(f.approximation)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise FileFormatError(f"{path}: inconsistent approximation ({e})") from e
    if device is not None:
        approx = approx.to(device)
    try:
        info = FitInfo.from_dict(f.info)
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{path}: inconsistent info ({e})") from e
    if isinstance(source, ArrayData):  # in the model's own form (prepare's checks)
        post_data = (problem.x, problem.y)
    else:
        post_data = source
    state = None if f.state is None else {k: v.to(device) for k, v in f.state.items()}
    post = Posterior(
        problem.model,  # a model function comes back with its contract (UserModel)
        problem.layout,
        approx,
        method=f.method,
        task=f.task,
        options=f.options,
        info=info,
        seed=f.seed,
        data=post_data,
        num_classes=f.num_classes,
        state=state,
        example=(problem.x[:2], problem.y[:2]),
    )
    _check_values(path, post)
    return post


#: draws and training rows a loaded posterior is tried on
CHECK_DRAWS, CHECK_ROWS = 8, 4


def _check_values(path: Path, post: Posterior) -> None:
    """The loaded approximation's values in range: a few draws give finite site values and
    finite predictions on a few training rows (an edited file whose every field is finite
    can still hold a scale of 1e10 for a noise site's log, which is ``exp(1e10) = inf``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heavy tails etc.: only finiteness is judged here
        z = post.sample_flat(CHECK_DRAWS, seed=0)
        for name, v in post.layout.unpack(z).items():
            if not bool(torch.isfinite(v).all()):
                raise FileFormatError(
                    f"{path}: its draws give non-finite values of site {name!r} (values out of "
                    "range for the model: not a posterior marginalize wrote, or one of a fit "
                    "that diverged)"
                )
        src = post.predictive.data
        rows = post.example[0] if src is None else src.example(CHECK_ROWS)[0]
        pred = post.predict(rows[:CHECK_ROWS], num_samples=CHECK_DRAWS, seed=0, bn_update=False)
    parts = [pred.probs] if pred.task == "classification" else [pred.mean, pred.std]
    if not all(bool(torch.isfinite(p).all()) for p in parts if p is not None):
        raise FileFormatError(
            f"{path}: its draws give non-finite predictions on the training inputs (values out "
            "of range for the model: not a posterior marginalize wrote, or one of a fit that "
            "diverged)"
        )


def _training_data(f: _Fields, data, device):
    """The training data (``data``, else the file's own, else None) and the rows the model is
    traced on: all of in-memory data (checked by ``prepare``), else two rows."""
    source = None
    if data is not None:
        if is_loader(data):
            source = as_data(data)
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            source = as_data(*data)
        else:
            raise DataError("data: expected (x, y) arrays or a data loader of (x, y) batches")
    elif f.x is not None:
        source = ArrayData(f.x.to(device), f.y.to(device))
    if isinstance(source, ArrayData):
        return source, (source.x, source.y)
    return source, (f.example if source is None else source.example(2))


def _locate(path) -> Path:
    """The file to read: ``path``, or ``path/posterior.pt`` for a folder that holds one."""
    p = check_path(path)
    if p.is_dir() and (p / SAVE_NAME).is_file():
        return p / SAVE_NAME
    return path if isinstance(path, str) and not path else p


def _canonical(cfg: Any) -> str:
    return json.dumps(cfg, sort_keys=True)


def _config_diff(given: dict, saved: dict) -> str:
    """``key: given here, saved in the file`` for every top-level key that differs."""
    keys = sorted(set(given) | set(saved))
    diff = [
        f"{k}: {given.get(k)!r} here, {saved.get(k)!r} saved"
        for k in keys
        if _canonical(given.get(k)) != _canonical(saved.get(k))
    ]
    return "; ".join(diff)


def _build(path: Path, f: _Fields) -> BNN:
    """The saved builder model, after checking that its parameters are in the file (a file
    of a few bytes must not make a model of billions of weights)."""
    try:
        built = model_from_config(f.model_config)
    except (ModelError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise FileFormatError(f"{path}: its model configuration cannot be rebuilt ({e})") from e
    try:
        weights = sum(
            math.prod(s.weight_shape) + (math.prod(s.bias_shape) if s.bias_shape else 0)
            for s in built.layer_specs()
        )
    except (NotImplementedError, AttributeError, TypeError):
        weights = 0
    if weights > f.size:
        raise FileFormatError(
            f"{path}: its model configuration has {weights} weights but the file holds "
            f"draws of {f.size} parameters"
        )
    return built


class _Fields:
    """The checked fields of a posterior file (raise FileFormatError on anything else)."""

    def __init__(self, path: Path, payload: dict):
        self.path = path
        p = payload
        self.method = self._str(p, "method")
        self.task = self._str(p, "task")
        if self.task not in _TASKS:
            self.fail(f"task {self.task!r} is not one of {sorted(_TASKS)}")
        self.seed = p.get("seed")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**32):
            self.fail(f"seed {self.seed!r} is not an integer in [0, 2**32 - 1]")
        self.num_classes = p.get("num_classes")
        if self.task == "classification":
            if not (_is_int(self.num_classes) and 2 <= self.num_classes <= 2**31):
                self.fail(f"num_classes {self.num_classes!r} is not a class count")
        elif self.num_classes is not None:
            self.fail("num_classes is set for a regression fit")
        self.options = self._json(p, "options", dict)
        self.layout = self._json(p, "layout", list)
        self.size = 0
        for s in self.layout:
            if not (
                isinstance(s, dict)
                and isinstance(s.get("name"), str)
                and isinstance(s.get("shape"), list)
                and all(_is_int(k) and 0 <= k <= 2**62 for k in s["shape"])
            ):
                self.fail("layout entries are not {'name': str, 'shape': [int, ...]}")
            self.size += math.prod(s["shape"])
        if not self.layout:
            self.fail("the layout has no latent sites")
        self.model_config = None
        if p.get("model_config") is not None:
            self.model_config = self._json(p, "model_config", dict)
        dtype = p.get("dtype")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            self.fail(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        self.dtype = getattr(torch, dtype)
        self.x, self.y = self._rows(p.get("data"), "training data")
        self.example = None
        if p.get("example") is not None:
            self.example = self._rows(p.get("example"), "example rows")
        if self.x is None and self.example is None:
            self.fail("neither the training data nor example rows are stored")
        self.state = None
        state = p.get("state")
        if state is not None:
            if not (
                isinstance(state, dict)
                and all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
                )
            ):
                self.fail("the network's state is not a dict of named tensors")
            for k, v in state.items():
                if v.is_complex() or (v.is_floating_point() and not bool(torch.isfinite(v).all())):
                    self.fail(f"the network's state {k!r} holds non-finite values")
            self.state = state
        self.approximation = self._approx(p.get("approximation"), nested=False)
        self.obs_site = p.get("obs_site")
        if self.obs_site is not None and not (isinstance(self.obs_site, str) and self.obs_site):
            self.fail(f"obs_site {self.obs_site!r} is not a site name")
        self.info = p.get("info")
        if not isinstance(self.info, dict):
            self.fail("info is not a dict")
        self._check_info()

    def fail(self, what: str):
        raise FileFormatError(f"{self.path}: not a posterior marginalize wrote: {what}")

    def _rows(self, data: Any, what: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(x, y)`` tensors of ``data`` (``{"x", "y"}``), or ``(None, None)`` for None."""
        if data is None:
            return None, None
        if not (
            isinstance(data, dict)
            and isinstance(data.get("x"), torch.Tensor)
            and isinstance(data.get("y"), torch.Tensor)
        ):
            self.fail(f"the {what} are not (x, y) tensors")
        x, y = data["x"], data["y"]
        for name, t in (("x", x), ("y", y)):
            if t.dim() == 0 or t.shape[0] < 1 or t.is_complex() or t.dtype == torch.bool:
                self.fail(f"the {what}' {name} has shape {tuple(t.shape)}, dtype {t.dtype}")
        if x.shape[0] != y.shape[0]:
            self.fail(f"the {what}' x and y have different numbers of rows")
        return x, y

    def _str(self, p: dict, key: str) -> str:
        v = p.get(key)
        if not isinstance(v, str) or not v:
            self.fail(f"{key} is not a non-empty string")
        return v

    def _json(self, p: dict, key: str, kind: type):
        raw = self._str(p, key)
        try:
            v = json.loads(raw)
        except (ValueError, RecursionError) as e:
            self.fail(f"{key} is not valid JSON ({e})")
        if not isinstance(v, kind):
            self.fail(f"{key} is not a JSON {kind.__name__}")
        return v

    def _tensor(
        self,
        t: Any,
        what: str,
        shape: tuple,
        *,
        floating: bool = True,
        low: float | None = None,
        positive: bool = False,
    ) -> torch.Tensor:
        """A tensor of ``shape`` (``None`` entries: any size >= 1) in the file's dtype, its
        values finite and within what the dtype's arithmetic can square (a fitted value never
        is beyond; its square would overflow in any log density), at least ``low``, and
        above 0 when ``positive``."""
        if not isinstance(t, torch.Tensor):
            self.fail(f"{what} is not a tensor")
        ok = t.dim() == len(shape) and all(
            (k is None and n >= 1) or n == k for n, k in zip(t.shape, shape, strict=False)
        )
        if not ok:
            want = tuple("*" if k is None else k for k in shape)
            self.fail(f"{what} has shape {tuple(t.shape)}, expected {want}")
        if floating:
            if t.dtype != self.dtype:
                self.fail(f"{what} has dtype {t.dtype}, the file says {self.dtype}")
            if not bool(torch.isfinite(t).all()):
                self.fail(f"{what} holds non-finite values")
            if t.numel():
                big, limit = float(t.abs().max()), math.sqrt(torch.finfo(t.dtype).max)
                if big > limit:
                    self.fail(
                        f"{what} holds values up to {big:.3g}, beyond what {str(t.dtype)[6:]} "
                        f"arithmetic can square ({limit:.3g})"
                    )
                if low is not None and float(t.min()) < low:
                    self.fail(f"{what} holds values below {low:g} ({float(t.min()):.3g})")
                if positive and not bool((t > 0).all()):
                    self.fail(f"{what} holds values that are not positive")
        elif t.dtype != torch.int64:
            self.fail(f"{what} has dtype {t.dtype}, expected torch.int64")
        return t

    def _approx(self, state: Any, *, nested: bool) -> dict:
        d = self.size
        if not isinstance(state, dict) or not isinstance(state.get("tensors"), dict):
            self.fail("the approximation is not {'kind', 'tensors', 'extra'}")
        kind, t, extra = state.get("kind"), state["tensors"], state.get("extra", {})
        if not isinstance(extra, dict):
            self.fail("the approximation's extra is not a dict")
        allowed = {
            "delta": {"loc"},
            "gaussian": {"loc", "scale", "cov_factor", "scale_tril", "idx"},
            "dropout": {"loc", "unit"},
            "empirical": {"draws"},
            "mixture": {"components"},
            "kronecker": {"loc", "scale", "blocks"},
        }
        if not isinstance(kind, str) or kind not in allowed or (nested and kind == "mixture"):
            self.fail(f"unknown approximation kind {kind!r}")
        if not set(t) <= allowed[kind]:
            self.fail(f"a {kind} approximation holds {sorted(set(t) - allowed[kind])}")
        if kind in ("delta", "gaussian", "dropout", "kronecker"):
            self._tensor(t.get("loc"), f"{kind} loc", (d,))
        if kind == "gaussian":
            if "scale" not in t and "scale_tril" not in t:
                self.fail("a gaussian approximation needs scale or scale_tril")
            if "scale" in t:
                self._tensor(t["scale"], "gaussian scale", (d,), low=0.0)
            if "cov_factor" in t:
                if "scale" not in t:
                    self.fail("a gaussian cov_factor needs scale")
                rows = d
                if "idx" in t:
                    idx = self._tensor(t["idx"], "gaussian idx", (None,), floating=False)
                    rows = idx.shape[0]
                    if rows and (int(idx.min()) < 0 or int(idx.max()) >= d):
                        self.fail("gaussian idx is out of range")
                self._tensor(t["cov_factor"], "gaussian cov_factor", (rows, None))
            elif "idx" in t:
                self.fail("a gaussian idx needs cov_factor")
            if "scale_tril" in t:
                tril = self._tensor(t["scale_tril"], "gaussian scale_tril", (d, d))
                if d and not bool((tril.diagonal() > 0).all()):
                    self.fail("gaussian scale_tril has a diagonal that is not positive")
                if d and bool(torch.triu(tril, 1).ne(0).any()):
                    self.fail("gaussian scale_tril is not lower triangular")
        elif kind == "dropout":
            unit = self._tensor(t.get("unit"), "dropout unit", (d,), floating=False)
            units, p = extra.get("num_units"), extra.get("p")
            if not (_is_int(units) and 0 <= units <= d):
                self.fail(f"dropout num_units {units!r} is not in [0, {d}]")
            if not (_is_real(p) and 0 <= p < 1):
                self.fail(f"dropout p {p!r} is not in [0, 1)")
            if d and (int(unit.min()) < -1 or int(unit.max()) >= units):
                self.fail("dropout units are out of range")
        elif kind == "empirical":
            self._tensor(t.get("draws"), "empirical draws", (None, None, d))
        elif kind == "kronecker":
            self._tensor(t.get("scale"), "kronecker scale", (d,), low=0.0)
            blocks = t.get("blocks")
            if not isinstance(blocks, list):
                self.fail("kronecker blocks are not a list")
            for b in blocks:
                if not isinstance(b, dict) or set(b) != {"idx", "qa", "qg", "s"}:
                    self.fail("a kronecker block is not {'idx', 'qa', 'qg', 's'}")
                s = self._tensor(b["s"], "kronecker s", (None, None), low=0.0)
                a, g = s.shape
                for name, q, k in (("qa", b["qa"], a), ("qg", b["qg"], g)):
                    q = self._tensor(q, f"kronecker {name}", (k, k))
                    # eigenvectors: orthonormal columns (within float rounding)
                    eye = torch.eye(k, dtype=torch.float64)
                    if float((q.double().T @ q.double() - eye).abs().max()) > 1e-2:
                        self.fail(f"kronecker {name} is not orthonormal")
                idx = self._tensor(b["idx"], "kronecker idx", (a * g,), floating=False)
                if int(idx.min()) < 0 or int(idx.max()) >= d:
                    self.fail("kronecker block indices are out of range")
        elif kind == "mixture":
            comps, kinds, extras = t.get("components"), extra.get("kinds"), extra.get("extras")
            if not (
                isinstance(comps, list)
                and isinstance(kinds, list)
                and isinstance(extras, list)
                and 1 <= len(comps) == len(kinds) == len(extras)
            ):
                self.fail("a mixture needs as many components, kinds and extras (at least one)")
            for c, k, e in zip(comps, kinds, extras, strict=True):
                self._approx({"kind": k, "tensors": c, "extra": e}, nested=True)
        return state

    def _chains(self) -> tuple[int, int | None]:
        """Chains of the approximation, and stored draws per chain (MCMC)."""
        a = self.approximation
        if a["kind"] == "mixture":
            return len(a["tensors"]["components"]), None
        if a["kind"] == "empirical":
            c, s, _ = a["tensors"]["draws"].shape
            return c, s
        return 1, None

    def _check_info(self) -> None:
        """The fields of ``info`` that prediction, ArviZ and the report read."""
        info = self.info
        t = info.get("temperature")
        if t is not None and not (_is_real(t) and 0 < t < math.inf):
            self.fail(f"info['temperature'] {t!r} is not a positive number")
        if info.get("predictive") not in (None, "sample", "glm"):
            self.fail(f"info['predictive'] {info.get('predictive')!r} is not 'sample' or 'glm'")
        loss = info.get("loss")
        if loss is not None and not (
            (isinstance(loss, torch.Tensor) and loss.dim() in (1, 2) and not loss.is_complex())
            or (isinstance(loss, list) and all(_is_real(v) for v in loss))
        ):
            self.fail("info['loss'] is not a 1-D or 2-D array of numbers")
        steps = info.get("steps_done")
        if "steps_done" in info and not (_is_int(steps) and steps >= 0):
            self.fail(f"info['steps_done'] {steps!r} is not a count")
        stats = info.get("sample_stats")
        if stats is not None:
            chains, draws = self._chains()
            if not isinstance(stats, dict) or draws is None:
                self.fail("info['sample_stats'] is not a dict of (chain, draw) tensors of MCMC")
            for k, v in stats.items():
                if not (
                    isinstance(v, torch.Tensor)
                    and tuple(v.shape) == (chains, draws)
                    and not v.is_complex()
                ):
                    self.fail(f"info['sample_stats'][{k!r}] is not a ({chains}, {draws}) tensor")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
