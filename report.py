"""Tables with confidence intervals, and figures, from finished runs.

    python report.py runs/ [more runs or folders of runs] [--out reports/esc]

A run folder is one that holds test_metrics.json; other folders given are searched for
run folders at any depth. Runs are grouped by (task, policy), one run per seed, a policy
named with its own settings that differ from their defaults ("policy_settings"): when
several runs share a task, policy and seed (a test-mode replay of a trained run, say),
the newest test_metrics.json is kept and the others are listed as skipped. Runs of one
task must share their evaluation setup (test_metrics.json's "config"; else one `error:`
line names the flag that differs: docs/outputs.md, "Which runs pool"), and the seeds of
one row the training flags of their policy (TRAINING_FLAGS, as the run's checkpoint
sidecar saved them).

Per-conversation values: SR 1 on success else 0; AT the system turns on success else
max_turn; SL the sale-to-list ratio on success else 0 (as PPDPP); return total_reward;
unusable the sum over its records of critic_invalid, system_format_error, system_empty
and user_empty (those present): the answers of the turn's exchange. The planner's
unusable sampled answers (--prior sample only; records' planner_invalid) are in
test_metrics.json's llm_answers_unusable, not in this column. The Search table (gdpzero,
dpdp) counts the unusable answers of the searches' simulated turns (test_metrics.json
`search`).

The cost table: test_metrics.json's LLM cost per conversation (its "cost", see
docs/outputs.md) and the policy's trainable parameters and training seconds
("policy_cost"), each the mean over seeds; "-" where a run does not have it (a client
that cannot count it, or a run older than the ledger). cost.png plots SR against LLM
tokens per conversation, one point per policy.
"""

import dataclasses
import json
import os
import re
import sys
import time
from collections import Counter
from urllib.parse import quote

import plots
from errors import ArgumentParser, RunFileError, UserError, one_line_errors
from get_args import EVALUATION_CONFIG, HELP_GROUPS, MODEL_FLAGS, Args
from metrics import episode_values, unusable_answers
from policies import POLICIES, TEST_FLAGS, policy_class
from run_files import (REJUDGED, conversations_file, find_runs, load_run, metrics_file,
                       shown_name)
from stats import bootstrap_ci, paired_bootstrap_ci
from tasks import TASKS

# the value of each flag in a run older than it (get_args' defaults)
DEFAULTS = {field.name: field.default for field in dataclasses.fields(Args)}
# the flags that make a trained policy, which its seeds in one row must share: the training
# section of --help (DialogXpert's Q-learning) or PPDPP's own, and the validation that
# picks best.pt; those of the evaluation setup, the models and the policy's test flags are
# compared (or name the row) elsewhere
_CHOOSING = ("eval_every", "eval_cases")
_SHARED = ("recipe", "total_episodes", "num_envs", "system_temperature", "user_temperature")
_PPDPP = _SHARED + _CHOOSING + tuple(name for name in HELP_GROUPS["planners of prior work"]
                                     if name.startswith("ppdpp_")
                                     and name not in TEST_FLAGS["ppdpp"])
TRAINING_FLAGS = {
    "dialogxpert": tuple(name for name in HELP_GROUPS["training"] + _CHOOSING
                         if name not in EVALUATION_CONFIG + MODEL_FLAGS
                         + TEST_FLAGS["dialogxpert"]),
    "ppdpp": _PPDPP, "dpdp": _PPDPP}
BASELINE = "dialogxpert"  # the paired table compares every other policy with this one
METRICS = {"SR": ".3f", "AT": ".2f", "SL": ".3f", "mean_return": ".3f", "unusable": ".2f"}
HEADERS = {"SR": "SR", "AT": "AT", "SL": "SL", "mean_return": "mean return",
           "unusable": "unusable LLM answers / conv."}
