"""How a mixture-of-experts router scores its experts and what it hands the experts.

A :class:`Routing` describes one architecture's routers: which output carries the logits, how the logits
become expert scores (softmax, sigmoid, ...), where the weights applied to the selected experts and their
indices are, and, for the record, how experts are selected (a selection-only bias, grouped top-k) and whether
the top-k weights are renormalized and scaled. Capture turns the scores into a distribution over experts
(``distribution``) and reads the applied weights as the model hands them to its experts, so that no probe
applies a softmax the model does not apply.

Known architectures declare their routing (:mod:`workbench.models.adapters`); for an unknown one the scoring
rule is inferred once from what its routers return (:func:`infer_scoring`), or refused when the outputs do
not tell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from workbench.errors import UnknownArchitectureError


def _exp_shifted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(x - max)`` (in place) and its row sums: a softmax before its division."""
    e = x.sub_(x.amax(-1, keepdim=True)).exp_()
    return e, e.sum(-1)


def _with_sums(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scores, scores.sum(-1).clamp_min_(1e-30)


#: How each scoring rule turns router logits into scores over experts and the sum that normalizes them to a
#: distribution (rows of ``scores / sums[..., None]`` sum to 1; sums None: the scores are one already). In
#: place on the tensor given (capture hands over a fresh float copy). Capture divides only after reducing over
#: tokens (a weighted mean of ``scores`` with weights ``1 / sums``), which saves a pass over [tokens, experts].
UNNORMALIZED: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]] = {
    "softmax": _exp_shifted,
    "sigmoid": lambda x: _with_sums(x.sigmoid_()),
    "sqrtsoftplus": lambda x: _with_sums(F.softplus(x).sqrt_()),
    "probabilities": lambda x: (x, None),
}


def _distribution(rule: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def distribution(x: torch.Tensor) -> torch.Tensor:
        scores, sums = UNNORMALIZED[rule](x)
        return scores if sums is None else scores.div_(sums.unsqueeze(-1))

    return distribution


#: How each scoring rule turns router logits into a distribution over experts (rows sum to 1). In place on
#: the tensor given.
DISTRIBUTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {rule: _distribution(rule) for rule in UNNORMALIZED}

#: The scores themselves (before normalization), used to check a rule against the applied weights.
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda x: torch.softmax(x, -1),
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "probabilities": lambda x: x,
}

#: What capture's score distribution is called for each rule (stored with the measurements).
DISTRIBUTION_NAMES = {
    "softmax": "softmax",
    "sigmoid": "sigmoid, normalized to sum 1",
    "sqrtsoftplus": "sqrt-softplus, normalized to sum 1",
    "probabilities": "softmax (the router's own output)",
}

#: How the weights applied to the selected experts come out of a router.
#: ``topk``: outputs ``weights_index`` [tokens, k] and ``indices_index`` [tokens, k];
#: ``dense``: output ``weights_index`` [tokens, experts], zero outside the selection (Llama 4);
#: ``sorted``: JetMoE's (sorted slots, token of each slot, gate of each slot, experts' slot counts);
#: ``experts``: the router returns logits only; the weights are read where the MoE block calls its experts
#: (``experts(hidden, top_k_index, top_k_weights)``, DBRX).
WEIGHT_LAYOUTS = ("topk", "dense", "sorted", "experts")


