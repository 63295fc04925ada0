"""MoE experts and routers as tracked modules: exact per-expert gradients, unchanged outputs, coverage."""

from __future__ import annotations

import warnings

import pytest
import torch

from workbench.errors import InputError, UnknownArchitectureError
from workbench.models import adapter_for
from workbench.probes.influence import fit_factors, pairwise_scores, resolve_modules
from workbench.probes.influence.lm import LMTask, batches, lm_documents
from workbench.gradients.moe import (
    IdleExpertsWarning,
    TrackedExperts,
    TrackedRouter,
    lm_modules,
    mlp_coverage,
    routed_token_counts,
)
from workbench.gradients.tracking import Recorder
from workbench.models.toy import ToyConfig, ToyMoETransformer
from tests.tiny_models import DENSE_KINDS, MOE_KINDS, random_tokens, tiny_model

TASK = LMTask()
QUIET = dict(progress=False)


# Tiny models: a second intra-op thread only adds synchronization (and is slow on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(kind: str, layers: int = 2):
    if kind == "builtin":
        torch.manual_seed(0)
        return ToyMoETransformer(ToyConfig(vocab_size=96, n_ctx=16, d_model=16, n_heads=2, n_layers=layers,
                                           n_experts=4, top_k=2, d_expert=24, layer_norm=True)).eval()
    model = tiny_model(kind, n_layers=layers)
    if kind in MOE_KINDS:
        model.set_experts_implementation("eager")  # the grouped-mm default takes no float64 (for the reference)
    return model


def _docs(n=5, seed=0):
    return lm_documents(random_tokens(n, lo=3, hi=9, seed=seed))


def _per_example_grads(model, docs, params):
    """Autograd gradients of each document alone (no padding), flattened over ``params``."""
    rows = []
    for b in batches(docs, 1):
        grads = torch.autograd.grad(TASK.loss(model, b), params)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["builtin", *MOE_KINDS])
