"""PPDPP (--policy ppdpp, ppdpp.py) on scripted worlds with known answers and the tiny
random BERT as its encoder: the input it reads, the labels it learns from, its supervised
stage, its REINFORCE update against a closed form and in a world where one action
succeeds, exact resume, a command-line run, and the flag combinations it refuses."""

import dataclasses
import json
import os
import random

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import harness
import run_state
import tasks
import train_model
import trainer
from conftest import (DEMO, SHARED_DATA, World, esc_case, esc_cases, interrupt_at_system_call,
                      scripted_models, transformers_warnings)
from env import Conversation, Observation
from errors import UserError
from get_args import Args, parse_args
from harness import evaluate
from policies import UniformPolicy, policy_class
from ppdpp import (PPDPPPolicy, discounted_returns, labelled_examples, normalised_returns,
                   policy_input)
from tasks import get_task, read_file

ESC = get_task("esc")
# the tiny encoder learns within the tests' budgets at these rates (PPDPP's own, 6e-6 and
# 1e-6, are for RoBERTa-large)
FAST = dict(ppdpp_sft_learning_rate=3e-3, ppdpp_sft_warmup_steps=0, ppdpp_learning_rate=1e-3)


def ppdpp_args(encoder_dir, **values):
    return Args(**dict(data_name="esc", policy="ppdpp", policy_encoder=encoder_dir,
                       device="cpu", progress=False, max_turn=1, num_envs=8, top_k=4,
                       eval_every=10**6) | FAST | values)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny encoder's small matrices run several times faster on one thread than on
    two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def policy(tiny_encoder_dir):
    torch.manual_seed(0)
    return PPDPPPolicy(ppdpp_args(tiny_encoder_dir), ESC)


# ---------------------------------------------------------------------------------------
# the input: the newest whole turns, in conversation order
# ---------------------------------------------------------------------------------------

def test_the_input_keeps_the_newest_whole_turns_in_conversation_order(policy):
    tokenizer = policy.tokenizer
    turns = [("Patient", "aaa"), ("Therapist", "bbb"), ("Patient", "ccc"), ("Therapist", "ddd")]
    length = [len(tokenizer.encode(f"{r}: {t}")) for r, t in turns]  # with [CLS] and [SEP]

    def read(max_length):
        ids = policy_input(tokenizer, turns, max_length)
        assert len(ids) <= max_length
        return tokenizer.decode(ids)
    assert read(512) == ("[CLS] patient : aaa [SEP] therapist : bbb [SEP] patient : ccc [SEP] "
                         "therapist : ddd [SEP]")
    two_newest = length[2] + length[3] - 1  # one [CLS] for the two turns
    assert read(two_newest) == "[CLS] patient : ccc [SEP] therapist : ddd [SEP]"
    assert read(two_newest - 1) == "[CLS] therapist : ddd [SEP]"  # whole turns only
    # a turn that does not fit ends the walk: no older turn is read past it
    long_middle = [("Patient", "a"), ("Therapist", "b" * 300), ("Patient", "c")]
    assert tokenizer.decode(policy_input(tokenizer, long_middle, 20)) == "[CLS] patient : c [SEP]"


# ---------------------------------------------------------------------------------------
# the labelled human turns of each task
# ---------------------------------------------------------------------------------------

