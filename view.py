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
read as (and cb's price) as the critic recorded it (critic_reads, critic_prices), the
reward. With several runs, a case that more of them played (same split and
case_id: a paired evaluation) opens side by side, the first turn where their actions
differ marked.

The run's files are read through run_files.py. A folder that holds no train_ or
test_conversations.jsonl is searched for run folders at any depth. A malformed line stops
the page with the file and line; with --skip_bad it is left out, counted and listed on the
page. Every text of the runs reaches the page as data (JSON in script elements, with '<'
escaped) and is shown with textContent, never as HTML. A NaN or infinite number in a run's
files reaches the page as its text ("NaN", "Infinity"), which JSON.parse reads.
"""

import base64
import hashlib
import json
import math
import os
import re
import sys
import time

import run_files
from critic import LEADING_LABEL, OTHER_LABELS, parse_verdict
from errors import ArgumentParser, RunFileError, one_line_errors
from metrics import UNUSABLE_KEYS
from tasks import TASKS, sale_to_list

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "view.html")
# how the tests and bench.py open pages: Debian's chromium, headless, with nothing that
# reaches the network on its own
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-quic",
                  "--disable-sync"]


def find_runs(paths):
    """Run folders (those with a *_conversations.jsonl), in the order given."""
    return run_files.find_runs(
        paths, [run_files.conversations_file(split) for split in run_files.SPLITS],
        "conversations (" + " or ".join(run_files.conversations_file(split)
                                        for split in run_files.SPLITS) + ")")


def run_arguments(files):
    """The run's arguments from a checkpoint sidecar (a trained run, or the checkpoint a
    test run loaded), else the evaluation setup in its test metrics."""
    args, source = files.saved_args()
    if source:
        return args, source
    config = (files.metrics.get("test") or {}).get("config")
    return (config, "test_metrics.json config") if isinstance(config, dict) else ({}, None)


def figures(files):
    """The run's PNG figures as data: URIs, so the page needs no other file."""
    result = []
    for path in files.figures():
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        result.append({"name": os.path.basename(path), "src": "data:image/png;base64," + data})
    return result


# ---------------------------------------------------------------------------------------
# What the page adds to each record: what the critic read, as recorded
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


def per_answer(values, answers):
    """A recorded per-answer list (critic_reads, critic_prices), or None where the record
    has none that fits (a run older than the field, a record edited by hand)."""
    return values if isinstance(values, list) and len(values) == len(answers) else None


def critic_readings(task, record, logits=False):
    """Per critic answer of a turn's record (run_files.TurnRecord): the option the critic
    read it as (index in the task's order, text, and the number it had in the order shown)
    or why it is unusable, and cb's price, all as the critic recorded them (critic_reads,
    critic_prices). A record without critic_reads (a run older than them) is read with
    critic.parse_verdict, without prices. With --critic logits the answers are those to
    cb's price question alone."""
    answers = record.critic_answers if isinstance(record.critic_answers, list) else []
    reads, prices = per_answer(record.critic_reads, answers), per_answer(record.critic_prices,
                                                                         answers)
    orders = answer_orders(record, task, answers)
    readings = []
    for j, answer in enumerate(answers):
        if not isinstance(answer, str):
            readings.append({"option": None, "why": "not a text"})
            continue
        price = prices[j] if prices else None
        if logits:
            readings.append({"option": None, "price": price} if price is not None else
                            {"option": None, "why": "no plausible price" if prices else
                             "no price recorded"})
            continue
        order = orders[j] if orders else list(range(len(task.verdicts)))
        shown = parse_verdict(answer, [task.verdicts[i] for i in order])
        if shown is None:
            readings.append({"option": None, "why": why_unusable(answer, len(task.verdicts))})
            continue
        index = order[shown]
        if reads and reads[j] is None:  # the task's rule found it unusable (cb: no price)
            readings.append({"option": index, "text": task.verdicts[index],
                             "why": "a deal without a usable price" if task.reward.deals
                             else "unusable by the task's rule"})
            continue
        reading = {"option": index, "text": task.verdicts[index], "shown_as": shown + 1}
        if price is not None:
            reading["price"] = price
        readings.append(reading)
    return readings


