"""Exceptions a user can cause. Each message names what was wrong and what to do about it.

All derive from :class:`WorkbenchError`, so ``except WorkbenchError`` catches every one; those about bad
values also derive from ``ValueError`` so generic code that expects that keeps working.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base class of every error the workbench raises on purpose."""


class InputError(WorkbenchError, ValueError):
    """A value passed to a function is malformed (shape, range, NaN, empty, mismatched lengths)."""


class NoCheckpointsError(WorkbenchError, FileNotFoundError):
    """A folder or hub listing holds no checkpoint the workbench can read."""


class UnsafeCheckpointError(WorkbenchError):
    """A checkpoint would need pickle (code execution) to load."""


class UnknownArchitectureError(WorkbenchError):
    """No adapter knows where this model keeps its blocks, routers or MLPs."""


class NotMoEError(WorkbenchError):
    """A routing measurement was asked of a model that has no mixture-of-experts layers."""


class StoreError(WorkbenchError):
    """The Parquet store cannot take or give a table (a corrupt part, a resume under other options, samples,
    dtype or model, a read-only store or a full disk)."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock."""


class CorruptCheckpointError(WorkbenchError):
    """A checkpoint file exists but cannot be read, or its weights do not fit its model (missing, unexpected or
    mis-shaped keys)."""


class TokenizerMismatchError(WorkbenchError):
    """Token ids fall outside the model's vocabulary: the tokenizer does not belong to the model."""


class NumericalError(WorkbenchError, ArithmeticError):
    """A computation produced NaN or infinity, or a decomposition failed."""


class DependencyError(WorkbenchError, ImportError):
    """An optional dependency needed for this feature is not installed."""