def test_a_turn_longer_than_the_encoder_takes_brings_no_too_long_warning(tiny_encoder_dir):
    """The input drops such a turn itself, so the tokenizer's warning does not apply."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir, model_max_length=32)
    with transformers_warnings() as warnings:
        ids = policy_input(tokenizer, [("Seeker", "a " * 100), ("Supporter", "Why?")], 32)
    assert len(ids) <= 32 and not warnings


def test_each_tasks_labels_map_onto_its_actions_and_the_rest_are_counted():
    for name, turns in (("esc", 4), ("cima", 4), ("p4g", 4), ("extes", 8)):
        cases = tasks.load_split(DEMO, name, "train")
        examples, counts = labelled_examples(get_task(name), cases)
        assert counts["examples"] == len(examples) == turns and not counts["unmapped_labels"]
        assert all(get_task(name).action_names[a] for _, a in examples)
    # the demo's cb dialogs have one system turn each, with no turn before it to act on
    _, counts = labelled_examples(get_task("cb"), tasks.load_split(DEMO, "cb", "train"))
    assert counts["examples"] == 0 and counts["system_turns"] == 0
    p4g = {"dialog": [{"speaker": "Persuadee", "text": "Hi."},
                      {"speaker": "Persuader", "text": "Could you give $2?",
                       "strategy": ["ask-donation-amount", "credibility-appeal", "other"]},
                      {"speaker": "Persuadee", "text": "Maybe."},
                      {"speaker": "Persuader", "text": "Great!", "strategy": ["praise-user"]},
                      {"speaker": "Persuadee", "text": "Sure."},
                      {"speaker": "Persuader", "text": "Thanks."}]}
    examples, counts = labelled_examples(get_task("p4g"), [p4g])
    names = get_task("p4g").action_names
    assert [(len(t), names[a]) for t, a in examples] == [
        (1, "Proposition of amount to be donated"), (1, "Credibility appeal")]
    assert counts == {"system_turns": 3, "unlabelled_turns": 1, "unmapped_turns": 1,
                      "examples": 2, "unmapped_labels": {"other": 1, "praise-user": 1}}


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="no development data here")
def test_the_development_splits_labels_all_map_but_p4gs_own_acts():
    for name, path in (("esc", "esc-valid.txt"), ("cima", "cima-valid.txt"),
                       ("cb", "cb-valid.txt"), ("p4g", os.path.join("P4G", "dev.json"))):
        _, counts = labelled_examples(get_task(name), read_file(os.path.join(SHARED_DATA, path),
                                                                name))
        print(name, counts)
        assert counts["examples"] > 100
        assert bool(counts["unmapped_labels"]) == (name == "p4g")


# ---------------------------------------------------------------------------------------
# stage 1: the supervised stage fits a labelled set
# ---------------------------------------------------------------------------------------

WORD_LABELS = {"rain": "Question", "sunny": "Others", "snow": "Information",
               "windy": "Self-disclosure"}


def labelled_cases(first, count):
    """esc cases whose labelled Therapist turn follows a Patient turn of one word that
    names its strategy; then a turn labelled with no action's name and one unlabelled."""
    words = sorted(WORD_LABELS)
    return [esc_case(i) | {"dialog": [
        {"speaker": "sys", "text": "Hi.", "strategy": "Question"},  # nothing before it
        {"speaker": "usr", "text": words[i % 4]},
        {"speaker": "sys", "text": "I see.", "strategy": WORD_LABELS[words[i % 4]]},
        {"speaker": "usr", "text": "Ok."},
        {"speaker": "sys", "text": "Well.", "strategy": "Chit-chat"},
        {"speaker": "usr", "text": "Bye."}, {"speaker": "sys", "text": "Bye."}]}
        for i in range(first, first + count)]


