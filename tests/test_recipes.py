"""The two training recipes: --recipe original gives the original release's values, each
flag still overrides them, and the trainer follows each recipe's update schedule (the
number of gradient updates after N episodes is its formula), exploration schedule and
best-checkpoint rule."""

import itertools
import json
import math
import os
import re

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import harness
import train_model
import trainer
from conftest import (ScriptedLLM, bargain_world, cb_cases, esc_case, listed_options,
                      option_number, q_policy, scripted_llms)
from get_args import Args, parse_args, recipe_args
from q_adapter import FrozenEncoder

# Written from the original release's code (declare-lab/dialogxpert), not from RECIPES.
ORIGINAL = {
    "optimizer": "adamw",  # train_model.py: torch.optim.AdamW(prob_network.parameters(), ...)
    "learning_rate": 1e-3,  # misc.get_args_train: --lr 1e-3
    "tau": 0.005,  # llm_priors.train_qnetwork: soft_update(target, online, 0.005) per minibatch
    "loss_reduction": "sum",  # mse_loss(p, target_value, reduction="sum")
    "max_grad_norm": 1.0,  # clip_grad_norm_(prob_network.parameters(), 1.0)
    "batch_size": 32,  # DataLoader(train_data, batch_size = 32, ...)
    "replay_ratio": 4.0,  # RandomSampler(replacement=True, num_samples = 4 * len(replay_buffer))
    "update_every_episodes": 2,  # --sample_times 2 episodes, then train_qnetwork(buffer_list)
    "buffer_size": 0,  # buffer_list.append(...), never trimmed
    "learning_starts": 1,  # the first train_qnetwork call comes after the first 2 episodes
    "epsilon_start": 0.5, "epsilon_end": 0.5,  # --epsilon 0.5, never changed
    "total_episodes": 2000,  # --max_steps 1000 x --sample_times 2
    "gamma": 0.99,  # train_qnetwork: reward + 0.99 * (1 - done) * max (--gamma 0.999 is unread)
    "hidden_size": 64,  # QAdapter: Linear(768, 64), Linear(64, 64), Linear(64, 1)
    "encoder": "weights/bert-base-uncased",  # QAdapter: BertModel 'bert-base-uncased' (768 wide)
    "max_encoder_tokens": 512,  # QAdapter.transform_features: max_length=512
    # env.get_prior_actions_llm: f"Action: {action} for Observation: {full_conv}"
    "encoder_input": "original",
    "llm": "weights/Qwen2.5-14B",  # --model_path Qwen2.5-14B, one model for every role
    "dtype": "float16",  # misc.backup_loading: torch_dtype=torch.float16
    "system_max_new_tokens": 200, "user_max_new_tokens": 200,  # --max_new_tokens 200
    "critic_max_new_tokens": 25,  # env.prepare_critic_output: max_new_tokens=25
    "critic_samples": 10, "critic_temperature": 1.1,  # num_return_sequences=10, temperature 1.1
    "system_temperature": 0.0, "user_temperature": 0.0,  # env.get_response: do_sample=False
    "eval_temperature": 0.0,  # the same greedy get_response in self_play_evaluate
    "max_turn": 8, "top_k": 4,  # --max_turn 8, --top_k 4
    "seed": 1,  # --seed 1
    "extes_split": "10717,200,200",  # misc.load_extes: data[:10717], [10717:10917], [10917:11117]
    # env.get_prior_actions_llm and prepare_critic_output: the options always in the task's
    # order; the candidates: every number of one sampled answer (max_new_tokens=25)
    "prior_order": "fixed", "critic_order": "fixed",
    "prior": "list", "prior_max_new_tokens": 25,
}


def test_original_recipe_has_the_original_values():
    args = recipe_args("original")
    assert {name: getattr(args, name) for name in ORIGINAL} == ORIGINAL
    assert parse_args(["--recipe", "original"]) == args
    assert recipe_args("project") == Args() == parse_args([])  # the project's is the default


def test_each_value_of_a_recipe_can_be_set_by_its_own_flag():
    args = parse_args(["--recipe", "original", "--tau", "0.01", "--buffer_size", "500",
                       "--llm", "auto"])
    assert (args.tau, args.buffer_size, args.llm) == (0.01, 500, "auto")
    assert args.learning_rate == 1e-3 and args.update_every_episodes == 2  # the rest: original
    assert parse_args(["--tau", "0.005"]).learning_rate == 1e-4  # project values otherwise
    args = parse_args(["--recipe", "original", "--prior", "logits", "--prior_order", "rotate",
                       "--critic_order", "shuffle", "--dtype", "auto"])
    assert (args.prior, args.prior_order, args.critic_order, args.dtype) == (
        "logits", "rotate", "shuffle", "auto")
    assert args.prior_max_new_tokens == 25


