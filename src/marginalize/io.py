"""Saving and loading posteriors as plain tensors: loading never executes code from the file.

The file is a ``torch.save`` of a dict holding only tensors, strings, numbers, lists and
dicts, read back with ``torch.load(..., weights_only=True)``. Builder models are stored as
their config and rebuilt from a fixed table; a plain model function must be passed to
:func:`load` (code is never stored). Files are written atomically and carry a SHA-256 of their
content, checked on load, so a truncated or corrupted file raises :class:`FileFormatError`
instead of giving a wrong posterior (see :mod:`marginalize._files`).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from marginalize._files import FileFormatError, check_path, read_verified, write_verified
from marginalize._validation import DataError, ModelError, check_device
from marginalize.inference.approximations import from_state
from marginalize.inference.posterior import Posterior
from marginalize.inference.problem import prepare
from marginalize.models.base import BNN, model_from_config

__all__ = ["save_posterior", "load", "FileFormatError", "FORMAT", "VERSION"]

FORMAT = "marginalize.posterior"
#: 2: a SHA-256 of the content is stored beside it
VERSION = 2


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
    path = check_path(path)
    # builder models store their config; plain functions and bayesian(module) models (config()
    # is None) must be passed to load(path, model=...)
    cfg = post.model.config() if isinstance(post.model, BNN) else None
    model_cfg = json.dumps(cfg) if cfg is not None else None
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
    write_verified(payload, path)


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

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    FileFormatError
        Not a marginalize posterior, truncated or corrupted (checksum), or another version.
    ModelError
        ``model`` is missing (plain model functions) or does not fit the saved posterior.
    """
    path = check_path(path)
    device = check_device(device)
    payload = read_verified(path, FORMAT, VERSION, what="marginalize posterior file")
    user_model = model is not None
    try:
        if payload["model_config"] is not None:
            built = model_from_config(json.loads(payload["model_config"]))
            model = model if model is not None else built
        elif model is None:
            raise ModelError(
                f"model: {path} was fitted on a plain model function or a "
                "bayesian(module) model; pass it as "
                "load(path, model=...)"
            )
        data = payload["data"]
        dtype = getattr(torch, payload["dtype"])
        x, y = data["x"].to(device), data["y"].to(device)
        try:
            problem = prepare(model, x, y, device=device)
        except (DataError, ModelError) as e:
            if not user_model:
                raise FileFormatError(
                    f"{path}: the saved model and data are inconsistent ({e})"
                ) from e
            raise ModelError(f"model: does not fit the posterior saved in {path}: {e}") from e
        saved = json.loads(payload["layout"])
        if [(s["name"], s["shape"]) for s in saved] != [
            (s.name, list(s.shape)) for s in problem.layout.sites
        ]:
            if user_model:
                raise ModelError(
                    f"model: its latent sites do not match those of the posterior saved in {path}"
                )
            raise FileFormatError(
                f"{path}: the model's latent sites do not match the saved posterior"
            )
        approx = from_state(payload["approximation"])
        if approx.dim != problem.layout.size:
            raise FileFormatError(
                f"{path}: saved draws have {approx.dim} parameters, the model {problem.layout.size}"
            )
        if device is not None:
            approx = approx.to(device)
    except (FileFormatError, ModelError):
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError) as e:
        raise FileFormatError(
            f"{path}: incomplete or inconsistent posterior file ({type(e).__name__}: {e})"
        ) from e
    del dtype
    return Posterior(
        model,
        problem.layout,
        approx,
        method=payload["method"],
        task=payload["task"],
        options=json.loads(payload["options"]),
        info=payload["info"],
        seed=payload["seed"],
        data=(problem.x, problem.y),
        num_classes=payload["num_classes"],
    )
