"""Baselines, budgeted evaluation, metrics and reports."""

from rlrouter.evaluate.baselines import (AlwaysTier, EscalateOnFailure, FirstLarge, HindsightOracle, RandomRouter,
                                         make_baselines)
from rlrouter.evaluate.runner import EpisodeRecord, budget_violated, evaluate, run_episode, summarize

__all__ = ["AlwaysTier", "EscalateOnFailure", "FirstLarge", "HindsightOracle", "RandomRouter", "make_baselines",
           "EpisodeRecord", "budget_violated", "evaluate", "run_episode", "summarize"]
