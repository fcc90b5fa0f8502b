"""A critic's report card: how the critic LLM behaves as a measuring instrument.

    # the benchmark's human conversations, each judged at its opening and at its end
    python critic_check.py --data_name esc --data_dir data --split valid --out runs/card_esc
    # a saved run re-judged turn by turn by another critic (written beside the run's files)
    python critic_check.py --run runs/<run> --critic_llm <model> --out runs/card_rejudge

It takes train_model.py's model, backend, server and critic flags (--llm, --critic_llm,
--backend, --base_url, --critic, --critic_samples, --critic_order, ...), so it checks the
critic that a run would use: a local model, a vLLM server or a hosted API.

Human conversations: those that the task's `human_dialog` in tasks.py reads from a case
(a task without it has none to judge; --run still works). Every conversation is judged
once in each rotation of the options (rotation 0 is the task's order), which gives the
position curve (how often the option shown at position k is chosen) and the order
sensitivity (at the opening and at the end, the share of conversations whose top verdict
changes with the order). The critic as --critic_order fixed is rotation 0; as shuffle it
is all rotations pooled (the training critic spreads --critic_samples over them; the same
expectation with more samples here).

A run: every saved turn of its train and test conversations is judged again with this
critic (in --critic_order), and the new verdicts, rewards and outcomes go to
<run>/rejudged/<judge>/ (never over the run's files), which report.py tables with
--judge <judge>. A conversation was played until the run's critic ended it, so the new
critic can only judge the turns that were played.

Writes report_card.md, report_card.json and report_card.png into --out.
"""

import dataclasses
import json
import math
import os
import sys
from collections import Counter

from errors import RunFileError, UserError, one_line_errors
from get_args import Args, build_parser
from tasks import SPLITS

CARD_FLAGS = ("split", "run", "out", "judge_name")
# a critic as test_metrics.json's "judge" records it (harness.critic_settings)
CRITIC_KEYS = ("critic_llm", "critic", "critic_samples", "critic_temperature", "critic_order")


def parse(argv=None):
    """(train_model.py's Args, this script's own flags)."""
    parser = build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="valid", help="split of --data_dir to judge")
    parser.add_argument("--run", default="", help="a run folder to re-judge")
    parser.add_argument("--out", default="", help="folder for report_card.md/.json/.png")
    parser.add_argument("--judge_name", default="", help="name of the re-judged folder "
                        "(default: the critic's model, mode and order)")
    namespace = vars(parser.parse_args(argv))
    card = {name: namespace.pop(name) for name in CARD_FLAGS}
    try:
        args = Args(**namespace)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if card["split"] not in SPLITS:
        raise UserError(f"--split '{card['split']}' is not a split of the data. Pass one of "
                        f"{', '.join(SPLITS)}")
    return args, card


# ---------------------------------------------------------------------------------------
# The critic
# ---------------------------------------------------------------------------------------

def load_critic(args):
    """The Critic of a run with these arguments, and its model's resolved name."""
    from llm import backend_options, load_llm
    from tasks import get_task
    from harness import build_critic, scoring_mode
    from options import labels

    task = get_task(args.data_name)
    llm = load_llm(args.backend, args.critic_llm or args.llm, **backend_options(args, "critic"))
    mode = scoring_mode(args.critic, llm, labels(len(task.verdicts)), "critic", "critic")
    return build_critic(dataclasses.replace(args, critic=mode), task, llm), llm.name


def all_rotations(count):
    return [[(r + i) % count for i in range(count)] for r in range(count)]


def judge(critic, conversations, orders=None, chunk=16):
    """critic.score in chunks; orders: one list of orders for every conversation."""
    results = []
    for first in range(0, len(conversations), chunk):
        part = conversations[first:first + chunk]
        results += critic.score(part, None if orders is None else [orders] * len(part))
    return results


def top_option(probs):
    """The option with the most weight, or None when no answer was usable."""
    return max(range(len(probs)), key=probs.__getitem__) if probs and sum(probs) > 0 else None