# the cost table's columns: header -> (where in test_metrics.json, format)
COSTS = {"LLM tokens / conv.": (("cost", "per_conversation", "total", "tokens"), ",.0f"),
         "prompt tokens run": (("cost", "per_conversation", "total", "prompt_tokens"), ",.0f"),
         "prompt tokens reused": (("cost", "per_conversation", "total", "prompt_tokens_reused"),
                                  ",.0f"),
         "generated tokens": (("cost", "per_conversation", "total", "generated_tokens"), ",.0f"),
         "LLM calls": (("cost", "per_conversation", "total", "calls"), ",.1f"),
         "LLM seconds": (("cost", "per_conversation", "total", "seconds"), ".3g"),
         "planner share of tokens": (("cost", "planner_share"), ".1%"),
         "unread prior tokens": (("cost", "per_conversation", "unread_prior", "tokens"), ",.0f"),
         "trainable parameters": (("policy_cost", "trainable_parameters"), ",.0f"),
         "training seconds": (("policy_cost", "training_seconds"), ",.1f")}


def tabled_folders(paths):
    """The run folders in `paths` (those with a test_metrics.json), sorted."""
    return sorted(find_runs(paths, [metrics_file("test")], metrics_file("test")))


def rejudged(folders, judge):
    """The runs' folders re-judged by `judge` (critic_check.py --run), or the runs."""
    if not judge:
        return folders
    out = [os.path.join(folder, REJUDGED, judge) for folder in folders]
    for folder, path in zip(folders, out):
        if not os.path.exists(os.path.join(path, metrics_file("test"))):
            raise UserError(f"{folder} has not been re-judged by '{judge}' ({path} is "
                              "missing). Run `python critic_check.py --run "
                              f"{folder} --judge_name {judge} ...` first")
    return out


def conversation_values(conversation, max_turn):
    """A run_files.ConversationRecord's values."""
    records = [record.to_dict() for record in conversation.records]
    return episode_values(conversation.outcome, conversation.system_turns,
                          conversation.sale_to_list, conversation.total_reward,
                          max_turn) | {"unusable": unusable_answers(records)}


def tabled_run(folder):
    """What the tables need of a run: its test metrics and test conversations."""
    files = load_run(folder, splits=("test",))
    if "test" not in files.conversations:
        raise RunFileError(f"{folder} has no {conversations_file('test')}. Rerun the test of "
                           "this run or leave it out")
    metrics, conversations = files.metrics["test"], files.conversations["test"]
    repeated = [case for case, count in Counter(c.case_id for c in conversations).items()
                if count > 1]
    if repeated:  # pairs go by case_id
        raise RunFileError(f"{files.path(conversations_file('test'))} holds case_id "
                           f"{repeated[0]} more than once. Rerun the test into a new folder, "
                           "or leave the run out")
    try:
        # in case order, so that a resample does not depend on the order of the lines
        conversations = sorted(conversations, key=lambda c: c.case_id)
        values = [conversation_values(c, metrics["max_turn"]) for c in conversations]
        run = {"folder": folder, "task": metrics["task"],
               "policy": policy_label(metrics["policy"], metrics.get("policy_settings")),
               "seed": metrics["seed"], "bargaining": "SL" in metrics,
               "case_ids": [c.case_id for c in conversations],
               "config": with_saved_args(files.saved_args(tested=False)[0],
                                             metrics.get("config", {})),
               "trained_with": trained_with(metrics["policy"], files.saved_args()[0]),
               "judge": metrics.get("judge", {}),
               "costs": {header: looked_up(metrics, keys) for header, (keys, _) in COSTS.items()},
               "personas": [(c.persona or {}).get("name") for c in conversations],
               "strategies": metrics.get("strategies"), "search": metrics.get("search"),
               "cost_before_unread_prior": cost_before_unread_prior(metrics)}
    except (KeyError, TypeError) as error:  # a missing field, or null where a number goes
        raise RunFileError(f"{folder}: unexpected {metrics_file('test')} or "
                           f"{conversations_file('test')} ({type(error).__name__}: {error}). Is "
                           "it a run of this version of train_model.py?") from None
    if not conversations:
        raise RunFileError(f"{files.path(conversations_file('test'))} has no conversations. "
                           "Rerun the test")
    run["values"] = {name: [v[name] for v in values] for name in METRICS}
    run["override_rate"] = plots.override_rate(conversations)
    run["mtime"] = os.path.getmtime(files.path(metrics_file("test")))
    return run


