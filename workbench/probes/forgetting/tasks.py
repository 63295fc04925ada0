"""Tasks answered by choosing one of a few single-token options, and the files a forgetting run keeps them in."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F

from workbench.errors import InputError
from workbench.runs import Run
from workbench.samples import IGNORE, SampleSet
from workbench.store import write_parquet_atomic


def scored_position(targets: list[int], sample_id: str) -> int:
    pos = [i for i, t in enumerate(targets) if t != IGNORE]
    if len(pos) != 1:
        raise InputError(
            f"sample {sample_id!r} scores {len(pos)} positions; a choice task needs single-token answers (exactly "
            "one scored position holding the right option's token)"
        )
    return pos[0]


@dataclass
class ChoiceTask:
    """A task answered by choosing one of a few single-token options.

    ``samples``: groups are the splits (``train``, ``test``, ...); each sample scores exactly one position,
    whose target is the right option's token. ``options``: [samples, k] token ids of each sample's options.
    """

    name: str
    samples: SampleSet
    options: torch.Tensor

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name or "/" in self.name:
            raise InputError(f"a task name must be non-empty without ':' or '/'; got {self.name!r}")
        self.options = torch.as_tensor(self.options).long()
        n = len(self.samples)
        if self.options.dim() != 2 or self.options.shape[0] != n or self.options.shape[1] < 2:
            raise InputError(f"options must be [samples, k >= 2] for {n} samples; got {tuple(self.options.shape)}")
        self.positions = [scored_position(t, i) for t, i in zip(self.samples.targets, self.samples.ids)]
        right = torch.tensor([t[p] for t, p in zip(self.samples.targets, self.positions)])
        hit = self.options == right[:, None]
        bad = (hit.sum(1) != 1).nonzero()
        if len(bad):
            i = int(bad[0])
            raise InputError(
                f"sample {self.samples.ids[i]!r} of task {self.name!r}: its answer token {int(right[i])} must be "
                f"exactly one of its options {self.options[i].tolist()}"
            )
        self.labels = hit.long().argmax(1)

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, indices: Sequence[int]) -> "ChoiceTask":
        idx = list(indices)
        return ChoiceTask(self.name, self.samples.select(idx), self.options[torch.as_tensor(idx, dtype=torch.long)])

    def split(self, group: str) -> "ChoiceTask":
        return self.select(self.samples.indices(group))

    def relabeled(self, labels) -> SampleSet:
        """The samples with the option ``labels[i]`` as answer (for fine-tuning on random or flipped labels)."""
        labels = torch.as_tensor(labels).long()
        targets = []
        for t, p, row, lab in zip(self.samples.targets, self.positions, self.options.tolist(), labels.tolist()):
            t = list(t)
            t[p] = row[lab]
            targets.append(t)
        s = self.samples
        return SampleSet(ids=list(s.ids), groups=list(s.groups), input_ids=list(s.input_ids), targets=targets)

    def prefixed(self, split: str | None = None) -> tuple[SampleSet, torch.Tensor]:
        """The samples (of one split, or all) with ids ``task/id`` and groups ``task:split``, and their options,
        ready to be combined with other tasks' in one run."""
        t = self.split(split) if split is not None else self
        s = t.samples
        return (
            SampleSet(ids=[f"{self.name}/{i}" for i in s.ids], groups=[f"{self.name}:{g}" for g in s.groups],
                      input_ids=list(s.input_ids), targets=list(s.targets)),
            t.options,
        )


def combine(parts: Sequence[tuple[SampleSet, torch.Tensor]]) -> tuple[SampleSet, torch.Tensor]:
    """Concatenate (samples, options) pairs (options padded with -1 to the widest)."""
    k = max(o.shape[1] for _, o in parts)
    ids, groups, inputs, targets, opts = [], [], [], [], []
    for s, o in parts:
        ids += s.ids
        groups += s.groups
        inputs += s.input_ids
        targets += s.targets
        opts.append(F.pad(o, (0, k - o.shape[1]), value=-1))
    return SampleSet(ids=ids, groups=groups, input_ids=inputs, targets=targets), torch.cat(opts)


def save_choices(folder: str | os.PathLike, samples: SampleSet, options: torch.Tensor) -> None:
    df = pl.DataFrame({"sample_id": samples.ids, "options": options.tolist()},
                      schema={"sample_id": pl.String, "options": pl.List(pl.Int64)})
    write_parquet_atomic(df, Path(folder) / "choices.parquet")


def load_choices(run: Run) -> dict[str, list[int]]:
    """sample id → its answer options (without padding), from a run folder's ``choices.parquet``."""
    f = run.folder / "choices.parquet"
    if not f.exists():
        raise InputError(f"run {run.name!r} has no choices.parquet; it was not made by forget() or toys.tasks")
    df = pl.read_parquet(f)
    return {i: [o for o in opts if o >= 0] for i, opts in zip(df["sample_id"], df["options"])}


__all__ = ["ChoiceTask", "combine", "load_choices", "save_choices", "scored_position"]
