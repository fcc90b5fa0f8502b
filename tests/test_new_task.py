"""A sixth task is what docs/editing.md says: one prompt block and one registry entry,
registered here from a scratch block (never in the shipped registry), then taken through
download_data.py (against a server on 127.0.0.1), a short scripted training, the critic's
report card on its human conversations and on the run, report.py and view.py."""

import json
import os

import pytest

import critic_check
import download_data
import harness
import llm
import report
import tasks
import train_model
import view
from conftest import ScriptedLLM, option_number, write_json_lines
from test_download import serve, static_handler
from tasks import SPLITS, OptionRewards, Task

BLOCK = {
    "system_role": "Coach", "user_role": "Runner",
    "actions": {"Encourage": "Encourage the Runner to keep going.",
                "Plan": "Plan the race route with the Runner.",
                "Rest": "Tell the Runner to take a day off."},
    "planner": "You plan the next step of a coaching chat between a Coach and a Runner.",
    "system": "You coach {name} for a race.",
    "user": "You are {name}, a runner. Reply in one short sentence.",
    "critic": "You judge coaching chats with {name}.",
    "critic_question": "Is {name} ready for the race?",
    "verdicts": ["No, not ready.", "Yes, ready."],
}


def coach_task(sources):
    """The new task's registry entry, as docs/editing.md describes it."""
    return Task(
        "coach", BLOCK, reward=OptionRewards((-1.0, 1.0), succeeds=lambda reward: reward > 0),
        files={split: f"coach-{split}.txt" for split in SPLITS}, sources=sources,
        schema={"name": str, "dialog": list},
        opening=lambda case: [("Runner", f"Hi coach, I am {case['name']}.")],
        human_dialog=lambda case: [("Runner", f"Hi coach, I am {case['name']}.")] + [
            ("Coach" if turn["speaker"] == "coach" else "Runner", turn["text"])
            for turn in case["dialog"]])


def coach_cases(first, count):
    return [{"name": f"Ann case {i}",
             "dialog": [{"speaker": "coach", "text": "I try Plan."},
                        {"speaker": "runner", "text": "Got it, see you at the start."}]}
            for i in range(first, first + count)]


def system_reply(prompt):
    """Names the action whose instruction it was given last."""
    action = max(BLOCK["actions"], key=lambda name: prompt.rfind(BLOCK["actions"][name]))
    return f"Emotion: calm\nResponse: I try {action}."


def critic_reply(prompt):
    """Ready once the Coach planned the route, named by the number shown for it."""
    verdict = BLOCK["verdicts"][1 if "I try Plan." in prompt else 0]
    return option_number(prompt, verdict)


def scripted_llms(args=None):
    return {"planner": ScriptedLLM(None), "system": ScriptedLLM(system_reply),
            "user": ScriptedLLM(lambda prompt: "Okay."), "critic": ScriptedLLM(critic_reply)}


@pytest.mark.slow
def test_a_sixth_task_downloads_trains_and_is_judged_and_reported(tmp_path, tiny_encoder_dir,
                                                                  monkeypatch, capsys):
    host = tmp_path / "host"
    host.mkdir()
    for split, first, count in (("train", 0, 4), ("valid", 100, 2), ("test", 200, 3)):
        write_json_lines(host / f"coach-{split}.txt", coach_cases(first, count))
    data = tmp_path / "data"
    with serve(static_handler(str(host))) as url:  # a data host on 127.0.0.1
        monkeypatch.setitem(tasks.TASKS, "coach", coach_task(
            {f"coach-{split}.txt": f"{url}/coach-{split}.txt" for split in SPLITS}))
        assert download_data.main(["--data_name", "coach", "--data_dir", str(data)]) == 0
    for split in SPLITS:
        assert (data / f"coach-{split}.txt").read_text() == (host / f"coach-{split}.txt").read_text()
    assert "coach-test.txt: new, 3 cases" in capsys.readouterr().out

    monkeypatch.setattr(harness, "load_llms", scripted_llms)
    _, run = train_model.main([
        "--data_name", "coach", "--data_dir", str(data), "--encoder", tiny_encoder_dir,
        "--top_k", "3", "--max_turn", "2", "--critic_samples", "2", "--total_episodes", "4",
        "--eval_every", "2", "--batch_size", "2", "--learning_starts", "2", "--num_envs", "4",
        "--output_dir", str(tmp_path / "runs"), "--progress", "false", "--device", "cpu",
        "--max_encoder_tokens", "64"])
    metrics = json.load(open(os.path.join(run, "test_metrics.json")))
    assert metrics["task"] == "coach" and metrics["episodes"] == 3

    # the critic's card: on the human conversations of the valid split, and on the run
    monkeypatch.setattr(llm, "load_llm", lambda backend, name, **options: ScriptedLLM(
        critic_reply))
    human = critic_check.main(["--data_name", "coach", "--data_dir", str(data), "--split",
                               "valid", "--critic_samples", "2", "--out",
                               str(tmp_path / "card")])["figures"]
    assert human["cases"] == 2
    assert human["start_vs_end"]["fixed"]["better_at_end"] == 1.0  # the Coach planned
    rejudged = critic_check.main(["--data_name", "coach", "--run", run, "--critic_samples",
                                  "2", "--judge_name", "again", "--out",
                                  str(tmp_path / "card_run")])["figures"]
    assert rejudged["success_agreement"] == 1.0

    for judge in ("", "again"):  # the run as played, and as re-judged
        out = report.main([run, "--judge", judge, "--out", str(tmp_path / f"report{judge}"),
                           "--n_boot", "100"])
        assert f"| coach | dialogxpert | 1 | 3 | {metrics['SR']:.3f} [" in open(out).read()
    page, bad = view.write_page([run], str(tmp_path / "view.html"))
    assert not bad and "I try Plan." in open(page, encoding="utf-8").read()


def test_a_task_without_sources_or_demo_says_where_its_files_go(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tasks.TASKS, "coach", coach_task({}))
    with pytest.raises(tasks.DataError, match=r"Write the task's files into --data_dir .*"
                                              r"coach-test.txt, coach-train.txt, coach-valid.txt"):
        tasks.load_split(str(tmp_path), "coach", "train")
    assert download_data.main(["--data_name", "coach", "--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith(
        "error: no download source in tasks.py for task 'coach': coach-test.txt, "
        "coach-train.txt, coach-valid.txt. Add each file's URL")
    assert "Traceback" not in err and not os.listdir(tmp_path)


def test_the_card_names_the_reader_a_task_without_human_dialogs_needs(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setitem(tasks.TASKS, "coach", Task(
        "coach", BLOCK, reward=OptionRewards((-1.0, 1.0), succeeds=lambda reward: reward > 0),
        files={split: f"coach-{split}.txt" for split in SPLITS}, sources={},
        schema={"name": str}, opening=lambda case: [("Runner", "Hi coach.")]))
    write_json_lines(tmp_path / "coach-valid.txt", coach_cases(0, 2))
    loaded = []

    def load_llm(backend, name, **options):
        loaded.append(name)
        return ScriptedLLM(critic_reply)
    monkeypatch.setattr(llm, "load_llm", load_llm)
    monkeypatch.setattr("sys.argv", ["critic_check.py", "--data_name", "coach", "--data_dir",
                                     str(tmp_path), "--out", str(tmp_path / "card")])
    with pytest.raises(SystemExit) as stop:
        critic_check.cli()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.splitlines() == [err]
    assert "has no case with a human dialog" in err and "`human_dialog`" in err
    assert not loaded and not (tmp_path / "card").exists()  # before any model or folder
