"""Sample sets: the texts a run is measured on, each with a stable id and a group.

A sample is a token sequence ``input_ids`` with ``targets`` of the same length, already shifted:
``targets[t]`` is the token the model should predict from position ``t``, or -100 (:data:`IGNORE`) where nothing
is scored. A pretraining text scores every next token; a modular-addition sample scores only its answer; a
(prompt, completion) pair scores only the completion. Loss and accuracy of a sample are means over its
scored positions.

Checked when a set is made, so that nothing wrong reaches a model: token ids are integers (a float or a bool
is refused, never truncated) and non-negative; a target is a token id or -100, any other negative is refused;
ids are unique; no group takes the reserved name of the overall group (:data:`OVERALL`). Against a model
(:meth:`SampleSet.fit`): ids within its vocabulary, lengths within its positions (longer samples are refused,
or cut when asked).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from workbench.errors import InputError, TokenizerMismatchError
from workbench.store import write_parquet_atomic

#: The one target value that means "nothing is scored here" (the ``ignore_index`` of torch's cross-entropy).
IGNORE = -100
#: The group every sample belongs to besides its own: tables hold one row for it beside each group's. Reserved:
#: no sample's group may be named so (nor ``all:<split>``, whose task would be this name too).
OVERALL = "all"
#: The group of samples made without groups (OVERALL is taken by the overall group).
DEFAULT_GROUP = "samples"


def check_group(name: str) -> None:
    """Refuse the overall group's reserved name (and ``all:<split>``) as a sample's group."""
    if name == OVERALL or name.startswith(OVERALL + ":"):
        raise InputError(
            f"group {name!r} uses the reserved name {OVERALL!r}: every table already has an overall {OVERALL!r} "
            f"row holding every sample, so a group of that name would give two values under one key; rename the "
            f"group (e.g. {DEFAULT_GROUP!r}, or leave groups out for one group)"
        )


def _token_ids(values, sid: str, what: str) -> list[int]:
    """One sample's ``input_ids`` or ``targets`` as a list of Python ints; floats and bools are refused (a float
    id would be truncated, a bool read as 0 or 1)."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        kind = values.dtype
        integral = (not values.is_floating_point() and not values.is_complex() and kind != torch.bool
                    if isinstance(values, torch.Tensor) else np.issubdtype(kind, np.integer))
        if not integral or values.ndim != 1:
            raise InputError(f"the {what} of sample {sid!r} are a {values.ndim}-d {kind} array; token ids are a 1-d "
                             "sequence of integers (a float id would be truncated)")
        return values.tolist()
    values = list(values)
    if all(type(v) is int for v in values):  # the usual case, checked at C speed
        return values
    out = []
    for pos, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise InputError(
                f"the {what} of sample {sid!r} hold {v!r} ({type(v).__name__}) at position {pos}; token ids are "
                "integers (a float id would be truncated, a bool read as 0 or 1): tokenize again, or cast with int()"
            )
        out.append(int(v))
    return out


def per_group(groups: Sequence[str]) -> list[tuple[str, torch.Tensor]]:
    """Each group of ``groups`` (one label per sample) with the indices of its samples, in order of first
    appearance, then :data:`OVERALL` with every index: the rows a per-group table holds."""
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    rows = [(g, torch.tensor(idx, dtype=torch.long)) for g, idx in index.items()]
    return rows + [(OVERALL, torch.arange(len(groups)))]


