"""Baseline policies in the trainer's harness, paired evaluation, and seeds with a report.

The closed-form world: a turn succeeds when the system plays "Question", which the prior
ranks fourth (inside the top-4, never first). Over two turns, each policy's SR is known:
prior 0, none 0, random over the top-4 1 - (3/4)^2, uniform over all 8 actions 1 - (7/8)^2.
"""

import json
import os
import re

import pytest

import harness
import train_model
from policies import make_policy
from conftest import ScriptedLLM, esc_cases, listed_options, option_number
from critic import Critic
from env import Planner, SelfPlayEnv
from get_args import Args
from q_adapter import FrozenEncoder
from stats import bootstrap_ci
from tasks import get_task

TASK = get_task("esc")
PRIOR_ORDER = ["Others", "Self-disclosure", "Affirmation and Reassurance", "Question",
               "Information", "Providing Suggestions", "Reflection of feelings",
               "Restatement or Paraphrasing"]
CLOSED_FORM_SR = {"prior": 0.0, "none": 0.0, "random": 1 - (3 / 4) ** 2,
                  "uniform": 1 - (7 / 8) ** 2}


def played_action(prompt):
    """The action whose instruction the system LLM was given (None: no strategy)."""
    instruction = prompt[prompt.rindex("("):]
    return next((a for a in TASK.action_names if TASK.actions[a] in instruction), None)


def closed_form_world():
    last = {}  # case -> the action of its latest system turn

    def case_of(prompt):
        return re.search(r"case (\d+)", prompt).group(1)

    def system(prompt):
        last[case_of(prompt)] = played_action(prompt)
        return "Emotion: calm\nResponse: I hear you."

    def critic(prompt):  # solved (4) after a "Question" turn, else no change (2)
        verdict = TASK.verdicts[3 if last[case_of(prompt)] == "Question" else 1]
        return option_number(prompt, verdict)  # the number shown for it in this order

    prior = ScriptedLLM(None, prior=lambda prompt, labels: [
        10.0 - PRIOR_ORDER.index(n) for n in listed_options(prompt)])
    return {"planner": prior, "system": ScriptedLLM(system),
            "user": ScriptedLLM(lambda prompt: "I see."), "critic": ScriptedLLM(critic)}


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    return FrozenEncoder.from_pretrained(tiny_encoder_dir, max_tokens=64, device="cpu")


@pytest.mark.parametrize("policy", sorted(CLOSED_FORM_SR))
def test_each_baseline_policy_has_its_closed_form_success_rate(policy, encoder):
    args = Args(data_name="esc", mode="test", policy=policy, max_turn=2, num_envs=50,
                critic_samples=2, progress=False, seed=3)
    llms = closed_form_world()
    env = harness.build_env(args, TASK, llms)
    cases = esc_cases(0, 600)
    metrics, conversations = harness.evaluate(args, make_policy(args, TASK, encoder),
                                                  env, cases, "test")
    successes = [float(c.outcome == "success") for c in conversations]
    mean, low, high = bootstrap_ci([successes])
    print(f"{policy}: SR {mean:.3f} [{low:.3f}, {high:.3f}], closed form "
          f"{CLOSED_FORM_SR[policy]:.3f}")
    assert metrics["SR"] == pytest.approx(mean)
    assert low <= CLOSED_FORM_SR[policy] <= high
    actions = [r["action"] for c in conversations for r in c.records]
    if policy == "none":
        assert set(actions) == {None}  # no strategy instruction at all
    if policy == "prior":
        assert set(actions) == {"Others"}
    if policy == "random":
        assert set(actions) == set(PRIOR_ORDER[:4])  # only the top-4 candidates
    if policy == "uniform":
        assert set(actions) == set(TASK.action_names)