def top_verdict(result):
    return top_option(result.option_probs)


def pooled(critic, case, results):
    """The shuffled critic from the results of every rotation: their answers pooled (sample
    mode) or their distributions averaged (logits mode)."""
    if critic.mode == "logits":
        count = len(results[0].option_probs)
        return critic.from_distribution([sum(r.option_probs[i] for r in results) / len(results)
                                         for i in range(count)])
    answers, answer_orders = [], []
    for k, result in enumerate(results):
        answers += result.answers
        answer_orders += [k] * len(result.answers)
    return critic.from_answers(case, answers, [r.orders[0] for r in results], answer_orders)


# ---------------------------------------------------------------------------------------
# Human conversations
# ---------------------------------------------------------------------------------------

def last_named_price(turns, case):
    """The last plausible price named in a human negotiation, or None."""
    from tasks import NUMBER_TEXT, parse_price, plausible_price

    found = None
    for _, text in turns:
        for match in NUMBER_TEXT.finditer(text):
            price = parse_price(text[match.start():])
            if plausible_price(price, case["buyer_price"], case["seller_price"]):
                found = price
    return found


def human_cases(args, card):
    """(the split's cases, [(index, case)] of those with a human dialog), read before any
    model loads; one `error:` line when there is none to judge."""
    from tasks import get_task, load_split

    task = get_task(args.data_name)
    cases = load_split(args.data_dir, task.name, card["split"], extes_seed=args.extes_seed)
    cases = cases[:args.max_cases] if args.max_cases else cases
    kept = [(i, c) for i, c in enumerate(cases) if task.human_dialog(c)]
    if not kept:
        raise UserError(f"the {card['split']} split of '{task.name}' in {args.data_dir} has no "
                        "case with a human dialog (its `human_dialog` in tasks.py reads none). "
                        "Pass a split of the benchmark, give the task a `human_dialog` (case -> "
                        "[(role, text)]), or re-judge a run with --run")
    return cases, kept


def human_card(args, card, critic, cases, kept):
    """The card's figures on the human conversations `kept` (human_cases)."""
    from env import Conversation
    from llm import stream_seed

    task = critic.task
    rotations = all_rotations(len(task.verdicts))
    points = {"start": lambda c: task.opening(c), "end": lambda c: task.human_dialog(c)}
    judged = {}
    for point, turns_of in points.items():
        conversations = [Conversation(case, list(turns_of(case)), case_id=i,
                                      stream=stream_seed(args.seed, "critic_check", card["split"],
                                                         i, point)) for i, case in kept]
        per_rotation = [judge(critic, conversations, [order]) for order in rotations]
        judged[point] = [{"case": case, "turns": conversation.turns,
                          "rotations": [results[j] for results in per_rotation]}
                         for j, (conversation, case) in enumerate(zip(conversations,
                                                                      [c for _, c in kept]))]
        for item in judged[point]:
            item["fixed"] = item["rotations"][0]
            item["shuffled"] = pooled(critic, item["case"], item["rotations"])
        if critic.mode == "logits":
            critic.ask_prices(conversations, [item["shuffled"] for item in judged[point]])
    figures = card_figures(task, critic, judged)
    figures["cases"] = len(kept)
    figures["cases_without_dialog"] = len(cases) - len(kept)
    return figures


