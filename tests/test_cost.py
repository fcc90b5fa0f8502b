"""What each planner costs: the LLM clients' ledgers (llm.LLMClient.charge), a finished
conversation's cost settled by the environment (SelfPlayEnv.settle_cost), its summary in
test_metrics.json (harness.summarize, policy_cost) and report.py's cost table."""

import json
import os
import random
from collections import Counter, defaultdict

import httpx
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import harness
import report
import run_state
import train_model
import trainer
from conftest import (ScriptedLLM, esc_case, esc_cases, harm_world, interrupt_at_system_call,
                      q_policy, scripted_llms)
from get_args import Args
from llm import COST_COUNTS
from llm_openai import OpenAILLM, answer_counts
from llm_transformers import TransformersLLM
from policies import POLICIES, policy_class
from q_adapter import FrozenEncoder
from tasks import get_task

TASK_ESC = get_task("esc")

TOKEN_COUNTS = ("calls", "prompt_tokens", "prompt_tokens_reused", "generated_tokens")


def logged_costs(clients, owners=None, prior_read=True):
    """Each conversation's cost by the scripted clients' own logs (clients shared by roles
    read once): {uid: {"conversation" | "planner" [| "unread_prior"]: Counter}}. A planner
    call, and any call of a simulated copy (owners: copy uid -> its conversation), is the
    planner's; with prior_read False the conversation's own planner calls are
    "unread_prior"."""
    parts = ("conversation", "planner") + (() if prior_read else ("unread_prior",))
    costs = defaultdict(lambda: {part: Counter() for part in parts})
    for llm in {id(llm): llm for llm in clients}.values():
        for call in llm.log:
            for (uid, role), prompt_tokens, generated_tokens in call:
                owner = (owners or {}).get(uid, uid)
                if owner != uid:
                    part = "planner"
                elif role != "planner":
                    part = "conversation"
                else:
                    part = "planner" if prior_read else "unread_prior"
                costs[owner][part].update(calls=1, prompt_tokens=prompt_tokens,
                                          generated_tokens=generated_tokens)
    return costs


def token_counts(cost):
    """A settled cost's counts that do not vary between runs (all but seconds)."""
    return {part: {name: cost[part][name] for name in TOKEN_COUNTS} for part in cost}


def expected_counts(logged):
    return {part: {name: logged[part][name] for name in TOKEN_COUNTS} for part in logged}


def write_data(root, count):
    data = os.path.join(root, "data")
    os.makedirs(data)
    with open(os.path.join(data, "esc-test.txt"), "w") as f:
        f.writelines(json.dumps(esc_case(i)) + "\n" for i in range(count))
    for split, first in (("train", 100), ("valid", 200)):
        with open(os.path.join(data, f"esc-{split}.txt"), "w") as f:
            f.writelines(json.dumps(esc_case(first + i)) + "\n" for i in range(4))
    return data


def run_args(root, data, encoder, *extra):
    return ["--data_name", "esc", "--data_dir", data, "--encoder", encoder, "--max_turn", "3",
            "--critic_samples", "2", "--num_envs", "4", "--progress", "false",
            "--device", "cpu", "--seed", "1", "--output_dir", os.path.join(root, "runs"),
            "--max_encoder_tokens", "64", *extra]


