"""Synthetic world: determinism, common random numbers, calibration targets."""

import numpy as np
import pytest

from envs import Pool, make_routing_env
from envs.worlds.synthetic import CUES, SyntheticConfig, SyntheticWorld, cue_bucket, difficulty_bucket
from rlrouter.boundary import boundary_runs, classify, taxonomy_counts


def world(**kw):
    return SyntheticWorld(Pool.default(), SyntheticConfig(**kw))


def test_tasks_are_deterministic_and_in_the_length_range():
    a, b = world(), world()
    for tid in a.task_ids("train")[:50]:
        assert a.task(tid) == b.task(tid)
        assert 4 <= a.task(tid).length <= 30
    assert a.task("train-0") != a.task("test-0")


def test_bad_task_ids_and_splits_are_rejected():
    w = world()
    with pytest.raises(ValueError, match="train-N"):
        w.reset("bogus", 0)
    with pytest.raises(ValueError, match="split"):
        w.task_ids("valid")


def test_cues_correlate_with_step_difficulty():
    w = world()
    hard_cue = {c for c in CUES[2]}
    hard, routine = [], []
    for tid in w.task_ids("train")[:200]:
        t = w.task(tid)
        for d, text in zip(t.difficulties, t.step_texts):
            is_hard_cue = any(text.startswith(c) for c in hard_cue)
            (hard if d >= 0.7 else routine).append(is_hard_cue)
    # fidelity 0.8: most hard steps carry a hard cue, few routine ones do
    assert np.mean(hard) > 0.75 and np.mean(routine) < 0.15


def test_faithful_cues_name_the_difficulty_bucket():
    w = world(cue_fidelity=1.0)
    bucket_of = {c: b for b, cues in enumerate(CUES) for c in cues}
    seen, forced = set(), 0
    for tid in w.task_ids("train")[:200]:
        t = w.task(tid)
        off = []
        for d, text in zip(t.difficulties, t.step_texts):
            cue = next(c for c in bucket_of if text.startswith(c + " "))
            assert cue_bucket(text) == bucket_of[cue]
            # buckets by hand: routine below 0.4, moderate below 0.7, hard from 0.7
            assert difficulty_bucket(d) == (0 if d < 0.4 else 1 if d < 0.7 else 2)
            if bucket_of[cue] != difficulty_bucket(d) and d not in (0.4, 0.7):  # stored rounded to 4 places
                off.append((bucket_of[cue], difficulty_bucket(d)))
            seen.add(bucket_of[cue])
        # the one exception: the critical step forced into a medium task that drew none
        # always reads hard, even at a moderate difficulty
        assert off in ([], [(2, 1)]) and (not off or t.archetype == "medium")
        forced += len(off)
    assert seen == {0, 1, 2} and 0 < forced < 20


def test_cue_bucket_names_the_phrase_a_step_starts_with_and_rejects_other_text():
    assert cue_bucket("open the sensor log") == 0  # "open" is routine; "optimize the slow query on" hard
    assert cue_bucket("optimize the slow query on the sensor log") == 2
    assert cue_bucket("write a unit test for the cache layer") == 1
    with pytest.raises(ValueError, match="no cue phrase"):
        cue_bucket("opening the sensor log")


def test_large_succeeds_whenever_small_does_on_the_same_draw():
    w = world()
    pool = w.pool
    for tid in w.task_ids("train")[:100]:
        s_small = w.reset(tid, 7)
        s_large = w.reset(tid, 7)
        ok_small = w.step(s_small, pool["small"]).step_ok
        ok_large = w.step(s_large, pool["large"]).step_ok
        assert ok_large or not ok_small


def test_success_probability_follows_the_logistic_skill_curve():
    w = world()
    state = w.reset("train-0", 0)
    d = state.task.difficulties[0]
    expected = 1 / (1 + np.exp(-12.0 * (0.55 - d)))
    assert w.success_probability(state, "small") == pytest.approx(expected)


def test_default_profile_meets_the_calibration_targets():
    env = make_routing_env("synthetic", split="train")
    ids = env.task_ids[:200]
    stats = boundary_runs(env, ids, k=5, seed=0, progress=False)
    s_small = np.mean([s.s_small for s in stats.values()])
    s_large = np.mean([s.s_large for s in stats.values()])
    counts = taxonomy_counts({t: classify(s.s_small, s.s_large) for t, s in stats.items()})
    assert 0.30 <= s_small <= 0.55
    assert 0.70 <= s_large <= 0.90
    assert all(n >= 0.10 * len(ids) for n in counts.values()), counts
    assert np.mean([s.c_large for s in stats.values()]) > 5 * np.mean([s.c_small for s in stats.values()])
