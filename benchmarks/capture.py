"""Capture overhead: time of `workbench.capture` divided by a bare forward pass over the same batches.

Both are measured side by side in one process, in 21 back-to-back pairs (alternating which runs first),
and the median of the per-pair ratios is printed, on
- the built-in MoE model (demo shape, modular addition, 961 samples), and
- a tiny random-weight OLMoE (8 layers, 16 experts, d=64) on 512 random token sequences of 16 to 64 tokens.
The bare forward runs the model under inference_mode on the same length-bucketed, right-padded batches
with an attention mask; capture adds its router and loss hooks and the per-sample reductions. Target <= 1.05.

    python benchmarks/capture.py
"""

from __future__ import annotations

import statistics
import time

import torch

from workbench import CaptureSpec, SampleSet, capture
from workbench.samples import length_buckets


def bare_forward(model, samples, token_budget):
    batches = length_buckets(samples.lengths, token_budget, 4096)
    with torch.inference_mode():
        for idx in batches:
            x, _, mask = samples.padded(idx)
            model(input_ids=x, attention_mask=mask).logits


def paired_ratios(model, samples, spec, token_budget=16384, repeats=21):
    """Capture and bare forward timed back to back, alternating which goes first; one ratio per pair.

    The median of paired ratios is steadier than a ratio of two separate minimums: both members of a pair
    see the same machine state (frequency, caches, other load).
    """
    model.eval()
    run_capture = lambda: capture(model, samples, spec, token_budget=token_budget, device="cpu")  # noqa: E731
    run_bare = lambda: bare_forward(model, samples, token_budget)  # noqa: E731
    run_capture(), run_bare()  # warm-up
    t = time.perf_counter()
    run_bare()
    number = max(1, round(0.25 / (time.perf_counter() - t)))  # calls per timing: at least ~0.25 s of work
    ratios, t_cap, t_bare = [], [], []
    for i in range(repeats):
        times = {}
        order = ((run_bare, "bare"), (run_capture, "cap")) if i % 2 == 0 else ((run_capture, "cap"), (run_bare, "bare"))
        for fn, name in order:
            t = time.perf_counter()
            for _ in range(number):
                fn()
            times[name] = (time.perf_counter() - t) / number
        ratios.append(times["cap"] / times["bare"])
        t_cap.append(times["cap"])
        t_bare.append(times["bare"])
    return statistics.median(ratios), statistics.quantiles(ratios, n=4), statistics.median(t_cap), statistics.median(t_bare)


def builtin_case():
    from workbench import toys

    cfg = toys.DEMO
    torch.manual_seed(0)
    model = toys.ToyMoETransformer(cfg.model_config())
    return model, toys.modular_addition(cfg.p, cfg.train_fraction)


def olmoe_case():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=1024, hidden_size=64, intermediate_size=64, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
                      max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = OlmoeForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(3, 1024, (int(n),), generator=g).tolist() for n in torch.randint(16, 65, (512,), generator=g)]
    return model, SampleSet.from_token_lists(tokens)


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    spec = CaptureSpec(routing=True, expert_load=True)
    for name, (model, samples) in (("built-in MoE", builtin_case()), ("tiny OLMoE", olmoe_case())):
        ratio, (q1, _, q3), cap, bare = paired_ratios(model, samples, spec)
        print(f"{name:14s} capture {cap * 1e3:8.1f} ms   bare forward {bare * 1e3:8.1f} ms   "
              f"ratio {ratio:.3f} (median of 21 pairs; quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