def answer_orders(record, task, answers):
    """The option order each critic answer was shown (critic_orders, critic_answer_orders:
    --critic_order shuffle in sample mode), or None for the task's order."""
    orders, which = record.critic_orders, record.critic_answer_orders
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
    """The conversation (run_files.ConversationRecord) as the page's JSON object: each
    record with `view`, the critic readings and, cb, the turn's sale-to-list ratio. No
    `view` for tasks this version does not know."""
    page = conversation.to_dict()
    if task is None:
        return page
    case = conversation.case if isinstance(conversation.case, dict) else {}
    for record, shown in zip(conversation.records, page["records"]):
        view = {}
        if isinstance(record.critic_answers, list):
            view["critic_readings"] = critic_readings(task, record, logits)
        try:
            view["sale_to_list"] = sale_to_list(float(record.deal_price),
                                                float(case["buyer_price"]),
                                                float(case["seller_price"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            pass
        shown["view"] = view
    return page


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
    records = conversation.records
    return {"run": run_index, "split": split, "case_id": conversation.case_id,
            "outcome": str(conversation.outcome),
            "return": number(conversation.total_reward),
            "turns": number(conversation.system_turns) or len(records),
            "actions": sorted({str(r.action) for r in records}),
            "explored": any(r.note.get("explored") is True for r in records),
            "unusable": sum(number(getattr(r, k)) or 0 for r in records for k in UNUSABLE_KEYS),
            "label": case_label(conversation.case),
            "persona": str((conversation.persona or {}).get("name") or "")}


def load_run(folder, run_index, skip_bad):
    """A run folder's part of the page: the run, its rows and its conversations' lines."""
    files = run_files.load_run(folder, skip_bad=skip_bad)
    metrics = files.metrics
    args, args_source = run_arguments(files)
    test = metrics.get("test") or {}
    task_name = test.get("task") or args.get("data_name")
    task = TASKS.get(task_name)
    rows, lines = [], []
    for split, conversations in files.conversations.items():
        for conversation in conversations:
            page = annotate(conversation, task, logits=args.get("critic") == "logits")
            rows.append(summary(run_index, split, conversation))
            lines.append(page_json(page))
    name = os.path.basename(os.path.normpath(folder))
    policy = test.get("policy") or args.get("policy")
    seed = test.get("seed") if "seed" in test else args.get("seed")
    run = {"name": name, "folder": folder, "task": task_name, "policy": policy, "seed": seed,
           "label": " ".join(str(part) for part in (task_name, policy, f"seed {seed}")
                             if part is not None),
           "verdicts": list(task.verdicts) if task else [],
           "critic_mode": args.get("critic"), "metrics": metrics, "args": args,
           "args_source": args_source, "figures": figures(files), "bad_lines": files.bad_lines}
    return run, rows, lines


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------

def strict_json(value):
    """A run's value with each number that JSON has no word for (NaN, Infinity: a diverged
    loss or Q-value, which Python's json writes and reads) as its text, "NaN", "Infinity"
    or "-Infinity": the browser's JSON.parse refuses the bare words, and one of them would
    stop the page (in the metrics) or a conversation (in its records)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: strict_json(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(inner) for inner in value]
    return value


def page_json(value):
    """One line of JSON that the browser's JSON.parse reads (strict_json, only for a value
    that holds a NaN or an infinity: most hold none, and are written as they are)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(strict_json(value), separators=(",", ":"), allow_nan=False)


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
             "RUNS": script_json(page_json({"runs": runs, "rows": rows})),
             "CONVERSATIONS": script_json("\n".join(lines))}
    # the title is the one text not written as JSON: its markup escaped, and a folder
    # name's byte that is not UTF-8 (a lone surrogate here) written as U+FFFD
    parts["TITLE"] = run_files.shown_name(parts["TITLE"].replace(
        "&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
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
        raise RunFileError(f"cannot write {out} ({error.strerror}). Pass a writable "
                           "--out") from None
    return out, bad


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders, or folders that hold runs")
    parser.add_argument("--out", help="the HTML file (default: RUN/view.html for one run, "
                                      "reports/view_<time>.html for several)")
    parser.add_argument("--skip_bad", action="store_true",
                        help="leave malformed JSONL lines out (counted and listed on the "
                             "page) instead of stopping")
    args = parser.parse_args(argv)
    if args.out and not args.out.endswith(".html"):  # never over a run's own files
        parser.error(f"--out {args.out} is not an .html file. Pass a page's path, e.g. "
                     "--out page.html")
    folders = find_runs(args.runs)
    out = args.out or (os.path.join(folders[0], "view.html") if len(folders) == 1 else
                       os.path.join("reports", time.strftime("view_%Y%m%d_%H%M%S.html")))
    out, bad = write_page(folders, out, args.skip_bad)
    for line in bad:
        print(f"skipped: {line['file']}, line {line['line']}: {line['reason']}",
              file=sys.stderr)
    print(f"{out} ({os.path.getsize(out) / 1e6:.1f} MB, {len(folders)} run"
          f"{'s' if len(folders) > 1 else ''})")
    return out


if __name__ == "__main__":
    one_line_errors(main)
