"""Every mixture-of-experts causal-LM architecture of the installed transformers, as tiny random models.

:func:`moe_model_types` finds them in transformers' own registry (the causal-LM mapping), not in a hand
list: an architecture is MoE when its modeling code records router logits (``_can_record_outputs``), so an
upgrade that adds one is picked up. Composite (vision + text) types whose text model type is registered on its
own are covered by that one. :func:`tiny_config` shrinks each default config generically (every size-like
integer), with a few per-type fixes where a default config does not shrink into a valid or MoE one; these
are sizes only, never which architectures are tested.
"""

from __future__ import annotations

import functools
import importlib
import re

import torch

VOCAB = 96
N_LAYERS = 3

# Sizes every config gets where it has the key.
SIZES = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
    shared_expert_intermediate_size=16, moe_shared_expert_intermediate_size=16, num_attention_heads=4,
    num_key_value_heads=4, head_dim=8, max_position_embeddings=64, num_hidden_layers=N_LAYERS, kv_lora_rank=16,
    q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2,
    num_experts_per_token=2, moe_topk=2, moe_k=2, top_k_experts=2, n_group=2, topk_group=1, num_expert_group=2,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, expert_layer_period=1, expert_layer_offset=0,
    decoder_sparse_step=1, mlp_only_layers=[0], moe_layer_start_index=0, interleave_moe_layer_step=1,
    n_shared_experts=1, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
    linear_num_value_heads=4, mamba_d_state=4, ssm_state_size=4, mamba_num_heads=4, mamba_n_heads=4,
    mamba_head_dim=8, n_groups=1, chunk_size=8, use_mamba_kernels=False, mamba_dt_rank=4,
    expert_ffn_hidden_size=16, zero_expert_num=2, index_n_heads=4, index_head_dim=8, index_topk=64,
    enable_moe_block=True, is_moe=True, router_jitter_noise=0.0, input_jitter_noise=0.0,
)
# Where a default config does not shrink into a valid MoE model with the generic sizes.
PER_TYPE = {
    "zaya": dict(num_experts_per_tok=1),
    "mimo_v2_flash": dict(num_key_value_heads=2),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "granitemoehybrid": dict(layer_types=["linear_attention", "attention", "linear_attention"]),
    "longcat_flash": dict(num_layers=2),
    "dots3_note_text": dict(num_key_value_heads=4, per_layer_config={"1": dict(  # its sliding layer's own sizes
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, head_dim=16,
        qk_nope_head_dim=8, v_head_dim=16, qk_rope_head_dim=8)}),
    "deepseek_v32": dict(num_key_value_heads=4), "axk2": dict(num_key_value_heads=4),
    "glm_moe_dsa": dict(num_key_value_heads=4),
    "lfm2_moe": dict(layer_types=["full_attention", "conv", "full_attention"], num_dense_layers=1),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
                           indexer_compress_ratio=2),
    "dbrx": dict(ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0), d_model=32, n_heads=4,
                 n_layers=N_LAYERS, max_seq_len=64),
}
_SIZE_NAME = re.compile(r"(size|dim|rank|channels|heads|lowrank)$")


def _transformers():
    import transformers

    return transformers


def causal_lm_class(model_type: str):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(_transformers(), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def _records_router_logits(cls) -> bool:
    module = importlib.import_module(cls.__module__)
    for obj in vars(module).values():
        rec = getattr(obj, "_can_record_outputs", None)
        if isinstance(rec, dict) and "router_logits" in rec:
            return True
    return False


@functools.lru_cache(maxsize=None)
def moe_model_types() -> tuple[str, ...]:
    """Every causal-LM model type of the installed transformers whose modeling code records router logits,
    composites covered by their own text type left out."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            cls = causal_lm_class(mt)
        except (AttributeError, ImportError):  # a class this install cannot import (missing extra)
            continue
        if _records_router_logits(cls):
            found.append(mt)
    config = _transformers().CONFIG_MAPPING
    return tuple(mt for mt in found
                 if getattr((getattr(config[mt], "sub_configs", None) or {}).get("text_config"), "model_type", None)
                 not in found)


def _layer_list(values: list, n: int) -> list:
    kinds = list(dict.fromkeys(v for v in values if isinstance(v, str)))
    moe = [k for k in ("moe", "sparse") if k in kinds]
    if moe:  # every layer MoE, but a hash-routed one first where there are such (DeepSeek-V4)
        return (["hash_moe"] if "hash_moe" in kinds else []) + [moe[0]] * (n - ("hash_moe" in kinds))
    return [kinds[i % len(kinds)] for i in range(n)]


def tiny_config(model_type: str, **extra):
    cls = _transformers().CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    kw = {k: v for k, v in SIZES.items() if k in defaults}
    for k, v in defaults.items():
        if k in kw or isinstance(v, bool):
            continue
        if isinstance(v, int) and v > VOCAB and "vocab" in k:
            kw[k] = VOCAB
        elif isinstance(v, int) and v > 64 and _SIZE_NAME.search(k) and "window" not in k and "position" not in k:
            kw[k] = 16
        elif isinstance(v, int) and v > 4 and k.endswith("heads"):
            kw[k] = 4
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v) and k.endswith("types"):
            kw[k] = _layer_list(v, N_LAYERS)
    kw.update(PER_TYPE.get(model_type, {}))
    kw.update(extra)
    return cls(**kw)


def _router_classes(cls) -> tuple[type, ...]:
    module = importlib.import_module(cls.__module__)
    out = []
    for obj in vars(module).values():
        rec = getattr(obj, "_can_record_outputs", None)
        spec = rec.get("router_logits") if isinstance(rec, dict) else None
        for s in spec if isinstance(spec, list) else [spec]:
            target = s if isinstance(s, type) else getattr(s, "target_class", None)
            if target is not None:
                out.append(target)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def tiny_moe(model_type: str, seed: int = 0):
    """A tiny random model of ``model_type`` in eval mode, its routers' matrices spread out (the random init of
    some is zeros) and its selection biases non-zero, so that every rule shows in its numbers. Cached: tests
    share it and must not change it."""
    torch.manual_seed(seed)
    cls = causal_lm_class(model_type)
    model = cls(tiny_config(model_type)).eval()
    routers = _router_classes(cls)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, routers):
                for p in m.parameters():
                    if p.dim() == 2:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in list(model.named_parameters()) + list(model.named_buffers()):
            if name.rsplit(".", 1)[-1] in ("e_score_correction_bias", "expert_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model
