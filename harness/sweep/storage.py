"""Optuna storage: SQLite under the results directory by default, any SQLAlchemy URL
(postgresql://... to share a study between machines), or a journal file."""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

from harness import rundir

STORAGE_ENV = "DPO_HARNESS_STORAGE"  # the storage URL when --storage is not given
HOST_ENV = "DPO_HARNESS_HOST"  # the name this machine goes by in a shared study
HEARTBEAT_S = 10  # a trial's heartbeat; one silent for GRACE_S is failed and re-queued
GRACE_S = 30


def host() -> str:
    """This machine's name in the study's records ($DPO_HARNESS_HOST, else the host name). Give
    machines that share a study distinct names (containers often share one host name): a worker
    fails a trial as dead only when it was held by a process of its own machine that is gone."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def resolve(storage: str | None, results_dir: Path, study: str) -> str:
    """The study's storage URL: `storage`, else $DPO_HARNESS_STORAGE, else SQLite under the
    results directory; file paths made absolute."""
    storage = storage or os.environ.get(STORAGE_ENV)
    return absolute(storage) if storage else default_storage(results_dir, study)


def default_storage(results_dir: Path, study: str) -> str:
    db = rundir.study_dir(results_dir, study) / rundir.OPTUNA_DB
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db.resolve()}"


def is_journal(url: str) -> bool:
    return url.endswith(".log") or url.startswith("journal:")


def absolute(url: str) -> str:
    """The same storage with file paths made absolute, so that the URL recorded in run files
    opens from any working directory."""
    if is_journal(url):
        return str(Path(url.removeprefix("journal:")).expanduser().resolve())
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{Path(url.removeprefix('sqlite:///')).resolve()}"
    return url


def without_password(url: str) -> str:
    """The URL as run files record it: any password dropped (the driver then reads PGPASSWORD
    or ~/.pgpass), everything else kept."""
    if is_journal(url) or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url)._replace(password=None).render_as_string(hide_password=False)


def masked(url: str) -> str:
    """The URL fit for printing: any password replaced by ***."""
    if is_journal(url) or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str, heartbeat: bool = True):
    """The storage behind `url`. With `heartbeat`, running trials send heartbeats and a trial
    silent for GRACE_S (a killed worker's) is failed and retried; readers pass heartbeat=False."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if is_journal(url):
        # A journal file: multi-process safe on one machine without SQLite's locking.
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    extra = {} if not heartbeat else {
        "heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S,
        "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=3)}
    return _first_open(lambda: RDBStorage(url, engine_kwargs=engine_kwargs, **extra))


def _first_open(make, tries: int = 5):
    """make(), tried again when it fails on the database's schema: machines that start on an
    empty database at the same moment all create Optuna's tables, and all but one fail."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(tries):
        try:
            return make()
        except (IntegrityError, ProgrammingError, OperationalError):
            if attempt == tries - 1:
                raise
            time.sleep(0.5 + random.random() * (attempt + 1))
