"""Plain values at the boundary: a number may come as a Python, NumPy or 0-d tensor scalar.

Public functions take numbers however a user holds them (``tau=np.float32(0.7)``, ``n_bins=np.int64(10)``,
``lr=torch.tensor(0.1)``) and check them here, once; booleans are not numbers (``True`` as a bin count is a
mistake, not 1).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from workbench.errors import InputError


def plain(value):
    """``value`` with NumPy and 0-d tensor scalars turned into Python ``bool``, ``int`` or ``float``; anything else
    unchanged. A float narrower than 64 bits becomes the shortest decimal that names it, so ``np.float32(0.7)``
    is ``0.7`` (the value the user wrote), not ``0.699999988079071``."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            return value
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float().numpy()[()] if value.element_size() < 8 else value.numpy()[()]
        else:
            value = value.numpy()[()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(str(value)) if value.dtype.itemsize < 8 else float(value)
    return value


def is_number(value) -> bool:
    """Whether ``value`` is a real number (Python, NumPy or 0-d tensor), booleans excluded."""
    value = plain(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """Whether ``value`` is an integer (Python, NumPy or 0-d tensor), booleans excluded."""
    value = plain(value)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def number(value, name: str, *, integer: bool = False):
    """``value`` as a Python number, or an InputError naming ``name``."""
    if not (is_integer(value) if integer else is_number(value)):
        kind = "an integer" if integer else "a number"
        raise InputError(f"{name} must be {kind}, not {value!r} ({type(value).__name__})")
    return plain(value)


__all__ = ["is_integer", "is_number", "number", "plain"]
