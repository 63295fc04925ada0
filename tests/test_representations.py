"""Representations: purity and silhouette on hand cases and against scikit-learn, Fourier structure of cyclic
labels, layouts that keep each sample's identity across checkpoints, the measurement and its views."""

from __future__ import annotations

import math
import sys

import numpy as np
import polars as pl
import pytest
import torch

from workbench.errors import DependencyError, InputError
from workbench.probes.representations import (
    Representations,
    align_chain,
    aligned_pca,
    effective_frequencies,
    aligned_umap,
    angle_agreement,
    fourier_spectrum,
    nearest_neighbours,
    neighbour_purity,
    purity_chance,
    shuffled_spectra,
    silhouette,
    top_share,
)


# --- purity and silhouette ------------------------------------------------------------------------------------
def test_a_perfectly_clustered_set_has_purity_1_and_hand_cases():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 8, generator=g) * 10
    labels = torch.arange(5).repeat_interleave(12)
    x = centers[labels] + 0.01 * torch.randn(60, 8, generator=g)
    assert torch.equal(neighbour_purity(x, labels, k=11), torch.ones(60, dtype=torch.float64))
    assert float(silhouette(x, labels).min()) > 0.99
    # on a line: 0, 1 | 10, 11 with alternating labels, each one's nearest neighbour has the other label
    line = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    assert neighbour_purity(line, torch.tensor([0, 0, 1, 1]), k=1).tolist() == [1, 1, 1, 1]
    assert neighbour_purity(line, torch.tensor([0, 1, 0, 1]), k=1).tolist() == [0, 0, 0, 0]
    # k = 2: 0's neighbours are 1 (other label) and 10 (same); 1's are 0 and 10 (both other); 10's are 11 and 1
    assert neighbour_purity(line, torch.tensor([0, 1, 0, 1]), k=2).tolist() == [0.5, 0.0, 0.0, 0.5]
    assert purity_chance(torch.tensor([0, 0, 1, 1, 1])).tolist() == [0.25, 0.25, 0.5, 0.5, 0.5]
    with pytest.raises(InputError, match="k must be"):
        neighbour_purity(line, torch.tensor([0, 0, 1, 1]), k=4)
    with pytest.raises(InputError, match="NaN"):
        neighbour_purity(torch.full((3, 2), math.nan), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_neighbours_and_silhouette_agree_with_scikit_learn(metric):
    from sklearn.metrics import silhouette_samples
    from sklearn.neighbors import NearestNeighbors

    g = torch.Generator().manual_seed(1)
    x = torch.randn(203, 6, generator=g) + torch.arange(203)[:, None] % 3
    labels = torch.randint(0, 4, (203,), generator=g)
    labels[7] = 9  # a label with one sample: silhouette 0, as scikit-learn gives
    ours = nearest_neighbours(x, k=5, metric=metric, block=50)
    nn = NearestNeighbors(n_neighbors=6, metric=metric, algorithm="brute").fit(x.numpy())
    theirs = nn.kneighbors(x.numpy(), return_distance=False)[:, 1:]
    assert (ours.numpy() == theirs).mean() > 0.99  # exact up to float ties
    sil = silhouette(x, labels, metric=metric, block=64)
    want = silhouette_samples(x.double().numpy(), labels.numpy(), metric=metric)
    np.testing.assert_allclose(sil.numpy(), want, atol=1e-10)
    assert sil[7] == 0


# --- cyclic labels --------------------------------------------------------------------------------------------
def _circle(p=31, k=3, per=8, noise=0.05, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(p).repeat_interleave(per)
    angle = 2 * math.pi * k * c / p
    planar = torch.stack([angle.cos(), angle.sin()], 1)
    x = planar @ torch.randn(2, d, generator=g) + noise * torch.randn(len(c), d, generator=g)
    return x, c


def test_fourier_spectrum_finds_the_circle_of_modular_addition():
    p = 31
    x, c = _circle(p, k=3)
    spectrum = fourier_spectrum(x, c, p)
    assert spectrum.shape == (p // 2,) and float(spectrum.sum()) == pytest.approx(1.0)
    assert int(spectrum.argmax()) + 1 == 3 and top_share(spectrum) > 0.95
    assert effective_frequencies(spectrum) == pytest.approx(1.0, abs=0.1)
    shuffled = shuffled_spectra(x, c, p, draws=10)  # the same means in no cyclic order
    assert shuffled.shape == (10, p // 2) and float(shuffled.max(1).values.mean()) < 0.4
    assert float((1 / shuffled.square().sum(1)).mean()) > 5
    noise = torch.randn(len(c), 10, generator=torch.Generator().manual_seed(3))
    assert top_share(fourier_spectrum(noise, c, p)) < 0.4
    with pytest.raises(InputError, match="no sample"):
        fourier_spectrum(x[c != 4], c[c != 4], p)


def test_angle_agreement_of_a_circular_layout():
    p = 13
    for k, sign in ((1, 1), (5, -1)):
        c = torch.arange(p).repeat(3)
        angle = sign * 2 * math.pi * k * c / p + 0.3
        xy = torch.stack([angle.cos(), angle.sin()], 1) * 2 + torch.tensor([5.0, -1.0])
        r, found = angle_agreement(xy, c, p)
        assert r == pytest.approx(1.0) and found == k
    scrambled = torch.randn(3 * p, 2, generator=torch.Generator().manual_seed(0))
    assert angle_agreement(scrambled, torch.arange(p).repeat(3), p)[0] < 0.9


# --- layouts over checkpoints --------------------------------------------------------------------------------------
def _drifting_states(t=4, n=120, d=16, seed=0):
    """States that change a little from one checkpoint to the next, turned by a random rotation each time (which
    a layout must not show as movement)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(3, 0.3, d)
    out = []
    for _ in range(t):
        x = x + 0.05 * torch.randn(n, d, generator=g)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        out.append(x @ q)
    return out


def _identity_kept(layouts) -> float:
    """Share of samples whose nearest point at the next checkpoint is themselves."""
    hits = []
    for a, b in zip(layouts, layouts[1:]):
        hits.append((torch.cdist(a, b).argmin(1) == torch.arange(a.shape[0])).double().mean())
    return float(torch.stack(hits).mean())


def test_aligned_pca_keeps_sample_identity_across_checkpoints():
    states = _drifting_states()
    layouts = aligned_pca(states)
    assert len(layouts) == 4 and all(y.shape == (120, 2) for y in layouts)
    assert all(float(y.square().sum(1).mean()) == pytest.approx(1.0) for y in layouts)
    assert _identity_kept(layouts) > 0.6
    # without the alignment, the principal axes' signs and the rotations scatter the samples
    moved = [torch.linalg.svd(s - s.mean(0), full_matrices=False)[0][:, :2] for s in states]
    aligned_shift = sum(float((a - b).norm(dim=1).mean()) for a, b in zip(layouts, layouts[1:]))
    assert aligned_shift < 0.3 * len(layouts)
    # a sample's coordinates follow it when the samples are given in another order at every checkpoint
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(5))
    permuted = aligned_pca([s[perm] for s in states])
    torch.testing.assert_close(permuted[-1], layouts[-1][perm], rtol=1e-6, atol=1e-8)
    assert moved  # (the unaligned layouts exist; their signs are arbitrary)
    with pytest.raises(InputError, match="same samples"):
        aligned_pca([states[0], states[1][:50]])
    # the chain only turns: distances within each layout are kept
    g = torch.Generator().manual_seed(2)
    raw = [torch.randn(30, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    chained = align_chain(raw)
    torch.testing.assert_close(torch.cdist(chained[1], chained[1]), torch.cdist(raw[1], raw[1]), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_aligned_umap_keeps_sample_identity_across_checkpoints():
    states = _drifting_states(t=3, n=150)
    layouts = aligned_umap(states, n_neighbors=10, seed=0, n_epochs=60)  # fewer epochs than default: lean
    assert len(layouts) == 3 and all(y.shape == (150, 2) for y in layouts)
    # a sample stays near where it was: its shift is small against the spread of the layout
    shift = torch.stack([(a - b).norm(dim=1) for a, b in zip(layouts, layouts[1:])]).mean()
    spread = torch.cdist(layouts[0], layouts[0]).mean()
    assert float(shift) < 0.25 * float(spread)
    assert len(aligned_umap(states[:1], n_neighbors=10, n_epochs=10)) == 1


def test_umap_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap now raises ImportError
    with pytest.raises(DependencyError, match=r"\[umap\]"):
        aligned_umap(_drifting_states(t=2, n=20))


# --- the measurement -------------------------------------------------------------------------------------------
def test_measurement_on_a_run(tiny_run):
    from workbench import measure

    steps = tiny_run.steps
    m = Representations(k=5, embed_steps=(steps[0], steps[-1]))
    settled = m.settle(tiny_run)
    assert settled.layers == (0, 1, 2, 3) and settled.embed_layers == (0, 1, 2, 3) and settled.period == 11
    assert Representations(method="umap").settle(tiny_run).embed_layers == (3,)
    store = measure(tiny_run, [m], progress=False, overwrite=True)
    t = Representations.table(store)
    n = len(tiny_run.samples)
    per_sample = t.filter(pl.col("sample_id").is_not_null() & (pl.col("metric") == "purity"))
    assert per_sample.height == n * 4 * len(steps)
    assert per_sample["value"].is_between(0, 1).all()
    # group means are the means of the per-sample values
    last = per_sample.filter((pl.col("step") == steps[-1]) & (pl.col("layer") == 3))
    mean = t.filter((pl.col("step") == steps[-1]) & (pl.col("layer") == 3) & (pl.col("metric") == "purity")
                    & (pl.col("group") == "test") & pl.col("sample_id").is_null())["value"][0]
    assert mean == pytest.approx(last.filter(pl.col("group") == "test")["value"].mean())
    spectrum = t.filter((pl.col("metric") == "fourier_power") & (pl.col("step") == steps[-1]) & (pl.col("layer") == 3)
                        & (pl.col("group") == "all"))
    assert sorted(spectrum["frequency"].to_list()) == [1, 2, 3, 4, 5]
    assert spectrum["value"].sum() == pytest.approx(1.0)
    eff = t.filter((pl.col("metric") == "fourier_frequencies") & (pl.col("step") == steps[-1]) & (pl.col("layer") == 3)
                   & (pl.col("group") == "all"))["value"][0]
    assert eff == pytest.approx(1 / spectrum["value"].pow(2).sum())
    final = Representations.table(store, final=True)
    emb = final.filter(pl.col("metric") == "embedding")
    assert emb.height == 2 * 4 * n and set(emb["step"].to_list()) == {steps[0], steps[-1]}
    assert set(emb.columns) >= {"x", "y", "label", "correct", "text", "group"}
    assert emb.filter(pl.col("sample_id") == "3+4")["label"].to_list() == [7] * 8  # (3 + 4) mod 11
    assert final.filter(pl.col("metric") == "correlation").height > 0
    # every block laid out at the embedded steps, from principal coordinates stored per checkpoint
    pca = t.filter(pl.col("metric") == "pca")
    assert pca.height == 2 * 4 * n and sorted(pca["step"].unique().to_list()) == [steps[0], steps[-1]]
    assert sorted(emb["layer"].unique().to_list()) == [0, 1, 2, 3]
    with pytest.raises(InputError, match="embed_layers"):
        Representations(layers=(0,), embed_layers=(2,)).settle(tiny_run)
    with pytest.raises(InputError, match="method"):
        Representations(method="tsne")


def test_section_and_view(tiny_run):
    from workbench import measure

    store = measure(tiny_run, [Representations(k=5, max_embedded=3)], progress=False, overwrite=True)
    sec = Representations.section(store)
    assert sec is not None and sec.title == "Representations"
    figs = [i for i in sec.items if not isinstance(i, str)]
    assert any(len(f.frames) == 3 for f in figs)  # the layout, one frame per embedded checkpoint
    import widgets

    view = widgets.view(store, "representations")
    view.set_step(tiny_run.steps[1])
    view.color_picker.value = "correct"
    colors = view.figures["layout"].data[0].marker.color
    assert set(colors) <= {"#2ca02c", "#d62728"}
    view.color_picker.value = "group"
    assert view.figures["layout"].layout.title.text.endswith("coloured by group")
