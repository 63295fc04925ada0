"""One writer at a time: the lock file of a store.

A writer holds ``<store>/.writer.lock``, a small JSON file naming it: process id, host name, the process's start
time (so a process id reused by another process is not taken for the holder), a random token, and the *job* it
belongs to. It is created whole and atomically (written under a temporary name, then hard-linked into place,
which fails when the lock exists, also on NFS), so a reader never sees half a lock.

Another writer is refused with :class:`~workbench.errors.StoreLockedError` naming the holder, or with
``wait=True`` waits until the lock is released. A lock whose holder is dead (same host, no such process, or
another process under that id) is stale and taken over, with a warning. A holder on another host cannot be
checked from here: its lock is respected until that host's writer releases it or someone removes the file.

Jobs (the hook for distributed measurement, ``torchrun``): the ranks of one job, on one node or several
sharing the file system, are one writer. Each rank passes the same job id (``job=``, else the environment
variable ``WORKBENCH_JOB_ID``, else ``TORCHELASTIC_RUN_ID`` as torchrun sets it, unless it is torchrun's
placeholder ``none``). The first rank to arrive creates the lock; a rank that finds a lock of its own job joins
it without owning it, and only the creating rank removes it. So a job must (1) give every rank one id: the
rendezvous id, or a token rank 0 makes (``uuid4().hex``) and broadcasts (``broadcast_object_list``) before
measuring, and (2) release on the creating rank only after a barrier, so that no rank still writes when the
lock goes. :func:`job_id` reads the id from the environment.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path

from workbench.errors import StoreError, StoreLockedError

LOCK_NAME = ".writer.lock"
#: torchrun sets TORCHELASTIC_RUN_ID to this when no rendezvous id is given: it names no job.
_NO_JOB = ("", "none")
_HELD: dict[Path, list] = {}  # lock files this process holds or has joined -> [record, count]


class StaleLockWarning(UserWarning):
    """A lock left by a writer that no longer runs was taken over."""


def job_id(job: str | None = None) -> str | None:
    """The id of the job this process writes for: ``job`` if given, else ``$WORKBENCH_JOB_ID``, else torchrun's
    ``$TORCHELASTIC_RUN_ID`` (unless it is ``none``); None for a lone process."""
    for value in (job, os.environ.get("WORKBENCH_JOB_ID"), os.environ.get("TORCHELASTIC_RUN_ID")):
        if value is not None and str(value).strip().lower() not in _NO_JOB:
            return str(value)
    return None


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), None where that cannot be read; two
    processes that had the same id have different start times."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 counted from after the command name


def alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` runs on this host (and is the one that started at ``started``, when given)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    now = process_start(pid)
    return started is None or now is None or now == started


def _record(job: str | None) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": process_start(os.getpid()),
            "token": uuid.uuid4().hex, "job": job, "since": time.time()}


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"process {holder.get('pid')} on {holder.get('host')}{job}, since {since}"


def read_lock(path: Path) -> dict | None:
    """The holder recorded in a lock file; None when there is none (or it vanished while read)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "token": None}  # unreadable: treated as held by an unknown writer


def stale(holder: dict) -> bool:
    """Whether the writer that holds a lock is gone: on this host, with no live process of that id and start."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    return not alive(pid, holder.get("started"))


def _create(path: Path, record: dict) -> bool:
    """Create the lock file holding ``record``; False when it exists."""
    tmp = path.with_name(f"{path.name}.{record['pid']}.{record['token']}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record))
        try:
            os.link(tmp, path)  # atomic, and fails when the lock exists
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # a file system without hard links: O_EXCL creation, then the content
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {path} ({exc.strerror}): the store is not writable here; "
                         "measure into a writable folder (store_root=...)") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, holder: dict) -> None:
    """Remove the stale lock ``holder`` without removing a live one that replaced it meanwhile: move it aside
    (atomic), and if what moved is not the stale lock, link it back."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        if (read_lock(aside) or {}).get("token") != holder.get("token"):
            try:
                os.link(aside, path)  # a new writer's lock: give it back
            except FileExistsError:
                pass
        else:
            warnings.warn(f"took over the lock of {path.parent} left by {describe(holder)}, which no longer runs",
                          StaleLockWarning, stacklevel=4)
    finally:
        aside.unlink(missing_ok=True)


class StoreLock:
    """The writer lock of the store at ``root``; a context manager. ``wait``: False (refuse when held), True
    (wait until free) or a number of seconds to wait at most. ``job``: see the module docstring."""

    def __init__(self, root: str | os.PathLike, *, wait: bool | float = False, job: str | None = None,
                 poll: float = 0.2):
        self.path = Path(root) / LOCK_NAME
        self.wait, self.job, self.poll = wait, job_id(job), poll

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        key = self.path.resolve()
        if key in _HELD:  # this process holds it already (a measurement inside a measurement)
            _HELD[key][1] += 1
            return
        record = _record(self.job)
        deadline = None if self.wait is True or not self.wait else time.monotonic() + float(self.wait)
        while True:
            if _create(self.path, record):
                _HELD[key] = [record, 1]
                return
            holder = read_lock(self.path)
            if holder is None:
                continue  # released between our attempt and the read
            if self.job is not None and holder.get("job") == self.job:
                _HELD[key] = [None, 1]  # joined: a rank of the same job created it, and removes it
                return
            if stale(holder):
                _take_over(self.path, holder)
                continue
            if not self.wait or (deadline is not None and time.monotonic() > deadline):
                raise StoreLockedError(
                    f"the store at {self.path.parent} is being written by {describe(holder)}; wait for it to "
                    f"finish, or pass wait=True (workbench measure --wait) to wait for it. If that process is gone "
                    f"(a crash on another host), remove {self.path}"
                )
            time.sleep(self.poll)

    def release(self) -> None:
        key = self.path.resolve()
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        record = held[0]
        if record is not None and (read_lock(self.path) or {}).get("token") == record["token"]:
            self.path.unlink(missing_ok=True)


__all__ = ["LOCK_NAME", "StaleLockWarning", "StoreLock", "alive", "describe", "job_id", "process_start",
           "read_lock", "stale"]
