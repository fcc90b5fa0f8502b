"""A replay (--mode test --checkpoint) plays the test of the checkpoint's run again: the
run's seed, models and evaluation setup come from the checkpoint, and a flag given on the
command line overrides one of them and is named."""

import json
import os
import zlib

import pytest
import torch
from safetensors.torch import save_file

import train_model
from conftest import (RUN_PRIOR_ORDER, RUN_TASK, ScriptedLLM, esc_case, models_from,
                      played_action)
from get_args import Args


def stateless_llms():
    """Scripted clients whose answers depend on the prompt alone (the run's clients and
    the replay's answer alike): the system names its action, the critic answers an option
    drawn from a hash of the conversation."""
    return {"planner": ScriptedLLM(None, prior=lambda prompt, labels: [
                10.0 - RUN_PRIOR_ORDER.index(n) for n in RUN_TASK.action_names]),
            "system": ScriptedLLM(lambda prompt: "Emotion: worried\nResponse: Let us talk "
                                                 f"it through ({played_action(prompt)})."),
            "user": ScriptedLLM(lambda prompt: "I see."),
            "critic": ScriptedLLM(lambda prompt: str(1 + zlib.crc32(prompt.encode()) % 4))}


def stateless_models():
    return models_from(lambda args: stateless_llms())


def trained_run(root, encoder):
    """A short run trained and tested with --max_turn 2 --critic_samples 2 (and --seed 1,
    --max_encoder_tokens 64: none of them the defaults); its test metrics and folder."""
    data = os.path.join(root, "data")
    os.makedirs(data)
    for split, first, count in (("train", 0, 8), ("valid", 1000, 4), ("test", 2000, 6)):
        with open(os.path.join(data, f"esc-{split}.txt"), "w") as f:
            f.writelines(json.dumps(esc_case(first + i)) + "\n" for i in range(count))
    with stateless_models():
        return train_model.main([
            "--data_name", "esc", "--data_dir", data, "--encoder", encoder, "--max_turn", "2",
            "--critic_samples", "2", "--num_envs", "8", "--seed", "1",
            "--max_encoder_tokens", "64", "--total_episodes", "8", "--eval_every", "4",
            "--batch_size", "4", "--learning_starts", "4", "--progress", "false",
            "--device", "cpu", "--output_dir", os.path.join(root, "runs")])


def replay(root, checkpoint, *flags):
    with stateless_models():
        return train_model.main(["--mode", "test", "--checkpoint", checkpoint, "--progress",
                                 "false", "--device", "cpu", "--output_dir",
                                 os.path.join(root, "replays"), *flags])


def conversations(folder):
    """The test conversations without their LLM seconds (wall time)."""
    with open(os.path.join(folder, "test_conversations.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "cost"} for line in f]


FIGURES = ("episodes", "SR", "AT", "mean_return", "mean_final_reward", "outcomes", "seed",
           "max_turn", "config", "checkpoint")


@pytest.mark.slow
def test_a_replay_reproduces_the_test_of_its_run(tiny_encoder_dir, tmp_path, capsys):
    metrics, run_dir = trained_run(tmp_path, tiny_encoder_dir)
    capsys.readouterr()
    replayed, replay_dir = replay(tmp_path, metrics["checkpoint"])
    assert {k: replayed[k] for k in FIGURES} == {k: metrics[k] for k in FIGURES}
    assert conversations(replay_dir) == conversations(run_dir)
    printed = capsys.readouterr().out.splitlines()
    taken = next(line for line in printed if line.startswith("From the checkpoint: "))
    for flag in ("--max_turn 2", "--critic_samples 2", "--seed 1", "--max_encoder_tokens 64"):
        assert flag in taken
    assert not any("overrides" in line for line in printed)


@pytest.mark.slow
def test_a_flag_given_to_a_replay_overrides_the_checkpoint_and_is_named(tiny_encoder_dir,
                                                                        tmp_path, capsys):
    metrics, _ = trained_run(tmp_path, tiny_encoder_dir)
    capsys.readouterr()
    replayed, replay_dir = replay(tmp_path, metrics["checkpoint"], "--max_turn", "3")
    printed = capsys.readouterr().out.splitlines()
    assert "--max_turn 3 overrides the checkpoint's 2" in printed
    taken = next(line for line in printed if line.startswith("From the checkpoint: "))
    assert "--critic_samples 2" in taken and "--max_turn" not in taken
    assert replayed["max_turn"] == replayed["config"]["max_turn"] == 3
    assert replayed["config"] == metrics["config"] | {"max_turn": 3}
    assert all(len(record["critic_answers"]) == 2
               for conversation in conversations(replay_dir) for record in conversation["records"])


def test_given_flags_that_do_not_fit_the_checkpoint_s_settings_are_a_user_error(tmp_path):
    """The checkpoint's --context_length 100 leaves no room for a given 200-token answer."""
    path = str(tmp_path / "best.pt")
    save_file({"q_head.net.0.weight": torch.zeros(1)}, path)
    with open(path + ".json", "w") as f:
        json.dump({"args": vars(Args(context_length=100))}, f)
    with pytest.raises(train_model.UserError, match="--context_length=100 is out of range"):
        train_model.main(["--mode", "test", "--checkpoint", path, "--system_max_new_tokens",
                          "200", "--llm", "/nonexistent"])
