"""A run's folder: the names of its files, the record of a conversation and of each of its
turns, writing them, reading them back and finding runs. train_model.py writes a run
through it (harness.write_results, env.SelfPlayEnv.end_turn); view.py, report.py,
plots.py and critic_check.py read runs only through it. A file that cannot be read is
one RunFileError, which names the file (and the line) and what to do.

    runs/esc__dialogxpert__42__1700000000/
        test_conversations.jsonl, train_conversations.jsonl   one ConversationRecord a line
        test_metrics.json, train_metrics.json                  harness.summarize's metrics
        train_history.jsonl                                    one entry a line (trainer.py)
        best.pt, last.pt (+ .json sidecars: step, metrics, every argument), train_state.pt
        rejudged/<judge>/                                      critic_check.py --run

The keys of both records are in one place, here (docs/outputs.md describes them).
"""

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

from errors import RunFileError

# the splits a run writes conversations and metrics of; the valid split is played for the
# best checkpoint only, its figures are in train_history.jsonl and best.pt.json
SPLITS = ("train", "test")
TRAIN_HISTORY = "train_history.jsonl"
TRAIN_STATE = "train_state.pt"
BEST, LAST = "best.pt", "last.pt"
REJUDGED = "rejudged"  # critic_check.py --run writes rejudged/<judge>/ beside the files


def conversations_file(split):
    return f"{split}_conversations.jsonl"


def metrics_file(split):
    return f"{split}_metrics.json"


def sidecar(checkpoint):
    """The JSON beside a checkpoint: its step, metrics and every argument of the run."""
    return checkpoint + ".json"


# ---------------------------------------------------------------------------------------
# The records
# ---------------------------------------------------------------------------------------

def _written(value=None):
    """A key written on every record, null included."""
    return field(default=value, metadata={"always": True})


@dataclass
class TurnRecord:
    """One system turn of a conversation, as a line's `records` hold it. The keys are
    written in this order; a key whose value is None is left out unless it is written on
    every record. `note` holds the agent's keys (the policy's note for the turn: its
    candidates, exploration, search tree, ...) and, read back, any key this version does
    not know."""
    turn: int | None = _written()
    action: str | None = _written()  # None: the policy "none" gave no strategy
    system_format_error: int | None = None  # 1: the system LLM broke "Emotion: Response:"
    emotion: str | None = None  # --use_emotion: the user's emotion the system LLM named
    system_empty: int | None = None  # 1: the system LLM said nothing ("..." was played)
    system_raw: str | None = _written()  # the system LLM's answer as it came
    system: str | None = _written()  # the system's turn as played
    user_empty: int | None = None  # 1: the user LLM said nothing
    user: str | None = _written()
    critic_answers: list | None = _written()  # sample mode: every answer; logits: cb's price
    critic_invalid: int | None = _written()  # answers that could not be used
    critic_option_probs: list | None = _written()  # per option: frequency or probability
    critic_orders: list | None = _written()  # the option orders shown
    critic_order_probs: list | None = _written()  # per order: the distribution read in it
    reward: float | None = _written()
    outcome: str | None = _written()  # "success", "time limit" or None (it goes on)
    critic_answer_orders: list | None = None  # sample mode: the order each answer saw
    critic_reads: list | None = None  # sample mode: the option each answer was read as
    # cb: per critic answer, the plausible price the deal rule read with it (None: not a
    # deal, or no plausible price); in logits mode the answer to the price question
    critic_prices: list | None = None
    deal_price: float | None = None  # cb: the price of the turn's deal
    note: dict = field(default_factory=dict)
    prior_orders: list | None = None  # the action listed first in each planner rotation
    planner_answers: list | None = None  # --prior list/project: answers and the actions named
    planner_invalid: int | None = None  # the planner's answers about this state naming no action
    prompt_cuts: dict | None = None  # the turn's prompts cut to fit a context (llm.py)
    run_reward: float | None = None  # critic_check.py --run: the reward of the run's critic
    # a training turn-limit ending's last turn: the planner's unusable answers about the
    # state after it (its bootstrap; an evaluation does not ask about that state)
    next_planner_invalid: int | None = None

    def set_verdict(self, verdict, outcome):
        """The critic's verdict (critic.CriticResult) and the conversation's outcome."""
        self.critic_answers, self.critic_invalid = verdict.answers, verdict.invalid
        self.critic_option_probs = [round(p, 4) for p in verdict.option_probs]
        self.critic_orders = verdict.orders
        self.critic_order_probs = [[round(p, 4) for p in row] for row in verdict.order_probs]
        self.reward, self.outcome = verdict.reward, outcome
        if verdict.reads:
            self.critic_answer_orders, self.critic_reads = verdict.answer_orders, verdict.reads
        else:
            self.critic_answer_orders = self.critic_reads = None
        self.critic_prices, self.deal_price = verdict.prices, verdict.deal_price
        return self

    def to_dict(self):
        out = {}
        for name in TURN_KEYS:
            value = getattr(self, name)
            if name == "note":
                out.update(value)
            elif value is not None or name in ALWAYS:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data):
        """The record of a JSON object; keys this version does not know go to `note`."""
        known = {key: value for key, value in data.items() if key in TURN_KEYS and key != "note"}
        return cls(**known, note={key: value for key, value in data.items()
                                  if key not in known})


