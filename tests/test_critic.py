import math
import re
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import ScriptedLLM
from critic import Critic, parse_verdict
from tasks import parse_price, plausible_price, sale_to_list
from env import Conversation
from tasks import TASKS, get_task

ESC = get_task("esc").verdicts


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_every_option_is_read_by_number_and_by_its_sentence(task_name):
    verdicts = get_task(task_name).verdicts
    for i, sentence in enumerate(verdicts):
        for answer in (str(i + 1), f"{i + 1}. {sentence}", f"Option {i + 1}", f"({i + 1})",
                       f"**{i + 1}**", sentence, sentence.upper().rstrip(".")):
            assert parse_verdict(answer, verdicts) == i, answer


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_no_option_sentence_contains_another(task_name):
    """Otherwise quoting the longer one would also name the shorter one."""
    words = [" " + " ".join(v.lower().replace(",", "").replace(".", "").split()) + " "
             for v in get_task(task_name).verdicts]
    assert not [(a, b) for a in words for b in words if a != b and a in b]


@pytest.mark.parametrize("task_name,answer", [
    ("esc", "No, the Patient's issue has not been solved."),
    ("esc", "The issue remains unresolved."),
    ("esc", "Yes, the Patient's emotional problem has not been solved."),
    ("extes", "No, the Patient's problem has not been solved."),
    ("p4g", "The Persuadee refuses to donate."),
    ("cima", "Yes, the translation is correct."),
    ("cima", "No, the Student has not correctly translated the whole sentence."),
])
def test_negations_and_paraphrases_are_unusable(task_name, answer):
    assert parse_verdict(answer, get_task(task_name).verdicts) is None


@pytest.mark.parametrize("answer", [
    "No, the Patient feels worse. No, the Patient feels the same.",  # two verdicts
    "3. No, the Patient feels worse.",  # number and sentence disagree
    "Option 2 or option 3", "1 or option 2",
    "1. No, the Patient feels worse.\n2. No, the Patient feels the same.\n3. No, but the "
    "Patient feels somewhat better.\n4. Yes, the Patient's emotional problem has been solved.",
    "5", "Option 9", "0",  # not an option
    "", "   ", "I don't know", "The weather is nice.", "worse", "better",
    "x" * 100_000, "3" * 5000,
])
def test_echoes_several_options_empty_and_long_answers_are_unusable(answer):
    assert parse_verdict(answer, ESC) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.sampled_from(sorted(TASKS)))
def test_random_text_never_raises_and_gives_an_option_or_none(answer, task_name):
    verdicts = get_task(task_name).verdicts
    index = parse_verdict(answer, verdicts)
    assert index is None or 0 <= index < len(verdicts)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_answers_give_finite_rewards_inside_each_task_range(answer):
    for task_name in sorted(TASKS):
        task = get_task(task_name)
        case = {"buyer_price": 100, "seller_price": 200}
        result = Critic(task, None).from_answers(case, [answer, "2, 150", answer])
        low, high = task.reward.reward_range
        assert math.isfinite(result.reward) and low <= result.reward <= high


@pytest.mark.parametrize("unit", ["No, the Patient feels 3 . (", "\n", " \n\t", "option ",
                                  "1" * 7 + ",", "$ -"])
def test_parsing_time_grows_linearly_with_answer_length(unit):
    def seconds(n):
        answer = (unit * n)[:n]
        start = time.perf_counter()
        for _ in range(3):
            parse_verdict(answer, ESC)
            parse_price(answer)
        return time.perf_counter() - start
    seconds(1000)
    small, large = seconds(10_000), seconds(100_000)
    assert large < 30 * small + 0.05  # 10x the length: ~10x the time, never quadratic


@pytest.mark.parametrize("text,price", [("$1,200", 1200.0), ("at 45.50 dollars", 45.5),
                                        ("1.2k", 1200.0), ("no price", None), ("250", 250.0),
                                        ("-30", -30.0), ("9" * 400, math.inf)])
def test_parse_price(text, price):
    assert parse_price(text) == price


def test_implausible_prices_are_rejected():
    assert plausible_price(150, 100, 200) and plausible_price(300, 100, 200)
    for price in (None, -5, 0, 301, math.inf, math.nan, 1e12):
        assert not plausible_price(price, 100, 200), price