def test_identity_scores_equal_autograd_gradient_products_over_experts_and_routers(kind):
    """Per-expert blocks from routed tokens, the router as a linear map and the MLP linears: their summed
    gradient products equal autograd's over the fused 3-D parameters, padded batches included."""
    model = _model(kind).double()
    mods = lm_modules(model)
    assert any(isinstance(t, TrackedExperts) for t in mods) and any(isinstance(t, TrackedRouter) for t in mods)
    docs = _docs()
    f = fit_factors(model, None, loss_fn=TASK.loss, strategy="identity", modules=mods, report=False, **QUIET)
    scores = pairwise_scores(model, f, batches(docs, 2), batches(docs, 3), loss_fn=TASK.loss, modules=mods,
                             mask_fn=TASK.mask, **QUIET)
    names = sorted({n for t in mods for b in t.blocks() for n in b.parameters})
    params = dict(model.named_parameters())
    g = _per_example_grads(model, docs, [params[n] for n in names])
    want = g @ g.T
    assert torch.allclose(scores, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    assert float(want.abs().max()) > 0


@pytest.mark.parametrize("kind", ["builtin", *MOE_KINDS])
def test_tracking_leaves_the_outputs_unchanged_and_restores_the_forward(kind):
    model = _model(kind).double()
    mods = lm_modules(model)
    b = batches(_docs(4, seed=1), 4)[0]
    with torch.no_grad():
        before = TASK.logits(model, b)
    with Recorder(mods) as rec, torch.enable_grad():
        rec.start()
        during = TASK.logits(model, b)
        rec.rows(TASK._nll(during, b["targets"]), b["attention_mask"])
    experts = [t.module for t in mods if isinstance(t, TrackedExperts)]
    assert all("forward" not in m.__dict__ for m in experts)
    mask = b["attention_mask"].bool()
    assert torch.allclose(during[mask], before[mask], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["builtin", *MOE_KINDS])
def test_per_expert_factors_see_only_routed_unpadded_tokens(kind):
    model = _model(kind)
    docs = _docs(6, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdleExpertsWarning)  # few tokens: an expert may get none
        mods = lm_modules(model, documents=batches(docs, 3))
    f = fit_factors(model, batches(docs, 3), loss_fn=TASK.loss, strategy="kfac", modules=mods, mask_fn=TASK.mask,
                    report=False, **QUIET)
    n_tokens = sum(docs.lengths)
    experts = next(t for t in mods if isinstance(t, TrackedExperts))
    router = next(t for t in mods if isinstance(t, TrackedRouter))
    counts = routed_token_counts(model, batches(docs, 3), reaching_loss=False)[0]
    top_k = getattr(model.config, "top_k", None) or getattr(model.config, "num_experts_per_tok")
    # Each real token goes to top_k experts; the router sees every real token once; padding is left out.
    assert int(counts.sum()) == top_k * n_tokens
    per_expert = [f.n_tokens.get(experts.key(experts.layout.inputs[0].param, e), 0) for e in range(experts.n_experts)]
    assert per_expert == counts.tolist()
    assert f.n_tokens[router.name] == n_tokens
    # The loss reaches every token but each document's last (it predicts nothing): only those decide which
    # experts are tracked.
    reaching = routed_token_counts(model, batches(docs, 3))[0]
    assert int(reaching.sum()) == top_k * (n_tokens - len(docs))
    assert bool((reaching <= counts).all())
    assert experts.experts == reaching.nonzero().flatten().tolist()


def test_idle_experts_are_left_out_with_a_warning():
    model = _model("builtin", layers=1)
    # A two-token document goes to at most 4 (expert, token) slots of 4 experts: find one that leaves one idle.
    for t in range(3, 60):
        docs = lm_documents([[t, t]])
        counts = routed_token_counts(model, batches(docs))[0]
        if bool((counts == 0).any()):
            break
    assert bool((counts == 0).any())
    with pytest.warns(IdleExpertsWarning, match=r"layers\.0\.mlp\.experts\[\d\]"):
        mods = lm_modules(model, documents=batches(docs))
    experts = next(t for t in mods if isinstance(t, TrackedExperts))
    assert experts.experts == counts.nonzero().flatten().tolist()
    fit_factors(model, batches(docs), loss_fn=TASK.loss, modules=mods, mask_fn=TASK.mask, report=False, **QUIET)
    with pytest.raises(Exception, match="saw only zero"):  # what tracking an idle expert would do
        fit_factors(model, batches(docs), loss_fn=TASK.loss, modules=lm_modules(model), mask_fn=TASK.mask,
                    idle_experts="raise", report=False, **QUIET)
    cov = mlp_coverage(model, mods)
    assert 0 < cov.mlp_fraction < 1 and cov.untracked[0][0] in ("layers.0.mlp.experts.up_proj",
                                                              "layers.0.mlp.experts.down_proj")


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_mlp_coverage_of_hf_moe_models(kind):
    model = _model(kind, layers=3)
    cov = mlp_coverage(model, lm_modules(model))
    assert cov.mlp_fraction == 1.0, str(cov)  # the README's 100%
    assert cov.untracked == []
    # What a linear-layer tracker would see (the README's 0%, 0%, 11%): the experts and routers are missed; in
    # Qwen2-MoE only the shared expert and its gate are nn.Linear, 1/9 of the MLP parameters in this config.
    linear_only = mlp_coverage(model, resolve_modules(model, None))
    expected = {"olmoe": 0.0, "mixtral": 0.0, "qwen2_moe": 1 / 9}[kind]
    assert linear_only.mlp_fraction == pytest.approx(expected, abs=1e-12), str(linear_only)


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_dense_models_track_their_mlp_linear_layers(kind):
    model = _model(kind)
    mods = lm_modules(model)
    assert [t.name for t in mods] == adapter_for(model).mlp_linear_modules(model)
    assert mlp_coverage(model, mods).mlp_fraction > 0.95


def test_lm_modules_options_and_errors():
    model = _model("olmoe", layers=3)
    only = lm_modules(model, experts=False, layers=[1])
    assert [type(t).__name__ for t in only] == ["TrackedRouter"] and only[0].name == "model.layers.1.mlp.gate"
    with pytest.raises(InputError, match="found no MLP layer to track"):
        lm_modules(model, experts=False, routers=False, mlp_linear=False)
    with pytest.raises(UnknownArchitectureError, match="not an experts module"):
        TrackedExperts("x", torch.nn.Linear(2, 2), torch.nn.Identity())


def test_experts_the_loss_never_reaches_are_left_out_for_answer_only_documents():
    # Documents scored only at their last position (an answer after "a b ="): in the last block, the tokens at
    # the other positions never reach the loss, so they count for no expert; fitting then succeeds, and an
    # expert routed such tokens only is left out (its gradient is zero on every document).
    from workbench.samples import IGNORE, SampleSet

    model = _model("builtin", layers=2)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 90, (12, 3), generator=g).tolist()
    docs = SampleSet(ids=[str(i) for i in range(12)], groups=["train"] * 12, input_ids=inputs,
                     targets=[[IGNORE, IGNORE, (x[0] + x[1]) % 90] for x in inputs])
    every = routed_token_counts(model, batches(docs, 4), reaching_loss=False)
    reaching = routed_token_counts(model, batches(docs, 4))
    assert int(every[1].sum()) == 2 * 3 * 12  # top-2 of every token
    assert int(reaching[1].sum()) == 2 * 12  # last block: the answer positions only
    assert int(reaching[0].sum()) == 2 * 3 * 12  # first block: every position reaches the answer by attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdleExpertsWarning)
        mods = lm_modules(model, documents=batches(docs, 4))
    experts = [t for t in mods if isinstance(t, TrackedExperts)]
    assert experts[1].experts == reaching[1].nonzero().flatten().tolist()
    fit_factors(model, batches(docs, 4), loss_fn=TASK.loss, modules=mods, mask_fn=TASK.mask, report=False,
                **QUIET)  # raises "saw only zero gradients" if an expert without reaching tokens were tracked


