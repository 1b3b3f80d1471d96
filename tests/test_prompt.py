"""Router output parsers and the prompt format."""

import pytest

from envs import make_routing_env
from rlrouter.router.prompt import (RouteFormatError, feedback_user_message, first_user_message, format_route,
                                    parse_strict, parse_tolerant, think_text)

TIERS = ["small", "large"]


def test_strict_parser_accepts_the_trained_format():
    parsed = parse_strict("<think>last step failed</think><route>large</route>", TIERS)
    assert (parsed.tier, parsed.think, parsed.query) == ("large", "last step failed", None)
    assert parse_strict(format_route("small", "x"), TIERS).tier == "small"


def test_strict_parser_accepts_router_r1_subqueries():
    parsed = parse_strict('<think>hard math</think><route tier="large">What is 17*23?</route>', TIERS)
    assert (parsed.tier, parsed.query) == ("large", "What is 17*23?")


@pytest.mark.parametrize("text, reason", [
    ("<route>large</route>", "no"),  # missing think
    ("<think>x</think>", "no route"),
    ("<think>x</think><route>medium</route>", "unknown tier 'medium'"),
    ("<think>x</think><route>small</route><route>large</route>", "two or more routes"),
    ("<think>x</think><route>lar", "malformed"),  # truncated
    ("<think>x</think><route>Large</route>", "unknown tier"),  # strict is case-sensitive
    ("<think>x</think><route>small</route> and more", "malformed"),
])
def test_strict_parser_rejects_malformed_outputs(text, reason):
    with pytest.raises(RouteFormatError, match=reason):
        parse_strict(text, TIERS)


@pytest.mark.parametrize("text, tier, error", [
    ("<think>ok</think><route>large</route>", "large", None),
    ("noise <ROUTE>Large</ROUTE> trailing", "large", None),
    ("<think>x</think><route>large", "large", None),  # truncated before </route>
    ('<route tier="large">sub query</route>', "large", None),
    ("<think>x</think><route>small</route><route>large</route>", "small", None),  # first route wins
    ("<think>x</think><route>medium</route>", "small", "unknown tier 'medium'"),
    ("<think>x</think>", "small", "no <route> tag"),
    ("", "small", "no <route> tag"),
    ("<think>größer → 大</think><route>large</route>", "large", None),  # unicode
])
def test_tolerant_parser_reads_what_it_can_and_falls_back_with_a_reason(text, tier, error):
    parsed = parse_tolerant(text, TIERS, fallback="small")
    assert parsed.tier == tier
    assert parsed.error == error
    assert parsed.well_formed == (error is None)


def test_conversation_messages_come_from_the_env_view():
    env = make_routing_env("synthetic", budget={"large_calls": 5, "usd": 0.05})
    env.reset(seed=0, options={"task_id": "train-1"})
    view = env.view()
    first = first_user_message(view)
    assert first.startswith(f"Task: {view['task']}\nBudget: $0.0500 of $0.0500 left; large calls 5 of 5 left\n")
    assert first.endswith(f"Next: {view['step_text']}")
    assert think_text(view) == "start; large 5, $0.050"
    env.step(1)
    view = env.view()
    feedback = feedback_user_message(view)
    assert feedback.startswith(f"<information>{view['history'][-1]['event']}: ")
    assert "large calls 4 of 5 left" in feedback
    assert len(feedback.split("</information>")[0]) <= len("<information>") + len(view["history"][-1]["event"]) + 64


def test_step_prompt_holds_the_state_with_the_envs_history_window():
    from rlrouter.router.prompt import step_user_message

    env = make_routing_env("synthetic", budget={"large_calls": 5}, history_window=4)
    env.reset(seed=0, options={"task_id": "train-1"})
    for action in (1, 0, 0, 1, 0, 0):
        env.step(action)
    view = env.view()
    text = step_user_message(view)
    shown = ", ".join(f"{h['tier']} {h['event']}" for h in view["history"][-4:])
    assert f"Last 4 of 6 steps: {shown}\n" in text
    assert text.startswith(f"Task: {view['task']}\nBudget: large calls 3 of 5 left\nSpent ${view['cost_usd']:.4f}.")
    assert text.endswith(f"Next: {view['step_text']}")
    env.unwrapped.history_window = 2  # the one window: the env's, read from its view
    assert "Last 2 of 6 steps: " in step_user_message(env.view())
