"""APGR and CPT against values computed by hand, and per-family curves from episode records."""

import numpy as np
import pytest

from rlrouter.evaluate.curves import apgr, cpt, family, family_curves, family_difference, frontier_gap, upper_frontier
from rlrouter.evaluate.runner import EpisodeRecord


def test_apgr_is_the_trapezoid_area_of_a_monotone_curve():
    shares, pgrs = [0.0, 0.2, 0.5, 1.0], [0.0, 0.5, 0.8, 1.0]
    # 0.2·(0+0.5)/2 + 0.3·(0.5+0.8)/2 + 0.5·(0.8+1)/2 = 0.05 + 0.195 + 0.45
    assert apgr(shares, pgrs) == pytest.approx(0.695)
    assert apgr(shares[::-1], pgrs[::-1]) == pytest.approx(0.695)  # order of the points does not matter


def test_apgr_matches_routellm_apgr_metric_on_accuracies():
    # RouteLLM's evaluate.py: (AUC - weak_auc) / (strong_auc - weak_auc), areas by np.trapz over strong %.
    weak, strong = 0.68, 0.81
    pct = np.array([0.0, 10, 30, 55, 80, 100])
    acc = np.array([0.68, 0.70, 0.74, 0.77, 0.80, 0.81])
    auc = np.trapezoid(acc, pct / 100)
    weak_auc, strong_auc = np.trapezoid(np.full(6, weak), pct / 100), np.trapezoid(np.full(6, strong), pct / 100)
    assert apgr(pct / 100, (acc - weak) / (strong - weak)) == pytest.approx((auc - weak_auc) / (strong_auc - weak_auc))


def test_apgr_over_a_partial_range_is_divided_by_its_width():
    # the points span shares 0.2..0.6: area 0.4·(0.5+0.9)/2 = 0.28, width 0.4
    assert apgr([0.2, 0.6], [0.5, 0.9]) == pytest.approx(0.7)


def test_apgr_and_cpt_of_a_non_monotone_curve():
    shares, pgrs = [0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.6, 0.4, 0.9, 1.0]
    # 0.25·(0.6/2 + 1.0/2 + 1.3/2 + 1.9/2) = 0.075 + 0.125 + 0.1625 + 0.2375
    assert apgr(shares, pgrs) == pytest.approx(0.6)
    assert cpt(shares, pgrs, 0.5) == pytest.approx(0.25 * 0.5 / 0.6)  # first crossing, on the way up to 0.6
    assert cpt(shares, pgrs, 0.8) == pytest.approx(0.5 + 0.25 * (0.8 - 0.4) / (0.9 - 0.4))  # 0.7, after the dip


def test_cpt_interpolates_and_is_none_when_never_reached():
    assert cpt([0.0, 0.2, 0.5, 1.0], [0.0, 0.5, 0.8, 1.0], 0.6) == pytest.approx(0.2 + 0.3 * 0.1 / 0.3)
    assert cpt([0.0, 0.4], [0.0, 0.3], 0.5) is None
    assert cpt([0.1, 0.4], [0.6, 0.9], 0.5) == pytest.approx(0.1)  # already above at the first point


def test_family_is_the_name_before_the_knob():
    assert [family(p) for p in ("random(p=0.25)", "knn(t=0.05)", "bopo(bias=1)", "bopo", "oracle")] == \
        ["random", "knn", "bopo", "bopo", "oracle"]


def _records(policy, budget, successes, top_calls, calls=10, cost=None):
    return [EpisodeRecord(policy, budget, f"t{i}", bool(s), cost if cost is not None else 0.01 + 0.09 * top / calls,
                          {"small": calls - top, "large": top}, calls, False, False)
            for i, (s, top) in enumerate(zip(successes, top_calls))]