def card_figures(task, critic, judged):
    """The report card's figures from {point: [judged conversation]}."""
    count = len(task.verdicts)
    everything = [item for items in judged.values() for item in items]
    figures = {"verdicts": task.verdicts, "by_point": {}}
    for point, items in judged.items():
        entry = {}
        for instrument in ("fixed", "shuffled"):
            results = [item[instrument] for item in items]
            tops = Counter(top_verdict(r) for r in results)
            entry[instrument] = {
                "mean_distribution": [sum(r.option_probs[i] for r in results) / len(results)
                                      for i in range(count)],
                "top_verdict_share": [tops[i] / len(results) for i in range(count)],
                "no_usable_answer_share": tops[None] / len(results),
                "mean_reward": sum(r.reward for r in results) / len(results),
                "success_share": sum(r.success for r in results) / len(results)}
            if task.reward.deals:
                entry[instrument]["deal_share"] = sum(r.deal_price is not None
                                                      for r in results) / len(results)
        figures["by_point"][point] = entry
    # unusable answers over every rotation (sample mode; logits: cb's price answers)
    asked = sum(len(r.answers) for item in everything for r in item["rotations"])
    invalid = sum(r.invalid for item in everything for r in item["rotations"])
    figures["unusable_share"] = invalid / asked if asked else 0.0
    figures["answers_asked"] = asked
    figures["position_curve"] = position_curve(critic, everything, count)
    # per point, so that its shares count conversations
    figures["order_sensitivity"] = {point: order_sensitivity(items)
                                    for point, items in judged.items()}
    figures["sample_agreement"] = sample_agreement(critic, everything)
    figures["start_vs_end"] = {}
    for instrument in ("fixed", "shuffled"):
        pairs = [(s[instrument].reward, e[instrument].reward)
                 for s, e in zip(judged["start"], judged["end"])]
        figures["start_vs_end"][instrument] = {
            "mean_reward_start": sum(s for s, _ in pairs) / len(pairs),
            "mean_reward_end": sum(e for _, e in pairs) / len(pairs),
            "better_at_end": sum(e > s for s, e in pairs) / len(pairs),
            "same": sum(e == s for s, e in pairs) / len(pairs),
            "worse_at_end": sum(e < s for s, e in pairs) / len(pairs)}
    if task.reward.deals:
        figures["price"] = price_error(judged["end"])
    return figures


def position_curve(critic, items, count):
    """Share of the choices that fell on the option shown at position k, over every
    rotation (sample mode: usable answers; logits mode: probability mass)."""
    mass = [0.0] * count
    for item in items:
        for result in item["rotations"]:
            order = result.orders[0]
            if critic.mode == "logits":
                for position, option in enumerate(order):
                    mass[position] += result.option_probs[option]
            else:
                for read in result.reads:
                    if read is not None:
                        mass[order.index(read)] += 1
    total = sum(mass)
    return [m / total if total else 0.0 for m in mass]


def order_sensitivity(items):
    """Share of conversations whose top verdict is not the same in every rotation (those
    with no usable answer in some rotation are left out and counted), and the mean absolute
    change of the reward from the task's order to each other rotation."""
    changed = compared = left_out = 0
    change = []
    for item in items:
        tops = [top_verdict(r) for r in item["rotations"]]
        base = item["rotations"][0].reward
        change += [abs(r.reward - base) for r in item["rotations"][1:]]
        if None in tops:
            left_out += 1
            continue
        compared += 1
        changed += len(set(tops)) > 1
    return {"top_verdict_changes": changed / compared if compared else None,
            "conversations_compared": compared, "left_out_no_usable_answer": left_out,
            "mean_reward_change": sum(change) / len(change) if change else 0.0}


def sample_agreement(critic, items):
    """Sample mode: the share of pairs of a conversation's usable answers (in one order)
    that name the same option. Logits mode: the same for two independent draws from the
    distribution (the sum of squared probabilities)."""
    values = []
    for item in items:
        for result in item["rotations"]:
            if critic.mode == "logits":
                values.append(sum(p * p for p in result.option_probs))
                continue
            reads = [r for r in result.reads if r is not None]
            if len(reads) >= 2:
                same = sum(c * (c - 1) for c in Counter(reads).values())
                values.append(same / (len(reads) * (len(reads) - 1)))
    return sum(values) / len(values) if values else None


