"""Saving and loading posteriors as plain tensors: loading never executes code from the file.

The file is a ``torch.save`` of a dict holding only tensors, strings, numbers, lists and
dicts, read back with ``torch.load(..., weights_only=True)``. Builder models are stored as
their config and rebuilt from a fixed table; a plain model function must be passed to
:func:`load` (code is never stored).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from marginalize.inference.approximations import from_state
from marginalize.inference.posterior import Posterior
from marginalize.inference.problem import prepare
from marginalize.models.base import BNN, model_from_config

__all__ = ["save_posterior", "load", "FileFormatError", "FORMAT", "VERSION"]

FORMAT = "marginalize.posterior"
VERSION = 1


class FileFormatError(ValueError):
    """A file that is not a marginalize posterior, is truncated/corrupted, or is from an
    incompatible version."""


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_cpu(v) for v in obj]
    return obj


def _plain(obj):
    """Keep tensors and JSON-able values; drop what cannot be stored safely."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def save_posterior(post: Posterior, path) -> None:
    """Write ``post`` to ``path`` (atomically: a temporary file is renamed into place)."""
    path = Path(path)
    model_cfg = json.dumps(post.model.config()) if isinstance(post.model, BNN) else None
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": str(torch.__version__),
        "method": post.method,
        "task": post.task,
        "seed": post.seed,
        "num_classes": post.num_classes,
        "options": json.dumps(_plain(post.options)),
        "layout": json.dumps(post.layout.describe()),
        "model_config": model_cfg,
        "approximation": _to_cpu(post.approximation.state_dict()),
        "info": _plain(post.info),
        "data": None if post.data is None else {"x": post.data[0].cpu(), "y": post.data[1].cpu()},
        "dtype": str(post.dtype).replace("torch.", ""),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path, model: Callable | None = None, *, device=None) -> Posterior:
    """Load a posterior saved by :meth:`Posterior.save`.

    Parameters
    ----------
    path : str or Path
    model : callable, optional
        Required when the posterior was fitted on a plain model function (code is never
        stored in the file); builder models are rebuilt from their saved config.
    device : optional
        Where to put the draws (default: the CPU).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FileFormatError(
            f"{path}: cannot be read as a marginalize posterior (truncated, corrupted, or not "
            f"this format; loading refuses anything but plain tensors): {e}"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FileFormatError(f"{path}: not a marginalize posterior file")
    if payload.get("version") != VERSION:
        raise FileFormatError(
            f"{path}: written by file format version {payload.get('version')}, this marginalize "
            f"reads version {VERSION}"
        )
    try:
        if payload["model_config"] is not None:
            built = model_from_config(json.loads(payload["model_config"]))
            model = model if model is not None else built
        elif model is None:
            raise ValueError(
                f"{path}: the posterior was fitted on a plain model function; pass it as "
                "load(path, model=...)"
            )
        data = payload["data"]
        dtype = getattr(torch, payload["dtype"])
        x, y = data["x"].to(device), data["y"].to(device)
        problem = prepare(model, x, y, device=device)
        saved = json.loads(payload["layout"])
        if [(s["name"], s["shape"]) for s in saved] != [(s.name, list(s.shape)) for s in problem.layout.sites]:
            raise FileFormatError(f"{path}: the model's latent sites do not match the saved posterior")
        approx = from_state(payload["approximation"])
        if approx.dim != problem.layout.size:
            raise FileFormatError(f"{path}: saved draws have {approx.dim} parameters, the model {problem.layout.size}")
        if device is not None:
            approx = approx.to(device)
    except FileFormatError:
        raise
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: incomplete or inconsistent posterior file ({type(e).__name__}: {e})") from e
    del dtype
    return Posterior(
        model, problem.layout, approx, method=payload["method"], task=payload["task"],
        options=json.loads(payload["options"]), info=payload["info"], seed=payload["seed"],
        data=(problem.x, problem.y), num_classes=payload["num_classes"],
    )
