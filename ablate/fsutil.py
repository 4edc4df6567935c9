"""Filesystem helpers: the cache home and atomic writes of files and folders.

Everything ``ablate`` writes that another run may later trust (cached token arrays,
zoo checkpoints, exported variants, trial folders) is written under a temporary
sibling name and renamed into place at the end, so a killed process never leaves
something that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ablate.errors import UserError

__all__ = ["ablate_home", "atomic_dir", "clean_partials", "atomic_write_text", "atomic_write_json", "check_writable",
           "waiting_lock"]


def ablate_home() -> Path:
    """The cache folder: ``$ABLATE_HOME``, else ``$XDG_CACHE_HOME/ablate``, else ``~/.cache/ablate``."""
    if env := os.environ.get("ABLATE_HOME"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ablate"


# Temporaries of atomic_dir are named ``.<final>.partial-<pid>@<host>-<random>`` (and the replaced
# folder ``.<final>.old-<pid>@<host>-<random>``): the owner's pid and machine in the name tell a
# dead writer's leftover (removable) from a live writer's work in progress (never touched).
_TEMP = re.compile(r"^\.(?P<final>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)@(?P<host>.+)-[A-Za-z0-9_]+$")


def _temp_prefix(final: Path, kind: str) -> str:
    return f".{final.name}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove the leftovers of :func:`atomic_dir` writers that died (kill -9, power cut) in ``folder``.

    Only temporaries whose name carries this machine's host name and the pid of a process that
    no longer exists are removed: the pid is checked with ``kill(pid, 0)``, so a live writer's
    folder (ours or another process's) is never touched, and one written on another machine
    (a shared file system) is left to that machine. A reused pid keeps a leftover until that
    process ends too, which errs on the safe side. Returns what was removed.
    """
    removed = []
    host = socket.gethostname()
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _TEMP.match(path.name)
        if not match or match["host"] != host or int(match["pid"]) == os.getpid() or _pid_alive(int(match["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _taken(exc: OSError) -> bool:
    """A rename refused because the destination is a non-empty folder (another writer's result)."""
    return isinstance(exc, FileExistsError) or exc.errno in (errno.ENOTEMPTY, errno.EEXIST)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success rename it to ``final``.

    On any exception (or KeyboardInterrupt) the temporary folder is removed and ``final``
    is left as it was. With ``overwrite=True`` an existing ``final`` is replaced only after
    the new content is complete. When another writer puts its own ``final`` in place first
    (two processes building the same cache entry), ``FileExistsError`` is raised and theirs
    is kept, whether the race is lost before or at the rename (``ENOTEMPTY``/``EEXIST``).
    Leftovers of dead writers beside ``final`` are removed first (:func:`clean_partials`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final, "partial"), dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} appeared while it was being written")
            old = final.with_name(_temp_prefix(final, "old") + secrets.token_hex(4))
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile: nothing to keep aside
                final.rename(old)
            try:
                tmp.rename(final)
            except OSError as exc:
                if not _taken(exc):
                    with contextlib.suppress(OSError):
                        old.rename(final)  # put the previous content back
                    raise
                raise FileExistsError(f"{final} was replaced by another writer while it was being written") \
                    from None
            finally:
                shutil.rmtree(old, ignore_errors=True)
                with contextlib.suppress(OSError):
                    old.unlink()  # final was a file
        else:
            try:
                tmp.rename(final)
            except OSError as exc:  # the other writer renamed its identical result first
                if not _taken(exc):
                    raise
                raise FileExistsError(f"{final} appeared while it was being written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def check_writable(path: Path) -> None:
    """Raise a :class:`UserError` unless ``path`` is, or can be created as, a writable folder."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create {path}: {probe} is a file, not a folder; choose another --out")
    try:  # os.access says yes to root even where writing fails (/proc, read-only mounts): really try
        tempfile.TemporaryDirectory(dir=probe, prefix=".ablate-probe-").cleanup()
    except OSError as exc:
        raise UserError(f"cannot write to {probe} ({exc.strerror or exc}); choose another --out") from None


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike, waiting: str | None = None) -> Iterator[None]:
    """Hold the file lock ``path`` (an ``flock``: the kernel drops it when its holder dies, however it
    dies); when another process holds it, print ``waiting`` (if given) once and wait for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            print(waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
