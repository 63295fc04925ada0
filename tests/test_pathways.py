"""Pathway functions against hand-worked cases and a plain dynamic-programming reference."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from workbench.errors import InputError, NumericalError
from workbench.probes.pathways import (
    Pathways,
    choose_eps,
    consistency,
    edit_distance,
    generalized_since,
    group_mean_distance,
    layer_distances,
    levenshtein_torch,
    match_groups,
    memorized_since,
    pairwise_distances,
    parse_pathway,
    pathway_embedding,
    pathway_text,
    pathways,
    sample_pairs,
    track_correlation,
)


def dp_distance(a, b) -> int:
    """Textbook Levenshtein (unit costs) over any two sequences: the independent reference."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def symbols(path):
    return [(layer, e) for layer, experts in enumerate(path) for e in experts]


def random_weights(n=40, layers=4, experts=12, seed=0, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(n, layers, experts, generator=g), -1)


def w(*layers):
    return torch.tensor([layers], dtype=torch.float64)


# --- pathways and text -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights, tau, expected",
    [
        ([0.5, 0.2, 0.3], 0.7, [0, 2]),  # 0.5 + 0.3 = 0.8 > 0.7
        ([0.4, 0.3, 0.3], 0.7, [0, 1, 2]),  # 0.4 + 0.3 reaches 0.7 without exceeding it; ties keep id order
        ([0.7, 0.3, 0.0], 0.7, [0, 1]),  # exactly tau is not enough
        ([0.71, 0.29, 0.0], 0.7, [0]),
        ([0.1, 0.2, 0.3, 0.4], 0.5, [3, 2]),
        ([0.6, 0.0, 0.4, 0.0], 1.0, [0, 2]),  # top-k weights, tau = 1: zero-weight experts never join
        ([0.25, 0.25, 0.25, 0.25], 0.7, [0, 1, 2]),
    ],
)
def test_pathway_is_the_shortest_prefix_exceeding_tau(weights, tau, expected):
    for dtype in (torch.float32, torch.float64):
        p = pathways(torch.tensor([[weights]], dtype=dtype), tau)
        assert p[0] == [expected]


def test_pathway_prefix_per_layer_and_sample():
    p = pathways(torch.cat([w([0.5, 0.2, 0.3], [0.1, 0.8, 0.1]), w([0.2, 0.2, 0.6], [0.0, 0.0, 1.0])]), 0.7)
    assert p.tolist() == [[[0, 2], [1]], [[2, 0], [2]]]
    assert p.lengths.tolist() == [[2, 1], [2, 1]]
    assert p.texts() == ["0,2-1", "2,0-2"]


def test_text_form_and_parse():
    assert pathway_text([[3, 1, 5], [9, 1]]) == "3,1,5-9,1"
    assert parse_pathway("3,1,5-9,1") == [[3, 1, 5], [9, 1]]
    # ids of several digits (128 experts): the vectorized texts equal the one-at-a-time form
    p = pathways(random_weights(60, 5, 128, seed=3, sharp=4.0), 0.6)
    texts = p.texts()
    assert texts == [pathway_text(x) for x in p.tolist()]
    assert any(len(e) == 3 for t in texts for e in t.replace("-", ",").split(","))
    assert [parse_pathway(t) for t in texts] == p.tolist()
    assert Pathways.from_lists(p.tolist()).texts() == texts


# --- distances ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, b, char, expert",
    [
        ([[3, 1, 5], [9, 1]], [[3, 5], [9, 1]], 2, 1),  # "1," deleted / one expert deleted
        ([[10]], [[1]], 1, 1),
        ([[1, 2]], [[2, 1]], 2, 2),
        ([[1], [2]], [[2], [1]], 2, 2),  # the same experts at other layers are other symbols
        ([[12, 3]], [[12, 3]], 0, 0),
        ([[0]], [[5, 6, 7]], 5, 3),
    ],
)
def test_edit_distance_hand_cases(a, b, char, expert):
    assert edit_distance(a, b) == char == dp_distance(pathway_text(a), pathway_text(b))
    assert edit_distance(a, b, unit="expert") == expert == dp_distance(symbols(a), symbols(b))
    assert edit_distance(pathway_text(a), pathway_text(b)) == char  # text forms are accepted too


