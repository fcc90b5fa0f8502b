"""Resuming a stopped run: killed at random moments, or stopped by a signal, a run
continues where its last saved state left it and ends as if it had not stopped."""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.tensorboard import SummaryWriter

import run_state
import train_model
import trainer
from conftest import (DEMO, ROOT, esc_cases, harm_world, interrupt_at_system_call, make_runs,
                      q_policy, scripted_models)
from errors import UserError
from get_args import Args
from q_adapter import FrozenEncoder

pytestmark = pytest.mark.slow  # whole runs, stopped and resumed


def _train(tmp_path, encoder_dir, stop_at_system_call=None, resume=None):
    """Train in the harm world; optionally send SIGINT to this process from inside the
    system LLM's n-th call (mid-step), as a Ctrl-C would arrive."""
    random.seed(0)
    torch.manual_seed(0)
    args = Args(data_name="esc", total_episodes=24, num_envs=4, max_turn=3, top_k=4,
                learning_starts=8, batch_size=8, eval_every=12, checkpoint_every=4,
                hidden_size=16, progress=False, max_encoder_tokens=64)
    world = harm_world()
    if stop_at_system_call is not None:
        interrupt_at_system_call(world, stop_at_system_call)
    env = world.env(max_turn=3, top_k=args.top_k)
    agent = q_policy(args, FrozenEncoder.from_pretrained(encoder_dir, max_tokens=64,
                                                         device="cpu"))
    with SummaryWriter(str(tmp_path)) as writer:
        trainer.train(args, agent, env, esc_cases(0, 40),
                          esc_cases(100, 4), str(tmp_path), writer, resume)
    return agent


def test_a_resumed_run_reaches_the_same_q_head(tiny_encoder_dir, tmp_path):
    straight = _train(tmp_path / "straight", tiny_encoder_dir)
    stopped_dir = tmp_path / "stopped"
    try:
        _train(stopped_dir, tiny_encoder_dir, stop_at_system_call=27)
        raise AssertionError("the run did not stop on SIGINT")
    except run_state.TrainingStopped as stopped:
        assert "--resume" in str(stopped)
    state = run_state.load_state(str(stopped_dir))
    assert 0 < state["loop"]["finished"] < 24 and state["active"]  # stopped mid-run
    resumed = _train(stopped_dir, tiny_encoder_dir, resume=state)
    for a, b in zip(straight.q_head.parameters(), resumed.q_head.parameters()):
        assert torch.equal(a, b)
    assert straight.updates == resumed.updates
    with open(stopped_dir / "train_conversations.jsonl") as f:
        assert len(f.readlines()) == 24


def _cli_args(llm_dir, encoder_dir, output_dir):
    return ["--data_name", "esc", "--data_dir", DEMO, "--llm", llm_dir, "--encoder", encoder_dir,
            "--total_episodes", "60", "--num_envs", "2", "--max_turn", "2",
            "--critic_samples", "2", "--system_max_new_tokens", "6", "--user_max_new_tokens",
            "6", "--critic_max_new_tokens", "4", "--eval_every", "7", "--checkpoint_every",
            "1", "--batch_size", "4", "--learning_starts", "2", "--output_dir",
            str(output_dir), "--progress", "false", "--device", "cpu", "--dtype", "float32",
            "--hidden_size", "16"]


def _wait_for_state(output, process, timeout=300):
    """Until the process has saved a state of its own (it is training)."""
    def saved():
        return {p: os.path.getmtime(p) for p in glob.glob(str(output / "esc__*" / run_state.STATE_FILE))}
    before, deadline = saved(), time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if saved() != before:
            return
        time.sleep(0.2)


def _buffer(run_dir):
    buffer = run_state.load_state(run_dir)["buffer"]
    size = int(buffer["size"])
    return size, buffer["features"][:size], buffer["rewards"][:size]


