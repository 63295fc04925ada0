"""Gradient coherence: the definition on hand cases, the running sums against autograd's per-example gradients,
batch-size invariance, the random-label control, the measurement and its views."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from workbench import SampleSet
from workbench.errors import InputError
from workbench.models.toy import ToyConfig, ToyMoETransformer
from workbench.probes.coherence import GradientCoherence, GradientSums, coherence, from_sums, random_labels
from workbench.probes.coherence.passes import gradient_sums, per_sample_loss, tracked_modules, unit_layers
from workbench.gradients.tracking import units


# --- the definition ----------------------------------------------------------------------------------------------
def test_identical_gradients_give_m_and_orthogonal_ones_give_1():
    g = torch.tensor([1.0, -2.0, 0.5, 3.0])
    alpha, m_coh = coherence(g.expand(7, 4))
    assert alpha == pytest.approx(1.0) and m_coh == pytest.approx(7.0)
    # orthogonal, of different norms: α = 1/m whatever the norms, so m-coherence is 1
    alpha, m_coh = coherence(torch.diag(torch.tensor([1.0, 2.0, 5.0, 0.1])))
    assert alpha == pytest.approx(0.25) and m_coh == pytest.approx(1.0)
    # opposite pairs cancel: the mean gradient is zero
    assert coherence(torch.stack([g, -g]))[1] == pytest.approx(0.0)
    # by hand: g1 = (1, 0), g2 = (1, 1): |sum|^2 = 5, sum |g|^2 = 3
    alpha, m_coh = coherence(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert m_coh == pytest.approx(5 / 3) and alpha == pytest.approx(5 / 6)
    assert all(math.isnan(v) for v in coherence(torch.zeros(3, 2)))
    with pytest.raises(InputError):
        from_sums(1.0, 1.0, 0)


# --- against autograd on a tiny MoE model ----------------------------------------------------------------------
def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ToyConfig(vocab_size=12, n_ctx=6, d_model=16, n_heads=2, n_layers=2, n_experts=4, top_k=2, d_expert=8)
    return ToyMoETransformer(cfg).eval()


def _samples(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 6, (n,), generator=g)
    inputs = [torch.randint(0, 12, (int(k),), generator=g).tolist() for k in lengths]
    # score the last one or two positions, so examples differ in how many rows reach the loss
    targets = [[-100] * (len(x) - 1 - (i % 2)) + torch.randint(0, 12, (1 + i % 2,), generator=g).tolist()
               for i, x in enumerate(inputs)]
    return SampleSet(ids=[str(i) for i in range(n)], groups=["train"] * n, input_ids=inputs, targets=targets)


def _autograd_per_example(model, samples, params):
    """Each example's gradient of its own loss, one backward pass per example."""
    out = []
    for i in range(len(samples)):
        x, y, mask = samples.padded([i])
        loss, _ = per_sample_loss(model(input_ids=x, attention_mask=mask).logits, y)
        out.append(torch.autograd.grad(loss.sum(), params, allow_unused=True))
    return out


def test_running_sums_equal_autograd_per_example_gradients():
    model = _tiny_model()
    samples = _samples()
    tracked = tracked_modules(model, "all")
    kinds = {type(t).__name__ for t in tracked}
    assert {"TrackedExperts", "TrackedRouter", "TrackedLinear"} <= kinds
    sums, loss, _ = gradient_sums(model, samples, tracked, device=torch.device("cpu"), max_batch=4)
    named = dict(model.named_parameters())
    blocks = units(tracked)
    for key, bs in blocks.items():
        param = bs[0].parameters[0]
        per = _autograd_per_example(model, samples, [named[param]])
        g = torch.stack([p[0] if p[0] is not None else torch.zeros_like(named[param]) for p in per]).double()
        want_sum = g.sum(0)
        if bs[0].stack is None:  # one matrix (no bias in the toy)
            assert sums.grad[key].shape == want_sum.shape
            want_sq = g.square().sum()
        else:  # a stack: every expert's matrix, the experts in order
            want_sq = g.square().sum((0, 2, 3)).sum()
        torch.testing.assert_close(sums.grad[key], want_sum, rtol=1e-5, atol=1e-7)
        assert sums.norm_sq[key] == pytest.approx(float(want_sq), rel=1e-5)
    # the loss is each example's mean over its scored positions
    x, y, mask = samples.padded([3])
    want = F.cross_entropy(model(input_ids=x, attention_mask=mask).logits[0], y[0], ignore_index=-100)
    assert float(loss[3]) == pytest.approx(want.item(), rel=1e-5)
    # overall coherence equals the definition on the concatenated per-example gradients of the tracked matrices
    params = sorted({b.parameters[0] for bs in blocks.values() for b in bs})
    per = _autograd_per_example(model, samples, [named[p] for p in params])
    flat = torch.stack([torch.cat([(t if t is not None else torch.zeros_like(named[p])).flatten()
                                   for t, p in zip(grads, params)]) for grads in per])
    a, m = coherence(flat)
    assert sums.coherence() == pytest.approx((a, m), rel=1e-5)


def test_batch_size_does_not_change_coherence():
    model = _tiny_model(1)
    samples = _samples(17, seed=2)
    tracked = tracked_modules(model)
    one, _, _ = gradient_sums(model, samples, tracked, device=torch.device("cpu"), max_batch=1)
    many, _, _ = gradient_sums(model, samples, tracked, device=torch.device("cpu"), max_batch=512)
    assert one.n == many.n == 17
    assert one.coherence() == pytest.approx(many.coherence(), rel=1e-6)
    for key in one.grad:
        assert one.coherence([key]) == pytest.approx(many.coherence([key]), rel=1e-5)
    # merging the sums of two halves is the sums of the whole
    a, _, _ = gradient_sums(model, samples.select(range(9)), tracked, device=torch.device("cpu"))
    b, _, _ = gradient_sums(model, samples.select(range(9, 17)), tracked, device=torch.device("cpu"))
    assert a.merge(b).coherence() == pytest.approx(many.coherence(), rel=1e-6)


