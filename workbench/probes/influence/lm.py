"""Influence for causal language models: documents, queries, their batches, and the loss and measurement.

A *document* is a token sequence; its loss is the summed next-token cross-entropy over its non-padding
tokens. A *query* is a (prompt, completion) pair; its measurement is ``m = −log p(completion | prompt)``
summed over the completion's tokens only (docs/probes.md, "Influence"). Both are :class:`workbench.samples.SampleSet`
objects, whose shifted ``targets`` already carry -100 wherever nothing is scored (padding, a document's
last token, a query's prompt), so one summed cross-entropy serves both: :class:`LMTask` gives
``loss_fn=task.loss`` (which can sample labels from the model for the true Fisher) and
``measurement_fn=task.measurement``, and ``mask_fn=task.mask`` keeps padding rows out of the covariances.

    task = LMTask()
    docs = lm_documents(token_lists, n_ctx=model_context(model))
    qs = lm_queries(tokenizer, prompts, completions, vocab_size=model_vocab_size(model))
    factors = fit_factors(model, batches(docs), loss_fn=task.loss, mask_fn=task.mask)
    scores = pairwise_scores(model, factors, batches(qs), batches(docs), loss_fn=task.loss,
                             measurement_fn=task.measurement, mask_fn=task.mask)

Inputs are checked at this boundary: a token outside the model's vocabulary, an empty completion or prompt,
a query longer than the model's context raise :class:`~workbench.errors.InputError`; a document longer than
the context is cut to it with a warning (``truncate=False`` makes that an error).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.capture import model_positions
from workbench.errors import InputError
from workbench.gradients.tasks import sample_labels
from workbench.samples import IGNORE, SampleSet


class DocumentTruncatedWarning(UserWarning):
    """A document was longer than the model's context and was cut to it."""


