"""The MCTS planners of prior work (mcts.py) in scripted worlds whose answers are known.

sequence_env: success needs "Question" then "Providing Suggestions"; the prior ranks
"Others" first, so the prior's top-1 never succeeds, and a search two turns deep does.
"""

import json
from collections import Counter
import os
import re

import pytest
import torch

import harness
import mcts
import train_model
import view
from conftest import (DECOY, DEVICE, FIRST, SECOND, ScriptedLLM, World, esc_case, esc_cases,
                      listed_options, option_number, scripted_models)
from critic import Critic
from env import Conversation, Planner, SelfPlayEnv
from get_args import Args
from llm import chat_prompt
from llm_transformers import PrefixCache, TransformersLLM
from metrics import unusable_counts
from policies import Policy, make_policy
from ppdpp import PPDPPPolicy
from run_files import TurnRecord
from tasks import get_task
from trainer import train

TASK = get_task("esc")
NOTE_KEYS = ("candidates", "explored", "policy", "search")


def mcts_args(**values):
    return Args(**{"data_name": "esc", "mode": "test", "policy": "gdpzero", "num_envs": 10,
                   "critic_samples": 2, "progress": False, "seed": 3} | values)


def run(policy_name, world_env, cases, **values):
    args = mcts_args(policy=policy_name, max_turn=world_env.max_turn, **values)
    policy = make_policy(args, TASK)
    policy.attach(world_env)
    return harness.evaluate(args, policy, world_env, cases, "test")


def played(prompt):
    """The actions of the system turns in a prompt, in order (the system says its action)."""
    return re.findall(r"I hear you \((.+?)\)\.", prompt)


def sequence_env(max_turn):
    """conftest's sequence_world, read from the prompts alone: the state of a simulated copy
    is its own turns, whatever other copies of the case were played before it. "Question"
    then "Providing Suggestions" solves the problem (4); "Question" and "Others" leave the
    patient the same (2), the other actions make them feel worse (1)."""
    def system(prompt):
        instruction = prompt[prompt.rindex("("):]
        action = next(a for a in TASK.action_names if TASK.actions[a] in instruction)
        return f"Emotion: calm\nResponse: I hear you ({action})."

    def critic(prompt):
        history = played(prompt)
        if history[-2:] == [FIRST, SECOND]:
            return option_number(prompt, TASK.verdicts[3])
        return option_number(prompt, TASK.verdicts[1 if history[-1] in (FIRST, DECOY) else 0])

    prior = ScriptedLLM(None, prior=lambda prompt, labels: [
        10.0 - [DECOY, FIRST, SECOND, "Information"].index(n)
        if n in (DECOY, FIRST, SECOND, "Information") else 0.1 for n in listed_options(prompt)])
    return SelfPlayEnv(TASK, ScriptedLLM(system), ScriptedLLM(lambda prompt: "Okay."),
                       Critic(TASK, ScriptedLLM(critic), num_samples=2),
                       planner=Planner(TASK, prior), max_turn=max_turn)


def test_the_search_finds_a_two_step_success_that_the_prior_misses():
    cases = esc_cases(0, 10)
    prior_metrics, _ = run("prior", sequence_env(max_turn=2), cases)
    metrics, conversations = run("gdpzero", sequence_env(max_turn=2), cases,
                                 mcts_simulations=40)
    print(f"SR: prior {prior_metrics['SR']}, gdpzero {metrics['SR']}")
    assert prior_metrics["SR"] == 0.0
    assert metrics["SR"] >= 0.9
    first = conversations[0].records[0]
    assert first["action"] == FIRST  # not a top-1 of the prior, found by the search
    assert first["search"]["tree"][0]["action"] == FIRST  # the most visited
    assert sum(child["visits"] for child in first["search"]["tree"]) == 40


def test_one_simulation_acts_as_the_prior():
    cases = esc_cases(0, 6)
    _, prior = run("prior", sequence_env(max_turn=3), cases)
    _, searched = run("gdpzero", sequence_env(max_turn=3), cases, mcts_simulations=1)
    assert [[r["action"] for r in c.records] for c in searched] == \
        [[r["action"] for r in c.records] for c in prior]
    assert {r["action"] for c in searched for r in c.records} == {DECOY}


def test_the_visits_follow_the_prior_where_every_action_is_worth_the_same():
    """Every turn is judged 'the same' (-0.5, as Q_0 here): PUCT then visits the actions
    in proportion to the prior, which puts 93% on one action."""
    world = World("esc", ["Information"], lambda history: "Okay.", lambda history: ["2"])
    _, conversations = run("gdpzero", world.env(max_turn=2), esc_cases(0, 2),
                           mcts_simulations=20, mcts_q0=-0.5)
    tree = conversations[0].records[0]["search"]["tree"]
    assert tree[0]["action"] == "Information" and tree[0]["visits"] >= 15


