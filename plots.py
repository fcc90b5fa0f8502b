"""Figures of one run, written as PNG files into the run folder.

    python plots.py runs/esc__exp__1__1700000000

plot_run reads whichever of train_history.jsonl, test_conversations.jsonl and
train_conversations.jsonl exist (run_files.load_run: a file it cannot read is one `error:`
line) and skips the figures it cannot draw, each named on one
line with the reason (a run in test mode has no training history; a policy that made no
gradient update has no TD loss). Each plot_* function takes plain data and writes one PNG.
"""

import os
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

from errors import ArgumentParser, one_line_errors  # noqa: E402
from run_files import TRAIN_HISTORY, conversations_file, load_run  # noqa: E402
from tasks import TASKS  # noqa: E402


def _save(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _panels(x_label, series, path, title):
    """One panel per (label, xs, ys), stacked, sharing the x axis."""
    figure, axes = plt.subplots(len(series), 1, figsize=(6, 2.2 * len(series)), sharex=True,
                                squeeze=False)
    for axis, (label, xs, ys) in zip(axes[:, 0], series):
        axis.plot(xs, ys, marker="." if len(xs) < 50 else None)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x_label)
    axes[0, 0].set_title(title)
    return _save(figure, path)


def plot_valid_curve(evals, path):
    """Validation SR and AT (and SL when logged) against training episodes."""
    names = ["SR", "AT"] + (["SL"] if any("SL" in e for e in evals) else [])
    series = [(name, [e["episode"] for e in evals if name in e],
               [e[name] for e in evals if name in e]) for name in names]
    return _panels("episodes", series, path, "validation")


def plot_td_loss(updates, path):
    steps = [u["step"] for u in updates]
    series = [("TD loss", steps, [u["td_loss"] for u in updates]),
              ("mean Q", steps, [u["q_mean"] for u in updates])]
    return _panels("gradient steps", series, path, "Q-head updates")


def plot_epsilon(steps, path):
    series = [("epsilon", [s["step"] for s in steps], [s["epsilon"] for s in steps])]
    return _panels("environment steps", series, path, "exploration")


def ordered(actions, task):
    """The actions that occur, in the task's order when the task is known."""
    known = TASKS[task].action_names if task in TASKS else []
    present = set(actions)
    return [a for a in known if a in present] + sorted(present - set(known))


def plot_actions(series, order, path):
    """Share of turns per chosen action; `series`: name -> list of actions."""
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(order) * len(series)), 4))
    width = 0.8 / len(series)
    for offset, (name, actions) in enumerate(series.items()):
        counts = Counter(actions)
        shares = [counts[a] / len(actions) for a in order]
        axis.bar([i + offset * width for i in range(len(order))], shares, width, label=name)
    axis.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(order))])
    axis.set_xticklabels(order, rotation=45, ha="right")
    axis.set_ylabel("share of turns")
    axis.set_title("chosen actions")
    axis.legend()
    return _save(figure, path)


def prior_choice_pairs(conversations):
    """(prior's top-1 action, chosen action) per turn that had a strategy, of
    run_files.ConversationRecords."""
    return [(r.note["candidates"][0]["action"], r.action) for c in conversations
            for r in c.records if r.action is not None and r.note.get("candidates")]


def _rate(pairs):
    return sum(top != chosen for top, chosen in pairs) / len(pairs) if pairs else None


def override_rate(conversations):
    """Share of turns where the chosen action is not the prior's top-1, or None."""
    return _rate(prior_choice_pairs(conversations))


def plot_prior_vs_q(pairs, order, path):
    """Counts of prior top-1 (rows) against chosen action (columns)."""
    index = {a: i for i, a in enumerate(order)}
    counts = [[0] * len(order) for _ in order]
    for top, chosen in pairs:
        counts[index[top]][index[chosen]] += 1
    rate = _rate(pairs)
    size = max(4, 0.5 * len(order) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axis, label="turns")
    darkest = max(max(line) for line in counts)
    for row, line in enumerate(counts):
        for column, count in enumerate(line):
            if count:
                axis.text(column, row, count, ha="center", va="center", fontsize=8,
                          color="white" if count > darkest / 2 else "black")
    axis.set_xticks(range(len(order)), order, rotation=45, ha="right")
    axis.set_yticks(range(len(order)), order)
    axis.set_xlabel("chosen action")
    axis.set_ylabel("prior's top-1 action")
    axis.set_title(f"test turns\nchosen differs from prior top-1: {rate:.1%}")
    return _save(figure, path)


