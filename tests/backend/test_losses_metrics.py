"""Losses and metrics against values computed by hand."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from road_sslkd import losses
from road_sslkd.baselines import SelfTrainingGate
from road_sslkd.metrics import RELAX_PIXELS, RoadMetrics, StripMetrics
from road_sslkd.plots import PRAccumulator


def test_bce_ignores_invalid_pixels():
    logits = torch.tensor([[0.0, 2.0, -50.0]])
    target = torch.tensor([[1.0, 1.0, 1.0]])
    valid = torch.tensor([[True, True, False]])
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    assert losses.bce(logits, target, valid).item() == pytest.approx(expected, rel=1e-6)


def test_dice_by_hand():
    logits = torch.tensor([[0.0, 0.0]])  # p = 0.5, 0.5
    target = torch.tensor([[1.0, 0.0]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    # 1 - (2 * 0.5 + 1) / (1.0 + 1 + 1) with eps = 1
    assert losses.dice(logits, target, valid).item() == pytest.approx(1 - 2 / 3)


def test_confidence_weighted_pseudo_label():
    target, weight = losses.pseudo_label(torch.tensor([0.9, 0.5, 0.2]))
    assert target.tolist() == [1.0, 0.0, 0.0]
    assert weight.tolist() == pytest.approx([0.8, 0.0, 0.6])


def test_prior_shift_moves_the_threshold_to_one_half():
    shifted = losses.shift_prior(torch.tensor([0.8, 0.9, 0.5]), threshold=0.8)
    # logit(0.9) - logit(0.8) = log(9) - log(4); logit(0.5) - logit(0.8) = -log(4)
    assert shifted.tolist() == pytest.approx([0.5, 1 / (1 + 4 / 9), 1 / (1 + 4)], rel=1e-5)
    same = torch.tensor([0.1, 0.5, 0.7])
    assert torch.allclose(losses.shift_prior(same, 0.5), same)


def test_quantile_threshold_leaves_the_asked_fraction_above():
    prob = torch.arange(100, dtype=torch.float32) / 100  # 0.00 ... 0.99
    assert losses.quantile_threshold(prob, 0.2) == pytest.approx(0.79)  # 0.80 ... 0.99 lie above
    assert losses.quantile_threshold(torch.ones(10), 0.2) == pytest.approx(1 - 1e-3)


def test_margin_over_all_road_by_hand():
    # 8 valid pixels, 2 of them road (share 0.25); the last pixel is nodata and says road in both
    label = torch.tensor([[1.0, 1.0, 0, 0, 0, 0, 0, 0, 1.0]])
    valid = torch.tensor([[True] * 8 + [False]])

    def margin(pred: list[int]) -> float:
        return losses.margin_over_all_road(torch.tensor([pred]) * 10.0 - 5.0, label, valid)

    assert margin([0] * 9) == pytest.approx(-0.25)  # no road predicted
    assert margin([1] * 9) == pytest.approx(0.0)  # all road: the trivial prediction itself
    assert margin([1, 0, 0, 0, 0, 0, 0, 0, 1]) == pytest.approx(0.5 - 0.25)
    assert margin([1, 1, 1, 0, 0, 0, 0, 0, 0]) == pytest.approx(2 / 3 - 0.25)


def test_self_training_gate_waits_for_a_positive_running_margin_then_ramps_up():
    gate = SelfTrainingGate(margin=-0.25)
    assert [gate.weight(-0.25, step / 100) for step in range(10)] == [0.0] * 10
    # the running mean (momentum 0.9) of a margin of 0.3 passes 0 at its 6th update: 0.3 - 0.55 * 0.9 ** k > 0
    weights = [gate.weight(0.3, step / 100) for step in range(10, 35)]
    assert weights[:5] == [0.0] * 5 and gate.start == 0.15
    assert weights[5] == pytest.approx(math.exp(-5)) and 0 < weights[-1] < 1
    assert gate.weight(-1.0, 0.35) == 1.0  # once open it stays open; the ramp spans a fifth of the stage


def test_prob_distill_is_zero_for_identical_and_matches_bernoulli_kl():
    valid = torch.ones(1, 1, dtype=torch.bool)
    same = losses.prob_distill(torch.tensor([[1.3]]), torch.tensor([[1.3]]), valid, temperature=2.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    s, t, temp = 0.0, 2.0, 2.0
    p, q = 1 / (1 + math.exp(-t / temp)), 1 / (1 + math.exp(-s / temp))
    kl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    got = losses.prob_distill(torch.tensor([[s]]), torch.tensor([[t]]), valid, temperature=temp)
    assert got.item() == pytest.approx(kl * temp * temp, rel=1e-5)


def test_feature_distill_resizes_and_normalises():
    teacher = torch.zeros(1, 2, 4, 4)
    teacher[:, 0] = 3.0  # unit vector (1, 0) after normalisation
    student = torch.zeros(1, 2, 2, 2)
    student[:, 1] = 5.0  # unit vector (0, 1): squared distance 2 per pixel
    assert losses.feature_distill(student, teacher).item() == pytest.approx(2.0)
    assert losses.feature_distill(teacher * 7, teacher).item() == pytest.approx(0.0)


def test_feature_distill_matches_its_definition_for_nhwc_students():
    """The trainer's student features are NHWC and the cached teacher's NCHW; value and gradient must be those
    of the MSE of F.normalize'd vectors, per pixel."""
    torch.manual_seed(0)
    student = torch.randn(2, 5, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    teacher = torch.randn(2, 5, 6, 6)
    teacher[0, :, 0, 0] = 0.0  # a pixel without features must not give NaN
    got = losses.feature_distill(student, teacher)
    got.backward()
    reference = student.detach().clone().requires_grad_()
    want = ((F.normalize(reference, dim=1) - F.normalize(teacher, dim=1)) ** 2).sum() / (2 * 6 * 6)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(student.grad, reference.grad, atol=1e-6)


def test_road_metrics_by_hand():
    truth = np.zeros((1, 10), bool)
    truth[0, 2:5] = True  # road at 2, 3, 4
    pred = np.zeros((1, 10), bool)
    pred[0, 3:6] = True  # predicted 3, 4, 5
    pred[0, 9] = True  # far false positive, inside nodata below
    valid = np.ones((1, 10), bool)
    valid[0, 9] = False
    m = RoadMetrics()
    m.update(pred, truth, valid)
    assert (m.tp, m.fp, m.fn) == (2, 1, 1)
    assert m.iou == pytest.approx(2 / 4)
    assert m.f1 == pytest.approx(4 / 6)
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == pytest.approx(2 / 3)
    # Within 3 px every valid prediction and every true pixel is matched.
    assert m.relaxed_f1 == pytest.approx(1.0)


def test_relaxed_f1_counts_misses_beyond_three_pixels():
    truth = np.zeros((1, 20), bool)
    truth[0, 0] = True
    pred = np.zeros((1, 20), bool)
    pred[0, 3] = True  # 3 px away: a hit
    pred[0, 10] = True  # 10 px away: a miss
    m = RoadMetrics()
    m.update(pred, truth, np.ones_like(truth))
    precision, recall = 1 / 2, 1.0
    assert m.relaxed_f1 == pytest.approx(2 * precision * recall / (precision + recall))
    assert m.iou == 0.0


def test_strips_of_any_height_count_as_the_whole_raster():
    """Relaxed hits across block borders, blocks thinner than the slack, nodata: the counts of one update."""
    rng = np.random.default_rng(1)
    pred, truth = rng.random((2, 60, 40)) < 0.04  # sparse: most relaxed hits come from other rows
    valid = rng.random((60, 40)) > 0.2
    whole = RoadMetrics()
    whole.update(pred, truth, valid)
    assert whole.relaxed_tp_pred > whole.tp
    for heights in ([60], [1, 2, RELAX_PIXELS, 1, 20, 33], [RELAX_PIXELS] * 20, [57, 1, 1, 1]):
        streamed = RoadMetrics()
        strips = StripMetrics(streamed)
        for start, stop in zip(np.cumsum([0, *heights[:-1]]), np.cumsum(heights)):
            strips.add(pred[start:stop], truth[start:stop], valid[start:stop])
        strips.close()
        assert streamed == whole, heights


def test_pr_histograms_give_the_iou_of_any_threshold():
    rng = np.random.default_rng(0)
    prob = rng.random((64, 64))
    truth = rng.random((64, 64)) < prob  # correlated, as a model's output is with the roads
    valid = rng.random((64, 64)) > 0.1
    pr = PRAccumulator()
    pr.update(prob, truth, valid)
    for threshold in (0.3, 0.5, 0.85):
        m = RoadMetrics()
        m.update(prob >= threshold, truth, valid)
        assert pr.iou(threshold) == pytest.approx(m.iou)