# -- nothing simulated reaches the run --------------------------------------------------

def leaky_world(given=None):
    """Every kind of unusable answer, in states that the search visits: the system breaks
    the format after "Others", the user says nothing after "Information", the critic names
    no option after "Self-disclosure", and the planner (sampling) answers nonsense after
    an odd number of system turns. "Question" solves the problem. given: a Counter of the
    unusable answers the LLMs gave, by figure name (metrics.UNUSABLE_FIGURES)."""
    last = {}
    given = Counter() if given is None else given

    def case(prompt):
        return re.search(r"case (\d+)", prompt).group(1)

    def system(prompt):
        instruction = prompt[prompt.rindex("("):]
        last[case(prompt)] = next(a for a in TASK.action_names
                                  if TASK.actions[a] in instruction)
        if last[case(prompt)] == "Others":
            given["system_format"] += 1
            return "I would say something."
        return "Emotion: calm\nResponse: I hear you."

    def user(prompt):
        if last[case(prompt)] == "Information":
            given["user_empty"] += 1
            return ""
        return "I see."

    def critic(prompt):
        action = last[case(prompt)]
        if action == "Self-disclosure":
            given["critic_invalid"] += 1
            return "Option 9"
        return option_number(prompt, TASK.verdicts[3 if action == "Question" else 1])

    def planner(prompt):
        if (prompt.count("I hear you.") + prompt.count("I would say something.")) % 2:
            given["planner"] += 1
            return "no idea"
        return option_number(prompt, "Others")

    planner_llm = ScriptedLLM(planner)
    env = SelfPlayEnv(TASK, ScriptedLLM(system), ScriptedLLM(user),
                      Critic(TASK, ScriptedLLM(critic), num_samples=2),
                      planner=Planner(TASK, planner_llm, mode="sample", num_samples=2),
                      max_turn=3)
    return env


class Replay(Policy):
    """Plays the actions that another run recorded, case by case."""
    name = "replay"

    def __init__(self, args, task, conversations):
        super().__init__(args, task)
        self.actions = {c.case_id: [r["action"] for r in c.records] for c in conversations}

    def act(self, observations, rng, training, epsilon=0.0):
        return ([self.actions[o.conversation.case_id][o.conversation.system_turns]
                 for o in observations], [{} for _ in observations])


def plain(conversation):
    return {"turns": conversation.turns, "emotions": conversation.emotions,
            "outcome": conversation.outcome, "reward": conversation.total_reward,
            "prompt_cuts": conversation.prompt_cuts, "owner": conversation.owner,
            "records": [{k: v for k, v in r.items() if k not in NOTE_KEYS}
                        for r in conversation.records]}


def test_simulated_turns_leave_the_conversations_records_and_counters_untouched():
    cases = esc_cases(0, 8)
    env = leaky_world()
    metrics, searched = run("gdpzero", env, cases, mcts_simulations=12)
    notes = [r["search"] for c in searched for r in c.records]
    assert {k for n in notes for k in n["errors"]} == {  # the search met every kind
        "system_format_error", "user_empty", "critic_invalid", "planner_invalid"}
    replay_env = leaky_world()
    args = mcts_args(max_turn=3)
    replay_metrics, replayed = harness.evaluate(args, Replay(args, TASK, searched), replay_env,
                                                cases, "test")
    assert ([plain(c) for c in sorted(searched, key=lambda c: c.case_id)]
            == [plain(c) for c in sorted(replayed, key=lambda c: c.case_id)])
    assert unusable_counts(searched) == unusable_counts(replayed)
    assert metrics["llm_answers_unusable"] == replay_metrics["llm_answers_unusable"]


def test_the_searchs_unusable_answers_are_counted_once_each_in_the_metrics():
    """Every unusable answer the LLMs gave is counted once: in the real turns' records
    (llm_answers_unusable) or in the search that simulated it (search), by kind, with
    the simulated turns it is a rate of."""
    given = Counter()
    env = leaky_world(given)
    metrics, searched = run("gdpzero", env, esc_cases(0, 8), mcts_simulations=12,
                            mcts_parallel=3)
    search = metrics["search"]
    assert set(search["answers_unusable"]) == {"system_format", "user_empty",
                                               "critic_invalid", "planner"}
    assert (Counter(metrics["llm_answers_unusable"]) + Counter(search["answers_unusable"])
            == given)
    turns = [r for c in searched for r in c.records]
    assert search["searched_turns"] == len(turns)
    # the system LLM played every real and every simulated turn, one row each
    system_rows = sum(call[1] for call in env.system_llm.calls)
    assert search["simulated_turns"] == system_rows - len(turns)
    assert search["simulated_turns"] == sum(r["search"]["simulated_turns"] for r in turns)
    assert any(r["search"]["simulated_turns"] > r["search"]["rounds"] for r in turns)
    assert search["unusable_per_simulated_turn"] == pytest.approx(
        sum(search["answers_unusable"].values()) / search["simulated_turns"])