@pytest.mark.slow
def test_the_supervised_stage_fits_a_labelled_set(tiny_encoder_dir):
    torch.manual_seed(0)
    args = ppdpp_args(tiny_encoder_dir, ppdpp_sft_epochs=30, ppdpp_sft_batch_size=8)
    agent = PPDPPPolicy(args, ESC)
    # the whole encoder is trained, not the classifier alone
    assert agent.trainable_parameters() == sum(p.numel() for p in agent.net.parameters())
    query = agent.net.encoder.encoder.layer[0].attention.self.query.weight
    before = query.detach().clone()
    history = agent.before_training(labelled_cases(0, 48), labelled_cases(1000, 12))
    assert not torch.equal(before, query)
    *epochs, summary = history
    print(*epochs, summary, sep="\n")
    assert len(epochs) == 30 and summary["train"] == {
        "system_turns": 144, "unlabelled_turns": 48, "unmapped_turns": 48, "examples": 48,
        "unmapped_labels": {"Chit-chat": 48}}
    kept = epochs[summary["kept_epoch"] - 1]
    assert kept["valid_macro_precision"] == max(e["valid_macro_precision"] for e in epochs)
    assert epochs[-1]["train_accuracy"] >= 0.95 and kept["valid_accuracy"] >= 0.95
    assert epochs[-1]["sft_loss"] < epochs[0]["sft_loss"] / 4
    examples, _ = labelled_examples(ESC, labelled_cases(2000, 12))
    predicted = agent.predict(agent.inputs([t for t, _ in examples]))
    assert sum(p == a for p, (_, a) in zip(predicted, examples)) / len(examples) >= 0.95


# ---------------------------------------------------------------------------------------
# stage 2: REINFORCE
# ---------------------------------------------------------------------------------------

def test_the_update_is_reinforce_on_discounted_normalised_returns(tiny_encoder_dir):
    torch.manual_seed(0)
    agent = PPDPPPolicy(ppdpp_args(tiny_encoder_dir, ppdpp_gamma=0.5), ESC)
    rewards, actions = [-0.5, -0.25, 1.0], ["Question", "Others", "Information"]
    turns = [("Patient", "I feel low.")]
    for n in range(3):
        turns += [("Therapist", f"Reply {n}."), ("Patient", f"Answer {n}.")]
    conversation = Conversation(case=esc_case(0), turns=turns, records=[
        {"action": a, "reward": r} for a, r in zip(actions, rewards)])
    # G = (-0.5 + 0.5 * (-0.25 + 0.5 * 1), -0.25 + 0.5 * 1, 1), standardised
    assert discounted_returns(rewards, 0.5) == [-0.375, 0.25, 1.0]
    returns = torch.tensor([-0.375, 0.25, 1.0])
    returns = (returns - returns.mean()) / returns.std()
    assert torch.allclose(normalised_returns(rewards, 0.5), returns)
    assert normalised_returns([0.7], 0.5).tolist() == pytest.approx([0.7])  # one turn: as is
    states = agent.inputs([turns[:1], turns[:3], turns[:5]])  # each before its system turn
    index = [ESC.action_names.index(a) for a in actions]
    before = agent.probabilities(states)[range(3), index]
    loss = agent.reinforce(conversation)
    assert loss == pytest.approx(-(before.log() * returns).sum().item(), rel=1e-4)
    after = agent.probabilities(states)[range(3), index]
    assert after[2] > before[2] and after[0] < before[0]  # the best return up, the worst down
    assert agent.updates == 1


def test_training_samples_from_the_policy_and_testing_takes_its_argmax(policy):
    turns = [("Patient", "I feel low.")]
    observations = [Observation(Conversation(case=esc_case(0), turns=turns, stream=i),
                                ESC.action_names[:4], [0.25] * 4) for i in range(800)]
    probs = policy.probabilities(policy.inputs([turns]))[0]
    best = ESC.action_names[int(probs.argmax())]
    tested, notes = policy.act(observations, random.Random(0), training=False)
    assert set(tested) == {best} and not any(n["explored"] for n in notes)
    sampled, notes = policy.act(observations, random.Random(0), training=True)
    for name, p in zip(ESC.action_names, probs.tolist()):
        assert sampled.count(name) / len(sampled) == pytest.approx(p, abs=0.05)
    assert notes[0]["action_prob"] == pytest.approx(
        float(probs[ESC.action_names.index(sampled[0])]), abs=1e-4)


def one_action_world():
    """Success only when the Therapist plays WINNER, which the prior ranks last (outside
    every top-k but all of them)."""
    order = [a for a in ESC.action_names if a != WINNER] + [WINNER]
    return World("esc", order, lambda history: "Okay.",
                 lambda history: ["4"] if history[-1] == WINNER else ["2"])