def policy_label(policy, settings):
    """The policy's name, with its own settings (test_metrics.json "policy_settings") that
    differ from their defaults: runs of one policy at other settings (GDP-Zero at 5 and
    20 simulations) are tabled apart."""
    changed = [f"{name} {value}" for name, value in sorted((settings or {}).items())
               if name in DEFAULTS and value != DEFAULTS[name]]
    return f"{policy} ({', '.join(changed)})" if changed else policy


def cost_before_unread_prior(metrics):
    """Whether a run's cost is older than the unread prior's part: a policy that does not
    read the prior (Policy.reads_prior) whose cost has no "unread_prior" counted it inside
    its planner part and total."""
    per_conversation = looked_up(metrics, ("cost", "per_conversation"))
    if not per_conversation or "unread_prior" in per_conversation \
            or metrics["policy"] not in POLICIES:
        return False
    return not policy_class(metrics["policy"]).reads_prior


def with_saved_args(saved, config):
    """The run's config, with the flags it does not record (a run older than the flag's
    place in the config) taken from the arguments its checkpoint's sidecar saved (`saved`:
    run_files.Run.saved_args), where it has one; check_comparable counts what is still
    missing as the default."""
    return {name: saved[name] for name in EVALUATION_CONFIG if name in saved} | config


def trained_with(policy, saved):
    """The policy's training flags (TRAINING_FLAGS) as the run's checkpoint sidecar saved
    them (a test of a checkpoint: that checkpoint's); {} for a policy that does not train
    or a run without a sidecar."""
    return {name: saved[name] for name in TRAINING_FLAGS.get(policy, ()) if name in saved}


def looked_up(metrics, keys):
    """metrics[keys[0]][keys[1]]..., or None where a key is missing (an older run)."""
    for key in keys:
        if not isinstance(metrics, dict):
            return None
        metrics = metrics.get(key)
    return metrics


def compared_config(run):
    """A run's evaluation setup without the data flags of other tasks (an esc run does not
    read --extes_split; runs before Task.data_flags recorded them for every task)."""
    others = {flag for task in TASKS.values() for flag in task.data_flags}
    if run["task"] in TASKS:
        others -= set(TASKS[run["task"]].data_flags)
    return {name: value for name, value in run["config"].items() if name not in others}


def check_comparable(runs):
    """Runs of one task must share their evaluation setup (test_metrics.json's config:
    get_args.EVALUATION_CONFIG, the task's data flags and the models): else their cases
    and draws do not pair. A flag that a run does not record (with_saved_args found no
    value either) counts as its default in get_args."""
    first = {}
    for run in runs:
        seen = first.setdefault(run["task"], run)
        ours, theirs = compared_config(seen), compared_config(run)
        for name in sorted(set(ours) | set(theirs)):
            a, b = (config.get(name, DEFAULTS.get(name)) for config in (ours, theirs))
            if a != b:
                what = "their models (resolved)" if name == "models" else f"--{name}"
                raise UserError(f"{seen['folder']} and {run['folder']} differ in {what} "
                                  f"({a!r} and {b!r}), so their figures do not compare. "
                                  "Report them separately")