@pytest.mark.parametrize("flags,fragment", [
    (["--prior", "projection"], "Expected one of ['logits', 'sample', 'list', 'project']"),
    (["--prior_match_threshold", "1.5"], "--prior_match_threshold=1.5 is out of range"),
    (["--prior_max_new_tokens", "-1"], "--prior_max_new_tokens=-1 is out of range"),
])
def test_bad_planner_flags_are_one_error_line(flags, fragment, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--recipe", "original"] + flags)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert fragment in lines[0]


@pytest.mark.parametrize("flags,fragment", [
    (["--max_turn", "x"], "argument --max_turn: invalid int value: 'x'. See `python "),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--seed", "-1"], "--seed=-1 is out of range. Pass a value in [0, 4294967295]"),
    (["--seeds", "1,4294967296"], "has a seed above 4294967295"),
    (["--extes_split", "0.5,0.5,0.5"], "fractions add up to 1"),
    (["--backend", "openai", "--base_url", "127.0.0.1:8080"],
     "--base_url '127.0.0.1:8080' is not an http:// or https:// address"),
])
def test_bad_values_and_flags_are_one_error_line(flags, fragment, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(flags)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment in lines[0]


@pytest.mark.parametrize("flags,line", [
    (["--mcts_simulations", "5", "--ppdpp_gamma", "0.5"],
     "warning: --mcts_simulations, --ppdpp_gamma: flag(s) of --policy dpdp or gdpzero or "
     "ppdpp, unused by --policy dialogxpert"),
    (["--policy", "prior", "--mode", "test", "--dpdp_threshold", "0.3"],
     "warning: --dpdp_threshold: flag(s) of --policy dpdp, unused by --policy prior"),
])
def test_flags_of_another_policy_are_one_warning_line(flags, line, capsys):
    # one flag set looped over several policies (make results) still runs
    args = parse_args(flags)
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert args.policy == (flags[1] if flags[0] == "--policy" else "dialogxpert")


def test_a_policy_s_own_flags_are_accepted_without_a_word(capsys):
    assert parse_args(["--policy", "gdpzero", "--mode", "test", "--mcts_simulations", "5"]
                      ).mcts_simulations == 5
    assert parse_args(["--policy", "dpdp", "--mcts_q0", "0.5", "--ppdpp_gamma", "0.9",
                       "--policy_encoder", "auto", "--dpdp_threshold", "0.2"]).mcts_q0 == 0.5
    assert capsys.readouterr().err == ""


def _train(tmp_path, encoder_dir, recipe, **values):
    """Train in the bargain world (an episode lasts 1 or 2 turns, by the actions chosen);
    returns (agent, training conversations in the order they finished, run folder)."""
    torch.manual_seed(0)
    args = recipe_args(recipe, **dict(data_name="cb", max_turn=2, top_k=4, eval_every=10**6,
                                      progress=False, max_encoder_tokens=64, hidden_size=16,
                                      batch_size=8) | values)
    world = bargain_world()
    env = world.env(args.max_turn, args.top_k)
    agent = q_policy(args, FrozenEncoder.from_pretrained(encoder_dir, max_tokens=64,
                                                         device="cpu"))
    with SummaryWriter(str(tmp_path)) as writer:
        trainer.train(args, agent, env, cb_cases(0, 50),
                          cb_cases(100, 2), str(tmp_path), writer)
    with open(tmp_path / "train_conversations.jsonl") as f:
        finished = [json.loads(line) for line in f]
    return agent, finished, args


@pytest.mark.slow
@pytest.mark.parametrize("num_envs,learning_starts", [(4, 1), (1, 7)])
def test_project_updates_per_new_transition(tiny_encoder_dir, tmp_path, num_envs,
                                            learning_starts):
    agent, finished, args = _train(tmp_path, tiny_encoder_dir, "project", num_envs=num_envs,
                                   total_episodes=24, updates_per_step=3,
                                   learning_starts=learning_starts)
    transitions = sum(c["system_turns"] for c in finished)
    assert len({c["system_turns"] for c in finished}) == 2  # episodes of 1 and 2 turns
    # updates_per_step per transition, from the one that fills the buffer to learning_starts
    # (one at a time with num_envs 1; with learning_starts 1 the first step already learns)
    assert agent.updates == 3 * (transitions - (learning_starts - 1))
    with open(tmp_path / "last.pt.json") as f:
        assert json.load(f)["updates"] == agent.updates


@pytest.mark.slow
@pytest.mark.parametrize("num_envs", [1, 8])
def test_original_updates_every_two_episodes_over_the_whole_buffer(tiny_encoder_dir, tmp_path,
                                                                   num_envs):
    agent, finished, args = _train(tmp_path, tiny_encoder_dir, "original", num_envs=num_envs,
                                   total_episodes=24, batch_size=32)
    lengths = [c["system_turns"] for c in finished]
    assert len(set(lengths)) == 2
    # after each block of 2 episodes, ceil(4 * |buffer| / 32) minibatches, where the buffer
    # holds every transition of the episodes played so far
    expected = sum(math.ceil(4 * sum(lengths[:2 * k]) / 32) for k in range(1, 13))
    assert agent.updates == expected
    updates = [entry for entry in json.loads("[" + ",".join(
        (tmp_path / "train_history.jsonl").read_text().splitlines()) + "]")
        if entry["kind"] == "update"]
    assert len(updates) == 12  # one learning phase per block


@pytest.mark.slow
def test_epsilon_decays_linearly_to_its_end_value(tiny_encoder_dir, tmp_path):
    _, finished, args = _train(tmp_path / "project", tiny_encoder_dir, "project", num_envs=4,
                               total_episodes=24, exploration_fraction=0.5,
                               epsilon_start=1.0, epsilon_end=0.0)
    history = [json.loads(line) for line in (tmp_path / "project" / "train_history.jsonl")
               .read_text().splitlines()]
    epsilons = [entry["epsilon"] for entry in history if entry["kind"] == "step"]
    assert epsilons[0] == 1.0 and epsilons[-1] == 0.0
    assert all(a >= b for a, b in zip(epsilons, epsilons[1:]))
    assert len(set(epsilons)) > 3  # linear in finished episodes, not a jump
    explored = [[r["explored"] for r in c["records"]] for c in finished]
    assert all(all(e) for e in explored[:2]) and not any(any(e) for e in explored[-8:])
    # the original: constant
    _train(tmp_path / "original", tiny_encoder_dir, "original", num_envs=4, total_episodes=8)
    history = [json.loads(line) for line in (tmp_path / "original" / "train_history.jsonl")
               .read_text().splitlines()]
    assert {entry["epsilon"] for entry in history if entry["kind"] == "step"} == {0.5}


@pytest.mark.slow
def test_the_best_checkpoint_is_the_highest_valid_sr_then_lowest_at(tiny_encoder_dir, tmp_path,
                                                                    monkeypatch):
    scores = iter([(0.5, 3.0), (1.0, 4.0), (1.0, 2.0), (0.25, 1.0), (1.0, 2.0)])

    def scripted_evaluate(args, policy, env, cases, desc="eval"):
        sr, at = next(scores)
        return {"SR": sr, "AT": at, "SL": 0.0, "mean_return": 0.0,
                "llm_answers_unusable": {}}, []

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    _train(tmp_path, tiny_encoder_dir, "project", num_envs=1, total_episodes=10, eval_every=2)
    with open(tmp_path / "best.pt.json") as f:
        best = json.load(f)
    # the third evaluation (episode 6): SR 1.0 at AT 2.0; a tie later does not replace it
    assert (best["step"], best["metrics"]["SR"], best["metrics"]["AT"]) == (6, 1.0, 2.0)


def _scripted_esc_run(tmp_path, encoder_dir, *flags):
    """A short esc run (train, then test) with the LLM clients that harness.load_llms
    gives; returns the run folder and every record of its training and test
    conversations."""
    data = tmp_path / "data"
    data.mkdir()
    for split, first, count in (("train", 0, 6), ("valid", 1000, 2), ("test", 2000, 3)):
        (data / f"esc-{split}.txt").write_text(
            "".join(json.dumps(esc_case(first + i)) + "\n" for i in range(count)))
    _, run_dir = train_model.main([
        "--data_name", "esc", "--data_dir", str(data), "--encoder", encoder_dir,
        "--device", "cpu", "--progress", "false", "--output_dir", str(tmp_path / "runs"),
        "--max_encoder_tokens", "64", "--max_turn", "2", "--critic_samples", "2",
        "--num_envs", "2", "--total_episodes", "4", "--eval_every", "4",
        "--hidden_size", "16", *flags])
    records = []
    for name in ("train_conversations.jsonl", "test_conversations.jsonl"):
        with open(os.path.join(run_dir, name)) as f:
            records += [r for line in f for r in json.loads(line)["records"]]
    assert records
    return run_dir, records


@pytest.mark.slow
def test_a_run_under_the_original_recipe_shows_fixed_orders_and_the_release_candidates(
        tiny_encoder_dir, tmp_path, monkeypatch):
    """A scripted esc run with --recipe original: every planner and critic question lists
    the options in the task's order, and each turn's candidates are the action numbers of
    the planner's answer in its order (repeats once, 0 and numbers beyond the list dropped;
    an answer without numbers is asked again), a number that varies from state to state
    and may exceed --top_k."""
    names = train_model.get_task("esc").action_names
    verdicts = train_model.get_task("esc").verdicts
    planner_lists, critic_lists, asked = [], [], {}

    def planner(prompt):
        planner_lists.append(listed_options(prompt))
        asked[prompt] = asked.get(prompt, 0) + 1
        case = int(re.search(r"case (\d+)", prompt).group(1))
        if case % 2 and asked[prompt] == 1:
            return "I am not sure."  # asked again: the next answer has numbers
        if case % 2:
            return option_number(prompt, "Information")
        if "Therapist:" in prompt:  # after the first turn: more candidates than --top_k
            return "8, 7, 6, 5, 4, 3, 2, 1, 1"
        number = {name: option_number(prompt, name) for name in ("Self-disclosure", "Others")}
        return f"{number['Others']},{number['Self-disclosure']}, {number['Others']}, 0, 12"

    def critic(prompt):  # only "Question" solves, so every first turn of an even case
        critic_lists.append(listed_options(prompt))  # has a next state of 8 candidates
        last = prompt[prompt.rindex("Therapist:"):]
        return option_number(prompt, verdicts[3 if "Question" in last else 1])

    llms = scripted_llms()
    llms["planner"], llms["critic"] = ScriptedLLM(planner), ScriptedLLM(critic)
    monkeypatch.setattr(harness, "load_llms", lambda args: llms)
    # --llm auto: the recipe's Qwen2.5-14B is not downloaded, and the scripted clients play it
    run_dir, records = _scripted_esc_run(tmp_path, tiny_encoder_dir, "--recipe", "original",
                                         "--llm", "auto")
    with open(os.path.join(run_dir, "best.pt.json")) as f:
        saved = json.load(f)["args"]
    assert {name: saved[name] for name in ("prior_order", "critic_order", "prior")} == {
        "prior_order": "fixed", "critic_order": "fixed", "prior": "list"}
    assert planner_lists and all(shown == names for shown in planner_lists)
    assert critic_lists and all(shown == verdicts for shown in critic_lists)
    sizes = set()
    for record in records:
        answer = record["planner_answers"][-1]["answer"]
        named = [names[int(n) - 1] for n in re.findall(r"\d+", answer) if 1 <= int(n) <= 8]
        expected = list(dict.fromkeys(named))  # in the answer's order, each once
        assert [c["action"] for c in record["candidates"]] == expected
        assert record["prior_orders"] == [0] and record["critic_orders"] == [[0, 1, 2, 3]]
        sizes.add(len(expected))
        if record["planner_answers"][0]["answer"] == "I am not sure.":
            assert record["planner_answers"][0]["actions"] == [] and len(expected) == 1
    assert sizes == {1, 2, 8}


@pytest.mark.slow
def test_a_projected_prior_run_maps_paraphrases_through_the_runs_encoder(tiny_encoder_dir,
                                                                         tmp_path, monkeypatch):
    """--prior project in a run: the planner gets the Q-adapter's encoder, so plans that
    name no action (paraphrases) still become actions; plans that name one are that
    action; the records keep both."""
    plans = ["Ask them a Question about it.", "Maybe share something of my own.",
             "Tell them what they could try."]
    llms = scripted_llms()
    turn_plans = itertools.cycle(plans)  # a turn's three samples: the three plans
    llms["planner"] = ScriptedLLM(lambda prompt: next(turn_plans))
    monkeypatch.setattr(harness, "load_llms", lambda args: llms)
    _, records = _scripted_esc_run(tmp_path, tiny_encoder_dir, "--prior", "project",
                                   "--prior_samples", "3", "--prior_match_threshold", "-1",
                                   "--prior_order", "fixed")  # one call of 3 samples a turn
    for record in records:
        answers = record["planner_answers"]
        assert sorted(a["answer"] for a in answers) == sorted(plans)
        assert all(len(a["actions"]) == 1 for a in answers)  # the paraphrases too
        assert [a["actions"] for a in answers if "Question" in a["answer"]] == [["Question"]]