def price_error(items):
    """cb: how far the critic's deal price at the end is from the humans' last named
    price, where both exist."""
    rows = []
    for item in items:
        human = last_named_price(item["turns"], item["case"])
        price = item["shuffled"].deal_price
        if human is not None and price is not None:
            gap = item["case"]["seller_price"] - item["case"]["buyer_price"]
            rows.append((abs(price - human), abs(price - human) / gap))
    return {"compared": len(rows),
            "humans_named_a_price": sum(last_named_price(i["turns"], i["case"]) is not None
                                        for i in items),
            "mean_abs_error": sum(a for a, _ in rows) / len(rows) if rows else None,
            "mean_abs_error_in_gaps": sum(g for _, g in rows) / len(rows) if rows else None}


# ---------------------------------------------------------------------------------------
# A run re-judged
# ---------------------------------------------------------------------------------------

def read_run(folder):
    """(test metrics, {split: [run_files.ConversationRecord]}) of a run folder; one `error:`
    line when a file is missing or malformed, or a conversation cannot be replayed (all
    checked before the critic loads)."""
    from run_files import conversations_file, load_run, metrics_file

    files = load_run(folder)
    for name, present in ((metrics_file("test"), "test" in files.metrics),
                          (conversations_file("test"), "test" in files.conversations)):
        if not present:
            raise RunFileError(f"{folder} has no {name}. Pass the folder of a finished "
                               "train_model.py run (--run runs/<run>)")
    if not isinstance(files.metrics["test"].get("max_turn"), int):
        raise RunFileError(f"{folder}/{metrics_file('test')} has no max_turn. Is it a run of "
                           "this version of train_model.py?")
    for split, conversations in files.conversations.items():
        for line, conversation in enumerate(conversations, start=1):
            replay(conversation, f"{folder}/{conversations_file(split)}, line {line}")
    return files.metrics["test"], files.conversations


def replay(conversation, where):
    """The conversation (a ConversationRecord) as it stood after each saved turn:
    [(turns, record)]."""
    turns, records = conversation.turns, conversation.records
    if not isinstance(turns, list):
        raise RunFileError(f"{where}: no 'turns' list. Is it a run of this version of "
                           "train_model.py?")
    opening = len(turns) - 2 * len(records)
    if opening < 0:
        raise RunFileError(f"{where}: {len(records)} records but {len(turns)} turns. Rerun the run")
    return [([tuple(t) for t in turns[:opening + 2 * (k + 1)]], record)
            for k, record in enumerate(records)]