def check_same_training(runs):
    """The seeds of one row are one experiment: runs of a task and policy (its row) trained
    with another value of a training flag are refused, as their spread is not a seed's. A
    flag that a run's sidecar does not hold is not compared."""
    first = {}
    for run in runs:
        seen = first.setdefault((run["task"], run["policy"]), run)
        ours, theirs = seen["trained_with"], run["trained_with"]
        for name in sorted(set(ours) & set(theirs)):
            if ours[name] != theirs[name]:
                raise UserError(f"{seen['folder']} and {run['folder']} are {run['policy']} "
                                f"runs of {run['task']} trained with other --{name} "
                                f"({ours[name]!r} and {theirs[name]!r}), so they are not "
                                "seeds of one experiment. Report them separately")


def group_runs(runs):
    """{(task, policy): {seed: run}} keeping the newest run of each seed, the seeds in
    order of their numbers (the order the bootstrap draws them in, so that the intervals
    do not depend on the files' times); and the skipped."""
    check_comparable(runs)
    check_same_training(runs)
    groups, skipped = {}, []
    for run in sorted(runs, key=lambda r: (r["mtime"], r["folder"])):
        seeds = groups.setdefault((run["task"], run["policy"]), {})
        if run["seed"] in seeds:
            skipped.append(seeds[run["seed"]]["folder"])
        seeds[run["seed"]] = run
    return {key: dict(sorted(seeds.items())) for key, seeds in sorted(groups.items())}, skipped


def interval(groups, n_boot, paired_with=None, crossed=False):
    """crossed: every seed played the same cases in the same order (stats.py)."""
    mean, low, high = (paired_bootstrap_ci(groups, paired_with, n_boot, crossed=crossed)
                       if paired_with else bootstrap_ci(groups, n_boot, crossed=crossed))
    return {"mean": mean, "low": low, "high": high}


def summarize(task, policy, seeds, n_boot):
    runs = list(seeds.values())
    crossed = len({tuple(run["case_ids"]) for run in runs}) == 1  # in case order (tabled_run)
    figures = {}
    for name in METRICS:
        applies = name != "SL" or any(run["bargaining"] for run in runs)
        figures[name] = (interval([run["values"][name] for run in runs], n_boot,
                                  crossed=crossed) if applies else None)
    costs = {}
    for header in COSTS:
        values = [run["costs"][header] for run in runs]
        costs[header] = None if None in values else sum(values) / len(values)
    return {"task": task, "policy": policy, "judge": judge_text(runs[0]["judge"]),
            "cost_before_unread_prior": any(r["cost_before_unread_prior"] for r in runs),
            "personas": persona_figures(runs, n_boot), "strategies": strategy_figures(runs),
            "search": search_figures(runs),
            "conversations": sum(len(r["case_ids"]) for r in runs),
            "runs": [{"folder": r["folder"], "seed": r["seed"], "override_rate": r["override_rate"]}
                     for r in runs], "metrics": figures, "costs": costs}


def persona_figures(runs, n_boot):
    """{persona: {"conversations", "SR", "AT"}} over the runs' test conversations (--user_
    personas; {} without), each figure a bootstrap over the persona's cases and seeds."""
    names = sorted({name for run in runs for name in run["personas"] if name is not None})
    figures = {}
    for name in names:
        groups = {metric: [[value for value, persona in zip(run["values"][metric], run["personas"])
                            if persona == name] for run in runs] for metric in ("SR", "AT")}
        groups = {metric: [g for g in seeds if g] for metric, seeds in groups.items()}
        figures[name] = {"conversations": sum(len(g) for g in groups["SR"])} | {
            metric: interval(seeds, n_boot) for metric, seeds in groups.items()}
    return figures


def search_figures(runs):
    """The MCTS searches of the runs (test_metrics.json `search`), summed over seeds; None
    when no run searched."""
    searches = [run["search"] for run in runs if run["search"]]
    if not searches:
        return None
    unusable = {}
    for search in searches:
        for name, count in search["answers_unusable"].items():
            unusable[name] = unusable.get(name, 0) + count
    simulated = sum(search["simulated_turns"] for search in searches)
    return {"searched_turns": sum(search["searched_turns"] for search in searches),
            "simulated_turns": simulated, "answers_unusable": unusable,
            "unusable_per_simulated_turn": sum(unusable.values()) / simulated if simulated
            else None}


