"""Opening Optuna storages from a URL, and keeping passwords out of everything we write.

- ``sqlite:///path/study.db``: the default, one worker (SQLite is not safe for many).
- ``journal:path/study.log`` (or a path ending in ``.log``/``.journal``): Optuna's journal
  file, safe for several workers on one machine.
- ``postgresql://user:pass@host/db`` or ``mysql://...``: Optuna's RDB storage, for many
  workers on many machines.

RDB storages (SQLite included) run Optuna's heartbeat, so a worker killed mid-trial
leaves a trial that the next worker marks failed and whose configuration runs again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ablate.errors import UserError

__all__ = ["open_storage", "redact", "default_storage_url", "HEARTBEAT_S"]

# A live trial writes a heartbeat this often; one silent for GRACE is taken as dead.
HEARTBEAT_S = int(os.environ.get("ABLATE_HEARTBEAT_S", "30"))
GRACE_S = int(os.environ.get("ABLATE_GRACE_S", str(4 * HEARTBEAT_S)))


def redact(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", str(url))


def default_storage_url(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / 'study.db'}"


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:").removeprefix("//"))
    if "://" not in url and url.endswith((".log", ".journal")):
        return Path(url)
    return None


def open_storage(url: str):
    """An Optuna storage for ``url``; an unreachable or malformed URL is a one-line UserError."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    journal = _journal_path(url)
    if journal is not None:
        if not journal.parent.exists():
            raise UserError(f"journal storage folder {journal.parent} does not exist; create it first")
        return JournalStorage(JournalFileBackend(str(journal)))
    if not re.match(r"^(sqlite|postgresql|postgres|mysql)(\+\w+)?://", url):
        raise UserError(
            f"storage {redact(url)!r} is not a supported URL; use sqlite:///path.db, journal:path.log, "
            "postgresql://user:pass@host/db or mysql://user:pass@host/db"
        )
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.exists():
            raise UserError(f"SQLite storage folder {folder} does not exist; create it or use another --storage")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and stable since 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                # a stale (killed) trial is queued again with the same parameters, at most 3 times
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
    except ImportError as exc:
        raise UserError(f"storage {redact(url)}: missing database driver ({exc.name}); "
                        "pip install 'ablate[postgres]' for PostgreSQL") from None
    except Exception as exc:  # sqlalchemy raises many kinds; to the user they are one problem
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open storage {redact(url)}: {redact(first)[:200]}") from None
