"""Every MoE causal-LM architecture of the installed transformers, end to end, on tiny random models.

The architectures come from transformers' registry (:func:`tests.zoo.moe_model_types`), so an upgrade that
adds one is tested without editing this file. Each one either works (capture equals the model's own routing
per sample over its real tokens, batch-size invariant; the applied weights equal what reaches its experts;
measure stores one row per key; influence covers its MLP and expert parameters and its identity scores equal
autograd's gradient products) or is refused with an UnknownArchitectureError that the README's table states.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch

from tests.tiny_models import random_tokens
from tests.zoo import moe_model_types, tiny_moe
from workbench import CaptureSpec, SampleSet, capture
from workbench.errors import InputError, UnknownArchitectureError
from workbench.models import adapter_for
from workbench.models.routing import fitting_rules
from workbench.runs import Checkpoint

TYPES = moe_model_types()
README = Path(__file__).resolve().parents[1] / "README.md"

# The test's own scoring rules (float64), to check capture's against.
SCORES = {
    "softmax": lambda x: torch.softmax(x, -1),
    "sigmoid": lambda x: torch.sigmoid(x) / torch.sigmoid(x).sum(-1, keepdim=True),
    "sqrtsoftplus": lambda x: torch.nn.functional.softplus(x).sqrt()
    / torch.nn.functional.softplus(x).sqrt().sum(-1, keepdim=True),
    "probabilities": lambda x: x,
}

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # some tiny models keep a dense first block (to test mixed blocks): two MoE layers left
              pytest.mark.filterwarnings("ignore:with two MoE layers consistency_raw:UserWarning")]


def test_the_registry_yields_the_zoo():
    # transformers 5.24 has 61 (the issue tried 26 of them); fewer means discovery broke, not the zoo shrank
    assert len(TYPES) >= 26 and {"olmoe", "mixtral", "deepseek_v3", "gpt_oss", "llama4_text", "dbrx"} <= set(TYPES)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(9, lo=3, hi=13, seed=5)


def _refused(model) -> str | None:
    return adapter_for(model).refuse


def _reference(model, tokens):
    """Per sample, from an unpadded forward: transformers' own recorded router logits of each MoE layer,
    and the top-k weights and expert indices that reach its experts (read where the experts are called)."""
    adapter = adapter_for(model)
    layers = adapter.require_moe(model)
    routing = adapter.routing
    ours = {id(layer.router): slot for slot, layer in enumerate(layers)}
    out = []
    for t in tokens:
        calls, reached, block_in = [], {}, {}
        hooks = [m.register_forward_hook(lambda m, i, o: calls.append(id(m)))
                 for m in {id(m): m for _, m, _ in _recorded(model)}.values()]
        for slot, layer in enumerate(layers):
            hooks.append(layer.moe.register_forward_pre_hook(
                lambda m, a, slot=slot: block_in.__setitem__(slot, a[0])))
            if routing.weights != "sorted":
                hooks.append(layer.experts.register_forward_pre_hook(
                    lambda m, a, kw, slot=slot: reached.__setitem__(slot, (a, kw)), with_kwargs=True))
            else:
                hooks.append(layer.router.register_forward_hook(
                    lambda m, a, o, slot=slot: reached.__setitem__(slot, o)))
        try:
            with torch.no_grad():
                rec = model(input_ids=torch.tensor([t]), output_router_logits=True, use_cache=False).router_logits
        finally:
            for h in hooks:
                h.remove()
        assert len(rec) == len(calls), "each recorded router call gives one entry"
        logits = [lg.reshape(len(t), -1).double() for lg, c in zip(rec, calls) if c in ours]
        assert len(logits) == len(layers)
        sample = []
        for slot, lg in enumerate(logits):
            w, i = _reached(routing.weights, reached[slot], block_in[slot], lg)
            sample.append((lg, w.double(), i.long()))
        out.append(sample)
    return out


def _recorded(model):
    from workbench.models.adapters import recorded_routers

    return recorded_routers(model)


def _reached(layout, call, block_in, logits):
    """(weights [T, k], indices [T, k]) as they reach the experts."""
    tokens, n = logits.shape
    if layout == "sorted":  # JetMoE: gates multiply the experts' sorted outputs; decode them here on our own
        order, token, gates, sizes = call[:4]
        k = order.numel() // tokens
        expert = [e for e, c in enumerate(sizes) for _ in range(c)]
        w = torch.zeros(tokens, n, dtype=torch.float64)
        for j in range(order.numel()):
            w[token[j], expert[j]] = gates[j]
        top_w, top_i = torch.topk(w, k, -1)
        return top_w, top_i
    args, kwargs = call
    if layout == "dense":  # Llama 4: the experts get each token times its weight, for every expert
        routed = args[0].reshape(n, tokens, -1).double()
        h = block_in.reshape(tokens, -1).double()
        scale = (routed * h).sum(-1) / (h * h).sum(-1)  # [E, T]: routed = scale * h
        k = int((scale.abs() > 1e-9).sum(0).max())
        return torch.topk(scale.T, k, -1)
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
    return weights.reshape(tokens, -1), index.reshape(tokens, -1)


def _dense(weights, indices, n):
    return torch.zeros(weights.shape[0], n, dtype=torch.float64).scatter_(-1, indices, weights)


@pytest.mark.parametrize("model_type", TYPES)
def test_capture_is_the_models_own_routing(model_type, tokens):
    model = tiny_moe(model_type)
    samples = SampleSet.from_token_lists(tokens)
    spec = CaptureSpec(routing=True, applied=True, expert_load=True)
    if _refused(model):
        with pytest.raises(UnknownArchitectureError, match="cannot measure"):
            capture(model, samples, spec)
        return
    small = capture(model, samples, spec, token_budget=24)  # several padded batches
    whole = capture(model, samples, spec, token_budget=10_000)  # one batch
    for name in ("routing", "applied", "expert_load"):
        torch.testing.assert_close(getattr(small, name), getattr(whole, name), atol=1e-5, rtol=1e-5)
    topk = capture(model, samples, CaptureSpec(routing=True, routing_weights="topk"), token_budget=24)

    routing = adapter_for(model).routing
    ref = _reference(model, tokens)
    n = small.routing.shape[-1]
    want = {"routing": [], "applied": [], "expert_load": [], "topk": []}
    for sample in ref:
        per_layer = {k: [] for k in want}
        for logits, w, i in sample:
            per_layer["routing"].append(SCORES[small.scoring](logits).mean(0))
            per_layer["applied"].append(_dense(w, i, n).mean(0))
            per_layer["topk"].append(_dense(w / w.sum(-1, keepdim=True), i, n).mean(0))
            per_layer["expert_load"].append(_dense(torch.ones_like(w), i, n).mean(0))
            if routing.proportional and i.shape[-1] > 1:  # the declared rule is the one the model applies
                assert small.scoring in fitting_rules(logits, w, i), (model_type, fitting_rules(logits, w, i))
        for k in want:
            want[k].append(torch.stack(per_layer[k]))
    for name in ("routing", "applied", "expert_load"):
        torch.testing.assert_close(getattr(small, name).double(), torch.stack(want[name]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(topk.routing.double(), torch.stack(want["topk"]), atol=1e-5, rtol=1e-5)
    # both weight modes give distributions, pathways and consistency
    from workbench.probes import pathways as P  # the pure functions

    for weights in (small.routing, topk.routing):
        paths = P.pathways(weights, 0.7)
        assert paths.lengths.min() >= 1
        if len(small.moe_layers) >= 2:
            cons = P.consistency(weights, small.router_matrices)
            assert torch.isfinite(cons["consistency_raw"]).all()


@dataclass
class InMemory(Checkpoint):
    """A checkpoint that hands back a model already in memory (the loading paths are tested elsewhere)."""

    model: torch.nn.Module | None = None

    def load(self, device=None, dtype=None):
        return self.model


KEYS = ("run", "step", "probe", "metric", "group", "sample_id", "layer", "expert", "of", "method", "window",
        "test_group", "since")


@pytest.mark.parametrize("model_type", TYPES)
def test_measure_stores_one_row_per_key(model_type, tokens, tmp_path):
    from workbench import LossAccuracy, RoutingStats, Run, measure
    from workbench.probes.pathways import RoutingPathways

    model = tiny_moe(model_type)
    if _refused(model):
        return  # refused by capture above
    samples = SampleSet.from_token_lists(tokens, groups=["a", "b", "test"] * 3)
    run = Run(model_type, [InMemory(s, "memory", "memory", model=model) for s in (0, 10)], root=tmp_path,
              samples=samples)
    measurements = [LossAccuracy(), RoutingStats(), RoutingPathways(max_pairs=50)]
    store = measure(run, measurements, progress=False)
    for m in measurements:
        table = store.table(m.name)
        assert table.height > 0
        keys = [k for k in KEYS if k in table.columns]
        dup = table.group_by(keys).len().filter(pl.col("len") > 1)
        assert dup.is_empty(), (m.name, dup.head())
    layers = store.table("routing")["layer"].drop_nulls().unique().to_list()
    assert sorted(layers) == [layer.index for layer in adapter_for(model).moe_layers(model)]


@pytest.mark.parametrize("model_type", TYPES)
def test_influence_tracks_every_expert_layout(model_type):
    from workbench.probes.influence import fit_factors, pairwise_scores
    from workbench.probes.influence.lm import LMTask, batches, lm_documents
    from workbench.gradients.moe import lm_modules, mlp_coverage

    model = copy.deepcopy(tiny_moe(model_type)).double()
    if _refused(model):
        with pytest.raises(UnknownArchitectureError, match="cannot measure"):
            lm_modules(model)
        return
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # the grouped-mm default takes no float64 (for autograd's)
    tol = 1e-6  # float64 throughout, except routers that compute their logits in float32 whatever the dtype
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]))
    except RuntimeError:  # a router that runs float32 inputs against its float64 weight (Inkling 2)
        model, tol = model.float(), 1e-4
    try:
        mods = lm_modules(model)
    except UnknownArchitectureError as exc:  # refused: the README must say so, and the message how to register
        assert "register" in str(exc)
        assert "influence refused" in _readme_rows()[model_type], model_type
        return
    cov = mlp_coverage(model, mods)
    assert cov.mlp_fraction >= 0.99, str(cov)
    task = LMTask()
    docs = lm_documents(random_tokens(4, lo=3, hi=8, seed=1))
    f = fit_factors(model, None, loss_fn=task.loss, strategy="identity", modules=mods, report=False,
                    progress=False)
    scores = pairwise_scores(model, f, batches(docs, 2), batches(docs, 4), loss_fn=task.loss, modules=mods,
                             mask_fn=task.mask, progress=False)
    names = sorted({n for t in mods for b in t.blocks() for n in b.parameters})
    params = dict(model.named_parameters())
    rows = []
    for b in batches(docs, 1):
        grads = torch.autograd.grad(task.loss(model, b), [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(params[n])).flatten()
                               for n, g in zip(names, grads)]))
    g = torch.stack(rows)
    want = g @ g.T
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(scores, want, rtol=tol, atol=tol * float(want.abs().max()))


def _readme_rows() -> dict[str, str]:
    text = README.read_text()
    section = text[text.index("## Supported MoE architectures"):]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|.*$", section, re.M)}


def test_the_readme_states_every_architecture():
    """The README's table names every architecture of the zoo, and says why for each one refused."""
    rows = _readme_rows()
    missing = [t for t in TYPES if t not in rows]
    assert not missing, f"README table lacks {missing}"
    for t in TYPES:
        refuse = adapter_for(tiny_moe(t)).refuse
        assert ("refused" in rows[t]) == bool(refuse), t


