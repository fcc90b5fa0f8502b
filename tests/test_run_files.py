"""run_files.py: the records of a run's conversations written and read back, on a real run
of the scripted client and on records built here, and finding and loading runs."""

import dataclasses
import json
import os

import pytest

import run_files
from conftest import make_runs
from critic import Critic
from env import Conversation
from errors import RunFileError, UserError
from run_files import ConversationRecord, TurnRecord
from tasks import get_task


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """[trained run, random-policy baseline] of the scripted client (conftest.make_runs)."""
    return make_runs(str(tmp_path_factory.mktemp("scripted")), test_cases=4)


def written_conversation():
    """A finished env.Conversation whose record has every key a turn can have (the agent's
    note included), and the TurnRecord it was made from."""
    cb = get_task("cb")
    case = {"buyer_price": 100, "seller_price": 200}
    verdict = Critic(cb, llm=None).from_answers(case, ["1, at $150", "1", "2"], [[1, 0], [0, 1]],
                                                [0, 1, 1])
    verdict.orders = [[1, 0], [0, 1]]
    record = TurnRecord(turn=1, action="Propose", system_format_error=1, emotion="unknown",
                        system_empty=1, system_raw="", system="...", user_empty=1, user="...",
                        note={"candidates": [{"action": "Propose", "prior": 0.5}],
                              "explored": False},
                        prior_orders=["Propose"], planner_answers=[{"answer": "1", "named": []}],
                        prompt_cuts={"critic": 1}, run_reward=0.25)
    record.set_verdict(verdict, "time limit")
    conversation = Conversation(case, [("Buyer", "Hi"), ("Seller", "..."), ("Buyer", "...")],
                                case_id=3, system_turns=1, outcome="time limit",
                                total_reward=-0.1, prompt_cuts={"critic": 1},
                                persona={"name": "terse", "text": "Be brief."},
                                cost={"conversation": {}, "planner": {}})
    conversation.records.append(record.to_dict())
    return conversation, record


def test_a_written_conversation_reads_back_as_the_records_it_was_written_from(tmp_path):
    conversation, record = written_conversation()
    run_files.write_results(str(tmp_path), "test", {"SR": 0.0}, [conversation])
    [line] = open(tmp_path / run_files.conversations_file("test")).read().splitlines()
    assert list(json.loads(line)) == [name for name in run_files.CONVERSATION_KEYS
                                      if name != "extra"]
    [read] = run_files.read_conversations(str(tmp_path / run_files.conversations_file("test")))
    assert read.records == [record]  # every key of the record, and the agent's note
    # JSON has no tuples: the turns come back as [role, text] lists
    assert read == dataclasses.replace(ConversationRecord.of(conversation),
                                       turns=[list(turn) for turn in conversation.turns])
    assert (read.case_id, read.outcome, read.persona["name"]) == (3, "time limit", "terse")
    assert record.critic_reads == [1, 0, None] and record.critic_prices == [150.0, None, None]
    assert run_files.read_json(str(tmp_path / run_files.metrics_file("test"))) == {"SR": 0.0}


def test_a_record_keeps_its_keys_and_their_order_through_a_round_trip(runs):
    for split in run_files.SPLITS:
        path = os.path.join(runs[0], run_files.conversations_file(split))
        lines = open(path).read().splitlines()
        for line, read in zip(lines, run_files.read_conversations(path)):
            assert json.dumps(read.to_dict()) == line
            # the keys env.py writes are fields, the agent's (esc: candidates) are its note
            assert all(record.turn and record.system and "candidates" in record.note
                       for record in read.records)


def test_a_write_stopped_part_way_leaves_no_metrics_to_mark_the_run_finished(tmp_path):
    conversation, _ = written_conversation()
    run_files.write_results(str(tmp_path), "test", {"SR": 0.0}, [conversation])

    def stopped():  # the process dies while the second conversation is written
        yield conversation
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_files.write_results(str(tmp_path), "test", {"SR": 1.0}, stopped())
    assert not (tmp_path / run_files.metrics_file("test")).exists()
    with pytest.raises(RunFileError, match="no run folder"):
        run_files.find_runs([str(tmp_path)], [run_files.metrics_file("test")], "metrics")
    [line] = open(tmp_path / run_files.conversations_file("test")).read().splitlines()
    assert json.loads(line)["case_id"] == 3  # the earlier file, whole


def test_unknown_and_missing_keys_are_kept_and_defaulted():
    read = ConversationRecord.from_dict({"case_id": 1, "reviewer": "someone",
                                         "records": [{"turn": 1, "newer": [2]}]})
    assert read.extra == {"reviewer": "someone"} and read.records[0].note == {"newer": [2]}
    assert read.outcome is None and read.records[0].action is None
    assert read.to_dict()["reviewer"] == "someone"
    assert read.records[0].to_dict()["newer"] == [2]
    assert "deal_price" not in read.records[0].to_dict()  # an optional key is left out
    assert read.records[0].to_dict()["outcome"] is None  # a key of every record is not


def test_a_malformed_line_is_one_run_file_error_naming_the_file_and_line(tmp_path):
    path = str(tmp_path / "test_conversations.jsonl")
    with open(path, "w") as f:
        f.write('{"case_id": 0, "records": []}\n[1, 2]\n{"records": "none"}\n{"case_id"\n')
    with pytest.raises(RunFileError, match=r"line 2: not a JSON object") as error:
        run_files.read_conversations(path)
    assert isinstance(error.value, UserError)
    bad = []
    assert len(run_files.read_conversations(path, skip_bad=True, bad=bad)) == 1
    assert [(b["line"], b["reason"].split(":")[0]) for b in bad] == [
        (2, "not a JSON object"), (3, "'records' is not a list of JSON objects"), (4, "not JSON")]
    with pytest.raises(RunFileError, match="cannot read"):
        run_files.read_json(str(tmp_path / "missing.json"))


def test_a_metrics_file_that_is_not_a_json_object_is_one_run_file_error(tmp_path):
    (tmp_path / "test_metrics.json").write_text("[1, 2]")
    with pytest.raises(RunFileError, match=r"test_metrics.json is not a JSON object\. Repair"):
        run_files.load_run(str(tmp_path))


def test_find_runs_and_load_run(runs, tmp_path):
    marks = [run_files.metrics_file("test")]
    assert run_files.find_runs([os.path.dirname(runs[0])], marks, "test metrics") == sorted(runs)
    with pytest.raises(RunFileError, match="no run folder in .*: it holds no test metrics"):
        run_files.find_runs([str(tmp_path)], marks, "test metrics")
    with pytest.raises(RunFileError, match="is not a folder"):
        run_files.load_run(str(tmp_path / "missing"))
    trained = run_files.load_run(runs[0], history=True)
    assert set(trained.conversations) == set(trained.metrics) == {"train", "test"}
    assert trained.history and trained.saved_args()[1] == run_files.sidecar(run_files.LAST)
    assert [os.path.basename(path) for path in trained.figures()] == sorted(
        name for name in os.listdir(runs[0]) if name.endswith(".png"))
    tested = run_files.load_run(runs[1], splits=("test",))
    assert set(tested.conversations) == {"test"} and tested.history is None