def test_under_prior_list_the_search_asks_for_one_option_as_prior_sample_does():
    """--prior list (--recipe original) lists candidates; the search's prior over every
    action is then asked as --prior sample asks it: the one-option question, sampled."""
    asked = {}

    def planner(mode):
        def answer(prompt):
            asked.setdefault(mode, []).append(prompt)
            return "2"
        return Planner(TASK, ScriptedLLM(answer), mode=mode, num_samples=3)

    priors = {}
    for mode in ("list", "sample"):
        env = SelfPlayEnv(TASK, ScriptedLLM(lambda prompt: "Emotion: calm\nResponse: Ok."),
                          ScriptedLLM(lambda prompt: "Okay."),
                          Critic(TASK, ScriptedLLM(lambda prompt: "1"), num_samples=1),
                          planner=planner(mode))
        observation, = env.reset([(esc_case(0), 0, 0)])
        asked[mode] = []
        priors[mode] = env.simulated_prior([env.branch(observation.conversation)])[0]
    assert asked["list"] == asked["sample"]
    assert "Which option is the most suitable" in asked["list"][0]
    assert torch.equal(priors["list"], priors["sample"])


# -- batched calls ------------------------------------------------------------------------

def call_log(env):
    return {role: list(llm.calls) for role, llm in env.llms().items()}


def test_each_simulation_step_makes_one_call_per_phase_for_the_whole_batch():
    env = sequence_env(max_turn=1)  # every simulated turn ends: one step a simulation
    args = mcts_args(max_turn=1, mcts_simulations=5, mcts_realizations=5)
    policy = make_policy(args, TASK)
    policy.attach(env)
    observations = env.reset([(case, i, i) for i, case in enumerate(esc_cases(0, 6))])
    before = call_log(env)
    policy.act(observations, None, training=False)
    after = call_log(env)
    new = {role: after[role][len(before[role]):] for role in after}
    assert new["system"] == [("chat", 6, 1)] * 5
    assert new["user"] == [("chat", 6, 1)] * 5
    assert [call[1] for call in new["critic"]] == [6] * 5
    assert new["planner"] == [("option_probs", 6)]  # the roots' prior; no node expands


def test_deeper_searches_share_their_calls_across_the_batch():
    env = sequence_env(max_turn=3)
    args = mcts_args(max_turn=3, mcts_simulations=8)
    policy = make_policy(args, TASK)
    policy.attach(env)
    observations = env.reset([(case, i, i) for i, case in enumerate(esc_cases(0, 6))])
    before = len(env.system_llm.calls)
    trees = policy.search(observations, evaluation=True)
    calls = env.system_llm.calls[before:]
    assert sum(call[1] for call in calls) == sum(tree.rounds for tree in trees)
    assert len(calls) <= 8 * 3 < sum(tree.rounds for tree in trees)



def test_parallel_simulations_share_each_rounds_calls():
    """--mcts_parallel 5: the 10 simulations of 6 trees in 2 rounds of 30 rows, where one
    after another makes 10 rounds of 6."""
    env = sequence_env(max_turn=1)
    args = mcts_args(max_turn=1, mcts_simulations=10, mcts_realizations=10, mcts_parallel=5)
    policy = make_policy(args, TASK)
    policy.attach(env)
    observations = env.reset([(case, i, i) for i, case in enumerate(esc_cases(0, 6))])
    before = call_log(env)
    trees = policy.search(observations, evaluation=True)
    new = {role: call_log(env)[role][len(before[role]):] for role in before}
    assert new["system"] == [("chat", 30, 1)] * 2
    assert [call[1] for call in new["critic"]] == [30] * 2
    assert all(tree.rounds == 2 and tree.nodes[()].total == 10 for tree in trees)
    assert all(sum(node.pending) == 0 for tree in trees for node in tree.nodes.values()
               if node.pending)


def test_pending_descents_count_as_visits():
    """Where every turn is worth Q_0, values never move, so PUCT's choices depend on the
    visit counts alone: descents under way counted as visits make a parallel search visit
    the root's actions exactly as one simulation after another does."""
    same = TASK.verdicts[1]  # "feels the same": -0.5, given as Q_0 below

    def root_visits(parallel):
        env = sequence_env(max_turn=2)
        env.critic = Critic(TASK, ScriptedLLM(lambda prompt: option_number(prompt, same)),
                            num_samples=2)
        _, conversations = run("gdpzero", env, esc_cases(0, 2), mcts_simulations=12,
                               mcts_q0=TASK.reward.rewards[1], mcts_parallel=parallel)
        return [{c["action"]: c["visits"] for c in conv.records[0]["search"]["tree"]}
                for conv in conversations]

    one_by_one = root_visits(1)
    assert len(set(one_by_one[0].values())) > 1  # unequal visits, following the prior
    assert root_visits(4) == one_by_one


