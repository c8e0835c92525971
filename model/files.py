"""Writing files whole, and one writer at a time: what every layer that writes artifacts uses.

`replacing(path)` yields a unique temporary name beside `path`; once the caller has written it,
it is fsynced and renamed over `path` (then the folder is fsynced), so that a reader, another
process or a crash never sees half a file. If the caller fails, the temporary file is removed
and `path` keeps its old content. `exclusive(lock_path)` holds an advisory lock (flock) so that
processes and containers sharing a volume never build the same artifact at once.
`sha256_file(path)` is the digest by which records and metadata name a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import tempfile
from pathlib import Path


def missing(path: str | Path, what: str) -> str | None:
    """Why `path` is not the `what` (e.g. "weights file") a command reads, or None where it is a file."""
    path = Path(path)
    if path.is_file():
        return None
    return f"{path}: a folder, not a {what}" if path.is_dir() else f"{path}: no such {what}"


def blocking_file(path: str | Path) -> Path | None:
    """The file standing where one of `path`'s folders should be (mkdir then says only "File exists")."""
    return next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)


def writable(path: str | Path) -> Path:
    """`path`, where a file can be written (its folder made); else OSError naming it (a folder, a
    folder that cannot be made, no permission). Outputs written after a long step are checked so
    before it, so that the step is not lost to a typo."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "a folder, not a file", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocking = blocking_file(path)
        if blocking is not None:
            raise NotADirectoryError(20, f"cannot write here ({blocking} is a file, not a folder)", str(path)) from None
        raise cannot_write(exc, path) from None
    # The file itself is replaced by a rename: its folder decides. Tried, not asked (os.access): root
    # passes every permission check, yet cannot create a file in /proc or on a read-only mount.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    except OSError as exc:
        raise cannot_write(exc, path) from None
    os.close(fd)
    os.unlink(probe)
    return path


def cannot_write(exc: OSError, path: Path) -> OSError:
    """`exc` named as the file asked for (not a temporary one or a folder above it)."""
    return type(exc)(exc.errno, f"cannot write here ({exc.strerror})", str(path))


@contextlib.contextmanager
def replacing(path: str | Path):
    """Yields a temporary path to write; renamed over `path` when the block ends without error."""
    path = writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise cannot_write(exc, path) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600: give it the mode a plain open() would
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def staged(path: str | Path) -> Path:
    """Where an artifact is made and checked before it goes to `path` (os.replace), so that a file
    that failed its check is never the current one: `.<name>.<random>.unverified` beside it, a name
    of its own per call, so that two writers of one artifact could never write into one file even
    outside the lock their writers take (export/provision.py, artifact_lock). Not created here: the
    maker writes it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.unverified")


def remove_leftovers(path: str | Path) -> list[Path]:
    """Remove what a process killed mid-write (docker stop, OOM, provisioning's SIGKILL) left beside
    `path`: the temporary files `replacing` writes (beside `path` and files named after it) and the
    `staged` file with its own; returns them. Call it only while holding the lock of whoever writes
    there (`exclusive`): a live writer's files look the same."""
    path = Path(path)
    unverified = f".{path.name}.*.unverified"
    before = path.with_name(f".{path.name}.unverified")  # the one fixed name of before session 25
    left = sorted({*path.parent.glob(f".{path.name}*.tmp"), *path.parent.glob(unverified),
                   *path.parent.glob(f".{unverified}*.tmp"), *([before] if before.exists() else [])})
    for tmp in left:
        tmp.unlink(missing_ok=True)
    return left


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which is not thread-safe later.
_UMASK = _read_umask()


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole (see `replacing`); returns the path."""
    with replacing(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def exclusive(lock_path: str | Path):
    """Hold an exclusive advisory lock on `lock_path` (created if missing) for the block: a second
    process waits here until the first leaves it."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256, hex, read in 1 MiB chunks: what records and metadata name a file by."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
