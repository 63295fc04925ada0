"""The pathways measurement over runs: values equal the pure functions on a direct capture, resumes give the
same tables, and it works on the built-in model and on tiny OLMoE, Mixtral and Qwen2-MoE checkpoint series."""

import numpy as np
import polars as pl
import pytest
import torch

from tests.tiny_models import MOE_KINDS, random_tokens, save_series
from workbench import CaptureSpec, LossAccuracy, Run, RoutingStats, SampleSet, capture, measure
from workbench.errors import InputError, NotMoEError, StoreError
from workbench.probes.pathways import functions as P
from workbench.probes.pathways.measurement import RoutingPathways, rise_mask


@pytest.fixture(scope="module")
def measured(tiny_run, tmp_path_factory):
    """The tiny built-in run with its own store, measured once with a small max_pairs (so pairs are drawn) and
    a wide delta (its 40 steps leave losses moving, so the default 0.05 may memorize nothing)."""
    run = Run.from_folder(tiny_run.root, samples=tiny_run.samples, store_root=tmp_path_factory.mktemp("pw"))
    m = RoutingPathways(max_pairs=500, delta=5.0)
    measure(run, [LossAccuracy(), m], progress=False)
    return run, m


def rows(df, **eq):
    for k, v in eq.items():
        df = df.filter(pl.col(k).is_null() if v is None else pl.col(k) == v)
    return df