def plot_run(run_dir):
    """Write the figures that this run's files allow; returns the paths written. Each
    figure that cannot be drawn is named on one line with the reason."""
    def path(name):
        return os.path.join(run_dir, name)

    def not_drawn(names, reason):
        print(f"figure not drawn: {', '.join(path(name) for name in names)} ({reason})")

    run = load_run(run_dir, history=True)
    written = []
    training = ("valid_curve.png", "td_loss.png", "epsilon.png")
    if run.history is not None:
        history = run.history
        updates = [h for h in history if h.get("kind") == "update"]
        for kind, key, plot, name in (("eval", "SR", plot_valid_curve, "valid_curve.png"),
                                      ("update", "td_loss", plot_td_loss, "td_loss.png"),
                                      ("step", "epsilon", plot_epsilon, "epsilon.png")):
            lines = [h for h in history if h.get("kind") == kind and key in h]
            if lines:
                written.append(plot(lines, path(name)))
            elif kind == "update" and updates:  # PPDPP's REINFORCE, DPDP's actor-critic
                not_drawn([name], "the policy's updates have no TD loss")
            elif kind == "update":
                not_drawn([name], "the policy made no gradient update in training: see "
                          "\"updates\" in test_metrics.json")
            else:
                not_drawn([name], f"train_history.jsonl has no {kind} with {key}")
    else:
        not_drawn(training, f"no {TRAIN_HISTORY}: the run did not train")
    if "test" not in run.conversations:
        not_drawn(("actions.png", "prior_vs_q.png"), f"no {conversations_file('test')}")
        return written
    metrics = run.metrics.get("test", {})
    pairs = prior_choice_pairs(run.conversations["test"])
    series = {"test": [a for _, a in pairs]}
    if "train" in run.conversations:
        series["train"] = [a for _, a in prior_choice_pairs(run.conversations["train"])]
    series = {name: actions for name, actions in series.items() if actions}
    if series:
        order = ordered([a for actions in series.values() for a in actions], metrics.get("task"))
        written.append(plot_actions(series, order, path("actions.png")))
    else:  # the policy "none" chooses no strategy
        not_drawn(["actions.png"], "no turn chose a strategy")
    if pairs:
        order = ordered([a for pair in pairs for a in pair], metrics.get("task"))
        written.append(plot_prior_vs_q(pairs, order, path("prior_vs_q.png")))
        print(f"{run_dir}: chosen action differs from the prior's top-1 in "
              f"{_rate(pairs):.1%} of test turns{trained_note(metrics)}")
    else:
        not_drawn(["prior_vs_q.png"], "no test turn chose a strategy")
    return written


def trained_note(metrics):
    """", by an untrained policy (0 gradient updates)" when test_metrics.json says that the
    tested policy is undertrained, else ""."""
    if not metrics.get("undertrained"):
        return ""
    if metrics.get("supervised_stage"):
        return (f", by a policy with {metrics['updates']} self-play updates after its "
                "supervised stage")
    state = "untrained" if metrics["updates"] == 0 else "undertrained"
    return f", by an {state} policy ({metrics['updates']} gradient updates in training)"


def _spans(figures):
    """Centres and half widths that draw each {mean, low, high}'s interval as it is: an
    error bar about the mean would need the mean inside it, which a percentile interval of
    few resamples need not hold."""
    return ([(f["low"] + f["high"]) / 2 for f in figures],
            [(f["high"] - f["low"]) / 2 for f in figures])


