"""Gradient coherence's cost per checkpoint against one plain backward pass over the same samples.

Both sides run side by side in one process on the same thread budget, in interleaved rounds (``_timing``), on
the same samples in the same length-bucketed batches:
- coherence: the ``coherence`` measurement's work at one checkpoint (every set: the train and test groups and
  the random-label copy of train; per-example gradient sums of every tracked matrix, the rows it stores);
- plain backward: for each of those sets, the forward pass, the same per-example losses summed, and
  ``loss.backward()`` into every parameter's ``.grad``: what one ordinary gradient computation over the same
  samples costs.
Cases: the built-in MoE model (demo shape, modular addition: with the measurement's default of 256 samples a
group, 768 with the control) and a tiny random-weight OLMoE (8 layers, 16 experts, d=64) on 512 random token
sequences of 16 to 64 tokens (in two groups of 256, 768 with the control). Target <= 1.5.

    python benchmarks/coherence.py [--threads N] [--tiny]
"""

from __future__ import annotations

import torch

import _timing
import capture
from workbench import SampleSet
from workbench.measure import StepContext
from workbench.probes.coherence import GradientCoherence
from workbench.probes.coherence.passes import per_sample_loss
from workbench.samples import length_buckets


def plain_backward(model, sets, token_budget, max_batch):
    model.zero_grad(set_to_none=True)
    for _, _, samples in sets:
        for idx in length_buckets(samples.lengths, token_budget, max_batch):
            x, y, mask = samples.padded(idx)
            loss, _ = per_sample_loss(model(input_ids=x, attention_mask=mask).logits, y)
            loss.sum().backward()


def compare(model, samples, limits: dict) -> _timing.Comparison:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    m = GradientCoherence()
    ctx = StepContext(run=None, checkpoint=None, model=model, device=torch.device("cpu"), store=None, progress=False,
                      given_samples=samples)
    sets = m.sets(samples)
    return _timing.side_by_side({
        "coherence": lambda: m.measure(None, ctx),
        "plain backward": lambda: plain_backward(model, sets, m.token_budget, m.max_batch),
    }, "plain backward", **({"min_time": 0.25} | limits))


def builtin_case(tiny: bool):
    from workbench import toys

    cfg = toys.DEMO
    torch.manual_seed(0)
    model = toys.ToyMoETransformer(cfg.model_config())
    samples = toys.modular_addition(cfg.p, cfg.train_fraction)
    return model, samples.select(range(0, len(samples), 8)) if tiny else samples


def olmoe_case(n: int):
    model, samples = capture.olmoe_case(n)  # the capture benchmark's tiny OLMoE and sequences, split in two groups
    return model, SampleSet.from_token_lists(list(samples.input_ids),
                                             groups=["train" if i % 2 == 0 else "test" for i in range(n)])


def main():
    args = _timing.arguments(__doc__).parse_args()
    _timing.set_thread_budget(args.threads)
    _timing.header(f"gradient coherence per checkpoint / plain backward (torch {torch.__version__}, CPU)", args.threads)
    for name, (model, samples) in (("built-in MoE", builtin_case(args.tiny)), ("tiny OLMoE", olmoe_case(32 if args.tiny else 512))):
        cmp = compare(model, samples, _timing.limits(args))
        n = sum(len(s) for _, _, s in GradientCoherence().sets(samples))
        _timing.report(f"coherence / plain backward, {name} ({n} samples with the control)", cmp, "coherence",
                       target="<= 1.5")
    _timing.footer()


if __name__ == "__main__":
    main()