def test_stored_values_equal_the_functions_on_a_direct_capture(measured):
    run, m = measured
    table = run.store.table("pathways", final=False)
    step = run.steps[-1]
    model = run.checkpoint(step).load()
    cap = capture(model, run.samples, CaptureSpec(routing=True), device="cpu")
    paths = P.pathways(cap.routing, 0.7)
    at = rows(table, step=step)
    texts = dict(rows(at, metric="n_experts").select("sample_id", "pathway").iter_rows())
    assert [texts[s] for s in cap.sample_ids] == paths.texts()
    cons = P.consistency(cap.routing, cap.router_matrices)
    stored = dict(rows(at, metric="consistency_raw").drop_nulls("sample_id").select("sample_id", "value").iter_rows())
    torch.testing.assert_close(torch.tensor([stored[s] for s in cap.sample_ids], dtype=torch.float64),
                               cons["consistency_raw"].double(), atol=1e-6, rtol=0)
    for group in ("train", "test", "all"):
        idx = cap.group_indices(group) if group != "all" else torch.arange(len(cap))
        raw = cons["consistency_raw"][idx].double()
        assert rows(at, metric="consistency_raw", group=group, sample_id=None)["value"].item() == pytest.approx(float(raw.mean()))
        assert rows(at, metric="consistency_raw_median", group=group)["value"].item() == pytest.approx(
            float(np.median(raw.numpy())))
        expect = P.group_mean_distance(paths, idx, max_pairs=500, seed=0)
        got = rows(at, metric="distance", group=group, layer=None, sample_id=None)["value"].item()
        assert got == pytest.approx(expect)
        per_layer = P.group_mean_distance(paths, idx, max_pairs=500, seed=0, per_layer=True)
        stored_layers = rows(at, metric="distance", group=group, sample_id=None).drop_nulls("layer").sort("layer")
        assert stored_layers["layer"].to_list() == cap.moe_layers
        torch.testing.assert_close(torch.tensor(stored_layers["value"].to_list(), dtype=torch.float64), per_layer)
        assert rows(at, metric="n_pairs", group=group)["value"].item() == min(500, len(idx) * (len(idx) - 1) // 2)
    # the same accuracy the basic measurement stored, from the same capture pass
    basic = run.store.table("basic")
    for group in ("train", "test"):
        a = rows(basic, step=step, metric="accuracy", group=group, sample_id=None)["value"].item()
        assert rows(at, metric="accuracy", group=group, sample_id=None, layer=None)["value"].item() == pytest.approx(a)


def test_memorized_at_groups_follow_the_stored_losses(measured):
    run, m = measured
    table = run.store.table("pathways", final=False)
    final = run.store.table("pathways", final=True)
    steps = run.steps
    per = rows(table, metric="loss", group="train").drop_nulls("sample_id")
    wide = per.pivot(on="step", index="sample_id", values="value", sort_columns=True).sort("sample_id")
    losses = torch.tensor(wide.select([str(s) for s in steps]).to_numpy().T)
    eps = rows(final, metric="eps", group="train")["value"].item()
    assert eps == pytest.approx(P.choose_eps(losses, steps, delta=m.delta))
    since = P.memorized_since(losses, steps, eps, delta=m.delta).tolist()
    stored = dict(rows(final, metric="memorized_since").select("sample_id", "value").iter_rows())
    assert [stored[s] if stored[s] == stored[s] else -1 for s in wide["sample_id"].to_list()] == since
    share = sum(0 <= s < steps[-1] for s in since) / len(since)
    assert rows(final, metric="share_memorized", group="train")["value"].item() == pytest.approx(share)
    groups = {g for g in final["group"].unique().to_list() if g and g.startswith("train@")}
    expect = {f"train@{t}" for t in set(since) if 0 <= t < steps[-1] and since.count(t) >= 2}
    assert groups == expect and groups
    # one group's distance at one checkpoint, recomputed from the stored pathway texts
    for g in sorted(groups)[:1]:
        t = int(g.split("@")[1])
        members = [s for s, v in zip(wide["sample_id"].to_list(), since) if v == t]
        texts = dict(rows(table, metric="n_experts", step=steps[0]).select("sample_id", "pathway").iter_rows())
        expect_d = P.group_mean_distance([texts[s] for s in members], max_pairs=500, seed=0)
        got = rows(final, group=g, metric="distance", step=steps[0], layer=None)["value"].item()
        assert got == pytest.approx(expect_d)
    # correlations: one per group x metric x method x window
    corr = rows(final, metric="correlation")
    assert corr.height == 3 * 5 * 2 * 2  # groups x metrics x methods x windows
    acc = rows(table, metric="accuracy", group="test", layer=None, sample_id=None).sort("step")["value"].to_numpy()
    dist = rows(table, metric="distance", group="train", layer=None, sample_id=None).sort("step")["value"].to_numpy()
    r = rows(corr, group="train", of="distance", method="spearman", window="all")["value"].item()
    assert r == pytest.approx(P.track_correlation(dist, acc, "spearman"))


def test_resume_after_a_lost_part_gives_the_same_tables(measured, tmp_path):
    run, _ = measured
    fresh = Run.from_folder(run.checkpoints[0].path.parent, samples=run.samples, store_root=tmp_path)
    measure(fresh, [RoutingPathways(max_pairs=500)], progress=False)
    before = fresh.store.table("pathways")
    (fresh.store.root / "pathways" / f"step_{fresh.steps[2]:06d}.parquet").unlink()
    (fresh.store.root / "pathways" / "final.parquet").unlink()
    measure(fresh, [RoutingPathways(max_pairs=500)], progress=False)
    after = fresh.store.table("pathways")
    assert after.equals(before)
    with pytest.raises(StoreError, match="tau"):
        measure(fresh, [RoutingPathways(tau=0.5, max_pairs=500)], progress=False)


def test_topk_weights_at_tau_one_keep_every_expert_some_token_chose(tiny_run, tmp_path):
    run = Run.from_folder(tiny_run.root, samples=tiny_run.samples, store_root=tmp_path)
    step = run.steps[-1]
    measure(run, [RoutingPathways(routing_weights="topk", tau=1.0)], steps=[step], progress=False)
    texts = dict(rows(run.store.table("pathways"), metric="n_experts").select("sample_id", "pathway").iter_rows())
    cap = capture(run.checkpoint(step).load(), run.samples, CaptureSpec(routing=True, expert_load=True), device="cpu")
    for i, sid in enumerate(cap.sample_ids):
        chosen = [set(torch.nonzero(cap.expert_load[i, layer]).flatten().tolist()) for layer in range(4)]
        assert [set(layer) for layer in P.parse_pathway(texts[sid])] == chosen


@pytest.mark.slow
@pytest.mark.parametrize("kind", MOE_KINDS)
def test_hf_moe_checkpoint_series(kind, tmp_path):
    folder = save_series(kind, tmp_path / kind, steps=(0, 10, 100))
    tokens = random_tokens(24, seed=1)
    samples = SampleSet.from_token_lists(tokens, groups=["train", "test"] * 12)
    run = Run.from_folder(folder, samples=samples)
    measure(run, [RoutingStats(), RoutingPathways()], progress=False)
    table = run.store.table("pathways", final=False)
    assert sorted(table["step"].unique().to_list()) == [0, 10, 100]
    layers = rows(table, metric="distance", group="train", step=100).drop_nulls("layer")["layer"].to_list()
    assert sorted(layers) == [0, 1, 2]
    texts = rows(table, metric="n_experts", step=100).sort("sample_id")
    assert texts.height == 24 and all(t.count("-") == 2 for t in texts["pathway"].to_list())
    # the stored pathways are those of the checkpoint's own routing
    model = run.checkpoint(100).load()
    cap = capture(model, samples, CaptureSpec(routing=True), device="cpu")
    direct = dict(zip(cap.sample_ids, P.pathways(cap.routing).texts()))
    assert all(direct[s] == t for s, t in texts.select("sample_id", "pathway").iter_rows())
    final = run.store.table("pathways", final=True)
    assert rows(final, metric="correlation").height == 3 * 5 * 2 * 2


def test_dense_models_and_tiny_groups_are_refused(tmp_path, tiny_run):
    folder = save_series("llama", tmp_path / "llama", steps=(0,))
    run = Run.from_folder(folder, samples=SampleSet.from_token_lists(random_tokens(4)))
    with pytest.raises(NotMoEError):
        measure(run, [RoutingPathways()], progress=False)
    samples = tiny_run.samples
    odd = SampleSet(samples.ids, ["lonely"] + samples.groups[1:], samples.input_ids, samples.targets)
    run = Run.from_folder(tiny_run.root, samples=odd, store_root=tmp_path / "odd")
    with pytest.raises(InputError, match="fewer than 2 samples"):
        measure(run, [RoutingPathways()], steps=run.steps[:1], progress=False)
    with pytest.raises(InputError, match="tau"):
        RoutingPathways(tau=0)


def test_rise_window_starts_at_the_last_low_checkpoint_before_the_best():
    quick = np.array([0.031, 0.033, 0.029, 0.015, 0.004, 0.035, 0.073, 0.087, 0.131, 0.164, 0.173, 0.21])
    assert rise_mask(quick).tolist() == [False] * 4 + [True] * 8  # from the minimum (0.004) on
    grok = np.array([0.4, 0.42, 0.41, 0.42, 0.5, 0.9, 0.99, 0.98])
    assert rise_mask(grok).tolist() == [False] * 3 + [True] * 5  # 0.42 <= 0.4 + 0.1 x 0.59, then the climb
    assert rise_mask(np.array([0.5, 0.5, 0.5])).tolist() == [True] * 3


def test_memorized_groups_are_paired_one_to_one_with_generalized_groups(quick_run):
    # The quick built-in run (measured with the demo's options; reused when the demo test measured it already):
    # unlike the tiny run, some of its test samples generalize, so there are groups on both sides.
    run = quick_run
    measure(run, [RoutingPathways()], progress=False)
    table = run.store.table("pathways", final=False)
    final = run.store.table("pathways", final=True)
    steps = run.steps
    groups = final.drop_nulls("since")["group"].unique().to_list()
    train = sorted(g for g in groups if g.startswith("train@"))
    test = sorted(g for g in groups if g.startswith("test@"))
    assert train and test  # the fixture must give both kinds, or this test checks nothing
    matched = rows(final, metric="matched")
    assert matched.height == min(len(train), len(test))
    assert matched["test_group"].n_unique() == matched.height and matched["group"].n_unique() == matched.height

    # The groups' mean multi-hot pathways at the last checkpoint, from the stored texts and since-values.
    last = rows(table, metric="n_experts", step=steps[-1])
    texts = dict(last.select("sample_id", "pathway").iter_rows())
    group_of = dict(last.select("sample_id", "group").iter_rows())
    since = dict(final.filter(pl.col("metric").is_in(["memorized_since", "generalized_since"]))
                 .select("sample_id", "value").iter_rows())

    def mean_embedding(name):
        kind, t = name.split("@")
        ids = [s for s, v in since.items() if v == int(t) and group_of[s] == kind]
        return P.pathway_embedding(P.Pathways.from_lists([P.parse_pathway(texts[s]) for s in ids], n_experts=8)).mean(0)

    a = torch.stack([mean_embedding(g) for g in train])
    b = torch.stack([mean_embedding(g) for g in test])
    ia, ib, sim = P.match_groups(a, b)
    expect = {train[i]: (test[j], s) for i, j, s in zip(ia.tolist(), ib.tolist(), sim.tolist())}
    got = {g: (t, v) for g, t, v in matched.select("group", "test_group", "value").iter_rows()}
    assert got.keys() == expect.keys()
    for g, (t, v) in got.items():
        assert t == expect[g][0] and v == pytest.approx(expect[g][1])
    # each training group's distance against its own test group's accuracy
    g, (t, _) = min(got.items())
    dist = rows(final, group=g, metric="distance", layer=None).drop_nulls("step").sort("step")["value"].to_numpy()
    acc = rows(final, group=t, metric="accuracy").drop_nulls("step").sort("step")["value"].to_numpy()
    r = rows(final, metric="matched_correlation", group=g, of="distance", method="pearson", window="all")
    assert r["test_group"].item() == t
    expect_r = P.track_correlation(dist, acc, "pearson")
    assert r["value"].item() == pytest.approx(expect_r, nan_ok=True)
