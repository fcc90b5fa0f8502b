"""Task registry: everything that differs between datasets, keyed by --data_name.

A task is one `Task` entry in TASKS: its prompt block from qwen_prompts.py, its reward
rule (how the critic's answers become the turn's reward and success), its data files with
their sources, how a case is read and checked, and how a conversation opens. Adding a task
is one prompt block and one entry here.
"""

import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import qwen_prompts as prompts
from errors import DataError


SPLITS = ("train", "valid", "test")
NUMBER = (int, float)
GITHUB = "https://raw.githubusercontent.com"
PPDPP = f"{GITHUB}/dengyang17/PPDPP/main/data"
DIALOGXPERT = f"{GITHUB}/declare-lab/dialogxpert/main/data"
# ExTES as its authors' repository names it (the DialogXpert release ships its own copy,
# which is the default source; download_data.py --extes_source authors takes this one)
EXTES_AUTHORS = f"{GITHUB}/pandazzh2020/ExTES/main/ExTES.json"


# ---------------------------------------------------------------------------------------
# Reward rules: critic answers (or an option distribution) -> reward, success, deal price
# ---------------------------------------------------------------------------------------

class Judgement(NamedTuple):
    reward: float
    success: bool
    deal_price: float | None = None
    sale_to_list: float | None = None


@dataclass(frozen=True)
class OptionRewards:
    """Each critic option has a reward. Sampled answers: the reward is the mean reward of
    the usable ones (0 when none is usable); an exact distribution: its expectation. The
    turn succeeds when `succeeds(reward)`, except that a rule met by the best reward alone
    (`unanimous`) is met by a distribution when all `num_samples` answers would name the
    best option with probability >= 1/2, as DealRewards decides a deal: an expectation
    reaches the best reward only when every other option's probability is exactly 0."""

    rewards: tuple  # reward of each critic option, in the prompt block's order
    succeeds: Callable  # turn reward -> bool
    # succeeds only when every usable answer names the best option (cima: reward = 1)
    unanimous: bool = False
    deals = False  # no deal price: no SL

    @property
    def reward_range(self):
        """Every turn reward lies in this closed interval (0: no usable answer)."""
        return (min(0.0, *self.rewards), max(0.0, *self.rewards))

    def check(self, verdicts):
        if len(self.rewards) != len(verdicts):
            return f"{len(verdicts)} verdicts in qwen_prompts.py but {len(self.rewards)} rewards"
        return None

    def prompt_fields(self, labels, order):
        return {}

    def read(self, case, option, rest):
        """(option, price) of one answer that named `option` (None: unusable)."""
        return option, None

    def from_reads(self, case, reads):
        """The judgement of the usable answers [(option, price)] of one turn."""
        if not reads:
            return Judgement(0.0, False)
        reward = sum(self.rewards[i] for i, _ in reads) / len(reads)
        return Judgement(reward, self.succeeds(reward))

    def from_distribution(self, probs, num_samples):
        reward = sum(p * r for p, r in zip(probs, self.rewards))
        if self.unanimous:
            best = self.rewards.index(max(self.rewards))
            return Judgement(reward, probs[best] ** num_samples >= 0.5)
        return Judgement(reward, self.succeeds(reward))

    def wants_price(self, probs, num_samples):
        return False


