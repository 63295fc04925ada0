"""Batched all-layer linear probes: agreement with scikit-learn, batching equivalence, control tasks, bad input."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from workbench.errors import InputError
from workbench.probes.linear import ControlTask, fit_probes


def _data(layers=3, n=400, dim=12, classes=2, noise=0.0, seed=0):
    """Features whose class signal grows with the layer; anisotropic, offset features (standardization matters)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    means = torch.randn(classes, dim, generator=g) * 2
    x = torch.empty(layers, n, dim)
    for layer in range(layers):
        scale = torch.exp(torch.randn(dim, generator=g))
        x[layer] = ((0.3 + layer) * means[y] + (1 + noise) * torch.randn(n, dim, generator=g)) * scale + 5
    return x, y


def _sklearn(x, y, l2):
    n = x.shape[0]
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0 / (l2 * n), tol=1e-10, max_iter=10000)).fit(x, y)


@pytest.mark.parametrize("classes,noise", [(2, 0.0), (2, 2.0), (4, 1.0)])
def test_same_optimum_as_sklearn(classes, noise):
    x, y = _data(classes=classes, noise=noise)
    l2 = 1e-2
    probes = fit_probes(x, y, l2=l2, val_fraction=0, tol=1e-6, max_epochs=2000)
    assert bool(probes.converged.all())
    proba = probes.predict_proba(x)
    for layer in range(x.shape[0]):
        sk = _sklearn(x[layer].numpy(), y.numpy(), l2)
        np.testing.assert_allclose(proba[layer].numpy(), sk.predict_proba(x[layer].numpy()), atol=2e-3)
        coef = sk[-1].coef_.T  # [dim, 1] for two classes, [dim, C] for more: the same layout as ours
        np.testing.assert_allclose(probes.weight[layer].numpy(), coef, atol=5e-3, rtol=1e-2)
        assert (probes.predict(x)[layer].numpy() == sk.predict(x[layer].numpy())).mean() >= 0.995


def test_without_standardization_matches_plain_logistic_regression():
    x, y = _data(layers=2, noise=1.0, seed=3)
    x = (x - 5) / 3  # moderate scales so the unstandardized problem is well conditioned
    l2 = 1e-2
    probes = fit_probes(x, y, l2=l2, val_fraction=0, tol=1e-6, max_epochs=2000, standardize=False)
    for layer in range(2):
        sk = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10000).fit(x[layer].numpy(), y.numpy())
        np.testing.assert_allclose(probes.weight[layer, :, 0].numpy(), sk.coef_[0], atol=2e-3, rtol=1e-2)
        np.testing.assert_allclose(float(probes.bias[layer, 0]), sk.intercept_[0], atol=2e-3)


def test_held_out_accuracy_matches_sklearn_on_noisy_data():
    x, y = _data(layers=4, n=1200, dim=30, classes=3, noise=3.0, seed=1)
    xtr, ytr, xte, yte = x[:, :900], y[:900], x[:, 900:], y[900:]
    probes = fit_probes(xtr, ytr, l2=1e-2, val_fraction=0, tol=1e-6, max_epochs=2000)
    ours = probes.accuracy(xte, yte)
    assert ours.shape == (4,)
    for layer in range(4):
        sk = _sklearn(xtr[layer].numpy(), ytr.numpy(), 1e-2)
        assert abs(float(ours[layer]) - sk.score(xte[layer].numpy(), yte.numpy())) <= 0.005
    assert 0.4 < float(ours[0]) < float(ours[-1])  # the signal grows with depth


def test_batching_layers_does_not_change_any_layer():
    x, y = _data(layers=4, n=300, dim=10, noise=1.5, seed=2)
    for kw in (dict(val_fraction=0, tol=1e-6, max_epochs=2000), dict(val_fraction=0.2, patience=5)):
        together = fit_probes(x, y, l2=1e-2, **kw)
        for layer in range(4):
            alone = fit_probes(x[layer:layer + 1], y, l2=1e-2, **kw)
            assert int(alone.epochs[0]) == int(together.epochs[layer])
            torch.testing.assert_close(alone.weight[0], together.weight[layer], atol=1e-4, rtol=1e-3)