def test_sale_to_list_ratio():
    assert sale_to_list(180, buyer_price=180, seller_price=250) == 1.0
    assert sale_to_list(250, buyer_price=180, seller_price=250) == 0.0
    assert sale_to_list(215, buyer_price=180, seller_price=250) == pytest.approx(0.5)


def _conversation(case=None, emotions=()):
    return Conversation(case or {"emotion_type": "x", "problem_type": "y"},
                        [("Patient", "hi")], emotions=list(emotions))


def _critic(task_name, answers, samples=4, mode="sample", prior=None):
    queue = list(answers)
    llm = ScriptedLLM(lambda prompt: queue.pop(0), prior=prior)
    return Critic(get_task(task_name), llm, mode=mode, num_samples=samples)


def test_prompt_lists_numbered_options_and_the_case():
    critic = _critic("esc", [])
    messages = critic.prompt(_conversation({"emotion_type": "anxiety",
                                            "problem_type": "job crisis"}, ["anxious"]))
    assert "anxiety" in messages[0]["content"] and "job crisis" in messages[0]["content"]
    assert "1. No, the Patient feels worse." in messages[1]["content"]
    assert "4. Yes, the Patient's emotional problem has been solved." in messages[1]["content"]


def test_cima_critic_is_not_handed_the_target_translation():
    case = {"sentence": "the red cat", "target": "il gatto rosso", "dialog": []}
    text = "\n".join(m["content"] for m in _critic("cima", []).prompt(
        Conversation(case, [("Student", "hi")])))
    assert "the red cat" in text and "il gatto rosso" not in text


def test_critic_averages_usable_verdicts_and_counts_invalid():
    critic = _critic("esc", ["4", "No, but the Patient feels somewhat better.",
                             "No, the Patient's issue has not been solved.", "banana"])
    result = critic.score([_conversation(emotions=["sad"])])[0]
    assert result.reward == pytest.approx(0.75) and result.success
    assert result.invalid == 2 and len(result.answers) == 4
    assert result.option_probs == [0.0, 0.0, 0.5, 0.5]


def test_nine_unusable_and_one_negated_answer_give_no_reward_and_no_success():
    critic = _critic("esc", ["?"] * 9 + ["No, the Patient's issue has not been solved."], 10)
    result = critic.score([_conversation()])[0]
    assert result.reward == 0.0 and result.invalid == 10 and not result.success


def test_logits_mode_reward_is_the_expectation_over_options():
    weights = [0.1, 0.2, 0.3, 0.4]
    critic = _critic("esc", [], mode="logits", prior=lambda prompt, labels: weights)
    result = critic.score([_conversation()])[0]
    assert result.reward == pytest.approx(-0.1 - 0.1 + 0.15 + 0.4)
    assert not result.success  # 0.35 < 0.5
    assert result.option_probs == pytest.approx(weights) and result.invalid == 0


@pytest.mark.parametrize("task_name,rewards,success", [
    ("esc", [0.5], True), ("esc", [0.5, -0.5, 0.5, 0.5], False), ("esc", [1.0, 0.5, -0.5, 1.0], True),
    ("extes", [0.5], True), ("extes", [-1.0] * 4, False),
    ("cima", [1.0], True), ("cima", [1.0, 0.5], False),
    ("p4g", [1.0, 0.1], False),  # 0.55: not above 0.6
    ("p4g", [1.0, 1.0, 0.1], True),  # 0.7
    ("p4g", [0.1] * 4, False),
])
def test_success_rules_of_the_original(task_name, rewards, success):
    task = get_task(task_name)
    answers = [str(task.reward.rewards.index(r) + 1) for r in rewards]
    result = Critic(task, None).from_answers({}, answers)
    assert result.reward == pytest.approx(sum(rewards) / len(rewards))
    assert result.success == success


def test_p4g_decided_to_donate_has_a_reward():
    result = Critic(get_task("p4g"), None).from_answers({}, ["The Persuadee has decided to donate."])
    assert result.reward == 1.0 and result.success


CASE = {"buyer_price": 100, "seller_price": 200, "item_name": "bike"}


