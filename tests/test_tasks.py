import json
import os

import pytest

from conftest import ROOT, SHARED_DATA, write_json_lines
from tasks import TASKS, DataError, get_task, load_split

DEMO = os.path.join(ROOT, "data", "demo")


def test_unknown_task_lists_choices():
    with pytest.raises(ValueError, match=r"Expected one of \['cb', 'cima', 'esc', 'extes', 'p4g'\]"):
        get_task("esconv")


@pytest.mark.parametrize("task_name", sorted(TASKS))
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_demo_data_loads_and_opens_on_a_user_turn(task_name, split):
    task = get_task(task_name)
    cases = load_split(DEMO, task_name, split)
    assert cases
    for case in cases:
        turns = task.opening(case)
        assert turns and turns[-1][0] == task.user_role and turns[-1][1]


def test_missing_split_names_download_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_data.py"):
        load_split(str(tmp_path), "esc", "train")


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
