"""Batched capture: one forward pass over a sample set collects what the probes need.

Per sample it returns loss, accuracy and confidence over the sample's scored positions; with routing, at
every MoE layer and averaged over the sample's non-padding tokens ([samples, layers, experts]): the model's
own expert scores as a distribution (``routing_weights="scores"``, the default: softmax probabilities for
softmax routers, the scores normalized to sum 1 for sigmoid routers) or the weights it applies to its
selected experts, normalized per token to sum 1 (``"topk"``); optionally the applied weights as they are
(``applied``) and the share of tokens choosing each expert (``expert_load``). How a router scores and where it
keeps its weights is the adapter's :class:`~workbench.models.routing.Routing`: capture never applies a
softmax the model does not apply. With hidden layers, the hidden state after those blocks (last non-padding
token, or the mean over tokens).

Hooks reduce on the device: router hooks keep each MoE layer's outputs, and after the forward pass all layers
are reduced together to [batch, experts] sums before anything moves; only those reductions are copied to the
host (non-blocking into pinned memory on CUDA). Batches are bucketed by length so padding stays small, and
masks keep padding out of every number.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.errors import InputError, NumericalError, TokenizerMismatchError, UnknownArchitectureError
from workbench.models import adapter_for
from workbench.models.routing import UNNORMALIZED, Routing, check_scoring, infer_scoring, locate
from workbench.samples import IGNORE, SampleSet, length_buckets
from workbench.spill import RowBuffers


ROUTING_WEIGHTS = ("scores", "topk", "softmax")


def _same_scores(v):
    return "scores" if v == "softmax" else v


@dataclass(frozen=True)
class CaptureSpec:
    """What one capture pass collects.

    routing: routing weights per MoE layer, averaged over each sample's tokens (a distribution over experts).
    routing_weights: ``"scores"`` (default: the model's own scores of all experts as a distribution:
        softmax probabilities, or sigmoid scores normalized to sum 1, as its router scores them), ``"topk"``
        (the weights the model applies to its selected experts, normalized per token to sum 1, zero
        elsewhere), or ``"softmax"`` (the SPEC's name: ``"scores"`` for routers that score with a softmax,
        refused for the others).
    applied: also the weights the model applies to its selected experts as they are (not normalized),
        averaged over each sample's tokens.
    expert_load: also the fraction of each sample's tokens that select each expert (top-k choices).
    hidden_layers: block indices whose output hidden state to keep (negative counts from the end).
    hidden_reduce: ``"last"`` (last non-padding token) or ``"mean"`` (mean over non-padding tokens).
    """

    routing: bool = False
    routing_weights: str = "scores"
    applied: bool = False
    expert_load: bool = False
    hidden_layers: tuple[int, ...] = ()
    hidden_reduce: str = "last"

    def __post_init__(self) -> None:
        if self.routing_weights not in ROUTING_WEIGHTS:
            raise InputError(f"routing_weights must be one of {ROUTING_WEIGHTS}, not {self.routing_weights!r}")
        if self.hidden_reduce not in ("last", "mean"):
            raise InputError(f"hidden_reduce must be 'last' or 'mean', not {self.hidden_reduce!r}")

    def union(self, other: "CaptureSpec") -> "CaptureSpec":
        """A spec that collects what both collect (their routing and reduce choices must agree)."""
        for name in ("routing_weights", "hidden_reduce"):
            a, b = (_same_scores(getattr(self, name)), _same_scores(getattr(other, name)))
            used_a = self.routing if name == "routing_weights" else bool(self.hidden_layers)
            used_b = other.routing if name == "routing_weights" else bool(other.hidden_layers)
            if used_a and used_b and a != b:
                raise InputError(f"two measurements ask for different {name} ({a!r}, {b!r}); capture them apart")
        weights = {s.routing_weights for s in (self, other) if s.routing}
        return CaptureSpec(
            routing=self.routing or other.routing,
            # "softmax" and "scores" are the same numbers where "softmax" is allowed at all: keep the stricter
            routing_weights="softmax" if "softmax" in weights else (weights.pop() if weights else "scores"),
            applied=self.applied or other.applied,
            expert_load=self.expert_load or other.expert_load,
            hidden_layers=tuple(sorted(set(self.hidden_layers) | set(other.hidden_layers))),
            hidden_reduce=self.hidden_reduce if self.hidden_layers else other.hidden_reduce,
        )


@dataclass
class Capture:
    """What one pass collected, in the sample set's order, on the host (CPU)."""

    sample_ids: list[str]
    groups: list[str]
    loss: torch.Tensor  # [N] mean token NLL over scored positions (NaN where none is scored)
    accuracy: torch.Tensor  # [N] share of scored positions whose argmax is the target
    confidence: torch.Tensor  # [N] mean probability of the argmax token over scored positions
    target_prob: torch.Tensor  # [N] mean probability of the target token over scored positions
    n_scored: torch.Tensor  # [N] number of scored positions
    n_tokens: torch.Tensor  # [N] number of non-padding tokens
    routing: torch.Tensor | None = None  # [N, L, E] token-averaged routing weights (rows sum to 1)
    applied: torch.Tensor | None = None  # [N, L, E] token-averaged weights applied to the selected experts
    expert_load: torch.Tensor | None = None  # [N, L, E] share of tokens choosing each expert (rows sum to k)
    moe_layers: list[int] = field(default_factory=list)  # block index of each MoE layer
    router_matrices: list[torch.Tensor] | None = None  # per MoE layer [E, d]; None when the router has none
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> [N, d]
    top_k: int | None = None
    routing_weights: str | None = None  # what ``routing`` holds: "scores" or "topk"
    scoring: str | None = None  # how the routers score experts ("softmax", "sigmoid", ...)
    no_router_matrices: str | None = None  # why router_matrices is None
    rows: torch.Tensor | None = None  # the samples this capture computed (a shard of the batches); None: all

    def __len__(self) -> int:
        return len(self.sample_ids)

    def group_indices(self, group: str) -> torch.Tensor:
        return torch.tensor([i for i, g in enumerate(self.groups) if g == group], dtype=torch.long)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def vocab_size(model: nn.Module) -> int | None:
    """The number of token ids the model's input embedding takes (None when it has none to find)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def model_positions(model: nn.Module) -> int | None:
    """The longest input the model takes, in tokens, as its config says (None when it does not say). A rotary
    model runs past it without an error, with positions it was never trained on: that is refused too."""
    cfg = getattr(model, "config", None)
    for name in ("n_ctx", "max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _top_k(model: nn.Module, router: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for obj in (router, text, getattr(text, "ffn_config", None)):
        for name in ("top_k", "num_experts_per_tok", "moe_top_k", "moe_topk", "moe_k", "top_k_experts",
                     "num_experts_per_token"):
            k = getattr(obj, name, None) if obj is not None else None
            if isinstance(k, int):
                return k
    return None


class _RouterHook:
    """Forward hook on one router: keeps its output for the reduction after the forward pass.

    Reducing all MoE layers together after the pass (one scoring, one einsum, one scatter for every layer)
    costs a fixed handful of operations per batch instead of a dozen per layer, which matters for small
    models, where per-operation overhead and not arithmetic is the cost.
    """

    def __init__(self, state: "_BatchState", slot: int):
        self.state, self.slot = state, slot

    def __call__(self, module, inputs, output):
        self.state.router_out[self.slot] = output if isinstance(output, tuple) else (output,)


class _ExpertsHook:
    """Forward pre-hook on the experts of a block whose router returns logits only (DBRX): the weights and
    expert indices the block hands its experts, ``experts(hidden, top_k_index, top_k_weights)``."""

    def __init__(self, state: "_BatchState", slot: int):
        self.state, self.slot = state, slot

    def __call__(self, module, args, kwargs):
        index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
        weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights")
        self.state.experts_in[self.slot] = (weights, index)


#: The routing of each model, settled on its first batch (positions found, scoring inferred or checked),
#: by its first router: later captures of the same model skip that work.
_SETTLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _Routers:
    """What capture knows about the routers of one model."""

    routing: Routing
    k: int | None
    where: str  # names the routers in messages
    settled: bool = False


def _top(st: "_BatchState", r: _Routers, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Applied weights and expert indices of every layer, [L, T, k]."""
    routing, outs = r.routing, st.router_out
    if routing.weights == "topk":
        wi, ii = routing.weights_index, routing.indices_index
        top_w = torch.stack([o[wi] for o in outs])
        top_i = torch.stack([o[ii] for o in outs])
    elif routing.weights == "experts":
        top_w = torch.stack([w for w, _ in st.experts_in])
        top_i = torch.stack([i for _, i in st.experts_in])
    else:  # a layout that needs decoding layer by layer (Llama 4, JetMoE)
        decoded = [routing.decode(o, r.k) for o in outs]
        top_w = torch.stack([d[1] for d in decoded])
        top_i = torch.stack([d[2] for d in decoded])
    return top_w.reshape(len(outs), tokens, -1).float(), top_i.reshape(len(outs), tokens, -1)