NUMBER_TEXT = re.compile(r"\d+(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
THOUSANDS = re.compile(r"\s?k(?![a-z])", re.IGNORECASE)


def parse_price(text):
    """The first number in the text ("$1,200", "45.50", "1.2k", "-30"), or None.
    The sign and the "k" are read next to the digits only, so the time stays linear."""
    match = NUMBER_TEXT.search(text)
    if match is None:
        return None
    value = float(match.group(0).replace(",", ""))
    if THOUSANDS.match(text, match.end(), match.end() + 3):
        value *= 1000
    before = text[max(0, match.start() - 3):match.start()].replace("$", "").strip()
    return -value if before.endswith("-") else value


def plausible_price(price, buyer_price, seller_price):
    """A price is usable when it is finite, positive and within one buyer-seller gap of
    the two prices, so that its sale-to-list ratio lies in [-1, 2]."""
    gap = seller_price - buyer_price
    return (price is not None and math.isfinite(price) and price > 0
            and buyer_price - gap <= price <= seller_price + gap)


def sale_to_list(price, buyer_price, seller_price):
    return (seller_price - price) / (seller_price - buyer_price)


@dataclass(frozen=True)
class DealRewards:
    """Bargaining, as PPDPP: the critic says whether there is a deal and names its price
    ("N, price"). No deal if any usable answer says there is none; otherwise the deal
    price is the most common price named (the first named on a tie), and the reward is its
    sale-to-list ratio (seller_price - price) / (seller_price - buyer_price); no deal (or
    no usable answer) gives `no_deal`. A deal answer without a plausible price is
    unusable. An exact distribution has a deal when all `num_samples` answers would say
    so with probability >= 1/2 (P(deal) ** num_samples >= 0.5); its price is then asked
    once. A deal is a success when its price is at most the list price (ratio >= 0)."""

    deal_option: int = 1  # the option (in the block's order) that says there is a deal
    no_deal: float = -0.1  # PPDPP's reward when there is no deal
    deals = True  # SL is reported

    @property
    def reward_range(self):
        """Plausible prices give ratios in [-1, 2]; no deal gives `no_deal`."""
        return (min(self.no_deal, -1.0), max(self.no_deal, 2.0))

    def check(self, verdicts):
        if len(verdicts) != 2 or self.deal_option not in (0, 1):
            return "a deal rule needs two verdicts: no deal and a deal"
        return None

    def prompt_fields(self, labels, order):
        """The deal option's number as shown, for the question's answer format."""
        return {"deal_label": labels[list(order).index(self.deal_option)]}

    def read(self, case, option, rest):
        if option != self.deal_option:
            return option, None
        price = parse_price(rest)
        if not plausible_price(price, case["buyer_price"], case["seller_price"]):
            return None, None
        return option, price

    def from_reads(self, case, reads):
        if not reads or any(i != self.deal_option for i, _ in reads):
            return Judgement(self.no_deal, False)
        prices = [price for _, price in reads]
        most = max(Counter(prices).values())
        return self.from_price(case, next(p for p in prices if prices.count(p) == most))

    def from_distribution(self, probs, num_samples):
        """The deal decision only: its price comes from `from_price` after asking."""
        return Judgement(self.no_deal, False)

    def wants_price(self, probs, num_samples):
        return probs[self.deal_option] ** num_samples >= 0.5

    def from_price(self, case, price):
        """The judgement of a deal at `price`, or None when the price is not plausible."""
        if not plausible_price(price, case["buyer_price"], case["seller_price"]):
            return None
        ratio = sale_to_list(price, case["buyer_price"], case["seller_price"])
        return Judgement(ratio, ratio >= 0.0, price, ratio)


# ---------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    name: str
    prompts: dict  # the task's block in qwen_prompts.py
    reward: OptionRewards | DealRewards  # the critic's answers -> reward and success
    files: dict  # split -> path relative to --data_dir
    sources: dict  # path relative to --data_dir -> public URL
    schema: dict  # field -> accepted type(s); every case must have them
    opening: Callable  # case -> [(role, text)], the turns a conversation starts from
    initial_emotions: Callable = lambda case: []  # the user's emotions before turn 1
    check: Callable = lambda case: None  # further checks of a case: None or the problem
    # case -> [(role, text)]: the human conversation of the case as it ends in the data,
    # for checking a critic on it (critic_check.py)
    human_dialog: Callable = lambda case: []
    split_seeded: bool = False  # one file split 80/10/10 by --extes_seed (ExTES)
    # case -> [(the turns before a system turn of the human dialog, [that turn's strategy
    # labels as the data names them])]: PPDPP's supervised examples (ppdpp.py); None: the
    # task's data has no strategy labels
    labelled_turns: Callable | None = None
    # a data label -> the action it names, where the names differ beyond case and hyphens
    label_aliases: dict = field(default_factory=dict, hash=False)
    demo: bool = False  # data/demo holds a few cases of each split (the tests check them)

    def __post_init__(self):
        problem = self.reward.check(self.prompts["verdicts"])
        if problem:
            raise ValueError(f"task '{self.name}': {problem}")

    @property
    def data_flags(self):
        """The flags of the task's own data settings: they choose its cases, and no other
        task reads them (a run's evaluation setup holds them only for this task)."""
        return ("extes_seed", "extes_split") if self.split_seeded else ()

    @property
    def system_role(self):
        return self.prompts["system_role"]

    @property
    def user_role(self):
        return self.prompts["user_role"]

    @property
    def actions(self):
        return self.prompts["actions"]

    @property
    def action_names(self):
        return list(self.prompts["actions"])

    @property
    def verdicts(self):
        return self.prompts["verdicts"]


def _dialog_opening(case, task_prompts):
    """The case's first two turns, as the original does (cima: Teacher then Student;
    p4g: Persuader then Persuadee)."""
    roles = (task_prompts["system_role"], task_prompts["user_role"])
    return [(role, turn["text"]) for role, turn in zip(roles, case["dialog"][:2])]


def _speaker_turns(pairs, task_prompts, system_speakers):
    """[(role, text)] from (speaker, text) pairs of a data file: a speaker in
    system_speakers is the system role, any other the user role; empty turns are left out."""
    roles = (task_prompts["system_role"], task_prompts["user_role"])
    return [(roles[0] if speaker in system_speakers else roles[1], text.strip())
            for speaker, text in pairs if isinstance(text, str) and text.strip()]


def _dialog_pairs(dialog):
    """(speaker, text) of each turn of a "dialog" list ({"speaker": ..., "text": ...})."""
    return [(turn.get("speaker"), turn.get("text")) for turn in dialog if isinstance(turn, dict)]


def _extes_pairs(case):
    """ExTES turns are {"User": text} or {"AI": text, "AI Strategy": ...}."""
    return [("AI", turn["AI"]) if "AI" in turn else ("User", turn.get("User"))
            for turn in case["content"] if isinstance(turn, dict)]


def _labelled_dialog(items, task_prompts, read):
    """[(turns before, labels)] of each system turn that has a turn before it, as PPDPP's
    data_reader builds its examples (a dialog's opening system turn has no state to act
    on). read(item) -> (is the system speaking, text, label or labels or None)."""
    roles = (task_prompts["system_role"], task_prompts["user_role"])
    examples, turns = [], []
    for item in items:
        is_system, text, labels = read(item) if isinstance(item, dict) else (False, None, None)
        if not isinstance(text, str):
            continue
        if is_system and turns:
            labels = [labels] if isinstance(labels, str) else (
                labels if isinstance(labels, list) else [])
            examples.append((list(turns), [label for label in labels if isinstance(label, str)]))
        turns.append((roles[0] if is_system else roles[1], text.strip()))
    return examples


def _sys_labelled(case, task_prompts):
    """PPDPP's esc and cb files: "sys" turns carry their "strategy"."""
    return _labelled_dialog(case.get("dialog", []), task_prompts, lambda t: (
        t.get("speaker") == "sys", t.get("text"), t.get("strategy")))


def _cima_labelled(case):
    """PPDPP's cima files: the case's "strategy" is that of the Teacher's next turn."""
    label = case.get("strategy")
    return [(_speaker_turns(_dialog_pairs(case["dialog"]), prompts.CIMA, {"sys"}),
             [label] if isinstance(label, str) else [])]


# P4G's annotation names for the Persuader's proposition acts, which DialogXpert's action
# set words differently; the others match once case and hyphens are ignored
P4G_LABELS = {"ask-donation-amount": "Proposition of amount to be donated",
              "confirm-donation": "Proposition of confirmation of donation",
              "ask-donate-more": "Proposition of more donation"}


def _check_dialog(case):
    if len(case["dialog"]) < 2 or not all(isinstance(t, dict) and isinstance(t.get("text"), str)
                                          for t in case["dialog"][:2]):
        return "'dialog' must start with two turns that have a 'text' string"
    return None


def _check_prices(case):
    buyer, seller = case["buyer_price"], case["seller_price"]
    if not (math.isfinite(buyer) and math.isfinite(seller) and 0 < buyer < seller):
        return (f"prices must be finite with 0 < buyer_price < seller_price, got "
                f"{buyer!r} and {seller!r}")
    return None


TASKS = {
    "esc": Task(
        "esc", prompts.ESC, reward=OptionRewards(
            (-1.0, -0.5, 0.5, 1.0), succeeds=lambda reward: reward >= 0.5),
        files={s: f"esc-{s}.txt" for s in SPLITS},
        sources={f"esc-{s}.txt": f"{PPDPP}/esc-{s}.txt" for s in SPLITS},
        schema={"emotion_type": str, "problem_type": str, "situation": str, "dialog": list},
        opening=lambda case: [("Patient", case["situation"])],
        human_dialog=lambda case: [("Patient", case["situation"])] + _speaker_turns(
            _dialog_pairs(case["dialog"]), prompts.ESC, {"sys"}),
        initial_emotions=lambda case: [case["emotion_type"]],
        labelled_turns=lambda case: _sys_labelled(case, prompts.ESC),
        demo=True),
    "extes": Task(
        "extes", prompts.EXTES, reward=OptionRewards(
            (-1.0, -0.5, 0.5, 1.0), succeeds=lambda reward: reward >= 0.5),
        files={s: "ExTES/ExTES.json" for s in SPLITS},
        sources={"ExTES/ExTES.json": f"{DIALOGXPERT}/ExTES/ExTES.json"},  # misc.load_extes
        schema={"description": str, "scene": str, "content": list},
        opening=lambda case: [("Patient", case["description"])],
        human_dialog=lambda case: [("Patient", case["description"])] + _speaker_turns(
            _extes_pairs(case), prompts.EXTES, {"AI"}),
        labelled_turns=lambda case: _labelled_dialog(case["content"], prompts.EXTES, lambda t: (
            "AI" in t, t.get("AI", t.get("User")), t.get("AI Strategy"))),
        split_seeded=True,
        demo=True),
    "cima": Task(
        "cima", prompts.CIMA, reward=OptionRewards(
            (-1.0, -0.5, 0.5, 1.0), succeeds=lambda reward: reward >= 1.0, unanimous=True),
        files={s: f"cima-{s}.txt" for s in SPLITS},
        sources={f"cima-{s}.txt": f"{PPDPP}/cima-{s}.txt" for s in SPLITS},
        schema={"sentence": str, "target": str, "dialog": list},
        opening=lambda case: _dialog_opening(case, prompts.CIMA), check=_check_dialog,
        human_dialog=lambda case: _speaker_turns(_dialog_pairs(case["dialog"]),
                                                         prompts.CIMA, {"sys"}),
        labelled_turns=_cima_labelled,
        demo=True),
    "cb": Task(
        "cb", prompts.CB, reward=DealRewards(deal_option=1, no_deal=-0.1),
        files={s: f"cb-{s}.txt" for s in SPLITS},
        sources={f"cb-{s}.txt": f"{PPDPP}/cb-{s}.txt" for s in SPLITS},
        schema={"item_name": str, "buyer_price": NUMBER, "seller_price": NUMBER,
                "buyer_item_description": str, "seller_item_description": str},
        opening=lambda case: [
            ("Buyer", f"Hi, how much is the {case['item_name']}?"),
            ("Seller", f"Hi, this is a good {case['item_name']} and its price is "
                       f"{case['seller_price']}.")],
        human_dialog=lambda case: _speaker_turns(_dialog_pairs(case.get("dialog", [])),
                                                       prompts.CB, {"sys"}),
        labelled_turns=lambda case: _sys_labelled(case, prompts.CB), check=_check_prices,
        demo=True),
    "p4g": Task(
        "p4g", prompts.P4G, reward=OptionRewards(
            (-1.0, -0.5, 0.1, 1.0), succeeds=lambda reward: reward > 0.6),
        files={"train": "P4G/train.json", "valid": "P4G/dev.json", "test": "P4G/test.json"},
        sources={f"P4G/{s}.json": f"{DIALOGXPERT}/P4G/api_annotated/{s}.json"
                 for s in ("train", "dev", "test")},
        schema={"dialog": list},
        opening=lambda case: _dialog_opening(case, prompts.P4G), check=_check_dialog,
        human_dialog=lambda case: _speaker_turns(_dialog_pairs(case["dialog"]),
                                                         prompts.P4G, {"Persuader"}),
        labelled_turns=lambda case: _labelled_dialog(case["dialog"], prompts.P4G, lambda t: (
            t.get("speaker") == "Persuader", t.get("text"), t.get("strategy"))),
        label_aliases=P4G_LABELS,
        demo=True),
}


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"Unknown task '{name}'. Expected one of {sorted(TASKS)}")
    return TASKS[name]


