"""The language-model task layer: completion-only measurement, padding excluded, hand-checked scores, bad input.

The hand-checked model is a bigram LM ``logits_t = W onehot(x_t)`` with ``W = 0``: every next-token
distribution is uniform over V tokens, and the gradient of ``−log p(y | x)`` with respect to ``W`` is
``(p − e_y) e_xᵀ``. Two transitions therefore have gradient dot product ``[y = y'] − 1/V`` when they share
the context ``x`` and 0 otherwise, so identity scores can be written down by hand.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import InputError
from workbench.probes.influence import fit_factors, pairwise_scores
from workbench.probes.influence.lm import (
    DocumentTruncatedWarning,
    LMTask,
    batches,
    completion_nll,
    lm_documents,
    lm_queries,
    model_context,
    model_vocab_size,
)
from workbench.samples import IGNORE, SampleSet

V = 5
TASK = LMTask()
QUIET = dict(progress=False)


class Bigram(nn.Module):
    def __init__(self, vocab: int = V, n_ctx: int = 16, zero: bool = True):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, n_ctx=n_ctx)
        self.head = nn.Linear(vocab, vocab, bias=False)
        if zero:
            nn.init.zeros_(self.head.weight)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(F.one_hot(input_ids, self.config.vocab_size).to(self.head.weight)))


class Tok:
    """Digits are token ids; the begin token is 1."""

    def __call__(self, text, add_special_tokens=True):
        ids = [int(w) for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


# Tiny models: a second intra-op thread only adds synchronization (and is slow on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")


def _random_bigram(seed=0):
    torch.manual_seed(seed)
    model = Bigram(zero=False).double()
    nn.init.normal_(model.head.weight, std=1.0)
    return model


def logp(model, x, y):
    return float(torch.log_softmax(model.head.weight.detach()[:, x].double(), 0)[y])


# --- the measurement and the loss --------------------------------------------------------------------------
def test_measurement_is_minus_log_p_of_the_completion_only():
    model = _random_bigram()
    q = lm_queries(Tok(), ["2 3"], ["4 2"])  # inputs [1, 2, 3, 4], targets [-, -, 4, 2]
    assert q.input_ids == [[1, 2, 3, 4]] and q.targets == [[IGNORE, IGNORE, 4, 2]]
    m = TASK.measurement(model, next(iter(batches(q)))).item()
    # −log p(4 | 3) − log p(2 | 4): the prompt's transitions (1→2, 2→3) are not measured.
    assert m == pytest.approx(-(logp(model, 3, 4) + logp(model, 4, 2)), rel=1e-12)
    assert completion_nll(model, q).tolist() == pytest.approx([m], rel=1e-12)


def test_document_loss_sums_every_next_token_and_no_padding():
    model = _random_bigram()
    docs = lm_documents([[1, 2, 3], [4, 4, 2, 0, 3]])
    want = [-(logp(model, 1, 2) + logp(model, 2, 3)),
            -(logp(model, 4, 4) + logp(model, 4, 2) + logp(model, 2, 0) + logp(model, 0, 3))]
    # One batch: the short document is padded with two pad tokens (id 0, a real word of the long one).
    (batch,) = batches(docs, batch_size=2)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert TASK.loss(model, batch).item() == pytest.approx(sum(want), rel=1e-12)
    # The pad id does not matter: padded positions are never scored.
    (batch3,) = batches(docs, batch_size=2, pad_id=3)
    assert TASK.loss(model, batch3).item() == pytest.approx(sum(want), rel=1e-12)


def test_sampled_labels_stay_on_scored_positions():
    model = Bigram(zero=False)
    with torch.no_grad():  # near one-hot predictions: token x predicts (x + 1) mod V
        model.head.weight.copy_(50.0 * torch.roll(torch.eye(V), 1, 0))
    q = lm_queries(Tok(), ["2 3"], ["1"])  # the completion 1 is what the model does NOT predict after 3
    b = next(iter(batches(q)))
    torch.manual_seed(0)
    sampled = TASK.loss(model, b, sample=True).item()
    predicted = -math.log(torch.softmax(model.head.weight.detach()[:, 3].double(), 0)[4])
    assert sampled == pytest.approx(predicted, abs=1e-6)  # only the completion position was resampled (to 4)
    assert TASK.loss(model, b).item() > 40  # the data's label is far off


# --- influence scores, by hand ---------------------------------------------------------------------------
def _score(query_prompt, completion, docs, **kw):
    model = Bigram().double()
    q = lm_queries(Tok(), [query_prompt], [completion])
    d = lm_documents(docs)
    f = fit_factors(model, batches(d, 2), loss_fn=TASK.loss, strategy="identity", report=False, **QUIET)
    return pairwise_scores(model, f, batches(q), batches(d, kw.pop("batch_size", 2)), loss_fn=TASK.loss,
                           measurement_fn=TASK.measurement, mask_fn=TASK.mask, **kw, **QUIET)


def test_identity_scores_by_hand():
    # The query measures the single transition 3 → 4 (prompt "2 3" after the begin token, completion "4").
    docs = [[3, 4], [3, 2], [2, 3], [3, 4, 3, 4], [1, 2, 3]]
    s = _score("2 3", "4", docs)
    # [y = y'] − 1/V per shared-context transition: 0.8 for 3→4, −0.2 for 3→2, 0 for other contexts. The
    # document [2, 3] repeats the query's *prompt* transition 2→3, which is not measured: score 0.
    assert s[0].tolist() == pytest.approx([0.8, -0.2, 0.0, 1.6, 0.0], abs=1e-12)


def test_per_token_contributions_by_hand_and_padding_left_out():
    docs = [[3, 4, 3, 4], [3, 2]]
    scores, tokens = _score("2 3", "4", docs, per_token=True)
    # Position t carries the transition x_t → x_{t+1}; the last position and the padding carry nothing.
    assert tokens[0, 0].tolist() == pytest.approx([0.8, 0.0, 0.8, 0.0], abs=1e-12)
    assert tokens[0, 1].tolist() == pytest.approx([-0.2, 0.0, 0.0, 0.0], abs=1e-12)
    assert tokens.sum(-1)[0].tolist() == pytest.approx(scores[0].tolist(), abs=1e-12)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_padding_does_not_change_factors_or_scores(strategy):
    """Fitted and scored one document at a time (no padding) or four at a time (padded): the same numbers."""
    model = _random_bigram(1)
    g = torch.Generator().manual_seed(0)
    docs = lm_documents([torch.randint(0, V, (int(n),), generator=g).tolist()
                         for n in torch.randint(2, 9, (12,), generator=g)])
    q = lm_queries(Tok(), ["2 3", "4", "1 1 2"], ["4", "0 2", "3"])
    out = []
    for bs in (1, 4):
        f = fit_factors(model, batches(docs, bs), loss_fn=TASK.loss, strategy=strategy, fisher="empirical",
                        mask_fn=TASK.mask, report=False, **QUIET)
        out.append(pairwise_scores(model, f, batches(q, 2), batches(docs, bs), loss_fn=TASK.loss,
                                   measurement_fn=TASK.measurement, mask_fn=TASK.mask, **QUIET))
    assert torch.allclose(out[0], out[1], rtol=1e-9, atol=1e-12)
    assert out[0].abs().max() > 0.1


# --- bad input --------------------------------------------------------------------------------------------------
def test_document_longer_than_the_context_is_truncated_with_a_warning_or_refused():
    with pytest.warns(DocumentTruncatedWarning, match="longer than the model's context of 3"):
        d = lm_documents([[1, 2], [3, 4, 3, 4]], n_ctx=3)
    assert d.input_ids == [[1, 2], [3, 4, 3]] and d.targets == [[2, IGNORE], [4, 3, IGNORE]]
    with pytest.raises(InputError, match="longer than the model's context of 3 tokens: '1' \\(4 tokens\\)"):
        lm_documents([[1, 2], [3, 4, 3, 4]], n_ctx=3, truncate=False)


def test_tokens_outside_the_vocabulary_empty_completions_and_long_queries():
    with pytest.raises(InputError, match="query 'q0' has token ids \\[7\\] outside the model's vocabulary of 5"):
        lm_queries(Tok(), ["2 7"], ["3"], ids=["q0"], vocab_size=V)
    with pytest.raises(InputError, match="document '0' has token ids \\[9\\]"):
        lm_documents([[1, 9]], vocab_size=V)
    with pytest.raises(InputError, match="empty completion"):
        lm_queries(Tok(), ["2 3"], ["  "])
    with pytest.raises(InputError, match="more than the model's context of 3"):
        lm_queries(Tok(), ["2 3 4"], ["1"], n_ctx=3)
    with pytest.raises(InputError, match="prompt with no tokens"):
        lm_queries(lambda text, add_special_tokens=True: {"input_ids": [int(w) for w in text.split()]}, [""], ["1"])


def test_what_the_model_accepts():
    model = Bigram(n_ctx=7)
    assert model_vocab_size(model) == V and model_context(model) == 7
    from tests.tiny_models import VOCAB, tiny_model

    hf = tiny_model("llama")
    assert model_vocab_size(hf) == VOCAB and model_context(hf) == 64


def test_batches_follow_the_sample_order():
    s = SampleSet.from_token_lists([[1, 2, 3], [4], [2, 2]])
    b = batches(s, batch_size=2)
    assert len(b) == 2 and b[1]["input_ids"].tolist() == [[2, 2]] and b[-1]["input_ids"].tolist() == [[2, 2]]
    assert b[0]["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    with pytest.raises(IndexError):
        b[2]