@pytest.mark.parametrize("backend", ["rapidfuzz", "torch"])
@pytest.mark.parametrize("unit", ["char", "expert"])
def test_pairwise_distances_match_the_plain_dp(backend, unit):
    p = pathways(random_weights(25, 4, 20, seed=1), 0.7)
    paths = p.tolist()
    seqs = [pathway_text(x) for x in paths] if unit == "char" else [symbols(x) for x in paths]
    ref = torch.tensor([[dp_distance(a, b) for b in seqs] for a in seqs], dtype=torch.int32)
    d = pairwise_distances(p, unit, backend=backend)
    assert d.dtype == torch.int32
    torch.testing.assert_close(d, ref)
    pairs = torch.tensor([[0, 1], [3, 3], [24, 2], [5, 17]])
    torch.testing.assert_close(pairwise_distances(p, unit, pairs, backend=backend), ref[pairs[:, 0], pairs[:, 1]])
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.float64)
    norm = pairwise_distances(p, unit, normalize=True, backend=backend)
    torch.testing.assert_close(norm, ref.double() / torch.maximum(lengths[:, None], lengths[None, :]))


def test_duplicate_pathways_give_the_same_matrix():
    # routing collapses onto few pathways; distinct ones are computed once and expanded
    base = pathways(random_weights(6, 3, 8, seed=2), 0.7).tolist()
    paths = [base[i % 6] for i in range(30)]
    d = pairwise_distances(paths)
    ref = torch.tensor([[dp_distance(pathway_text(a), pathway_text(b)) for b in paths] for a in paths],
                       dtype=torch.int32)
    torch.testing.assert_close(d, ref)


def test_torch_dp_chunks_and_padding_do_not_change_distances():
    p = pathways(random_weights(14, 6, 16, seed=4), 0.8)
    big = pairwise_distances(p, backend="torch")
    small = pairwise_distances(p, backend="torch", chunk_cells=64)  # one or two pairs per chunk
    torch.testing.assert_close(big, small)
    # the bare kernel on padded batches: junk past each length must not leak in
    a = torch.tensor([[1, 2, 3, 9, 9], [4, 4, 0, 0, 0]])
    b = torch.tensor([[1, 3, 7, 7], [4, 5, 4, 8]])
    out = levenshtein_torch(a, torch.tensor([3, 2]), b, torch.tensor([2, 3]))
    assert out.tolist() == [dp_distance([1, 2, 3], [1, 3]), dp_distance([4, 4], [4, 5, 4])]


@pytest.mark.parametrize("unit", ["char", "expert"])
def test_layer_distances_compare_each_layer_alone(unit):
    p = pathways(random_weights(12, 3, 10, seed=5), 0.7)
    d = layer_distances(p, unit)
    assert d.shape == (3, 12, 12)
    for layer in range(3):
        seqs = [x[layer] for x in p.tolist()]
        if unit == "char":
            seqs = [",".join(map(str, s)) for s in seqs]
        ref = torch.tensor([[dp_distance(a, b) for b in seqs] for a in seqs], dtype=torch.int32)
        torch.testing.assert_close(d[layer], ref)
    torch.testing.assert_close(layer_distances(p, unit, backend="torch"), d)


def test_group_mean_over_all_pairs_and_over_fixed_sampled_pairs():
    p = pathways(random_weights(40, 4, 12, seed=6), 0.7)
    idx = torch.arange(0, 40, 2)
    full = pairwise_distances(p.select(idx)).double()
    iu = torch.triu_indices(20, 20, 1)
    assert group_mean_distance(p, idx) == pytest.approx(float(full[iu[0], iu[1]].mean()))
    per_layer = group_mean_distance(p, idx, per_layer=True)
    ref = layer_distances(p.select(idx)).double()[:, iu[0], iu[1]].mean(1)
    torch.testing.assert_close(per_layer, ref)
    # a large group: a fixed random set of pairs, the same for the same seed (e.g. at every checkpoint)
    pairs = sample_pairs(40, 100, seed=3)
    assert pairs.shape == (100, 2) and (pairs[:, 0] < pairs[:, 1]).all() and pairs.max() < 40
    assert len({tuple(x) for x in pairs.tolist()}) == 100
    assert torch.equal(pairs, sample_pairs(40, 100, seed=3))
    assert not torch.equal(pairs, sample_pairs(40, 100, seed=4))
    d = pairwise_distances(p)
    sampled = group_mean_distance(p, max_pairs=100, seed=3)
    assert sampled == pytest.approx(float(d[pairs[:, 0], pairs[:, 1]].double().mean()))


