"""Every exception type marginalize raises on purpose (the lowest layer: imports nothing).

All but :class:`FitError` are ``ValueError`` subclasses, so generic handlers keep working.

>>> import marginalize as mz
>>> issubclass(mz.DataError, ValueError), issubclass(mz.FitError, RuntimeError)
(True, True)
"""

__all__ = [
    "DataError",
    "ModelError",
    "OptionError",
    "FileFormatError",
    "FitError",
    "OutOfMemoryError",
    "is_out_of_memory",
    "ScaleWarning",
    "FitWarning",
    "PredictWarning",
    "warn",
]


class DataError(ValueError):
    """Bad data: wrong shape, dtype, NaN/inf, empty, labels out of range, length mismatch."""


class ModelError(ValueError):
    """The model does not follow the contract (no observed site, discrete latents, ...)."""


class OptionError(ValueError):
    """Unknown method name, or an option a method does not take or an invalid option value."""


class FileFormatError(ValueError):
    """A file that is not a marginalize file of the expected kind, is truncated or
    corrupted (its content does not match its SHA-256), or is from an incompatible version."""


class FitError(RuntimeError):
    """A fit could not continue (e.g. the loss became NaN and ``on_nan="raise"``)."""


class OutOfMemoryError(MemoryError):
    """A step ran out of memory (CPU or GPU); the message names the step and what to change.
    Raised instead of the allocator's error, never turned into a NaN or blamed on the model."""


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (``MemoryError``, torch's ``OutOfMemoryError``
    or the CPU allocator's "can't allocate memory" ``RuntimeError``)."""
    if isinstance(e, MemoryError):
        return True
    if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


class ScaleWarning(UserWarning):
    """The data are far from the scale of the model's priors (e.g. a target in the millions
    under unit-scale priors): the fit runs, but its posterior is likely to be confidently
    wrong; standardize the data or put the priors on their scale (``core/scales.py``)."""


class FitWarning(UserWarning):
    """A fit ran but the user must know how: it did not converge, rolled back after a
    non-finite loss, stopped early, fell back to a slower or cruder path, or saturated.
    Shown once per call site by Python's default filter, on stderr, with no logging set up;
    ``warnings.simplefilter("ignore", mz.FitWarning)`` silences it,
    ``warnings.simplefilter("error", mz.FitWarning)`` makes it an exception."""


class PredictWarning(UserWarning):
    """A prediction or an evaluation ran but the user must know how (e.g. a fallback to a
    loop over draws, non-finite predictions)."""


#: modules whose frames are skipped when :func:`warn` looks for the user's call: the package
#: itself, and the libraries it calls back through (Pyro's MCMC hooks, torch, context managers)
_INTERNAL = ("marginalize", "pyro", "torch", "contextlib", "functools", "threading")


def _user_stacklevel() -> int:
    """The ``stacklevel`` of ``warnings.warn`` (called from :func:`warn`) that names the
    first frame outside the package and the libraries it calls through: the user's line."""
    import sys

    # the caller of warn(); the stdlib has no public frame walk this cheap
    frame = sys._getframe(2)  # noqa: SLF001
    level = 2
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not any(name == m or name.startswith(m + ".") for m in _INTERNAL):
            return level
        frame = frame.f_back
        level += 1
    return 2


def warn(message: str, *args, category: type[Warning] = FitWarning) -> None:
    """``warnings.warn(message % args, category)`` attributed to the user's call: the first
    frame outside marginalize (and the libraries it calls through), so a script, a notebook
    cell or a test sees which of its lines caused it. Every user-facing warning of the package
    goes through here (``args`` as for ``logging``: ``warn("%s: %d steps", desc, n)``);
    logging keeps the detail.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     warn("%s: not converged after %d steps", "map", 5)
    >>> seen[0].category.__name__, str(seen[0].message)
    ('FitWarning', 'map: not converged after 5 steps')
    """
    import warnings

    text = message % args if args else message
    warnings.warn(text, category, stacklevel=_user_stacklevel())