def _answer_only_documents(n=12):
    """Documents scored at their last position only: in the last block, the experts routed only the other
    positions' tokens get no gradient."""
    from workbench.samples import IGNORE, SampleSet

    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 90, (n, 3), generator=g).tolist()
    return SampleSet(ids=[str(i) for i in range(n)], groups=["train"] * n, input_ids=inputs,
                     targets=[[IGNORE, IGNORE, (x[0] + x[1]) % 90] for x in inputs])


@pytest.mark.parametrize("cache_bytes", [2**31, 0])
def test_the_covariance_pass_leaves_out_the_experts_a_documents_pass_would(cache_bytes, tmp_path):
    """Idle experts found inside the covariance pass (fit_factors' default) give the same factors and scores
    as leaving them out beforehand with lm_modules(documents=...), which costs a pass over the documents;
    from cached rows (the eigenvalue pass reuses the covariance pass's) and from a second read alike."""
    model = _model("builtin", layers=2)
    docs, queries = batches(_answer_only_documents(3), 2), batches(_docs(3, seed=5), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdleExpertsWarning)
        before = lm_modules(model, documents=docs)
    options = dict(loss_fn=TASK.loss, mask_fn=TASK.mask, **QUIET)
    f_before = fit_factors(model, docs, modules=before, report=False, cache_bytes=cache_bytes, **options)
    s_before = pairwise_scores(model, f_before, queries, docs, modules=before, **options)
    left_out = [f"{t.name}[{e}]" for t in before if isinstance(t, TrackedExperts) for e in range(t.n_experts)
                if e not in t.experts]
    assert left_out  # the case has idle experts
    every = lm_modules(model)
    with pytest.warns(IdleExpertsWarning) as caught:
        f_inside = fit_factors(model, docs, modules=every, report=False, cache_bytes=cache_bytes, **options)
    assert all(name in str(caught[0].message) for name in left_out)
    assert sorted(f_inside.shapes) == sorted(f_before.shapes) and f_inside.idle
    for key, parts in f_before.tensors.items():
        for part, x in parts.items():
            assert torch.allclose(f_inside.tensors[key][part], x, rtol=1e-5, atol=1e-6 * float(x.abs().max())), (key, part)
    assert f_inside.n_tokens == f_before.n_tokens
    s_inside = pairwise_scores(model, f_inside, queries, docs, modules=every, **options)
    assert torch.allclose(s_inside, s_before, rtol=1e-4, atol=1e-5 * float(s_before.abs().max()))
    # saved and loaded, the factors still say which experts they left out
    f_loaded = type(f_inside).load(f_inside.save(tmp_path))
    assert f_loaded.idle == f_inside.idle
    assert torch.equal(pairwise_scores(model, f_loaded, queries, docs, modules=every, **options), s_inside)