def test_sampled_pairs_cover_the_triangle_uniformly():
    # unranking must reach every pair (first row, last row) and nothing outside the triangle
    pairs = sample_pairs(7, 20, seed=0)  # 21 pairs in all: 20 of them
    assert len({tuple(x) for x in pairs.tolist()}) == 20
    assert all(0 <= i < j < 7 for i, j in pairs.tolist())
    n = 5000
    big = sample_pairs(n, 200_000, seed=1)
    assert (big[:, 0] < big[:, 1]).all() and int(big[:, 1].max()) == n - 1 and int(big[:, 0].min()) == 0
    # the first index of a uniform pair has density ~ (n - 1 - i): its mean is about n/3
    assert float(big[:, 0].double().mean()) == pytest.approx(n / 3, rel=0.02)


# --- consistency -------------------------------------------------------------------------------------------
def test_consistency_worked_by_hand():
    eye = torch.eye(2)
    weights = w([1.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    out = consistency(weights, [eye, eye, eye])
    # embeddings e1 = e2 = (1, 0), e3 = (0, 1): cosines 1 and 0, mean 0.5, max 1
    assert out["consistency_raw"].item() == pytest.approx(0.5 / (1 + 1e-8))
    assert out["consistency"].item() == pytest.approx(1 - 0.5 / (1 + 1e-8))
    # weighted embeddings: W1 = I, W2 = [[1, 1], [0, 1]], W3 = I; g = (0.5, 0.5) everywhere
    # e1 = (0.5, 0.5), e2 = (0.5, 1.0), e3 = (0.5, 0.5); cos(e1, e2) = cos(e2, e3) = 3 / sqrt(10)
    w2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    out = consistency(w([0.5, 0.5], [0.5, 0.5], [0.5, 0.5]), torch.stack([eye, w2, eye]))
    assert out["consistency_raw"].item() == pytest.approx(1.0, abs=1e-6)
    # three pairs: cosines 1, 0, -1 -> mean 0, so raw 0 and consistency 1
    out = consistency(w([1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]).clone(), [eye, eye, eye, -eye])
    assert out["consistency_raw"].item() == pytest.approx(0.0, abs=1e-7)


def test_consistency_matches_a_loop_reference_and_two_layers_warn():
    weights = random_weights(10, 4, 6, seed=7).float()
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(6, 5, generator=g) for _ in range(4)]
    out = consistency(weights, mats)
    for i in range(10):
        e = [weights[i, layer] @ mats[layer] for layer in range(4)]
        c = [float(torch.dot(e[k], e[k + 1]) / (e[k].norm() * e[k + 1].norm())) for k in range(3)]
        assert out["consistency_raw"][i].item() == pytest.approx(np.mean(c) / (max(c) + 1e-8), rel=1e-5)
    with pytest.warns(UserWarning, match="two MoE layers"):
        two = consistency(weights[:, :2], mats[:2])
    torch.testing.assert_close(two["consistency_raw"], torch.ones(10), atol=1e-6, rtol=0)


# --- memorized-at, generalized-at, eps, correlation ------------------------------------------------------------
def test_memorized_since_hand_case():
    steps = [0, 10, 20, 30]
    losses = torch.tensor([  # one row per sample, one column per checkpoint
        [3.0, 0.05, 0.04, 0.02],  # <= 0.1 from step 10 on, each within 0.05 of the final 0.02 -> 10
        [3.0, 0.02, 0.50, 0.02],  # back above eps at step 20: only the last stretch holds -> 30
        [3.0, 0.50, 0.50, 0.50],  # final loss above eps -> never
        [0.5, 0.02, 0.02, 0.30],  # final loss above eps -> never
    ]).T
    assert memorized_since(losses, steps, eps=0.1).tolist() == [10, 30, -1, -1]
    assert memorized_since(losses.double(), steps, eps=0.1).tolist() == [10, 30, -1, -1]
    assert memorized_since(torch.tensor([[0.1]]), [5], eps=0.1).tolist() == [5]  # float32 0.1 <= eps 0.1
    # a per-sample eps and a tighter delta: the distance to the final loss decides
    eps = torch.tensor([0.1, 0.6, 0.6, 0.6])
    assert memorized_since(losses, steps, eps=eps, delta=0.01).tolist() == [30, 30, 10, 30]


def test_generalized_since_allows_one_later_error():
    steps = [1, 2, 3, 4, 5, 6]
    correct = torch.tensor([
        [0, 1, 1, 0, 1, 1],  # one error after step 2 -> 2
        [1, 0, 1, 0, 1, 1],  # from 1 on two errors; from 3 on one -> 3
        [0, 0, 0, 0, 0, 1],  # -> 6
        [0, 0, 0, 0, 0, 0],  # never
        [1, 1, 1, 1, 1, 0],  # a final error is the one allowed -> 1
    ], dtype=torch.float64).T
    assert generalized_since(correct, steps).tolist() == [2, 3, 6, -1, 1]
    assert generalized_since(correct, steps, max_errors=0).tolist() == [5, 5, 6, -1, -1]
    # accuracy exactly at the threshold is not above it
    for dtype in (torch.float32, torch.float64):
        assert generalized_since(torch.tensor([[0.8], [0.81]], dtype=dtype), [0, 1]).tolist() == [1]


def test_choose_eps_memorizes_the_target_share_before_the_last_checkpoint():
    g = torch.Generator().manual_seed(0)
    n = 200
    final = torch.rand(n, generator=g) * 2
    losses = torch.stack([final + 3, final + 0.01, final])  # [3, n]
    eps = choose_eps(losses, [0, 1, 2])
    since = memorized_since(losses, [0, 1, 2], eps)
    share = float(((since >= 0) & (since < 2)).double().mean())
    assert 0.20 <= share <= 0.25
    assert choose_eps(losses, target=(0.5, 0.5)) == pytest.approx(float((final + 0.01).sort().values[99]))


def test_track_correlation_against_scipy():
    acc = np.array([0.1, 0.1, 0.2, 0.6, 0.9, 1.0])
    dist = np.array([9.0, 9.5, 8.0, 5.0, 2.0, 1.5])
    assert track_correlation(dist, acc) == pytest.approx(stats.pearsonr(dist, acc)[0])
    assert track_correlation(dist, acc, "spearman") == pytest.approx(stats.spearmanr(dist, acc)[0])
    assert track_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # monotone but not linear: Spearman 1, Pearson below 1
    x = np.arange(1, 8.0)
    assert track_correlation(x, x ** 4, "spearman") == pytest.approx(1.0)
    assert track_correlation(x, x ** 4) < 0.95
    assert math.isnan(track_correlation([1, 1, 1], [1, 2, 3]))
    assert track_correlation([1, 2, np.nan, 3], [1, 2, 5, 3]) == pytest.approx(1.0)  # NaN pairs left out


# --- bad input ---------------------------------------------------------------------------------------------
def test_logits_instead_of_weights_are_refused():
    logits = torch.randn(4, 3, 8)
    with pytest.raises(InputError, match="logits"):
        pathways(logits)
    with pytest.raises(InputError, match="logits"):
        consistency(logits, [torch.randn(8, 4)] * 3)
    with pytest.raises(NumericalError):
        pathways(torch.full((2, 2, 4), float("nan")))
    with pytest.raises(InputError, match=r"\[samples, layers, experts\]"):
        pathways(torch.softmax(torch.randn(4, 8), -1))


@pytest.mark.parametrize("tau", [0, -0.1, 1.5, float("nan")])
def test_tau_outside_the_unit_interval_is_refused(tau):
    with pytest.raises(InputError, match="tau"):
        pathways(random_weights(3), tau)


def test_groups_smaller_than_two_are_refused():
    p = pathways(random_weights(5), 0.7)
    with pytest.raises(InputError, match="at least 2"):
        group_mean_distance(p, [3])
    with pytest.raises(InputError, match="at least 2"):
        sample_pairs(1)


def test_mismatched_layers_between_weights_and_router_matrices_are_refused():
    weights = random_weights(5, 4, 6)
    with pytest.raises(InputError, match="4 MoE layers but 3 router matrices"):
        consistency(weights, [torch.randn(6, 5)] * 3)
    with pytest.raises(InputError, match="experts=6"):
        consistency(weights, [torch.randn(7, 5)] * 4)
    with pytest.raises(InputError, match="unit"):
        pairwise_distances(pathways(weights), unit="token")
    with pytest.raises(InputError, match="pair indices"):
        pairwise_distances(pathways(weights), pairs=[[0, 9]])


def test_no_warning_for_three_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        consistency(random_weights(3, 3, 4), [torch.randn(4, 2)] * 3)


# --- CUDA --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("unit", ["char", "expert"])
def test_cuda_pathways_give_the_cpu_numbers(unit):
    weights = random_weights(300, 8, 64, seed=8, sharp=3.0)
    cpu = pathways(weights, 0.7)
    gpu = pathways(weights.cuda(), 0.7)
    assert gpu.device.type == "cuda" and gpu.tolist() == cpu.tolist()
    d_gpu = pairwise_distances(gpu, unit)
    assert d_gpu.device.type == "cuda"
    torch.testing.assert_close(d_gpu.cpu(), pairwise_distances(cpu, unit))
    torch.testing.assert_close(layer_distances(gpu, unit).cpu(), layer_distances(cpu, unit))
    pairs = sample_pairs(300, 5000, seed=1)
    assert group_mean_distance(gpu, unit=unit, max_pairs=5000, seed=1) == pytest.approx(
        group_mean_distance(cpu, unit=unit, max_pairs=5000, seed=1))
    assert pairs.shape == (5000, 2)
    mats = [torch.randn(64, 16) for _ in range(8)]
    torch.testing.assert_close(consistency(weights.cuda(), mats)["consistency"].cpu(),
                               consistency(weights, mats)["consistency"], atol=1e-5, rtol=1e-5)


def test_pathway_embedding_marks_each_layers_experts():
    p = Pathways.from_lists([[[0, 1], [2]], [[1], [2, 3]]], n_experts=4)
    expect = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 0],
                           [0, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.float32)
    assert torch.equal(pathway_embedding(p), expect)