def test_killed_at_random_moments_the_run_completes(tiny_llm_dir, tiny_encoder_dir, tmp_path):
    moments = random.Random(0)
    output = tmp_path / "runs"
    base = [sys.executable, "train_model.py"]
    kills, interrupted, before_last = 0, False, None
    for attempt in range(12):
        runs = glob.glob(str(output / "esc__*"))
        run_dir = runs[0] if runs else None
        if run_dir and not os.path.exists(os.path.join(run_dir, run_state.STATE_FILE)):
            subprocess.run(["rm", "-rf", run_dir])  # killed before its first save
            run_dir = None
        if run_dir:
            before_last = _buffer(run_dir)
        argv = base + (["--resume", run_dir, "--progress", "false"] if run_dir else
                       _cli_args(tiny_llm_dir, tiny_encoder_dir, output))
        process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        if attempt < 5:  # stop it at a random moment once it is training
            _wait_for_state(output, process)
            time.sleep(moments.uniform(0.0, 1.5))
            if process.poll() is None:
                if attempt == 1:  # once: Ctrl-C
                    process.send_signal(signal.SIGINT)
                    _, err = process.communicate(timeout=120)
                    assert process.returncode == 130, err
                    # one line (after the libraries' own loading bars), no traceback
                    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
                    interrupted = True
                else:
                    process.kill()
                    process.wait()
                    kills += 1
                continue
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        break
    print(f"{kills} kills, interrupted: {interrupted}")
    assert kills >= 2 and interrupted
    run_dir = glob.glob(str(output / "esc__*"))[0]
    with open(os.path.join(run_dir, "train_conversations.jsonl")) as f:
        assert len(f.readlines()) == 60
    size, features, rewards = _buffer(run_dir)
    print(f"transitions: {size} at the end, {before_last and before_last[0]} saved before "
          "the last stop")
    if before_last is not None:  # every transition saved before the last stop is kept
        saved_size, saved_features, saved_rewards = before_last
        assert size >= saved_size
        assert torch.equal(features[:saved_size], saved_features)
        assert torch.equal(rewards[:saved_size], saved_rewards)
    for path in glob.glob(os.path.join(run_dir, "*.json")):
        with open(path) as f:
            json.load(f)
    for name in ("best.pt", "last.pt"):
        assert any(k.startswith("q_head.") for k in load_file(os.path.join(run_dir, name)))


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def finished_run(tmp_path):
    """A run of train_model.py on the scripted clients, trained to 8 episodes and tested."""
    (run_dir,) = make_runs(str(tmp_path), train_episodes=8, baseline=None)
    return run_dir


def test_a_finished_run_resumed_with_a_larger_total_trains_on_and_keeps_its_old_test(
        finished_run):
    old = {name: _read(os.path.join(finished_run, name))
           for name in ("test_metrics.json", "test_conversations.jsonl", "best.pt")}
    with scripted_models():
        metrics, run_dir = train_model.main(["--resume", finished_run, "--total_episodes", "12",
                                             "--progress", "false"])
    assert run_dir == finished_run
    assert run_state.load_state(run_dir)["loop"]["finished"] == 12
    assert run_state.load_state(run_dir)["args"]["total_episodes"] == 12
    with open(os.path.join(run_dir, "train_conversations.jsonl")) as f:
        assert len(f.readlines()) == 12
    with open(os.path.join(run_dir, "last.pt.json")) as f:
        assert json.load(f)["step"] == 12
    # the old test, byte for byte, under its new names; a new test in the usual ones
    for name, kept in (("test_metrics.json", "test_at_8_metrics.json"),
                       ("test_conversations.jsonl", "test_at_8_conversations.jsonl"),
                       ("best.pt", "best_at_8.pt")):
        assert _read(os.path.join(run_dir, kept)) == old[name]
    with open(os.path.join(run_dir, "test_metrics.json")) as f:
        assert json.load(f) == json.loads(json.dumps(metrics))


def test_a_finished_run_resumed_without_a_larger_total_is_refused(finished_run):
    before = {name: _read(os.path.join(finished_run, name)) for name in os.listdir(finished_run)
              if os.path.isfile(os.path.join(finished_run, name))}
    for extra in ([], ["--total_episodes", "8"]):
        with scripted_models(), pytest.raises(UserError, match="is finished: trained to 8 "
                                              "episodes and tested. Pass a larger "
                                              "--total_episodes"):
            train_model.main(["--resume", finished_run, "--progress", "false", *extra])
    with scripted_models(), pytest.raises(UserError, match="--total_episodes 4 is below the 8"):
        train_model.main(["--resume", finished_run, "--total_episodes", "4"])
    after = {name: _read(os.path.join(finished_run, name)) for name in os.listdir(finished_run)
             if os.path.isfile(os.path.join(finished_run, name))}
    assert after == before


def test_flags_given_on_resume_that_differ_from_the_saved_run_are_refused(finished_run):
    flags = ["--resume", finished_run, "--total_episodes", "12", "--max_turn", "8",
             "--critic_samples", "4", "--eval_temperature", "0.5", "--debug", "true"]
    with scripted_models(), pytest.raises(UserError) as refused:
        train_model.main(flags)
    message = str(refused.value)
    assert "\n" not in message
    # the saved run has --critic_samples 4 (the same: allowed) and --max_turn 3
    assert "--max_turn 8 (saved: 3), --eval_temperature 0.5 (saved: 0.0)" in message
    assert "critic_samples" not in message and "debug" not in message
    assert not os.path.exists(os.path.join(finished_run, "test_at_8_metrics.json"))


def test_a_state_of_another_format_is_refused_in_one_line_before_models_load(finished_run,
                                                                            monkeypatch):
    """A state written before states carried their format (format 1, which kept the
    candidate features in each conversation) and one of a later format."""
    import harness

    path = os.path.join(finished_run, run_state.STATE_FILE)
    state = torch.load(path, weights_only=True)
    assert state["format"] == run_state.STATE_FORMAT
    monkeypatch.setattr(harness, "load_llms", lambda args: pytest.fail("a model was loaded"))
    for saved in (None, run_state.STATE_FORMAT + 1):
        others = {key: value for key, value in state.items() if key != "format"}
        torch.save(others | ({"format": saved} if saved else {}), path)
        with pytest.raises(UserError) as refused:
            train_model.main(["--resume", finished_run, "--total_episodes", "12"])
        assert str(refused.value) == (
            f"{path} has training-state format {saved or 1}, this code reads format "
            f"{run_state.STATE_FORMAT}. Resume it with the commit that wrote it, or start a "
            "new run")
    assert not os.path.exists(os.path.join(finished_run, "test_at_8_metrics.json"))