TURN_KEYS = tuple(f.name for f in dataclasses.fields(TurnRecord))
ALWAYS = {f.name for f in dataclasses.fields(TurnRecord) if f.metadata.get("always")}


@dataclass
class ConversationRecord:
    """One line of *_conversations.jsonl: a conversation, its ending and its turns' records.
    Every key is written; `extra` holds, read back, keys this version does not know."""
    case_id: int | None = None  # the case's place in its split (pairs runs in reports)
    case: dict | None = None
    turns: list = field(default_factory=list)  # [role, text] pairs, the opening included
    emotions: list = field(default_factory=list)
    outcome: str | None = None  # "success" or "time limit"
    system_turns: int | None = None
    total_reward: float | None = None
    sale_to_list: float | None = None  # cb: of the last deal read
    prompt_cuts: dict = field(default_factory=dict)
    records: list = field(default_factory=list)  # one TurnRecord per system turn
    cost: dict | None = None  # the LLM cost (docs/outputs.md, cost)
    persona: dict | None = None  # --user_personas: the user's persona
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, conversation):
        """The record of a finished env.Conversation (its records: TurnRecord.to_dict's)."""
        return cls(**{name: getattr(conversation, name) for name in CONVERSATION_KEYS
                      if name not in ("records", "extra")},
                   records=[TurnRecord.from_dict(record) for record in conversation.records])

    def to_dict(self):
        out = {name: getattr(self, name) for name in CONVERSATION_KEYS if name != "extra"}
        out["records"] = [record.to_dict() for record in self.records]
        return out | self.extra

    @classmethod
    def from_dict(cls, data):
        """The record of a JSON object, or ValueError saying what is wrong with it."""
        records = data.get("records", [])
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("'records' is not a list of JSON objects")
        known = {key: value for key, value in data.items()
                 if key in CONVERSATION_KEYS and key not in ("records", "extra")}
        return cls(**known, records=[TurnRecord.from_dict(r) for r in records],
                   extra={key: value for key, value in data.items()
                          if key not in CONVERSATION_KEYS or key == "extra"})


CONVERSATION_KEYS = tuple(f.name for f in dataclasses.fields(ConversationRecord))


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------

