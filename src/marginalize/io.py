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

from marginalize._files import check_path, read_verified
from marginalize._validation import check_device
from marginalize.core.approximations import from_state
from marginalize.core.problem import prepare
from marginalize.errors import DataError, FileFormatError, ModelError
from marginalize.models.base import model_from_config
from marginalize.posterior import FORMAT, VERSION, Posterior, save_posterior

__all__ = ["save_posterior", "load"]


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
            problem = prepare(model, x, y, device=device, obs_site=payload.get("obs_site"))
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
        problem.model,  # a model function comes back with its contract (UserModel)
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
