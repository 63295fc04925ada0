"""MoE experts and routers in the influence estimator: parameter coverage and the time it costs.

For tiny random-weight OLMoE, Mixtral and Qwen2-MoE models (``tests.tiny_models``, hidden size 32, 8 experts,
top-2, 3 layers, made a little wider here: hidden 64, expert width 64) and the built-in MoE transformer, in one
process:

- coverage: the share of MLP parameters that the default LM modules track (``lm_modules``: MLP linear
  layers + every expert's matrices + the router), against what a linear-layer tracker finds
  (``modules=None``: every ``nn.Linear``; target >= 95% of MLP parameters);
- time: EK-FAC factors fitted on the documents and pairwise scores of the queries against them, with
  (a) the dense linear layers alone (every ``nn.Linear``: attention, shared experts, LM head) and
  (b) the same plus the experts and routers, and the ratio b / a (target <= 1.5x). Because (b) tracks many
  more parameters than (a) (the experts hold most of an MoE model's MLP), the time per tracked parameter
  (b relative to a) is printed too, and (d) the same measurement on a dense model of the same width and
  depth whose MLP ``nn.Linear`` layers hold as many parameters as the experts: b / d is what tracking the
  experts costs against tracking the same number of MLP parameters as dense linear layers.

Each timed call is the whole per-checkpoint cost, as ``measure_influence`` pays it: finding the modules, fitting
the factors (covariance pass, eigendecompositions, eigenvalue pass) and scoring. Experts that get no document
token with a gradient are found inside the covariance pass and left out there (``fit_factors``'
``idle_experts="drop"``), with no pass of their own.

    python benchmarks/influence_moe.py            # 512 documents, 32 queries of 32 tokens
    python benchmarks/influence_moe.py --quick    # 128 documents, 8 queries
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402
from tests.tiny_models import MOE_KINDS, random_tokens, tiny_config  # noqa: E402
from workbench.probes.influence import fit_factors, pairwise_scores, resolve_modules  # noqa: E402
from workbench.probes.influence.lm import LMTask, batches, lm_documents  # noqa: E402
from workbench.gradients.moe import IdleExpertsWarning, lm_modules, mlp_coverage  # noqa: E402
from workbench.models.toy import ToyConfig, ToyMoETransformer  # noqa: E402

TASK = LMTask()


def make_model(kind: str, tiny: bool = False):
    torch.manual_seed(0)
    if kind == "builtin":
        return ToyMoETransformer(ToyConfig(vocab_size=96, n_ctx=64, d_model=64, n_heads=4, n_layers=3, n_experts=8,
                                           top_k=2, d_expert=64, layer_norm=True)).eval()
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(kind, n_layers=2 if tiny else 3)
    if not tiny:
        cfg.hidden_size = 64
        if kind == "qwen2_moe":
            cfg.moe_intermediate_size = cfg.shared_expert_intermediate_size = 64
        else:
            cfg.intermediate_size = 64
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # routers start at zero in some architectures: give them spread
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2:
                p.normal_(0, 0.5)
    return model


def dense_equivalent(kind: str, moe_model):
    """A dense model of the same width and depth whose MLP linear layers hold as many parameters as the MoE
    model's experts (and shared expert): the same MLP parameters, as plain nn.Linear layers."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "builtin":
        c = moe_model.config
        cfg = tf.GPTNeoXConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                               num_attention_heads=c.n_heads, intermediate_size=c.n_experts * c.d_expert,
                               max_position_embeddings=c.n_ctx)
    else:
        c = moe_model.config
        n_exp = getattr(c, "num_experts", None) or c.num_local_experts
        inter = (c.moe_intermediate_size if kind == "qwen2_moe" else c.intermediate_size) * n_exp
        if kind == "qwen2_moe":
            inter += c.shared_expert_intermediate_size
        cfg = tf.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                             num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                             intermediate_size=inter, max_position_embeddings=c.max_position_embeddings)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def fit_and_score(model, modules, docs, queries):
    """What one checkpoint costs: ``modules`` is a list, or a function of the model and documents giving it."""
    if callable(modules):
        modules = modules(model, docs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdleExpertsWarning)  # idle experts left out by the fit, as measured
        f = fit_factors(model, docs, loss_fn=TASK.loss, modules=modules, mask_fn=TASK.mask, progress=False,
                        report=False)
    return pairwise_scores(model, f, queries, docs, loss_fn=TASK.loss, measurement_fn=TASK.measurement,
                           modules=modules, mask_fn=TASK.mask, progress=False)


def main() -> None:
    ap = _timing.arguments(__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    _timing.set_thread_budget(args.threads)
    _timing.header("MoE experts and routers in EK-FAC influence: coverage and time", args.threads)
    n_docs, n_queries = (16, 4) if args.tiny else (128, 8) if args.quick else (512, 32)
    docs = batches(lm_documents(random_tokens(n_docs, lo=24, hi=33, seed=0)), 32)
    queries = batches(lm_documents(random_tokens(n_queries, lo=24, hi=33, seed=1)), 32)
    print(f"   {n_docs} documents, {n_queries} queries, ekfac")
    for kind in MOE_KINDS[:1] if args.tiny else ("builtin", *MOE_KINDS):
        model = make_model(kind, args.tiny)
        moe = lm_modules(model)
        in_mlp = {t.name for t in moe}
        # Linear layers inside MLP blocks (shared experts) may see flattened tokens: track them as lm_modules
        # does (TrackedTokenLinear), the same in a and b.
        mlp_linear = [t for t in moe if type(t).__name__ == "TrackedTokenLinear"]
        outside = [t for t in resolve_modules(model, None) if t.name not in in_mlp]
        linear = outside + mlp_linear

        def both(model, docs, outside=outside):
            return outside + lm_modules(model)

        cov, lin = mlp_coverage(model, moe), mlp_coverage(model, linear)
        pa = sum(b.n_params for t in linear for b in t.blocks())
        pb = sum(b.n_params for t in outside + moe for b in t.blocks())
        dense = dense_equivalent(kind, model)
        dense_mods = list(resolve_modules(dense, None))
        pd = sum(b.n_params for t in dense_mods for b in t.blocks())
        print(f"   {kind}: MLP parameters tracked {100 * cov.mlp_fraction:.1f}% (target >= 95%; a linear-layer "
              f"tracker: {100 * lin.mlp_fraction:.1f}%); tracked parameters a {pa:,}, b {pb:,}, d {pd:,}")
        cmp = _timing.side_by_side({
            "a": lambda: fit_and_score(model, linear, docs, queries),
            "b": lambda: fit_and_score(model, both, docs, queries),
            "d": lambda: fit_and_score(dense, dense_mods, docs, queries),
        }, "a", max_seconds=900, **_timing.limits(args))
        _timing.report(f"influence {kind}, b / a (experts and routers too / linear layers only)", cmp, "b",
                       target="<= 1.5")
        per_param = _timing.Spread([v * pa / pb for v in cmp.ratio("b").values])
        print(f"      per tracked parameter, b relative to a: {per_param.fmt()}")
        _timing.report(f"influence {kind}, b / d (against a dense model with as many MLP parameters)", cmp, "b",
                       against="d")
    print("   a = every nn.Linear; b = a + experts + routers (lm_modules, idle experts left out by the covariance "
          "pass), found inside the timed call; d = a dense model of the same width and depth whose MLP nn.Linear layers hold the "
          "experts' parameters, every nn.Linear tracked.")
    _timing.footer()


if __name__ == "__main__":
    main()