def atomic_write(path, write):
    """write(file object) into path.tmp, fsync, rename over path, fsync the folder."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_history(run_dir, history):
    atomic_write(os.path.join(run_dir, TRAIN_HISTORY), lambda f: f.write(
        "".join(json.dumps(entry) + "\n" for entry in history).encode()))


def write_results(run_dir, split, metrics, conversations):
    """A split's metrics and its conversations (env.Conversation, finished). The metrics
    file marks a finished run (find_runs), so it goes last, each file whole: a write
    stopped part way leaves no metrics file, never one beside partial conversations."""
    metrics_path = os.path.join(run_dir, metrics_file(split))
    if os.path.exists(metrics_path):  # files of an earlier write are replaced
        os.remove(metrics_path)
    atomic_write(os.path.join(run_dir, conversations_file(split)), lambda f: f.writelines(
        (json.dumps(ConversationRecord.of(conversation).to_dict()) + "\n").encode()
        for conversation in conversations))
    atomic_write(metrics_path, lambda f: f.write(json.dumps(metrics, indent=2).encode()))


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------

def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFileError(f"cannot read {path} ({error}). Repair or delete that file, or "
                           "leave the run out") from None


def read_jsonl(path, skip_bad=False, bad=None):
    """The JSON objects of a JSONL file. A malformed line raises RunFileError naming it, or
    with skip_bad is appended to `bad` as {"file", "line", "reason"} and left out."""
    return [value for value, _ in _lines(path, lambda value: value, skip_bad, bad)]


def read_conversations(path, skip_bad=False, bad=None):
    """The ConversationRecords of a *_conversations.jsonl file, as read_jsonl."""
    return [value for value, _ in _lines(path, ConversationRecord.from_dict, skip_bad, bad)]


def _lines(path, make, skip_bad, bad):
    """(make(JSON object), line number) per line that is one; the rest as read_jsonl says."""
    out = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    value = json.loads(raw)
                    if not isinstance(value, dict):
                        raise ValueError("not a JSON object")
                    out.append((make(value), number))
                    continue
                except (UnicodeDecodeError, json.JSONDecodeError) as error:
                    reason = f"not JSON: {error}"
                except ValueError as error:
                    reason = str(error)
                if not skip_bad:
                    raise RunFileError(f"{path}, line {number}: {reason}. Repair or delete "
                                       "that line, or leave the run out (view.py: pass "
                                       "--skip_bad to show the rest)")
                bad.append({"file": path, "line": number, "reason": reason})
    except OSError as error:
        raise RunFileError(f"cannot read {path} ({error.strerror}). Check the run folder") from None
    return out


@dataclass
class Run:
    """What load_run read of a run folder: the files present of those asked for."""
    folder: str
    metrics: dict  # split -> its *_metrics.json
    conversations: dict  # split -> [ConversationRecord] of its *_conversations.jsonl
    history: list | None = None  # train_history.jsonl's entries
    bad_lines: list = field(default_factory=list)  # with skip_bad: the lines left out

    def path(self, name):
        return os.path.join(self.folder, name)

    def figures(self):
        """The paths of the run's PNG figures (plots.py's), by name."""
        return [self.path(name) for name in sorted(os.listdir(self.folder))
                if name.endswith(".png")]

    def saved_args(self, tested=True):
        """(the run's arguments, the file they come from): a checkpoint's sidecar (last.pt,
        best.pt, else with `tested` the checkpoint that a test run loaded, whose arguments
        are those of its training), or ({}, None)."""
        checkpoint = (self.metrics.get("test") or {}).get("checkpoint")
        paths = [self.path(sidecar(name)) for name in (LAST, BEST)]
        if tested and isinstance(checkpoint, str):
            paths.append(sidecar(checkpoint))
        for path in paths:
            if os.path.isfile(path):
                saved = read_json(path)
                if isinstance(saved, dict) and isinstance(saved.get("args"), dict):
                    return saved["args"], os.path.basename(path)
        return {}, None


def load_run(folder, splits=SPLITS, history=False, skip_bad=False):
    """The metrics and conversations of `splits` that the folder holds (and with history
    its train_history.jsonl); the caller says which of them it cannot do without."""
    if not os.path.isdir(folder):
        raise RunFileError(f"{folder} is not a folder. Give the folder of a finished "
                           "train_model.py run")
    run = Run(folder, {}, {})
    for split in splits:
        if os.path.isfile(run.path(metrics_file(split))):
            run.metrics[split] = read_json(run.path(metrics_file(split)))
            if not isinstance(run.metrics[split], dict):
                raise RunFileError(f"{run.path(metrics_file(split))} is not a JSON object. "
                                   "Repair or delete that file, or leave the run out")
        if os.path.isfile(run.path(conversations_file(split))):
            run.conversations[split] = read_conversations(
                run.path(conversations_file(split)), skip_bad, run.bad_lines)
    if history and os.path.isfile(run.path(TRAIN_HISTORY)):
        run.history = read_jsonl(run.path(TRAIN_HISTORY))
    return run


def shown_name(text):
    """A text holding a run folder's name, with each of the name's bytes that is not UTF-8
    (a lone surrogate, as Python decodes file names) as U+FFFD, so that it can be written
    as UTF-8 (a page's title, report.md)."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def find_runs(paths, marks, what):
    """The run folders in `paths`, in the order given: a folder that holds one of the files
    `marks`, or any folder below one that does not. `what` names the marks in the error."""
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise RunFileError(f"{path} is not a folder. Give run folders of train_model.py, "
                               "or folders that hold them")
        found = []
        for folder, subfolders, files in os.walk(path):
            subfolders.sort()
            if any(name in files for name in marks):
                found.append(os.path.normpath(folder))
                subfolders.clear()  # a run's own subfolders hold no other run
        if not found:
            raise RunFileError(f"no run folder in {path}: it holds no {what} at any depth. "
                               "Give the folder of a finished train_model.py run")
        runs += [folder for folder in found if folder not in runs]
    return runs
