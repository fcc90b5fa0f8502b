"""options.py: the numbered question that the planner and the critic ask, through the real
asking path (env.step, Planner.prior, Critic.score) with clients that count the answers."""

import re
from collections import Counter

import pytest

import options
from conftest import DEMO, ScriptedLLM, listed_options, option_number
from critic import Critic
from env import Planner, SelfPlayEnv
from tasks import get_task, load_split

TASK = get_task("esc")  # 4 verdicts, 8 actions
SAMPLES = 10  # over 4 orders: 3 + 3 + 2 + 2, the first orders one more (docs/instruments.md)


class CountingLLM(ScriptedLLM):
    """Answers with the number that `option` has in the order shown, and counts the
    answers asked per (conversation, order shown)."""

    def __init__(self, option):
        super().__init__(self.answer)
        self.option = option
        self.asked = Counter()

    def answer(self, prompt):
        shown = tuple(listed_options(prompt))
        self.asked[(re.search(r"case \d+", prompt).group(0), shown)] += 1
        return option_number(prompt, self.option)


def played_turn():
    """One step of two conversations, the critic sampling --critic_samples over its
    rotations of the verdicts and the planner --prior_samples over 4 rotations of the
    actions; returns (conversations, planner client, critic client), the planner's
    counting the prior of the state after the turn only."""
    planner_llm = CountingLLM("Information")
    critic_llm = CountingLLM(TASK.verdicts[1])  # the same: the conversations go on
    planner = Planner(TASK, planner_llm, mode="sample", num_samples=SAMPLES, order="rotate",
                      rotations=4)
    critic = Critic(TASK, critic_llm, num_samples=SAMPLES, order="shuffle")
    env = SelfPlayEnv(TASK, ScriptedLLM(lambda p: "Emotion: calm\nResponse: I see."),
                      ScriptedLLM(lambda p: "Okay."), critic, planner=planner, max_turn=3)
    case = load_split(DEMO, "esc", "test")[0]
    observations = env.reset([({**case, "situation": f"case {i}"}, i, 100 + i)
                              for i in range(2)])
    planner_llm.asked.clear()  # from here: the prior of the state after the turn
    env.step([o.conversation for o in observations], ["Question", "Question"])
    return [o.conversation for o in observations], planner_llm, critic_llm


def test_a_turn_asks_exactly_the_critics_samples_spread_over_its_orders():
    conversations, _, critic_llm = played_turn()
    for i, conversation in enumerate(conversations):
        record = conversation.records[0]
        shown = [tuple(TASK.verdicts[v] for v in order) for order in record["critic_orders"]]
        assert len(set(shown)) == 4  # one rotation per verdict
        asked = [critic_llm.asked[(f"case {i}", order)] for order in shown]
        assert asked == [3, 3, 2, 2] and len(record["critic_answers"]) == SAMPLES
        assert sum(n for (case, _), n in critic_llm.asked.items()
                   if case == f"case {i}") == SAMPLES
        # every answer named verdict 2 by its number in the order it saw: read back as 2
        assert record["critic_option_probs"] == [0.0, 1.0, 0.0, 0.0]
        assert record["critic_reads"] == [1] * SAMPLES
        assert Counter(record["critic_answer_orders"]) == {0: 3, 1: 3, 2: 2, 3: 2}


def test_a_turn_asks_exactly_the_planners_samples_spread_over_its_orders():
    conversations, planner_llm, _ = played_turn()
    names = TASK.action_names
    for i, conversation in enumerate(conversations):
        # 4 rotations, each fixed by the action shown first
        firsts = conversation.prior_orders
        assert len(set(firsts)) == 4
        shown = [tuple(names[(first + j) % len(names)] for j in range(len(names)))
                 for first in firsts]
        asked_after = [planner_llm.asked[(f"case {i}", order)] for order in shown]
        assert asked_after == [3, 3, 2, 2]
        assert sum(n for (case, _), n in planner_llm.asked.items()
                   if case == f"case {i}") == SAMPLES
        # every answer named Information by its number in the order it saw: all 10 are
        # read as Information (add-one smoothing over the 8 actions: 11 / 18)
        assert conversation.candidates[0] == "Information" and conversation.planner_invalid == 0
        assert conversation.candidate_priors[0] == pytest.approx(11 / 18)


@pytest.mark.parametrize("samples,expected", [(10, [3, 3, 2, 2]), (4, [1, 1, 1, 1]),
                                              (2, [1, 1]), (1, [1])])
def test_samples_are_spread_over_the_orders_the_first_getting_one_more(samples, expected):
    orders = options.rotations(4, 4, seed=0)
    spread = options.split_samples(samples, orders)
    assert [count for _, count in spread] == expected
    assert [order for order, _ in spread] == orders[:len(expected)]


def test_a_distribution_read_in_a_rotation_is_folded_back_into_the_task_order():
    import torch

    job = options.Job(conversation=0, k=1, order=[2, 3, 0, 1], count=1, chat=[], seed=0,
                      result=torch.tensor([0.5, 0.25, 0.125, 0.125]))
    # position 0 showed option 2, so option 2 gets the probability read at position 0
    assert job.in_task_order() == [0.125, 0.125, 0.5, 0.25]


def test_every_order_reads_the_softmax_of_its_labels_first_token_logits(tiny_llm):
    """Through the tiny model: each order's probabilities are the softmax, over the labels,
    of the labels' logits after its own prompt, and fold back by the order shown."""
    import torch

    from llm import stream_seed

    class Asked:  # what options.ask reads of a conversation
        def __init__(self, uid):
            self.uid = uid

        def seed(self, role):
            return stream_seed(self.uid, role)

    actions = ["Question", "Reflection", "Suggestion", "Comfort"]

    def prompt(conversation, order):
        listed = "\n".join(f"{i + 1}. {actions[o]}" for i, o in enumerate(order))
        return [{"role": "user", "content": f"Case {conversation.uid}. Pick one:\n{listed}"}]

    conversations, labels = [Asked(1), Asked(2)], options.labels(4)
    orders = [options.rotations(4, 0, 3), options.rotations(4, 2, 4)]
    label_tokens = [tiny_llm.tokenizer(label)["input_ids"] for label in labels]
    assert all(len(tokens) == 1 for tokens in label_tokens)
    asked = options.ask(tiny_llm, "planner", conversations, orders, prompt, labels)
    for conversation, shown, jobs in zip(conversations, orders, asked):
        assert [job.order for job in jobs] == shown
        for job in jobs:
            assert job.chat == prompt(conversation, job.order)
            ids = torch.tensor([tiny_llm.encode_chat(job.chat)], device=tiny_llm.device)
            with torch.no_grad():
                logits = tiny_llm.model(ids).logits[0, -1].float().cpu()
            expected = torch.softmax(logits[[tokens[0] for tokens in label_tokens]], -1)
            assert torch.allclose(job.result, expected, atol=1e-5)
            assert job.in_task_order() == pytest.approx(
                [float(expected[job.order.index(option)]) for option in range(4)])
