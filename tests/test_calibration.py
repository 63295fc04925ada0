"""Calibration and discrimination metrics: hand-worked cases (bin edges included), agreement with
scikit-learn on random cases with ties, batching, bad input, and temperature scaling."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from workbench.errors import InputError
from workbench.probes.calibration import (
    UndefinedMetricWarning,
    apply_temperature,
    auprc,
    auroc,
    bin_indices,
    bootstrap_ci,
    brier,
    ece,
    fit_temperature,
    mce,
    nll,
    pairwise_accuracy,
    pairwise_choice,
    reliability,
)

# A small case worked by hand (see each test for the arithmetic).
CONF = [0.2, 0.3, 0.8, 0.9, 1.0]
RIGHT = [0, 1, 1, 0, 1]


# --- bins ------------------------------------------------------------------------------------------------------
def test_uniform_bins_are_closed_left_open_right_with_one_in_the_last_bin():
    conf = torch.tensor([0.0, 0.1, 0.15, 0.2, 0.3, 0.7, 0.95, 0.99999, 1.0], dtype=torch.float64)
    assert bin_indices(conf, 10).tolist() == [0, 1, 1, 2, 3, 7, 9, 9, 9]
    # Edges in float32 too: 0.25 opens bin 1 of 4, a hair below stays in bin 0, 1.0 joins bin 3.
    conf32 = torch.tensor([0.25, 0.2499, 0.5, 0.75, 1.0, 0.0], dtype=torch.float32)
    assert bin_indices(conf32, 4).tolist() == [1, 0, 2, 3, 3, 0]
    assert bin_indices(conf, 1).tolist() == [0] * 9


def test_uniform_bins_match_bucketize_at_and_around_every_edge():
    for dtype in (torch.float32, torch.float64):
        for m in range(1, 41):
            edges = torch.arange(m + 1, dtype=dtype) / m
            near = torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0, dtype=dtype)),
                              torch.nextafter(edges, torch.tensor(-1.0, dtype=dtype))]).clamp(0, 1)
            want = torch.bucketize(near, edges[1:-1], right=True)
            assert torch.equal(bin_indices(near, m), want), (dtype, m)


def test_quantile_bins_split_the_stable_sorted_answers_into_near_equal_parts():
    conf = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3, 0.7, 0.5])
    # sorted: .1(1) .3(4) .5(2) .5(3) .5(6) .7(5) .9(0); 7 = 3 + 2 + 2; tied .5s keep their input order
    assert bin_indices(conf, 3, "quantile").tolist() == [2, 0, 0, 1, 0, 2, 1]
    # fewer answers than bins: one answer per bin, the rest empty
    assert bin_indices(torch.tensor([0.8, 0.2]), 5, "quantile").tolist() == [1, 0]
    counts = torch.bincount(bin_indices(torch.rand(103), 10, "quantile"), minlength=10)
    assert counts.tolist() == [11, 11, 11] + [10] * 7


# --- calibration, by hand ------------------------------------------------------------------------------------------
def test_ece_mce_brier_nll_on_a_hand_worked_case():
    # 2 uniform bins: [0, .5) holds .2 (wrong) and .3 (right): conf .25, acc .5, weight 2/5 -> 0.1
    #                 [.5, 1] holds .8, .9, 1.0 (right, wrong, right): conf .9, acc 2/3, weight 3/5 -> 0.14
    assert float(ece(CONF, RIGHT, n_bins=2)) == pytest.approx(0.24, abs=1e-12)
    assert float(mce(CONF, RIGHT, n_bins=2)) == pytest.approx(0.25, abs=1e-12)  # max(.25, .9 - 2/3)
    assert float(brier(CONF, RIGHT)) == pytest.approx((0.04 + 0.49 + 0.04 + 0.81 + 0) / 5, abs=1e-12)
    expect = -(math.log(0.8) + math.log(0.3) + math.log(0.8) + math.log(0.1) + math.log(1 - 1e-12)) / 5
    assert float(nll(CONF, RIGHT)) == pytest.approx(expect, abs=1e-12)


def test_ece_with_quantile_bins_by_hand():
    conf = [0.9, 0.1, 0.5, 0.5, 0.3, 0.7, 0.5]
    right = [1, 0, 1, 0, 0, 1, 1]
    # bins {.1 w, .3 w, .5 r} gap |1 - .9| = .1; {.5 w, .5 r} gap 0; {.7 r, .9 r} gap |2 - 1.6| = .4
    assert float(ece(conf, right, 3, "quantile")) == pytest.approx(0.5 / 7, abs=1e-12)
    assert float(mce(conf, right, 3, "quantile")) == pytest.approx(0.2, abs=1e-12)


def test_perfectly_calibrated_bins_have_zero_ece_and_a_confident_mistake_costs_all():
    conf = [0.25] * 4 + [0.75] * 4
    right = [1, 0, 0, 0, 1, 1, 1, 0]
    assert float(ece(conf, right)) == pytest.approx(0.0, abs=1e-12)
    assert float(ece([1.0, 1.0], [0, 0])) == 1.0
    assert float(mce([1.0, 0.0], [0, 0])) == 1.0  # the empty bins in between do not count


def test_reliability_table_by_hand():
    t = reliability(CONF, RIGHT, n_bins=2)
    assert t.columns == ["bin", "lower", "upper", "count", "confidence", "accuracy", "gap"]
    assert t["count"].to_list() == [2, 3]
    assert t["lower"].to_list() == [0.0, 0.5] and t["upper"].to_list() == [0.5, 1.0]
    assert t["confidence"].to_list() == pytest.approx([0.25, 0.9])
    assert t["accuracy"].to_list() == pytest.approx([0.5, 2 / 3])
    assert t["gap"].to_list() == pytest.approx([0.25, 2 / 3 - 0.9])
    t10 = reliability(CONF, RIGHT)
    assert t10["count"].to_list() == [0, 0, 1, 1, 0, 0, 0, 0, 1, 2]
    assert t10["accuracy"].to_list()[:2] == [None, None]  # empty bins: no mean
    q = reliability([0.9, 0.1, 0.5, 0.5, 0.3, 0.7, 0.5], [1, 0, 1, 0, 0, 1, 1], 3, "quantile")
    assert q["lower"].to_list() == [0.1, 0.5, 0.7] and q["upper"].to_list() == [0.5, 0.5, 0.9]
    assert q["count"].to_list() == [3, 2, 2]
    # the weighted gaps of the table are the ECE
    assert float((t["gap"].abs() * t["count"]).sum() / 5) == pytest.approx(float(ece(CONF, RIGHT, 2)))


# --- discrimination, by hand -------------------------------------------------------------------------------------
def test_auroc_and_auprc_by_hand():
    # right {.3, .8, 1.0} vs wrong {.2, .9}: 4 of 6 pairs ordered right
    assert float(auroc(CONF, RIGHT)) == pytest.approx(4 / 6, abs=1e-12)
    # descending: 1.0 r (P 1, R 1/3), .9 w, .8 r (P 2/3, R 2/3), .3 r (P 3/4, R 1), .2 w
    assert float(auprc(CONF, RIGHT)) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3, abs=1e-12)


def test_ties_count_one_half():
    conf, right = [0.5, 0.5, 0.5, 0.9], [1, 0, 0, 1]
    # right {.5, .9} vs wrong {.5, .5}: .5 ties twice (1/2 each), .9 wins twice -> 3 / 4
    assert float(auroc(conf, right)) == pytest.approx(0.75, abs=1e-12)
    # thresholds .9 (P 1, R .5) and .5 as one block (P .5, R 1)
    assert float(auprc(conf, right)) == pytest.approx(0.5 * 1 + 0.5 * 0.5, abs=1e-12)
    assert float(auroc([0.7] * 4, [1, 0, 1, 0])) == 0.5


def test_pairwise_accuracy_by_hand():
    choice = [0, 1, 0.5, 0, 1, 0.5]
    a = [1, 1, 1, 0, 0, 0]
    b = [0, 0, 1, 1, 0, 1]
    # pairs with exactly one right: 0 (chose a, right: 1), 1 (chose b, wrong: 0), 3 (chose a, wrong: 0),
    # 5 (no preference: 1/2); pairs 2 (both right) and 4 (both wrong) do not count
    assert float(pairwise_accuracy(choice, a, b)) == pytest.approx(1.5 / 4)
    assert pairwise_choice([0.9, 0.1, 0.4], [0.1, 0.9, 0.4]).tolist() == [0.0, 1.0, 0.5]


def test_pairwise_accuracy_over_all_pairs_is_the_auroc():
    g = torch.Generator().manual_seed(1)
    conf = (torch.randint(0, 8, (40,), generator=g) / 7).double()
    right = (torch.rand(40, generator=g) < conf).double()
    i, j = torch.triu_indices(40, 40, offset=1)
    pa = pairwise_accuracy(pairwise_choice(conf[i], conf[j]), right[i], right[j])
    assert float(pa) == pytest.approx(float(auroc(conf, right)), abs=1e-12)


# --- against scikit-learn ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_scikit_learn_on_random_cases_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n = 200 + 50 * seed
    conf = (torch.randint(0, 11, (n,), generator=g) / 10).double()  # only 11 values: many ties
    right = (torch.rand(n, generator=g) < 0.2 + 0.6 * conf).double()
    y, s = right.numpy(), conf.numpy()
    assert float(auroc(conf, right)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert float(auprc(conf, right)) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert float(brier(conf, right)) == pytest.approx(brier_score_loss(y, s), abs=1e-12)
    soft = conf.clamp(0.01, 0.99)
    assert float(nll(soft, right)) == pytest.approx(log_loss(y, soft.numpy(), labels=[0, 1]), abs=1e-12)


def test_batched_metrics_equal_one_at_a_time():
    g = torch.Generator().manual_seed(2)
    conf = torch.rand(4, 3, 57, generator=g).double()
    right = (torch.rand(4, 3, 57, generator=g) < conf).double()
    for metric, kw in ((ece, {}), (ece, {"binning": "quantile", "n_bins": 7}), (mce, {}), (brier, {}), (nll, {}),
                       (auroc, {}), (auprc, {})):
        batched = metric(conf, right, **kw)
        assert batched.shape == (4, 3)
        loop = torch.stack([torch.stack([metric(conf[i, j], right[i, j], **kw) for j in range(3)]) for i in range(4)])
        torch.testing.assert_close(batched, loop, rtol=0, atol=1e-12)
    # one set of correctness bits shared by a batch of confidences (e.g. temperatures of one checkpoint)
    torch.testing.assert_close(ece(conf[0], right[0, 0]), torch.stack([ece(c, right[0, 0]) for c in conf[0]]))


def test_order_of_answers_does_not_change_the_scores():
    g = torch.Generator().manual_seed(3)
    conf = (torch.randint(0, 5, (80,), generator=g) / 4).double()
    right = (torch.rand(80, generator=g) < conf).double()
    perm = torch.randperm(80, generator=g)
    for metric in (ece, mce, brier, nll, auroc, auprc):
        assert float(metric(conf[perm], right[perm])) == pytest.approx(float(metric(conf, right)), abs=1e-12)


@pytest.mark.gpu
def test_metrics_on_cuda_match_cpu():
    conf = torch.rand(3, 500, dtype=torch.float64)
    right = (torch.rand(3, 500, dtype=torch.float64) < conf).double()
    for metric in (ece, mce, brier, nll, auroc, auprc):
        torch.testing.assert_close(metric(conf.cuda(), right.cuda()).cpu(), metric(conf, right))
    ci_cpu = bootstrap_ci(auroc, conf[0], right[0], n=300)
    ci_gpu = bootstrap_ci(auroc, conf[0].cuda(), right[0].cuda(), n=300)
    torch.testing.assert_close(ci_gpu.low.cpu(), ci_cpu.low)


# --- bootstrap ---------------------------------------------------------------------------------------------------
def test_bootstrap_is_the_percentile_interval_of_seeded_resamples():
    g = torch.Generator().manual_seed(4)
    conf = torch.rand(60, generator=g).double()
    right = (torch.rand(60, generator=g) < conf).double()
    ci = bootstrap_ci("auroc", conf, right, n=50, level=0.9, seed=7)
    idx = torch.randint(60, (50, 60), generator=torch.Generator().manual_seed(7))
    values = np.array([float(auroc(conf[i], right[i])) for i in idx])
    assert float(ci.estimate) == pytest.approx(float(auroc(conf, right)))
    assert float(ci.low) == pytest.approx(np.quantile(values, 0.05), abs=1e-12)
    assert float(ci.high) == pytest.approx(np.quantile(values, 0.95), abs=1e-12)
    again = bootstrap_ci(auroc, conf, right, n=50, level=0.9, seed=7)
    assert float(again.low) == float(ci.low)


def test_bootstrap_passes_options_batches_and_narrows_with_more_answers():
    g = torch.Generator().manual_seed(5)
    conf = torch.rand(2, 4000, generator=g).double()
    right = (torch.rand(2, 4000, generator=g) < conf).double()
    small = bootstrap_ci(ece, conf[:, :100], right[:, :100], n=200, n_bins=5)
    big = bootstrap_ci(ece, conf, right, n=200, n_bins=5)
    assert small.low.shape == (2,)
    torch.testing.assert_close(big.estimate, ece(conf, right, n_bins=5))
    assert bool(((big.high - big.low) < (small.high - small.low)).all())
    assert bool((big.low <= big.high).all())


# --- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", [ece, mce, brier, nll, auroc, auprc, reliability])
def test_bad_input_raises_clear_errors(metric):
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        metric([0.5, 1.2], [1, 0])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        metric([0.5, -0.1], [1, 0])
    with pytest.raises(InputError, match="NaN"):
        metric([0.5, float("nan")], [1, 0])
    with pytest.raises(InputError, match="NaN"):
        metric([0.5, 0.5], [1, float("nan")])
    with pytest.raises(InputError, match="lengths must match"):
        metric([0.5, 0.5, 0.5], [1, 0])
    with pytest.raises(InputError, match="empty"):
        metric([], [])
    with pytest.raises(InputError, match="single numbers"):
        metric(0.5, 1)
    with pytest.raises(InputError, match="sequence of numbers"):
        metric(["a", "b"], [1, 0])


def test_ranking_metrics_need_bits_and_bins_need_valid_options():
    with pytest.raises(InputError, match="0 or 1"):
        auroc([0.2, 0.8], [0.5, 1])
    assert float(brier([0.5], [0.5])) == 0.0  # fractional correctness is fine for calibration scores
    with pytest.raises(InputError, match="n_bins"):
        ece([0.5], [1], n_bins=0)
    with pytest.raises(InputError, match="binning"):
        ece([0.5], [1], binning="equal")
    with pytest.raises(InputError, match="broadcast"):
        ece(torch.rand(2, 5), torch.ones(3, 5))
    with pytest.raises(InputError, match="1-D"):
        reliability(torch.rand(2, 5), torch.ones(2, 5))
    with pytest.raises(InputError, match="unknown metric"):
        bootstrap_ci("accuracy", [0.5], [1])
    with pytest.raises(InputError, match="level"):
        bootstrap_ci("ece", [0.5], [1], level=95)
    with pytest.raises(InputError, match="same shape"):
        pairwise_accuracy([0, 1], [1, 0], [0])
    with pytest.raises(InputError, match="0 or 1"):
        pairwise_accuracy([0], [0.5], [1])


def test_all_right_or_all_wrong_gives_nan_with_a_warning_and_nothing_crashes():
    for bits in ([1, 1, 1], [0, 0, 0]):
        with pytest.warns(UndefinedMetricWarning, match="AUROC is undefined"):
            assert math.isnan(float(auroc([0.2, 0.5, 0.9], bits)))
        assert float(ece([0.2, 0.5, 0.9], bits)) >= 0  # calibration stays defined
        with pytest.warns(UndefinedMetricWarning):  # once, for the estimate; not once per resample
            ci = bootstrap_ci(auroc, [0.2, 0.5, 0.9], bits, n=20)
        assert math.isnan(float(ci.low))
    assert float(auprc([0.2, 0.5], [1, 1])) == 1.0
    with pytest.warns(UndefinedMetricWarning, match="AUPRC"):
        assert math.isnan(float(auprc([0.2, 0.5], [0, 0])))
    with pytest.warns(UndefinedMetricWarning, match="1 of 2 batch entries"):
        both = auroc(torch.tensor([[0.2, 0.9], [0.2, 0.9]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert float(both[0]) == 1.0 and math.isnan(float(both[1]))
    with pytest.warns(UndefinedMetricWarning, match="no pair"):
        assert math.isnan(float(pairwise_accuracy([0, 1], [1, 0], [1, 0])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auroc([0.2, 0.9], [0, 1])  # a defined case warns nothing


# --- temperature scaling ----------------------------------------------------------------------------------------------
def _overconfident(n=3000, k=5, sharpen=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k, generator=g).double()
    labels = torch.distributions.Categorical(logits=base).sample()  # calibrated at temperature 1 ...
    return base * sharpen, labels, base  # ... and over-confident after sharpening by 4


def _max_prob_ece(logits, labels):
    p = torch.softmax(logits, -1)
    conf, pred = p.max(-1)
    return float(ece(conf, (pred == labels).double()))


def test_temperature_scaling_lowers_ece_on_an_overconfident_case_and_returns_new_logits():
    logits, labels, _ = _overconfident()
    t = fit_temperature(logits, labels)
    assert float(t) == pytest.approx(4.0, rel=0.1)  # it undoes the sharpening
    out = apply_temperature(logits, t)
    assert out is not logits
    assert not torch.equal(out, logits)  # the fit moved, so the output must differ (netcal once returned its input)
    torch.testing.assert_close(out * t, logits)
    before, after = _max_prob_ece(logits, labels), _max_prob_ece(out, labels)
    assert before > 0.2 and after < 0.05 and after < before / 4


def test_fitted_temperature_is_the_nll_minimum_found_by_scipy():
    logits, labels, _ = _overconfident(n=500, k=7, sharpen=2.5, seed=1)

    def nll_at(log_t):
        return torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels).item()

    best = minimize_scalar(nll_at, bounds=(-4, 4), method="bounded", options={"xatol": 1e-10})
    assert float(fit_temperature(logits, labels)) == pytest.approx(math.exp(best.x), rel=1e-6)


def test_temperature_fits_batch_over_checkpoints_and_stays_in_bounds():
    logits, labels, base = _overconfident(n=800, seed=2)
    batch = torch.stack([logits, base, base / 3])
    t = fit_temperature(batch, labels.expand(3, -1))
    assert t.shape == (3,)
    for i in range(3):
        assert float(t[i]) == pytest.approx(float(fit_temperature(batch[i], labels)), rel=1e-8)
    assert float(t[1]) == pytest.approx(1.0, abs=0.15)  # already calibrated: t near 1
    assert apply_temperature(batch, t).shape == batch.shape
    # separable data wants t -> 0 and anti-correlated data t -> inf: the bounds hold
    z = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    assert float(fit_temperature(z, torch.tensor([0, 1]), t_min=0.05)) == pytest.approx(0.05)
    assert float(fit_temperature(z, torch.tensor([1, 0]), t_max=50.0)) == pytest.approx(50.0)


def test_temperature_bad_input():
    with pytest.raises(InputError, match="NaN"):
        fit_temperature(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(InputError, match="shape"):
        fit_temperature(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match="integer"):
        fit_temperature(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(InputError, match="0 .. 1"):
        fit_temperature(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="positive"):
        apply_temperature(torch.zeros(3, 2), 0.0)
    with pytest.raises(InputError, match="batch of temperatures"):
        apply_temperature(torch.zeros(3, 2), torch.ones(2))
