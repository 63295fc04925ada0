"""The built-in mixture-of-experts transformer.

Small enough to train on a laptop CPU in minutes, shaped like the Hugging Face MoE models (OLMoE, Mixtral,
Qwen2-MoE) so that the same adapters, hooks and probes apply to it: each block's MLP is a sparse MoE block
with a learned linear router (``block.mlp.gate``, weight [experts, d_model]) whose forward returns
``(router_logits, top_k_weights, top_k_index)`` exactly as transformers 5.x routers do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import InputError


@dataclass(frozen=True)
class ToyConfig:
    """Shape of a built-in model. ``model_type`` lets runs and adapters recognize it."""

    vocab_size: int
    n_ctx: int
    d_model: int = 48
    n_heads: int = 4
    n_layers: int = 4
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 96
    norm_topk_prob: bool = True
    layer_norm: bool = False
    model_type: str = "workbench-moe"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ToyConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class TopKRouter(nn.Module):
    """Linear router: logits = h W^T, softmax over experts, top-k, optional renormalization."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.num_experts = cfg.n_experts
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))

    def forward(self, hidden: torch.Tensor):
        hidden = hidden.reshape(-1, self.weight.shape[1])
        logits = F.linear(hidden, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return logits, top_w.to(logits.dtype), top_i


class Experts(nn.Module):
    """All experts as fused 3-D parameters (as in transformers 5.x), each applied only to its routed tokens.

    The (token, expert) slots chosen by the router are packed per expert into one [experts, R, d] batch (R: the
    most tokens any expert got, zero filler rows after each expert's own) and multiplied in one batched product
    per matrix: a loop over experts or a dense product over all of them costs several times more at this size
    (profiled: top-2 of 8 computes a quarter of the dense arithmetic, in 3 products instead of 8 per matrix).
    """

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        e, d, h = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.up_proj = nn.Parameter(torch.empty(e, h, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, h))

    def forward(self, hidden: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        # hidden [tokens, d], gates [tokens, experts] (zero outside each token's top-k)
        n_experts = gates.shape[1]
        expert, token = gates.T.nonzero(as_tuple=True)  # expert-major, each expert's tokens in order
        if expert.numel() == 0:
            return torch.zeros_like(hidden)
        counts = torch.bincount(expert, minlength=n_experts)
        rows = int(counts.max())
        slot = expert * rows + torch.arange(expert.numel(), device=expert.device) - (counts.cumsum(0) - counts)[expert]
        packed = hidden.new_zeros(n_experts * rows, hidden.shape[1]).index_copy(0, slot, hidden[token])
        act = F.gelu(torch.bmm(packed.view(n_experts, rows, -1), self.up_proj.mT))
        out = torch.bmm(act, self.down_proj.mT).reshape(n_experts * rows, -1)[slot]
        return torch.zeros_like(hidden).index_add(0, token, out * gates[token, expert, None])


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.gate = TopKRouter(cfg)
        self.experts = Experts(cfg)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, t, d = hidden.shape
        flat = hidden.reshape(-1, d)
        _, top_w, top_i = self.gate(flat)
        gates = torch.zeros(flat.shape[0], self.gate.num_experts, dtype=flat.dtype, device=flat.device)
        gates = gates.scatter(1, top_i, top_w)
        return self.experts(flat, gates).reshape(b, t, d)


class Attention(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # Causal attention only: samples are right-padded, so real tokens never attend to padding. Written out
        # rather than F.scaled_dot_product_attention, whose CPU kernel costs several times more on a few tokens.
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        y = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.d_model)) if cfg.layer_norm else nn.Identity
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = norm()
        self.mlp = SparseMoeBlock(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class ToyMoETransformer(nn.Module):
    """Decoder-only MoE transformer; ``forward`` returns an object with ``.logits`` like HF models."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.config.d_model
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # LayerNorm weights/biases keep their defaults
            fan_in = p.shape[-1]
            nn.init.normal_(p, std=1.0 / math.sqrt(fan_in if "embed" not in name else d))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        if input_ids.shape[1] > self.config.n_ctx:
            raise InputError(
                f"input of {input_ids.shape[1]} tokens is longer than the model's context of "
                f"{self.config.n_ctx}; truncate the samples or use a model with a longer context"
            )
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(pos)
        for block in self.layers:
            x = block(x)
        return SimpleNamespace(logits=self.lm_head(self.norm(x)))