def test_every_parallel_descent_backs_up_its_value():
    """Every turn is judged alike: a success ("feels better", reward 0.5), which backs up
    the releases' success value 1.0, not its reward and not Q_0: each action tried at the
    root then has exactly that value, whichever descent of a round brought it."""
    better = TASK.verdicts[2]
    assert TASK.reward.rewards[2] != mcts.SUCCESS_VALUE == 1.0
    env = sequence_env(max_turn=2)
    env.critic = Critic(TASK, ScriptedLLM(lambda prompt: option_number(prompt, better)),
                        num_samples=2)
    _, conversations = run("gdpzero", env, esc_cases(0, 2), mcts_simulations=12,
                           mcts_q0=0.0, mcts_parallel=4)
    for conversation in conversations:
        tree = conversation.records[0]["search"]["tree"]
        assert sum(child["visits"] for child in tree) == 12
        assert {child["value"] for child in tree} == {mcts.SUCCESS_VALUE}


def test_parallel_simulations_find_the_two_step_success():
    metrics, _ = run("gdpzero", sequence_env(max_turn=2), esc_cases(0, 10),
                     mcts_simulations=40, mcts_parallel=4)
    assert metrics["SR"] >= 0.9

# -- the prefix cache of a copy ------------------------------------------------------------

def test_a_copy_starts_from_its_nearest_ancestors_cached_prompt():
    cache = PrefixCache(2**30)
    cache.put((1, "system"), [1, 2, 3], [])
    cache.put((9, "system"), [7, 7], [])  # the role's latest entry
    cache.branch(2, 1)
    cache.branch(3, 2)
    assert cache.get((3, "system"))[0] == [1, 2, 3]
    cache.put((2, "system"), [1, 2, 3, 4], [])
    assert cache.get((3, "system"))[0] == [1, 2, 3, 4]
    cache.forget(2)
    assert cache.get((3, "system"))[0] == [1, 2, 3, 4]  # the latest entry of the role
    cache.forget(3)
    assert cache.get((3, "user")) is None and not cache.parents


def test_a_copys_first_prompt_extends_its_parents_cached_prompt(tiny_llm_dir):
    """Another conversation's prompt is the role's latest entry; the copy still starts
    from its parent's, which shares the whole conversation so far."""
    llm = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32",
                                          prefix_cache_gb=1.0)
    env = SelfPlayEnv(TASK, llm, llm, Critic(TASK, llm, num_samples=1, max_new_tokens=2),
                      planner=Planner(TASK, ScriptedLLM(None)), max_turn=3,
                      system_max_new_tokens=4, user_max_new_tokens=4)
    parent, other = [o.conversation for o in env.reset([(case, i, i) for i, case in
                                                        enumerate(esc_cases(0, 2))])]
    env.step([parent], ["Question"])
    env.step([parent], ["Question"])
    env.step([other], ["Question"])  # the latest system prompt is the other's
    copy = env.branch(parent)
    ids = chat_prompt(llm.tokenizer, env.system_prompt(copy, "Question"))[1]

    def shared(key):
        cached = llm.prefix_cache.entries[(key, "system")][0]
        return next((i for i, (a, b) in enumerate(zip(ids, cached)) if a != b),
                    min(len(ids), len(cached)))
    llm.stats.clear()
    env.play_system([copy], ["Question"], [TurnRecord(turn=1, action="Question")], 0.0)
    assert llm.stats["prompt_tokens_reused"] > shared(other.uid) + 10
    assert llm.stats["prompt_tokens_reused"] >= shared(parent.uid) - 1


# -- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [
    ["--mode", "test", "--policy", "gdpzero", "--mcts_simulations", "0"],
    ["--mode", "train", "--policy", "dpdp", "--dpdp_threshold", "1.5"],
    ["--mode", "train", "--policy", "dpdp", "--dpdp_percentile", "1.5"],
    ["--mode", "test", "--policy", "gdpzero", "--dpdp_percentile", "0.5"]])
