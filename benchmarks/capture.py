"""Capture overhead: time of `workbench.capture` divided by a bare forward pass over the same batches.

Both are measured side by side in one process on the same thread budget, after a warm-up, in interleaved
rounds (``_timing``: each timing at least 0.25 s of calls, rounds until the median paired ratio is known to
±2.5%), and the median of the paired ratios is printed with its quartiles, on
- the built-in MoE model (demo shape, modular addition, 961 samples), and
- a small random-weight OLMoE at OLMoE's routing shape (16 MoE layers, 64 experts, top-8; d=64, expert width
  32) on 512 random token sequences of 16 to 64 tokens.
The bare forward runs the model under inference_mode on the same length-bucketed, right-padded batches
with an attention mask; capture adds its router and loss hooks and the per-sample reductions. Target <= 1.05.

    python benchmarks/capture.py [--threads N] [--tiny]
"""

from __future__ import annotations

import torch

import _timing
from workbench import CaptureSpec, SampleSet, capture
from workbench.samples import length_buckets


def bare_forward(model, samples, token_budget):
    batches = length_buckets(samples.lengths, token_budget, 4096)
    with torch.inference_mode():
        for idx in batches:
            x, _, mask = samples.padded(idx)
            model(input_ids=x, attention_mask=mask).logits


def compare(model, samples, spec, limits: dict, token_budget=16384) -> _timing.Comparison:
    model.eval()
    return _timing.side_by_side({
        "capture": lambda: capture(model, samples, spec, token_budget=token_budget, device="cpu"),
        "bare forward": lambda: bare_forward(model, samples, token_budget),
    }, "bare forward", **({"min_time": 0.25} | limits))


def builtin_case():
    from workbench import toys

    cfg = toys.DEMO
    torch.manual_seed(0)
    model = toys.ToyMoETransformer(cfg.model_config())
    return model, toys.modular_addition(cfg.p, cfg.train_fraction)


def olmoe_case(n: int = 512):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    # OLMoE's routing shape (16 MoE layers, 64 experts, top-8), at a width that runs on two cores
    cfg = OlmoeConfig(vocab_size=1024, hidden_size=64, intermediate_size=32, num_hidden_layers=16,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
                      max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = OlmoeForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(3, 1024, (int(n),), generator=g).tolist() for n in torch.randint(16, 65, (n,), generator=g)]
    return model, SampleSet.from_token_lists(tokens)


def main():
    args = _timing.arguments(__doc__).parse_args()
    _timing.set_thread_budget(args.threads)
    _timing.header(f"capture overhead: capture / bare forward (torch {torch.__version__}, CPU)", args.threads)
    spec = CaptureSpec(routing=True, expert_load=True)
    for name, (model, samples) in (("built-in MoE", builtin_case()), ("tiny OLMoE", olmoe_case(32 if args.tiny else 512))):
        cmp = compare(model, samples, spec, _timing.limits(args))
        _timing.report(f"capture / bare forward, {name}", cmp, "capture", target="<= 1.05")
    _timing.footer()


if __name__ == "__main__":
    main()
