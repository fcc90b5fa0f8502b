"""A run's strategy bias (metrics.strategy_bias, harness.strategies_of): shares, normalised
entropy, the most chosen action, per turn, and the distances from the human conversations'
labelled strategies, against values computed by hand."""

from types import SimpleNamespace

import pytest

from harness import strategies_of
from metrics import strategy_bias
from tasks import get_task

NAMES = ["A", "B", "C", "D"]


def test_the_bias_of_a_run_matches_hand_computed_values():
    chosen = [(1, "A"), (1, "A"), (2, "A"), (2, "B"), (2, None), (3, "B")]
    bias = strategy_bias(chosen, NAMES, human=["A", "B", "B", "C"])
    # 3 of A, 2 of B among 5 turns with a strategy; one turn without
    assert bias["turns"] == 5 and bias["no_strategy_turns"] == 1
    assert bias["distribution"] == pytest.approx({"A": 0.6, "B": 0.4, "C": 0.0, "D": 0.0})
    # H(0.6, 0.4) = 0.97095 bits; log2(4 actions) = 2 bits
    assert bias["entropy"] == pytest.approx(0.97095 / 2, abs=1e-5)
    assert (bias["top_action"], bias["top_share"]) == ("A", pytest.approx(0.6))
    assert bias["per_turn"][1]["entropy"] == 0.0 and bias["per_turn"][1]["top_share"] == 1.0
    assert bias["per_turn"][2]["distribution"]["A"] == 0.5  # the turn without strategy left out
    assert bias["per_turn"][2]["entropy"] == pytest.approx(0.5)  # 1 bit of 2
    assert sorted(bias["per_turn"]) == [1, 2, 3]
    human = bias["human"]
    assert human["distribution"] == pytest.approx({"A": 0.25, "B": 0.5, "C": 0.25, "D": 0.0})
    # total variation: (|0.6-0.25| + |0.4-0.5| + |0-0.25|) / 2
    assert human["total_variation"] == pytest.approx(0.35)
    # Jensen-Shannon (bits) against M = (0.425, 0.45, 0.125, 0), by hand:
    # KL(P||M) = 0.6 log2(0.6/0.425) + 0.4 log2(0.4/0.45) = 0.298496 - 0.067970
    # KL(H||M) = 0.25 log2(0.25/0.425) + 0.5 log2(0.5/0.45) + 0.25 log2(2)
    #          = -0.191384 + 0.076002 + 0.25
    assert human["js_divergence"] == pytest.approx((0.230526 + 0.134618) / 2, abs=1e-5)


def test_one_strategy_everywhere_has_entropy_zero_and_uniform_has_one():
    assert strategy_bias([(1, "C")] * 7, NAMES)["entropy"] == 0.0
    uniform = strategy_bias([(1, name) for name in NAMES * 3], NAMES)
    assert uniform["entropy"] == pytest.approx(1.0) and uniform["human"] is None
    nothing = strategy_bias([(1, None)], NAMES)
    assert nothing["distribution"] == {} and nothing["entropy"] is None


def test_the_human_distribution_comes_from_the_played_cases_labels():
    esc = get_task("esc")
    case = {"emotion_type": "sadness", "problem_type": "breakup", "situation": "s", "dialog": [
        {"speaker": "sys", "text": "Hi.", "strategy": "Question"},
        {"speaker": "usr", "text": "I am sad."},
        {"speaker": "sys", "text": "That is hard.", "strategy": "Reflection of feelings"},
        {"speaker": "usr", "text": "Yes."},
        {"speaker": "sys", "text": "What happened?", "strategy": "Question"}]}
    played = SimpleNamespace(case=case, records=[{"turn": 1, "action": "Question"},
                                                 {"turn": 2, "action": "Question"}])
    bias = strategies_of([played], esc)
    assert bias["distribution"]["Question"] == 1.0 and bias["entropy"] == 0.0
    human = bias["human"]  # the opening system turn has no state to act on: not counted
    assert human["turns"] == 2
    assert human["distribution"]["Question"] == 0.5
    assert human["distribution"]["Reflection of feelings"] == 0.5
    assert human["total_variation"] == 0.5
    # a task whose data labels no strategy has no human distribution
    no_labels = SimpleNamespace(labelled_turns=None, action_names=esc.action_names)
    assert strategies_of([played], no_labels)["human"] is None
