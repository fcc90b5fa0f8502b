"""The planner and the critic as instruments: option order under control, the critic's
report card on human conversations, and saved runs re-judged by another critic. The
scripted clients here have biases that are known, so each figure has a known value."""

import hashlib
import json
import math
import os
import re

import pytest
import torch

import critic_check
import report
import harness
import train_model
from conftest import ScriptedLLM, listed_options, option_number, write_json_lines
from critic import Critic
from env import Conversation, Planner
from tasks import get_task

TASK = get_task("esc")
V = len(TASK.verdicts)


def human_cases(count):
    return [{"emotion_type": "sadness", "problem_type": "job",
             "situation": f"I lost my job, case {i}.",
             "dialog": [{"speaker": "sys", "text": "Hello, how can I help?"},
                        {"speaker": "usr", "text": "I feel low."},
                        {"speaker": "sys", "text": "That sounds hard."},
                        {"speaker": "usr", "text": "Thank you, I feel much better. Goodbye"}]}
            for i in range(count)]


@pytest.fixture
def human_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_json_lines(folder / "esc-valid.txt", human_cases(12))
    return str(folder)


def use_critic(monkeypatch, reply=None, prior=None):
    """critic_check's critic becomes a scripted client, built from its flags."""
    def load(args):
        llm = ScriptedLLM(reply, prior=prior)
        return (Critic(get_task(args.data_name), llm, mode=args.critic,
                       num_samples=args.critic_samples, order=args.critic_order),
                "scripted-critic")
    monkeypatch.setattr(critic_check, "load_critic", load)


def card(human_dir, tmp_path, *flags):
    return critic_check.main(["--data_name", "esc", "--data_dir", human_dir, "--split", "valid",
                              "--out", str(tmp_path / "card"), *flags])["figures"]


def conversations(count, turns=(("Patient", "hi"),)):
    return [Conversation({"emotion_type": "x", "problem_type": "y"}, list(turns), stream=i)
            for i in range(count)]


# -- a critic that always answers "1": all position, no content -----------------------------

def test_a_critic_that_always_answers_1_is_all_position(human_dir, tmp_path, monkeypatch):
    use_critic(monkeypatch, reply=lambda prompt: "1")
    figures = card(human_dir, tmp_path, "--critic_samples", "3")
    assert figures["position_curve"] == [1.0, 0.0, 0.0, 0.0]
    for point in ("start", "end"):
        assert figures["order_sensitivity"][point]["top_verdict_changes"] == 1.0
    assert figures["sample_agreement"] == 1.0  # its samples agree: consistency is not validity
    # the pooled rotations spread its verdicts evenly; fixed, every verdict is option 1
    assert figures["by_point"]["end"]["shuffled"]["mean_distribution"] == [0.25] * 4
    assert figures["by_point"]["end"]["fixed"]["mean_distribution"] == [1.0, 0.0, 0.0, 0.0]
    for name in ("report_card.md", "report_card.json", "report_card.png"):
        assert os.path.getsize(tmp_path / "card" / name) > 0


def test_shuffled_samples_of_a_position_critic_spread_over_every_option():
    # one sample a conversation: the order is the conversation's own draw
    critic = Critic(TASK, ScriptedLLM(lambda prompt: "1"), num_samples=1, order="shuffle")
    n = 800
    results = critic.score(conversations(n))
    counts = [sum(r.reads[0] == option for r in results) for option in range(V)]
    spread = 3.3 * math.sqrt(n * (1 / V) * (1 - 1 / V))  # a 99.9% binomial interval
    assert all(abs(c - n / V) <= spread for c in counts), counts
    # V samples a conversation: one in each rotation, so each option exactly once
    critic = Critic(TASK, ScriptedLLM(lambda prompt: "1"), num_samples=V, order="shuffle")
    for result in critic.score(conversations(5)):
        assert result.option_probs == [0.25] * 4 and len(result.orders) == V


def test_shuffled_logits_average_the_distribution_over_every_rotation():
    first = lambda prompt, labels: [0.97] + [0.01] * (len(labels) - 1)  # noqa: E731
    fixed = Critic(TASK, ScriptedLLM(None, prior=first), mode="logits").score(conversations(2))
    assert fixed[0].option_probs == pytest.approx([0.97, 0.01, 0.01, 0.01])
    shuffled = Critic(TASK, ScriptedLLM(None, prior=first), mode="logits",
                      order="shuffle").score(conversations(2))
    assert shuffled[0].option_probs == pytest.approx([0.25] * 4)
    assert len(shuffled[0].order_probs) == V