def test_unit_layers_and_module_choice():
    model = _tiny_model()
    every, mlp = tracked_modules(model, "all"), tracked_modules(model, "mlp")
    assert len(mlp) < len(every)
    layers = unit_layers(model, every)
    assert layers["lm_head"] is None
    assert {v for k, v in layers.items() if k != "lm_head"} == {0, 1}
    with pytest.raises(InputError, match="modules must be"):
        tracked_modules(model, "attention")


def test_random_labels_are_seeded_uniform_and_keep_the_rest():
    samples = _samples(200, seed=3)
    a, b = random_labels(samples, seed=5), random_labels(samples, seed=5)
    assert a.targets == b.targets and a.input_ids == samples.input_ids and a.ids == samples.ids
    for y_new, y_old in zip(a.targets, samples.targets):
        assert [t == -100 for t in y_new] == [t == -100 for t in y_old]
    classes = {t for ys in samples.targets for t in ys if t != -100}
    drawn = [t for ys in a.targets for t in ys if t != -100]
    assert set(drawn) <= classes
    same = sum(t1 == t0 for y1, y0 in zip(a.targets, samples.targets) for t1, t0 in zip(y1, y0) if t0 != -100)
    assert same < 0.3 * len(drawn)  # about 1/12 agree by chance
    assert set(t for ys in random_labels(samples, classes=[0, 1]).targets for t in ys if t != -100) <= {0, 1}
    with pytest.raises(InputError, match="two classes"):
        random_labels(samples, classes=[4])


def test_coherence_separates_shared_from_random_labels_on_a_linear_model():
    """The paper's contrast on a case worked out by hand: a linear classifier at zero weights, whose per-example
    gradient is (p - onehot(y)) x^T. With the label a function of the input cluster, examples of one cluster
    pull the weights the same way; with random labels they pull apart."""
    torch.manual_seed(0)
    n, d, c = 64, 8, 4
    centers = torch.randn(c, d) * 3
    label = torch.arange(n) % c
    x = centers[label] + 0.1 * torch.randn(n, d)
    p = torch.full((n, c), 1 / c)  # softmax of zero logits
    grads_real = (p - F.one_hot(label, c)).unsqueeze(2) * x.unsqueeze(1)
    rand = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(1))
    grads_rand = (p - F.one_hot(rand, c)).unsqueeze(2) * x.unsqueeze(1)
    real, random = coherence(grads_real)[1], coherence(grads_rand)[1]
    assert real > 5 * random
    sums = GradientSums()
    assert math.isnan(sums.mean_norm_sq())


# --- the measurement ---------------------------------------------------------------------------------------------
def test_measurement_on_a_run(tiny_run):
    from workbench import measure

    steps = tiny_run.steps
    picked = GradientCoherence(max_checkpoints=3).settle(tiny_run).steps
    assert len(picked) == 3 and picked[0] == steps[0] and picked[-1] == steps[-1] and picked[1] in steps[1:-1]
    # the checkpoints it measures are a chosen subset; the others get an empty part (and are not measured again)
    m = GradientCoherence(max_samples=40, steps=steps[-2:])
    store = measure(tiny_run, [m], steps=steps[-3:], progress=False, overwrite=True)
    t = GradientCoherence.table(store)
    assert sorted(t["step"].unique().to_list()) == steps[-2:] and store.has("coherence", steps[-3])
    overall = t.filter(pl.col("layer").is_null() & pl.col("module").is_null())
    sets = set(overall.select("group", "labels").unique().rows())
    assert sets == {("train", "true"), ("test", "true"), ("train", "random"), ("all", "true")}
    wide = overall.pivot(on="metric", index=["step", "group", "labels"], values="value")
    for row in wide.iter_rows(named=True):
        assert row["m_coherence"] == pytest.approx(row["alpha"] * row["n"], rel=1e-9)
        assert 0 <= row["m_coherence"] <= row["n"] + 1e-9
    assert set(wide.filter(pl.col("group") != "all")["n"].to_list()) == {40.0}
    assert wide.filter(pl.col("group") == "all")["n"].to_list() == [80.0, 80.0]
    # per block and per tracked matrix, for the named groups
    blocks = t.filter(pl.col("layer").is_not_null() & pl.col("module").is_null() & (pl.col("metric") == "m_coherence"))
    assert sorted(blocks["layer"].unique().to_list()) == list(range(tiny_run.info["model"]["n_layers"]))
    assert t.filter(pl.col("module") == "lm_head").height > 0
    with pytest.raises(InputError, match="no group"):
        GradientCoherence(groups=("nope",)).sets(tiny_run.samples)


def test_section_and_view(tiny_run):
    from workbench import measure
    from workbench.probes.coherence import figures as F_

    store = measure(tiny_run, [GradientCoherence(max_samples=40)], steps=tiny_run.steps[-2:], progress=False,
                    overwrite=True)
    sec = GradientCoherence.section(store)
    assert sec is not None and sec.title == "Gradient coherence"
    t = GradientCoherence.table(store)
    fig = F_.coherence_curves(t, step=tiny_run.steps[-1])
    names = {tr.name for tr in fig.data}
    assert {"train", "test", "train, random labels", "all"} <= names
    import widgets

    view = widgets.view(store, "coherence")
    view.set_step(tiny_run.steps[-2])
    assert view.step == tiny_run.steps[-2]
