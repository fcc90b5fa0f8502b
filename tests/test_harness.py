"""harness.check_weights: every weight folder a run loads is checked before the run folder
is created and before any model loads, and all missing ones are one error line.
harness.scorable_args: the planner's and the critic's modes are decided from the loaded
clients before either is built."""

import os

import pytest

import harness
import train_model
from conftest import DEMO
from errors import UserError
from get_args import Args
from q_adapter import FrozenEncoder


@pytest.fixture
def no_models(monkeypatch, tmp_path):
    """No model may load; the working folder has no weights/."""
    def load(*args, **kwargs):
        raise AssertionError("a model loaded before the weights were checked")
    monkeypatch.setattr(harness, "load_llms", load)
    monkeypatch.setattr(FrozenEncoder, "from_pretrained", load)
    monkeypatch.chdir(tmp_path)


def test_the_original_recipe_without_its_weights_names_both_in_one_line_before_any_folder(
        no_models, tmp_path, capsys):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as stop:
        train_model.cli(train_model.parse_args(["--recipe", "original", "--data_name", "esc",
                                                "--data_dir", DEMO, "--output_dir", str(out)]))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no model weights at "), lines
    for command in ("python download_llm_weights.py --repo_id Qwen/Qwen2.5-14B --local_dir "
                    "weights/Qwen2.5-14B",
                    "python download_llm_weights.py --repo_id google-bert/bert-base-uncased "
                    "--local_dir weights/bert-base-uncased"):
        assert f"`{command}`" in lines[0]
    assert "weights/Qwen2.5-14B (--llm), weights/bert-base-uncased (--encoder)" in lines[0]
    assert not out.exists()  # no run folder, not even the output folder


@pytest.mark.slow
def test_every_folder_a_run_loads_is_checked_and_only_those(no_models, tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(UserError) as error:
        harness.check_weights(Args(policy="ppdpp", critic_llm="weights/Qwen2.5-7B-Instruct",
                                   policy_encoder="weights/roberta-large", encoder=missing,
                                   prior="project"))
    message = str(error.value)
    for named in ("weights/Qwen2.5-7B-Instruct (--critic_llm)",
                  "weights/roberta-large (--policy_encoder)", f"{missing} (--encoder)",
                  "--repo_id Qwen/Qwen2.5-7B-Instruct", "--repo_id FacebookAI/roberta-large",
                  f"--repo_id <the hub id of missing> --local_dir {missing}"):
        assert named in message
    # the other roles use --llm auto, the embedded model, which is there
    assert "(--llm)" not in message and "\n" not in message
    # a baseline does not load the encoder; a served model's weights are the server's
    harness.check_weights(Args(policy="prior", mode="test", encoder=missing))
    harness.check_weights(Args(backend="openai", base_url="http://127.0.0.1:1/v1",
                               llm="Qwen/Qwen2.5-14B", encoder="auto"))


def test_a_missing_encoder_of_a_test_run_is_reported_with_the_weights(no_models, tmp_path,
                                                                      capsys):
    """resolve_models and the checkpoint check leave a missing encoder to the weights
    check, which names it with the LLM."""
    missing = str(tmp_path / "bert")
    models = harness.resolve_models(Args(encoder=missing))
    assert models["encoder"] == {"name": missing, "revision": None, "width": None}
    with pytest.raises(UserError, match=r"no model weights at .*bert \(--encoder\)"):
        harness.check_weights(Args(encoder=missing, llm=str(tmp_path / "llm")))
    assert os.listdir(tmp_path) == []


def test_the_scoring_modes_are_decided_from_the_loaded_clients_without_changing_the_args(
        capsys):
    from conftest import ScriptedLLM
    from tasks import get_task

    class NoLogprobsLLM(ScriptedLLM):
        def option_scoring_problem(self, labels):
            return f"no log-probabilities for the labels {labels[0]} to {labels[-1]}"

    task = get_task("esc")
    scoring, not_scoring = ScriptedLLM(lambda prompt: "1"), NoLogprobsLLM(lambda prompt: "1")
    args = Args(prior="logits", critic="logits")
    scorable = harness.scorable_args(args, task, {"planner": not_scoring, "critic": scoring})
    assert (scorable.prior, scorable.critic) == ("sample", "logits")
    assert (args.prior, args.critic) == ("logits", "logits")  # the parsed arguments stay
    # the planner is asked about the task's 8 actions
    assert ("warning: no log-probabilities for the labels 1 to 8; the planner samples its "
            "answers instead (--prior sample)") in capsys.readouterr().out
    # the critic's 4 verdicts; a mode that reads no log-probabilities is kept as it is
    scorable = harness.scorable_args(Args(prior="list", critic="logits"), task,
                                     {"planner": not_scoring, "critic": not_scoring})
    assert (scorable.prior, scorable.critic) == ("list", "sample")
    assert capsys.readouterr().out.strip() == (
        "warning: no log-probabilities for the labels 1 to 4; the critic samples its answers "
        "instead (--critic sample)")
    # the planner and the critic are built in the modes decided
    env = harness.build_env(harness.scorable_args(args, task, dict.fromkeys(
        ("planner", "critic"), not_scoring)), task, dict.fromkeys(
        ("planner", "system", "user", "critic"), not_scoring))
    assert env.planner.mode == env.critic.mode == "sample"
