"""One self-contained HTML page of runs' conversations, turn by turn.

    python view.py runs/esc__dialogxpert__1__1700000000            # -> that run's view.html
    python view.py runs/<trained run> runs/<baseline run> --out compare.html

The page opens from disk with no server and no network. At the top: each run's arguments,
metrics and figures. Then the list of conversations (the runs' train and test
conversations; a run writes no valid ones: the valid split is played to choose best.pt,
and its figures are in train_history.jsonl and best.pt.json), with filters and sorting,
and one conversation as a chat: per turn the candidates with prior and Q-value (an MCTS
turn: its tree, the visits and values of each action tried), the chosen action, the
system's emotion and answer, the user's reply, each critic answer with the option it was
read as, the reward. With several runs, a case that more of them played (same split and
case_id: a paired evaluation) opens side by side, the first turn where their actions
differ marked.

A folder that holds no train_ or test_conversations.jsonl is searched for run folders at
any depth. A malformed line stops the page with the file and line; with --skip_bad it is
left out, counted and listed on the page. Every text of the runs reaches the page as data
(JSON in script elements, with '<' escaped) and is shown with textContent, never as HTML.
"""

import argparse
import base64
import hashlib
import json
import os
import re
import sys
import time

from critic import LEADING_LABEL, OTHER_LABELS, Critic, parse_verdict
from metrics import UNUSABLE_KEYS
from tasks import TASKS, parse_price, plausible_price, sale_to_list

# the splits a run writes conversations and metrics of; the valid split is played for the
# best checkpoint only, its figures are in train_history.jsonl and best.pt.json
RUN_SPLITS = ("train", "test")
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "view.html")
ARGS_FILES = ("last.pt.json", "best.pt.json")  # checkpoint sidecars that hold the arguments
# how the tests and bench.py open pages: Debian's chromium, headless, with nothing that
# reaches the network on its own
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-quic",
                  "--disable-sync"]


class ViewError(Exception):
    """Bad input: reported as one line `error: ...` and exit code 2."""


def find_runs(paths):
    """Run folders (those with a *_conversations.jsonl), in the order given."""
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise ViewError(f"{path} is not a folder. Give run folders of train_model.py")
        found = []
        for folder, subfolders, files in os.walk(path):
            subfolders.sort()
            if any(f"{split}_conversations.jsonl" in files for split in RUN_SPLITS):
                found.append(os.path.normpath(folder))
                subfolders.clear()  # a run's own subfolders hold no other run
        if not found:
            raise ViewError(f"no conversations (train_ or test_conversations.jsonl) "
                            f"in {path}. Give the folder of a finished train_model.py run")
        runs += [folder for folder in found if folder not in runs]
    return runs


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ViewError(f"cannot read {path} ({error}). Repair or delete that file, or "
                        "leave the run out") from None


def read_conversations(path, skip_bad, bad):
    """The JSON objects of a JSONL file. A malformed line raises ViewError naming it, or
    with skip_bad is appended to `bad` as (file, line number, reason) and left out."""
    conversations = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    conversation = json.loads(raw)
                    reason = None if isinstance(conversation, dict) else "not a JSON object"
                except (UnicodeDecodeError, json.JSONDecodeError) as error:
                    reason = f"not JSON: {error}"
                if reason is None:
                    conversations.append(conversation)
                elif skip_bad:
                    bad.append({"file": path, "line": number, "reason": reason})
                else:
                    raise ViewError(f"{path}, line {number}: {reason}. Repair or delete that "
                                    "line, or pass --skip_bad to show the rest")
    except OSError as error:
        raise ViewError(f"cannot read {path} ({error.strerror}). Check the run folder") from None
    return conversations


def run_arguments(folder, metrics):
    """The run's arguments from a checkpoint sidecar (a trained run, or the checkpoint a
    test run loaded), else the evaluation setup in its test metrics."""
    checkpoint = (metrics.get("test") or {}).get("checkpoint")
    paths = [os.path.join(folder, name) for name in ARGS_FILES]
    if isinstance(checkpoint, str):
        paths.append(checkpoint + ".json")
    for path in paths:
        if os.path.isfile(path):
            saved = read_json(path)
            if isinstance(saved, dict) and isinstance(saved.get("args"), dict):
                return saved["args"], os.path.basename(path)
    config = (metrics.get("test") or {}).get("config")
    return (config, "test_metrics.json config") if isinstance(config, dict) else ({}, None)


