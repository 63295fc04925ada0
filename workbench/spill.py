"""Per-sample tensors within a memory budget: in memory up to it, memory-mapped files past it.

Capture fills [samples, ...] tensors batch by batch (routing weights, applied weights, expert load, hidden
states); they grow with the sample count, so at 10,000 samples of a 7B model's hidden states they outgrow the
host. :class:`RowBuffers` hands out such tensors: plain ones while their total stays within the budget, and
past it tensors mapped onto files (``torch.from_file(shared=True)``), which the kernel writes back and evicts
as it needs: what the process holds in its own (anonymous) memory stays flat as the samples grow, and the
measurements read the tensors as they always did. A file is unlinked as soon as it is mapped, so a killed
process leaves nothing behind; put the folder on a disk, not on a RAM-backed /tmp.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import torch

from workbench.errors import InputError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(value: int | float | str | None) -> int | None:
    """A memory size as bytes: an integer, or text such as ``"512MiB"``, ``"2GB"``, ``"1.5g"``; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"a memory size is a number of bytes or text like '2GiB', not {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise InputError(f"cannot read {value!r} as a memory size; write bytes or e.g. '512MiB', '2GB'")
        number, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(number) or number < 0:
        raise InputError(f"a memory size must be a non-negative number of bytes, not {value!r}")
    return int(number * _UNITS[unit])


def mapped_tensor(shape: tuple[int, ...], dtype: torch.dtype, folder: str | os.PathLike | None = None) -> torch.Tensor:
    """An uninitialized tensor backed by a file in ``folder`` (the temporary folder by default), unlinked at once."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=".spill.", suffix=".bin", dir=folder)
    try:
        os.ftruncate(fd, nbytes)
        t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)  # the mapping keeps the file's pages; its name is not needed any more
    return t.view(shape)


class RowBuffers:
    """Makes capture's [N, ...] tensors: in memory while their total is within ``budget`` bytes (None: no
    budget), memory-mapped files in ``folder`` past it. ``held`` and ``spilled`` count the bytes of each."""

    def __init__(self, budget: int | str | None = None, folder: str | os.PathLike | None = None,
                 pin_memory: bool = False):
        self.budget = parse_bytes(budget)
        self.folder, self.pin_memory = folder, pin_memory
        self.held = self.spilled = 0

    def rows(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.budget is None or self.held + nbytes <= self.budget:
            self.held += nbytes
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)
        self.spilled += nbytes
        return mapped_tensor(shape, dtype, self.folder)


__all__ = ["RowBuffers", "mapped_tensor", "parse_bytes"]