# -- a critic that reads the content: order-blind ----------------------------------------

def content_reply(prompt):
    """Option 4 (solved) once the Patient said goodbye, else option 2 (the same), named by
    the number shown for it."""
    verdict = TASK.verdicts[3 if "Goodbye" in prompt else 1]
    return option_number(prompt, verdict)


def test_an_order_blind_critic_gives_the_same_results_fixed_and_shuffled(human_dir, tmp_path,
                                                                         monkeypatch):
    use_critic(monkeypatch, reply=content_reply)
    figures = card(human_dir, tmp_path, "--critic_samples", "4")
    for point in ("start", "end"):
        assert figures["by_point"][point]["fixed"] == figures["by_point"][point]["shuffled"]
    for point in ("start", "end"):
        assert figures["order_sensitivity"][point]["top_verdict_changes"] == 0.0
        assert figures["order_sensitivity"][point]["mean_reward_change"] == 0.0
    assert figures["position_curve"] == [0.25] * 4
    assert figures["start_vs_end"]["fixed"]["better_at_end"] == 1.0
    turns = [("Patient", "Goodbye")]
    fixed = Critic(TASK, ScriptedLLM(content_reply), num_samples=4).score(conversations(6, turns))
    shuffled = Critic(TASK, ScriptedLLM(content_reply), num_samples=4,
                      order="shuffle").score(conversations(6, turns))
    assert [(r.reward, r.option_probs) for r in fixed] == [(r.reward, r.option_probs)
                                                            for r in shuffled]


def test_order_sensitivity_counts_conversations_at_each_point(tmp_path, monkeypatch):
    """Two conversations: at the opening the critic answers by position in both, at the
    end it reads the content of one and gives no usable answer for the other. Each point
    counts its own conversations: 2 of 2 compared at the start, 1 (and 1 left out) at the
    end, never 3 of the 4 judged points."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_json_lines(folder / "esc-valid.txt", human_cases(2))

    def reply(prompt):
        if "Goodbye" not in prompt:
            return "1"
        return "?" if "case 0." in prompt else content_reply(prompt)
    use_critic(monkeypatch, reply=reply)
    figures = card(str(folder), tmp_path, "--critic_samples", "2")
    start, end = figures["order_sensitivity"]["start"], figures["order_sensitivity"]["end"]
    assert (start["conversations_compared"], start["left_out_no_usable_answer"]) == (2, 0)
    assert start["top_verdict_changes"] == 1.0
    assert (end["conversations_compared"], end["left_out_no_usable_answer"]) == (1, 1)
    assert end["top_verdict_changes"] == 0.0
    text = (tmp_path / "card" / "report_card.md").read_text()
    assert "at the start | 1.000 of 2 conversations (0 left out" in text
    assert "at the end | 0.000 of 1 conversations (1 left out" in text


def test_cb_deal_answers_follow_the_order_shown():
    """cb's question shows the deal option's number in its example, and "N, price" is read
    in the order shown."""
    cb = get_task("cb")
    case = {"buyer_price": 100, "seller_price": 200, "item_name": "bike",
            "buyer_item_description": "", "seller_item_description": ""}

    def reply(prompt):
        deal = option_number(prompt, cb.verdicts[1])
        assert f"in this format: {deal}, <price>" in prompt
        return f"{deal}, 150"
    critic = Critic(cb, ScriptedLLM(reply), num_samples=4, order="shuffle")
    result = critic.score([Conversation(case, [("Buyer", "150?"), ("Seller", "ok")], stream=3)])[0]
    assert result.deal_price == 150 and result.invalid == 0 and len(result.orders) == 2


# -- the planner ---------------------------------------------------------------------------

TARGET = "Information"


def biased_prior(prompt, labels):
    """Strongly prefers the first listed action, and the target action by content."""
    names = listed_options(prompt)
    return [(50.0 if k == 0 else 1.0) * (4.0 if name == TARGET else 1.0)
            for k, name in enumerate(names)]


def test_a_rotated_prior_ranks_the_preferred_content_first():
    conversation = conversations(1)
    fixed = Planner(TASK, ScriptedLLM(None, prior=biased_prior)).prior(conversation)[0]
    assert TASK.action_names[int(fixed.argmax())] == TASK.action_names[0]  # the position
    planner = Planner(TASK, ScriptedLLM(None, prior=biased_prior), order="rotate")
    rotated = planner.prior(conversation)[0]
    assert TASK.action_names[int(rotated.argmax())] == TARGET  # the content
    assert torch.isclose(rotated.sum(), torch.tensor(1.0))
    assert sorted(conversation[0].prior_orders) == list(range(len(TASK.actions)))
    # sampled answers are read back in the order each one was shown
    sampler = Planner(TASK, ScriptedLLM(lambda prompt: option_number(prompt, TARGET)),
                      mode="sample", num_samples=16, order="rotate")
    sampled = sampler.prior(conversation)[0]
    assert TASK.action_names[int(sampled.argmax())] == TARGET
    assert conversation[0].planner_invalid == 0


def test_sampled_prior_ties_are_broken_by_the_conversation_stream():
    """Unsampled actions tie under add-one smoothing: which of them enter the top-k is a
    draw of the conversation's stream, not their place in the list."""
    planner = Planner(TASK, ScriptedLLM(lambda prompt: "none"), mode="sample", num_samples=3)
    chosen = [planner.candidates([c], 4)[1][0] for c in conversations(200)]
    firsts = {top[0] for top in chosen}
    assert firsts == set(range(len(TASK.actions)))  # every action gets to be first
    again = [planner.candidates([c], 4)[1][0] for c in conversations(200)]
    assert again == chosen  # the same draw for the same conversation and turn