def _settle(st: "_BatchState", r: _Routers, first: nn.Module, tokens: int) -> None:
    """On a model's first batch: find where its routers keep the applied weights, infer or check its scoring
    rule against them, and refuse a softmax the model does not apply."""
    routing = locate(r.routing, st.router_out[0], tokens, r.where)
    r.routing = routing
    logits = torch.stack([o[routing.logits_index] for o in st.router_out]).reshape(tokens * len(st.router_out), -1)
    if routing.weights == "experts" and any(e is None for e in st.experts_in):
        raise UnknownArchitectureError(f"{r.where}: the experts were not called as experts(hidden, top_k_index, "
                                       "top_k_weights), so the weights they apply cannot be read")
    top_w, top_i = _top(st, r, tokens)
    top_w, top_i = top_w.reshape(-1, top_w.shape[-1]), top_i.reshape(-1, top_i.shape[-1])
    if routing.scoring is None:
        routing = replace(routing, scoring=infer_scoring(logits, top_w, top_i, r.where))
    else:
        check_scoring(routing, logits, top_w, top_i, r.where)
    r.routing, r.k, r.settled = routing, top_i.shape[-1], True
    _SETTLED[first] = (routing, r.k)


#: Elements of one chunk of [layers, tokens, experts] scores in :func:`_reduce_routing`: blocks of about 4 MB
#: stay in the cache through their passes (for a large batch, a layer at a time; a small model's layers at once).
ROUTING_CHUNK = 1 << 20