# the strategy bias's figures (metrics.strategy_bias) tabled, means over seeds
STRATEGY_FIGURES = {"entropy": ("strategies", "entropy"),
                    "top share": ("strategies", "top_share"),
                    "TV from human": ("strategies", "human", "total_variation"),
                    "JS from human": ("strategies", "human", "js_divergence")}


def strategy_figures(runs):
    """The strategy bias of the runs: the mean over seeds of each STRATEGY_FIGURES value
    (None where a run lacks it: an older run, a task without labels, no strategy played),
    but for the top share: the most chosen action of the seeds' mean distribution and its
    share there (the seeds' own top actions may differ)."""
    figures = {}
    for header, keys in STRATEGY_FIGURES.items():
        values = [looked_up({"strategies": run["strategies"]}, keys) for run in runs]
        figures[header] = None if None in values else sum(values) / len(values)
    def mean_distribution(distributions):  # over the runs that have one
        distributions = [d for d in distributions if d]
        return {action: sum(d[action] for d in distributions) / len(distributions)
                for action in (distributions[0] if distributions else {})}
    shares = mean_distribution([(run["strategies"] or {}).get("distribution")
                                for run in runs])
    human = mean_distribution([((run["strategies"] or {}).get("human") or {}).get("distribution")
                               for run in runs])
    figures["top action"] = max(shares, key=shares.get) if shares else None
    if figures["top share"] is not None:  # every seed has a distribution
        figures["top share"] = shares[figures["top action"]]
    return figures | {"distribution": shares, "human distribution": human}


def judge_text(judge):
    """The critic that judged a run, in a few words: model, mode, option order; marked
    when it is the same model as the system or the user."""
    if not judge:
        return "not recorded"
    text = (f"{os.path.basename(os.path.normpath(str(judge['critic_llm'])))} "
            f"{judge['critic']}, {judge['critic_order']} order")
    return text + (" (self-judged)" if judge.get("self_judged") else "")


def paired_difference(baseline, other, n_boot):
    """BASELINE minus `other` on the conversations both played: same seed, same case_id."""
    seeds, pairs, shared_cases = [], {name: ([], []) for name in ("SR", "mean_return")}, []
    for seed in sorted(set(baseline) & set(other)):
        index_a = {c: i for i, c in enumerate(baseline[seed]["case_ids"])}
        index_b = {c: i for i, c in enumerate(other[seed]["case_ids"])}
        shared = sorted(set(index_a) & set(index_b))
        if not shared:
            continue
        seeds.append(seed)
        shared_cases.append(shared)
        for name, (groups_a, groups_b) in pairs.items():
            groups_a.append([baseline[seed]["values"][name][index_a[c]] for c in shared])
            groups_b.append([other[seed]["values"][name][index_b[c]] for c in shared])
    count = sum(len(values) for values in pairs["SR"][0])
    result = {"seeds": seeds, "pairs": count}
    crossed = len({len(values) for values in pairs["SR"][0]}) == 1 and all(
        shared_cases[0] == cases for cases in shared_cases)
    for name, (groups_a, groups_b) in pairs.items():
        result[name] = (interval(groups_a, n_boot, paired_with=groups_b, crossed=crossed)
                        if count else None)
    return result


def cell(figure, form):
    if figure is None:
        return "-"
    return f"{figure['mean']:{form}} [{figure['low']:{form}}, {figure['high']:{form}}]"


def markdown_text(value):
    """A run's text (a task, policy label, judge, persona or action name: from its files)
    as Markdown on one line: a newline would end the table, a '|' split its cell, and '<',
    a backtick or a bracket open HTML, code or a link; each is written as itself. A folder
    name's byte that is not UTF-8 (a lone surrogate in Python) is written as U+FFFD."""
    text = shown_name(" ".join(str(value).split()))
    return re.sub(r"([\\`|<>\[\]])", r"\\\1", text)


