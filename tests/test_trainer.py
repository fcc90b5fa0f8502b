"""The end of a training run: a policy that made too few gradient updates says so in its
metrics, in the prior-override line and in a closing warning (trainer.MIN_UPDATES). And
the validation schedule: once per --eval_every mark passed."""

import json
import os
from types import SimpleNamespace

import pytest

import train_model
import trainer
from conftest import esc_case, scripted_models
from trainer import MIN_UPDATES, Trainer

pytestmark = pytest.mark.slow  # whole runs


def _data(folder):
    os.makedirs(folder)
    for split in ("train", "valid", "test"):
        with open(os.path.join(folder, f"esc-{split}.txt"), "w") as f:
            f.writelines(json.dumps(esc_case(i)) + "\n" for i in range(3))
    return folder


def _run(tmp_path, encoder_dir, *flags):
    """A scripted esc run of 4 training episodes of up to 2 turns (at most 8 transitions);
    the only validation is at the end, so best.pt holds every update. Returns
    (test_metrics.json, the run folder)."""
    common = ["--data_name", "esc", "--data_dir", _data(str(tmp_path / "data")),
              "--encoder", encoder_dir, "--policy_encoder", encoder_dir, "--max_turn", "2",
              "--critic_samples", "2", "--progress", "false", "--device", "cpu",
              "--max_encoder_tokens", "64", "--ppdpp_max_length", "64",
              "--mcts_simulations", "2", "--total_episodes", "4", "--eval_every", "4",
              "--output_dir", str(tmp_path / "runs")]
    with scripted_models():
        _, run_dir = train_model.main(common + list(flags))
    with open(os.path.join(run_dir, "test_metrics.json")) as f:
        return json.load(f), run_dir


@pytest.mark.parametrize("flags, updates, remedy", [
    # learning starts after 32 transitions, 4 episodes store at most 8
    (["--policy", "dialogxpert"], 0, "more --total_episodes or a lower --learning_starts"),
    # one REINFORCE update per finished episode
    (["--policy", "ppdpp", "--ppdpp_sft", "false"], 4, "more --total_episodes"),
    (["--policy", "dpdp", "--ppdpp_sft", "false"], 4, "more --total_episodes")])
def test_a_run_with_too_few_updates_says_so_in_its_metrics_and_at_the_end(
        flags, updates, remedy, tiny_encoder_dir, tmp_path, capsys):
    metrics, run_dir = _run(tmp_path, tiny_encoder_dir, *flags)
    assert metrics["updates"] == updates and metrics["undertrained"] is True
    lines = capsys.readouterr().out.strip().splitlines()
    state = "untrained" if updates == 0 else "undertrained"
    assert lines[-1] == lines[-1].strip() and lines[-1].startswith(
        f"warning: the tested policy is {state}: {updates} gradient updates in training, "
        f"fewer than {MIN_UPDATES} (")
    assert lines[-1].endswith(f"Train with {remedy}")
    override = next(line for line in lines if "differs from the prior's top-1" in line)
    assert override.endswith(f"by an {state} policy ({updates} gradient updates in training)")
    with open(os.path.join(run_dir, "train_metrics.json")) as f:
        assert json.load(f)["updates"] == updates
    if flags[1] == "dialogxpert":  # no update: no TD loss to draw, and the line says why
        assert not os.path.exists(os.path.join(run_dir, "td_loss.png"))
        assert (f"figure not drawn: {os.path.join(run_dir, 'td_loss.png')} (the policy made "
                "no gradient update in training") in "\n".join(lines)


def test_a_run_with_enough_updates_has_no_warning_nor_has_its_replay(tiny_encoder_dir,
                                                                       tmp_path, capsys):
    flags = ["--learning_starts", "1", "--batch_size", "4", "--updates_per_step", "4"]
    metrics, run_dir = _run(tmp_path, tiny_encoder_dir, *flags)
    assert metrics["updates"] >= MIN_UPDATES and metrics["undertrained"] is False
    printed = capsys.readouterr().out
    assert "warning: the tested policy" not in printed and "trained policy" not in printed
    assert os.path.exists(os.path.join(run_dir, "td_loss.png"))
    # a test of the checkpoint alone counts the checkpoint's updates
    best = os.path.join(run_dir, "best.pt")
    replayed, _ = _run(tmp_path / "replay", tiny_encoder_dir, *flags, "--mode", "test",
                       "--checkpoint", best)
    with open(best + ".json") as f:
        assert replayed["updates"] == json.load(f)["updates"] == metrics["updates"]
    assert "warning: the tested policy" not in capsys.readouterr().out


def test_a_baseline_has_no_update_count(tiny_encoder_dir, tmp_path, capsys):
    metrics, _ = _run(tmp_path, tiny_encoder_dir, "--mode", "test", "--policy", "random")
    assert "updates" not in metrics and "undertrained" not in metrics
    assert "figure not drawn" in capsys.readouterr().out  # no training: no training figures


def test_a_ppdpp_run_with_its_supervised_stage_is_not_called_untrained(tiny_encoder_dir,
                                                                        tmp_path, capsys):
    """PPDPP's supervised stage trains the classifier before self-play: few self-play
    updates are said as such, not as an untrained policy."""
    data = tmp_path / "labelled"
    data.mkdir()
    dialog = [{"speaker": "usr", "text": "I feel low."},
              {"speaker": "sys", "text": "Tell me more.", "strategy": "Question"}]
    for split in ("train", "valid", "test"):
        with open(data / f"esc-{split}.txt", "w") as f:
            f.writelines(json.dumps(esc_case(i) | {"dialog": dialog}) + "\n" for i in range(3))
    metrics, _ = _run(tmp_path, tiny_encoder_dir, "--policy", "ppdpp", "--data_dir", str(data),
                      "--ppdpp_sft_epochs", "1")
    assert metrics["supervised_stage"] is True and metrics["updates"] == 4
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("warning: the tested policy made 4 self-play updates after its "
                                "supervised stage")
    override = next(line for line in lines if "differs from the prior's top-1" in line)
    assert override.endswith("by a policy with 4 self-play updates after its supervised stage")
    assert not any("untrained" in line for line in lines)


def test_episodes_that_end_together_past_two_marks_bring_one_validation(monkeypatch):
    """With --eval_every 4, eight conversations that end in the same step pass the marks 4
    and 8: one validation then, the next once 12 episodes have finished (not at every step
    until a counter catches up)."""
    validated = []
    monkeypatch.setattr(trainer, "evaluate", lambda args, policy, env, cases, split: (
        validated.append(loop["finished"]) or ({"SR": 0.0, "AT": 8.0}, [])))
    monkeypatch.setattr(trainer, "llm_usage", lambda env: {})
    run = Trainer.__new__(Trainer)  # the state that evaluate_if_due reads, nothing loaded
    loop = {"finished": 8, "next_eval": 4, "best_score": [1.0, 0.0], "history": []}
    run.args, run.loop = SimpleNamespace(eval_every=4, total_episodes=100), loop
    run.policy = run.env = run.valid_cases = None
    run.writer = SimpleNamespace(add_scalar=lambda *args: None)
    for finished in (8, 8, 10, 12, 12):
        loop["finished"] = finished
        run.evaluate_if_due()
    assert validated == [8, 12]
