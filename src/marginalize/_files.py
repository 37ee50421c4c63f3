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
import errno
import hashlib
import io
import os
import pickletools
import stat
import threading
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from marginalize.errors import FileFormatError

__all__ = [
    "digest",
    "write_verified",
    "read_verified",
    "check_path",
    "check_save_path",
    "atomic_write",
    "write_text",
    "write_bytes",
]

#: key of the content digest inside a verified file
DIGEST_KEY = "sha256"


def _feed(h, obj: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``obj`` into the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # a buffer: no copy
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


def _oserror(cls: type[OSError], code: int | None, message: str) -> OSError:
    """``cls(message)`` with ``errno`` set (its text is the message alone, no ``[Errno n]``)."""
    e = cls(message)
    e.errno = code
    return e


def check_save_path(path: Any, name: str = "path", *, default_name: str | None = None) -> Path:
    """The file a write to ``path`` goes to, checked before any work is done.

    With ``default_name``, a folder-like ``path`` (ending in a separator, or an existing
    folder) means ``path/default_name``; a missing last folder of such a path is created (its
    parent must exist). Without it, a folder-like path is an error.

    Raises
    ------
    TypeError
        Not a ``str``/``os.PathLike``.
    IsADirectoryError
        Empty, or folder-like without ``default_name``.
    FileNotFoundError
        Its folder does not exist.
    NotADirectoryError
        Its "folder" is a file.
    FileExistsError
        Something other than a regular file (a FIFO, a device, a socket) is already there.
    PermissionError
        Its folder is not writable.
    """
    check_path(path, name)
    raw = os.fspath(path)  # not via Path, which drops a trailing separator and turns "" into "."
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if raw == "":
        raise _oserror(
            IsADirectoryError,
            errno.EISDIR,
            f"{name}: is empty; give a file name such as 'posterior.pt'",
        )
    p = Path(raw)
    folder_like = raw.endswith(os.sep) or bool(os.altsep and raw.endswith(os.altsep))
    if folder_like or p.is_dir():
        if default_name is None:
            raise _oserror(
                IsADirectoryError,
                errno.EISDIR,
                f"{name}: {raw!r} names a folder, not a file; give a file name such as "
                f"{os.path.join(raw, 'fit.ckpt')!r}",
            )
        if not p.exists() and p.parent.is_dir():
            p.mkdir()
        p = p / default_name
    folder = p.parent
    if not folder.exists():
        raise _oserror(
            FileNotFoundError,
            errno.ENOENT,
            f"{name}: the folder {str(folder)!r} does not exist; create it first "
            "(os.makedirs(folder, exist_ok=True))",
        )
    if not folder.is_dir():
        raise _oserror(
            NotADirectoryError, errno.ENOTDIR, f"{name}: {str(folder)!r} is not a folder"
        )
    if p.is_dir():
        raise _oserror(
            IsADirectoryError, errno.EISDIR, f"{name}: {str(p)!r} is a folder, not a file"
        )
    if p.exists() and not p.is_file():
        raise _oserror(
            FileExistsError,
            errno.EEXIST,
            f"{name}: {str(p)!r} exists and is not a regular file ({_kind(p)}); "
            "marginalize writes only regular files",
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _oserror(
            PermissionError, errno.EACCES, f"{name}: the folder {str(folder)!r} is not writable"
        )
    return p


def _kind(p: Path) -> str:
    mode = os.stat(p).st_mode
    for test, word in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return word
    return "not a regular file"


def _compact(obj: Any) -> Any:
    """Tensors as dense CPU tensors owning exactly their bytes (what :func:`read_verified`
    accepts: no views into larger storages, no expanded or overlapping strides)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.layout != torch.strided:
            raise TypeError(f"cannot store a {t.layout} tensor in a marginalize file")
        t = t.contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
            t = t.clone()
        return t
    if isinstance(obj, Mapping):
        return {k: _compact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_compact(v) for v in obj)
    return obj


class _Sink:
    """The file object ``torch.save`` writes through, keeping the ``OSError`` a write raised:
    torch's zip writer turns it into a ``RuntimeError`` ("unexpected pos ...") that has lost
    the errno (a full disk, a file-size limit)."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


@contextlib.contextmanager
def _file_size_signal_ignored():
    """``SIGXFSZ`` ignored while writing (main thread, where it is at its default, which ends
    the process): past a file-size limit (``ulimit -f``) the write then fails with ``EFBIG``
    and becomes an ``OSError`` naming the path. Python ignores it already unless told not to."""
    import signal

    sig = getattr(signal, "SIGXFSZ", None)
    if sig is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        old = signal.getsignal(sig)
    except (ValueError, OSError):  # pragma: no cover - no signals here
        yield
        return
    if old is not signal.SIG_DFL:
        yield
        return
    signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(sig, old)


def atomic_write(path, write: Callable[[Any], None]) -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file in ``path``'s folder (a
    binary file object), which is flushed to disk and renamed onto ``path``.

    Every writer of the package goes through here, so a failed write (a full disk, a
    file-size limit, an unplugged drive) leaves the old file at ``path`` intact and no
    temporary file behind, and raises an ``OSError`` of the same kind (``errno`` kept) whose
    message names ``path``: ``.../fit.pt: cannot be written (File too large)``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with _file_size_signal_ignored():
            with open(tmp, "wb") as f:
                sink = _Sink(f)
                try:
                    write(sink)
                except OSError:
                    raise
                except Exception as e:  # a writer that wrapped the OSError of a write
                    if sink.error is not None:
                        raise sink.error from e
                    raise
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _oserror(type(e), e.errno, f"{path}: cannot be written ({_reason(e)})") from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _reason(e: OSError) -> str:
    if e.strerror:
        return e.strerror
    if e.errno is not None:
        return os.strerror(e.errno)
    return str(e) or type(e).__name__


def write_text(path, text: str) -> None:
    """``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def write_bytes(path, data: bytes) -> None:
    """``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def write_verified(payload: Mapping[str, Any], path) -> None:
    """Write ``payload`` plus its digest to ``path`` atomically (temporary file + rename).

    The path is checked first (:func:`check_save_path`); an ``OSError`` while writing (a full
    disk, a file-size limit) names ``path``, not the temporary file, and leaves the old file
    intact (:func:`atomic_write`).
    """
    path = check_save_path(path)
    body = {k: _compact(v) for k, v in payload.items() if k != DIGEST_KEY}
    body[DIGEST_KEY] = digest(body)
    atomic_write(path, lambda f: torch.save(body, f))


#: deepest nesting of containers a verified file may hold (marginalize writes fewer than 10)
MAX_DEPTH = 32
#: most pickle opcodes (each makes at most one object, ~100 bytes at worst) of a verified
#: file's structure: marginalize's files have a few thousand; this bounds what unpickling can
#: allocate (tens of MB) whatever the file's size
MAX_PICKLE_OPS = 2**20


def _read_regular(path: Path, what: str) -> bytes:
    """The bytes of a regular file; never blocks on a FIFO or reads a device."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise FileFormatError(f"{path}: is a folder, expected a {what}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise FileFormatError(f"{path}: is a folder, expected a {what}")
        if not stat.S_ISREG(info.st_mode):
            raise FileFormatError(
                f"{path}: is {_kind(path)}, not a regular file; expected a {what}"
            )
        size = info.st_size
        chunks, got = [], 0
        while got < size:
            b = os.read(fd, min(size - got, 1 << 24))
            if not b:
                break
            chunks.append(b)
            got += len(b)
    finally:
        os.close(fd)
    if got != size:
        raise FileFormatError(f"{path}: changed while it was read")
    return b"".join(chunks)


def _check_archive(path: Path, data: bytes, what: str) -> None:
    """A torch zip archive whose records are stored (not compressed) and do not overlap, so
    loading allocates no more than the file's own size."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            records = z.infolist()
    except Exception as e:  # BadZipFile, NotImplementedError, ... on a damaged directory
        raise FileFormatError(
            f"{path}: cannot be read as a {what} (truncated, corrupted, or not the zip archive "
            f"torch.save writes: {type(e).__name__}: {e})"
        ) from None
    total = 0
    for r in records:
        if r.compress_type != zipfile.ZIP_STORED:
            raise FileFormatError(f"{path}: has compressed records; not a {what}")
        total += r.file_size
    if total > len(data):
        raise FileFormatError(
            f"{path}: its records claim {total} bytes in a file of {len(data)}; not a {what}"
        )
    pickles = [r for r in records if r.filename.endswith("data.pkl")]
    if len(pickles) != 1:
        raise FileFormatError(f"{path}: not a {what} (no single data.pkl record)")
    start = pickles[0].header_offset
    # the local header: 30 bytes, then the name and the extra field, then the stored bytes
    name_len = int.from_bytes(data[start + 26 : start + 28], "little")
    extra_len = int.from_bytes(data[start + 28 : start + 30], "little")
    body = start + 30 + name_len + extra_len
    ops = 0
    try:
        for _ in pickletools.genops(data[body : body + pickles[0].file_size]):
            ops += 1
            if ops > MAX_PICKLE_OPS:
                raise FileFormatError(
                    f"{path}: its structure has more than {MAX_PICKLE_OPS} parts; not a {what}"
                )
    except FileFormatError:
        raise
    except Exception as e:  # malformed pickle: torch.load would refuse it as well
        raise FileFormatError(
            f"{path}: cannot be read as a {what} (a damaged structure: {type(e).__name__}: {e})"
        ) from None


def _check_structure(path: Path, obj: Any, what: str) -> None:
    """Plain values only, nested at most ``MAX_DEPTH`` deep, no container reached twice (a
    shared reference makes a tiny file a huge tree), tensors dense and within their storage."""
    seen: set[int] = set()
    todo = [(obj, 0)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, torch.Tensor):
            if node.layout != torch.strided or node.is_quantized:
                raise FileFormatError(f"{path}: holds a {node.layout} tensor; not a {what}")
            need = node.numel() * node.element_size()
            if need > node.untyped_storage().nbytes():
                raise FileFormatError(
                    f"{path}: a tensor of shape {tuple(node.shape)} claims more values than "
                    f"its storage holds; not a {what}"
                )
            continue
        if isinstance(node, (Mapping, list, tuple)):
            if depth >= MAX_DEPTH:
                raise FileFormatError(
                    f"{path}: nested more than {MAX_DEPTH} levels deep; not a {what}"
                )
            if len(node):
                if id(node) in seen:
                    raise FileFormatError(
                        f"{path}: holds shared references (a value reached twice); not a {what}"
                    )
                seen.add(id(node))
            if isinstance(node, Mapping):
                for k, v in node.items():
                    if not isinstance(k, (str, int)) or isinstance(k, bool):
                        raise FileFormatError(f"{path}: holds a key of type {type(k).__name__}")
                    todo.append((v, depth + 1))
            else:
                todo.extend((v, depth + 1) for v in node)
            continue
        if node is None or isinstance(node, (bool, int, float, str)):
            continue
        raise FileFormatError(
            f"{path}: holds a {type(node).__name__}, which a {what} never contains"
        )


def _equal_plain(value: Any, want: str | int) -> bool:
    """``value == want`` for a value of ``want``'s own type only (a tensor never compares)."""
    return type(value) is type(want) and value == want


def read_verified(path, fmt: str, version: int, *, what: str = "marginalize file") -> dict:
    """Read a file written by :func:`write_verified` and check format, version and digest.

    The file is untrusted: it is read only if it is a regular file (never blocks on a FIFO or
    device), its zip records must be stored and fit in the file, it is unpickled with
    ``torch.load(weights_only=True)`` (plain tensors and values, no code), and its structure
    is checked (depth, shared references, tensors within their storage) before the digest is
    computed. Memory stays within a small multiple of the file's size.

    Raises
    ------
    TypeError
        ``path`` is not a ``str``/``os.PathLike``.
    FileNotFoundError
        No file at ``path`` (or an empty path).
    FileFormatError
        Not a readable ``fmt`` file (a folder or other non-regular file, truncated, corrupted,
        crafted, foreign, other version).
    """
    if isinstance(path, (str, bytes)) and not path:
        raise _oserror(FileNotFoundError, errno.ENOENT, "path: is empty; expected a file")
    path = check_path(path)
    if not path.exists():
        raise _oserror(FileNotFoundError, errno.ENOENT, f"no such file: {path}")
    data = _read_regular(path, what)
    _check_archive(path, data, what)
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise FileFormatError(
            f"{path}: cannot be read as a {what} (truncated, corrupted, or not this format; "
            f"loading refuses anything but plain tensors): {type(e).__name__}: {e}"
        ) from e
    del data
    if not isinstance(payload, dict) or not _equal_plain(payload.get("format"), fmt):
        raise FileFormatError(f"{path}: not a {what} (format {fmt!r})")
    if not _equal_plain(payload.get("version"), version):
        raise FileFormatError(
            f"{path}: written by {what} format version {payload.get('version')!r}; this version of "
            f"marginalize reads version {version}"
        )
    _check_structure(path, payload, what)
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
