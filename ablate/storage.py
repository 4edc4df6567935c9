"""Optuna storages from a URL, passwords kept out of everything we write, and worker liveness.

- ``sqlite:///path/study.db``: the default, **one worker** (SQLite is not safe for many); a
  second process on the same database is refused.
- ``journal:path/study.log`` (or a path ending in ``.log``/``.journal``): Optuna's journal file,
  for several workers on one machine.
- ``postgresql://user:pass@host/db`` or ``mysql://...``: Optuna's RDB storage, for many workers
  on many machines. Put the password in ``PGPASSWORD`` or ``~/.pgpass`` to keep it out of the
  process list; a URL's password is never printed or written (:func:`redact`).

A :class:`Worker` is one ``python -m ablate.study`` process. It serialises the moment a trial
gets its configuration (a lock file for file storages, a PostgreSQL advisory lock), so two
workers never draw the same configuration and together stop at ``--trials``. It also tells dead
workers from live ones, so a killed worker's trial is failed and retried at once:

- SQLite: this process is the only worker, so every RUNNING trial it finds is dead.
- Any storage, same machine: each worker holds an ``flock`` on its own file under
  ``<study>/.workers/`` for its whole life (the kernel drops it when the process dies, however
  it dies); a RUNNING trial whose worker's file is unlocked is dead.
- A trial of a worker on another machine: RDB storages run Optuna's heartbeat, and a trial
  silent for ``ABLATE_GRACE_S`` seconds is failed and queued again. The journal storage has no
  heartbeat: such a trial stays RUNNING until a worker on its machine starts again (the journal
  is for workers on one machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
from pathlib import Path
from urllib.parse import unquote

from ablate.errors import UserError, first_line

__all__ = ["open_storage", "redact", "default_storage_url", "check_storage_url", "check_storage_files",
           "canonical_url", "storage_kind",
           "Worker",
           "HEARTBEAT_S", "GRACE_S", "WORKER_ATTR"]

# A live trial writes a heartbeat this often; one silent for GRACE is taken as dead (RDB only).
HEARTBEAT_S = int(os.environ.get("ABLATE_HEARTBEAT_S", "30"))
GRACE_S = int(os.environ.get("ABLATE_GRACE_S", str(4 * HEARTBEAT_S)))
WORKER_ATTR = "ablate:worker"  # trial system attribute: which process runs the trial
RDB = re.compile(r"^(sqlite|postgresql|postgres|mysql)(\+\w+)?://")


# A URL's password as SQLAlchemy and the drivers read it runs from the ':' after the user name to an
# '@'. Redaction is conservative: it hides everything up to the URL's *last* '@', so a password
# that holds an unescaped '@' (or a space, '/', '#', '?', ...) never shows in part; such an
# ambiguous URL is then refused by check_storage_url before any driver sees it.
_CREDENTIALS = re.compile(r"^(?P<head>[A-Za-z][\w+.-]*://[^:/@]*):(?P<secret>.*)@(?P<tail>[^@]*)$", re.S)
_EMBEDDED = re.compile(r"([A-Za-z][\w+.-]*://[^:/@\s]*):\S*@")  # URLs inside a message: up to whitespace
_PASSWORD_PARAM = re.compile(r"(?i)(password=)[^&\s'\"]*")


def _credentials(url: str) -> tuple[str, str, str] | None:
    """(``scheme://user``, password as written, the rest after the last '@'), or None without a password."""
    match = _CREDENTIALS.match(url)
    return (match["head"], match["secret"], match["tail"]) if match else None


def redact(text: str) -> str:
    """Hide passwords in URLs and DSNs: ``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``.

    ``text`` is a storage URL (any kind: ``journal:PATH`` has nothing to hide) or a message that
    may quote one; a whole URL is redacted up to its last '@', whatever its password holds.
    """
    text = str(text)
    if _journal_path(text) is not None:
        return text
    parts = _credentials(text)
    text = f"{parts[0]}:***@{parts[2]}" if parts else _EMBEDDED.sub(r"\1:***@", text)
    return _PASSWORD_PARAM.sub(r"\1***", text)


def _password(url: str) -> str | None:
    """The URL's password as SQLAlchemy (and so the driver) reads it: percent-escapes decoded."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        password = make_url(url).password
    except (ArgumentError, ValueError):
        return None
    return str(password) if password else None


def _secrets(url: str) -> list[str]:
    """Every spelling of the URL's password a message may quote, longest first."""
    from urllib.parse import quote

    parts = _credentials(url)
    found = {parts[1], unquote(parts[1])} if parts else set()
    if password := _password(url):
        found |= {password, quote(password, safe="")}
    return sorted((s for s in found if s), key=len, reverse=True)


def _scrub(message: str, url: str) -> str:
    """``message`` with the URL's password replaced wherever it appears (drivers quote DSNs)."""
    for secret in _secrets(url):
        message = message.replace(secret, "***")
    return redact(message)


def default_storage_url(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / 'study.db'}"


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:").removeprefix("//")).expanduser()
    if "://" not in url and url.endswith((".log", ".journal")):
        return Path(url).expanduser()
    return None


def _sqlite_path(url: str) -> Path | None:
    match = re.match(r"^sqlite(\+\w+)?:///(.+)$", url)
    return Path(match.group(2)) if match else None


def canonical_url(url: str) -> str:
    """File storages with absolute paths, so a recorded URL works from any folder."""
    journal = _journal_path(url)
    if journal is not None:
        return f"journal:{journal.resolve()}" if _journal_named(url) else url  # "journal:" is refused later
    sqlite = _sqlite_path(url)
    if sqlite is not None and str(sqlite) != ":memory:" and not sqlite.is_absolute():
        return url[: url.index(":///") + 4] + str(sqlite.resolve())
    return url


def storage_kind(url: str) -> str:
    """``"journal"``, ``"sqlite"``, ``"postgresql"`` or ``"mysql"`` (after :func:`check_storage_url`)."""
    if _journal_path(url) is not None:
        return "journal"
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    return "postgresql" if scheme == "postgres" else scheme


def check_storage_url(url: str) -> None:
    """Raise a one-line :class:`UserError` for a malformed URL, a missing folder or a file that is
    not a storage of its kind; creates nothing."""
    journal = _journal_path(url)
    if journal is not None:
        _check_journal(url, journal)
        return
    if not RDB.match(url):
        raise UserError(f"storage {redact(url)!r} is not a supported URL; use sqlite:///path.db, journal:path.log, "
                        "postgresql://user:pass@host/db or mysql://user:pass@host/db")
    _check_password(url)
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path is None or str(path) == ":memory:":
            raise UserError(f"storage {redact(url)!r}: give an SQLite file as sqlite:///path/to/study.db (a file, "
                            "so a rerun can continue)")
        if not path.parent.is_dir():
            raise UserError(f"SQLite storage folder {path.parent} does not exist; create it or use another --storage")
        check_storage_files(url)


def _check_password(url: str) -> None:
    """Refuse a URL whose password SQLAlchemy would read otherwise than it is written (an unescaped '@')."""
    from urllib.parse import unquote as decoded

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise UserError(f"storage {redact(url)!r} is not a valid URL ({_scrub(first_line(exc), url)}); "
                        "use sqlite:///path.db or postgresql://user:pass@host:port/db") from None
    parts = _credentials(url)
    if parts and decoded(parts[1]) != (_password(url) or ""):
        raise UserError(f"storage {redact(url)}: the password holds an unescaped '@', which ends it early; "
                        "percent-encode the password (urllib.parse.quote(password, safe='')) or put it in "
                        "PGPASSWORD / ~/.pgpass")


def _journal_named(url: str) -> bool:
    """Whether a journal URL names a file at all (``journal:`` alone would be the current folder)."""
    return bool(str(url).removeprefix("journal:").removeprefix("//").strip())


def _check_journal(url: str, journal: Path) -> None:
    if not _journal_named(url):
        raise UserError(f"storage {url!r} names no file; write journal:PATH.log (e.g. journal:runs/study.log)")
    if journal.is_dir():
        raise UserError(f"journal storage {journal} is a folder; name a file in it, "
                        f"e.g. journal:{journal / 'study.log'}")
    if not journal.parent.is_dir():
        raise UserError(f"journal storage folder {journal.parent} does not exist; create it first")
    check_storage_files(url)


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_storage_files(url: str) -> None:
    """Refuse an existing file storage that is not of its kind (a folder, garbage, another format),
    reading it only; a file that is not there yet is fine (Optuna creates it)."""
    journal = _journal_path(url)
    path = journal if journal is not None else _sqlite_path(url) if url.startswith("sqlite") else None
    if path is None or not path.exists():
        return
    kind = "journal" if journal is not None else "SQLite"
    fix = "restore it, remove it, or use another --storage"
    if not path.is_file():
        raise UserError(f"{kind} storage {path} is not a file; {fix}")
    try:
        if journal is not None:
            problem = _journal_problem(path)
        else:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
            problem = "not an SQLite database" if head and head != SQLITE_MAGIC else None
    except OSError as exc:
        raise UserError(f"cannot read {kind} storage {path} ({exc.strerror or first_line(exc)}); fix its "
                        "permissions or use another --storage") from None
    if problem:
        raise UserError(f"{kind} storage {path} is {problem}; {fix}")


def _journal_problem(path: Path) -> str | None:
    """Why ``path`` is not an Optuna journal (one JSON object with an ``op_code`` per line), or None.

    Like Optuna, an unterminated last line after good ones (a writer killed mid-line) is tolerated.
    """
    import json

    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n") and number > 1:
                return None
            try:
                record = json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                record = None
            if not isinstance(record, dict) or "op_code" not in record:
                return f"not an Optuna journal (line {number} is not a journal record)"
    return None


def _driver_url(url: str) -> str:
    """``postgresql://`` with a driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3,
    ``ablate[postgres]`` installs psycopg2; ``postgres://`` (Heroku's spelling) is accepted too."""
    import importlib.util

    match = re.match(r"^postgres(ql)?://", url)
    if not match:
        return url
    driver = "psycopg" if importlib.util.find_spec("psycopg") or not importlib.util.find_spec("psycopg2") \
        else "psycopg2"
    return f"postgresql+{driver}://" + url[match.end():]


def open_storage(url: str):
    """An Optuna storage for ``url``; an unreachable or malformed URL is a one-line UserError."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    check_storage_url(url)
    journal = _journal_path(url)
    if journal is not None:
        try:
            return JournalStorage(JournalFileBackend(str(journal)))
        except OSError as exc:
            raise UserError(f"cannot open journal storage {journal} ({exc.strerror or first_line(exc)}); fix its "
                            "permissions or use another --storage") from None
        except ValueError as exc:  # a record Optuna cannot decode (JSONDecodeError, UnicodeDecodeError)
            raise UserError(f"journal storage {journal} is not a valid Optuna journal ({first_line(exc)}); restore "
                            "it, remove it, or use another --storage") from None
    if optuna.logging.get_verbosity() < optuna.logging.WARNING:  # no INFO line per trial; quieter stays quieter
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and stable since 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                _driver_url(url),
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                # a stale (killed) trial is queued again with the same parameters, at most 3 times
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
    except ImportError as exc:
        name = exc.name or getattr(exc.__cause__, "name", None)
        raise UserError(f"storage {redact(url)}: missing database driver ({name}); "
                        "pip install 'ablate[postgres]' for PostgreSQL") from None
    except Exception as exc:  # sqlalchemy raises many kinds; to the user they are one problem
        fix = "restore or remove the file, or use another --storage" if url.startswith("sqlite") else \
            "check the host, port, user and password (or PGPASSWORD)"
        raise UserError(f"cannot open storage {redact(url)}: {_scrub(first_line(exc, 10_000), url)[:200]}; "
                        f"{fix}") from None


def _host_id() -> str:
    """This machine in this boot: a trial recorded before a reboot can never be alive."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class _FileLock:
    """An ``flock`` on a file: released by the kernel when its process dies, however it dies."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        import fcntl

        if self.fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    @staticmethod
    def is_free(path: Path) -> bool | None:
        """True when nobody holds ``path``'s lock; None when the file is not there."""
        import fcntl

        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)