def rejudge(args, card, critic, model, run_files):
    """Every saved turn of the run (run_files: read_run's result) judged again."""
    from env import Conversation
    from llm import stream_seed
    from harness import critic_settings, summarize
    from run_files import REJUDGED, conversations_file, write_results

    metrics, runs = run_files
    name = card["judge_name"] or judge_name(model, args)
    out_dir = os.path.join(card["run"], REJUDGED, name)
    os.makedirs(out_dir, exist_ok=True)
    max_turn = metrics["max_turn"]
    old_tops, new_tops, old_rewards, new_rewards, success_pairs = [], [], [], [], []
    for split, conversations in runs.items():
        turns, owners = [], []
        for line, conversation in enumerate(conversations, start=1):
            where = f"{card['run']}/{conversations_file(split)}, line {line}"
            for k, (played, record) in enumerate(replay(conversation, where)):
                turns.append(Conversation(conversation.case, played, system_turns=k + 1,
                                          stream=stream_seed(args.seed, "rejudge", split, line)))
                owners.append((line - 1, record))
        results = judge(critic, turns)
        judged = [[] for _ in conversations]  # per conversation: (record, new result)
        for (owner, record), result in zip(owners, results):
            judged[owner].append((record, result))
        rebuilt = []
        for conversation, mine in zip(conversations, judged):
            rebuilt.append(rejudged_conversation(conversation, mine, max_turn))
            success_pairs.append((conversation.outcome == "success",
                                  rebuilt[-1].outcome == "success"))
            for record, result in mine:
                old_tops.append(top_option(record.critic_option_probs or []))
                new_tops.append(top_verdict(result))
                old_rewards.append(float(record.reward))
                new_rewards.append(result.reward)
        split_metrics = summarize(rebuilt, critic.task, max_turn,
                                  Counter({"critic_invalid": sum(r.invalid for r in results)}))
        # the searches' simulated turns were judged by the run's critic, not re-judged
        split_metrics.pop("search", None)
        if split == "test":
            config = dict(metrics.get("config", {}))
            config.update(critic_llm=model, critic=critic.mode, critic_order=critic.order,
                          critic_samples=critic.num_samples,
                          critic_temperature=critic.temperature,
                          critic_max_new_tokens=args.critic_max_new_tokens,
                          critic_stop_at_newline=args.critic_stop_at_newline)
            played = metrics.get("judge", {})
            this_judge = critic_settings(critic, model) | {
                "self_judged": model in (played.get("system_llm"), played.get("user_llm"))}
            split_metrics = {key: metrics[key] for key in ("task", "policy", "seed", "max_turn")
                             } | {"config": config, "judge": this_judge,
                                  "rejudged_from": os.path.abspath(card["run"])} | split_metrics
        write_results(out_dir, split, split_metrics, rebuilt)
    return {"rejudged": out_dir, "turns": len(new_rewards),
            "conversations": len(success_pairs),
            "success_agreement": sum(a == b for a, b in success_pairs) / len(success_pairs),
            "success_run": sum(a for a, _ in success_pairs) / len(success_pairs),
            "success_rejudged": sum(b for _, b in success_pairs) / len(success_pairs),
            "top_verdict_kappa": cohen_kappa(old_tops, new_tops),
            "turn_reward_spearman": spearman(old_rewards, new_rewards),
            "run_judge": ({key: metrics["judge"].get(key) for key in CRITIC_KEYS}
                          if isinstance(metrics.get("judge"), dict) else None),
            "turn_rewards": {"run": old_rewards, "rejudged": new_rewards}}


def rejudged_conversation(conversation, judged, max_turn):
    """The saved conversation (a ConversationRecord) with the new critic's verdicts: it
    ends at the first turn the new critic calls a success (the later turns were played,
    but the new critic would have stopped there); otherwise after every played turn. Each
    record keeps the run's reward as run_reward and the new critic's fields."""
    from env import Conversation

    out = Conversation(conversation.case, [tuple(t) for t in conversation.turns],
                       case_id=conversation.case_id, prompt_cuts=conversation.prompt_cuts or {},
                       persona=conversation.persona)
    out.emotions = conversation.emotions or []
    records = []
    for record, result in judged:
        records.append(dataclasses.replace(record, run_reward=record.reward)
                       .set_verdict(result, None))
        out.system_turns += 1
        out.total_reward += result.reward
        if result.sale_to_list is not None:
            out.sale_to_list = result.sale_to_list
        if result.success:
            out.outcome = "success"
            break
    if out.outcome is None:
        # the run's critic ended it; the new critic did not call it a success
        out.outcome = "time limit" if out.system_turns >= max_turn else "not a success"
    records[-1].outcome = out.outcome
    out.records = [record.to_dict() for record in records]
    return out


def cohen_kappa(first, second):
    """Cohen's kappa of two raters' labels; pairs where either gave none are left out."""
    pairs = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    left, right = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(left[k] * right[k] for k in left) / (n * n)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def spearman(first, second):
    """Spearman's rank correlation (average ranks for ties); None if either is constant."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out
    a, b = ranks(first), ranks(second)
    n = len(a)
    if n < 2:
        return None
    mean_a, mean_b = sum(a) / n, sum(b) / n
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    norm = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return cov / norm if norm else None


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

def judge_name(model, args):
    """A folder name for a judge: the model's last path part, the mode and the order."""
    base = os.path.basename(os.path.normpath(str(model))) or "critic"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in
                   f"{base}_{args.critic}_{args.critic_order}")


def fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def describe_critic(judge):
    """A critic (CRITIC_KEYS) in words: its model, mode, samples and order."""
    if judge is None:
        return "not recorded in the run's test_metrics.json"
    how = (f"{judge['critic_samples']} samples at temperature {judge['critic_temperature']}"
           if judge["critic"] == "sample" else "exact option distribution")
    return (f"`{judge['critic_llm']}`, --critic {judge['critic']} ({how}), "
            f"--critic_order {judge['critic_order']}")


def markdown(card, figures, judge):
    lines = [f"# Critic report card: {card['task']}", "", f"Judge: {describe_critic(judge)}", ""]
    if "rejudged" in figures:
        f = figures
        lines += [f"Re-judged {f['conversations']} conversations ({f['turns']} turns) of "
                  f"`{card['run']}`, whose critic was {describe_critic(f['run_judge'])}; "
                  f"written to `{f['rejudged']}`.", "",
                  "| figure | value |", "|---|---|",
                  f"| success agreement | {fmt(f['success_agreement'])} |",
                  f"| SR under the run's critic | {fmt(f['success_run'])} |",
                  f"| SR re-judged | {fmt(f['success_rejudged'])} |",
                  f"| Cohen's kappa of top verdicts (per turn) | {fmt(f['top_verdict_kappa'])} |",
                  f"| Spearman correlation of turn rewards | {fmt(f['turn_reward_spearman'])} |",
                  "", "A conversation was played until the run's critic ended it: the new "
                  "critic judges only the turns that were played."]
        return "\n".join(lines) + "\n"
    f = figures
    lines += [f"{f['cases']} human conversations of the {card['split']} split, each judged at "
              f"its opening and at its end, in each of the {len(f['verdicts'])} rotations of "
              f"the options ({f['cases_without_dialog']} cases without a dialog left out). "
              "fixed: the task's order; shuffled: every rotation pooled.", "",
              "## Verdicts", "",
              "| point | critic | " + " | ".join(f"{i + 1}. {v}" for i, v in
                                                 enumerate(f["verdicts"])) +
              " | no usable answer | mean reward | success |",
              "|---|---|" + "---|" * (len(f["verdicts"]) + 3)]
    for point, entry in f["by_point"].items():
        for instrument, row in entry.items():
            lines.append(f"| {point} | {instrument} | " + " | ".join(
                fmt(v) for v in row["mean_distribution"]) +
                f" | {fmt(row['no_usable_answer_share'])} | {fmt(row['mean_reward'])} | "
                f"{fmt(row['success_share'])} |")
    lines += ["", "Each option column: the mean over conversations of the option's frequency "
              "among usable answers (sample mode) or its probability (logits mode).", "",
              "## The instrument", "", "| figure | value |", "|---|---|",
              f"| unusable answers | {fmt(f['unusable_share'])} of {f['answers_asked']} |"
              if f["answers_asked"] else "| unusable answers | none asked (exact distributions) |",
              "| position curve (share chosen at position 1..V) | " +
              ", ".join(fmt(v) for v in f["position_curve"]) + " |",
              *[f"| top verdict changes with the order, at the {point} | "
                f"{fmt(row['top_verdict_changes'])} of {row['conversations_compared']} "
                f"conversations ({row['left_out_no_usable_answer']} left out: no usable answer "
                "in some order) |" for point, row in f["order_sensitivity"].items()],
              *[f"| mean reward change, task's order to another rotation, at the {point} | "
                f"{fmt(row['mean_reward_change'])} |"
                for point, row in f["order_sensitivity"].items()],
              f"| agreement between a conversation's samples | {fmt(f['sample_agreement'])} |",
              "", "## Start against end", "",
              "| critic | mean reward at the start | at the end | better at the end | same "
              "| worse |", "|---|---|---|---|---|---|"]
    for instrument, row in f["start_vs_end"].items():
        lines.append(f"| {instrument} | {fmt(row['mean_reward_start'])} | "
                     f"{fmt(row['mean_reward_end'])} | {fmt(row['better_at_end'])} | "
                     f"{fmt(row['same'])} | {fmt(row['worse_at_end'])} |")
    if "price" in f:
        p = f["price"]
        lines += ["", "## Deals (cb)", "",
                  f"Deal read (shuffled critic): {fmt(f['by_point']['start']['shuffled']['deal_share'])}"
                  f" at the start, {fmt(f['by_point']['end']['shuffled']['deal_share'])} at the end. "
                  f"The humans named a price in {p['humans_named_a_price']} conversations; where "
                  f"the critic also read a deal ({p['compared']}), its price is off the humans' "
                  f"last named price by {fmt(p['mean_abs_error'])} on average "
                  f"({fmt(p['mean_abs_error_in_gaps'])} buyer-seller gaps)."]
    lines += ["", "An unbiased instrument has a flat position curve, a top verdict that does "
              "not change with the order, and judges the end of a human conversation better "
              "than its opening. Figures from this critic can reflect these biases."]
    return "\n".join(lines) + "\n"