@dataclass(frozen=True)
class Routing:
    """How one architecture's routers score, select and weight experts.

    scoring: ``"softmax"``, ``"sigmoid"``, ``"sqrtsoftplus"``, ``"probabilities"`` (the recorded output is
        already softmax probabilities), or None: infer it from the routers' outputs (:func:`infer_scoring`).
    logits_index: the router output that carries the logits (transformers' ``OutputRecorder`` index).
    weights: layout of the applied weights (see ``WEIGHT_LAYOUTS``); weights_index, indices_index: where.
    selection_bias: a bias is added to the scores to select experts, and only for that (DeepSeek-V3's
        ``e_score_correction_bias``); for the record: capture reads the selection the model made.
    grouped: experts are selected within the best groups first (group-limited top-k); for the record.
    proportional: the applied weights are proportional, token by token, to the scores of the selected
        experts (whatever renormalization and constant scale follow), which capture checks once per model;
        False for routers such as PhiMoE's sparsemixer or Gemma 4's per-expert scale.
    note: anything else a reader should know.
    """

    scoring: str | None = None
    logits_index: int = 0
    weights: str = "topk"
    weights_index: int | None = 1
    indices_index: int | None = 2
    selection_bias: bool = False
    grouped: bool = False
    proportional: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        if self.scoring is not None and self.scoring not in DISTRIBUTIONS:
            raise ValueError(f"unknown scoring {self.scoring!r}; one of {sorted(DISTRIBUTIONS)}")
        if self.weights not in WEIGHT_LAYOUTS:
            raise ValueError(f"unknown weights layout {self.weights!r}; one of {WEIGHT_LAYOUTS}")

    @property
    def kind(self) -> str:
        """A short name of the rule: ``softmax``, ``sigmoid + selection bias``, ``sigmoid, grouped``, ..."""
        base = {"probabilities": "softmax"}.get(self.scoring or "", self.scoring or "inferred")
        if self.selection_bias:
            base += " + selection bias"
        if self.grouped:
            base += ", grouped"
        return base

    @property
    def distribution_name(self) -> str:
        return DISTRIBUTION_NAMES.get(self.scoring or "", "inferred")

    def decode(self, out: tuple, k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(logits [T, E], applied weights [T, k], expert indices [T, k]) from one router call's outputs;
        weights and indices are None for the ``experts`` layout (read at the experts' call)."""
        logits = out[self.logits_index]
        if self.weights == "topk":
            return logits, out[self.weights_index], out[self.indices_index]
        if self.weights == "dense":
            top_w, top_i = torch.topk(out[self.weights_index].reshape(-1, logits.shape[-1]), k, dim=-1)
            return logits, top_w, top_i
        if self.weights == "sorted":
            return logits, *_unsort(out, logits.shape[0], k)
        return logits, None, None


def _unsort(out: tuple, tokens: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """JetMoE's sorted routing outputs back to per-token [T, k] weights and expert indices."""
    order, _, gates, sizes = out[:4]
    sizes = torch.as_tensor(sizes, device=order.device)
    expert = torch.repeat_interleave(torch.arange(len(sizes), device=order.device), sizes)
    w = torch.empty(tokens * k, dtype=gates.dtype, device=gates.device).index_copy_(0, order, gates)
    i = torch.empty(tokens * k, dtype=torch.long, device=order.device).index_copy_(0, order, expert)
    return w.view(tokens, k), i.view(tokens, k)


def fitting_rules(logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> list[str]:
    """The scoring rules under which ``weights`` [T, k] are proportional, token by token, to the scores of the
    selected experts ``indices`` [T, k] given ``logits`` [T, E] (tokens where all are well above zero).

    Renormalization and a constant scale keep the weights proportional to the scores, so only the scoring
    decides. The tolerance follows the lower precision of the two (bf16 keeps 3 digits: under autocast a
    router may compute its weights from more precise logits than it returns).
    """
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
    rtol = max(tol.get(weights.dtype, 1e-3), tol.get(logits.dtype, 1e-3))
    x, w = logits.double().reshape(-1, logits.shape[-1]), weights.double().reshape(indices.shape)
    fits = []
    for name, score in SCORES.items():
        if name == "probabilities" and not bool(((x >= 0) & (x <= 1)).all()):
            continue
        s = score(x).gather(-1, indices.long())
        use = (s > 1e-12).all(-1) & (w.abs() > 1e-12).all(-1)
        ratio = w[use] / s[use]
        if bool(use.any()) and torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=rtol, atol=0):
            fits.append(name)
    return fits


def infer_scoring(logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, where: str) -> str:
    """The one scoring rule that :func:`fitting_rules` finds, or an UnknownArchitectureError when none does,
    when several that give different distributions do, or when top-1 routing leaves nothing to compare."""
    if indices.shape[-1] < 2:
        raise UnknownArchitectureError(
            f"cannot tell how {where} scores its experts: it selects one expert per token, so its weights do "
            f"not show the rule; {HOW_TO_DECLARE}")
    fits = fitting_rules(logits, weights, indices)
    if not fits:
        raise UnknownArchitectureError(
            f"cannot tell how {where} scores its experts: its applied weights follow none of "
            f"{', '.join(SCORES)} over its logits; {HOW_TO_DECLARE}")
    x = logits.double().reshape(-1, logits.shape[-1])
    dists = {f: DISTRIBUTIONS[f](x.clone()) for f in fits}
    if any((dists[f] - dists[fits[0]]).abs().max() > 1e-4 for f in fits[1:]):
        raise UnknownArchitectureError(
            f"cannot tell how {where} scores its experts: its weights fit {' and '.join(fits)} alike on this "
            f"batch; {HOW_TO_DECLARE}")
    return fits[0]


def check_scoring(routing: Routing, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  where: str) -> None:
    """Raise unless a declared, proportional rule fits the weights the router applied (a config that changed
    the rule, or an adapter registered for another architecture)."""
    if not routing.proportional or indices.shape[-1] < 2:
        return
    fits = fitting_rules(logits, weights, indices)
    if routing.scoring not in fits:
        raise UnknownArchitectureError(
            f"{where} is declared to score experts by {routing.scoring}, but the weights it applies follow "
            f"{' or '.join(fits) if fits else 'none of ' + ', '.join(SCORES)}; the adapter does not fit this "
            f"model: {HOW_TO_DECLARE}")


def locate(routing: Routing, out: tuple, tokens: int, where: str) -> Routing:
    """``routing`` with the positions of the applied weights and the expert indices in a router's outputs
    filled in: the floating [tokens, k] and the integer [tokens, k] tensors it returns besides its logits."""
    if routing.weights != "topk" or routing.weights_index is not None:
        return routing
    found = {True: [], False: []}
    for i, o in enumerate(out):
        if i != routing.logits_index and isinstance(o, torch.Tensor) and o.dim() == 2 and o.shape[0] == tokens:
            found[o.is_floating_point()].append(i)
    pairs = [(w, i) for w in found[True] for i in found[False] if out[w].shape == out[i].shape]
    if not pairs:
        raise UnknownArchitectureError(
            f"{where} returns no [tokens, k] weights and expert indices beside its logits (outputs: "
            f"{[tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in out]}); if its block "
            "hands them to its experts as experts(hidden, top_k_index, top_k_weights), declare "
            f"Routing(weights='experts'); {HOW_TO_DECLARE}")
    return replace(routing, weights_index=pairs[0][0], indices_index=pairs[0][1])


HOW_TO_DECLARE = ("declare its routing: workbench.models.register_adapter(model_type, Adapter(model_type, "
                  "routing=Routing(scoring='softmax' or 'sigmoid', ...)))")


__all__ = ["DISTRIBUTIONS", "DISTRIBUTION_NAMES", "UNNORMALIZED", "Routing", "WEIGHT_LAYOUTS", "check_scoring", "fitting_rules",
           "infer_scoring", "locate"]