def figures(folder):
    """The run's PNG figures as data: URIs, so the page needs no other file."""
    result = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".png"):
            with open(os.path.join(folder, name), "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            result.append({"name": name, "src": "data:image/png;base64," + data})
    return result


# ---------------------------------------------------------------------------------------
# What the page adds to each record: readings by the critic's own rules
# ---------------------------------------------------------------------------------------

def why_unusable(answer, option_count):
    """Why critic.parse_verdict found no single option in an answer."""
    numbers = []
    leading = LEADING_LABEL.match(answer)
    if leading:
        numbers.append(int(leading.group(1)))
    numbers += [int(a or b) for a, b in OTHER_LABELS.findall(answer)]
    numbers = list(dict.fromkeys(numbers))
    outside = [n for n in numbers if not 1 <= n <= option_count]
    if outside:
        return f"names {outside[0]}, which is not an option (1-{option_count})"
    if len(numbers) > 1:
        return "names several options (" + ", ".join(map(str, numbers)) + ")"
    if numbers:
        return f"names option {numbers[0]} and quotes another"
    return "names no option by number and quotes no single option"


def critic_readings(task, case, answers, logits=False, orders=None):
    """Per critic answer: the option it was read as (index in the task's order, text, and
    the number it had in the order shown) or why it is unusable. orders: the option order
    each answer was asked with (default: the task's). cb: a deal answer needs a plausible
    price, read as critic.py reads it; with --critic logits the answers are those to the
    price question alone."""
    critic = Critic(task, llm=None)
    readings = []
    orders = orders or [list(range(len(task.verdicts)))] * len(answers)
    for answer, order in zip(answers, orders):
        if not isinstance(answer, str):
            readings.append({"option": None, "why": "not a text"})
            continue
        if logits:
            price = parse_price(answer)
            try:
                usable = plausible_price(price, case["buyer_price"], case["seller_price"])
            except (KeyError, TypeError):  # a case without its prices
                usable = False
            readings.append({"option": None, "price": price} if usable else
                            {"option": None, "why": "no plausible price"})
            continue
        shown = parse_verdict(answer, [task.verdicts[i] for i in order])
        if shown is None:
            readings.append({"option": None, "why": why_unusable(answer, len(task.verdicts))})
            continue
        index = order[shown]
        reading = {"option": index, "text": task.verdicts[index], "shown_as": shown + 1}
        if task.reward.deals and index == task.reward.deal_option:
            try:
                result = critic.from_answers(case, [answer], [order], [0])
            except (KeyError, TypeError):  # a case without its prices
                result = None
            if result is None or result.invalid:
                reading = {"option": index, "text": task.verdicts[index],
                           "why": "a deal without a usable price"}
            else:
                reading["price"] = result.deal_price
        readings.append(reading)
    return readings


def answer_orders(record, task, answers):
    """The option order each critic answer was shown (critic_orders, critic_answer_orders:
    --critic_order shuffle in sample mode), or None for the task's order."""
    orders, which = record.get("critic_orders"), record.get("critic_answer_orders")
    count = len(task.verdicts)
    try:
        chosen = [orders[k] for k in which]
    except (TypeError, IndexError, KeyError):
        return None
    if len(chosen) != len(answers) or any(sorted(o) != list(range(count)) for o in chosen
                                          if isinstance(o, list)):
        return None
    return chosen


def annotate(conversation, task, logits=False):
    """Adds `view` to each record: the critic readings (in the order each answer was shown)
    and, cb, the turn's sale-to-list ratio. Skipped for tasks this version does not know."""
    records = conversation.get("records")
    if task is None or not isinstance(records, list):
        return
    case = conversation.get("case") if isinstance(conversation.get("case"), dict) else {}
    for record in records:
        if not isinstance(record, dict):
            continue
        view = {}
        answers = record.get("critic_answers")
        if isinstance(answers, list):
            view["critic_readings"] = critic_readings(task, case, answers, logits,
                                                      answer_orders(record, task, answers))
        price = record.get("deal_price")
        try:
            view["sale_to_list"] = sale_to_list(float(price), float(case["buyer_price"]),
                                                float(case["seller_price"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            pass
        record["view"] = view


# ---------------------------------------------------------------------------------------
# The list: one small row per conversation, filtered and sorted in the page
# ---------------------------------------------------------------------------------------

def case_label(case):
    """A short text that tells a case apart: its longest string field, cut to 80 characters."""
    texts = [v for v in case.values() if isinstance(v, str)] if isinstance(case, dict) else []
    return " ".join(max(texts, key=len, default="").split())[:80]


def number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summary(run_index, split, conversation):
    records = [r for r in conversation.get("records") or [] if isinstance(r, dict)]
    return {"run": run_index, "split": split, "case_id": conversation.get("case_id"),
            "outcome": str(conversation.get("outcome")),
            "return": number(conversation.get("total_reward")),
            "turns": number(conversation.get("system_turns")) or len(records),
            "actions": sorted({str(r.get("action")) for r in records}),
            "explored": any(r.get("explored") is True for r in records),
            "unusable": sum(number(r.get(k)) or 0 for r in records for k in UNUSABLE_KEYS),
            "label": case_label(conversation.get("case")),
            "persona": str((conversation.get("persona") or {}).get("name") or "")}


def load_run(folder, run_index, skip_bad):
    metrics = {}
    for split in RUN_SPLITS:
        path = os.path.join(folder, f"{split}_metrics.json")
        if os.path.isfile(path):
            metrics[split] = read_json(path)
    args, args_source = run_arguments(folder, metrics)
    test = metrics.get("test") or {}
    task_name = test.get("task") or args.get("data_name")
    task = TASKS.get(task_name)
    bad, rows, lines = [], [], []
    for split in RUN_SPLITS:
        path = os.path.join(folder, f"{split}_conversations.jsonl")
        if not os.path.isfile(path):
            continue
        for conversation in read_conversations(path, skip_bad, bad):
            annotate(conversation, task, logits=args.get("critic") == "logits")
            rows.append(summary(run_index, split, conversation))
            lines.append(json.dumps(conversation, separators=(",", ":")))
    name = os.path.basename(os.path.normpath(folder))
    policy = test.get("policy") or args.get("policy")
    seed = test.get("seed") if "seed" in test else args.get("seed")
    run = {"name": name, "folder": folder, "task": task_name, "policy": policy, "seed": seed,
           "label": " ".join(str(part) for part in (task_name, policy, f"seed {seed}")
                             if part is not None),
           "verdicts": list(task.verdicts) if task else [],
           "critic_mode": args.get("critic"), "metrics": metrics, "args": args,
           "args_source": args_source, "figures": figures(folder), "bad_lines": bad}
    return run, rows, lines


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------

def script_json(text):
    """JSON text that is safe inside <script type="application/json">: no '<' can close
    the element or open a comment ('<', '>' and '&' are written as JSON escapes)."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def build_page(folders, skip_bad=False):
    """The HTML text of the page, and the malformed lines left out (with skip_bad)."""
    runs, rows, lines = [], [], []
    for index, folder in enumerate(folders):
        run, run_rows, run_lines = load_run(folder, index, skip_bad)
        runs.append(run)
        rows += run_rows
        lines += run_lines
    with open(TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    script = re.search(r"<script>(.*?)</script>", template, re.S).group(1)
    # the page's one script may run, by its hash: no other script, inline handler or
    # network request is allowed (a page that opens from disk needs none)
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    parts = {"SCRIPT_HASH": f"'sha256-{digest}'",
             "TITLE": "conversations: " + ", ".join(run["name"] for run in runs),
             "RUNS": script_json(json.dumps({"runs": runs, "rows": rows})),
             "CONVERSATIONS": script_json("\n".join(lines))}
    parts["TITLE"] = (parts["TITLE"].replace("&", "&amp;").replace("<", "&lt;")
                      .replace(">", "&gt;"))
    # one pass over the template: a placeholder inside the data is never replaced
    page = re.sub(r"__(SCRIPT_HASH|TITLE|RUNS|CONVERSATIONS)__",
                  lambda match: parts[match.group(1)], template)
    return page, [bad for run in runs for bad in run["bad_lines"]]


def write_page(folders, out, skip_bad=False):
    page, bad = build_page(folders, skip_bad)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as error:
        raise ViewError(f"cannot write {out} ({error.strerror}). Pass a writable --out") from None
    return out, bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders, or folders that hold runs")
    parser.add_argument("--out", help="the HTML file (default: RUN/view.html for one run, "
                                      "reports/view_<time>.html for several)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="leave malformed JSONL lines out (counted and listed on the "
                             "page) instead of stopping")
    args = parser.parse_args(argv)
    try:
        folders = find_runs(args.runs)
        out = args.out or (os.path.join(folders[0], "view.html") if len(folders) == 1 else
                           os.path.join("reports", time.strftime("view_%Y%m%d_%H%M%S.html")))
        out, bad = write_page(folders, out, args.skip_bad)
    except ViewError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for line in bad:
        print(f"skipped: {line['file']}, line {line['line']}: {line['reason']}",
              file=sys.stderr)
    print(f"{out} ({os.path.getsize(out) / 1e6:.1f} MB, {len(folders)} run"
          f"{'s' if len(folders) > 1 else ''})")
    return out


if __name__ == "__main__":
    main()
