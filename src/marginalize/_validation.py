"""Input checks at the public API boundary (the error types are in :mod:`marginalize.errors`).

Every check names the argument and says what was expected. Errors are subclasses of
``ValueError``/``TypeError`` so generic handlers keep working.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from marginalize.errors import DataError, OptionError

__all__ = [
    "as_tensor",
    "check_finite",
    "check_options",
    "check_seed",
    "check_device",
    "check_positive_int",
]


def as_tensor(
    name: str, value: Any, *, device=None, dtype=None, allow_int: bool = True
) -> torch.Tensor:
    """Convert arrays/lists to a tensor, keeping torch tensors' dtype and device unless asked.

    NumPy floating arrays become the torch default dtype (float32 unless changed).
    """
    if value is None:
        raise DataError(f"{name}: expected a numeric array, got None")
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        try:
            arr = np.asarray(value)
        except Exception as e:  # pragma: no cover - exotic inputs
            raise DataError(f"{name}: cannot be converted to an array ({e})") from e
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
        ):
            raise DataError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
        if not arr.flags.writeable:  # e.g. pandas >= 3 views: torch warns on sharing them
            arr = arr.copy()
        if np.issubdtype(arr.dtype, np.floating):
            t = torch.as_tensor(arr, dtype=torch.get_default_dtype())
        else:
            t = torch.as_tensor(arr)
    if t.is_complex():
        raise DataError(f"{name}: complex values are not supported")
    if not allow_int and not torch.is_floating_point(t):
        t = t.to(torch.get_default_dtype())
    if dtype is not None:
        t = t.to(dtype)
    if device is not None:
        t = t.to(device)
    return t


def check_finite(name: str, t: torch.Tensor) -> None:
    if torch.is_floating_point(t):
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(bad.sum()) - n_nan
            raise DataError(
                f"{name}: contains {n_nan} NaN and {n_inf} inf values; clean or impute them first"
            )


def check_x(
    name: str,
    x: Any,
    *,
    device=None,
    in_features: int | None = None,
    dtype=None,
    keep_int: bool = False,
) -> torch.Tensor:
    """Inputs as a tensor with a leading data dimension; integer inputs become ``dtype`` (the
    default float dtype) unless ``keep_int`` (e.g. token ids for ``nn.Embedding``)."""
    if keep_int:
        t = as_tensor(name, x, device=device)
        if dtype is not None and torch.is_floating_point(t):
            t = t.to(dtype)
    else:
        t = as_tensor(name, x, device=device, allow_int=False, dtype=dtype)
    if t.dim() == 0:
        raise DataError(
            f"{name}: expected an array of inputs with a leading data dimension, got a scalar"
        )
    if t.shape[0] == 0:
        raise DataError(f"{name}: is empty (0 rows)")
    if t.numel() == 0:
        raise DataError(f"{name}: has no values (shape {tuple(t.shape)})")
    check_finite(name, t)
    if in_features is not None:
        if t.dim() == 1 and in_features == 1:
            t = t[:, None]
        if t.dim() != 2 or t.shape[1] != in_features:
            raise DataError(
                f"{name}: the model takes inputs of shape (N, {in_features}), got {tuple(t.shape)}"
            )
    return t


def check_y(y: Any, n: int, *, device=None) -> torch.Tensor:
    t = as_tensor("y", y, device=device)
    if t.dim() == 0:
        raise DataError("y: expected one target per row of x, got a scalar")
    if t.shape[0] != n:
        raise DataError(f"y: has {t.shape[0]} rows but x has {n}; they must match")
    check_finite("y", t)
    return t


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise OptionError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_seed(name: str, value: Any) -> int:
    """A seed: an integer (Python or NumPy, not bool) in ``[0, 2**32 - 1]``."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or not 0 <= value < 2**32
    ):
        raise OptionError(f"{name}: expected an integer in [0, 2**32 - 1], got {value!r}")
    return int(value)


def check_device(device: Any) -> torch.device | None:
    """``None`` or a usable ``torch.device`` (``"cuda"`` only where CUDA is available)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise OptionError(f"device: expected e.g. 'cpu' or 'cuda', got {device!r}") from e
    if (dev.type == "cuda" and not torch.cuda.is_available()) or (
        dev.type == "mps" and not torch.backends.mps.is_available()
    ):
        raise OptionError(f"device: {device!r} was asked for but is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    return dev


def check_options(method: str, given: Mapping[str, Any], accepted: Mapping[str, Any]) -> None:
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(accepted), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise OptionError(
            f"method {method!r} does not take option(s) {', '.join(hints)}; "
            f"it accepts: {', '.join(sorted(accepted)) or '(none)'}"
        )