def answer_tokens(targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """The last scored target of each sample (-1 where nothing is scored)."""
    out = []
    for t in targets:
        scored = [v for v in t if v != IGNORE]
        out.append(scored[-1] if scored else -1)
    return torch.tensor(out, dtype=torch.long)


def split_group(group: str) -> tuple[str, str]:
    """``"task:split"`` → (task, split); a group without ':' is split ``group`` of task :data:`OVERALL`."""
    task, sep, split = group.rpartition(":")
    return (task, split) if sep else (OVERALL, group)


def shift_completion(prompt: Sequence[int], completion: Sequence[int]) -> tuple[list[int], list[int]]:
    """Inputs and targets of a (prompt, completion) pair whose completion alone is scored: the model sees the
    prompt and all but the last completion token, and position t predicts token t + 1."""
    full = list(prompt) + list(completion)
    return full[:-1], [IGNORE] * (len(prompt) - 1) + list(completion)


@dataclass
class SampleSet:
    ids: list[str]
    groups: list[str]
    input_ids: list[list[int]]
    targets: list[list[int]]
    lengths: list[int] = field(init=False, repr=False)
    _max_token: int | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (len(self.groups) == len(self.input_ids) == len(self.targets) == n):
            raise InputError(
                f"a sample set needs one id, group, input and target list per sample; got {n} ids, "
                f"{len(self.groups)} groups, {len(self.input_ids)} inputs and {len(self.targets)} targets"
            )
        if n == 0:
            raise InputError("the sample set is empty; give at least one sample")
        self.ids = [str(i) for i in self.ids]
        self.groups = [str(g) for g in self.groups]
        if len(set(self.ids)) != n:
            seen: set[str] = set()
            dup = next(i for i in self.ids if i in seen or seen.add(i))
            raise InputError(f"sample ids must be unique; {dup!r} is given twice: give each sample its own id")
        for g in dict.fromkeys(self.groups):
            check_group(g)
        self.input_ids = [_token_ids(x, sid, "input ids") for x, sid in zip(self.input_ids, self.ids)]
        self.targets = [_token_ids(y, sid, "targets") for y, sid in zip(self.targets, self.ids)]
        self.lengths = [len(x) for x in self.input_ids]
        for sid, x, y in zip(self.ids, self.input_ids, self.targets):
            if len(x) == 0:
                raise InputError(f"sample {sid!r} has no tokens; drop it or give it text")
            if len(y) != len(x):
                raise InputError(
                    f"sample {sid!r} has {len(x)} input tokens but {len(y)} targets; targets must be "
                    f"aligned with the inputs (use {IGNORE} where nothing is scored)"
                )
            if min(x) < 0:
                raise InputError(f"sample {sid!r} has a negative input id ({min(x)}); token ids start at 0")
            if min(y) < 0 and any(t < 0 and t != IGNORE for t in y):
                bad = next(t for t in y if t < 0 and t != IGNORE)
                raise InputError(
                    f"sample {sid!r} has the target {bad}; a target is a token id, or {IGNORE} where nothing is "
                    f"scored (the one ignore value: {bad} would be scored as a token)"
                )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def group_names(self) -> list[str]:
        return list(dict.fromkeys(self.groups))

    def indices(self, group: str) -> list[int]:
        idx = [i for i, g in enumerate(self.groups) if g == group]
        if not idx:
            raise InputError(f"no sample is in group {group!r}; the groups are {self.group_names}")
        return idx

    def select(self, indices: Sequence[int]) -> "SampleSet":
        return SampleSet(
            ids=[self.ids[i] for i in indices],
            groups=[self.groups[i] for i in indices],
            input_ids=[self.input_ids[i] for i in indices],
            targets=[self.targets[i] for i in indices],
        )

    def group(self, name: str) -> "SampleSet":
        return self.select(self.indices(name))

    def max_token(self) -> int:
        """The largest token id among the inputs and the scored targets."""
        if self._max_token is None:
            self._max_token = max(max(max(x), max(y)) for x, y in zip(self.input_ids, self.targets))
        return self._max_token

    def fit(self, vocab_size: int | None = None, n_positions: int | None = None, *,
            truncate: bool = False) -> "SampleSet":
        """These samples checked against a model that takes ``vocab_size`` token ids and ``n_positions`` tokens
        (None: not known, not checked). A token id outside the vocabulary raises TokenizerMismatchError; a sample
        longer than ``n_positions`` raises InputError, or with ``truncate=True`` is cut to its first
        ``n_positions`` tokens (its targets with it). Returns this set, or the cut copy."""
        if vocab_size is not None and self.max_token() >= vocab_size:
            sid = next(i for i, x, y in zip(self.ids, self.input_ids, self.targets) if max(max(x), max(y)) >= vocab_size)
            raise TokenizerMismatchError(
                f"sample token ids reach {self.max_token()} (first in sample {sid!r}) but the model's vocabulary has "
                f"{vocab_size} tokens; tokenize the samples with the model's own tokenizer"
            )
        if n_positions is None or max(self.lengths) <= n_positions:
            return self
        long = [(sid, n) for sid, n in zip(self.ids, self.lengths) if n > n_positions]
        if not truncate:
            names = ", ".join(f"{sid!r} ({n} tokens)" for sid, n in long[:3])
            raise InputError(
                f"{len(long)} sample(s) are longer than the model's {n_positions} positions: {names}; shorten or split "
                "them, or pass truncate=True (workbench measure --truncate) to cut them to their first "
                f"{n_positions} tokens"
            )
        cut = SampleSet(self.ids, self.groups, [x[:n_positions] for x in self.input_ids],
                        [y[:n_positions] for y in self.targets])
        return cut

    def padded(self, indices: Sequence[int], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids``, ``targets`` (-100 on padding) and ``attention_mask`` for a batch."""
        width = max(self.lengths[i] for i in indices)
        # Pad as Python lists and convert once: one tensor per sample costs more than the forward pass of a
        # small model.
        x = torch.tensor([self.input_ids[i] + [pad_id] * (width - self.lengths[i]) for i in indices], dtype=torch.long)
        y = torch.tensor([self.targets[i] + [IGNORE] * (width - self.lengths[i]) for i in indices], dtype=torch.long)
        mask = torch.tensor([[1] * self.lengths[i] + [0] * (width - self.lengths[i]) for i in indices], dtype=torch.long)
        return x, y, mask

    # --- construction from text -------------------------------------------------------------------------
    @classmethod
    def from_token_lists(
        cls, tokens: Sequence[Sequence[int]], ids: Sequence[str] | None = None, groups: Sequence[str] | None = None
    ) -> "SampleSet":
        """Language-model samples: every next token is scored. Without ``groups``, all are in one group named
        :data:`DEFAULT_GROUP`."""
        tokens = [_token_ids(t, str(ids[i] if ids is not None and i < len(ids) else i), "tokens")
                  for i, t in enumerate(tokens)]
        return cls(
            ids=list(ids) if ids is not None else [str(i) for i in range(len(tokens))],
            groups=list(groups) if groups is not None else [DEFAULT_GROUP] * len(tokens),
            input_ids=tokens,
            targets=[t[1:] + [IGNORE] for t in tokens],
        )

    @classmethod
    def from_texts(
        cls,
        tokenizer,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
        max_length: int | None = None,
    ) -> "SampleSet":
        """Tokenize texts with a Hugging Face tokenizer; every next token is scored."""
        enc = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length)["input_ids"]
        return cls.from_token_lists(enc, ids, groups)

    @classmethod
    def from_prompt_completion(
        cls,
        tokenizer,
        prompts: Sequence[str],
        completions: Sequence[str],
        ids: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
    ) -> "SampleSet":
        """(prompt, completion) pairs: only the completion's tokens are scored."""
        inputs, targets = [], []
        for k, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            pt = tokenizer(p)["input_ids"]
            ct = tokenizer(c, add_special_tokens=False)["input_ids"]
            if not ct:
                raise InputError(f"completion {k} is empty; every query needs at least one completion token")
            x, y = shift_completion(pt, ct)
            inputs.append(x)
            targets.append(y)
        n = len(inputs)
        return cls(
            ids=list(ids) if ids is not None else [str(i) for i in range(n)],
            groups=list(groups) if groups is not None else [DEFAULT_GROUP] * n,
            input_ids=inputs,
            targets=targets,
        )

    def digest(self) -> str:
        """A short hash of the ids, tokens and targets: equal digests, equal samples."""
        h = hashlib.sha1()
        for sid, x, y in zip(self.ids, self.input_ids, self.targets):
            h.update(json.dumps([sid, x, y]).encode())
        return h.hexdigest()[:12]

    # --- persistence ----------------------------------------------------------------------------------------
    def to_frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            {"sample_id": self.ids, "group": self.groups, "input_ids": self.input_ids, "targets": self.targets},
            schema={
                "sample_id": pl.String,
                "group": pl.String,
                "input_ids": pl.List(pl.Int64),
                "targets": pl.List(pl.Int64),
            },
        )

    def save(self, path: str | os.PathLike) -> None:
        write_parquet_atomic(self.to_frame(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SampleSet":
        df = pl.read_parquet(path)
        return cls(
            ids=df["sample_id"].to_list(),
            groups=df["group"].to_list(),
            input_ids=df["input_ids"].to_list(),
            targets=df["targets"].to_list(),
        )


def read_samples(path: str | os.PathLike, tokenizer, *, group: str | None = None) -> tuple[SampleSet, pl.DataFrame]:
    """Samples from a JSONL, JSON, CSV or Parquet file, one row per sample, tokenized with ``tokenizer``.

    Columns: ``text`` (every next token is scored), or ``prompt`` and ``completion`` (only the completion is
    scored; ``text`` with ``target`` means the same), optional ``id`` (where missing: the row number) and
    ``group`` (where missing: ``group``, else the file's stem; :data:`OVERALL` is reserved). Rows may mix the two kinds. The completion is tokenized
    without special tokens and appended to the prompt's tokens, so give it the leading space the tokenizer
    expects. Returns the samples and the file's columns keyed by ``sample_id`` (for views to show).
    """
    path = Path(path)
    readers = {".jsonl": pl.read_ndjson, ".ndjson": pl.read_ndjson, ".json": pl.read_json, ".csv": pl.read_csv,
               ".parquet": pl.read_parquet}
    if path.suffix not in readers:
        raise InputError(f"{path} is not a samples file: give a .jsonl, .json, .csv or .parquet file")
    if not path.exists():
        raise InputError(f"no samples file at {path}")
    try:
        df = readers[path.suffix](path)
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise InputError(f"{path} cannot be read as {path.suffix[1:]} ({exc}); check the file") from exc
    if df.is_empty():
        raise InputError(f"{path} holds no samples; give one row per sample")
    if "target" in df.columns and "completion" not in df.columns:
        df = df.rename({"target": "completion"}).with_columns(prompt=pl.col("text"))
    has_text, has_pair = "text" in df.columns, {"prompt", "completion"} <= set(df.columns)
    if not has_text and not has_pair:
        raise InputError(f"{path} has columns {df.columns}; a samples file needs 'text', or 'prompt' and "
                         "'completion' (or 'text' and 'target')")
    column = lambda name: df[name].to_list() if name in df.columns else [None] * df.height  # noqa: E731
    ids = [str(k) if i is None else str(i) for k, i in enumerate(column("id"))]
    stem = path.stem if path.stem != OVERALL else DEFAULT_GROUP  # a file named all.jsonl: OVERALL is reserved
    groups = [group or stem if g is None else str(g) for g in column("group")]
    inputs, targets = [], []
    for k, row in enumerate(df.iter_rows(named=True)):
        prompt, completion = (row.get("prompt"), row.get("completion")) if has_pair else (None, None)
        if prompt is not None and completion is not None:
            c = tokenizer(str(completion), add_special_tokens=False)["input_ids"]
            if not c:
                raise InputError(f"sample {ids[k]!r} of {path} has an empty completion; give it at least one token")
            x, y = shift_completion(tokenizer(str(prompt))["input_ids"], c)
        elif row.get("text") is not None:
            x = list(tokenizer(str(row["text"]))["input_ids"])
            y = x[1:] + [IGNORE]
        else:
            raise InputError(f"sample {ids[k]!r} of {path} has neither a text nor a prompt and a completion")
        inputs.append(x)
        targets.append(y)
    info = df.drop([c for c in ("id", "group") if c in df.columns]).with_columns(sample_id=pl.Series(ids))
    return SampleSet(ids=ids, groups=groups, input_ids=inputs, targets=targets), info


def length_buckets(lengths: Sequence[int], token_budget: int = 16384, max_batch: int = 4096) -> list[list[int]]:
    """Batches of sample indices sorted by length, each within ``token_budget`` padded tokens.

    Sorting by length keeps padding small; the order inside the result is by length, so callers scatter
    results back by index.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[i]  # the longest so far, since the order is ascending
        if cur and ((len(cur) + 1) * width > token_budget or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches
