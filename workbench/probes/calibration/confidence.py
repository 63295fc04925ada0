"""Confidence from a model, three ways (docs/probes.md, "Calibration"; Steyvers et al., arXiv 2510.05126).

- **Option probabilities**: the probability of the chosen answer among the options of a multiple-choice
  question, from the log-likelihood of each option's tokens after the prompt (optionally length-normalized:
  the mean log-probability per token, so that long options are not penalized for their length).
- **Self-consistency**: sample several answers; the share that agree with the majority answer.
- **Stated confidence**: a number parsed from generated text ("85%", "0.85", "confidence: 8/10").
  Text without one clear number is left out and counted, never guessed.

The pure parts (:func:`option_probabilities`, :func:`self_consistency`, :func:`parse_confidence`) work on
tensors and strings; :func:`score_options` and :func:`sample_answers` run a model (the built-in toy models
or any Hugging Face causal LM), the first through :func:`workbench.capture.capture`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from workbench.capture import CaptureSpec, capture, default_device
from workbench.errors import InputError
from workbench.samples import SampleSet, shift_completion


# --- from logits ---------------------------------------------------------------------------------------------
def softmax_confidence(logits: torch.Tensor, labels: torch.Tensor | None = None):
    """Confidence of a classifier's answer: ``(confidence, prediction, correct)`` from logits [..., K], the
    largest softmax probability, its class, and (given ``labels``) whether that class is the label (float
    0/1; None without labels)."""
    z = torch.as_tensor(logits)
    if not z.is_floating_point() or z.ndim < 1 or z.shape[-1] < 1:
        raise InputError("logits must be a floating-point tensor [..., K] with at least one class")
    if not bool(torch.isfinite(z).all()):
        raise InputError("logits hold NaN or infinite values; fix the model's outputs first")
    conf, pred = torch.softmax(z.double(), dim=-1).max(-1)
    correct = None
    if labels is not None:
        y = torch.as_tensor(labels, device=z.device)
        if tuple(y.shape) != tuple(pred.shape):
            raise InputError(
                f"labels {tuple(y.shape)} must have the shape of logits without the class axis {tuple(pred.shape)}"
            )
        correct = (pred == y).double()
    return conf, pred, correct


# --- multiple choice -----------------------------------------------------------------------------------------
def option_probabilities(loglik, n_tokens=None, length_normalize: bool = False) -> torch.Tensor:
    """Probabilities over the options of each question, ``softmax`` of the options' log-likelihoods.

    ``loglik`` [N, K]: summed log-probability of each option's tokens (−inf marks an absent option when
    questions have fewer than K options). ``length_normalize`` divides each by ``n_tokens`` [N, K] first
    (the per-token mean), as is usual when options differ in length.
    """
    ll = torch.as_tensor(loglik)
    if not ll.is_floating_point() or ll.ndim != 2 or ll.shape[1] == 0 or ll.shape[0] == 0:
        raise InputError(
            f"loglik must be a float tensor [questions, options] with at least one of each; got {tuple(ll.shape)}"
        )
    if bool(torch.isnan(ll).any()) or bool((ll == float("inf")).any()):
        raise InputError(
            "loglik holds NaN or +inf; a log-likelihood is finite and <= 0 (use -inf for an absent option)"
        )
    present = ll > float("-inf")
    if not bool(present.any(1).all()):
        raise InputError("some question has no option (every log-likelihood is -inf); give each at least one")
    if length_normalize:
        if n_tokens is None:
            raise InputError("length_normalize needs n_tokens, the number of tokens of each option")
        n = torch.as_tensor(n_tokens, device=ll.device).to(ll.dtype)
        if n.shape != ll.shape:
            raise InputError(f"n_tokens {tuple(n.shape)} must have the shape of loglik {tuple(ll.shape)}")
        if bool((n[present] <= 0).any()):
            raise InputError("every present option needs at least one token to length-normalize")
        ll = torch.where(present, ll / n.clamp(min=1), ll)
    return torch.softmax(ll, dim=-1)


def choice_confidence(loglik, n_tokens=None, length_normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(choice, confidence)``: the most likely option of each question and its probability among the
    options (see :func:`option_probabilities`)."""
    conf, choice = option_probabilities(loglik, n_tokens, length_normalize).max(-1)
    return choice, conf


@dataclass
class OptionScores:
    loglik: torch.Tensor  # [N, K] summed log-probability of each option's tokens (-inf: no such option)
    n_tokens: torch.Tensor  # [N, K] tokens per option (0: no such option)


def score_options(model, prompts: Sequence, options: Sequence[Sequence], *, tokenizer=None, device=None,
                  **capture_kwargs) -> OptionScores:
    """Log-likelihood of every option's tokens after its question's prompt, in one batched capture.

    ``prompts[i]`` is a token-id list (or a string, with ``tokenizer``) and ``options[i]`` the list of that
    question's options in the same form; questions may have different numbers of options.
    """
    if len(prompts) != len(options):
        raise InputError(f"{len(prompts)} prompts but {len(options)} option lists; give one option list per prompt")
    if len(prompts) == 0:
        raise InputError("no questions given")
    inputs, targets, where = [], [], []
    for i, (prompt, opts) in enumerate(zip(prompts, options)):
        if len(opts) == 0:
            raise InputError(f"question {i} has no options")
        p = list(tokenizer(prompt)["input_ids"]) if tokenizer is not None else list(prompt)
        if not p:
            raise InputError(f"prompt {i} is empty; the first option token needs a token to follow")
        for k, opt in enumerate(opts):
            o = list(tokenizer(opt, add_special_tokens=False)["input_ids"]) if tokenizer is not None else list(opt)
            if not o:
                raise InputError(f"option {k} of question {i} has no tokens")
            x, y = shift_completion(p, o)  # only the option's tokens are scored
            inputs.append(x)
            targets.append(y)
            where.append((i, k))
    samples = SampleSet(ids=[f"{i}:{k}" for i, k in where], groups=["options"] * len(where),
                        input_ids=inputs, targets=targets)
    cap = capture(model, samples, CaptureSpec(), device=device, **capture_kwargs)
    width = max(len(o) for o in options)
    loglik = torch.full((len(prompts), width), float("-inf"), dtype=torch.float64)
    n_tok = torch.zeros((len(prompts), width), dtype=torch.long)
    rows = torch.tensor([i for i, _ in where])
    cols = torch.tensor([k for _, k in where])
    # capture gives the mean NLL over scored tokens; the summed log-likelihood is minus that times the count.
    loglik[rows, cols] = -(cap.loss.double() * cap.n_scored.double())
    n_tok[rows, cols] = cap.n_scored
    return OptionScores(loglik, n_tok)


@dataclass
class MultipleChoice:
    probs: torch.Tensor  # [N, K] probability of each option among the options
    choice: torch.Tensor  # [N] the chosen (most likely) option
    confidence: torch.Tensor  # [N] its probability
    correct: torch.Tensor | None  # [N] 1.0 where the choice is the answer (None without answers)
    scores: OptionScores


def multiple_choice(model, prompts: Sequence, options: Sequence[Sequence], answers: Sequence[int] | None = None, *,
                    length_normalize: bool = False, tokenizer=None, device=None, **capture_kwargs) -> MultipleChoice:
    """Answer multiple-choice questions by the most likely option and report its probability among the
    options as the confidence; with ``answers`` (the index of each question's right option), also whether
    each choice is right: ready for :mod:`workbench.probes.calibration`."""
    scores = score_options(model, prompts, options, tokenizer=tokenizer, device=device, **capture_kwargs)
    probs = option_probabilities(scores.loglik, scores.n_tokens, length_normalize)
    confidence, choice = probs.max(-1)
    correct = None
    if answers is not None:
        ans = torch.as_tensor(answers, dtype=torch.long)
        if ans.shape != choice.shape:
            raise InputError(
                f"{ans.numel()} answers for {choice.numel()} questions; give one answer index per question"
            )
        n_opts = torch.tensor([len(o) for o in options])
        if bool(((ans < 0) | (ans >= n_opts)).any()):
            raise InputError("an answer index is outside its question's options (0-based)")
        correct = (choice == ans).double()
    return MultipleChoice(probs, choice, confidence, correct, scores)


# --- self-consistency ----------------------------------------------------------------------------------------
@dataclass
class SelfConsistency:
    answer: list  # per question: the majority answer (None when no valid sample); a tensor row for tensors
    agreement: torch.Tensor  # [N] share of the valid samples that agree with it (NaN with no valid sample)
    n_valid: torch.Tensor  # [N] samples counted


def self_consistency(answers) -> SelfConsistency:
    """Agreement of sampled answers with the majority answer, per question.

    ``answers``: a tensor [N, S] (one token or class per sample) or [N, S, T] (token sequences compared
    whole), or a list of N lists of hashable answers (e.g. normalized strings) in which None marks a sample
    that gave no answer: it is left out and not counted. Ties for the majority go to the answer sampled first.
    """
    if isinstance(answers, torch.Tensor):
        a = answers
        if a.ndim == 2:
            a = a.unsqueeze(-1)
        if a.ndim != 3 or a.shape[0] == 0 or a.shape[1] == 0:
            raise InputError(
                "answers must be a tensor [questions, samples] or [questions, samples, tokens]; "
                f"got {tuple(answers.shape)}"
            )
        same = (a[:, :, None, :] == a[:, None, :, :]).all(-1)  # [N, S, S]; S is small (tens of samples)
        counts = same.sum(-1)
        best = counts.argmax(-1)  # the first sample among those with the most agreement
        top = counts.gather(1, best[:, None]).squeeze(1)
        chosen = a[torch.arange(a.shape[0]), best]
        majority = chosen.squeeze(-1) if answers.ndim == 2 else chosen
        n = torch.full((a.shape[0],), a.shape[1], dtype=torch.long)
        return SelfConsistency(list(majority), top.double() / a.shape[1], n)
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence) or len(answers) == 0:
        raise InputError("answers must be a non-empty list of per-question answer lists (or a tensor)")
    majority, agreement, n_valid = [], [], []
    for i, samples in enumerate(answers):
        if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
            raise InputError(f"answers[{i}] must be a list of sampled answers, not {type(samples).__name__}")
        valid = [s for s in samples if s is not None]
        for s in valid:
            if not isinstance(s, Hashable):
                raise InputError(
                    f"answers[{i}] holds an unhashable answer {s!r}; normalize answers to strings or tuples"
                )
        if not valid:
            majority.append(None), agreement.append(float("nan")), n_valid.append(0)
            continue
        counts = Counter(valid)  # insertion order = first sampled, and max() keeps the first of equals
        best = max(counts, key=counts.__getitem__)
        majority.append(best), agreement.append(counts[best] / len(valid)), n_valid.append(len(valid))
    return SelfConsistency(majority, torch.tensor(agreement, dtype=torch.float64), torch.tensor(n_valid))


def sample_answers(model, prompts: Sequence[Sequence[int]], n_samples: int = 10, max_new_tokens: int = 1, *,
                   temperature: float = 1.0, seed: int = 0, eos_token_id: int | None = None, device=None,
                   max_batch: int = 1024) -> torch.Tensor:
    """Sample ``n_samples`` continuations of every prompt: token ids [N, n_samples, max_new_tokens].

    A plain sampling loop (no cache) that works with any model whose forward takes ``input_ids`` and
    returns ``.logits``, such as the built-in toy models. Prompts of equal length are batched together, so
    no padding shifts positions. After ``eos_token_id`` a sequence is filled with it, so that equal answers
    compare equal. ``temperature`` 0 is greedy.
    """
    if n_samples < 1 or max_new_tokens < 1:
        raise InputError("n_samples and max_new_tokens must be at least 1")
    if temperature < 0 or not math.isfinite(temperature):
        raise InputError(f"temperature must be finite and >= 0, not {temperature}")
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise InputError("give at least one prompt, each with at least one token")
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(len(prompts), n_samples, max_new_tokens, dtype=torch.long)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    per_chunk = max(1, max_batch // n_samples)
    with torch.inference_mode():
        for length in sorted(by_length):
            idx = by_length[length]
            for start in range(0, len(idx), per_chunk):
                rows = idx[start:start + per_chunk]
                x = torch.tensor([prompts[i] for i in rows], device=device).repeat_interleave(n_samples, 0)
                done = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
                new = []
                for _ in range(max_new_tokens):
                    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1].float()
                    if temperature == 0:
                        tok = logits.argmax(-1)
                    else:
                        tok = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen).squeeze(1)
                    if eos_token_id is not None:
                        tok = torch.where(done, eos_token_id, tok)
                        done |= tok == eos_token_id
                    new.append(tok)
                    x = torch.cat([x, tok[:, None]], 1)
                out[rows] = torch.stack(new, 1).reshape(len(rows), n_samples, max_new_tokens).cpu()
    return out


# --- stated confidence ---------------------------------------------------------------------------------------
_NUM = r"\d+(?:\.\d+)?|\.\d+"
_PERCENT = re.compile(rf"(?<![\w.])({_NUM})\s*(?:%|percent\b|per\s*cent\b)", re.I)
_FRACTION = re.compile(rf"(?<![\w./])({_NUM})\s*(?:/|out\s+of\b)\s*({_NUM})(?![\w/]|\.\d)", re.I)
_DECIMAL = re.compile(r"(?<![\w.])(\d*\.\d+)(?![\w.%/]|\s*(?:%|percent\b|per\s*cent\b|/|out\s+of\b))", re.I)
_INTEGER = re.compile(r"(?<![\w.])(\d+)(?![\w.%/]|\s*(?:%|percent\b|per\s*cent\b|/|out\s+of\b))", re.I)
_KEYWORD_BEFORE = re.compile(r"\b(?:confidence|confident|certainty)\b", re.I)  # "confidence: 0.8"
_KEYWORD_AFTER = re.compile(r"\s*(?:confident|confidence|sure|certain|certainty)\b", re.I)  # "80% sure"
_AFTER_KEYWORD = 30  # characters: "Confidence level (0-1): 0.8" still counts as following the keyword


def _candidates(text: str, integer_scale: float | None):
    """(start, end, value, kind) for every confidence-shaped number; value None when out of range; kind
    "explicit" (percentage, fraction), "decimal" or "integer"."""
    found = []
    for m in _PERCENT.finditer(text):
        v = float(m.group(1)) / 100
        found.append((m.start(), m.end(), v if 0 <= v <= 1 else None, "explicit"))
    for m in _FRACTION.finditer(text):
        num, den = float(m.group(1)), float(m.group(2))
        v = num / den if den > 0 else -1.0
        found.append((m.start(), m.end(), v if 0 <= v <= 1 else None, "explicit"))
    for m in _DECIMAL.finditer(text):
        v = float(m.group(1))
        if 0 <= v <= 1:  # a bare decimal above 1 is some other number (an answer), not a confidence
            found.append((m.start(), m.end(), v, "decimal"))
    if integer_scale is not None:
        for m in _INTEGER.finditer(text):
            v = int(m.group(1)) / integer_scale
            found.append((m.start(), m.end(), v if 0 <= v <= 1 else None, "integer"))
    return sorted(found, key=lambda c: c[0])


def parse_confidence(text: str, integer_scale: float | None = None) -> float | None:
    """The confidence a text states, in [0, 1], or None when it states none clearly.

    Read: percentages ("85%", "85 percent"), fractions ("8/10", "8 out of 10") and decimals in [0, 1]
    ("0.85", ".85"). A number tied to a keyword wins: the first one within 30 characters after
    "confidence"/"confident"/"certainty", else one right before "confident"/"sure"/"certain" ("90% sure").
    Otherwise the text must hold exactly one distinct such value. Different candidates ("0.5 or 90%"), or a
    stated value outside [0, 1] ("120%"), give None: never a guess. Bare integers ("Confidence: 85") are read
    only after a keyword and only with ``integer_scale`` (e.g. 100 or 10), since the scale cannot be told
    from the number.
    """
    if not isinstance(text, str):
        raise InputError(f"stated confidence is parsed from text; got {type(text).__name__}")
    cands = _candidates(text, integer_scale)
    for kw in reversed(list(_KEYWORD_BEFORE.finditer(text))):
        after = [c for c in cands if kw.end() <= c[0] <= kw.end() + _AFTER_KEYWORD]
        if after:  # a number with a scale ("0.8") beats a bare integer ("(0-1)") in the same window
            return next((c for c in after if c[3] != "integer"), after[0])[2]
    for c in reversed(cands):
        if c[3] != "integer" and _KEYWORD_AFTER.match(text, c[1]):
            return c[2]
    values = {c[2] for c in cands if c[3] != "integer"}  # bare integers only count right after a keyword
    return values.pop() if len(values) == 1 else None


@dataclass
class StatedConfidence:
    values: torch.Tensor  # [n_parsed] confidences in [0, 1]
    index: torch.Tensor  # [n_parsed] positions of the parsed texts in the input
    unparsed: list[int]  # positions of the texts left out

    @property
    def n_unparsed(self) -> int:
        return len(self.unparsed)

    @property
    def parsed_share(self) -> float:
        total = len(self.index) + len(self.unparsed)
        return len(self.index) / total if total else float("nan")


def parse_stated_confidence(texts: Sequence[str], integer_scale: float | None = None) -> StatedConfidence:
    """Parse every text with :func:`parse_confidence`. The unparseable ones are left out and counted; use
    ``index`` to select the matching correctness bits (``correct[result.index]``)."""
    if isinstance(texts, str):
        raise InputError("give a list of texts, not one string")
    values, index, unparsed = [], [], []
    for i, t in enumerate(texts):
        v = parse_confidence(t, integer_scale)
        if v is None:
            unparsed.append(i)
        else:
            values.append(v), index.append(i)
    return StatedConfidence(torch.tensor(values, dtype=torch.float64), torch.tensor(index, dtype=torch.long), unparsed)


__all__ = [
    "MultipleChoice",
    "OptionScores",
    "SelfConsistency",
    "StatedConfidence",
    "choice_confidence",
    "multiple_choice",
    "option_probabilities",
    "parse_confidence",
    "parse_stated_confidence",
    "sample_answers",
    "score_options",
    "self_consistency",
    "softmax_confidence",
]
