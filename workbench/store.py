"""The Parquet store: long-format tables, one folder per probe, one file per checkpoint.

Every table shares the key columns of :data:`SCHEMA` (``run, step, probe, metric, group, sample_id, layer,
value``); a column that does not apply is null. A probe may add key columns of its own (``expert``,
``query_id``, ``bin`` ...): every column but ``value`` is a key, and a table holds one row per key (a write that
would break this is refused). Layout::

    <root>/
        .writer.lock            held by the one process writing (workbench.lock)
        <probe>/
            fingerprint.json    what the numbers depend on: options, samples, dtype, model, the probe's version
            options.json        the options alone (what views and reports read)
            step_000100.parquet one part per checkpoint
            final.parquet       results computed across all checkpoints, if the probe has any
        .<probe>.new/           an overwrite in progress: swapped in for <probe>/ once complete

Each part is written to a temporary file and renamed, so a killed measurement leaves only whole parts, and
a resumed one starts at the first checkpoint without a part, after checking that its fingerprint matches
the stored one. An overwrite writes a new folder beside the old one and swaps them when it is complete, so a
failure or Ctrl-C half-way leaves the old table whole. A part that cannot be read raises StoreError naming it;
:meth:`Store.verify` lists such parts and :meth:`Store.repair` removes them, so that a resume measures them again.
Read with polars, pandas or DuckDB (``read_parquet('<root>/*/*.parquet', union_by_name=true)``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from workbench.errors import StoreError
from workbench.lock import LOCK_NAME, StoreLock, alive, describe, read_lock, stale

SCHEMA: dict[str, pl.DataType] = {
    "run": pl.String,
    "step": pl.Int64,
    "probe": pl.String,
    "metric": pl.String,
    "group": pl.String,
    "sample_id": pl.String,
    "layer": pl.Int32,
    "value": pl.Float64,
}
KEYS = list(SCHEMA)
_PART = re.compile(r"^step_(\d+)\.parquet$")
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
FINGERPRINT, OPTIONS, FINAL = "fingerprint.json", "options.json", "final.parquet"
_COMPLETE = ".complete"  # in a staging folder: every part is written, the swap may happen

#: What to do about a write that failed, by errno.
_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free space, or measure into another folder (store_root=...)",
    errno.EDQUOT: "the disk quota is used up: free space, or measure into another folder (store_root=...)",
    errno.EROFS: "the file system is read-only: measure into a writable folder (store_root=...)",
    errno.EACCES: "permission denied: make the folder writable, or measure into another one (store_root=...)",
    errno.EPERM: "permission denied: make the folder writable, or measure into another one (store_root=...)",
}


class StoreFormatWarning(UserWarning):
    """A store written before fingerprints was resumed: its samples, dtype and model could not be checked."""


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write (full disk, read-only folder, no permission) into a StoreError naming ``path``."""
    try:
        yield
    except OSError as exc:
        hint = _WRITE_HINTS.get(exc.errno, "check the folder's free space and permissions")
        raise StoreError(f"cannot write {path} ({exc.strerror or exc}): {hint}. Nothing already in the store was "
                         "changed") from exc
    except pl.exceptions.PolarsError as exc:
        raise StoreError(f"cannot write {path} ({exc}); nothing already in the store was changed") from exc