def case_fields(case):
    """The values that prompt placeholders in qwen_prompts.py may use."""
    return {k: v for k, v in case.items() if isinstance(v, (str, int, float))}


# ---------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------

def split_path(data_dir, task_name, split):
    return os.path.join(data_dir, get_task(task_name).files[split])


def check_case(case, task, where):
    """The case if it has every field the task uses, with the right types."""
    if not isinstance(case, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(case).__name__}. Fix or "
                        "remove the case")
    missing = [f for f in task.schema if f not in case]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} for task '{task.name}'. Fix or "
                        "remove the case")
    for name, kind in task.schema.items():
        value = case[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = "a number" if kind is NUMBER else f"a {kind.__name__}"
            raise DataError(f"{where}: '{name}' must be {expected}, got {value!r:.60}. Fix or "
                            "remove the case")
    problem = task.check(case)
    if problem:
        raise DataError(f"{where}: {problem}. Fix or remove the case")
    return case


def _read_text(path):
    """The file's text; bytes that are not UTF-8 are named with their line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror}). Download the data again "
                        "with download_data.py, or pass another --data_dir") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {error.start}). Save the "
                        "file as UTF-8") from None


def _read_json_lines(path, task):
    cases = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            case = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg}). Fix or remove the "
                            "line") from None
        cases.append(check_case(case, task, where))
    return cases


def _read_json_list(path, task):
    try:
        items = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}). Fix the "
                        "file or download it again") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of conversations. Download the file "
                        "again with download_data.py")
    return [check_case(item, task, f"{path}, item {i}") for i, item in enumerate(items)]


def read_file(path, task_name):
    """Every case of one data file, checked against the task's schema."""
    read = _read_json_list if path.endswith(".json") else _read_json_lines
    return read(path, get_task(task_name))


def missing_data_advice(task):
    """What to do when a data file of the task is missing: download it where the task
    declares its sources, use the demo cases where it has them, else write the file."""
    ways = []
    if all(path in task.sources for path in task.files.values()):
        ways.append(f"Run `python download_data.py --data_name {task.name}` to fetch the "
                    "benchmark")
    if task.demo:
        ways.append("pass --data_dir data/demo for the small demo cases")
    if not ways:
        return (f"Write the task's files into --data_dir as its `files` in tasks.py name them "
                f"({', '.join(sorted(set(task.files.values())))}), or add their URLs to its "
                "`sources` and run download_data.py.")
    advice = ", or ".join(ways)
    return advice[0].upper() + advice[1:] + "."


def load_split(data_dir, task_name, split, extes_seed=0, extes_split="0.8,0.1,0.1"):
    """Read one split. A task with one file (ExTES) is split by a fixed seed of its own,
    independent of the run's seed, so every run sees the same test cases. `extes_split`:
    fractions (the test split takes the rest) or case counts (the original's
    10717,200,200; the cases beyond them are unused)."""
    task = get_task(task_name)
    if split not in SPLITS:
        raise ValueError(f"Unknown split '{split}'. Expected one of {list(SPLITS)}")
    path = split_path(data_dir, task_name, split)
    if not os.path.exists(path):
        raise DataError(f"no {split} data for task '{task_name}': {path} does not exist. "
                        + missing_data_advice(task))
    cases = read_file(path, task_name)
    if not task.split_seeded:
        return cases
    order = list(range(len(cases)))
    random.Random(extes_seed).shuffle(order)
    parts = extes_split.split(",")
    if all(part.isdigit() for part in parts):
        n_train, n_valid, n_test = map(int, parts)
        if n_train + n_valid + n_test > len(cases):
            raise DataError(f"--extes_split {extes_split} asks for {n_train + n_valid + n_test} "
                            f"cases, {path} has {len(cases)}. Pass smaller counts or fractions")
    else:
        n_train = int(len(cases) * float(parts[0]))
        n_valid = int(len(cases) * float(parts[1]))
        n_test = len(cases) - n_train - n_valid
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid),
              "test": (n_train + n_valid, n_train + n_valid + n_test)}[split]
    return [cases[i] for i in order[bounds[0]:bounds[1]]]