def test_family_curves_from_records_by_hand():
    tile = 5  # 20 tasks: enough that almost every resample keeps a gap between the boundaries
    records = (_records("always-small", "none", [1, 0, 0, 0] * tile, [0] * 4 * tile)
               + _records("always-large", "none", [1, 1, 1, 0] * tile, [10] * 4 * tile)
               + _records("knob(v=1)", "none", [1, 1, 0, 0] * tile, [2, 4, 0, 2] * tile)
               + _records("knob(v=2)", "none", [1, 1, 1, 0] * tile, [5, 5, 5, 5] * tile))
    (row,) = family_curves(records, "large", resamples=50)
    assert row["family"] == "knob" and row["policies"] == ["knob(v=1)", "knob(v=2)"]
    # succ_small 0.25, succ_large 0.75: PGR of v=1 (0.5) is 0.5 at share 8/40 = 0.2; v=2 is 1.0 at 0.5
    by_policy = {p["policy"]: p for p in row["points"]}
    assert by_policy["knob(v=1)"]["share"] == pytest.approx(0.2) and by_policy["knob(v=1)"]["pgr"] == pytest.approx(0.5)
    assert by_policy["knob(v=2)"]["pgr"] == pytest.approx(1.0)
    # curve (0,0) (0.2,0.5) (0.5,1) (1,1): 0.05 + 0.225 + 0.5
    assert row["apgr"] == pytest.approx(0.775)
    assert row["cpt50"] == pytest.approx(0.2) and row["cpt80"] == pytest.approx(0.2 + 0.3 * 0.3 / 0.5)
    low, high = row["apgr_ci"]
    assert low < row["apgr"] < high


def test_family_difference_is_paired_over_tasks_by_hand():
    """Two tasks; always-small fails both, always-large wins both; families a and b each call
    large on half the steps (share 0.5, cost share 0.5) and win one task each, a task 0 and b
    task 1. Full draw: both PGR 0.5, difference 0. A resample of task 0 twice: a's curve
    (0,0) (0.5,1) (1,1) has area 0.75, b's (0,0) (0.5,0) (1,1) 0.25, difference +0.5; task 1
    twice: −0.5; one of each: 0. So the paired bootstrap SE is sqrt(2 · 0.25 · 0.5²) = 0.354."""
    records = (_records("always-small", "none", [0, 0], [0, 0]) + _records("always-large", "none", [1, 1], [10, 10])
               + _records("a(k=1)", "none", [1, 0], [5, 5]) + _records("b", "none", [0, 1], [5, 5]))
    result = family_difference(records, "a", "b", "large", resamples=4000)
    for key in ("apgr", "apgr_usd"):
        assert result[key]["difference"] == pytest.approx(0.0)
        assert result[key]["se"] == pytest.approx(0.5 ** 1.5, abs=0.02)
        assert result[key]["ci"] == [-0.5, 0.5]
    with pytest.raises(ValueError, match="family 'random' has no policy at budget 'none'; families there: \\['a', 'b'\\]"):
        family_difference(records, "a", "random", "large")
    with pytest.raises(ValueError, match="lack the boundary policies"):
        family_difference([r for r in records if r.policy != "always-large"], "a", "b", "large")


def test_no_curves_without_the_unbudgeted_boundaries():
    records = _records("always-small", "usd=1", [1, 0], [0, 0]) + _records("knob(v=1)", "usd=1", [1, 1], [1, 1])
    assert family_curves(records, "large", resamples=5) == []


def test_upper_frontier_keeps_the_concave_envelope_up_to_the_best_success():
    # (2, 0.6) lies under the chord (1, 0.5)-(2.5, 0.9) (0.767 there); (1, 0.2) under (1, 0.5);
    # (3, 0.55) is dearer than the best point.
    x, y = upper_frontier([0, 1, 2, 3, 1, 2.5], [0, 0.5, 0.6, 0.55, 0.2, 0.9])
    assert x.tolist() == [0, 1, 2.5] and y.tolist() == [0, 0.5, 0.9]


def test_frontier_gap_at_equal_cost_by_hand():
    a = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))  # success = cost up to 1
    b = (np.array([0.0, 2.0]), np.array([0.0, 1.0]))  # success = cost / 2 up to 2
    mean, low, high = frontier_gap(a, b, n_grid=2001)
    # on [0, 2]: gap = c/2 on [0, 1], 1 - c/2 on [1, 2]; mean = (0.25 + 0.25) / 2 = 0.25
    assert abs(mean - 0.25) < 1e-3 and low == 0.0 and abs(high - 0.5) < 1e-12
