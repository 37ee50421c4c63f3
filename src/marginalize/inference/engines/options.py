"""Method options, declared once: each option's default, check and meaning in one place.

A method's ``Options`` is a dataclass deriving from :class:`Options` whose fields are made by
:func:`option`::

    @dataclass
    class Options(TrainOptions):
        rank: int = option(10, integer(minimum=1), "rank of the covariance factor")

Creating the dataclass runs every field's check (which raises
:class:`~marginalize.errors.OptionError` naming the option, and may normalize the value), then
:meth:`Options.validate` for rules that tie several options together. ``mz.method_info()`` and
the methods table of the user guide read the defaults and the meanings from the same fields.

Examples
--------
>>> from dataclasses import dataclass
>>> @dataclass
... class Opts(Options):
...     steps: int = option(100, integer(minimum=1), "optimizer steps")
>>> Opts(steps=5).steps
5
>>> Opts(steps=0)
Traceback (most recent call last):
...
marginalize.errors.OptionError: steps: expected an integer >= 1, got 0
>>> Opts.docs()["steps"]
'optimizer steps'
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

from marginalize._validation import plain_number
from marginalize.errors import OptionError

__all__ = [
    "Options",
    "option",
    "integer",
    "number",
    "choice",
    "boolean",
    "either",
    "file_path",
    "names",
]

Check = Callable[[str, Any], Any]


def option(default: Any, check: Check | None = None, doc: str = "") -> Any:
    """A dataclass field with its ``check(name, value) -> value`` and its one-line meaning."""
    meta = {"check": check, "doc": doc}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class Options:
    """Base class of method options: runs each field's check, then :meth:`validate`."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            # numbers as users get them from arrays (np.int64, np.float32, 0-d arrays and
            # tensors) are the Python numbers they hold; the check then refuses non-numbers
            value = plain_number(getattr(self, f.name))
            check = f.metadata.get("check")
            setattr(self, f.name, value if check is None else check(f.name, value))
        self.validate()

    def validate(self) -> None:
        """Rules between options (override; raise ``OptionError``)."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

    @classmethod
    def docs(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def record(self) -> dict[str, Any]:
        """The options as plain values (what a posterior and a checkpoint store): values
        that are not plain (networks, tensors) become a short description."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        if all(x is None or isinstance(x, (str, int, float, bool)) for x in v):
            return list(v)
        return f"{len(v)} {type(v[0]).__name__ if v else 'item'}(s)"
    if isinstance(v, dict):
        if all(isinstance(x, (str, int, float, bool)) or x is None for x in v.values()):
            return dict(v)
        return f"dict of {len(v)}"
    return type(v).__name__


# ---- checks -----------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def integer(minimum: int = 0, maximum: int | None = None, *, optional: bool = False) -> Check:
    """An ``int`` in ``[minimum, maximum]`` (``None`` too, when ``optional``)."""
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    what = f"an integer {bound}" + (" or None" if optional else "")

    def check(name, v):
        if v is None and optional:
            return v
        if _is_int(v) and v >= minimum and (maximum is None or v <= maximum):
            return int(v)
        raise OptionError(f"{name}: expected {what}, got {v!r}")

    return check


def number(
    low: float = 0.0,
    high: float = math.inf,
    *,
    low_open: bool = True,
    high_open: bool = False,
    optional: bool = False,
) -> Check:
    """A finite real number between ``low`` and ``high`` (open or closed ends)."""
    lo = "(" if low_open else "["
    hi = ")" if high_open or math.isinf(high) else "]"
    if low == 0 and math.isinf(high) and low_open:
        what = "a finite number > 0"
    else:
        what = f"a finite number in {lo}{low:g}, {high:g}{hi}"
    if optional:
        what += " or None"

    def check(name, v):
        if v is None and optional:
            return v
        if _is_real(v) and math.isfinite(v):
            ok_lo = v > low if low_open else v >= low
            ok_hi = v < high if high_open else v <= high
            if ok_lo and ok_hi:
                return v
        raise OptionError(f"{name}: expected {what}, got {v!r}")

    return check


def choice(*values: Any) -> Check:
    """One of ``values`` (compared by equality, so ``None`` may be one)."""

    def check(name, v):
        for c in values:
            if (c is None and v is None) or (
                c is not None and isinstance(v, type(c)) and not isinstance(v, bool) and v == c
            ):
                return v
        raise OptionError(f"{name}: expected one of {', '.join(map(repr, values))}, got {v!r}")

    return check


def boolean() -> Check:
    def check(name, v):
        if isinstance(v, bool):
            return v
        raise OptionError(f"{name}: expected True or False, got {v!r}")

    return check


def either(*checks: Check, what: str) -> Check:
    """Accepted by one of ``checks``."""

    def check(name, v):
        for c in checks:
            try:
                return c(name, v)
            except OptionError:
                continue
        raise OptionError(f"{name}: expected {what}, got {v!r}")

    return check


def file_path() -> Check:
    """A file path (``str`` or ``os.PathLike``), or None."""

    def check(name, v):
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (str, os.PathLike)):
            raise OptionError(
                f"{name}: expected a file path (str or os.PathLike) or None, got {v!r}"
            )
        path = os.fspath(v)
        if not isinstance(path, str):
            raise OptionError(f"{name}: expected a text file path, got {v!r}")
        if not path or path.endswith((os.sep, "/")) or "\0" in path:
            raise OptionError(f"{name}: expected a file path, got {path!r}")
        return path

    return check


def names(*keywords: str) -> Check:
    """None, one of ``keywords``, or a non-empty list of non-empty names (site names...)."""

    def check(name, v):
        if v is None or (isinstance(v, str) and v in keywords):
            return v
        if isinstance(v, str) and v:
            return v
        if isinstance(v, (list, tuple)) and v and all(isinstance(s, str) and s for s in v):
            return list(v)
        words = ", ".join(repr(k) for k in keywords)
        raise OptionError(
            f"{name}: expected None, {words} or a non-empty list of site names or layer-name "
            f"prefixes, got {v!r}"
        )

    return check