def test_match_groups_by_hand_and_against_every_permutation():
    import itertools

    # By hand: a0 = (1, 0) goes with b1 = (1, 0.1) (cos 0.995) and a1 = (0, 1) with b0 (cos 1); a2 = (1, 1) would
    # only add 0.707 in place of either, so it stays unpaired.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.1]])
    ia, ib, sim = match_groups(a, b)
    assert ia.tolist() == [0, 1] and ib.tolist() == [1, 0]
    assert sim.tolist() == pytest.approx([1 / math.sqrt(1.01), 1.0])
    # Random groups: the matching's total similarity is the best over all one-to-one pairings.
    g = torch.Generator().manual_seed(0)
    for ga, gb in ((4, 4), (3, 5), (5, 3)):
        a, b = torch.rand(ga, 6, generator=g), torch.rand(gb, 6, generator=g)
        cos = torch.nn.functional.normalize(a.double(), dim=1) @ torch.nn.functional.normalize(b.double(), dim=1).T
        if ga <= gb:
            best = max(sum(cos[i, j] for i, j in enumerate(perm)) for perm in itertools.permutations(range(gb), ga))
        else:
            best = max(sum(cos[i, j] for j, i in enumerate(perm)) for perm in itertools.permutations(range(ga), gb))
        ia, ib, sim = match_groups(a, b)
        assert len(ia) == min(ga, gb) and len(set(ia.tolist())) == len(set(ib.tolist())) == len(ia)
        assert float(sim.sum()) == pytest.approx(float(best))
        torch.testing.assert_close(sim, cos[ia, ib])


def test_match_groups_refuses_bad_embeddings():
    with pytest.raises(InputError, match="one dim"):
        match_groups(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(InputError, match="all-zero"):
        match_groups(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.ones(2, 2))
    with pytest.raises(InputError, match="NaN"):
        match_groups(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2))
