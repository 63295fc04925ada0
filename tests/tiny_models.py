"""Tiny random-weight Hugging Face models, built and saved by the tests themselves (hubs are out of reach).

``tiny_model(kind)`` gives a model of each architecture the workbench adapts; ``save_series(kind, folder)``
saves a checkpoint series (one ``save_pretrained`` folder per step, weights perturbed between steps), which
``Run.from_folder`` reads like a real pretraining run.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
MOE_KINDS = ("olmoe", "mixtral", "qwen2_moe")
DENSE_KINDS = ("gpt_neox", "llama")


def tiny_config(kind: str, n_layers: int = 3):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=32, num_key_value_heads=4, num_experts=8,
                              num_experts_per_tok=2)
    if kind == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=32, num_key_value_heads=2, num_local_experts=8,
                                num_experts_per_tok=2)
    if kind == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32, num_key_value_heads=4, num_experts=8,
                                 num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(**common, intermediate_size=64)
    if kind == "llama":
        return tf.LlamaConfig(**common, intermediate_size=64, num_key_value_heads=4)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0, n_layers: int = 3):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, n_layers))
    # Random init of routers is zeros in some architectures: give them spread so routing is not uniform.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2:
                p.normal_(0, 0.5)
    return model.eval()


def save_drifting(model, folder: str | Path, steps=(0, 10, 100), drift: float = 0.05) -> Path:
    """``model`` saved as a checkpoint series ``folder/step_<step>``, every parameter moved by Gaussian noise of
    scale ``drift`` from one checkpoint to the next (in place: the model ends as the last checkpoint)."""
    folder = Path(folder)
    for i, step in enumerate(steps):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(drift * torch.randn_like(p))
        model.save_pretrained(folder / f"step_{step}")
    return folder


def save_series(kind: str, folder: str | Path, steps=(0, 10, 100), seed: int = 0, n_layers: int = 3) -> Path:
    return save_drifting(tiny_model(kind, seed, n_layers), folder, steps)


def random_tokens(n: int, lo: int = 3, hi: int = 12, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]
