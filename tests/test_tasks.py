import json
import os
import re

import pytest

from conftest import DEMO, SHARED_DATA, write_json_lines
from tasks import TASKS, DataError, get_task, labelled_examples, load_split

# the tasks that declare demo cases in data/demo (Task.demo); the others have none to check
DEMO_TASKS = sorted(name for name, task in TASKS.items() if task.demo)


def test_unknown_task_lists_choices():
    with pytest.raises(ValueError, match=re.escape(f"Expected one of {sorted(TASKS)}")):
        get_task("esconv")


def test_a_task_declares_demo_cases_exactly_when_data_demo_has_its_files():
    for name, task in TASKS.items():
        present = all(os.path.isfile(os.path.join(DEMO, path)) for path in task.files.values())
        assert task.demo == present, name


@pytest.mark.parametrize("task_name", DEMO_TASKS)
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_demo_data_loads_and_opens_on_a_user_turn(task_name, split):
    task = get_task(task_name)
    cases = load_split(DEMO, task_name, split)
    assert cases
    for case in cases:
        turns = task.opening(case)
        assert turns and turns[-1][0] == task.user_role and turns[-1][1]


def test_missing_split_names_download_script(tmp_path):
    with pytest.raises(DataError, match="download_data.py"):
        load_split(str(tmp_path), "esc", "train")


def test_a_data_file_that_cannot_be_read_is_a_data_error(tmp_path):
    (tmp_path / "esc-test.txt").mkdir()
    with pytest.raises(DataError, match=r"esc-test.txt cannot be read \(Is a directory\)"):
        load_split(str(tmp_path), "esc", "test")


def test_a_strategy_label_of_another_type_is_no_label():
    case = load_split(DEMO, "esc", "train")[0]
    for turn in case["dialog"]:
        if turn.get("speaker") == "sys":
            turn["strategy"] = 3
    examples, counts = labelled_examples(get_task("esc"), [case])
    assert examples == [] and counts["unlabelled_turns"] == counts["system_turns"] > 0


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "esc-train.txt"
    good = {"emotion_type": "sad", "problem_type": "job", "situation": "s", "dialog": []}
    path.write_text(json.dumps(good) + "\n{'emotion_type': 'sad'}\n")
    with pytest.raises(DataError, match=r"esc-train.txt, line 2: not valid JSON"):
        load_split(str(tmp_path), "esc", "train")


def test_missing_field_is_reported(tmp_path):
    write_json_lines(tmp_path / "cb-valid.txt", [{"item_name": "bike", "dialog": []}])
    with pytest.raises(DataError, match=r"line 1: missing field\(s\) \['buyer_price'"):
        load_split(str(tmp_path), "cb", "valid")


def test_data_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    (tmp_path / "esc-test.txt").write_text(f"__import__('pathlib').Path('{marker}').touch()\n")
    with pytest.raises(DataError):
        load_split(str(tmp_path), "esc", "test")
    assert not marker.exists()


def test_extes_split_is_fixed_disjoint_and_complete():
    splits = {s: load_split(DEMO, "extes", s) for s in ("train", "valid", "test")}
    again = {s: load_split(DEMO, "extes", s) for s in ("train", "valid", "test")}
    assert splits == again
    descriptions = [c["description"] for s in splits.values() for c in s]
    assert len(descriptions) == len(set(descriptions)) == 10
    assert load_split(DEMO, "extes", "train", extes_seed=1) != splits["train"]


def test_cb_opening_states_list_price():
    case = load_split(DEMO, "cb", "test")[0]
    turns = get_task("cb").opening(case)
    assert turns[0][0] == "Buyer" and str(case["seller_price"]) in turns[1][1]


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is absent")
@pytest.mark.parametrize("task_name,split", [("esc", "valid"), ("cima", "valid"),
                                             ("cima", "train"), ("cb", "valid"), ("p4g", "valid")])
def test_real_benchmark_files_load(task_name, split):
    cases = load_split(SHARED_DATA, task_name, split)
    assert len(cases) >= 50
    for case in cases:
        assert get_task(task_name).opening(case)[-1][0] == get_task(task_name).user_role


@pytest.mark.parametrize("task_name", DEMO_TASKS)
def test_every_prompt_of_a_task_formats_with_its_demo_cases(task_name):
    from critic import Critic
    from env import Planner, new_conversation, system_prompt, user_prompt

    task = get_task(task_name)
    for case in load_split(DEMO, task_name, "test"):
        conversation = new_conversation(task, case)
        for action in task.action_names:
            assert task.actions[action] in system_prompt(task, conversation, action)[-1]["content"]
        user_prompt(task, conversation)
        Planner(task, None).prompt(conversation)
        Critic(task, None).prompt(conversation)