WINNER = "Information"


@pytest.mark.slow
def test_reinforce_learns_the_one_action_that_succeeds(tiny_encoder_dir, tmp_path):
    torch.manual_seed(0)
    args = ppdpp_args(tiny_encoder_dir, ppdpp_sft=False, total_episodes=96)
    world = one_action_world()
    env = world.env(max_turn=1, top_k=4)
    test_cases = esc_cases(1000, 24)
    uniform, _ = evaluate(args, UniformPolicy(args, ESC), env, test_cases)
    agent = PPDPPPolicy(args, ESC)
    with SummaryWriter(str(tmp_path)) as writer:
        trainer.train(args, agent, env, esc_cases(0, 200), test_cases[:2], str(tmp_path),
                      writer)
    fresh = PPDPPPolicy(args, ESC)
    fresh.load(str(tmp_path / "last.pt"))
    trained, conversations = evaluate(args, fresh, env, test_cases)
    print("uniform", uniform, "\ntrained", trained)
    assert uniform["SR"] <= 0.3  # 1/8 in expectation
    assert trained["SR"] >= 0.9
    record = conversations[0].records[0]
    assert record["policy"] == "ppdpp" and record["in_top_k"] is False
    assert [c["action"] for c in record["candidates"]] == ESC.action_names[:4]
    history = [json.loads(line) for line in open(tmp_path / "train_history.jsonl")]
    assert not any(h["kind"] == "pretrain" for h in history)  # --ppdpp_sft false
    assert sum(h["kind"] == "update" for h in history) == 96  # one per episode


# ---------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------

def _train(run_dir, encoder_dir, stop_at_system_call=None, resume=None):
    random.seed(0)
    torch.manual_seed(0)
    args = ppdpp_args(encoder_dir, total_episodes=20, num_envs=4, max_turn=3,
                      checkpoint_every=4, eval_every=10, ppdpp_sft_epochs=2,
                      ppdpp_sft_batch_size=8)
    world = one_action_world()
    if stop_at_system_call is not None:
        interrupt_at_system_call(world, stop_at_system_call)
    agent = PPDPPPolicy(args, ESC)
    with SummaryWriter(str(run_dir)) as writer:
        trainer.train(args, agent, world.env(max_turn=3), labelled_cases(0, 30),
                      labelled_cases(100, 4), str(run_dir), writer, resume)
    return agent


