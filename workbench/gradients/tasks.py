"""How the estimator calls a user's loss and measurement, and how it gets labels sampled from the model.

A *loss function* is ``loss_fn(model, batch) -> scalar``: the batch's loss summed over examples and tokens
(a sum, not a mean, so that one example's gradient does not depend on the batch it came in). For the true
Fisher (``fisher="true"``, the default) the estimator needs the same loss with labels drawn from the model's
own predictive distribution; a loss function says it can do that by taking a ``sample`` keyword:
``loss_fn(model, batch, sample=True)``. :class:`CrossEntropyTask` is such a loss for anything that ends in
logits over classes or a vocabulary (classifiers and causal language models alike).

Before each batch of a pass the estimator seeds torch's random generator from the batch's global index
(inside ``torch.random.fork_rng``, so the caller's generator is untouched): sampled labels depend on the
batch, not on how many ranks share the work or which batches ran before.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import InputError, NumericalError, WorkbenchError

IGNORE = -100


def accepts_sample(fn: Callable) -> bool:
    """Whether ``fn`` takes a ``sample`` keyword (or ``**kwargs``), i.e. can give the true-Fisher loss."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == "sample" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


@contextmanager
def seeded(seed: int, device: torch.device):
    """Run a block with torch's generators seeded to ``seed``, restoring the caller's state afterwards."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def batch_seed(seed: int, pass_id: int, index: int) -> int:
    """A seed for one batch of one pass (large odd multipliers keep passes and batches apart)."""
    return (seed * 1_000_003 + pass_id * 7_919 + index * 104_729) % (2**63 - 1)


def call_scalar(fn: Callable, model: nn.Module, batch: Any, *, sample: bool, what: str, index: int) -> torch.Tensor:
    """Call a loss or measurement and check that it gave one finite number with a gradient."""
    try:
        value = fn(model, batch, sample=True) if sample else fn(model, batch)
    except WorkbenchError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
        raise InputError(
            f"{what} failed on batch {index}: {exc}. Check that the batch has the shapes the model takes "
            "(queries and documents must both fit the model's input, e.g. the same feature size)"
        ) from exc
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{what} returned {type(value).__name__} on batch {index}; it must return a torch scalar")
    if value.numel() != 1:
        raise InputError(
            f"{what} returned a tensor of shape {tuple(value.shape)} on batch {index}; it must return one number, "
            "the batch's loss summed over examples and tokens (use reduction='sum')"
        )
    value = value.reshape(())
    if not torch.isfinite(value):
        raise NumericalError(
            f"{what} returned {value.item()} on batch {index}; the model's outputs or the labels are broken there "
            "(check for NaN inputs, labels outside the classes, or a model loaded in half precision)"
        )
    if not value.requires_grad:
        raise InputError(
            f"{what} returned a number without a gradient on batch {index}: it does not depend on the model's "
            "parameters (computed under torch.no_grad, or detached?)"
        )
    return value


def sample_labels(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Labels drawn from softmax(logits) wherever ``targets`` is scored; ignored positions stay ignored."""
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
        drawn = torch.multinomial(probs, 1).reshape(targets.shape)
    return torch.where(targets == ignore_index, targets, drawn)


def _default_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(batch[0]) if isinstance(batch, (tuple, list)) else model(**batch)
    return getattr(out, "logits", out)


def _default_targets(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        return batch[1]
    for key in ("labels", "targets"):
        if key in batch:
            return batch[key]
    raise InputError("CrossEntropyTask found no targets in the batch; give targets=lambda batch: ...")


@dataclass
class CrossEntropyTask:
    """Summed cross-entropy of the model's logits against targets; ``sample=True`` draws labels from the model.

    Works for classifiers (logits [B, C], targets [B]) and language models (logits [B, T, V], targets [B, T]
    already shifted, -100 where nothing is scored). ``forward(model, batch)`` gives the logits (default:
    ``model(batch[0])`` for tuples, ``model(**batch).logits`` for dicts, minus any target key the model does
    not take is the caller's business); ``targets(batch)`` the labels (default ``batch[1]`` or
    ``batch["labels"]``). Use ``loss_fn=task.loss, measurement_fn=task.measurement``.
    """

    forward: Callable[[nn.Module, Any], torch.Tensor] = _default_forward
    targets: Callable[[Any], torch.Tensor] = _default_targets
    ignore_index: int = IGNORE

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        logits = self.forward(model, batch)
        targets = self.targets(batch).to(logits.device)
        if logits.shape[:-1] != targets.shape:
            raise InputError(
                f"logits of shape {tuple(logits.shape)} do not match targets of shape {tuple(targets.shape)}; "
                "logits must be [..., classes] over the targets' shape"
            )
        if sample:
            targets = sample_labels(logits, targets, self.ignore_index)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # a summed loss in half precision loses the small terms
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                               ignore_index=self.ignore_index)

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The summed negative log-likelihood of the targets (−log p of the completion for an LM query)."""
        return self.loss(model, batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a batch (tensors, tuples, lists, dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        if type(batch) is not dict and callable(getattr(batch, "to", None)):
            return batch.to(device)  # e.g. transformers' BatchEncoding, which keeps its attribute access
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch
