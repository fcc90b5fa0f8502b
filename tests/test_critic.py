import pytest

from conftest import ScriptedLLM
from critic import Critic, CriticResult, VerdictParser, outcome, parse_price, sale_to_list
from tasks import TASKS, get_task


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_every_verdict_parses_to_its_own_reward(task_name):
    task = get_task(task_name)
    parser = VerdictParser(task.verdicts)
    for sentence, reward in task.verdicts.items():
        answer = sentence.replace("[price]", "$150")
        verdict = parser.parse(answer)
        assert verdict.sentence == sentence, answer
        assert verdict.reward == reward


@pytest.mark.parametrize("answer,expected", [
    ("no, the patient feels worse", "No, the Patient feels worse."),
    ("I think the patient feels a bit better now.", "No, but the Patient feels better."),
    ("Yes. The issue is solved!", "Yes, the Patient's issue has been solved."),
    ("Answer: No, the Patient feels the same.\nExplanation: ...", "No, the Patient feels the same."),
])
def test_esc_loose_answers(answer, expected):
    assert VerdictParser(get_task("esc").verdicts).parse(answer).sentence == expected


@pytest.mark.parametrize("answer", ["", "I don't know", "worse or better, hard to say",
                                    "The weather is nice."])
def test_unusable_answers_are_rejected(answer):
    verdict = VerdictParser(get_task("esc").verdicts).parse(answer)
    assert verdict.sentence is None and verdict.reward is None


def test_extes_somewhat_better_and_p4g_donate_have_rewards():
    extes = VerdictParser(get_task("extes").verdicts)
    assert extes.parse("Yes, the User feels somewhat better.").reward == 0.5
    p4g = VerdictParser(get_task("p4g").verdicts)
    assert p4g.parse("The Persuadee has agreed to donate.").reward == 1.0
    assert p4g.parse("They refused.").reward == -1.0


@pytest.mark.parametrize("text,price", [("$1,200", 1200.0), ("at 45.50 dollars", 45.5),
                                        ("1.2k", 1200.0), ("no price", None), ("250", 250.0)])
def test_parse_price(text, price):
    assert parse_price(text) == price


@pytest.mark.parametrize("answer,deal,price", [
    ("They have reached a deal at $210.", True, 210.0),
    ("They have reached a deal at 1,500", True, 1500.0),
    ("They have not reached a deal.", False, None),
    ("No deal was made.", False, None),
    ("Deal at 200 dollars", True, 200.0),
])
def test_cb_deal_parsing(answer, deal, price):
    verdict = VerdictParser(get_task("cb").verdicts).parse(answer)
    assert verdict.sentence is not None
    assert (verdict.price is not None) == deal
    assert verdict.price == price


def test_sale_to_list_ratio():
    assert sale_to_list(180, buyer_price=180, seller_price=250) == 1.0
    assert sale_to_list(250, buyer_price=180, seller_price=250) == 0.0
    assert sale_to_list(215, buyer_price=180, seller_price=250) == pytest.approx(0.5)


def _critic(task_name, answers, samples=4):
    queue = list(answers)
    llm = ScriptedLLM(lambda prompt: queue.pop(0))
    return Critic(get_task(task_name), llm, num_samples=samples)


def test_critic_averages_usable_verdicts_and_counts_invalid():
    critic = _critic("esc", ["Yes, the Patient's issue has been solved.",
                             "No, but the Patient feels better.", "gibberish", "banana"])
    result = critic.score([{"situation": "x"}], ["Patient: hi"], [["sad"]])[0]
    assert result.reward == pytest.approx(0.75)
    assert result.invalid == 2
    assert len(result.verdicts) == 4


def test_critic_all_invalid_gives_zero_reward():
    result = _critic("esc", ["?"] * 4).score([{}], ["Patient: hi"], [[]])[0]
    assert result.reward == 0.0 and result.invalid == 4


def test_cb_critic_majority_deal_uses_median_price():
    case = {"buyer_price": 100, "seller_price": 200, "item_name": "bike"}
    critic = _critic("cb", ["They have reached a deal at $150.", "They have reached a deal at 160",
                            "They have reached a deal at 140", "They have not reached a deal."])
    result = critic.score([case], ["Buyer: hi"], [[]])[0]
    assert result.deal_price == 150
    assert result.reward == pytest.approx(0.5) == result.sale_to_list
    assert outcome(get_task("cb"), result) == "success"


def test_cb_critic_no_deal_majority():
    case = {"buyer_price": 100, "seller_price": 200, "item_name": "bike"}
    critic = _critic("cb", ["They have reached a deal at $150."] + ["They have not reached a deal."] * 3)
    result = critic.score([case], ["Buyer: hi"], [[]])[0]
    assert result.deal_price is None and result.reward == pytest.approx(-0.1)
    assert outcome(get_task("cb"), result) is None


@pytest.mark.parametrize("task_name,reward,expected", [
    ("esc", 0.5, "success"), ("esc", 0.4, None), ("esc", -1.0, "failure"),
    ("extes", 0.6, "success"), ("extes", -1.0, "failure"),
    ("cima", 1.0, "success"), ("cima", 0.9, None), ("cima", -1.0, None),
    ("p4g", 0.75, "success"), ("p4g", 0.5, None), ("p4g", -1.0, "failure"),
])
def test_success_and_failure_rules(task_name, reward, expected):
    assert outcome(get_task(task_name), CriticResult(reward)) == expected
