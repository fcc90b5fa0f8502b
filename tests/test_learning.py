"""Learning tests: scripted worlds whose best policy is known, played by the real trainer
(train_model.train) with scripted LLM clients and a tiny random encoder.

Each world asserts the trained agent against the uniform random policy over the top-k
candidates and against the prior's own choice (its top-1) on the same test cases, under
both recipes (--recipe project and original) with the same budget. The
worlds are built so that broken TD learning fails them: a two-turn sequence whose first
step pays less at once than a decoy (gamma 0, a target that never moves, a reward stored
one transition late and bootstrapping from the wrong state all pick the decoy or miss the
second step), value checks (a success that bootstraps past its end is worth more than 1),
a harmful action that must be avoided, and graded bargaining rewards.
"""

import re

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import train_model
from conftest import ScriptedLLM
from critic import Critic
from env import Planner, SelfPlayEnv
from get_args import recipe_args
from q_adapter import FrozenEncoder
from tasks import get_task

SYSTEM_TEXT = "I hear you."


class World:
    """A scripted task world. The system always says the same words, so an action is
    visible to the agent only through the user's reply: the next state must be read
    after that reply. `history[key]` holds the actions played in each conversation."""

    def __init__(self, task_name, prior_order, user_reply, critic_answers, num_samples=2):
        self.task = get_task(task_name)
        self.history = {}
        names = self.task.action_names
        order = prior_order if callable(prior_order) else lambda prompt: prior_order
        self.prior = ScriptedLLM(None, prior=lambda prompt, labels: [
            10.0 - order(prompt).index(n) if n in order(prompt) else 0.1 for n in names])

        def system(prompt):
            key = self.key(prompt)
            instruction = prompt[prompt.rindex("("):]
            action = next(a for a in names if self.task.actions[a] in instruction)
            turn = prompt.count(SYSTEM_TEXT)  # system turns already played
            self.history[key] = self.history.get(key, [])[:turn] + [action]
            return f"Emotion: calm\nResponse: {SYSTEM_TEXT}"

        self.system = ScriptedLLM(system)
        self.user = ScriptedLLM(lambda prompt: user_reply(self.history[self.key(prompt)]))
        self.critic = ScriptedLLM(lambda prompt: self._critic(prompt, critic_answers))

    @staticmethod
    def key(prompt):
        return re.search(r"case (\d+)", prompt).group(1)

    def _critic(self, prompt, critic_answers):
        # the critic is asked num_samples times per turn: cycle through the answers
        answers = critic_answers(self.history[self.key(prompt)])
        self.asked = (getattr(self, "asked", -1) + 1)
        return answers[self.asked % len(answers)]

    def env(self, max_turn):
        critic = Critic(self.task, self.critic, num_samples=2)
        return (Planner(self.task, self.prior),
                SelfPlayEnv(self.task, self.system, self.user, critic, max_turn=max_turn))


def esc_cases(first, count):
    return [{"emotion_type": "sadness", "problem_type": "job", "situation": f"I feel low, case {i}.",
             "dialog": []} for i in range(first, first + count)]


def cb_cases(first, count):
    return [{"item_name": f"bike case {i}", "buyer_price": 100, "seller_price": 200,
             "buyer_item_description": "A bike.", "seller_item_description": "A bike."}
            for i in range(first, first + count)]


class PriorAgent(train_model.Agent):
    """Acts on the prior's top-1: the candidates come sorted by prior."""

    def q_values(self, features):
        return -(torch.arange(len(features)) % self.args.top_k).float()


# the test's budget, the same under both recipes: episodes, turns, candidates, gamma
# (the worlds' Q-values are computed with 0.9) and the tiny encoder's input length
WORLD = dict(num_envs=8, eval_every=10**6, progress=False, gamma=0.9, max_encoder_tokens=64)
# the project recipe, tuned to learn within the budget
PROJECT = dict(learning_rate=1e-3, batch_size=32, learning_starts=32,
               exploration_fraction=0.6, epsilon_end=0.0, hidden_size=64, tau=0.05,
               updates_per_step=4)


def train_and_compare(world, train_cases, test_cases, encoder_dir, tmp_path, max_turn,
                      episodes=160, top_k=4, recipe="project"):
    """Random policy, prior top-1 and the trained agent on the test cases. recipe
    'original': every value of the original release except the budget (WORLD)."""
    torch.manual_seed(0)
    budget = WORLD | dict(data_name=world.task.name, total_episodes=episodes,
                          max_turn=max_turn, top_k=top_k)
    args = recipe_args(recipe, **budget | (PROJECT if recipe == "project" else {}))
    planner, env = world.env(max_turn)
    encoder = FrozenEncoder.from_pretrained(encoder_dir, max_tokens=64, device="cpu")
    agent = train_model.Agent(args, encoder)
    random_policy, _ = train_model.evaluate(args, agent, planner, env, world.task, test_cases,
                                            epsilon=1.0)
    prior_policy, _ = train_model.evaluate(args, PriorAgent(args, encoder), planner, env,
                                           world.task, test_cases)
    with SummaryWriter(str(tmp_path)) as writer:
        train_model.train(args, agent, planner, env, world.task, train_cases, test_cases[:2],
                          str(tmp_path), writer)
    agent.load(str(tmp_path / "last.pt"))
    trained, conversations = train_model.evaluate(args, agent, planner, env, world.task,
                                                  test_cases)
    print("random", random_policy, "\nprior", prior_policy, "\ntrained", trained)
    return random_policy, prior_policy, trained, conversations


