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


class ScaleWarning(UserWarning):
    """The data are far from the scale of the model's priors (e.g. a target in the millions
    under unit-scale priors): the fit runs, but its posterior is likely to be confidently
    wrong; standardize the data or put the priors on their scale (``core/scales.py``)."""
