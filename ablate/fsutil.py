"""Filesystem helpers: the cache home and atomic writes of files and folders.

Everything ``ablate`` writes that another run may later trust (cached token arrays,
zoo checkpoints, exported variants, trial folders) is written under a temporary
sibling name and renamed into place at the end, so a killed process never leaves
something that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ablate.errors import UserError

__all__ = ["ablate_home", "atomic_dir", "atomic_write_text", "atomic_write_json", "check_writable"]


def ablate_home() -> Path:
    """The cache folder: ``$ABLATE_HOME``, else ``$XDG_CACHE_HOME/ablate``, else ``~/.cache/ablate``."""
    if env := os.environ.get("ABLATE_HOME"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ablate"


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success rename it to ``final``.

    On any exception (or KeyboardInterrupt) the temporary folder is removed and ``final``
    is left as it was. With ``overwrite=True`` an existing ``final`` is replaced only after
    the new content is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} appeared while it was being written")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
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