@pytest.mark.slow
def test_a_resumed_run_reaches_the_same_network(tiny_encoder_dir, tmp_path):
    straight = _train(tmp_path / "straight", tiny_encoder_dir)
    stopped_dir = tmp_path / "stopped"
    with pytest.raises(run_state.TrainingStopped):
        _train(stopped_dir, tiny_encoder_dir, stop_at_system_call=15)
    state = run_state.load_state(str(stopped_dir))
    assert 0 < state["loop"]["finished"] < 20 and state["active"]  # stopped mid-run
    resumed = _train(stopped_dir, tiny_encoder_dir, resume=state)
    for (name, a), b in zip(straight.net.state_dict().items(),
                            resumed.net.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight.updates == resumed.updates == 20
    histories = [[json.loads(line) for line in open(folder / "train_history.jsonl")]
                 for folder in (tmp_path / "straight", stopped_dir)]
    assert histories[0] == histories[1]
    assert [h.get("epoch") for h in histories[0] if h["kind"] == "pretrain"] == [1, 2, None]


# ---------------------------------------------------------------------------------------
# the command line: a run, and the combinations it refuses before any model loads
# ---------------------------------------------------------------------------------------

def _data(folder, labelled):
    os.makedirs(folder, exist_ok=True)
    for split, first, count in (("train", 0, 6), ("valid", 1000, 2), ("test", 0, 3)):
        cases = labelled_cases(first, count) if labelled else [esc_case(first + i)
                                                                for i in range(count)]
        with open(os.path.join(folder, f"esc-{split}.txt"), "w") as f:
            f.writelines(json.dumps(c) + "\n" for c in cases)
    return folder


def _common(tmp_path, encoder_dir, data_dir):
    return ["--data_name", "esc", "--data_dir", data_dir, "--policy", "ppdpp",
            "--policy_encoder", encoder_dir, "--encoder", encoder_dir, "--max_turn", "2",
            "--critic_samples", "2", "--num_envs", "4", "--progress", "false", "--device",
            "cpu", "--seed", "1", "--output_dir", str(tmp_path / "runs")]


@pytest.mark.slow
def test_a_ppdpp_run_trains_tests_and_its_checkpoint_is_tested_again(tiny_encoder_dir,
                                                                      tmp_path):
    common = _common(tmp_path, tiny_encoder_dir, _data(str(tmp_path / "data"), True))
    with scripted_models():
        trained, run_dir = train_model.main(common + [
            "--total_episodes", "4", "--eval_every", "2", "--ppdpp_sft_epochs", "1"])
        tested, _ = train_model.main(common + ["--mode", "test", "--checkpoint",
                                               os.path.join(run_dir, "best.pt")])
    assert trained["policy"] == "ppdpp" and trained["episodes"] == tested["episodes"] == 3
    with open(os.path.join(run_dir, "train_history.jsonl")) as f:
        kinds = [json.loads(line)["kind"] for line in f]
    assert kinds[:2] == ["pretrain", "pretrain"] and kinds.count("update") == 4
    with open(os.path.join(run_dir, "test_conversations.jsonl")) as f:
        assert all(r["policy"] == "ppdpp" for line in f for r in json.loads(line)["records"])
    best = os.path.join(run_dir, "best.pt")
    for other, says in ((dict(data_name="cima"), "--data_name"),
                        (dict(policy="dialogxpert"), "no Q-head")):
        args = parse_args(common + ["--mode", "test", "--checkpoint", best])
        args = Args(**vars(args) | other)
        with pytest.raises(UserError, match=says):
            policy_class(args.policy).check_checkpoint(best, args, {"encoder": {}})


def _cli_error(argv, capsys, monkeypatch):
    def no_models(args):
        raise AssertionError("a model loaded before the error")
    monkeypatch.setattr(harness, "load_llms", no_models)
    with pytest.raises(SystemExit) as stop:
        train_model.cli(parse_args(argv))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_combinations_end_in_one_error_line(tiny_encoder_dir, tmp_path, capsys,
                                                monkeypatch):
    common = _common(tmp_path, tiny_encoder_dir, _data(str(tmp_path / "data"), False))
    # the train split has no labelled turn (these esc cases have an empty dialog)
    line = _cli_error(common, capsys, monkeypatch)
    assert "--ppdpp_sft true: the train split of 'esc'" in line and "--ppdpp_sft false" in line
    line = _cli_error(common + ["--policy_encoder", str(tmp_path / "none"), "--ppdpp_sft",
                                "false"], capsys, monkeypatch)
    assert f"no model weights at {tmp_path / 'none'} (--policy_encoder)" in line
    # a task whose data has no strategy labels at all
    monkeypatch.setitem(tasks.TASKS, "cb", dataclasses.replace(tasks.TASKS["cb"],
                                                               labelled_turns=None))
    for argv, expected in (
            (["--data_name", "cb", "--policy", "ppdpp"], "--ppdpp_sft true needs"),
            (["--policy", "ppdpp", "--ppdpp_gamma", "1.5"], "--ppdpp_gamma=1.5"),
            (["--policy", "ppdpp", "--ppdpp_max_length", "4"], "--ppdpp_max_length=4")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    parse_args(["--data_name", "cb", "--policy", "ppdpp", "--ppdpp_sft", "false"])
