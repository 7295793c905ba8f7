"""The few-shot protocol's metrics on hand-computed cases."""

import math

import numpy as np
import pytest

from core.training.metrics import FewShotMeter, format_table, intersection_union


def _m(rows):
    return np.array(rows, dtype=bool)


def test_intersection_union_counts_fg_and_bg():
    pred = _m([[1, 1], [0, 0]])
    gt = _m([[1, 0], [1, 0]])
    (i_bg, u_bg), (i_fg, u_fg) = intersection_union(pred, gt)
    assert (i_fg, u_fg) == (1, 3)
    assert (i_bg, u_bg) == (1, 3)


def test_ignored_pixels_count_nowhere():
    pred = _m([[1, 1], [0, 0]])
    gt = _m([[1, 0], [1, 0]])
    ignore = _m([[0, 1], [1, 0]])
    (i_bg, u_bg), (i_fg, u_fg) = intersection_union(pred, gt, ignore)
    assert (i_fg, u_fg) == (1, 1)
    assert (i_bg, u_bg) == (1, 1)


def test_class_iou_is_ratio_of_sums_not_mean_of_ratios():
    meter = FewShotMeter()
    # class a: episode 1 perfect on 1 px, episode 2 misses 3 of 4 px -> (1+1)/(1+4) = 40 %
    meter.update("a", _m([[1, 0, 0, 0]]), _m([[1, 0, 0, 0]]))
    meter.update("a", _m([[1, 0, 0, 0]]), _m([[1, 1, 1, 1]]))
    # class b: 50 %
    meter.update("b", _m([[1, 1, 0, 0]]), _m([[1, 0, 0, 0]]))
    ious = meter.class_iou()
    assert ious["a"] == pytest.approx(40.0)
    assert ious["b"] == pytest.approx(50.0)
    # mIoU: mean over classes, not over episodes
    assert meter.miou() == pytest.approx(45.0)
    s = meter.summary()
    assert s["classes"]["a"]["mean_episode_iou"] == pytest.approx((100 + 25) / 2)
    assert s["episodes"] == 3


def test_precision_and_recall_are_ratios_of_sums_with_ignore():
    meter = FewShotMeter()
    # episode 1: 2 predicted, 1 right, 1 true pixel; episode 2: 1 predicted and right of 3 true (1 ignored)
    meter.update("a", _m([[1, 1, 0, 0]]), _m([[1, 0, 0, 0]]))
    meter.update("a", _m([[1, 0, 0, 0]]), _m([[1, 1, 1, 1]]), ignore=_m([[0, 0, 0, 1]]))
    prec, rec = meter.class_precision_recall()["a"]
    assert prec == pytest.approx(100 * 2 / 3)
    assert rec == pytest.approx(100 * 2 / 4)
    cls = meter.summary()["classes"]["a"]
    assert (cls["precision"], cls["recall"]) == (pytest.approx(66.667), pytest.approx(50.0))
    # nothing predicted: precision undefined, recall 0; counts added without pred_px: unknown
    meter.update("b", _m([[0, 0]]), _m([[1, 0]]))
    assert meter.class_precision_recall()["b"] == (None, 0.0)
    meter.add_counts("c", 1, 2, 2, 3)
    assert meter.summary()["classes"]["c"]["precision"] is None
    m2 = FewShotMeter()
    m2.update("a", _m([[1, 1]]), _m([[0, 0]]))
    assert meter.merge(m2).class_precision_recall()["a"][0] == pytest.approx(100 * 2 / 5)


def test_fbiou_accumulates_over_all_episodes():
    meter = FewShotMeter()
    meter.update("a", _m([[1, 0, 0, 0]]), _m([[1, 1, 0, 0]]))  # fg 1/2, bg 2/3
    meter.update("b", _m([[0, 0, 0, 0]]), _m([[0, 0, 0, 1]]))  # fg 0/1, bg 3/4
    fg = (1 + 0) / (2 + 1)
    bg = (2 + 3) / (3 + 4)
    assert meter.fbiou() == pytest.approx(100 * (fg + bg) / 2)


def test_merge_and_table():
    m1, m2 = FewShotMeter(), FewShotMeter()
    m1.update("a", _m([[1, 0]]), _m([[1, 0]]))
    m2.update("a", _m([[0, 1]]), _m([[1, 0]]))
    m1.merge(m2)
    assert m1.class_iou()["a"] == pytest.approx(100 * 1 / 3)
    text = format_table({"mode": m1}, title="t")
    assert "mIoU" in text and "mode" in text and "33.3" in text


def test_empty_meter_is_nan():
    assert math.isnan(FewShotMeter().miou())
    assert math.isnan(FewShotMeter().fbiou())


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    meter = FewShotMeter()
    meter.update(0, torch.tensor([[True, False]]), torch.tensor([[True, True]]))
    assert meter.miou() == pytest.approx(50.0)
