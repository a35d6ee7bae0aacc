"""Thresholds from normal images: ranks, the order-statistic interval, the split."""

from __future__ import annotations

import numpy as np
import pytest

from adcore.own.calibration import (
    false_alarm_interval,
    order_statistic_threshold,
    smallest_fpr,
    split_calibration,
    threshold_rank,
    thresholds_from_scores,
)


def test_rank_is_the_conformal_quantile() -> None:
    assert threshold_rank(99, 0.01) == 99       # ceil(100 * 0.99)
    assert threshold_rank(199, 0.01) == 198
    assert threshold_rank(20, 0.01) == 20       # not attainable: the largest score
    assert threshold_rank(9, 0.5) == 5
    assert smallest_fpr(20) == pytest.approx(1 / 21)


def test_threshold_is_an_order_statistic() -> None:
    scores = np.arange(1, 100, dtype=float)[::-1]  # 99 .. 1, unsorted on purpose
    value, k = order_statistic_threshold(scores, 0.1)
    assert k == 90 and value == 90.0
    with pytest.raises(ValueError, match="between 0 and 1"):
        order_statistic_threshold(scores, 1.5)
    with pytest.raises(ValueError, match="not finite"):
        order_statistic_threshold([1.0, float("nan")], 0.1)


def test_false_alarm_rate_of_new_normal_scores_matches_the_interval() -> None:
    # Many calibration draws from one distribution: the rate each threshold gives on fresh
    # normal scores has the mean and spread of Beta(n + 1 - k, k).
    rng = np.random.default_rng(0)
    n, fpr = 99, 0.05
    rates = []
    for _ in range(400):
        threshold, k = order_statistic_threshold(rng.standard_normal(n), fpr)
        rates.append(float((rng.standard_normal(20000) > threshold).mean()))
    lower, mean, upper = false_alarm_interval(n, k)
    assert mean == pytest.approx(5 / 100)
    assert np.mean(rates) == pytest.approx(mean, abs=0.006)
    inside = np.mean([(lower <= r <= upper) for r in rates])
    assert 0.9 <= inside <= 0.99


def test_thresholds_from_scores_reports_attainability() -> None:
    result = thresholds_from_scores(np.linspace(0, 1, 20), np.linspace(0, 1, 1000), 0.01)
    assert result["image"] == 1.0 and result["rank"] == 20 and not result["attainable"]
    assert result["pixel"] == pytest.approx(np.linspace(0, 1, 1000)[990])
    ok = thresholds_from_scores(np.linspace(0, 1, 200), np.linspace(0, 1, 1000), 0.05)
    assert ok["attainable"] and ok["interval_95"][0] < 0.05 < ok["interval_95"][1]


def test_split_holds_back_ten_percent_and_at_least_twenty() -> None:
    train, cal = split_calibration(700, seed=1)
    assert len(cal) == 70 and len(train) == 630 and not set(train) & set(cal)
    train, cal = split_calibration(50)
    assert len(cal) == 20 and len(train) == 30
    assert split_calibration(50, seed=3) == split_calibration(50, seed=3)
    with pytest.raises(ValueError, match="at least 21"):
        split_calibration(20)