@pytest.mark.parametrize("answers,price,reward,success", [
    (["2, 150", "2, $160", "2. They have reached a deal at 160", "They have reached a deal at 140."],
     160.0, 0.4, True),  # the most common price
    (["2, 150", "2, 140", "2, 140", "2, 150"], 150.0, 0.5, True),  # a tie: the first named
    (["2, 150", "1", "2, 150", "2, 150"], None, -0.1, False),  # one sample says no deal
    (["2, 220", "2, 220"], 220.0, -0.2, False),  # above the list price: a deal, no success
    (["2", "2, -5", "2, 1000000", "hmm"], None, -0.1, False),  # no usable price
    ([], None, -0.1, False),
])
def test_cb_deals_follow_ppdpp(answers, price, reward, success):
    result = Critic(get_task("cb"), None).from_answers(CASE, answers)
    assert result.deal_price == price
    assert result.reward == pytest.approx(reward) and result.success == success


def test_cb_unusable_prices_are_counted():
    result = Critic(get_task("cb"), None).from_answers(CASE, ["2", "2, -5", "2, 150", "no"])
    assert result.invalid == 3 and result.deal_price == 150


def test_cb_logits_mode_needs_every_sample_to_say_deal_then_asks_the_price():
    def prompts_seen(weights, samples):
        asked = []
        llm = ScriptedLLM(lambda prompt: asked.append(prompt) or "$150",
                          prior=lambda prompt, labels: weights)
        critic = Critic(get_task("cb"), llm, mode="logits", num_samples=samples)
        conversation = Conversation(CASE, [("Buyer", "150?"), ("Seller", "ok")])
        return critic.score([conversation])[0], asked
    result, asked = prompts_seen([0.05, 0.95], 10)  # 0.95 ** 10 = 0.60: a deal
    assert result.deal_price == 150 and result.reward == pytest.approx(0.5) and result.success
    assert len(asked) == 1 and "At what price?" in asked[0]
    result, asked = prompts_seen([0.1, 0.9], 10)  # 0.9 ** 10 = 0.35: no deal
    assert result.deal_price is None and result.reward == pytest.approx(-0.1) and not asked


def test_all_verdict_rewards_lie_inside_the_task_range():
    for task in TASKS.values():
        low, high = task.reward.reward_range
        rewards = (task.reward.no_deal,) if task.reward.deals else task.reward.rewards
        assert all(low <= r <= high for r in rewards)


def test_critic_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="Expected one of"):
        Critic(get_task("esc"), None, mode="vote")


def test_scripted_llm_option_probs_are_normalised():
    llm = ScriptedLLM(None, prior=lambda prompt, labels: [1.0, 3.0])
    assert torch.allclose(llm.option_probs([[{"content": "x"}]], ["1", "2"]),
                          torch.tensor([[0.25, 0.75]]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4))
def test_logits_rewards_are_finite_and_inside_each_task_range(weights):
    for task_name in sorted(TASKS):
        task = get_task(task_name)
        probs = [w + 1e-6 for w in weights[:len(task.verdicts)]]
        result = Critic(task, None, mode="logits").from_distribution(
            [p / sum(probs) for p in probs])
        low, high = task.reward.reward_range
        assert math.isfinite(result.reward) and low - 1e-9 <= result.reward <= high + 1e-9


@pytest.mark.parametrize("p_whole, success", [
    (1 - 3e-9, True),  # sure: the expectation falls short of 1.0 by float noise only
    (0.94, True), (0.93, False)])  # 0.94 ** 10 = 0.54, 0.93 ** 10 = 0.48
def test_cima_logits_success_is_ten_samples_all_saying_whole_half_the_time(p_whole, success):
    # cima succeeds when every sampled answer says "whole" (reward 1); a distribution's
    # expectation reaches 1 only when the other options' probabilities are exactly 0
    critic = Critic(get_task("cima"), None, mode="logits", num_samples=10)
    rest = (1 - p_whole) / 3
    result = critic.from_distribution([rest, rest, rest, p_whole])
    assert result.success == success
    assert result.reward == pytest.approx(p_whole - rest * 1.0, abs=1e-9)


def test_cb_question_shows_the_answer_format_without_a_price_to_copy():
    """The release's format is "They have reached a deal at [price]": a placeholder. A
    number in the example would be copied as the deal price when the critic is unsure."""
    conversation = Conversation(CASE, [("Buyer", "Hi."), ("Seller", "Hello.")])
    for order in ([0, 1], [1, 0]):
        text = Critic(get_task("cb"), None).prompt(conversation, order=order)[-1]["content"]
        question = text.split("Options:")[0].split("Seller: Hello.")[1]
        assert re.findall(r"\d+", question) == [str(order.index(1) + 1)]