def q_of(record, action):
    return next(c["q"] for c in record["candidates"] if c["action"] == action)


# ---------------------------------------------------------------------------------------
# (a) success needs "Question" then "Providing Suggestions"; "Others" pays more at once
# ---------------------------------------------------------------------------------------

FIRST, SECOND, DECOY = "Question", "Providing Suggestions", "Others"


def sequence_world():
    def user_reply(history):
        return "Tell me what I can do." if history[-1] == FIRST else "Okay."

    def critic_answers(history):
        if history[-2:] == [FIRST, SECOND]:
            return ["4"]  # solved: +1, success
        return {FIRST: ["2"], DECOY: ["3", "1"]}.get(history[-1], ["1"])  # -0.5, -0.25, -1

    # the same prior in every state, so that only the user's reply tells the states apart
    return World("esc", [DECOY, FIRST, SECOND, "Information"], user_reply, critic_answers)


@pytest.mark.parametrize("recipe", ["project", "original"])
def test_value_propagates_through_a_two_turn_sequence(tiny_encoder_dir, tmp_path, recipe):
    world = sequence_world()
    random_policy, prior_policy, trained, conversations = train_and_compare(
        world, esc_cases(0, 200), esc_cases(1000, 16), tiny_encoder_dir, tmp_path, max_turn=2,
        top_k=3, recipe=recipe)
    assert prior_policy["SR"] == 0.0 and random_policy["SR"] <= 0.4  # random: 1/9
    first_q = [q_of(c.records[0], FIRST) for c in conversations]
    second_q = [q_of(c.records[1], SECOND) for c in conversations if len(c.records) > 1]
    if recipe == "original":
        # The original recipe does not learn this world within the budget (160 episodes,
        # 1,640 updates): SR 0, the decoy every time as the prior, with Q(s0, FIRST) -1.80
        # and Q(s1, SECOND) -2.30 against the true 0.4 and 1.0. README, "Two recipes".
        assert trained["SR"] == 0.0 and trained["mean_return"] == prior_policy["mean_return"]
        assert max(first_q) < 0.0 and max(second_q) < 0.0
        return
    assert trained["SR"] >= 0.9 and trained["AT"] <= 2.1
    assert trained["mean_return"] > random_policy["mean_return"] + 0.5
    # the values of the optimal path: Q(s0, FIRST) = -0.5 + 0.9 * 1 and Q(s1, SECOND) = 1
    # (a success that bootstrapped from the state after it would be worth 1 + 0.9 * 0.4)
    assert sum(first_q) / len(first_q) == pytest.approx(0.4, abs=0.25)
    assert sum(second_q) / len(second_q) == pytest.approx(1.0, abs=0.2)


# ---------------------------------------------------------------------------------------
# (b) one action makes the patient feel worse; the others leave them the same
# ---------------------------------------------------------------------------------------

HARMFUL = "Self-disclosure"


def harm_world():
    def critic_answers(history):
        return ["1"] if history[-1] == HARMFUL else ["2"]  # worse: -1, same: -0.5

    return World("esc", [HARMFUL, "Question", "Others", "Information"],
                 lambda history: "Okay.", critic_answers)


@pytest.mark.parametrize("recipe", ["project", "original"])
def test_agent_avoids_the_harmful_action(tiny_encoder_dir, tmp_path, recipe):
    world = harm_world()
    random_policy, prior_policy, trained, conversations = train_and_compare(
        world, esc_cases(0, 200), esc_cases(1000, 16), tiny_encoder_dir, tmp_path, max_turn=3,
        recipe=recipe)
    chosen = [r["action"] for c in conversations for r in c.records]
    assert chosen.count(HARMFUL) / len(chosen) <= 0.05
    assert prior_policy["mean_return"] == pytest.approx(-3.0)  # the prior always harms
    assert trained["mean_return"] >= -1.6 > random_policy["mean_return"]
    # every conversation runs to the turn limit: there is no failure ending
    assert trained["outcomes"] == {"time limit": 16}


# ---------------------------------------------------------------------------------------
# (c) bargaining: three actions close a deal at different prices
# ---------------------------------------------------------------------------------------

PRICES = {"counter": 120, "propose": 170, "agree": 200}  # sale-to-list 0.8, 0.3, 0.0


def bargain_world():
    def critic_answers(history):
        price = PRICES.get(history[-1])
        return [f"2, {price}"] if price else ["1"]

    return World("cb", ["agree", "propose", "inquire", "counter"],
                 lambda history: "Fine.", critic_answers)


@pytest.mark.parametrize("recipe", ["project", "original"])
def test_agent_prefers_the_better_price(tiny_encoder_dir, tmp_path, recipe):
    world = bargain_world()
    random_policy, prior_policy, trained, conversations = train_and_compare(
        world, cb_cases(0, 200), cb_cases(1000, 16), tiny_encoder_dir, tmp_path, max_turn=2,
        recipe=recipe)
    assert trained["SL"] >= 0.75
    assert prior_policy["SL"] == 0.0 and prior_policy["SR"] == 1.0  # agrees to the list price
    assert random_policy["SL"] <= 0.6
    assert [c.records[0]["action"] for c in conversations].count("counter") >= 15