def plot_summary(groups, metrics, path):
    """Bars with their intervals, one panel per metric, bars grouped by task, one colour
    per policy. `groups`: dicts with task, policy and metrics[name] = {mean, low, high}
    (None where the metric does not apply)."""
    policies = sorted({g["policy"] for g in groups})
    figures = {(g["task"], g["policy"]): g["metrics"] for g in groups}
    width = 0.8 / len(policies)
    figure, axes = plt.subplots(1, len(metrics), figsize=(1 + 4 * len(metrics), 3.5),
                                squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        tasks = sorted({g["task"] for g in groups if g["metrics"].get(metric)})
        for number, policy in enumerate(policies):
            xs, values = [], []
            for column, task in enumerate(tasks):
                value = figures.get((task, policy), {}).get(metric)
                if value is not None:
                    xs.append(column + number * width)
                    values.append(value)
            axis.bar(xs, [value["mean"] for value in values], width, color=f"C{number % 10}",
                     label=policy)
            centres, halves = _spans(values)
            axis.errorbar(xs, centres, yerr=halves, fmt="none", capsize=3, ecolor="black")
        axis.set_xticks([c + width * (len(policies) - 1) / 2 for c in range(len(tasks))], tasks)
        axis.set_title(metric)
        axis.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()  # every policy has an SR
    axes[0, -1].legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(figure, path)


def plot_cost(groups, path, tokens="LLM tokens / conv."):
    """SR (with its interval) against the LLM tokens a conversation cost, one point per
    policy, one panel per task: what a planner buys with its extra LLM calls. `groups`:
    report.py's summaries (metrics["SR"], costs[tokens]); a policy without a token
    count is left out, and one whose count holds the unread prior (cost_before_unread_prior)
    is marked "*", as in the cost table."""
    tasks = sorted({g["task"] for g in groups})
    policies = sorted({g["policy"] for g in groups})
    figure, axes = plt.subplots(1, len(tasks), figsize=(1 + 4.5 * len(tasks), 3.8),
                                squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for g in groups:
            if g["task"] != task or g["costs"].get(tokens) is None:
                continue
            sr = g["metrics"]["SR"]
            colour = f"C{policies.index(g['policy']) % 10}"
            name = g["policy"] + ("*" if g.get("cost_before_unread_prior") else "")
            centres, halves = _spans([sr])
            axis.errorbar([g["costs"][tokens]], centres, yerr=halves, fmt="none", capsize=3,
                          color=colour)
            axis.plot([g["costs"][tokens]], [sr["mean"]], marker="o", color=colour, label=name)
            axis.annotate(name, (g["costs"][tokens], sr["mean"]), fontsize=8,
                          xytext=(4, 4), textcoords="offset points")
        axis.set_xscale("log")  # planners' costs differ by orders of magnitude (MCTS)
        axis.set_xlabel("LLM tokens per conversation (prompt + generated)")
        axis.set_ylabel("SR")
        axis.set_title(task)
        axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_strategies(groups, path):
    """The share of each action in the test's chosen strategies, one bar per policy and
    one for the labelled human turns of the same cases where the data has them, one panel
    per task (report.py's summaries: strategies["distribution"], ["human distribution"])."""
    tasks = sorted({g["task"] for g in groups if g["strategies"]["distribution"]})
    figure, axes = plt.subplots(1, len(tasks), figsize=(1 + 5.5 * len(tasks), 5),
                                squeeze=False)
    for axis, task in zip(axes[0], tasks):
        rows = [(g["policy"], g["strategies"]["distribution"]) for g in groups
                if g["task"] == task and g["strategies"]["distribution"]]
        human = next((g["strategies"]["human distribution"] for g in groups
                      if g["task"] == task and g["strategies"]["human distribution"]), None)
        if human:
            rows.append(("human (data)", human))
        actions = list(rows[0][1])
        height = 0.8 / len(rows)
        for k, (name, shares) in enumerate(rows):
            axis.barh([i + k * height for i in range(len(actions))],
                      [shares.get(a, 0.0) for a in actions], height=height, label=name,
                      color="0.3" if name == "human (data)" else f"C{k % 10}")
        axis.set_yticks([i + 0.4 - height / 2 for i in range(len(actions))])
        axis.set_yticklabels(actions, fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("share of the test's turns")
        axis.set_title(task)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3, axis="x")
    return _save(figure, path)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    for folder in parser.parse_args(argv).runs:
        for written_path in plot_run(folder):
            print(written_path)


if __name__ == "__main__":
    one_line_errors(main)
