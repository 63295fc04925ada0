"""The influence estimator: exact where it can be, equivalences, numerical health, bad input."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from workbench.errors import InputError, NumericalError
from workbench.probes.influence import (
    STRATEGIES,
    Block,
    CrossEntropyTask,
    Factors,
    TrackedModule,
    cross_query_correlation,
    fit_factors,
    pairwise_scores,
    per_nat,
    powerlaw_slope,
    register_tracker,
    sample_labels,
    self_scores,
    top_documents,
    top_share,
)
from workbench.gradients import tracking

TASK = CrossEntropyTask()
QUIET = dict(progress=False, report=False)


# Tiny models: a second intra-op thread only adds synchronization (and is slow on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")


# --- small models and data -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _trained_mlp(seed, dtype, train):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x = torch.randn(256, 4, dtype=dtype)
    y = (x @ torch.randn(4, 3, dtype=dtype) + 0.5 * torch.randn(256, 3, dtype=dtype)).argmax(1)
    if train:
        opt = torch.optim.Adam(model.parameters(), 5e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model, x, y


def mlp(seed=0, dtype=torch.float64, train=True):
    """A 3-layer tanh classifier, trained a little so that it is not at its random initialization."""
    model, x, y = _trained_mlp(seed, dtype, train)
    return copy.deepcopy(model), x, y


def split(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


class TokenNet(nn.Module):
    """Per-token classifier over embedded tokens: Linear layers see [batch, tokens, features]."""

    def __init__(self, vocab=20, d=6, h=8, classes=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, classes)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.embed(ids))))


def token_data(n, length=7, seed=0, vocab=20, classes=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    labels = torch.where(mask == 1, torch.randint(0, classes, (n, length), generator=g), -100)
    return {"ids": ids * mask, "mask": mask, "labels": labels}


TOKEN_TASK = CrossEntropyTask(forward=lambda m, b: m(b["ids"]), targets=lambda b: b["labels"])


def token_batches(data, size):
    n = len(data["ids"])
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]


def per_example_grads(model, loss_one, examples, names):
    """Per-example gradients of the named parameters with torch.func, flattened: [N, P]."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, *ex):
        return loss_one(lambda *a: functional_call(model, p, a), *ex)

    g = vmap(grad(one), in_dims=(None,) + (0,) * len(examples))(params, *examples)
    return torch.cat([g[k].reshape(g[k].shape[0], -1) for k in names], 1)


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


# --- exactness -----------------------------------------------------------------------------------------
def test_identity_equals_autograd_dot_products_classifier():
    model, x, y = mlp()
    names = [n for n, _ in model.named_parameters()]
    ce = lambda f, xi, yi: nn.functional.cross_entropy(f(xi[None]), yi[None], reduction="sum")  # noqa: E731
    gd = per_example_grads(model, ce, (x[:40], y[:40]), names)
    gq = per_example_grads(model, ce, (x[200:206], y[200:206]), names)
    factors = fit_factors(model, None, loss_fn=TASK.loss, strategy="identity", **QUIET)
    scores = pairwise_scores(model, factors, [(x[200:206], y[200:206])], split(x[:40], y[:40], 16),
                             loss_fn=TASK.loss, progress=False)
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, gq @ gd.T, rtol=1e-10, atol=1e-12)


def test_identity_equals_autograd_dot_products_tokens():
    """Linear layers over [batch, tokens, features], a bias, padding (-100) and the embedding untracked."""
    torch.manual_seed(1)
    model = TokenNet().double()
    docs, queries = token_data(12, seed=0), token_data(3, seed=1)

    def ce(f, ids, labels):
        logits = f(ids[None])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="sum")

    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    gd = per_example_grads(model, ce, (docs["ids"], docs["labels"]), names)
    gq = per_example_grads(model, ce, (queries["ids"], queries["labels"]), names)
    factors = fit_factors(model, None, loss_fn=TOKEN_TASK.loss, strategy="identity", **QUIET)
    scores = pairwise_scores(model, factors, token_batches(queries, 2), token_batches(docs, 5),
                             loss_fn=TOKEN_TASK.loss, progress=False)
    torch.testing.assert_close(scores, gq @ gd.T, rtol=1e-10, atol=1e-12)


