"""The Parquet store: long-format tables, one folder per probe, one file per checkpoint.

Every table shares the key columns of :data:`SCHEMA` (``run, step, probe, metric, group, sample_id, layer,
value``); a column that does not apply is null. A probe may add key columns of its own (``expert``,
``query_id``, ``bin`` ...). Layout::

    <root>/
        <probe>/
            options.json        the options the probe was measured with (a resume must match them)
            step_000100.parquet one part per checkpoint
            final.parquet       results computed across all checkpoints, if the probe has any

Each part is written to a temporary file and renamed, so a killed measurement leaves only whole parts, and
a resumed one starts at the first checkpoint without a part. Read with polars, pandas or DuckDB
(``read_parquet('<root>/*/*.parquet', union_by_name=true)``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from workbench.errors import StoreError

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
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _temp_file(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` whose name carries this process's id, so that one left behind by a
    killed writer can be told from one still being written (:func:`remove_orphans`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files in ``folder`` left by writers that no longer run (killed mid-write); the
    parts they were writing were never renamed into place, so nothing measured is lost. Returns them."""
    removed = []
    for f in Path(folder).glob(".*.tmp"):
        parts = f.name[: -len(".tmp")].split(".")
        pid = parts[-2] if len(parts) >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def write_parquet_atomic(df: pl.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    os.close(fd)
    try:
        df.write_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    fd, tmp = _temp_file(path)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


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

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, probes={self.probes()})"

    # --- layout -------------------------------------------------------------------------------------------
    def _dir(self, probe: str) -> Path:
        if not _NAME.match(probe):
            raise StoreError(f"probe name {probe!r} may hold only letters, digits, '_', '-' and '.'")
        return self.root / probe

    def probes(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))

    def steps(self, probe: str) -> list[int]:
        """Checkpoint steps that have a finished part for ``probe``."""
        d = self._dir(probe)
        if not d.exists():
            return []
        return sorted(int(m.group(1)) for f in d.iterdir() if (m := _PART.match(f.name)))

    def has(self, probe: str, step: int) -> bool:
        return (self._dir(probe) / f"step_{step:06d}.parquet").exists()

    # --- options: a resume must use what the first part was measured with ------------------------------------
    def options(self, probe: str) -> dict | None:
        f = self._dir(probe) / "options.json"
        return json.loads(f.read_text()) if f.exists() else None

    def begin(self, probe: str, options: dict, overwrite: bool = False) -> None:
        """Record ``options`` for ``probe``; refuse to resume under different options unless ``overwrite``,
        which removes the probe's parts first."""
        options = json.loads(json.dumps(options, sort_keys=True, default=str))
        if self._dir(probe).exists():  # a writer killed mid-part leaves its temporary file behind
            remove_orphans(self._dir(probe))
        old = self.options(probe)
        if overwrite:
            self.clear(probe)
        elif old is not None and old != options and (self.steps(probe) or self.has_final(probe)):
            changed = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
            raise StoreError(
                f"probe {probe!r} in {self.root} was measured with other options ({', '.join(changed)} "
                f"differ: stored {[old.get(k) for k in changed]}, asked {[options.get(k) for k in changed]}); "
                "pass overwrite=True (workbench measure --overwrite) to measure it again, or measure into another store "
                "(Run.from_folder(..., store_root=...))"
            )
        write_json_atomic(options, self._dir(probe) / "options.json")

    def clear(self, probe: str) -> None:
        d = self._dir(probe)
        if d.exists():
            for f in d.iterdir():
                if f.suffix in (".parquet", ".json", ".tmp"):
                    f.unlink()

    # --- writing ------------------------------------------------------------------------------------------
    def write(self, probe: str, step: int, df: pl.DataFrame) -> Path:
        """Write the part of ``probe`` at ``step``, atomically."""
        const = {"step": step, "probe": probe} | ({"run": self.run} if self.run else {})
        df = tidy(df, **const)
        path = self._dir(probe) / f"step_{step:06d}.parquet"
        write_parquet_atomic(df, path)
        return path

    def write_final(self, probe: str, df: pl.DataFrame) -> Path:
        """Write a result computed across checkpoints (``step`` as the rows give it)."""
        const = {"probe": probe} | ({"run": self.run} if self.run else {})
        path = self._dir(probe) / "final.parquet"
        write_parquet_atomic(tidy(df, **const), path)
        return path

    def has_final(self, probe: str) -> bool:
        return (self._dir(probe) / "final.parquet").exists()

    # --- reading ------------------------------------------------------------------------------------------
    def _files(self, probes: Iterable[str], final: bool | None) -> list[Path]:
        files = []
        for probe in probes:
            d = self._dir(probe)
            if not d.exists():
                continue
            parts = sorted(f for f in d.iterdir() if _PART.match(f.name))
            fin = [d / "final.parquet"] if (d / "final.parquet").exists() else []
            files += {None: parts + fin, True: fin, False: parts}[final]
        return files

    def table(
        self, probe: str | Iterable[str] | None = None, *, metric: str | None = None, final: bool | None = None
    ) -> pl.DataFrame:
        """All rows of one probe, several, or every probe, sorted by the key columns.

        ``final=True`` reads only results computed across checkpoints, ``False`` only per-checkpoint parts.
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
        df = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
        if metric is not None:
            df = df.filter(pl.col("metric") == metric)
        order = [c for c in KEYS if c != "value"] + [c for c in df.columns if c not in SCHEMA]
        return df.sort(order, nulls_last=False, maintain_order=True)