# --- what the model accepts -------------------------------------------------------------------------------
def model_vocab_size(model: nn.Module) -> int | None:
    """The number of token ids the model's embedding takes (None when it cannot be told)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = getattr(model, "embed_tokens", None)
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)


def model_context(model: nn.Module) -> int | None:
    """The longest input the model takes, in tokens (None when it cannot be told), as the capture reads it."""
    return model_positions(model)


def check_vocabulary(samples: SampleSet, vocab_size: int, what: str = "sample") -> None:
    """Raise if any token of ``samples`` is outside ``[0, vocab_size)``, naming the first such sample."""
    for sid, x, y in zip(samples.ids, samples.input_ids, samples.targets):
        bad = [t for t in x if not 0 <= t < vocab_size] + [t for t in y if t != IGNORE and not 0 <= t < vocab_size]
        if bad:
            raise InputError(
                f"{what} {sid!r} has token ids {sorted(set(bad))[:5]} outside the model's vocabulary of "
                f"{vocab_size}; it was tokenized with another tokenizer than the model's: use the model's own"
            )


# --- documents and queries ----------------------------------------------------------------------------------
def lm_documents(
    tokens: Sequence[Sequence[int]] | SampleSet,
    *,
    n_ctx: int | None = None,
    vocab_size: int | None = None,
    truncate: bool = True,
    ids: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
) -> SampleSet:
    """Documents as language-model samples (every next token scored).

    ``tokens`` are token lists (or a SampleSet of documents, checked and cut as it is). A document longer
    than ``n_ctx`` is cut to its first ``n_ctx`` tokens with a :class:`DocumentTruncatedWarning`, or, with
    ``truncate=False``, raises.
    """
    samples = tokens if isinstance(tokens, SampleSet) else SampleSet.from_token_lists(tokens, ids, groups)
    if n_ctx is not None:
        long = [(sid, n) for sid, n in zip(samples.ids, samples.lengths) if n > n_ctx]
        if long:
            names = ", ".join(f"{sid!r} ({n} tokens)" for sid, n in long[:3])
            if not truncate:
                raise InputError(
                    f"{len(long)} document(s) are longer than the model's context of {n_ctx} tokens: {names}; "
                    "split them into pieces of at most that length, or pass truncate=True to cut them"
                )
            warnings.warn(
                f"{len(long)} document(s) are longer than the model's context of {n_ctx} tokens and were cut to "
                f"it ({names}); only the kept tokens are scored", DocumentTruncatedWarning, stacklevel=2)
            cut = [i for i, n in enumerate(samples.lengths) if n > n_ctx]
            inputs = [list(x) for x in samples.input_ids]
            targets = [list(y) for y in samples.targets]
            for i in cut:
                # The last kept position predicts the first cut token, which is no longer in the document.
                inputs[i] = inputs[i][:n_ctx]
                targets[i] = targets[i][: n_ctx - 1] + [IGNORE]
            samples = SampleSet(samples.ids, samples.groups, inputs, targets)
    if vocab_size is not None:
        check_vocabulary(samples, vocab_size, "document")
    return samples


def lm_queries(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    n_ctx: int | None = None,
    vocab_size: int | None = None,
    ids: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
) -> SampleSet:
    """(prompt, completion) queries: only the completion's tokens are scored.

    ``tokenizer(text)["input_ids"]`` must prepend whatever the model expects at the start (a begin token);
    the completion is tokenized with ``add_special_tokens=False``. A query is never truncated (cutting it
    would change what is measured): one longer than ``n_ctx`` raises.
    """
    if len(prompts) != len(completions):
        raise InputError(f"{len(prompts)} prompts but {len(completions)} completions; give one completion per prompt")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(prompts))]
    for qid, p, c in zip(ids, prompts, completions):
        if not str(c).strip():
            raise InputError(f"query {qid!r} has an empty completion; a query measures −log p of at least one token")
        if not tokenizer(p)["input_ids"]:
            raise InputError(
                f"query {qid!r} has a prompt with no tokens; the first completion token needs a position to be "
                "predicted from (give a prompt, or a tokenizer that adds a begin token)"
            )
    samples = SampleSet.from_prompt_completion(tokenizer, prompts, completions, ids=ids, groups=groups)
    if n_ctx is not None:
        long = [(sid, n) for sid, n in zip(samples.ids, samples.lengths) if n > n_ctx]
        if long:
            raise InputError(
                f"query {long[0][0]!r} has {long[0][1]} input tokens, more than the model's context of {n_ctx}; "
                "shorten its prompt (queries are not truncated: that would change what is measured)"
            )
    if vocab_size is not None:
        check_vocabulary(samples, vocab_size, "query")
    return samples


# --- batches --------------------------------------------------------------------------------------------------
class LMBatches(Sequence):
    """Right-padded batches of a SampleSet, in the samples' order (score columns follow it).

    Each batch is a dict of ``input_ids``, ``targets`` (-100 on padding and unscored positions) and
    ``attention_mask``. A Sequence with a length, so progress bars and torchrun sharding know its size.
    """

    def __init__(self, samples: SampleSet, batch_size: int = 32, pad_id: int = 0):
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, not {batch_size}")
        self.samples, self.batch_size, self.pad_id = samples, batch_size, pad_id

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        idx = list(range(i * self.batch_size, min(len(self.samples), (i + 1) * self.batch_size)))
        x, y, mask = self.samples.padded(idx, pad_id=self.pad_id)
        return {"input_ids": x, "targets": y, "attention_mask": mask}


def batches(samples: SampleSet, batch_size: int = 32, pad_id: int = 0) -> LMBatches:
    return LMBatches(samples, batch_size, pad_id)


# --- the loss and the measurement ----------------------------------------------------------------------------
@dataclass
class LMTask:
    """Summed next-token cross-entropy of a causal LM over the scored targets of :class:`LMBatches`.

    ``loss`` (documents: every non-padding next token) takes ``sample=True`` to draw the labels from the
    model for the true Fisher; ``measurement`` (queries: the completion's tokens) is the summed −log p.
    ``mask`` gives the padding mask for ``mask_fn``.
    """

    ignore_index: int = IGNORE

    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = getattr(out, "logits", out)
        if logits.shape[:2] != batch["targets"].shape:
            raise InputError(
                f"the model gave logits of shape {tuple(logits.shape)} for targets of shape "
                f"{tuple(batch['targets'].shape)}; a causal language model must give one row of logits per token"
            )
        return logits

    def _nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # a summed loss in half precision loses the small terms
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                               ignore_index=self.ignore_index)

    def loss(self, model: nn.Module, batch: dict, sample: bool = False) -> torch.Tensor:
        logits = self.logits(model, batch)
        targets = batch["targets"].to(logits.device)
        if sample:
            targets = sample_labels(logits, targets, self.ignore_index)
        return self._nll(logits, targets)

    def measurement(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """−log p(completion | prompt), summed over the completion tokens of every query in the batch."""
        logits = self.logits(model, batch)
        return self._nll(logits, batch["targets"].to(logits.device))

    @staticmethod
    def mask(batch: dict) -> torch.Tensor:
        return batch["attention_mask"]


def completion_nll(model: nn.Module, samples: SampleSet, batch_size: int = 64) -> torch.Tensor:
    """Per-query −log p(completion | prompt) (the measurement, one number per query), for per-nat scores."""
    task = LMTask()
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for b in batches(samples, batch_size):
            logits = task.logits(model, {k: v.to(device) for k, v in b.items()})
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), b["targets"].to(device), reduction="none",
                                  ignore_index=IGNORE)
            out.append(nll.sum(1).cpu())
    return torch.cat(out)


__all__ = [
    "DocumentTruncatedWarning",
    "LMBatches",
    "LMTask",
    "batches",
    "check_vocabulary",
    "completion_nll",
    "lm_documents",
    "lm_queries",
    "model_context",
    "model_vocab_size",
]