# -- re-judging a run ------------------------------------------------------------------------

def world_reply(prompt, invert=False):
    """Judges the last system turn, which names its action: Question solves (4), Others
    makes it worse (1), anything else leaves it the same (2); invert maps option i to 5-i."""
    played = re.findall(r"Therapist: I try (.+?)\.", prompt)
    verdict = {"Question": 3, "Others": 0}.get(played[-1] if played else "", 1)
    return option_number(prompt, TASK.verdicts[3 - verdict if invert else verdict])


def world_llms():
    def system(prompt):
        instruction = prompt[prompt.rindex("("):]
        action = next(a for a in TASK.action_names if TASK.actions[a] in instruction)
        return f"Emotion: calm\nResponse: I try {action}."
    return {"planner": ScriptedLLM(None), "system": ScriptedLLM(system),
            "user": ScriptedLLM(lambda prompt: "I see."),
            "critic": ScriptedLLM(world_reply)}


@pytest.fixture
def played_run(tmp_path, tiny_encoder_dir, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_json_lines(data / "esc-test.txt", human_cases(24))
    monkeypatch.setattr(harness, "load_llms", lambda args: world_llms())
    _, folder = train_model.run(train_model.parse_args([
        "--mode", "test", "--policy", "random", "--data_dir", str(data), "--encoder",
        tiny_encoder_dir, "--max_turn", "3", "--critic_samples", "2", "--num_envs", "8",
        "--output_dir", str(tmp_path / "runs"), "--progress", "false", "--device", "cpu"]))
    return folder


def file_hashes(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


def rejudge(folder, out, name):
    return critic_check.main(["--run", folder, "--out", out, "--critic_samples", "2",
                              "--judge_name", name])["figures"]


@pytest.mark.slow
def test_rejudging_with_the_same_critic_agrees_and_leaves_the_run_alone(played_run, tmp_path,
                                                                        monkeypatch):
    metrics = json.load(open(os.path.join(played_run, "test_metrics.json")))
    assert metrics["judge"]["critic_order"] == "shuffle" and metrics["judge"]["self_judged"]
    before = file_hashes(played_run)
    use_critic(monkeypatch, reply=world_reply)
    figures = rejudge(played_run, str(tmp_path / "same"), "same")
    assert file_hashes(played_run) == before  # nothing written over the run's files
    assert figures["success_agreement"] == 1.0 and figures["top_verdict_kappa"] == 1.0
    assert figures["turn_reward_spearman"] == pytest.approx(1.0)
    rejudged = os.path.join(played_run, "rejudged", "same")
    assert json.load(open(os.path.join(rejudged, "test_metrics.json")))["SR"] == metrics["SR"]
    # report.py tables the run under the second critic
    text = open(report.main([played_run, "--judge", "same", "--out", str(tmp_path / "rep"),
                             "--n_boot", "200"])).read()
    assert "scripted-critic sample, shuffle order" in text
    with pytest.raises(SystemExit):
        report.main([played_run, "--judge", "nobody", "--out", str(tmp_path / "rep2")])


@pytest.mark.slow
def test_rejudging_with_an_inverting_critic_gives_the_hand_computed_kappa(played_run, tmp_path,
                                                                          monkeypatch):
    use_critic(monkeypatch, reply=lambda prompt: world_reply(prompt, invert=True))
    figures = rejudge(played_run, str(tmp_path / "inv"), "inverted")
    run = [json.loads(line) for line in open(os.path.join(played_run, "test_conversations.jsonl"))]
    old = [max(range(V), key=r["critic_option_probs"].__getitem__) for c in run
           for r in c["records"]]
    new = [V - 1 - t for t in old]
    # Cohen's kappa from the confusion table, by hand
    n = len(old)
    table = [[sum(a == i and b == j for a, b in zip(old, new)) for j in range(V)]
             for i in range(V)]
    observed = sum(table[i][i] for i in range(V)) / n
    expected = sum(sum(table[i]) * sum(row[i] for row in table) for i in range(V)) / n ** 2
    assert len(set(old)) > 1 and figures["top_verdict_kappa"] == pytest.approx(
        (observed - expected) / (1 - expected))
    # the inverted critic calls a success where the run's saw worse or the same (0 or 1)
    agree = [(c["outcome"] == "success") == any(max(range(V), key=r["critic_option_probs"]
                                                    .__getitem__) in (0, 1) for r in c["records"])
             for c in run]
    assert figures["success_agreement"] == pytest.approx(sum(agree) / len(agree))


@pytest.mark.slow
def test_the_card_of_a_rejudged_run_names_the_runs_critic_as_recorded(played_run, tmp_path,
                                                                     monkeypatch):
    played = json.load(open(os.path.join(played_run, "test_metrics.json")))["judge"]
    use_critic(monkeypatch, reply=world_reply)
    result = critic_check.main(["--run", played_run, "--out", str(tmp_path / "card"),
                                "--critic_samples", "3", "--critic_order", "fixed",
                                "--judge_name", "other"])
    assert result["figures"]["run_judge"] == {key: played[key] for key in critic_check.CRITIC_KEYS}
    assert None not in result["figures"]["run_judge"].values()
    text = (tmp_path / "card" / "report_card.md").read_text()
    assert (f"whose critic was `{played['critic_llm']}`, --critic sample (2 samples at "
            f"temperature {played['critic_temperature']}), --critic_order shuffle;") in text
    assert "Judge: `scripted-critic`, --critic sample (3 samples" in text
    assert "--critic_order fixed" in text and "None" not in text


@pytest.mark.slow
def test_critic_check_bad_input_is_one_error_line(played_run, tmp_path, capsys, monkeypatch):
    """Each before the critic's model loads."""
    monkeypatch.setattr(critic_check, "load_critic",
                        lambda args: pytest.fail("the critic's model was loaded"))
    cases = [
        (["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "is not a folder"),
        (["--run", played_run, "--data_name", "cb", "--out", str(tmp_path / "o")],
         "is a run of task 'esc'"),
        (["--data_dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")], "no valid data"),
        (["--split", "nonsense", "--out", str(tmp_path / "o")],
         "--split 'nonsense' is not a split of the data. Pass one of train, valid, test"),
    ]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "test_metrics.json").write_text(json.dumps({"task": "esc", "max_turn": 3}))
    (broken / "test_conversations.jsonl").write_text('{"turns": [["Patient", "hi"]], "rec\n')
    cases.append((["--run", str(broken), "--out", str(tmp_path / "o")], "line 1"))
    unplayable = tmp_path / "unplayable"
    unplayable.mkdir()
    (unplayable / "test_metrics.json").write_text(json.dumps({"task": "esc", "max_turn": 3}))
    (unplayable / "test_conversations.jsonl").write_text('{"turns": 5, "records": []}\n')
    cases.append((["--run", str(unplayable), "--out", str(tmp_path / "o")],
                  "test_conversations.jsonl, line 1: no 'turns' list"))
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "test_metrics.json").write_text("[]")
    cases.append((["--run", str(listed), "--out", str(tmp_path / "o")],
                  "test_metrics.json is not a JSON object"))
    cases.append((["--max_turn", "x", "--out", str(tmp_path / "o")],
                  "argument --max_turn: invalid int value: 'x'"))
    (tmp_path / "a_file").write_text("")
    cases.append((["--data_dir", "data/demo", "--out", str(tmp_path / "a_file")],
                  f"cannot create the folder {tmp_path / 'a_file'}"))
    for argv, message in cases:
        monkeypatch.setattr("sys.argv", ["critic_check.py", *argv])
        with pytest.raises(SystemExit) as stop:
            critic_check.cli()
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and err.startswith("error: ") and message in err, err
        assert len(err.splitlines()) == 1
