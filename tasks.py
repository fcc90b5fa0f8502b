"""Task registry: everything that differs between datasets, keyed by --data_name.

Prompt text and action sets come from qwen_prompts.py; this module adds the data format,
the success and failure rules, and the opening turns built from a case.
"""

import json
import os
import random
from dataclasses import dataclass

import qwen_prompts as prompts


class DataError(ValueError):
    """A data file is missing or malformed."""


@dataclass(frozen=True)
class Task:
    name: str
    system_role: str
    user_role: str
    actions: dict  # action name -> instruction
    verdicts: dict  # verdict sentence -> reward
    success_threshold: float  # mean critic reward at or above this ends the dialogue: success
    failure_threshold: float | None  # mean critic reward at or below this ends it: failure
    bargaining: bool = False  # cb: reward is the sale-to-list ratio of the agreed price

    @property
    def action_names(self):
        return list(self.actions)


TASKS = {
    "esc": Task("esc", *prompts.ROLES["esc"], prompts.ACTIONS["esc"], prompts.VERDICTS["esc"],
                success_threshold=0.5, failure_threshold=-1.0),
    "extes": Task("extes", *prompts.ROLES["extes"], prompts.ACTIONS["extes"],
                  prompts.VERDICTS["extes"], success_threshold=0.5, failure_threshold=-1.0),
    "cima": Task("cima", *prompts.ROLES["cima"], prompts.ACTIONS["cima"],
                 prompts.VERDICTS["cima"], success_threshold=1.0, failure_threshold=None),
    "cb": Task("cb", *prompts.ROLES["cb"], prompts.ACTIONS["cb"], prompts.VERDICTS["cb"],
               success_threshold=0.0, failure_threshold=None, bargaining=True),
    "p4g": Task("p4g", *prompts.ROLES["p4g"], prompts.ACTIONS["p4g"], prompts.VERDICTS["p4g"],
                success_threshold=0.75, failure_threshold=-1.0),
}

SPLITS = ("train", "valid", "test")

for _name in TASKS:
    for _table in (prompts.SYSTEM_PROMPT, prompts.USER_PROMPT, prompts.CRITIC_PROMPT):
        if _name not in _table:
            raise KeyError(f"qwen_prompts.py has no prompt for task '{_name}'")


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"Unknown task '{name}'. Expected one of {sorted(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------

REQUIRED_FIELDS = {
    "esc": ("emotion_type", "problem_type", "situation", "dialog"),
    "cima": ("sentence", "target", "dialog"),
    "cb": ("item_name", "buyer_price", "seller_price", "buyer_item_description",
           "seller_item_description", "dialog"),
    "p4g": ("dialog",),
    "extes": ("content",),
}


def split_path(data_dir, task_name, split):
    if task_name == "p4g":
        return os.path.join(data_dir, "P4G", {"valid": "dev"}.get(split, split) + ".json")
    if task_name == "extes":
        return os.path.join(data_dir, "ExTES", "ExTES.json")
    return os.path.join(data_dir, f"{task_name}-{split}.txt")


def _check_case(case, task_name, where):
    if not isinstance(case, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(case).__name__}")
    missing = [f for f in REQUIRED_FIELDS[task_name] if f not in case]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} for task '{task_name}'")
    if task_name == "cb":
        for field in ("buyer_price", "seller_price"):
            if not isinstance(case[field], (int, float)):
                raise DataError(f"{where}: '{field}' must be a number, got {case[field]!r}")
        if case["buyer_price"] == case["seller_price"]:
            raise DataError(f"{where}: buyer_price equals seller_price; the sale-to-list "
                            "ratio is undefined")
    return case


def _read_json_lines(path, task_name):
    cases = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                case = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg})") from None
            cases.append(_check_case(case, task_name, where))
    return cases


def _read_json_list(path, task_name):
    with open(path, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of conversations")
    return [_check_case(item, task_name, f"{path}, item {i}") for i, item in enumerate(items)]


def load_split(data_dir, task_name, split, extes_seed=0, extes_fractions=(0.8, 0.1)):
    """Read one split. ExTES has one file that is split by a fixed seed of its own,
    independent of the run's seed, so every run sees the same test cases."""
    get_task(task_name)
    if split not in SPLITS:
        raise ValueError(f"Unknown split '{split}'. Expected one of {list(SPLITS)}")
    path = split_path(data_dir, task_name, split)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No {split} data for task '{task_name}': {path} does not exist. Run "
            f"`python download_data.py --data_name {task_name}` to fetch the benchmark, or "
            f"pass --data_dir data/demo for the small demo cases.")
    if task_name == "extes":
        cases = _read_json_list(path, task_name)
        order = list(range(len(cases)))
        random.Random(extes_seed).shuffle(order)
        n_train = int(len(cases) * extes_fractions[0])
        n_valid = int(len(cases) * extes_fractions[1])
        bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid),
                  "test": (n_train + n_valid, len(cases))}[split]
        return [cases[i] for i in order[bounds[0]:bounds[1]]]
    if task_name == "p4g":
        return _read_json_list(path, task_name)
    return _read_json_lines(path, task_name)


# ---------------------------------------------------------------------------------------
# Cases -> prompt fields and opening turns
# ---------------------------------------------------------------------------------------

def case_fields(task_name, case):
    """The values that prompt placeholders in qwen_prompts.py may use."""
    fields = {k: v for k, v in case.items() if isinstance(v, (str, int, float))}
    if task_name == "extes":
        fields.setdefault("situation", case.get("description") or case.get("scene") or "")
    return fields


def _first_turns(task_name, case):
    """The case's own first system and user turns, where its format has them."""
    task = get_task(task_name)
    if task_name == "extes":
        turns = []
        for turn in case["content"]:
            if "AI" in turn:
                turns.append((task.system_role, turn["AI"]))
            elif "User" in turn:
                turns.append((task.user_role, turn["User"]))
        return turns
    speaker_role = {"sys": task.system_role, "usr": task.user_role,
                    "Persuader": task.system_role, "Persuadee": task.user_role}
    return [(speaker_role[t["speaker"]], t["text"]) for t in case["dialog"]
            if t.get("speaker") in speaker_role]


def opening_turns(task_name, case):
    """The turns a self-play conversation starts from; it always ends on a user turn."""
    task = get_task(task_name)
    fields = case_fields(task_name, case)
    if task_name in prompts.DEFAULT_OPENINGS and task_name != "p4g":
        return [(role, text.format(**fields)) for role, text in prompts.DEFAULT_OPENINGS[task_name]]
    if task_name == "esc":
        return [(task.user_role, case["situation"])]
    turns = _first_turns(task_name, case)
    # Keep the first system turn (if any) and the user turn after it.
    opening = []
    for role, text in turns:
        if not opening and role == task.user_role:
            return [(role, text)]
        opening.append((role, text))
        if role == task.user_role:
            return opening
    if task_name in prompts.DEFAULT_OPENINGS:
        return list(prompts.DEFAULT_OPENINGS[task_name])
    situation = fields.get("situation") or fields.get("sentence", "")
    return [(task.user_role, situation)]
