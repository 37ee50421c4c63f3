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