# -- the human conversations' strategies (PPDPP's supervised stage, a run's strategy bias)

def normalise_label(label):
    return " ".join(label.lower().replace("-", " ").replace("_", " ").split())


def labelled_examples(task, cases):
    """([(turns, action index)], counts) of the cases' labelled system turns. A label
    names an action when it equals its name up to case and hyphens, or by the task's
    label_aliases; a turn with several labels gives one example per action it names.
    counts: system turns, examples, unlabelled turns, turns whose labels name no action,
    and each label that names none with its count (nothing is dropped silently)."""
    actions = {normalise_label(a): i for i, a in enumerate(task.action_names)}
    actions |= {normalise_label(k): task.action_names.index(v)
                for k, v in task.label_aliases.items()}
    examples, unmapped = [], Counter()
    counts = {"system_turns": 0, "unlabelled_turns": 0, "unmapped_turns": 0}
    for case in cases:
        for turns, labels in task.labelled_turns(case):
            counts["system_turns"] += 1
            named = []
            for label in labels:
                index = actions.get(normalise_label(label))
                if index is None:
                    unmapped[label] += 1
                elif index not in named:
                    named.append(index)
            counts["unlabelled_turns"] += not labels
            counts["unmapped_turns"] += bool(labels) and not named
            examples += [(turns, index) for index in named]
    counts["examples"] = len(examples)
    counts["unmapped_labels"] = dict(unmapped.most_common())
    return examples, counts