@pytest.mark.parametrize("field,value,message", [
    ("buyer_price", float("nan"), "0 < buyer_price < seller_price"),
    ("buyer_price", True, "'buyer_price' must be a number"),
    ("seller_price", "200", "'seller_price' must be a number"),
    ("buyer_price", 300, "0 < buyer_price < seller_price"),
    ("item_name", 5, "'item_name' must be a str"),
])
def test_cb_case_types_and_prices_are_checked(tmp_path, field, value, message):
    case = load_split(DEMO, "cb", "test")[0] | {field: value}
    (tmp_path / "cb-test.txt").write_text(json.dumps(case) + "\n")
    with pytest.raises(DataError, match=re.escape("cb-test.txt, line 1: ") + ".*" + re.escape(message)):
        load_split(str(tmp_path), "cb", "test")


def test_non_utf8_bytes_name_the_file(tmp_path):
    (tmp_path / "esc-test.txt").write_bytes(b'{"situation": "ok"}\n{"situation": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"esc-test.txt, line 2: not UTF-8"):
        load_split(str(tmp_path), "esc", "test")


def test_a_new_task_is_one_prompt_block_and_one_registry_entry(monkeypatch, tmp_path):
    """Nothing outside the block and the entry needs to know the task's name."""
    from conftest import ScriptedLLM
    from critic import Critic
    from env import Planner, SelfPlayEnv
    from tasks import SPLITS, OptionRewards, Task

    block = {"system_role": "Coach", "user_role": "Runner",
             "actions": {"Encourage": "Encourage the Runner.", "Plan": "Plan a route."},
             "planner": "You plan a coaching chat.", "system": "You coach {name}.",
             "user": "You are {name}, a runner.", "critic": "You judge coaching chats.",
             "critic_question": "Is {name} ready?", "verdicts": ["No.", "Yes, ready."]}
    task = Task("coach", block, reward=OptionRewards((-1.0, 1.0), succeeds=lambda r: r > 0),
                files={s: f"coach-{s}.txt" for s in SPLITS}, sources={},
                schema={"name": str}, opening=lambda case: [("Runner", "Hi coach.")])
    monkeypatch.setitem(TASKS, "coach", task)
    write_json_lines(tmp_path / "coach-test.txt", [{"name": "Ann"}])
    case = load_split(str(tmp_path), "coach", "test")[0]
    critic = Critic(task, ScriptedLLM(lambda prompt: "2" if "Ann" in prompt else "?"),
                    num_samples=2)
    env = SelfPlayEnv(task, ScriptedLLM(lambda p: "Emotion: keen\nResponse: Go!"),
                      ScriptedLLM(lambda p: "Ok."), critic)
    conversation = env.start(case)
    assert Planner(task, ScriptedLLM(None)).prior([conversation]).shape == (1, 2)
    result = env.step([conversation], ["Plan"])[0]
    assert result.reward == 1.0 and result.terminated and conversation.outcome == "success"


from hypothesis import given, settings, strategies as st  # noqa: E402

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=10), children, max_size=4),
                           max_leaves=10)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(TASKS)), st.lists(JSON_VALUES | st.text(max_size=40), max_size=3),
       st.dictionaries(st.sampled_from(["item_name", "buyer_price", "seller_price", "dialog",
                                        "situation", "sentence", "description", "scene",
                                        "content", "emotion_type"]), JSON_VALUES))
def test_readers_accept_good_cases_or_raise_data_error(tmp_path_factory, task_name, lines, case):
    folder = tmp_path_factory.mktemp("fuzz")
    path = os.path.join(folder, get_task(task_name).files["test"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = [json.dumps(x) if not isinstance(x, str) else x for x in lines] + [json.dumps(case)]
    with open(path, "w") as f:
        f.write(json.dumps([json.loads(r) for r in rows if _is_json(r)]) if path.endswith(".json")
                else "\n".join(rows) + "\n")
    try:
        cases = load_split(str(folder), task_name, "test")
    except DataError:
        return
    for loaded in cases:  # what the reader accepts, the prompts can use
        get_task(task_name).opening(loaded)


def _is_json(text):
    try:
        json.loads(text)
        return True
    except ValueError:
        return False
