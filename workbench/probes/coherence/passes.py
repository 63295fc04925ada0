"""One backward pass per batch over a sample set, into the running sums of gradient coherence.

The per-example loss is the sample's mean cross-entropy over its scored positions (the ``loss`` of the
``basic`` measurement): for a modular-addition pair, the loss of its answer; for a text, the mean over its
tokens, so that long texts do not outweigh short ones. A batch's loss is the sum of its examples' losses, so
the recorder's rows give each example's own gradient (:mod:`workbench.gradients.tracking`), whatever the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.errors import InputError
from workbench.gradients.moe import lm_modules
from workbench.gradients.tracking import Recorder, TrackedLinear, TrackedModule, units
from workbench.models import adapter_for
from workbench.probes.coherence.functions import GradientSums
from workbench.samples import IGNORE, SampleSet, length_buckets

MODULES = ("all", "mlp")


def tracked_modules(model: nn.Module, which: str = "all") -> list[TrackedModule]:
    """The weight matrices whose gradients coherence is measured on.

    ``"mlp"``: every block's MLP linear layers, MoE experts (one matrix per expert) and routers
    (:func:`workbench.gradients.moe.lm_modules`); ``"all"``: those and every other ``nn.Linear`` of the model
    (attention projections, the output head). Embeddings and norms are left out: the recorder tracks weight
    matrices applied to inputs.
    """
    if which not in MODULES:
        raise InputError(f"modules must be one of {MODULES}, not {which!r}")
    tracked = lm_modules(model)
    if which == "mlp":
        return tracked
    covered = {id(m) for t in tracked for m in t.module.modules()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in covered:
            tracked.append(TrackedLinear(name, module))
    return tracked


def unit_layers(model: nn.Module, tracked: Sequence[TrackedModule]) -> dict[str, int | None]:
    """The block index of every tracked unit (a matrix, or a stack of experts' matrices); None outside the
    blocks (the output head)."""
    block_of = {}
    for i, block in enumerate(adapter_for(model).blocks(model)):
        for m in block.modules():
            block_of[id(m)] = i
    module_of = {b.stack or b.key: t.module for t in tracked for b in t.blocks()}
    return {key: block_of.get(id(module_of[key])) for key in units(tracked)}


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's mean cross-entropy over its scored positions and the share of them the argmax gets
    right: [B] each (samples with nothing scored must be left out before)."""
    scored = targets != IGNORE
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none", ignore_index=IGNORE)
    n = scored.sum(1).clamp(min=1)
    right = ((logits.argmax(-1) == targets) & scored).sum(1)
    return nll.sum(1) / n, right.float() / n


def scored_samples(samples: SampleSet) -> list[int]:
    """Indices of the samples with at least one scored position (the others have no loss to differentiate)."""
    return [i for i, ys in enumerate(samples.targets) if any(t != IGNORE for t in ys)]


def gradient_sums(model: nn.Module, samples: SampleSet, tracked: Sequence[TrackedModule], *,
                  device: torch.device, token_budget: int = 8192, max_batch: int = 512, pad_id: int = 0,
                  progress: bool = False, desc: str = "coherence") -> tuple[GradientSums, torch.Tensor, torch.Tensor]:
    """The coherence sums of ``samples`` under ``model`` over ``tracked``, and each sample's loss and accuracy.

    Batches are bucketed by length (``token_budget`` padded tokens, at most ``max_batch`` samples); the sums do
    not depend on the batches. Every sample must have a scored position (see :func:`scored_samples`).
    """
    if len(scored_samples(samples)) != len(samples):
        raise InputError("some samples score no position, so they have no loss; leave them out (scored_samples)")
    sums = GradientSums()
    loss = torch.empty(len(samples))
    acc = torch.empty(len(samples))
    was = model.training
    model.eval()
    try:
        with Recorder(tracked) as rec, torch.enable_grad():
            for idx in tqdm(length_buckets(samples.lengths, token_budget, max_batch), desc=desc, leave=False,
                            disable=not progress):
                x, y, mask = (t.to(device) for t in samples.padded(idx, pad_id))
                rec.start()
                out = model(input_ids=x, attention_mask=mask)
                logits = getattr(out, "logits", out)
                batch_loss, batch_acc = per_sample_loss(logits, y)
                if not bool(torch.isfinite(batch_loss).all()):
                    raise InputError("the model gave a NaN or infinite loss; the checkpoint may be corrupt")
                sums.add_rows(rec.rows(batch_loss.sum(), mask), len(idx))
                rows = torch.as_tensor(idx)
                loss[rows] = batch_loss.detach().cpu()
                acc[rows] = batch_acc.detach().cpu()
    finally:
        model.train(was)
    return sums, loss, acc


__all__ = ["MODULES", "gradient_sums", "per_sample_loss", "scored_samples", "tracked_modules", "unit_layers"]