def test_strategies_against_the_exact_damped_inverse_fisher():
    """ekfac is closest to (F + λI)⁻¹ with F the exact empirical Fisher, then kfac, diagonal, identity."""
    model, x, y = mlp()
    names = [n for n, _ in model.named_parameters()]
    ce = lambda f, xi, yi: nn.functional.cross_entropy(f(xi[None]), yi[None], reduction="sum")  # noqa: E731
    xq, yq = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    gd = per_example_grads(model, ce, (x, y), names)
    gq = per_example_grads(model, ce, (xq, yq), names)
    fisher = gd.T @ gd / len(x)
    lam = float(0.1 * torch.trace(fisher) / fisher.shape[0])
    eye = torch.eye(fisher.shape[0], dtype=fisher.dtype)
    exact = gq @ torch.linalg.solve(fisher + lam * eye, gd.T)
    # The same with the Fisher's cross-layer blocks zeroed (what every strategy here approximates).
    layer = torch.cat([torch.full((p.numel(),), i // 2) for i, p in enumerate(model.parameters())])
    block = gq @ torch.linalg.solve(fisher * (layer[:, None] == layer[None, :]) + lam * eye, gd.T)
    docs = split(x, y, 32)
    corr, corr_block = {}, {}
    for strategy in STRATEGIES:
        factors = fit_factors(model, docs, loss_fn=TASK.loss, strategy=strategy, fisher="empirical", **QUIET)
        scores = pairwise_scores(model, factors, [(xq, yq)], docs, loss_fn=TASK.loss, damping=lam, progress=False)
        corr[strategy], corr_block[strategy] = pearson(scores, exact), pearson(scores, block)
    print("pearson with the exact damped inverse Fisher:", {k: round(v, 3) for k, v in corr.items()},
          "block-diagonal:", {k: round(v, 3) for k, v in corr_block.items()})
    assert corr["ekfac"] > corr["kfac"] > corr["diagonal"] > corr["identity"]
    assert corr_block["ekfac"] > corr_block["kfac"] > corr_block["diagonal"] > corr_block["identity"]
    assert corr["ekfac"] > 0.5 and corr_block["ekfac"] > 0.7


# --- equivalences --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted():
    model, x, y = mlp(dtype=torch.float64)
    docs = split(x[:96], y[:96], 16)
    factors = fit_factors(model, docs, loss_fn=TASK.loss, fisher="empirical", **QUIET)
    return model, x, y, factors


def test_factors_do_not_depend_on_batch_size(fitted):
    model, x, y, factors = fitted
    other = fit_factors(model, split(x[:96], y[:96], 7), loss_fn=TASK.loss, fisher="empirical", **QUIET)
    for key in factors.blocks:
        for part in ("lambda", "activation_eigenvalues", "gradient_eigenvalues"):
            torch.testing.assert_close(other.tensors[key][part], factors.tensors[key][part], rtol=1e-9, atol=1e-12)


def test_scores_do_not_depend_on_batch_size_or_order(fitted):
    model, x, y, factors = fitted
    xd, yd = x[:96], y[:96]
    queries = [(x[200:210], y[200:210])]
    base = pairwise_scores(model, factors, queries, split(xd, yd, 16), loss_fn=TASK.loss, progress=False)
    other = pairwise_scores(model, factors, split(x[200:210], y[200:210], 3), split(xd, yd, 5),
                            loss_fn=TASK.loss, progress=False)
    torch.testing.assert_close(other, base, rtol=1e-10, atol=1e-12)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    shuffled = pairwise_scores(model, factors, queries, split(xd[perm], yd[perm], 11), loss_fn=TASK.loss,
                               progress=False)
    torch.testing.assert_close(shuffled, base[:, perm], rtol=1e-10, atol=1e-12)


def test_self_scores_equal_the_diagonal_of_pairwise(fitted):
    model, x, y, factors = fitted
    docs = split(x[:30], y[:30], 8)
    pair = pairwise_scores(model, factors, docs, docs, loss_fn=TASK.loss, progress=False)
    own = self_scores(model, factors, split(x[:30], y[:30], 4), loss_fn=TASK.loss, progress=False)
    torch.testing.assert_close(own, torch.diagonal(pair), rtol=1e-10, atol=1e-12)
    assert bool((own > 0).all())  # a damped inverse Fisher is positive definite


def test_query_rank(fitted):
    model, x, y, factors = fitted
    queries, docs = [(x[200:204], y[200:204])], split(x[:40], y[:40], 10)
    ident = fit_factors(model, None, loss_fn=TASK.loss, strategy="identity", **QUIET)
    # A per-example gradient of a layer with 2-D inputs is s aᵀ, rank one: rank 1 is exact for identity.
    full = pairwise_scores(model, ident, queries, docs, loss_fn=TASK.loss, progress=False)
    one = pairwise_scores(model, ident, queries, docs, loss_fn=TASK.loss, query_rank=1, progress=False)
    torch.testing.assert_close(one, full, rtol=1e-9, atol=1e-10)
    # Preconditioned by ekfac it is not rank one; a rank as large as the smallest side is exact again.
    full = pairwise_scores(model, factors, queries, docs, loss_fn=TASK.loss, progress=False)
    low = pairwise_scores(model, factors, queries, docs, loss_fn=TASK.loss, query_rank=1, progress=False)
    top = pairwise_scores(model, factors, queries, docs, loss_fn=TASK.loss, query_rank=3, progress=False)
    assert not torch.allclose(low, full, rtol=1e-3)
    assert (top - full).norm() < (low - full).norm()
    torch.testing.assert_close(
        pairwise_scores(model, factors, queries, docs, loss_fn=TASK.loss, query_rank=8, progress=False), full)
    with pytest.raises(InputError, match="query_rank"):
        pairwise_scores(model, factors, queries, docs, loss_fn=TASK.loss, query_rank=0, progress=False)


@pytest.mark.parametrize("strategy,rank", [("ekfac", None), ("kfac", 2), ("identity", None)])
def test_per_token_contributions_sum_to_the_score(strategy, rank):
    torch.manual_seed(2)
    model = TokenNet().double()
    docs, queries = token_data(10, seed=3), token_data(3, seed=4)
    mask_fn = lambda b: b["mask"]  # noqa: E731
    factors = fit_factors(model, token_batches(docs, 4), loss_fn=TOKEN_TASK.loss, strategy=strategy,
                          fisher="empirical", mask_fn=mask_fn, **QUIET)
    kw = dict(loss_fn=TOKEN_TASK.loss, query_rank=rank, mask_fn=mask_fn, progress=False)
    scores = pairwise_scores(model, factors, token_batches(queries, 3), token_batches(docs, 3), **kw)
    again, tokens = pairwise_scores(model, factors, token_batches(queries, 2), token_batches(docs, 4), per_token=True,
                                    **kw)
    assert tokens.shape == (3, 10, 7)
    torch.testing.assert_close(again, scores)
    torch.testing.assert_close(tokens.sum(-1), scores, rtol=1e-9, atol=1e-12)
    assert bool((tokens[:, docs["mask"] == 0] == 0).all())  # padding carries no influence
    assert bool((tokens[:, docs["mask"] == 1] != 0).any())


def test_mask_leaves_padding_out_of_the_factors():
    """Padding tokens, however they are filled, change neither factors nor scores when masked."""
    torch.manual_seed(2)
    model = TokenNet().double()
    docs = token_data(12, seed=5)
    noisy = dict(docs, ids=torch.where(docs["mask"] == 1, docs["ids"], torch.randint(0, 20, docs["ids"].shape)))
    kw = dict(loss_fn=TOKEN_TASK.loss, fisher="empirical", mask_fn=lambda b: b["mask"], **QUIET)
    a = fit_factors(model, token_batches(docs, 4), **kw)
    b = fit_factors(model, token_batches(noisy, 4), **kw)
    assert a.n_tokens["fc1"] == int(docs["mask"].sum())
    for key in a.blocks:
        torch.testing.assert_close(a.tensors[key]["lambda"], b.tensors[key]["lambda"])
        torch.testing.assert_close(a.tensors[key]["activation_eigenvalues"], b.tensors[key]["activation_eigenvalues"])


def test_mask_applies_to_token_rows_only():
    """A pooled head sees one row per example; the token mask must not drop any of them."""

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc, self.head = nn.Embedding(20, 6), nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, ids, mask):
            h = torch.tanh(self.fc(self.embed(ids))) * mask[..., None]
            return self.head(h.sum(1) / mask.sum(1, keepdim=True))

    torch.manual_seed(0)
    data = token_data(10, seed=8)
    data["mask"][:, 0] = 0  # even where the first token is padding, the example's head row counts
    data["mask"][:, 1] = 1
    data["y"] = torch.randint(0, 3, (10,))
    task = CrossEntropyTask(forward=lambda m, b: m(b["ids"], b["mask"]), targets=lambda b: b["y"])
    factors = fit_factors(Pooled(), token_batches(data, 5), loss_fn=task.loss, strategy="kfac", fisher="empirical",
                          mask_fn=lambda b: b["mask"], **QUIET)
    assert factors.n_tokens == {"fc": int(data["mask"].sum()), "head": 10}


def test_save_and_load(fitted, tmp_path):
    model, x, y, factors = fitted
    factors.save(tmp_path / "influence")
    loaded = Factors.load(tmp_path / "influence")
    assert loaded.strategy == "ekfac" and loaded.fisher == "empirical" and loaded.modules == ["0", "2", "4"]
    assert loaded.report.tracked == factors.report.tracked
    queries, docs = [(x[200:203], y[200:203])], split(x[:20], y[:20], 10)
    torch.testing.assert_close(pairwise_scores(model, loaded, queries, docs, loss_fn=TASK.loss, progress=False),
                               pairwise_scores(model, factors, queries, docs, loss_fn=TASK.loss, progress=False))
    with pytest.raises(InputError, match="no saved factors"):
        Factors.load(tmp_path / "nothing")


def test_default_damping_is_a_tenth_of_the_mean_curvature(fitted):
    model, x, y, factors = fitted
    from workbench.probes.influence import Preconditioner

    pre = Preconditioner(factors, None, dtype=torch.float64)
    for key in factors.blocks:
        assert pre.damping[key] == pytest.approx(0.1 * float(factors.tensors[key]["lambda"].mean()))
    kfac = fit_factors(model, split(x[:96], y[:96], 16), loss_fn=TASK.loss, strategy="kfac", fisher="empirical",
                       **QUIET)
    t = kfac.tensors["2"]
    expected = 0.1 * float(t["gradient_eigenvalues"].mean() * t["activation_eigenvalues"].mean())
    assert Preconditioner(kfac, None).damping["2"] == pytest.approx(expected)
    assert Preconditioner(kfac, 0.5).damping["2"] == 0.5


# --- the true Fisher -----------------------------------------------------------------------------------
def test_sample_labels_draw_from_the_model_and_keep_ignored_positions():
    logits = torch.tensor([[[50.0, 0, 0], [0, 0, 50.0]], [[0, 50.0, 0], [0, 0, 0]]])
    targets = torch.tensor([[1, 1], [-100, 2]])
    drawn = sample_labels(logits, targets)
    assert drawn[0].tolist() == [0, 2] and drawn[1, 0] == -100
    torch.manual_seed(0)
    many = sample_labels(torch.zeros(20000, 4), torch.zeros(20000, dtype=torch.long))
    assert torch.bincount(many, minlength=4).div(20000).sub(0.25).abs().max() < 0.02


def test_true_fisher_samples_labels_reproducibly():
    model, x, y = mlp()
    docs = split(x[:64], y[:64], 16)
    a = fit_factors(model, docs, loss_fn=TASK.loss, strategy="diagonal", seed=1, **QUIET)
    b = fit_factors(model, docs, loss_fn=TASK.loss, strategy="diagonal", seed=1, **QUIET)
    c = fit_factors(model, docs, loss_fn=TASK.loss, strategy="diagonal", seed=2, **QUIET)
    emp = fit_factors(model, docs, loss_fn=TASK.loss, strategy="diagonal", fisher="empirical", **QUIET)
    torch.testing.assert_close(a.tensors["0"]["lambda"], b.tensors["0"]["lambda"], rtol=0, atol=0)
    assert not torch.allclose(a.tensors["0"]["lambda"], c.tensors["0"]["lambda"])
    assert not torch.allclose(a.tensors["0"]["lambda"], emp.tensors["0"]["lambda"])
    state = torch.get_rng_state()
    fit_factors(model, docs, loss_fn=TASK.loss, strategy="diagonal", **QUIET)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched


def test_cached_rows_give_the_factors_of_a_second_pass():
    """ekfac's eigenvalue pass from the covariance pass's cached rows equals reading the documents again,
    sampled labels included; a budget too small for the rows falls back to the second pass."""
    model, x, y = mlp()
    docs = split(x[:64], y[:64], 16)
    calls = []

    def counted(model, batch, sample=False):
        calls.append(1)
        return TASK.loss(model, batch, sample=sample)

    cached = fit_factors(model, docs, loss_fn=counted, **QUIET)
    assert len(calls) == 4
    again = fit_factors(model, docs, loss_fn=counted, cache_bytes=0, **QUIET)
    small = fit_factors(model, docs, loss_fn=counted, cache_bytes=10_000, **QUIET)
    assert len(calls) == 4 + 8 + 8
    for other in (again, small):
        for key in cached.blocks:
            torch.testing.assert_close(other.tensors[key]["lambda"], cached.tensors[key]["lambda"], rtol=0, atol=0)


def test_true_fisher_needs_a_sampling_loss():
    model, x, y = mlp(train=False)

    def plain(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    with pytest.raises(InputError, match="sample"):
        fit_factors(model, split(x, y, 64), loss_fn=plain, **QUIET)
    fit_factors(model, split(x, y, 64), loss_fn=plain, fisher="empirical", **QUIET)


# --- what is tracked -----------------------------------------------------------------------------------
def test_tracking_report_is_printed_with_the_tracked_fraction(capsys):
    torch.manual_seed(0)
    model = TokenNet()  # embedding 20x6 = 120, fc1 6x8+8 = 56, fc2 8x5+5 = 45
    factors = fit_factors(model, None, loss_fn=TOKEN_TASK.loss, strategy="identity", progress=False)
    out = capsys.readouterr().out
    assert "101 of 221 parameters (45.7%)" in out and "fc1" in out and "fc2" in out
    assert factors.report.fraction == pytest.approx(101 / 221)
    only = fit_factors(model, None, loss_fn=TOKEN_TASK.loss, strategy="identity", modules=["fc2"], progress=False)
    assert only.report.tracked == 45 and only.blocks == ["fc2"] and "fc1" not in capsys.readouterr().out


class ShuffledRows(TrackedModule):
    """A custom tracker (the way MoE experts plug in): reports a Linear's token rows flattened and shuffled."""

    def blocks(self):
        m = self.module
        return [Block(self.name, m.out_features, m.in_features + 1, (f"{self.name}.weight", f"{self.name}.bias"),
                      m.weight.numel() + m.bias.numel())]

    def attach(self, recorder):
        def hook(module, inputs, output):
            a = inputs[0].detach()
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1)
            b, t = a.shape[:2]
            order = torch.randperm(b * t, generator=torch.Generator().manual_seed(b * t))
            example = torch.arange(b).repeat_interleave(t)[order]
            position = torch.arange(t).repeat(b)[order]
            rows = output.reshape(b * t, -1)[order]  # the rows must be on the loss's path: rebuild the output
            recorder.record(self.name, a.reshape(b * t, -1)[order], rows, example=example, position=position,
                            n_examples=b)
            return rows[torch.argsort(order)].reshape(output.shape)

        return [self.module.register_forward_hook(hook)]


class SpecialLinear(nn.Linear):
    pass


def test_custom_tracker_with_rows_in_any_order_gives_the_same_scores(monkeypatch):
    torch.manual_seed(3)
    model = TokenNet().double()
    docs, queries = token_data(9, seed=6), token_data(2, seed=7)
    kw = dict(loss_fn=TOKEN_TASK.loss, fisher="empirical", mask_fn=lambda b: b["mask"], **QUIET)
    base_f = fit_factors(model, token_batches(docs, 4), **kw)
    base = pairwise_scores(model, base_f, token_batches(queries, 2), token_batches(docs, 4), per_token=True,
                           loss_fn=TOKEN_TASK.loss, mask_fn=lambda b: b["mask"], progress=False)
    custom = [ShuffledRows("fc1", model.fc1), ShuffledRows("fc2", model.fc2)]
    f = fit_factors(model, token_batches(docs, 4), modules=custom, **kw)
    scores = pairwise_scores(model, f, token_batches(queries, 2), token_batches(docs, 4), per_token=True,
                             modules=custom, loss_fn=TOKEN_TASK.loss, mask_fn=lambda b: b["mask"], progress=False)
    torch.testing.assert_close(scores[0], base[0])
    torch.testing.assert_close(scores[1], base[1])
    # Registered for a module type, the tracker is found by modules=None and by name.
    monkeypatch.setattr(tracking, "_TRACKERS", list(tracking._TRACKERS))
    register_tracker(SpecialLinear, ShuffledRows)
    model.fc1.__class__ = SpecialLinear
    found = tracking.resolve_modules(model)
    assert [type(t).__name__ for t in found] == ["ShuffledRows", "TrackedLinear"]


def test_in_place_change_of_a_tracked_output_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            out = self.fc(x)
            out.mul_(2.0)
            return out

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(InputError, match="modified in place"):
        fit_factors(InPlace(), [(x, y)], loss_fn=TASK.loss, fisher="empirical", **QUIET)


# --- numerical health ----------------------------------------------------------------------------------
class Sidecar(nn.Module):
    """A classifier with a side layer whose input can be made zero or infinite while the loss stays finite."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill
        self.fc = nn.Linear(4, 3)
        self.side = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        side = self.side(torch.full_like(x, self.fill))
        return self.fc(x) + torch.nan_to_num(side, nan=0.0, posinf=0.0, neginf=0.0) * 1e-3


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_all_zero_activations_name_the_layer(strategy):
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with pytest.raises(NumericalError, match=r"'side'.*(damping|modules=)"):
        fit_factors(Sidecar(0.0), [(x, y)], loss_fn=TASK.loss, strategy=strategy, fisher="empirical", **QUIET)


def test_infinite_activations_name_the_layer():
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with pytest.raises(NumericalError, match=r"layer 'side'.*NaN or infinity"):
        fit_factors(Sidecar(float("inf")), [(x, y)], loss_fn=TASK.loss, fisher="empirical", **QUIET)


def test_failed_decomposition_names_the_layer_and_suggests_damping(monkeypatch):
    model, x, y = mlp(train=False)

    def broken(a):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(NumericalError, match=r"layer '0'.*larger damping"):
        fit_factors(model, split(x, y, 64), loss_fn=TASK.loss, fisher="empirical", **QUIET)


def test_non_positive_damping_is_refused(fitted):
    model, x, y, factors = fitted
    with pytest.raises(InputError, match="damping"):
        pairwise_scores(model, factors, [(x[:2], y[:2])], [(x[:4], y[:4])], loss_fn=TASK.loss, damping=-1.0,
                        progress=False)


# --- bad input -----------------------------------------------------------------------------------------
def test_model_without_tracked_modules():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten())
    with pytest.raises(InputError, match="no module the estimator can track"):
        fit_factors(model, None, loss_fn=TASK.loss, strategy="identity", **QUIET)
    with pytest.raises(InputError, match="cannot track"):
        fit_factors(model, None, loss_fn=TASK.loss, strategy="identity", modules=["0"], **QUIET)
    with pytest.raises(InputError, match="no module named 'fc9'"):
        fit_factors(mlp(train=False)[0], None, loss_fn=TASK.loss, strategy="identity", modules=["fc9"], **QUIET)


def test_loss_that_is_not_a_finite_scalar(fitted):
    model, x, y, factors = fitted
    docs = split(x[:16], y[:16], 8)

    def per_example(model, batch, sample=False):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    def nan_loss(model, batch, sample=False):
        return model(batch[0]).sum() * float("nan")

    with pytest.raises(InputError, match=r"shape \(8,\).*reduction='sum'"):
        fit_factors(model, docs, loss_fn=per_example, **QUIET)
    with pytest.raises(NumericalError, match="batch 0"):
        fit_factors(model, docs, loss_fn=nan_loss, **QUIET)
    with pytest.raises(NumericalError):
        pairwise_scores(model, factors, docs, docs, loss_fn=TASK.loss, measurement_fn=nan_loss, progress=False)


def test_queries_the_model_cannot_take(fitted):
    model, x, y, factors = fitted
    wide = [(torch.randn(3, 7, dtype=torch.float64), y[:3])]
    with pytest.raises(InputError, match="measurement_fn failed on batch 0"):
        pairwise_scores(model, factors, wide, split(x[:8], y[:8], 4), loss_fn=TASK.loss, progress=False)


def test_other_bad_arguments(fitted):
    model, x, y, factors = fitted
    docs = split(x[:32], y[:32], 8)
    with pytest.raises(InputError, match="strategy"):
        fit_factors(model, docs, loss_fn=TASK.loss, strategy="ekfak", **QUIET)
    with pytest.raises(InputError, match="fisher"):
        fit_factors(model, docs, loss_fn=TASK.loss, fisher="exact", **QUIET)
    with pytest.raises(InputError, match="generator"):
        fit_factors(model, (b for b in docs), loss_fn=TASK.loss, fisher="empirical", cache_bytes=0, **QUIET)
    with pytest.raises(InputError, match="no batches"):
        fit_factors(model, [], loss_fn=TASK.loss, fisher="empirical", **QUIET)
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with pytest.raises(InputError, match="different shapes"):
        pairwise_scores(other, factors, docs, docs, loss_fn=TASK.loss, progress=False)


# --- analysis ------------------------------------------------------------------------------------------
def test_analysis_helpers_on_hand_worked_cases():
    scores = torch.tensor([[1.0, 3.0, 2.0, -1.0], [2.0, 6.0, 4.0, -2.0], [-1.0, -3.0, -2.0, 1.0]])
    values, idx = top_documents(scores, 2)
    assert idx.tolist() == [[1, 2], [1, 2], [3, 0]] and values[0].tolist() == [3.0, 2.0]
    assert top_documents(scores, 1, largest=False)[1].flatten().tolist() == [3, 3, 1]
    corr = cross_query_correlation(scores)
    torch.testing.assert_close(corr, torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]]))
    torch.testing.assert_close(per_nat(scores[:2], torch.tensor([2.0, 4.0])), torch.tensor(
        [[0.5, 1.5, 1.0, -0.5], [0.5, 1.5, 1.0, -0.5]]))
    share = top_share(torch.tensor([[10.0, 5.0, 3.0, 2.0, -1.0]]), (25, 50, 100))
    torch.testing.assert_close(share, torch.tensor([[0.5, 0.75, 1.0]], dtype=torch.float64))
    ranks = torch.arange(1, 101, dtype=torch.float64)
    assert float(powerlaw_slope((3.0 * ranks ** -0.35)[torch.randperm(100)])[0]) == pytest.approx(-0.35)
    assert math.isnan(float(powerlaw_slope(torch.tensor([[-1.0, 2.0]]))[0]))
    with pytest.raises(InputError):
        per_nat(scores, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(InputError):
        top_documents(scores, 5)


def test_powerlaw_slope_matches_scipy():
    from scipy.stats import linregress

    row = torch.rand(200, generator=torch.Generator().manual_seed(0)) - 0.2
    pos = torch.sort(row[row > 0], descending=True).values.double()
    expected = linregress(torch.log(torch.arange(1, len(pos) + 1.0)).numpy(), torch.log(pos).numpy()).slope
    assert float(powerlaw_slope(row)[0]) == pytest.approx(expected, rel=1e-9)


# --- GPU -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_matches_cpu_and_bf16_agrees():
    model, x, y = mlp(dtype=torch.float32)
    docs, queries = split(x[:128], y[:128], 32), [(x[200:216], y[200:216])]
    kw = dict(loss_fn=TASK.loss, fisher="empirical", **QUIET)
    cpu = pairwise_scores(model, fit_factors(model, docs, **kw), queries, docs, loss_fn=TASK.loss, progress=False)
    model = model.cuda()
    gpu = pairwise_scores(model, fit_factors(model, docs, **kw), queries, docs, loss_fn=TASK.loss, progress=False)
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3 * float(cpu.abs().max()))
    f16 = fit_factors(model, docs, autocast_dtype=torch.bfloat16, **kw)
    bf16 = pairwise_scores(model, f16, queries, docs, loss_fn=TASK.loss, autocast_dtype=torch.bfloat16,
                           progress=False)
    assert pearson(bf16, cpu) >= 0.99
