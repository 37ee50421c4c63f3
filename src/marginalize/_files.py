"""Safe, verified files of plain tensors: atomic writes, a SHA-256 over the content, safe reads.

Posterior files (``posterior.py``, ``io.py``) and checkpoints
(``inference/engines/checkpoint.py``) are a ``torch.save`` of a dict holding only tensors,
strings, numbers, ``None``, lists, tuples and dicts. Writing goes to a temporary file in the
same folder that is then renamed into place, so a crash never leaves a half-written file under
the real name. Reading uses ``torch.load(weights_only=True)`` (never executes code from the
file) and checks a SHA-256 digest of the content stored beside it, so a flipped byte inside
tensor data is caught as well as a truncated or foreign file.

Examples
--------
>>> import torch, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "f.pt")
>>> write_verified({"format": "demo", "version": 1, "x": torch.arange(3)}, path)
>>> read_verified(path, "demo", 1)["x"]
tensor([0, 1, 2])
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from marginalize.errors import FileFormatError

__all__ = ["digest", "write_verified", "read_verified", "check_path"]

#: key of the content digest inside a verified file
DIGEST_KEY = "sha256"


def _feed(h, obj: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``obj`` into the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(b)}:".encode() + b)
    elif isinstance(obj, bool) or obj is None:
        h.update(f"B{obj}".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj};".encode())
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())
    else:
        raise TypeError(
            f"cannot store a {type(obj).__name__} in a marginalize file (plain values only)"
        )


def digest(obj: Any) -> str:
    """SHA-256 (hex) of a nested structure of tensors and plain values.

    Equal content gives an equal digest whatever the dict order; any changed byte of any
    tensor, string or number changes it.
    """
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def check_path(path: Any, name: str = "path") -> Path:
    """``path`` as a :class:`~pathlib.Path`; a ``TypeError`` naming ``name`` otherwise."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{name}: expected a file path (str or os.PathLike), got {type(path).__name__}"
        )
    return Path(path)


def write_verified(payload: Mapping[str, Any], path) -> None:
    """Write ``payload`` plus its digest to ``path`` atomically (temporary file + rename)."""
    path = check_path(path)
    body = {k: v for k, v in payload.items() if k != DIGEST_KEY}
    body[DIGEST_KEY] = digest(body)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(body, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_verified(path, fmt: str, version: int, *, what: str = "marginalize file") -> dict:
    """Read a file written by :func:`write_verified` and check format, version and digest.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    FileFormatError
        Not a readable ``fmt`` file (truncated, corrupted, foreign, other version).
    """
    path = check_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise FileFormatError(f"{path}: is a folder, expected a {what}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FileFormatError(
            f"{path}: cannot be read as a {what} (truncated, corrupted, or not this format; "
            f"loading refuses anything but plain tensors): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise FileFormatError(f"{path}: not a {what} (format {fmt!r})")
    if payload.get("version") != version:
        raise FileFormatError(
            f"{path}: written by {what} format version {payload.get('version')!r}; this version of "
            f"marginalize reads version {version}"
        )
    stored = payload.pop(DIGEST_KEY, None)
    try:
        actual = digest(payload)
    except TypeError as e:
        raise FileFormatError(f"{path}: holds values a {what} never contains ({e})") from e
    if not isinstance(stored, str) or stored != actual:
        raise FileFormatError(
            f"{path}: the content does not match its SHA-256 checksum: the file is corrupted "
            "(changed after it was written)"
        )
    return payload