@pytest.mark.parametrize("saved,reason", [
    (None, "KeyError: 'args'"),
    ({"no_such_flag": 1}, "TypeError: Args.__init__() got an unexpected keyword argument "
                          "'no_such_flag'"),
    ({"max_turn": -3}, "ValueError: --max_turn=-3 is out of range"),
])
def test_saved_arguments_this_code_cannot_take_are_one_user_error(tmp_path, saved, reason):
    state = {} if saved is None else {"args": vars(Args()) | saved}
    with pytest.raises(UserError) as refused:
        run_state.resumed_args(state, Args(resume=str(tmp_path)), {"resume"})
    assert str(refused.value).startswith(
        f"the arguments saved in {tmp_path / run_state.STATE_FILE} cannot be used ({reason}")


@contextmanager
def _recorded_llms(outputs, stop_at_system_call=None):
    """harness.load_llms's in-process model appends the logits of every forward pass to
    outputs; optionally SIGINT from inside its n-th system answer (mid-step)."""
    import harness

    load = harness.load_llms

    def load_llms(args):
        llms = load(args)
        client = llms["system"]  # every role's, one in-process model
        client.model.register_forward_hook(
            lambda module, inputs, output: outputs.append(output.logits.clone()))
        chat, system_calls = client.chat, []

        def interrupting_chat(conversations, *rest, cache_keys=None, **options):
            if cache_keys and cache_keys[0][1] == "system":
                system_calls.append(cache_keys)
                if len(system_calls) == stop_at_system_call:
                    os.kill(os.getpid(), signal.SIGINT)
            return chat(conversations, *rest, cache_keys=cache_keys, **options)
        client.chat = interrupting_chat
        return llms
    harness.load_llms = load_llms
    try:
        yield
    finally:
        harness.load_llms = load


def _played(run_dir):
    """The run's training and test conversations, as played (no seconds)."""
    played = []
    for split in ("train", "test"):
        with open(os.path.join(run_dir, f"{split}_conversations.jsonl")) as f:
            played += [{k: v for k, v in json.loads(line).items() if k != "cost"} for line in f]
    return played


def _same_floats(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_resumed_run_of_an_in_process_model_computes_the_same_floats(
        tiny_llm_dir, tiny_encoder_dir, tmp_path, monkeypatch):
    """Stopped by SIGINT mid-step, or killed after a periodic save, a run of the in-process
    backend resumes with every forward pass's logits equal to an uninterrupted run's: the
    prefix cache (whose reused prompts get other floats than recomputed ones) is saved with
    a stop and emptied after every other save."""
    flags = _cli_args(tiny_llm_dir, tiny_encoder_dir, tmp_path / "runs")
    flags[flags.index("--total_episodes") + 1] = "6"
    flags[flags.index("--checkpoint_every") + 1] = "2"
    flags += ["--max_cases", "4", "--max_encoder_tokens", "64", "--prefix_cache_gb", "0.1",
              "--system_max_new_tokens", "12", "--user_max_new_tokens", "12"]
    straight, at_save = [], {}
    save = run_state.save_state

    def save_and_copy(run_dir, state):  # the first periodic save: what a kill then leaves
        save(run_dir, state)
        if not at_save:
            at_save["forwards"] = len(straight)
            shutil.copytree(run_dir, tmp_path / "killed")
    monkeypatch.setattr(run_state, "save_state", save_and_copy)
    with _recorded_llms(straight):
        _, straight_dir = train_model.main(flags + ["--exp_name", "straight"])
    monkeypatch.setattr(run_state, "save_state", save)

    stopped = []
    with _recorded_llms(stopped, stop_at_system_call=5), pytest.raises(
            run_state.TrainingStopped):
        train_model.main(flags + ["--exp_name", "stopped"])
    (stopped_dir,) = glob.glob(str(tmp_path / "runs" / "esc__stopped__*"))
    state = run_state.load_state(stopped_dir)
    assert 0 < state["loop"]["finished"] < 6 and state["active"]  # stopped mid-run
    with _recorded_llms(stopped):
        train_model.main(["--resume", stopped_dir, "--progress", "false"])

    killed = []
    assert run_state.load_state(str(tmp_path / "killed"))["loop"]["finished"] == 2
    with _recorded_llms(killed):
        train_model.main(["--resume", str(tmp_path / "killed"), "--progress", "false"])

    same = {"stopped: conversations": _played(stopped_dir) == _played(straight_dir),
            "stopped: logits": _same_floats(stopped, straight),
            "killed: conversations": _played(str(tmp_path / "killed")) == _played(straight_dir),
            "killed: logits": _same_floats(killed, straight[at_save["forwards"]:])}
    assert all(same.values()), same