def first_cells(row, mark=""):
    """A table row's task and policy cells (the policy marked with `mark`), with the '|'
    that opens the next."""
    return f"| {markdown_text(row['task'])} | {markdown_text(row['policy'])}{mark} | "


def link(path):
    """A relative path as a Markdown link's target: percent-encoded, so that a space or ')'
    does not end it, and a byte that is not UTF-8 is that byte (%FF)."""
    return quote(path, errors="surrogateescape")


def markdown(summaries, differences, skipped, images, out, n_boot):
    line = f"{n_boot:,} resamples"
    rows = ["| task | policy | runs | conversations | " + " | ".join(HEADERS.values())
            + " | judge |", "|---" * (5 + len(HEADERS)) + "|"]
    for s in summaries:
        rows.append(first_cells(s) + f"{len(s['runs'])} | {s['conversations']} | "
                    + " | ".join(cell(s["metrics"][n], f) for n, f in METRICS.items())
                    + f" | {markdown_text(s['judge'])} |")
    rows += ["", "Each cell: mean [95% interval]. The mean is the mean over seeds of each "
             "seed's mean; the interval is a 95% percentile bootstrap over the test cases and, "
             "with several seeds, over seeds (one resample of cases for all seeds when they "
             f"played the same cases; rough with under 5 seeds), {line}. judge: the critic "
             "LLM that gave every reward and success (see critic_check.py for its report "
             "card); self-judged: the same model as the system or the user, which a judge "
             "can favour.", ""]
    rows += ["## Cost", "", "| task | policy | " + " | ".join(COSTS) + " |",
             "|---" * (2 + len(COSTS)) + "|"]
    for s in summaries:
        marked = "*" if s["cost_before_unread_prior"] else ""
        rows.append(first_cells(s, marked) + " | ".join(
            "-" if s["costs"][h] is None else f"{s['costs'][h]:{f}}"
            for h, (_, f) in COSTS.items()) + " |")
    rows += ["", "Per conversation of the test, mean over seeds: every LLM call of the "
             "conversation's own turns (system, user, critic) and of its planner (priors, "
             "simulated turns). LLM tokens: prompt tokens run through the model or reused "
             "from a prefix cache, and generated tokens. LLM seconds: the calls' wall time "
             "shared among the conversations of each batched call. Unread prior tokens: the "
             "planner's prior asked at every real turn for the records, by a policy that "
             "does not act on it (ppdpp, gdpzero, whose search asks its own, dpdp, uniform, "
             "none); not in the other columns. Training seconds: the training loop's wall "
             "time, validation included. -: not counted, or (unread prior) a policy that "
             "reads it. *: some of its runs are older than the unread prior's column, and "
             "have that prior inside their planner part and total.", ""]
    rows += strategy_rows(summaries) + search_rows(summaries) + persona_rows(summaries)
    rows += ["## Paired differences against " + BASELINE, "",
             f"| task | policy | seeds | pairs | SR ({BASELINE} - policy) | "
             f"mean return ({BASELINE} - policy) |", "|---" * 6 + "|"]
    for d in differences:
        if d["pairs"]:
            figures = f"{cell(d['SR'], '.3f')} | {cell(d['mean_return'], '.3f')}"
        else:
            figures = f"no seed and case_id shared with {BASELINE} | -"
        seeds = ", ".join(markdown_text(seed) for seed in d["seeds"]) or "-"
        rows.append(first_cells(d) + f"{seeds} | "
                    f"{d['pairs']} | {figures} |")
    if not differences:
        rows.append(f"| - | - | - | 0 | no task has both {BASELINE} and another policy | - |")
    rows += ["", "Pairs are the conversations of the same seed and case_id in both runs; the "
             "interval is a 95% paired percentile bootstrap over cases and seeds, "
             f"{line}.", ""]
    if skipped:
        rows += ["Skipped (a newer run has the same task, policy and seed): "
                 + ", ".join(map(markdown_text, skipped)), ""]
    rows += ["## Figures", ""] + [
        f"- [{markdown_text(os.path.relpath(p, out))}]({link(os.path.relpath(p, out))})"
        for p in images]
    rows += ["", "## Conversations", "", "Each run's conversations turn by turn (view.py; "
             "`python view.py RUN RUN` shows runs side by side):", ""]
    rows += [f"- [{markdown_text(s['task'])} {markdown_text(s['policy'])} seed "
             f"{markdown_text(run['seed'])}]({link(run['view'])})"
             for s in summaries for run in s["runs"]]
    return "\n".join(rows) + "\n"