def test_cpu_layer_groups_change_no_layer(monkeypatch):
    # On a CPU the layers are fitted in cache-sized groups: a budget of one layer's features gives groups of
    # one, two layers' gives groups of 2, 2 and 1; every layer comes out as when all are fitted together.
    import workbench.probes.linear.functions as linear

    x, y = _data(layers=5, n=300, dim=10, noise=1.5, seed=3)
    layer_bytes = x[0].numel() * x.element_size()
    kw = dict(l2=1e-2, val_fraction=0.2, patience=5)
    together = fit_probes(x, y, **kw)
    for layers_per_group, n_groups in ((1, 5), (2, 3)):
        monkeypatch.setattr(linear, "_CPU_GROUP_BYTES", layers_per_group * layer_bytes)
        assert len(linear._layer_groups(x)) == n_groups
        grouped = fit_probes(x, y, **kw)
        assert torch.equal(grouped.epochs, together.epochs)
        torch.testing.assert_close(grouped.weight, together.weight, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(grouped.mean, together.mean)


def test_early_stopping_stops_before_overfitting():
    # 30% of the training labels flipped, 100 dims of which 5 carry signal, no penalty to speak of: the full fit
    # learns the noise, the early-stopped one does not.
    g = torch.Generator().manual_seed(0)

    def make(m):
        y = torch.randint(0, 2, (m,), generator=g)
        x = torch.randn(1, m, 100, generator=g)
        x[0, :, :5] += 0.6 * (2 * y - 1)[:, None]
        return x, y

    x, y = make(300)
    test_x, test_y = make(3000)
    noisy = torch.where(torch.rand(300, generator=g) < 0.3, 1 - y, y)
    stopped = fit_probes(x, noisy, l2=1e-6, val_fraction=0.25, patience=5)
    full = fit_probes(x, noisy, l2=1e-6, val_fraction=0, max_epochs=2000)
    assert int(stopped.epochs[0]) < int(full.epochs[0])
    assert float(stopped.accuracy(test_x, test_y)[0]) > float(full.accuracy(test_x, test_y)[0]) + 0.03
    # The weights kept are those of the iteration early stopping names: a run cut off there ends on them.
    cut = fit_probes(x, noisy, l2=1e-6, val_fraction=0.25, patience=10**6, max_epochs=int(stopped.epochs[0]))
    torch.testing.assert_close(cut.weight, stopped.weight)


def test_shapes_and_one_layer_input():
    x, y = _data(layers=2, n=100, dim=5)
    probes = fit_probes(x[0], y)  # [samples, dim] is one layer
    assert probes.predict(x[0]).shape == (1, 100)
    assert probes.predict_proba(x[0]).shape == (1, 100, 2)
    assert probes.accuracy(x[0], y).shape == (1,)
    with pytest.raises(InputError, match="fitted on 1 layers"):
        probes.predict(x)


def test_control_task_labels_depend_only_on_type():
    task = ControlTask((0.25, 0.75), seed=3)
    a = task.labels([5, 7, 5, 9, 7])
    assert a[0] == a[2] and a[1] == a[4]
    assert torch.equal(task.labels([9, 5]), torch.stack([a[3], a[0]]))  # same type, same label, any split
    many = task.labels(range(20000)).float().mean()
    assert abs(float(many) - 0.75) < 0.015  # drawn from the given distribution
    one, two = ControlTask((0.5, 0.5), seed=1), ControlTask((0.5, 0.5), seed=2)
    assert not torch.equal(one.labels(range(50)), two.labels(range(50)))  # the seed picks another control task
    like = ControlTask.like(torch.tensor([0, 0, 0, 1]))
    assert like.class_probs == (0.75, 0.25)


def test_selectivity_separates_reading_from_memorizing():
    g = torch.Generator().manual_seed(0)
    n, n_types = 2000, 40
    types = torch.randint(0, n_types, (n,), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    onehot = torch.nn.functional.one_hot(types, n_types).float()
    signal = (2 * y - 1)[:, None].float()
    # layer 0: the type's identity and a weak task signal (a probe can memorize types: low selectivity);
    # layer 1: only the task signal (nothing to memorize: high selectivity).
    l0 = torch.cat([onehot * 3, 0.5 * signal + torch.randn(n, 1, generator=g)], 1)
    l1 = torch.cat([torch.randn(n, n_types, generator=g), 2 * signal + torch.randn(n, 1, generator=g)], 1)
    x = torch.stack([l0, l1])
    probes = fit_probes(x[:, :1500], y[:1500], types=types[:1500])
    sel = probes.selectivity(x[:, 1500:], y[1500:], types[1500:])
    ctrl = probes.control_accuracy(x[:, 1500:], types[1500:])
    assert float(ctrl[0]) > 0.95  # the control task is memorizable from layer 0
    assert float(ctrl[1]) < 0.65  # ... and not from layer 1
    assert float(sel[1]) > float(sel[0]) + 0.3


def test_bad_input_raises_clear_errors():
    x, y = _data(layers=2, n=50, dim=4)
    with pytest.raises(InputError, match="must lie in 0..1"):
        fit_probes(x, torch.where(y == 0, -1, 1))
    with pytest.raises(InputError, match="must lie in 0..2"):
        fit_probes(x, y * 3, n_classes=3)
    bad = x.clone()
    bad[1, 7, 2] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        fit_probes(bad, y)
    with pytest.raises(InputError, match="50 samples of features but 49 labels"):
        fit_probes(x, y[:49])
    with pytest.raises(InputError, match="two classes"):
        fit_probes(x, torch.zeros_like(y))
    with pytest.raises(InputError, match="integer class indices"):
        fit_probes(x, y.float() + 0.5)
    with pytest.raises(InputError, match="types"):
        fit_probes(x, y, types=list(range(10)))
    with pytest.raises(InputError, match="val_fraction"):
        fit_probes(x, y, val_fraction=1.0)
    with pytest.raises(InputError, match="shape"):
        fit_probes(torch.zeros(2, 3, 4, 5), y)
    probes = fit_probes(x, y)
    with pytest.raises(InputError, match="no control task"):
        probes.control_accuracy(x, list(range(50)))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    x, y = _data(layers=3, n=500, dim=16, noise=1.0)
    cpu = fit_probes(x, y, val_fraction=0, tol=1e-6, max_epochs=2000)
    gpu = fit_probes(x.cuda(), y.cuda(), val_fraction=0, tol=1e-6, max_epochs=2000)
    assert gpu.weight.is_cuda and gpu.predict(x.cuda()).is_cuda
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("n", [300, 900])
def test_low_rank_preconditioner_reaches_sklearns_optimum_at_d_768(n):
    # At d = 768 the fit to the optimum is preconditioned by a rank-48 sketch of the feature covariance plus a
    # diagonal for the rest (below 48 dims the sketch is the whole covariance), with fewer samples than dims
    # (300) and more (900). Hidden-state-like features: a strong rank-16 part shared by all dims, so the
    # sketch matters: without it (the identity) these fits take 50-57 iterations, with it 15-19.
    import workbench.probes.linear.functions as linear

    g = torch.Generator().manual_seed(5)
    z = torch.randn(n, 16, generator=g)
    y = (z[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
    mix = torch.randn(2, 16, 768, generator=g) * 3 / 4
    x = torch.stack([z @ mix[layer] + torch.randn(n, 768, generator=g) for layer in range(2)])
    x = x * torch.exp(torch.randn(768, generator=g)) + 5
    assert linear._SKETCH_RANK < x.shape[2]
    l2 = 1e-2
    probes = fit_probes(x, y, l2=l2, val_fraction=0, tol=1e-6, max_epochs=2000)
    assert bool(probes.converged.all())
    assert int(probes.epochs.max()) <= 30
    for layer in range(2):
        sk = make_pipeline(StandardScaler(), LogisticRegression(C=1.0 / (l2 * n), tol=1e-8, max_iter=10000))
        with threadpool_limits(1):  # small problems: BLAS threads only add waiting
            sk.fit(x[layer].numpy(), y.numpy())
        ours = _objective(x[layer], y, probes.weight[layer, :, 0], probes.bias[layer, 0], probes.mean[layer],
                          probes.scale[layer], l2)
        theirs = _objective(x[layer], y, sk[-1].coef_[0], sk[-1].intercept_[0], sk[0].mean_, sk[0].scale_, l2)
        # float32 stops where the loss no longer falls beyond round-off: within 1e-5 of the optimum's value
        assert ours[0] - theirs[0] <= 1e-5 * theirs[0] and ours[1] <= 1e-4
        agree = (probes.predict(x)[layer].numpy() == sk.predict(x[layer].numpy())).mean()
        assert agree >= 0.99


def _objective(x, y, w, b, mean, scale, l2):
    """Mean cross-entropy + l2/2 ||w||² on standardized features and its largest gradient entry, in float64."""
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    w, b = torch.as_tensor(w).double(), torch.as_tensor(b).double()
    xs = (x - torch.as_tensor(mean).double()) / torch.as_tensor(scale).double()
    z = xs @ w + b
    f = (torch.nn.functional.softplus(z) - y * z).mean() + 0.5 * l2 * (w @ w)
    r = (torch.sigmoid(z) - y) / len(y)
    return float(f), float(torch.cat([xs.T @ r + l2 * w, r.sum()[None]]).abs().max())