class _AdvisoryLock:
    """A PostgreSQL session advisory lock on its own connection (the server drops it with the
    connection, so a killed worker never leaves it held)."""

    def __init__(self, url: str, name: str):
        self.url = url
        self.key = int.from_bytes(hashlib.sha256(f"ablate:{name}".encode()).digest()[:8], "big", signed=True)
        self.engine = None
        self.conn = None

    def acquire(self) -> bool:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        if self.conn is None:
            if self.engine is None:
                self.engine = create_engine(_driver_url(self.url), poolclass=NullPool)
            self.conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self.conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        return True

    def release(self) -> None:
        from sqlalchemy import text

        if self.conn is not None:
            conn, self.conn = self.conn, None
            with contextlib.suppress(Exception):
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            conn.close()


class _NoLock:
    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


def _lock_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.ablate-lock")


class Worker:
    """This process as a worker of one study: its liveness lock and the study's sampling lock.

    ``sampling()`` is held from before a trial is created until its configuration is in the
    storage (:meth:`release`); :meth:`is_dead` is only meaningful while it is held.
    """

    def __init__(self, url: str, study_name: str, study_dir: Path):
        check_storage_url(url)  # a storage file that is not one fails before .workers/ or a lock is made
        kind = storage_kind(url)
        self.single = kind == "sqlite"
        self.serialized = kind in ("sqlite", "journal", "postgresql")
        self._gate: _FileLock | None = None
        if self.single:
            self._gate = _FileLock(_lock_beside(_sqlite_path(url)))
            if not self._gate.acquire(blocking=False):
                raise UserError(f"study {study_name!r} is being run by another process on its SQLite storage, "
                                "which takes one worker; wait for it, or use --storage journal:PATH.log (one "
                                "machine) or postgresql://... for several workers")
        if kind == "journal":
            self._sampling = _FileLock(_lock_beside(_journal_path(url)))
        elif kind == "postgresql":
            self._sampling = _AdvisoryLock(url, study_name)
        else:  # SQLite: one worker, nothing to serialise; MySQL: no lock (the duplicate check remains)
            self._sampling = _NoLock()
        self.host = _host_id()
        folder = Path(study_dir) / ".workers"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.lock"
        self._alive = _FileLock(self.path)
        self._alive.acquire()
        self.record = {"host": self.host, "pid": os.getpid(), "lock": str(self.path.resolve())}

    @contextlib.contextmanager
    def sampling(self):
        """Hold the study's sampling lock; :meth:`release` may end it early (after the suggestion)."""
        self._sampling.acquire()
        try:
            yield self
        finally:
            self._sampling.release()

    def release(self) -> None:
        self._sampling.release()

    def mark(self, trial) -> None:
        """Record on ``trial`` (an ``optuna.Trial``) that this process runs it."""
        trial.study._storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, self.record)

    def is_dead(self, trial) -> bool:
        """True when the worker of RUNNING ``trial`` (a FrozenTrial) is certainly gone."""
        if self.single:
            return True  # we hold the only-worker lock: whoever ran it has died
        info = trial.system_attrs.get(WORKER_ATTR)
        if info is None:
            # workers mark a trial while holding the sampling lock, which we hold now
            return self.serialized
        if not info.get("lock") or info["lock"] == self.record["lock"] or info.get("host") != self.host:
            return False  # alive (it is us), or on another machine: the heartbeat decides there
        return _FileLock.is_free(Path(info["lock"])) is True

    def sweep(self, keep: set[str] = frozenset()) -> None:
        """Delete the lock files of dead workers under ``.workers/`` except those in ``keep`` (paths
        still named by RUNNING trials); files younger than a minute may be a worker starting up."""
        import time

        for path in self.path.parent.glob("*.lock"):
            try:
                young = time.time() - path.stat().st_mtime < 60
            except OSError:
                continue
            if path != self.path and not young and str(path.resolve()) not in keep and _FileLock.is_free(path):
                with contextlib.suppress(OSError):
                    path.unlink()

    def close(self) -> None:
        """Drop both locks. The liveness file stays, so a trial this process could not finish
        (interrupted while being recorded) is still recognised as dead; :meth:`sweep` removes it."""
        self._sampling.release()
        self._alive.release()
        if self._gate is not None:
            self._gate.release()