def strategy_rows(summaries):
    rows = ["## Strategy bias", "", "| task | policy | top action | "
            + " | ".join(STRATEGY_FIGURES) + " |", "|---" * (3 + len(STRATEGY_FIGURES)) + "|"]
    for s in summaries:
        figures = s["strategies"]
        top = markdown_text(figures["top action"]) if figures["top action"] else "-"
        rows.append(first_cells(s) + f"{top} | " + " | ".join(
            "-" if figures[h] is None else f"{figures[h]:.3f}" for h in STRATEGY_FIGURES) + " |")
    return rows + ["", "The test's chosen strategies, mean over seeds (test_metrics.json "
                   "`strategies`, docs/users.md): entropy over the task's actions divided by "
                   "log |A| (0: one strategy always, 1: all equally), the most chosen action "
                   "of the seeds' mean distribution and its share there, and the total "
                   "variation and Jensen-Shannon divergence "
                   "(bits) from the labelled human turns of the same cases (-: the data has "
                   "no labels, or no strategy was played). A concentrated distribution can come "
                   "from the policy, the planner's prior or what the simulated user and critic "
                   "rewarded: these figures do not tell which.", ""]


def search_rows(summaries):
    searched = [s for s in summaries if s["search"]]
    if not searched:
        return []
    rows = ["## Search", "", "| task | policy | turns searched | simulated turns / turn "
            "searched | unusable answers / simulated turn | by kind |", "|---" * 6 + "|"]
    for s in searched:
        figures = s["search"]
        per_turn = figures["simulated_turns"] / figures["searched_turns"]
        rate = figures["unusable_per_simulated_turn"]
        kinds = ", ".join(f"{markdown_text(name)} {count:,}" for name, count
                          in sorted(figures["answers_unusable"].items())) or "none"
        rows.append(first_cells(s) + f"{figures['searched_turns']:,} | "
                    f"{per_turn:.1f} | {'-' if rate is None else f'{rate:.2f}'} | {kinds} |")
    return rows + ["", "The MCTS planners' searches in the test, summed over seeds "
                   "(test_metrics.json `search`): the simulated turns they played and the "
                   "LLM answers in them that could not be used (the system's, user's and "
                   "critic's in the simulated turns, the planner's for the trees' priors). A "
                   "search's values are the critic's verdicts on simulated turns (1.0 for a "
                   "success, 0 when no answer was usable) and its prior is the planner's, so its choices carry "
                   "their bias and their unusable answers; these answers are not in the "
                   "unusable column above, which counts the real turns.", ""]


def persona_rows(summaries):
    if not any(s["personas"] for s in summaries):
        return []
    rows = ["## SR and AT per user persona", "",
            "| task | policy | persona | conversations | SR | AT |", "|---" * 6 + "|"]
    for s in summaries:
        for name, figures in s["personas"].items():
            rows.append(first_cells(s) + f"{markdown_text(name)} | {figures['conversations']} | "
                        f"{cell(figures['SR'], '.3f')} | {cell(figures['AT'], '.2f')} |")
    return rows + ["", "The test's conversations by the persona the user simulator was given "
                   "(--user_personas, --test_user_personas; docs/users.md); each cell the mean "
                   "over the seeds that met the persona of each one's mean, its interval a "
                   "bootstrap over that persona's conversations and, with several seeds, "
                   "over seeds. A persona is an instruction to the user LLM, which may "
                   "follow it weakly: these figures measure the "
                   "simulator given that text.", ""]