def _temp_file(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` whose name carries this process's id, so that one left behind by a
    killed writer can be told from one still being written (:func:`remove_orphans`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)


def _temp_pid(f: Path) -> int | None:
    """The process id in the name of a temporary file of :func:`_temp_file` (None for other files)."""
    parts = f.name[: -len(".tmp")].split(".")
    return int(parts[-2]) if len(parts) >= 2 and parts[-2].isdigit() else None


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files in ``folder`` left by writers that no longer run (killed mid-write); the
    parts they were writing were never renamed into place, so nothing measured is lost. Returns them."""
    removed = []
    for f in Path(folder).glob(".*.tmp"):
        pid = _temp_pid(f)
        if pid is not None and pid != os.getpid() and not alive(pid):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def _write_atomic(path: Path, write) -> None:
    """``write(temporary path)``, then rename it to ``path``; on any failure the temporary file is removed and
    the error names ``path`` (a full disk, a read-only folder)."""
    tmp = None
    with _writing(path):
        try:
            fd, tmp = _temp_file(path)
            os.close(fd)
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise


def write_parquet_atomic(df: pl.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    _write_atomic(Path(path), df.write_parquet)


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True, default=str)
    _write_atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def read_json(path: Path, fix: str) -> dict | None:
    """A JSON file of the store, None when absent; a StoreError naming it (and ``fix``) when unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} cannot be read ({exc}); {fix}") from exc


def read_part(path: Path, fix: str) -> pl.DataFrame:
    """One Parquet part; a StoreError naming it (and ``fix``) when it is truncated or corrupt."""
    try:
        return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise StoreError(f"{path} is corrupt or unreadable ({str(exc).splitlines()[0]}); {fix}") from exc


def check_unique_keys(df: pl.DataFrame, where: str) -> None:
    """Refuse a table with two rows under one key (every column but ``value``): a reader could not tell which
    row is the number."""
    keys = [c for c in df.columns if c != "value"]
    if not keys or df.height < 2:
        return
    dup = df.select(keys).is_duplicated()
    if dup.any():
        example = {k: v for k, v in df.filter(dup).select(keys).row(0, named=True).items() if v is not None}
        raise StoreError(
            f"{where}: {int(dup.sum())} rows share their keys with another row (e.g. {example}); a table holds one row "
            "per key: give each group, metric and extra key column its own value (a sample group named like the "
            "overall group?). Nothing was written"
        )


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


#: What each entry of a fingerprint stands for, in the message of a refused resume.
_MEANS = {
    "options": "the measurement's options",
    "samples": "the samples' ids, tokens or targets",
    "dtype": "the dtype the checkpoints are loaded in",
    "autocast": "bf16 autocast in the capture",
    "truncate": "cutting samples longer than the model's positions",
    "model": "the run's model (name, kind and architecture)",
    "version": "the measurement's version (its numbers changed with the code)",
}


def differences(stored: dict, now: dict) -> list[str]:
    """Entries of two fingerprints that differ, as text (``options.tau: stored 0.7, now 0.5``)."""
    out = []
    for key in sorted(set(stored) | set(now)):
        a, b = stored.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: stored {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        else:
            out.append(f"{key} ({_MEANS.get(key, key)}): stored {a!r}, now {b!r}")
    return out


@dataclass(frozen=True)
class Problem:
    """Something :meth:`Store.verify` found: ``path``, what is wrong, and whether :meth:`Store.repair` fixes it."""

    path: Path
    what: str
    repairable: bool = True

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def tidy(df: pl.DataFrame, **constants) -> pl.DataFrame:
    """Give ``df`` every key column (constants fill given ones, nulls the missing), cast to the schema,
    keys first. Extra columns are kept after the keys."""
    if "value" not in df.columns:
        raise StoreError(f"a table needs a 'value' column; it has {df.columns}")
    cols = []
    for name, dtype in SCHEMA.items():
        if name in constants:
            cols.append(pl.lit(constants[name], dtype=dtype).alias(name))
        elif name in df.columns:
            cols.append(pl.col(name).cast(dtype))
        else:
            cols.append(pl.lit(None, dtype=dtype).alias(name))
    extra = [c for c in df.columns if c not in SCHEMA]
    return df.select(cols + [pl.col(c) for c in extra])


class Store:
    """A folder of probe tables. Cheap to create; nothing is read until asked."""

    def __init__(self, root: str | os.PathLike, run: str | None = None):
        self.root = Path(root)
        self.run = run
        self._staging: dict[str, Path] = {}  # probes being overwritten -> their staging folder

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, probes={self.probes()})"

    @property
    def _fix(self) -> str:
        return (f"run `workbench store verify {self.root} --repair` to remove what is corrupt, then measure again "
                "to redo it")

    # --- layout -------------------------------------------------------------------------------------------
    def folder(self, probe: str) -> Path:
        """The folder of ``probe``'s files: its staging folder while an overwrite of it is in progress."""
        if not _NAME.match(probe):
            raise StoreError(f"probe name {probe!r} may hold only letters, digits, '_', '-' and '.' (not first)")
        return self._staging.get(probe, self.root / probe)

    _dir = folder

    def probes(self) -> list[str]:
        if not self.root.exists():
            return sorted(self._staging)
        found = {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
        return sorted(found | set(self._staging))

    def steps(self, probe: str) -> list[int]:
        """Checkpoint steps that have a finished part for ``probe``."""
        d = self.folder(probe)
        if not d.exists():
            return []
        return sorted(int(m.group(1)) for f in d.iterdir() if (m := _PART.match(f.name)))

    def has(self, probe: str, step: int) -> bool:
        return (self.folder(probe) / f"step_{step:06d}.parquet").exists()

    # --- what a probe was measured with ---------------------------------------------------------------------
    def options(self, probe: str) -> dict | None:
        return read_json(self.folder(probe) / OPTIONS, self._fix)

    def fingerprint(self, probe: str) -> dict | None:
        """What ``probe``'s numbers depend on, as recorded when it was measured (None for stores made before
        fingerprints)."""
        return read_json(self.folder(probe) / FINGERPRINT, self._fix)

    def lock(self, *, wait: bool | float = False, job: str | None = None) -> StoreLock:
        """The writer lock of this store (a context manager; see :mod:`workbench.lock`)."""
        return StoreLock(self.root, wait=wait, job=job)

    def begin(self, probe: str, options: dict, overwrite: bool = False, fingerprint: dict | None = None) -> None:
        """Record what ``probe`` is measured with. A resume under another fingerprint (``options`` and what else
        changes the numbers) is refused, naming the difference. ``overwrite`` measures into a staging folder
        beside the old one, swapped in by :meth:`commit`; an interrupted overwrite under the same fingerprint
        resumes its staging folder."""
        self.folder(probe)  # checks the name
        options = _jsonable(options)
        fp = _jsonable({**(fingerprint or {}), "options": options})
        self._recover(probe)
        if overwrite:
            d = self.root / f".{probe}.new"
            if d.exists():
                try:
                    same = read_json(d / FINGERPRINT, "") == fp
                except StoreError:
                    same = False
                if not same:  # an interrupted overwrite under other settings: start it again
                    shutil.rmtree(d)
                else:
                    remove_orphans(d)
            self._staging[probe] = d
        else:
            d = self.folder(probe)
            if d.exists():  # a writer killed mid-part leaves its temporary file behind
                remove_orphans(d)
            if self.steps(probe) or self.has_final(probe):
                self._check_resume(probe, options, fp)
        write_json_atomic(fp, d / FINGERPRINT)
        write_json_atomic(options, d / OPTIONS)

    def follow(self, probe: str, overwrite: bool = False) -> None:
        """Write ``probe`` where another rank of this job, which called :meth:`begin`, writes it (its staging
        folder when ``overwrite``); records and checks nothing, since that rank did."""
        self.folder(probe)  # checks the name
        if overwrite:
            self._staging[probe] = self.root / f".{probe}.new"

    def _check_resume(self, probe: str, options: dict, fp: dict) -> None:
        again = ("pass overwrite=True (workbench measure --overwrite) to measure it again (the old table stays "
                 "until the new one is complete), or measure into another store (store_root=...)")
        stored = self.fingerprint(probe)
        if stored is None:  # a store from before fingerprints: only its options can be compared
            old = self.options(probe)
            if old is None:
                raise StoreError(f"{self.folder(probe)} holds parts but neither {FINGERPRINT} nor {OPTIONS}, so what "
                                 f"they were measured with is unknown; {again}")
            if old != options:
                changed = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
                raise StoreError(
                    f"probe {probe!r} in {self.root} was measured with other options ({', '.join(changed)} differ: "
                    f"stored {[old.get(k) for k in changed]}, asked {[options.get(k) for k in changed]}); {again}")
            # Resumed with a warning rather than refused: its options were checked as they always were, and
            # refusing would make every store written before fingerprints be measured again.
            warnings.warn(
                f"{self.folder(probe)} was written before stores recorded fingerprints: its options match, but its "
                "samples, dtype and model cannot be checked; resuming under the current ones (measure with "
                "overwrite=True to be sure)", StoreFormatWarning, stacklevel=3)
        elif stored != fp:
            what = "options" if {k for k in set(stored) | set(fp) if stored.get(k) != fp.get(k)} == {"options"} \
                else "settings"
            raise StoreError(f"probe {probe!r} in {self.root} was measured with other {what} "
                             f"({'; '.join(differences(stored, fp))}); resuming would mix them in one table: {again}")

    def commit(self, probe: str) -> None:
        """Swap a finished overwrite of ``probe`` in for the old table (no-op when none is in progress)."""
        staging = self._staging.pop(probe, None)
        if staging is None:
            return
        target, old = self.root / probe, self.root / f".{probe}.old"
        with _writing(target):
            (staging / _COMPLETE).touch()
            if old.exists():
                shutil.rmtree(old)
            if target.exists():
                os.rename(target, old)
            os.rename(staging, target)
            (target / _COMPLETE).unlink()
            shutil.rmtree(old, ignore_errors=True)

    def _recover(self, probe: str) -> None:
        """Finish or undo a swap that a crash interrupted between its two renames."""
        target, old, new = self.root / probe, self.root / f".{probe}.old", self.root / f".{probe}.new"
        if old.exists():
            if not target.exists():
                os.rename(new if (new / _COMPLETE).exists() else old, target)
            shutil.rmtree(old, ignore_errors=True)
        if (target / _COMPLETE).exists():
            (target / _COMPLETE).unlink()

    def clear(self, probe: str) -> None:
        d = self.folder(probe)
        if d.exists():
            for f in d.iterdir():
                if f.suffix in (".parquet", ".json", ".tmp"):
                    f.unlink()

    # --- writing ------------------------------------------------------------------------------------------
    def write(self, probe: str, step: int, df: pl.DataFrame) -> Path:
        """Write the part of ``probe`` at ``step``, atomically."""
        const = {"step": step, "probe": probe} | ({"run": self.run} if self.run else {})
        df = tidy(df, **const)
        check_unique_keys(df, f"the part of {probe!r} at step {step}")
        path = self.folder(probe) / f"step_{step:06d}.parquet"
        write_parquet_atomic(df, path)
        return path

    def write_final(self, probe: str, df: pl.DataFrame) -> Path:
        """Write a result computed across checkpoints (``step`` as the rows give it)."""
        const = {"probe": probe} | ({"run": self.run} if self.run else {})
        df = tidy(df, **const)
        check_unique_keys(df, f"the final table of {probe!r}")
        path = self.folder(probe) / FINAL
        write_parquet_atomic(df, path)
        return path

    def has_final(self, probe: str) -> bool:
        return (self.folder(probe) / FINAL).exists()

    # --- reading ------------------------------------------------------------------------------------------
    def _files(self, probes: Iterable[str], final: bool | None) -> list[Path]:
        files = []
        for probe in probes:
            d = self.folder(probe)
            if not d.exists():
                continue
            parts = sorted(f for f in d.iterdir() if _PART.match(f.name))
            fin = [d / FINAL] if (d / FINAL).exists() else []
            files += {None: parts + fin, True: fin, False: parts}[final]
        return files

    def table(
        self, probe: str | Iterable[str] | None = None, *, metric: str | None = None, final: bool | None = None
    ) -> pl.DataFrame:
        """All rows of one probe, several, or every probe, sorted by the key columns.

        ``final=True`` reads only results computed across checkpoints, ``False`` only per-checkpoint parts.
        A part that cannot be read raises StoreError naming it.
        """
        if probe is None:
            probes = self.probes()
        elif isinstance(probe, str):
            if probe not in self.probes():
                raise StoreError(
                    f"the store at {self.root} has no probe {probe!r}; it has {self.probes()}. "
                    "Measure it first (workbench measure, or workbench.measure)"
                )
            probes = [probe]
        else:
            probes = list(probe)
        files = self._files(probes, final)
        if not files:
            return tidy(pl.DataFrame({"value": []}, schema={"value": pl.Float64}))
        df = pl.concat([read_part(f, self._fix) for f in files], how="diagonal_relaxed")
        if metric is not None:
            df = df.filter(pl.col("metric") == metric)
        order = [c for c in KEYS if c != "value"] + [c for c in df.columns if c not in SCHEMA]
        return df.sort(order, nulls_last=False, maintain_order=True)

    # --- checking -----------------------------------------------------------------------------------------
    def verify(self) -> list[Problem]:
        """Everything wrong in the store: parts and metadata that cannot be read or do not hold what their name
        says, temporary files of dead writers, a stale lock, an interrupted overwrite. Reads, never writes."""
        if not self.root.is_dir():
            raise StoreError(f"there is no store at {self.root}")
        problems = []
        for f in sorted(self.root.glob(f"{LOCK_NAME}.*")):  # a lock being created, or one set aside
            pid = f.name[len(LOCK_NAME) + 1:].split(".")[0]
            if not (pid.isdigit() and alive(int(pid))):
                problems.append(Problem(f, "a lock file left by a writer that no longer runs"))
        lock = self.root / LOCK_NAME
        holder = read_lock(lock)
        if holder is not None:
            problems.append(Problem(lock, f"held by {describe(holder)}" + (", which no longer runs" if stale(holder)
                                                                          else ""), repairable=stale(holder)))
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if d.name.endswith(".new") and d.name.startswith("."):
                problems.append(Problem(d, "an overwrite that did not finish: measuring with overwrite=True resumes "
                                           "it; the table beside it is the old one, whole", repairable=False))
                continue
            if d.name.endswith(".old") and d.name.startswith("."):
                problems.append(Problem(d, "the old table of an interrupted swap (repair finishes the swap)"))
                continue
            if d.name.startswith((".", "_")):
                continue
            problems += self._verify_probe(d)
        return problems

    def _verify_probe(self, d: Path) -> list[Problem]:
        problems = []
        for f in sorted(d.glob(".*.tmp")):
            pid = _temp_pid(f)
            if pid is not None and alive(pid):
                problems.append(Problem(f, f"being written by process {pid}", repairable=False))
            else:
                problems.append(Problem(f, "a temporary file left by a writer that no longer runs"))
        meta = {}
        for name in (FINGERPRINT, OPTIONS):
            try:
                meta[name] = read_json(d / name, "")
            except StoreError as exc:
                meta[name] = exc
                problems.append(Problem(d / name, f"cannot be read ({exc.__cause__})"))
        if not any(isinstance(v, dict) for v in meta.values()) and any(d.glob("*.parquet")):
            problems.append(Problem(d, f"its parts have no readable {FINGERPRINT} or {OPTIONS}: what they were "
                                       "measured with is unknown (repair removes them)"))
        for f in sorted(d.iterdir()):
            m = _PART.match(f.name)
            if m or f.name == FINAL:
                why = _check_part(f, d.name, int(m.group(1)) if m else None)
                if why:
                    problems.append(Problem(f, why))
        return problems

    def repair(self) -> list[Problem]:
        """Remove what :meth:`verify` finds corrupt (a resume then measures it again), under the writer lock;
        returns the problems it fixed. A corrupt options.json is rewritten from the fingerprint."""
        with self.lock():
            fixed = []
            for p in self.verify():
                if not p.repairable:
                    continue
                if p.path.name == LOCK_NAME:
                    continue  # taking the lock above has taken over the stale one
                if p.path.name.endswith(".old"):
                    self._recover(p.path.name[1: -len(".old")])
                elif p.path.is_dir():  # parts whose options are unknown: the whole table
                    for f in p.path.glob("*.parquet"):
                        f.unlink()
                elif p.path.name == OPTIONS and isinstance(fp := _try_json(p.path.parent / FINGERPRINT), dict):
                    write_json_atomic(fp.get("options", {}), p.path)
                else:
                    p.path.unlink(missing_ok=True)
                fixed.append(p)
            return fixed


def _try_json(path: Path):
    try:
        return read_json(path, "")
    except StoreError:
        return None


def _check_part(path: Path, probe: str, step: int | None) -> str | None:
    """Why a part is bad, or None: unreadable, missing key columns, rows of another probe or step, two rows under
    one key."""
    try:
        df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        return f"cannot be read ({str(exc).splitlines()[0]})"
    missing = [c for c in KEYS if c not in df.columns]
    if missing:
        return f"lacks the key columns {missing}"
    wrong = [f"{c} is {df.schema[c]}" for c in KEYS if df.schema[c] != SCHEMA[c]]
    if wrong:
        return f"has columns of the wrong type ({', '.join(wrong)})"
    if df.height and set(df["probe"].unique().to_list()) != {probe}:
        return f"holds rows of probe(s) {df['probe'].unique().to_list()}, not {probe!r}"
    if step is not None and df.height and set(df["step"].unique().to_list()) != {step}:
        return f"holds rows of step(s) {df['step'].unique().to_list()}, not {step}"
    try:
        check_unique_keys(df, "it")
    except StoreError as exc:
        return str(exc).split("; a table")[0]
    return None