def read_run(folder, name="test"):
    with open(os.path.join(folder, f"{name}_metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(folder, f"{name}_conversations.jsonl")) as f:
        return metrics, [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True], ids=["own clients", "planner=critic"])
def test_a_scripted_run_costs_exactly_what_its_clients_logged(shared, tmp_path,
                                                               tiny_encoder_dir, monkeypatch):
    llms = scripted_llms()
    if shared:  # one client answers two roles: its calls must be counted once
        llms["planner"] = llms["critic"] = ScriptedLLM(llms["critic"].reply,
                                                       prior=llms["planner"].prior)
    monkeypatch.setattr(harness, "load_llms", lambda args: llms)
    data = write_data(str(tmp_path), 6)
    _, folder = train_model.main(run_args(str(tmp_path), data, tiny_encoder_dir,
                                          "--mode", "test", "--policy", "prior"))
    metrics, conversations = read_run(folder)
    logged = logged_costs(llms.values())
    assert all(key is not None for llm in llms.values() for call in llm.log
               for key, _, _ in call)  # every call of the run names its conversation
    # one logged conversation per played one, each with the cost of its line
    assert len(logged) == len(conversations) == 6
    assert sorted(json.dumps(token_counts(c["cost"]), sort_keys=True) for c in conversations) \
        == sorted(json.dumps(expected_counts(c), sort_keys=True) for c in logged.values())
    assert all(c["cost"]["planner"]["calls"] > 0 and c["cost"]["planner"]["generated_tokens"]
               == 0 for c in conversations)  # the prior reads option probabilities only
    # test_metrics.json: the means per conversation, and None for what was not counted
    means = metrics["cost"]["per_conversation"]
    for part in ("conversation", "planner"):
        for name in ("calls", "prompt_tokens", "generated_tokens"):
            total = sum(cost[part][name] for cost in logged.values())
            assert means[part][name] == pytest.approx(total / 6)
            assert means["total"][name] == pytest.approx(
                means["conversation"][name] + means["planner"][name])
    assert means["total"]["requests"] is None and means["total"]["seconds"] >= 0
    assert metrics["cost"]["planner_share"] == pytest.approx(
        means["planner"]["tokens"] / means["total"]["tokens"])
    assert metrics["policy_cost"] == {"trainable_parameters": 0, "training_seconds": 0.0,
                                      "update_seconds": 0.0}
    for llm in llms.values():
        assert not [key for key in llm.ledger if key is not None]  # all settled


@pytest.mark.slow
def test_training_records_the_policy_parameters_and_seconds(tmp_path, tiny_encoder_dir,
                                                           monkeypatch):
    monkeypatch.setattr(harness, "load_llms", lambda args: scripted_llms())
    data = write_data(str(tmp_path), 4)
    common = run_args(str(tmp_path), data, tiny_encoder_dir)
    metrics, folder = train_model.main(common + [
        "--total_episodes", "4", "--eval_every", "2", "--batch_size", "2",
        "--learning_starts", "2", "--exp_name", "trained"])
    cost = metrics["policy_cost"]
    assert cost["trainable_parameters"] > 0 and cost["training_seconds"] > 0
    assert 0 < cost["update_seconds"] < cost["training_seconds"]
    with open(os.path.join(folder, "last.pt.json")) as f:
        assert json.load(f)["metrics"]["policy_cost"] == cost
    train_metrics, train_conversations = read_run(folder, "train")
    assert train_metrics["policy_cost"] == cost
    assert train_metrics["cost"]["conversations"] == len(train_conversations) == 4
    assert all(c["cost"]["conversation"]["calls"] > 0 for c in train_conversations)
    # a test of the checkpoint alone: the training seconds are those best.pt was saved with
    best = os.path.join(folder, "best.pt")
    with open(best + ".json") as f:
        saved = json.load(f)["metrics"]["policy_cost"]
    tested, _ = train_model.main(common + ["--mode", "test", "--checkpoint", best,
                                           "--exp_name", "replay"])
    assert tested["policy_cost"] == saved and 0 < saved["training_seconds"]
    assert saved["training_seconds"] <= cost["training_seconds"]
    # report.py tables the cost of both runs
    text = open(report.main([os.path.join(str(tmp_path), "runs"), "--out",
                             str(tmp_path / "report"), "--n_boot", "50"])).read()
    table = text.split("## Cost")[1].split("##")[0]
    for header in report.COSTS:
        assert header in table
    row = next(line for line in table.splitlines() if line.startswith("| esc | dialogxpert"))
    assert f"| {cost['trainable_parameters']:,} |" in row
    assert os.path.isfile(tmp_path / "report" / "cost.png")


def test_a_simulated_copy_is_its_owner_planner_cost():
    world = harm_world()
    env = world.env(max_turn=2)
    [observation] = env.reset([(esc_case(7), 7, 11)])
    real = observation.conversation
    opening = list(real.turns)
    copy = env.branch(real)
    deeper = env.branch(copy)  # a copy of a copy plans for the same real conversation
    env.step([copy], ["Question"])  # a lookahead turn, played on the copy only
    env.step([deeper], ["Others"])
    assert real.turns == opening and real.system_turns == 0
    while not real.done:
        env.step([real], ["Question"])
    clients = [world.prior, world.system, world.user, world.critic]
    logged = logged_costs(clients, env.owners | {copy.uid: real.uid, deeper.uid: real.uid})
    assert set(logged) == {real.uid}
    assert token_counts(real.cost) == expected_counts(logged[real.uid])
    # the copies' system, user and critic calls are in the planner's part, not the turns'
    copies_calls = sum(1 for llm in clients for call in llm.log for (uid, _), _, _ in call
                       if uid in (copy.uid, deeper.uid))
    own_planner = sum(1 for call in world.prior.log for (uid, _), _, _ in call if uid == real.uid)
    assert real.cost["planner"]["calls"] == own_planner + copies_calls > own_planner
    assert copy.cost is None and env.owners == {}
    assert not any(llm.ledger for llm in clients)


def test_the_critic_and_the_planner_are_charged_apart():
    """A conversation's critic calls are its own cost, its planner calls the planner's."""
    world = harm_world()
    env = world.env(max_turn=1)
    [observation] = env.reset([(esc_case(3), 3, 5)])
    env.step([observation.conversation], ["Question"])
    cost = observation.conversation.cost
    critic_calls = sum(len(call) for call in world.critic.log)
    planner_calls = sum(len(call) for call in world.prior.log)
    assert cost["conversation"]["calls"] == critic_calls + 2  # the system and user turns
    assert cost["planner"]["calls"] == planner_calls > 0


@pytest.fixture
def cached_llm(tiny_llm):
    """The tiny model with an empty prefix cache (the session's client has none)."""
    return TransformersLLM(tiny_llm.model, tiny_llm.tokenizer, prefix_cache_gb=0.01)


def chats(extra=""):
    return [[{"role": "system", "content": "You are a tutor."},
             {"role": "user", "content": "Explain fractions." + extra}],
            [{"role": "system", "content": "You are a tutor."},
             {"role": "user", "content": "What is a prime number?" + extra}]]


def decoded_lengths(llm, monkeypatch):
    """The tokens each answer decoded, in order (recorded by wrapping the tokenizer)."""
    lengths, decode = [], llm.tokenizer.decode

    def counting(ids, **kwargs):
        lengths.append(len(ids))
        return decode(ids, **kwargs)
    monkeypatch.setattr(llm.tokenizer, "decode", counting)
    return lengths


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_the_engine_charges_each_prompt_token_once_and_each_drawn_token(
        cached_llm, monkeypatch, shared_prefix):
    llm, keys, max_new = cached_llm, [("a", "system"), ("b", "system")], 6
    for turn, extra in enumerate(["", " Use pizza."]):
        llm.ledger.clear()
        lengths = decoded_lengths(llm, monkeypatch)
        prompts = chats(extra)
        before = dict(llm.stats)
        llm.chat(prompts, max_new_tokens=max_new, temperature=1.0, num_samples=3,
                 shared_prefix=shared_prefix, cache_keys=keys, seeds=[1, 2])
        monkeypatch.undo()
        rows = 1 if shared_prefix else 3  # forward rows per prompt
        for i, (key, prompt) in enumerate(zip(keys, prompts)):
            counts = llm.ledger[key]
            assert counts["calls"] == 1 and counts["requests"] is None
            assert (counts["prompt_tokens"] + counts["prompt_tokens_reused"]
                    == rows * len(llm.encode_chat(prompt)))
            # a sample that stopped early drew its stop token too
            drawn = [n if n == max_new else n + 1 for n in lengths[3 * i:3 * i + 3]]
            assert counts["generated_tokens"] == sum(drawn)
        assert all(llm.ledger[k]["prompt_tokens_reused"] > 0 for k in keys) == (turn == 1)
        for name in ("prompt_tokens", "prompt_tokens_reused", "generated_tokens"):
            assert sum(c[name] for c in llm.ledger.values()) == llm.stats[name] - before.get(
                name, 0)
        assert sum(c["seconds"] for c in llm.ledger.values()) == pytest.approx(
            llm.stats["generate_seconds"] - before.get("generate_seconds", 0))


@pytest.mark.parametrize("count", [3, 12])
def test_scoring_options_charges_the_prompt_and_the_label_prefix_read(cached_llm, count):
    llm, keys = cached_llm, [("a", "planner"), ("b", "planner")]
    labels = [str(i + 1) for i in range(count)]
    for extra in ["", " Briefly."]:
        llm.ledger.clear()
        llm.option_probs(chats(extra), labels, cache_keys=keys)
        for key, prompt in zip(keys, chats(extra)):
            counts = llm.ledger[key]
            # labels 10..12 are "1" then a digit: the row after "1" is run as well
            assert (counts["prompt_tokens"] + counts["prompt_tokens_reused"]
                    == len(llm.encode_chat(prompt)) + (count > 9))
            assert counts["generated_tokens"] == 0 and counts["calls"] == 1
            assert (counts["prompt_tokens_reused"] > 0) == bool(extra)


def test_a_call_without_keys_is_charged_to_no_conversation(tiny_llm):
    tiny_llm.ledger.clear()
    tiny_llm.chat(chats(), max_new_tokens=2)
    assert list(tiny_llm.ledger) == [None] and tiny_llm.ledger[None]["calls"] == 2


def served_client(answers):
    """A served-model client whose server is `answers`: a list of (status, JSON) given in
    turn, request after request."""
    llm = OpenAILLM("http://server.test/v1", model="m", tokenizer="none", context_length=512,
                    max_retries=2, backoff_seconds=0.0)
    replies = iter(answers)

    def server(request):
        status, body = next(replies)
        return httpx.Response(status, json=body)
    llm.http = httpx.AsyncClient(transport=httpx.MockTransport(server))
    return llm


def chat_answer(usage, **extra):
    return {"choices": [{"message": {"content": "Hello."}}], "usage": usage} | extra


@pytest.mark.slow
def test_a_served_answer_charges_the_server_counts_and_every_attempt():
    vllm = {"prompt_tokens": 50, "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 32}}
    llm = served_client([(503, {"error": "busy"}), (200, chat_answer(vllm))])
    assert llm.chat(chats()[:1], cache_keys=[(4, "user")]) == [["Hello."]]
    counts = llm.ledger[(4, "user")]
    assert {n: counts[n] for n in COST_COUNTS if n != "seconds"} == {
        "calls": 1, "requests": 2, "prompt_tokens": 18, "prompt_tokens_reused": 32,
        "generated_tokens": 5}
    # llama-server reports the cached part in its timings; llama-cpp-python not at all
    llama_server = chat_answer({"prompt_tokens": 40, "completion_tokens": 3},
                               timings={"cache_n": 30, "prompt_n": 10})
    assert answer_counts(llama_server) == {"prompt_tokens": 10, "prompt_tokens_reused": 30,
                                           "generated_tokens": 3}
    assert answer_counts(chat_answer({"prompt_tokens": 40, "completion_tokens": 3})) == {
        "prompt_tokens": 40, "prompt_tokens_reused": None, "generated_tokens": 3}
    assert answer_counts({"choices": []})["generated_tokens"] is None


def test_a_count_no_client_gave_stays_unknown_in_the_summary():
    world = harm_world()
    env = world.env(max_turn=1)
    conversations = [o.conversation for o in env.reset([(esc_case(i), i, i) for i in range(2)])]
    env.step(conversations, ["Question", "Others"])
    conversations[0].cost["planner"]["prompt_tokens_reused"] = None  # as a served client
    summary = harness.cost_summary(conversations)
    means = summary["per_conversation"]
    assert means["planner"]["prompt_tokens_reused"] is None
    assert means["total"]["prompt_tokens_reused"] is None
    assert means["conversation"]["prompt_tokens_reused"] == 0
    assert means["total"]["calls"] == pytest.approx(
        sum(c.cost[p]["calls"] for c in conversations for p in ("conversation", "planner")) / 2)
    assert summary["conversations"] == 2


def train_in_world(folder, encoder_dir, stop_at_system_call=None, resume=None):
    """Train in the harm world; with stop_at_system_call, SIGINT arrives from inside the
    system LLM's n-th answer (mid-step) and the run stops with its state saved."""
    random.seed(0)
    torch.manual_seed(0)
    args = Args(data_name="esc", total_episodes=12, num_envs=4, max_turn=3, top_k=4,
                learning_starts=4, batch_size=4, eval_every=12, checkpoint_every=100,
                hidden_size=16, progress=False, max_encoder_tokens=64)
    world = harm_world()
    if stop_at_system_call is not None:
        interrupt_at_system_call(world, stop_at_system_call)
    agent = q_policy(args, FrozenEncoder.from_pretrained(encoder_dir, max_tokens=64,
                                                         device="cpu"))
    with SummaryWriter(folder) as writer:
        trainer.train(args, agent, world.env(max_turn=3, top_k=4), esc_cases(0, 20),
                      esc_cases(100, 2), folder, writer, resume)
    _, conversations = read_run(folder, "train")
    return [token_counts(c["cost"]) for c in conversations]


@pytest.mark.slow
def test_a_resumed_run_settles_the_same_costs(tmp_path, tiny_encoder_dir):
    """The ledgers of the conversations in flight are saved with the training state."""
    straight = train_in_world(str(tmp_path / "straight"), tiny_encoder_dir)
    stopped = str(tmp_path / "stopped")
    with pytest.raises(run_state.TrainingStopped):
        train_in_world(stopped, tiny_encoder_dir, stop_at_system_call=6)
    state = run_state.load_state(stopped)
    assert state["active"] and any(state["ledgers"]["roles"].values())
    assert train_in_world(stopped, tiny_encoder_dir, resume=state) == straight


def test_a_policy_that_does_not_read_the_prior_has_its_cost_booked_apart():
    llms = scripted_llms()
    read = {}
    for name in POLICIES:
        mode = "train" if policy_class(name).trainable else "test"
        args = Args(data_name="esc", policy=name, mode=mode)
        read[name] = harness.build_env(args, TASK_ESC, llms).prior_read
    assert read == {"dialogxpert": True, "prior": True, "random": True, "uniform": False,
                    "ppdpp": False, "gdpzero": False, "dpdp": False, "none": False}


@pytest.mark.slow
def test_a_gdpzero_run_charges_its_simulations_to_each_conversations_planner(
        tmp_path, tiny_encoder_dir, monkeypatch):
    """GDP-Zero's simulated turns (copies made by SelfPlayEnv.branch) are their real
    conversation's planner cost, exactly as the scripted clients logged them; its own
    turns stay the conversation's; the observations' prior, which its search asks again
    for the root, is booked apart (unread_prior) and left out of the total."""
    from env import SelfPlayEnv

    llms = scripted_llms()
    monkeypatch.setattr(harness, "load_llms", lambda args: llms)
    owners, branch = {}, SelfPlayEnv.branch

    def recorded_branch(self, conversation, *args, **kwargs):
        copy = branch(self, conversation, *args, **kwargs)
        owners[copy.uid] = copy.owner
        return copy
    monkeypatch.setattr(SelfPlayEnv, "branch", recorded_branch)
    data = write_data(str(tmp_path), 4)
    _, folder = train_model.main(run_args(str(tmp_path), data, tiny_encoder_dir, "--mode",
                                          "test", "--policy", "gdpzero",
                                          "--mcts_simulations", "3"))
    metrics, conversations = read_run(folder)
    logged = logged_costs(llms.values(), owners, prior_read=False)
    assert owners and len(logged) == len(conversations) == 4
    assert sorted(json.dumps(token_counts(c["cost"]), sort_keys=True) for c in conversations) \
        == sorted(json.dumps(expected_counts(c), sort_keys=True) for c in logged.values())
    # the simulations' system and user turns are the planner's: it generates text now
    assert all(c["cost"]["planner"]["generated_tokens"] > 0 for c in conversations)
    # the observations' prior, asked for every real state, read by no one
    assert all(c["cost"]["unread_prior"]["calls"] > 0 for c in conversations)
    assert metrics["cost"]["planner_share"] > 0.5
    assert metrics["policy_settings"] == {"mcts_simulations": 3, "mcts_realizations": 3,
                                          "mcts_q0": 0.0, "mcts_cpuct": 1.0, "mcts_parallel": 1}
    means = metrics["cost"]["per_conversation"]
    for name in ("calls", "prompt_tokens", "generated_tokens"):
        assert means["unread_prior"][name] == pytest.approx(
            sum(cost["unread_prior"][name] for cost in logged.values()) / 4)
        assert means["total"][name] == pytest.approx(
            means["conversation"][name] + means["planner"][name])
    for llm in llms.values():
        assert not [key for key in llm.ledger if key is not None]  # all settled


def test_scoring_options_charges_add_up_to_the_engines_counts(cached_llm):
    """Labels 1..25 read two label prefixes a conversation ("1" and "2"), each a row of its
    own: every row's tokens are charged, each token once, run or reused."""
    llm, keys = cached_llm, [("a", "critic"), ("b", "critic")]
    labels = [str(i + 1) for i in range(25)]
    for extra in ["", " Briefly."]:
        llm.ledger.clear()
        before = dict(llm.stats)
        llm.option_probs(chats(extra), labels, cache_keys=keys)
        for key, prompt in zip(keys, chats(extra)):
            counts = llm.ledger[key]
            assert (counts["prompt_tokens"] + counts["prompt_tokens_reused"]
                    == 2 * (len(llm.encode_chat(prompt)) + 1))
        for name in ("prompt_tokens", "prompt_tokens_reused"):
            assert sum(c[name] for c in llm.ledger.values()) == llm.stats[name] - before.get(
                name, 0)
        assert sum(c["seconds"] for c in llm.ledger.values()) == pytest.approx(
            llm.stats["prior_seconds"] - before.get("prior_seconds", 0))
    assert all(llm.ledger[k]["prompt_tokens_reused"] > 0 for k in keys)