def page_names(folders):
    """A page name per run folder: its own name, with as many of its parents' names before
    it as make it unique (runs re-judged by one judge are all named rejudged/<judge>)."""
    parts = {folder: os.path.abspath(folder).split(os.sep) for folder in folders}
    names = {}
    for folder, own in parts.items():
        depth = 1
        while depth < len(own) and sum(other[-depth:] == own[-depth:]
                                       for other in parts.values()) > 1:
            depth += 1
        names[folder] = "__".join(own[-depth:]) + ".html"
    return names


def write_views(summaries, out):
    """One view.py page per run tabled, in out/views; its path goes into the summary."""
    import view  # its imports (the critic's rules) load only when a report is written

    runs = [run for summary in summaries for run in summary["runs"]]
    names = page_names([run["folder"] for run in runs])
    for run in runs:
        view.write_page([run["folder"]], os.path.join(out, "views", names[run["folder"]]))
        run["view"] = os.path.join("views", names[run["folder"]])


def output_folder(out):
    if out:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the report folder {out} ({error.strerror}). Pass "
                            "a writable --out") from None
        return out
    base = os.path.join("reports", time.strftime("report_%Y%m%d_%H%M%S"))
    folder, number = base, 1
    while os.path.exists(folder):
        number += 1
        folder = f"{base}_{number}"
    os.makedirs(folder)
    return folder


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders or folders that hold runs")
    parser.add_argument("--out", help="output folder (default reports/report_<time>)")
    parser.add_argument("--n_boot", type=int, default=10000, help="bootstrap resamples")
    parser.add_argument("--judge", default="", help="table each run as re-judged by "
                        "critic_check.py --run (its folder rejudged/JUDGE)")
    args = parser.parse_args(argv)
    if args.n_boot < 1:
        parser.error(f"--n_boot must be positive, got {args.n_boot}")
    try:
        runs = [tabled_run(folder) for folder in rejudged(tabled_folders(args.paths), args.judge)]
        groups, skipped = group_runs(runs)
        images = [p for run in runs for p in plots.plot_run(run["folder"])]
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    summaries = [summarize(task, policy, seeds, args.n_boot)
                 for (task, policy), seeds in groups.items()]
    differences = [{"task": task, "policy": policy, "baseline": BASELINE,
                    **paired_difference(groups[(task, BASELINE)], seeds, args.n_boot)}
                   for (task, policy), seeds in groups.items()
                   if policy != BASELINE and (task, BASELINE) in groups]

    try:
        out = output_folder(args.out)
        write_views(summaries, out)
    except UserError as error:  # a run file that the page cannot read
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    shown = [name for name in ("SR", "AT", "SL") if any(s["metrics"][name] for s in summaries)]
    images.insert(0, plots.plot_summary(summaries, shown, os.path.join(out, "report.png")))
    if any(s["costs"]["LLM tokens / conv."] is not None for s in summaries):
        images.insert(1, plots.plot_cost(summaries, os.path.join(out, "cost.png")))
    if any(s["strategies"]["distribution"] for s in summaries):
        images.append(plots.plot_strategies(summaries, os.path.join(out, "strategies.png")))
    text = markdown(summaries, differences, skipped, images, out, args.n_boot)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"n_boot": args.n_boot, "level": 0.95, "groups": summaries,
                   "paired_differences": differences, "skipped": skipped, "images": images},
                  f, indent=2)
    print(text.split("\n## Figures")[0])
    print(os.path.join(out, "report.md"))
    return os.path.join(out, "report.md")


if __name__ == "__main__":
    one_line_errors(main)