def test_bad_search_settings_stop_with_one_error_line_before_any_model_loads(flags, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr(harness, "load_llms", lambda args: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit, match="2"):
        train_model.main(["--data_name", "esc", *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --")


def test_a_search_without_the_environment_says_so():
    policy = make_policy(mcts_args(), TASK)
    with pytest.raises(RuntimeError, match="attach"):
        policy.act([], None, training=False)


# -- the command line -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_gdpzero_test_run_keeps_each_turns_tree_for_the_page(tmp_path, tiny_encoder_dir):
    """train_model.py --policy gdpzero on the scripted models: every turn's record holds
    its tree, and view.py puts it on the page."""

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"esc-{split}.txt").write_text(
            "".join(json.dumps(esc_case(i)) + "\n" for i in range(3)))
    with scripted_models():
        _, run_dir = train_model.main([
            "--data_name", "esc", "--data_dir", str(data), "--encoder", tiny_encoder_dir,
            "--mode", "test", "--policy", "gdpzero", "--mcts_simulations", "4",
            "--max_turn", "2", "--critic_samples", "2", "--progress", "false",
            "--device", "cpu", "--output_dir", str(tmp_path / "runs")])
    with open(os.path.join(run_dir, "test_conversations.jsonl")) as f:
        records = [r for line in f for r in json.loads(line)["records"]]
    assert records and all(r["policy"] == "gdpzero" for r in records)
    for record in records:
        assert sum(child["visits"] for child in record["search"]["tree"]) == 4
        assert record["search"]["tree"][0]["action"] == record["action"]
    html, _ = view.build_page([run_dir])
    assert '\\"search\\":{\\"simulations\\":4' in html or '"search":{"simulations":4' in html


# -- DPDP: a fast policy (PPDPP's classifier), the MCTS when it is unsure -------------------

def dpdp_args(encoder_dir, **values):
    return mcts_args(**{"policy": "dpdp", "mode": "train", "policy_encoder": encoder_dir,
                        "ppdpp_sft": False, "ppdpp_max_length": 64} | values)


def dpdp_run(encoder_dir, threshold, env, cases, **values):
    """A DPDP policy (its weights drawn from seed 0) tested at the threshold."""
    args = dpdp_args(encoder_dir, dpdp_threshold=threshold, max_turn=env.max_turn, **values)
    torch.manual_seed(0)
    policy = make_policy(args, TASK)
    policy.attach(env)
    metrics, conversations = harness.evaluate(args, policy, env, cases, "test")
    return policy, metrics, conversations


def actions_by_case(conversations):
    return {c.case_id: [r["action"] for r in c.records] for c in conversations}


def test_dpdp_at_threshold_0_acts_as_its_fast_policy(tiny_encoder_dir):

    cases = esc_cases(0, 6)
    dpdp, metrics, conversations = dpdp_run(tiny_encoder_dir, 0.0, sequence_env(3), cases)
    args = dpdp_args(tiny_encoder_dir, policy="ppdpp", max_turn=3)
    ppdpp = PPDPPPolicy(args, TASK)
    ppdpp.net.load_state_dict(dpdp.fast.net.state_dict())
    _, alone = harness.evaluate(args, ppdpp, sequence_env(3), cases, "test")
    assert actions_by_case(conversations) == actions_by_case(alone)
    turns = sum(len(c.records) for c in conversations)
    assert metrics["dpdp"] == {"fast": turns, "mcts": 0}
    assert all("search" not in r for c in conversations for r in c.records)


def test_dpdp_at_threshold_1_acts_as_the_mcts_unless_the_fast_policy_is_certain(
        tiny_encoder_dir):
    cases = esc_cases(0, 6)
    _, metrics, conversations = dpdp_run(tiny_encoder_dir, 1.0, sequence_env(2), cases,
                                         mcts_simulations=40)
    _, searched = run("gdpzero", sequence_env(2), cases, mcts_simulations=40)
    assert actions_by_case(conversations) == actions_by_case(searched)
    assert metrics["SR"] == 1.0
    turns = sum(len(c.records) for c in conversations)
    assert metrics["dpdp"] == {"fast": 0, "mcts": turns}
    assert all(r["fast_gap"] < 1.0 for c in conversations for r in c.records)


@pytest.mark.parametrize("threshold, acting", [(0.04, "fast"), (0.3, "mcts")])
def test_dpdp_compares_the_gap_between_the_fast_policys_top_two_actions(tiny_encoder_dir,
                                                                       threshold, acting):
    """DPDP's rule (agent.select_action): the fast policy acts when its most probable
    action leads the second by at least the threshold; its top probability (0.45 here)
    does not decide."""
    args = dpdp_args(tiny_encoder_dir, dpdp_threshold=threshold, mcts_simulations=2)
    policy = make_policy(args, TASK)
    probs = torch.tensor([0.45, 0.4] + [0.15 / 6] * 6)
    with torch.no_grad():  # the same distribution in every state
        policy.fast.net.classifier.weight.zero_()
        policy.fast.net.classifier.bias.copy_(probs.log())
    env = sequence_env(2)
    policy.attach(env)
    observations = env.reset([(case, i, i) for i, case in enumerate(esc_cases(0, 2))])
    actions, notes = policy.act(observations, None, training=False)
    assert [n["dpdp"] for n in notes] == [acting] * 2
    assert notes[0]["fast_gap"] == pytest.approx(0.05, abs=1e-4)
    if acting == "fast":
        assert actions == [TASK.action_names[0]] * 2


# -- DPDP's percentile threshold (--dpdp_percentile) ----------------------------------------

def scripted_gaps(policy):
    """The fast policy's distribution made to order: in a conversation whose opening turn
    (the case's situation) is "gap G", its first action leads the seven others by G (G in
    eighths, so that every sum is exact)."""
    def distribution(turns):
        gap = float(turns[0][1].split()[1])
        rest = (1.0 - gap) / 8
        return [rest + gap] + [rest] * 7

    policy.fast.inputs = lambda conversations: conversations
    policy.fast.probabilities = lambda conversations: torch.tensor(
        [distribution(turns) for turns in conversations])


def act_on_gaps(policy, env, batches):
    """Act (testing) on batches of conversations with the given gaps; the notes of each
    batch."""
    notes = []
    for gaps in batches:
        cases = [esc_case(i) | {"situation": f"gap {gap}"} for i, gap in enumerate(gaps)]
        observations = env.reset([(case, i, i) for i, case in enumerate(cases)])
        notes.append(policy.act(observations, None, training=False)[1])
    return notes


def percentile_policy(encoder_dir, percentile, threshold=0.3):
    policy = make_policy(dpdp_args(encoder_dir, dpdp_threshold=threshold,
                                   dpdp_percentile=percentile, mcts_simulations=2), TASK)
    scripted_gaps(policy)
    return policy


def test_dpdp_percentile_threshold_is_the_percentile_of_the_earlier_batches_gaps(
        tiny_encoder_dir):
    """DPDP's mcts_applied_ratio 0.5: the median of the gaps decided before, the fixed
    threshold (0.3) until 2 are known; a batch's conversations all decide on the gaps of
    earlier batches, and the fast policy acts on a gap strictly above the threshold."""
    env = sequence_env(2)
    policy = percentile_policy(tiny_encoder_dir, 0.5)
    policy.attach(env)
    batches = [[0.5], [0.125], [0.25, 0.75], [0.375, 0.375], [0.625]]
    notes = act_on_gaps(policy, env, batches)
    thresholds = [n["dpdp_threshold_used"] for batch in notes for n in batch]
    assert thresholds == [0.3, 0.3, 0.3125, 0.3125, 0.375, 0.375, 0.375]
    assert [n["dpdp"] for batch in notes for n in batch] == [
        "fast", "mcts", "mcts", "fast", "mcts", "mcts", "fast"]


def test_dpdp_percentile_threshold_follows_numpy_s_percentile(tiny_encoder_dir):
    """Any R: the threshold of each batch is numpy.percentile(earlier gaps, 100 R)."""
    import numpy as np

    env = sequence_env(2)
    policy = percentile_policy(tiny_encoder_dir, 0.3)
    policy.attach(env)
    batches = [[0.25], [0.5, 0.125], [0.875], [0.0, 0.625, 0.375], [0.75], [0.25]]
    notes = act_on_gaps(policy, env, batches)
    known = []
    for gaps, batch in zip(batches, notes):
        expected = np.percentile(known, 30) if len(known) >= 2 else 0.3
        for gap, note in zip(gaps, batch):
            assert note["dpdp_threshold_used"] == pytest.approx(expected, abs=1e-4)
            assert note["dpdp"] == ("fast" if gap > expected else "mcts")
        known += gaps


@pytest.mark.parametrize("percentile, acting", [(0.0, ["fast", "mcts", "fast", "fast"]),
                                                (1.0, ["mcts"] * 4)])
def test_dpdp_percentile_0_is_the_fast_policy_unless_its_top_two_tie_and_1_is_the_mcts(
        tiny_encoder_dir, percentile, acting):
    """DPDP's extremes: threshold 0 or 1 from the first decision on (not the fixed
    threshold, 0.3 here), compared strictly: at 0 a tie (gap 0) is the MCTS's, at 1 even a
    certain fast policy (gap 1) leaves it to the MCTS."""
    env = sequence_env(2)
    policy = percentile_policy(tiny_encoder_dir, percentile)
    policy.attach(env)
    notes = act_on_gaps(policy, env, [[0.125], [0.0], [1.0], [0.5]])
    assert [n["dpdp"] for batch in notes for n in batch] == acting
    assert all(n["dpdp_threshold_used"] == percentile for batch in notes for n in batch)


def test_dpdp_percentile_gaps_start_afresh_with_each_evaluation(tiny_encoder_dir):
    """The gaps are those of one harness.evaluate: a second evaluation (a test after the
    valid ones of training) decides as the first did, its first turns on the fixed
    threshold."""
    args = dpdp_args(tiny_encoder_dir, dpdp_threshold=0.3, dpdp_percentile=0.5,
                     mcts_simulations=2, max_turn=2, num_envs=2)
    policy = make_policy(args, TASK)
    scripted_gaps(policy)
    cases = [esc_case(i) | {"situation": f"gap {gap}"}
             for i, gap in enumerate([0.125, 0.5, 0.75, 0.25])]
    records = []
    for _ in range(2):
        env = sequence_env(2)
        policy.attach(env)
        _, conversations = harness.evaluate(args, policy, env, cases, "test")
        records.append([(r["dpdp_threshold_used"], r["dpdp"], r["action"])
                        for c in conversations for r in c.records])
    assert records[0][0][0] == 0.3
    assert records[1] == records[0]


def test_a_dpdp_replay_takes_the_percentile_of_its_checkpoint_and_refuses_one_without(
        tmp_path):
    """--dpdp_percentile is one of dpdp's test flags: a replay takes the checkpoint's; a
    checkpoint written before the flag existed is refused, as for any test flag, unless
    the flag is given."""
    from safetensors.torch import save_file

    path = str(tmp_path / "best.pt")
    save_file({"net.classifier.weight": torch.zeros(1)}, path)
    args = Args(data_name="esc", mode="test", policy="dpdp", checkpoint=path)
    saved = vars(Args(**vars(args) | {"dpdp_percentile": 0.25}))
    with open(path + ".json", "w") as f:
        json.dump({"args": saved}, f)
    assert train_model.replay_settings(args, frozenset(), TASK).dpdp_percentile == 0.25
    del saved["dpdp_percentile"]
    with open(path + ".json", "w") as f:
        json.dump({"args": saved}, f)
    with pytest.raises(train_model.UserError, match="does not record --dpdp_percentile"):
        train_model.replay_settings(args, frozenset(), TASK)
    given = Args(**vars(args) | {"dpdp_percentile": -1.0})
    assert train_model.replay_settings(given, frozenset({"dpdp_percentile"}),
                                       TASK).dpdp_percentile == -1.0


def test_dpdp_training_breaks_visit_ties_by_the_fast_prior(tiny_encoder_dir):
    """In self-play the search's prior is the fast policy's: of two actions visited alike,
    the one it finds more probable is played, not the LLM planner's favourite. Here the
    fast policy puts 0.6 on "Question" and 0.4 on "Others", which the LLM planner ranks
    first; every turn is worth Q_0, so two simulations visit each once."""
    args = dpdp_args(tiny_encoder_dir, max_turn=1, mcts_simulations=2,
                     mcts_q0=TASK.reward.rewards[1])
    policy = make_policy(args, TASK)
    probs = torch.full((len(TASK.action_names),), 1e-6)
    probs[TASK.action_names.index(FIRST)], probs[TASK.action_names.index(DECOY)] = 0.6, 0.4
    with torch.no_grad():
        policy.fast.net.classifier.weight.zero_()
        policy.fast.net.classifier.bias.copy_(probs.log())
    env = sequence_env(1)
    policy.attach(env)
    observations = env.reset([(case, i, i) for i, case in enumerate(esc_cases(0, 2))])
    assert observations[0].candidates[0] == DECOY
    actions, notes = policy.act(observations, None, training=True)
    assert [c["visits"] for c in notes[0]["search"]["tree"]] == [1, 1]
    assert actions == [FIRST] * 2


def test_the_dpdp_update_is_actor_critic_on_discounted_returns(tiny_encoder_dir):
    """DPDP's optimize_model: G the discounted returns (not normalised), the critic's loss
    mean((Q(s, a) - G)^2), the actor's mean(-log pi(a | s) (G - Q(s, a)))."""

    torch.manual_seed(0)
    policy = make_policy(dpdp_args(tiny_encoder_dir, ppdpp_gamma=0.5, ppdpp_dropout=0.0),
                         TASK)
    rewards, actions = [-0.5, -0.25, 1.0], ["Question", "Others", "Information"]
    turns = [("Patient", "I feel low.")]
    for n in range(3):
        turns += [("Therapist", f"Reply {n}."), ("Patient", f"Answer {n}.")]
    conversation = Conversation(case=esc_cases(0, 1)[0], turns=turns, records=[
        {"action": a, "reward": r} for a, r in zip(actions, rewards)])
    states = policy.fast.inputs([turns[:1], turns[:3], turns[:5]])
    index = [TASK.action_names.index(a) for a in actions]
    policy.fast.net.eval()
    policy.q_head.eval()
    with torch.no_grad():
        log_probs = policy.fast.logits(states).log_softmax(-1)[range(3), index]
        values = policy.q_head(policy.features)[range(3), index]
    returns = torch.tensor([-0.5 + 0.5 * (-0.25 + 0.5 * 1.0), -0.25 + 0.5 * 1.0, 1.0])
    actor, critic = policy.update(conversation)
    assert critic == pytest.approx(((values - returns) ** 2).mean().item(), rel=1e-4)
    assert actor == pytest.approx((-log_probs * (returns - values)).mean().item(), rel=1e-4)
    with torch.no_grad():
        after = policy.fast.logits(states).log_softmax(-1)[range(3), index]
    advantage = returns - values
    assert ((after - log_probs)[advantage.abs() > 0.1].sign()
            == advantage[advantage.abs() > 0.1].sign()).all()


def one_action_env():
    """One turn: success only when the Therapist plays "Information", which the prior ranks
    last; every other action leaves the patient the same."""
    winner = "Information"

    def system(prompt):
        instruction = prompt[prompt.rindex("("):]
        action = next(a for a in TASK.action_names if TASK.actions[a] in instruction)
        return f"Emotion: calm\nResponse: I hear you ({action})."

    def critic(prompt):
        return option_number(prompt, TASK.verdicts[3 if played(prompt)[-1] == winner else 1])

    prior = ScriptedLLM(None, prior=lambda prompt, labels: [
        0.1 if n == winner else 1.0 for n in listed_options(prompt)])
    return SelfPlayEnv(TASK, ScriptedLLM(system), ScriptedLLM(lambda prompt: "Okay."),
                       Critic(TASK, ScriptedLLM(critic), num_samples=2),
                       planner=Planner(TASK, prior), max_turn=1)


@pytest.mark.slow
def test_dpdp_self_play_teaches_the_fast_policy_the_mcts_choices(tiny_encoder_dir, tmp_path):
    """Training: every turn is the MCTS's, which finds the one action that succeeds; the
    fast policy learns it, so that afterwards it acts alone (threshold 0) and succeeds."""

    class Writer:
        def add_scalar(self, *args):
            pass

    env = one_action_env()
    args = dpdp_args(tiny_encoder_dir, max_turn=1, mcts_simulations=20, total_episodes=48,
                     eval_every=48, num_envs=8, ppdpp_learning_rate=1e-3)
    torch.manual_seed(0)
    policy = make_policy(args, TASK)
    policy.attach(env)
    train(args, policy, env, esc_cases(0, 48), esc_cases(50, 2), str(tmp_path), Writer())
    trained = [r for line in open(tmp_path / "train_conversations.jsonl")
               for r in json.loads(line)["records"]]
    assert all(r["dpdp"] == "mcts" for r in trained)
    _, before, _ = dpdp_run(tiny_encoder_dir, 0.0, one_action_env(), esc_cases(100, 8))
    fast = make_policy(dpdp_args(tiny_encoder_dir, max_turn=1, dpdp_threshold=0.0), TASK)
    fast.load(str(tmp_path / "last.pt"))
    fast.attach(env)
    after, _ = harness.evaluate(args, fast, env, esc_cases(100, 8), "test")
    print(f"the fast policy alone: SR {before['SR']} before self-play, {after['SR']} after")
    assert before["SR"] <= 0.25
    assert after["SR"] == 1.0 and after["dpdp"] == {"fast": 8, "mcts": 0}


@pytest.mark.slow
def test_a_dpdp_run_trains_tests_its_checkpoint_and_counts_each_system(tmp_path,
                                                                     tiny_encoder_dir):

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"esc-{split}.txt").write_text(
            "".join(json.dumps(esc_case(i)) + "\n" for i in range(3)))
    common = ["--data_name", "esc", "--data_dir", str(data), "--encoder", tiny_encoder_dir,
              "--policy", "dpdp", "--policy_encoder", tiny_encoder_dir, "--max_turn", "2",
              "--critic_samples", "2", "--progress", "false", "--device", "cpu",
              "--mcts_simulations", "3", "--ppdpp_max_length", "64",
              "--output_dir", str(tmp_path / "runs")]
    with scripted_models():
        _, trained = train_model.main(common + ["--ppdpp_sft", "false", "--total_episodes",
                                                "4", "--eval_every", "2"])
        _, tested = train_model.main(common + ["--mode", "test", "--dpdp_threshold", "1.0",
                                               "--checkpoint",
                                               os.path.join(trained, "best.pt")])
    with open(os.path.join(tested, "test_metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(trained, "train_history.jsonl")) as f:
        updates = [json.loads(line) for line in f if '"update"' in line]
    with open(os.path.join(tested, "test_conversations.jsonl")) as f:
        turns = sum(len(json.loads(line)["records"]) for line in f)
    assert len(updates) == 4 and all("critic_loss" in u for u in updates)
    assert metrics["dpdp"] == {"fast": 0, "mcts": turns}