@pytest.mark.parametrize("model_type, inferred", [("olmoe", "softmax"), ("deepseek_v3", "sigmoid"),
                                                  ("gpt_oss", "softmax"), ("dbrx", None), ("llama4_text", None)])
def test_an_unregistered_architecture_is_derived_or_refused(model_type, inferred, tokens, monkeypatch):
    """Without its registration an architecture is derived from transformers and its scoring inferred from the
    weights its routers apply (same numbers as registered), or refused, naming what to declare."""
    from workbench.models.adapters import REGISTERED

    registered = capture(tiny_moe(model_type), SampleSet.from_token_lists(tokens), CaptureSpec(routing=True))
    monkeypatch.delitem(REGISTERED, model_type)
    model = copy.deepcopy(tiny_moe(model_type))  # a new object: nothing cached for it
    if inferred is None:  # DBRX's router returns logits only, Llama 4's dense scores and logits
        with pytest.raises(UnknownArchitectureError, match="register_adapter"):
            capture(model, SampleSet.from_token_lists(tokens), CaptureSpec(routing=True))
        return
    cap = capture(model, SampleSet.from_token_lists(tokens), CaptureSpec(routing=True))
    assert cap.scoring == inferred
    torch.testing.assert_close(cap.routing, registered.routing)


def test_softmax_is_refused_for_a_router_that_does_not_apply_one(tokens):
    model = tiny_moe("deepseek_v3")
    with pytest.raises(InputError, match="scores experts with sigmoid"):
        capture(model, SampleSet.from_token_lists(tokens), CaptureSpec(routing=True, routing_weights="softmax"))
    assert capture(tiny_moe("olmoe"), SampleSet.from_token_lists(tokens),
                   CaptureSpec(routing=True, routing_weights="softmax")).scoring == "softmax"