@pytest.mark.parametrize("order", ["fixed", "shuffle"])
def test_paired_evaluation_gives_the_same_draws_where_two_policies_act_alike(tiny_llm,
                                                                            encoder, order):
    """The real sampler, user and critic both sampling: on the cases where two policies
    chose the same actions, the user's turns and the critic's answers are the same, though
    the other conversations of the batch went differently."""
    args = Args(data_name="esc", mode="test", policy="prior", max_turn=1, num_envs=4,
                critic_samples=3,
                eval_temperature=1.0, system_max_new_tokens=6, user_max_new_tokens=6,
                critic_max_new_tokens=4, progress=False, seed=5)
    cases = esc_cases(0, 16)
    runs = {}
    for policy in ("prior", "random"):
        critic = Critic(TASK, tiny_llm, num_samples=3, temperature=1.0, max_new_tokens=4,
                        order=order)
        planner = Planner(TASK, ScriptedLLM(None, prior=lambda prompt, labels: [
            10.0 - PRIOR_ORDER.index(n) for n in listed_options(prompt)]),
            order="rotate" if order == "shuffle" else "fixed")
        env = SelfPlayEnv(TASK, tiny_llm, tiny_llm, critic, planner=planner, top_k=args.top_k,
                          max_turn=1, eval_temperature=1.0, system_max_new_tokens=6,
                          user_max_new_tokens=6)
        args.policy = policy
        _, conversations = harness.evaluate(args, make_policy(args, TASK, encoder),
                                                env, cases, "test")
        runs[policy] = {c.case_id: c for c in conversations}
    alike = differ = 0
    for case_id, first in runs["prior"].items():
        second = runs["random"][case_id]
        if [r["action"] for r in first.records] == [r["action"] for r in second.records]:
            alike += 1
            assert first.turns == second.turns
            for key in ("critic_answers", "critic_orders", "prior_orders"):
                assert [r[key] for r in first.records] == [r[key] for r in second.records]
        else:
            differ += 1
    assert alike and differ  # both kinds of case occur, so the batches did differ


def test_seeded_samples_do_not_depend_on_the_rest_of_the_batch(tiny_llm):
    chat = [{"role": "user", "content": "Tell me about your day."}]
    other = [{"role": "user", "content": "A much longer and quite different question here?"}]
    together = tiny_llm.chat([chat, other], max_new_tokens=8, temperature=1.0, num_samples=3,
                             seeds=[11, 12])
    alone = tiny_llm.chat([chat], max_new_tokens=8, temperature=1.0, num_samples=3, seeds=[11])
    assert together[0] == alone[0]
    reseeded = tiny_llm.chat([chat], max_new_tokens=8, temperature=1.0, num_samples=3,
                             seeds=[13])
    assert reseeded[0] != alone[0]


@pytest.mark.slow
def test_seeds_run_each_seed_and_report_them(tiny_encoder_dir, tmp_path, monkeypatch, capsys):
    """Two tiny training runs (--seeds 1,2) with the scripted world, a baseline on the same
    seeds, and report.py over all: the table and the figures exist."""
    monkeypatch.setattr(harness, "load_llms", lambda args: closed_form_world())
    common = ["--data_name", "esc", "--data_dir", str(tmp_path / "data"), "--encoder",
              tiny_encoder_dir, "--max_turn", "2", "--critic_samples", "2",
              "--num_envs", "4", "--progress", "false", "--device", "cpu",
              "--output_dir", str(tmp_path / "runs"), "--seeds", "1,2"]
    os.makedirs(tmp_path / "data")
    for split, first in (("train", 0), ("valid", 100), ("test", 200)):
        with open(tmp_path / "data" / f"esc-{split}.txt", "w") as f:
            f.writelines(json.dumps(case) + "\n" for case in esc_cases(first, 12))
    train_model.main(common + ["--total_episodes", "8", "--eval_every", "4",
                               "--batch_size", "4", "--learning_starts", "4"])
    train_model.main(common + ["--mode", "test", "--policy", "random"])
    printed = capsys.readouterr().out
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert len([r for r in runs if not r.startswith("report")]) == 4
    trained = next(r for r in runs if r.startswith("esc__dialogxpert__1__"))
    for figure in ("valid_curve.png", "td_loss.png", "epsilon.png", "actions.png",
                   "prior_vs_q.png"):
        assert os.path.exists(tmp_path / "runs" / trained / figure)
    history = [json.loads(line) for line in open(tmp_path / "runs" / trained /
                                                 "train_history.jsonl")]
    assert [h["episode"] for h in history if h["kind"] == "eval"] == [4, 8]
    import report

    out = report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report"),
                       "--n_boot", "500"])
    table = open(out).read()
    assert "| esc | dialogxpert | 2 |" in table and "| esc | random | 2 |" in table
    assert os.path.exists(tmp_path / "report" / "report.png")
    assert "report.md" in printed  # each --seeds sweep wrote its own report too


@pytest.mark.parametrize("sidecar", ['{"args": 5}', "[1, 2]", '{"step": 3}'])
def test_a_sidecar_without_an_args_object_is_one_user_error(tmp_path, sidecar):
    import torch
    from safetensors.torch import save_file

    from errors import UserError
    from policies import read_checkpoint

    path = str(tmp_path / "best.pt")
    save_file({"q_head.net.0.weight": torch.zeros(1)}, path)
    (tmp_path / "best.pt.json").write_text(sidecar)
    with pytest.raises(UserError, match=re.escape(f"the checkpoint {path} cannot be read "
                                                  f"({path}.json holds no 'args' object)")):
        read_checkpoint(path)