def _reduce_routing(st: "_BatchState", spec: CaptureSpec, r: _Routers) -> None:
    """Token-averaged routing weights (and applied weights, expert load) of every MoE layer for the batch, on
    the device.

    The model's scores as a distribution are averaged as ``Σ_t (w_t / z_t) u_t`` (``u`` the unnormalized scores
    of token ``t``, ``z`` their sum, ``w`` the token weights of the masked mean), so the [tokens, experts] scores
    are never divided; layers go in chunks of :data:`ROUTING_CHUNK` elements. The top-k weights (normalized,
    applied) and the load only touch the k selected experts of each token: they are added up by expert
    (``scatter_add``) without a [tokens, experts] tensor.
    """
    b, t = st.mask.shape
    outs = st.router_out
    n_layers = len(outs)
    li = r.routing.logits_index
    first = outs[0][li]
    if first.shape[:-1].numel() != b * t:
        raise UnknownArchitectureError(
            f"{r.where} returned logits of shape {tuple(first.shape)} for {b}x{t} tokens; the workbench "
            "needs one row of logits per token")
    n_exp = first.shape[-1]
    device = first.device
    if spec.routing_weights == "topk" or spec.expert_load or spec.applied:
        top_w, top_i = _top(st, r, b * t)
        k = top_i.shape[-1]
        index = top_i.reshape(n_layers, b, t * k)
        token_w = st.token_w.unsqueeze(-1).expand(b, t, k).reshape(1, b, t * k)

        def by_expert(values: torch.Tensor | None) -> torch.Tensor:
            """Σ over the batch's token slots of token weight × ``values`` [L, T, k], per sample and expert."""
            v = token_w.expand(n_layers, b, t * k) if values is None else token_w * values.reshape(n_layers, b, t * k)
            out = torch.zeros(n_layers, b, n_exp, dtype=torch.float32, device=device)
            return out.scatter_add_(2, index, v).transpose(0, 1)

    if spec.routing_weights == "topk":  # explicitly: a distribution per token
        st.routing = by_expert(top_w / top_w.sum(-1, keepdim=True).clamp_min(1e-30))
    else:  # the model's own scores as a distribution
        unnormalized = UNNORMALIZED[r.routing.scoring]
        per = max(1, ROUTING_CHUNK // max(1, b * t * n_exp))
        parts = []
        for lo in range(0, n_layers, per):
            # a fresh float copy (the scoring works in place on it)
            x = torch.stack([o[li].reshape(b * t, n_exp) for o in outs[lo:lo + per]]).float()
            scores, sums = unnormalized(x)
            coef = st.token_w.reshape(1, b * t) if sums is None else st.token_w.reshape(1, b * t) / sums
            parts.append(torch.matmul(coef.view(-1, b, 1, t), scores.view(-1, b, t, n_exp)).squeeze(2))
        st.routing = (parts[0] if len(parts) == 1 else torch.cat(parts)).transpose(0, 1)
    if spec.applied:
        st.applied = by_expert(top_w)
    if spec.expert_load:
        st.load = by_expert(None)


class _HiddenHook:
    def __init__(self, state: "_BatchState", layer: int, reduce: str):
        self.state, self.layer, self.reduce = state, layer, reduce

    def __call__(self, module, inputs, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        st = self.state
        if self.reduce == "last":
            last = st.n_tok.long() - 1
            st.hidden[self.layer] = h[torch.arange(h.shape[0], device=h.device), last].float()
        else:
            m = st.mask.unsqueeze(-1).to(h.dtype)
            st.hidden[self.layer] = ((h * m).sum(1) / st.n_tok.unsqueeze(-1)).float()


@dataclass
class _BatchState:
    mask: torch.Tensor = None
    n_tok: torch.Tensor = None
    token_w: torch.Tensor = None
    routing: torch.Tensor = None
    applied: torch.Tensor = None
    load: torch.Tensor = None
    router_out: list = field(default_factory=list)
    experts_in: list = field(default_factory=list)
    hidden: dict = field(default_factory=dict)


def _vocab_reductions(logits: torch.Tensor, targets: torch.Tensor, chunk_elements: int = 1 << 20):
    """Per row: negative log-likelihood of the target, log-sum-exp, and the max logit with its index.

    Each is a memory-bound pass over [tokens, vocab]; on blocks of about 4 MB the passes hit the cache instead
    of main memory (about twice as fast on a CPU as whole-tensor passes), and torch's fused cross-entropy
    kernel gives the NLL in one of them.
    """
    rows = max(1, chunk_elements // max(1, logits.shape[-1]))
    nll, top, top_i = [], [], []
    for block, tgt in zip(logits.split(rows), targets.split(rows)):
        block = block.float()
        nll.append(F.cross_entropy(block, tgt, reduction="none"))
        m, i = block.max(-1)
        top.append(m)
        top_i.append(i)
    nll = torch.cat(nll)
    lse = nll + logits.gather(1, targets[:, None]).squeeze(1).float()
    return nll, lse, torch.cat(top), torch.cat(top_i)


def _check_finite(lse: torch.Tensor) -> None:
    if not bool(torch.isfinite(lse).all()):
        raise NumericalError(
            "the model produced NaN or infinite logits; the checkpoint may be corrupt or the dtype too narrow "
            "(try dtype=torch.float32)"
        )


def _per_sample_scores(logits: torch.Tensor, targets: torch.Tensor):
    """Loss, accuracy, confidence and target probability per row, over scored positions only.

    Works from reductions over the vocabulary (logsumexp, max, one gathered logit) rather than a full
    log-softmax, so no second [tokens, vocab] tensor is made. When few positions are scored (an answer after
    a prompt) those are picked out first; when most are (pretraining text) every position is reduced in place
    and the unscored ones are masked afterwards, which avoids copying the logits.
    """
    b, t = targets.shape
    scored = targets != IGNORE
    n = scored.sum(1)
    if bool((n == 1).all()):  # one answer token per sample: the selected rows are already one per sample
        nll, lse, top, top_i = _vocab_reductions(logits[scored], targets[scored])
        _check_finite(lse)
        return nll, (top_i == targets[scored]).float(), torch.exp(top - lse), torch.exp(-nll), n
    if 2 * int(n.sum()) < scored.numel():
        sel, tgt = logits[scored], targets[scored]
        row = torch.arange(b, device=targets.device)[:, None].expand_as(targets)[scored]
        weight = None
    else:
        sel, tgt = logits.reshape(b * t, -1), targets.reshape(-1).clamp_min(0)
        row, weight = None, scored.reshape(-1).float()
    nll, lse, top, top_i = _vocab_reductions(sel, tgt)
    _check_finite(lse if weight is None else lse.masked_fill(weight == 0, 0.0))

    def per_row(v):
        v = v.float()
        if weight is None:
            return torch.zeros(b, device=logits.device).index_add_(0, row, v)
        return (torch.nan_to_num(v) * weight).reshape(b, t).sum(1)

    denom = n.clamp(min=1).float()
    nan = torch.where(n > 0, 0.0, float("nan"))
    return (
        per_row(nll) / denom + nan,
        per_row(top_i == tgt) / denom + nan,
        per_row(torch.exp(top - lse)) / denom + nan,
        per_row(torch.exp(-nll)) / denom + nan,
        n,
    )


def capture(
    model: nn.Module,
    samples: SampleSet,
    spec: CaptureSpec = CaptureSpec(),
    *,
    device: str | torch.device | None = None,
    token_budget: int = 16384,
    max_batch: int = 4096,
    autocast: bool | None = None,
    pad_id: int = 0,
    truncate: bool = False,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
    memory_budget: int | None = None,
    spill_dir: str | os.PathLike | None = None,
) -> Capture:
    """Run ``samples`` through ``model`` once and collect what ``spec`` asks for.

    The model is moved to ``device`` (default: CUDA when present, else CPU) and put in eval mode.
    ``autocast`` defaults to bf16 autocast on CUDA and none on CPU. Samples are checked against the model first
    (:meth:`SampleSet.fit`): token ids within its vocabulary, lengths within its positions (``truncate=True``
    cuts longer ones instead of refusing them).

    ``shard=(rank, world)`` runs only every ``world``-th batch from ``rank`` (the batches are made over all
    samples, so each is the batch a lone capture runs); the Capture's ``rows`` names the samples it holds, the
    other rows are undefined (:mod:`workbench.sharding` gathers the shards). ``memory_budget`` (bytes) bounds
    the per-sample tensors that grow with the sample count (routing, applied, load, hidden states) held in
    memory: past it they are written batch by batch to memory-mapped files in ``spill_dir`` (default: the
    temporary folder), unlinked at once so nothing is left behind (:class:`workbench.spill.RowBuffers`).
    """
    device = torch.device(device) if device is not None else default_device()
    first = next(model.parameters(), None)
    # A model dispatched with device_map stays where it was placed; its hooks move inputs and outputs.
    if first is not None and first.device != device and not getattr(model, "hf_device_map", None):
        model = model.to(device)
    if model.training:  # eval() walks every module: skip it when the model is already in eval mode
        model.eval()
    samples = samples.fit(vocab_size(model), model_positions(model), truncate=truncate)
    adapter = adapter_for(model)
    n = len(samples)
    cuda = device.type == "cuda"
    use_autocast = cuda if autocast is None else autocast
    state = _BatchState()
    handles = []
    layers = adapter.require_moe(model) if spec.routing else []
    moe_layers = [layer.index for layer in layers]
    r = _routers(model, adapter, layers) if layers else None
    if r is not None and r.settled:
        _check_weights_option(spec, r)
    for slot, layer in enumerate(layers):
        handles.append(layer.router.register_forward_hook(_RouterHook(state, slot)))
        if r.routing.weights == "experts":
            if layer.experts is None:
                raise UnknownArchitectureError(f"{r.where}: the adapter found no experts module to read weights at")
            handles.append(layer.experts.register_forward_pre_hook(_ExpertsHook(state, slot), with_kwargs=True))
    blocks = adapter.blocks(model) if spec.hidden_layers else []
    hidden_layers = sorted({h % len(blocks) for h in spec.hidden_layers}) if blocks else []
    for h in spec.hidden_layers:
        if not -len(blocks) <= h < len(blocks):
            raise InputError(f"hidden layer {h} does not exist: the model has {len(blocks)} blocks (0..{len(blocks) - 1})")
    for layer in hidden_layers:
        handles.append(blocks[layer].register_forward_hook(_HiddenHook(state, layer, spec.hidden_reduce)))

    host = dict(pin_memory=cuda)
    out = {name: torch.empty(n, **host) for name in ("loss", "accuracy", "confidence", "target_prob")}
    out["n_scored"] = torch.empty(n, dtype=torch.long, **host)
    per_expert: dict[str, torch.Tensor] = {}  # routing, applied, load: [N, L, E], made at the first batch
    hidden: dict[int, torch.Tensor] = {}
    buffers = RowBuffers(memory_budget, spill_dir, pin_memory=cuda)

    batches = length_buckets(samples.lengths, token_budget, max_batch)
    if shard is not None:
        batches = batches[shard[0]::shard[1]]
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
    try:
        with torch.inference_mode(), amp:
            # (a disabled tqdm still costs a tenth of a millisecond per call: a small model captures in 30 ms)
            for idx in (tqdm(batches, desc="capture", leave=False) if progress else batches):
                x, y, mask = samples.padded(idx, pad_id)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                state.mask = mask.float()
                state.n_tok = state.mask.sum(1)
                state.token_w = state.mask / state.n_tok.unsqueeze(1)
                state.router_out = [None] * len(layers)
                state.experts_in = [None] * len(layers)
                state.hidden = {}
                logits = model(input_ids=x, attention_mask=mask).logits
                if layers:
                    if not r.settled:
                        _settle(state, r, layers[0].router, x.numel())
                        _check_weights_option(spec, r)
                    _reduce_routing(state, spec, r)
                scores = _per_sample_scores(logits, y)
                rows = _index_tensor(idx)
                for name, v in zip(("loss", "accuracy", "confidence", "target_prob", "n_scored"), scores):
                    out[name][rows] = v.to("cpu", non_blocking=cuda)
                for name, v in (("routing", state.routing), ("applied", state.applied), ("load", state.load)):
                    if v is not None:
                        if name not in per_expert:
                            with torch.inference_mode(False):  # ordinary tensors: callers (the gather of a
                                # sharded capture) write into them outside inference mode
                                per_expert[name] = buffers.rows((n,) + tuple(v.shape[1:]))
                        per_expert[name][rows] = v.to("cpu", non_blocking=cuda)
                for layer, h in state.hidden.items():
                    if layer not in hidden:
                        with torch.inference_mode(False):
                            hidden[layer] = buffers.rows((n, h.shape[-1]))
                    hidden[layer][rows] = h.to("cpu", non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        for h in handles:
            h.remove()
    matrices, why_not = (_router_matrices(adapter, layers, per_expert["routing"].shape[-1])
                         if "routing" in per_expert else (None, None))

    return Capture(
        sample_ids=list(samples.ids),
        groups=list(samples.groups),
        loss=out["loss"],
        accuracy=out["accuracy"],
        confidence=out["confidence"],
        target_prob=out["target_prob"],
        n_scored=out["n_scored"],
        n_tokens=_index_tensor(samples.lengths),
        routing=per_expert.get("routing"),
        applied=per_expert.get("applied"),
        expert_load=per_expert.get("load"),
        moe_layers=moe_layers,
        router_matrices=matrices,
        hidden=hidden,
        top_k=r.k if r else None,
        routing_weights=_same_scores(spec.routing_weights) if layers else None,
        scoring=r.routing.scoring if r else None,
        no_router_matrices=why_not,
        rows=torch.as_tensor([i for b in batches for i in b], dtype=torch.long) if shard is not None else None,
    )


def _index_tensor(values) -> torch.Tensor:
    """A list of ints as a long tensor, through numpy: five times faster than ``torch.as_tensor`` on a list (a
    tenth of a millisecond per thousand samples, per batch: a percent of a small model's forward pass)."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def _routers(model: nn.Module, adapter, layers) -> _Routers:
    where = f"{type(layers[0].router).__name__} (the router of {adapter.name})"
    settled = _SETTLED.get(layers[0].router)
    if settled is not None:
        return _Routers(settled[0], settled[1], where, settled=True)
    return _Routers(adapter.routing or Routing(), _top_k(model, layers[0].router), where)


def _check_weights_option(spec: CaptureSpec, r: _Routers) -> None:
    if spec.routing_weights == "softmax" and r.routing.scoring not in ("softmax", "probabilities"):
        raise InputError(
            f"routing_weights='softmax' asks for the router's softmax, but {r.where} scores experts with "
            f"{r.routing.scoring}: a softmax of its logits is not what the model computes; use "
            "routing_weights='scores' (its own scores normalized to sum 1) or 'topk' (the weights it applies)")


def _router_matrices(adapter, layers, n_experts: int | None) -> tuple[list[torch.Tensor] | None, str | None]:
    """Each MoE layer's router matrix [E, d] (the routed experts' rows), or None and the reason."""
    try:
        ws = []
        for layer in layers:
            with _onloaded(layer.router):
                ws.append(adapter.router_weight_of(layer.router).detach()[:n_experts].float().cpu().clone())
    except UnknownArchitectureError as exc:
        return None, str(exc)
    return ws, None


@contextlib.contextmanager
def _onloaded(module: nn.Module):
    """The weights of ``module`` in place for a moment where accelerate offloaded them (a device_map with
    "disk", or offloading to the CPU: the parameters are on the meta device outside the forward pass)."""
    if not any(hasattr(m, "_hf_hook") for m in module.modules()):
        yield
        return
    from accelerate.utils import align_module_device  # a dependency of device_map loading: present then

    with contextlib.ExitStack() as stack:
        for m in module.modules():
            stack.enter_context(align_module_device(m))
        yield


__all__ = ["Capture", "CaptureSpec", "capture", "default_device", "model_positions", "vocab_size"]