def plot(figures, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(figures["verdicts"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].bar(range(1, count + 1), figures["position_curve"], color="tab:gray")
    axes[0].axhline(1 / count, color="black", linestyle="--", linewidth=1, label="no preference")
    axes[0].set(xlabel="position shown", ylabel="share of choices", title="position curve",
                xticks=range(1, count + 1))
    axes[0].legend()
    width = 0.38
    for shift, point in ((-width / 2, "start"), (width / 2, "end")):
        values = figures["by_point"][point]["shuffled"]["mean_distribution"]
        axes[1].bar([i + 1 + shift for i in range(count)], values, width, label=point)
    axes[1].set(xlabel="verdict (task's order)", ylabel="mean share", xticks=range(1, count + 1),
                title="verdicts at the start and the end (shuffled)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rejudged(figures, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    rewards = figures["turn_rewards"]
    ax.scatter(rewards["run"], rewards["rejudged"], alpha=0.4, s=14)
    ax.set(xlabel="turn reward, the run's critic", ylabel="turn reward, re-judged",
           title=f"Spearman {fmt(figures['turn_reward_spearman'])}, "
                 f"kappa {fmt(figures['top_verdict_kappa'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args, card = parse(argv)
    if not card["out"]:
        raise UserError("critic_check.py needs --out DIR for report_card.md/.json/.png. "
                        "Pass e.g. --out runs/critic_check")
    from harness import check_weights, critic_settings
    from llm import check_device

    # the run's files or the split's human conversations are checked before any model loads
    if card["run"]:
        run_files = read_run(card["run"])
        played = run_files[0].get("task")
        if played != args.data_name:
            raise UserError(f"{card['run']} is a run of task '{played}', not "
                            f"'{args.data_name}'. Pass --data_name {played}")
    else:
        cases, kept = human_cases(args, card)
    check_weights(args, roles=("critic",), encoder_flags=())  # the critic's model only
    check_device(args.device)
    try:
        os.makedirs(card["out"], exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the folder {card['out']} ({error.strerror}). Pass a "
                        "writable --out") from None
    critic, model = load_critic(args)
    judged_by = critic_settings(critic, model)
    card["task"] = critic.task.name
    figures = (rejudge(args, card, critic, model, run_files) if card["run"]
               else human_card(args, card, critic, cases, kept))
    result = {"card": card, "judge": judged_by, "figures": figures}
    with open(os.path.join(card["out"], "report_card.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(card["out"], "report_card.md"), "w") as f:
        f.write(markdown(card, figures, judged_by))
    (plot_rejudged if card["run"] else plot)(figures, os.path.join(card["out"], "report_card.png"))
    print(markdown(card, figures, judged_by))
    print(f"report card: {os.path.join(card['out'], 'report_card.md')}")
    return result


def cli():
    one_line_errors(main)


if __name__ == "__main__":
    cli()
