"""stats.py, plots.py and report.py on run folders written here in the trainer's format."""

import json
import os
import random
import re

import matplotlib.axes
import numpy as np
import pytest

import plots
import report
import run_files
import train_model
from get_args import Args
from stats import bootstrap_ci, paired_bootstrap_ci
from tasks import TASKS

PNG = b"\x89PNG\r\n\x1a\n"


def conversation(case_id, success, pairs, rng, sale_to_list=None, critic_invalid=0):
    """One line of *_conversations.jsonl; `pairs`: (prior's top-1, chosen) per turn, or
    (None, None) for the policy "none"."""
    records = []
    for turn, (top, chosen) in enumerate(pairs, start=1):
        others = [a for a in dict.fromkeys([chosen, "Others", "Self-disclosure"]) if a != top]
        candidates = [] if top is None else [
            {"action": action, "prior": prior, "q": round(rng.random(), 4)}
            for action, prior in zip([top] + others[:2], (0.5, 0.3, 0.2))]
        records.append({"turn": turn, "action": chosen, "candidates": candidates,
                        "explored": False, "reward": 0.5, "critic_invalid": critic_invalid})
    return {"case_id": case_id, "case": {}, "turns": [], "emotions": [],
            "outcome": "success" if success else "time limit", "system_turns": len(pairs),
            "total_reward": round(rng.uniform(-1, 1), 3), "sale_to_list": sale_to_list,
            "records": records}


def random_conversations(task, outcomes, rng, max_turn=4, policy="dialogxpert"):
    actions = TASKS[task].action_names
    result = []
    for case_id, success in enumerate(outcomes):
        turns = rng.randint(1, max_turn) if success else max_turn
        pairs = ([(None, None)] * turns if policy == "none" else
                 [(rng.choice(actions), rng.choice(actions)) for _ in range(turns)])
        result.append(conversation(case_id, success, pairs, rng,
                                   # a failed bargain may still carry a price: SL counts it 0
                                   sale_to_list=round(rng.random(), 3) if task == "cb" else None,
                                   critic_invalid=rng.randint(0, 2)))
    return result


def write_jsonl(path, lines):
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def write_run(parent, task, policy, seed, conversations, max_turn=4, train=None, extra=None):
    """A run folder as train_model.py writes it; `train`: train conversations, which also
    adds a training history; `extra`: more test metrics."""
    folder = os.path.join(parent, f"{task}__{policy}__{seed}__1700000000")
    os.makedirs(folder)
    n = len(conversations)
    metrics = {"task": task, "policy": policy, "seed": seed, "max_turn": max_turn,
               "episodes": n, "SR": sum(c["outcome"] == "success" for c in conversations) / n,
               "AT": 0.0, "mean_return": 0.0, "llm_answers_unusable": {"critic_invalid": 3}}
    if task == "cb":
        metrics["SL"] = 0.0
    metrics |= extra or {}
    with open(os.path.join(folder, "test_metrics.json"), "w") as f:
        json.dump(metrics, f)
    write_jsonl(os.path.join(folder, "test_conversations.jsonl"), conversations)
    if train is not None:
        write_jsonl(os.path.join(folder, "train_conversations.jsonl"), train)
        history = [{"kind": "step", "step": s, "epsilon": 1 - s / 20} for s in range(1, 20)]
        history += [{"kind": "update", "step": s, "td_loss": 1 / s, "q_mean": s / 10}
                    for s in range(1, 10)]
        history += [{"kind": "eval", "episode": e, "SR": e / 40, "AT": 4 - e / 10}
                    for e in (8, 16, 24)]
        write_jsonl(os.path.join(folder, "train_history.jsonl"), history)
    return folder


@pytest.fixture
def runs_root(tmp_path):
    """Two tasks (one cb), two policies and two seeds on esc, every run on the same cases."""
    rng = random.Random(0)
    root = tmp_path / "runs"
    for seed in (1, 2):
        for policy, p in (("dialogxpert", 0.7), ("prior", 0.4)):
            outcomes = [rng.random() < p for _ in range(12)]
            write_run(root, "esc", policy, seed, random_conversations("esc", outcomes, rng))
    for policy in ("dialogxpert", "none"):
        outcomes = [rng.random() < 0.5 for _ in range(10)]
        write_run(root, "cb", policy, 1, random_conversations("cb", outcomes, rng, policy=policy))
    return root


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


# ---- stats ----------------------------------------------------------------------------

def test_constant_values_give_a_zero_width_interval():
    assert bootstrap_ci([[0.25] * 50]) == (0.25, 0.25, 0.25)
    assert bootstrap_ci([[2.0] * 5, [2.0] * 9]) == (2.0, 2.0, 2.0)
    assert bootstrap_ci([[3.5]]) == (3.5, 3.5, 3.5)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="no values"):
        bootstrap_ci([[1.0], []])


def test_bernoulli_interval_has_the_binomial_width():
    sample = (np.random.default_rng(1).random(2000) < 0.3).astype(float)
    mean, low, high = bootstrap_ci([sample.tolist()])
    assert mean == sample.mean() and low < mean < high
    half_width = 1.96 * np.sqrt(mean * (1 - mean) / len(sample))
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    assert bootstrap_ci([sample.tolist()], seed=3) == bootstrap_ci([sample.tolist()], seed=3)


def test_seeds_that_disagree_widen_the_interval_and_seeds_that_agree_do_not():
    rng = np.random.default_rng(2)
    groups = [(rng.random(200) < p).astype(float).tolist() for p in (0.2, 0.5, 0.8)]
    mean, low, high = bootstrap_ci(groups)
    pooled_mean, pooled_low, pooled_high = bootstrap_ci([sum(groups, [])])
    assert mean == pytest.approx(pooled_mean)
    assert high - low > 3 * (pooled_high - pooled_low)
    # two seeds with the same values: a seed drawn twice gets two independent resamples,
    # so the interval is that of the pooled values
    _, low, high = bootstrap_ci([groups[0], groups[0]])
    _, pooled_low, pooled_high = bootstrap_ci([groups[0] * 2])
    assert high - low == pytest.approx(pooled_high - pooled_low, rel=0.1)


def test_seeds_on_the_same_cases_share_one_resample_of_cases():
    """Four seeds that played the same 200 cases, whose outcome is the case's own: the
    seeds add no information about the cases, so the crossed interval is as wide as one
    seed's; resampling each seed's cases on its own would halve it (sqrt of 4 seeds)."""
    rng = np.random.default_rng(5)
    cases = (rng.random(200) < 0.4).astype(float)
    groups = [cases.tolist()] * 4
    _, low, high = bootstrap_ci(groups, crossed=True)
    _, one_low, one_high = bootstrap_ci([cases.tolist()])
    _, nested_low, nested_high = bootstrap_ci(groups)
    assert high - low == pytest.approx(one_high - one_low, rel=0.1)
    assert nested_high - nested_low < 0.7 * (high - low)
    with pytest.raises(ValueError, match="same cases"):
        bootstrap_ci([[1.0, 0.0], [1.0]], crossed=True)


def test_interval_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    covered = 0
    for trial in range(200):
        sample = (rng.random(100) < 0.3).astype(float)
        _, low, high = bootstrap_ci([sample], n_boot=2000, seed=trial)
        covered += low <= 0.3 <= high
    assert 180 <= covered <= 198


def test_paired_differences():
    rng = np.random.default_rng(4)
    b = [(rng.integers(0, 8, size=30) / 8).tolist(), (rng.integers(0, 8, size=20) / 4).tolist()]
    assert paired_bootstrap_ci(b, b) == (0.0, 0.0, 0.0)
    assert paired_bootstrap_ci([[x + 1 for x in g] for g in b], b) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="seed 1"):
        paired_bootstrap_ci(b, [b[0], b[1][:-1]])


# ---- plots ----------------------------------------------------------------------------

def test_plot_run_writes_every_figure_of_a_training_run(tmp_path):
    rng = random.Random(5)
    folder = write_run(tmp_path, "esc", "dialogxpert", 1,
                       random_conversations("esc", [True, False, True], rng),
                       train=random_conversations("esc", [False, True], rng))
    written = plots.plot_run(folder)
    names = ["valid_curve.png", "td_loss.png", "epsilon.png", "actions.png", "prior_vs_q.png"]
    assert written == [os.path.join(folder, name) for name in names]
    assert all(is_png(path) for path in written)


def test_plot_run_of_a_test_run_and_the_override_rate(tmp_path):
    rng = random.Random(6)
    conversations = [
        conversation(0, True, [("Question", "Question"), ("Question", "Others")], rng),
        conversation(1, False, [("Others", "Others"), ("Information", "Question"),
                                ("Question", "Question")], rng)]
    folder = write_run(tmp_path, "esc", "dialogxpert", 1, conversations)
    written = plots.plot_run(folder)
    assert [os.path.basename(p) for p in written] == ["actions.png", "prior_vs_q.png"]
    assert all(is_png(path) for path in written)
    assert plots.override_rate([run_files.ConversationRecord.from_dict(c)
                                for c in conversations]) == 2 / 5

    silent = write_run(tmp_path / "none", "esc", "none", 1,
                       [conversation(0, True, [(None, None)], rng)])
    assert plots.plot_run(silent) == [] and plots.override_rate(
        run_files.read_conversations(os.path.join(silent, "test_conversations.jsonl"))) is None


def test_each_figure_that_cannot_be_drawn_is_named_with_the_reason(tmp_path, capsys):
    rng = random.Random(8)
    folder = write_run(tmp_path, "esc", "ppdpp", 1, random_conversations("esc", [True], rng),
                       train=random_conversations("esc", [False], rng))
    history = os.path.join(folder, "train_history.jsonl")
    lines = run_files.read_jsonl(history)
    # REINFORCE's updates, then none at all
    for updates, reason in (([{"kind": "update", "step": 1, "pg_loss": 0.3}],
                             "the policy's updates have no TD loss"),
                            ([], "the policy made no gradient update in training")):
        write_jsonl(history, [h for h in lines if h["kind"] != "update"] + updates)
        assert "td_loss.png" not in " ".join(plots.plot_run(folder))
        printed = capsys.readouterr().out
        assert f"figure not drawn: {os.path.join(folder, 'td_loss.png')} ({reason}" in printed
    os.remove(history)  # a test run: no training figure
    plots.plot_run(folder)
    assert "valid_curve.png, " in capsys.readouterr().out.split("figure not drawn: ")[1]
    silent = write_run(tmp_path / "none", "esc", "none", 1,
                       random_conversations("esc", [True], rng, policy="none"))
    plots.plot_run(silent)
    printed = capsys.readouterr().out
    for name in ("actions.png", "prior_vs_q.png"):
        assert f"figure not drawn: {os.path.join(silent, name)} (no " in printed
    assert printed.count("\n") == 3  # one line per reason


# ---- report ---------------------------------------------------------------------------

def test_report_of_two_policies_on_the_same_cases(tmp_path):
    rng = random.Random(7)
    write_run(tmp_path / "runs", "esc", "dialogxpert", 1,
              random_conversations("esc", [True, True, False, True], rng))
    write_run(tmp_path / "runs", "esc", "prior", 1,
              random_conversations("esc", [True, False, False, False], rng))
    out = tmp_path / "report"
    report.main([str(tmp_path / "runs"), "--out", str(out), "--n_boot", "2000"])
    text = (out / "report.md").read_text()
    assert "| esc | dialogxpert | 1 | 4 | 0.750 [" in text
    assert "| esc | prior | 1 | 4 | 0.250 [" in text
    assert "| esc | prior | 1 | 4 | 0.500 [" in text  # the paired row: seeds, pairs, SR
    figures = json.loads((out / "report.json").read_text())
    sr = {g["policy"]: g["metrics"]["SR"]["mean"] for g in figures["groups"]}
    assert sr == {"dialogxpert": 0.75, "prior": 0.25}
    assert figures["paired_differences"][0]["SR"]["mean"] == 0.5
    assert figures["groups"][0]["metrics"]["SL"] is None
    assert is_png(out / "report.png")
    for run in (tmp_path / "runs").iterdir():
        assert is_png(run / "actions.png") and is_png(run / "prior_vs_q.png")
        assert str(run / "actions.png") in figures["images"]


def test_a_mean_outside_its_interval_is_drawn(tmp_path):
    """With few resamples the mean of the seeds' means can lie outside the percentile
    interval (one resample: the interval is that resample's mean): the figures draw the
    interval as it is, and the report is written."""
    rng = random.Random(6)
    for policy, outcomes in (("dialogxpert", [True, False, True, True, False]),
                             ("prior", [False, False, True, False, False])):
        write_run(tmp_path / "runs", "esc", policy, 1, random_conversations("esc", outcomes, rng),
                  extra={"cost": {"per_conversation": {"total": {"tokens": 50.0}}}})
    out = tmp_path / "report"
    report.main([str(tmp_path / "runs"), "--out", str(out), "--n_boot", "1"])
    groups = json.loads((out / "report.json").read_text())["groups"]
    assert any(not g["metrics"]["SR"]["low"] <= g["metrics"]["SR"]["mean"]
               <= g["metrics"]["SR"]["high"] for g in groups)
    assert is_png(out / "report.png") and is_png(out / "cost.png")


def test_the_search_table_sums_the_seeds_searches(tmp_path):
    rng = random.Random(3)
    searches = {1: {"searched_turns": 10, "simulated_turns": 100,
                    "answers_unusable": {"critic_invalid": 5, "planner": 3}},
                2: {"searched_turns": 6, "simulated_turns": 50,
                    "answers_unusable": {"critic_invalid": 1}}}
    for seed, search in searches.items():
        conversations = random_conversations("esc", [True, False, True], random.Random(5),
                                             policy="gdpzero")
        write_run(tmp_path / "runs", "esc", "gdpzero", seed, conversations,
                  extra={"search": search})
    write_run(tmp_path / "runs", "esc", "dialogxpert", 1,
              random_conversations("esc", [True, False, True], rng))
    out = tmp_path / "report"
    report.main([str(tmp_path / "runs"), "--out", str(out), "--n_boot", "200"])
    text = (out / "report.md").read_text()
    section = text.split("## Search")[1].split("\n## ")[0]
    assert "| esc | gdpzero | 16 | 9.4 | 0.06 | critic_invalid 6, planner 3 |" in section
    assert "dialogxpert" not in section  # it searched nothing
    groups = {g["policy"]: g for g in json.loads((out / "report.json").read_text())["groups"]}
    assert groups["gdpzero"]["search"]["simulated_turns"] == 150
    assert groups["dialogxpert"]["search"] is None


def test_a_cost_older_than_the_unread_prior_is_marked(tmp_path, monkeypatch):
    """A policy that does not read the prior, from a run whose cost has no unread_prior
    part, counted that prior in its total: its cost row and its point in cost.png say so."""
    labels = []
    annotate = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", lambda axis, text, *args, **kwargs:
                        labels.append(text) or annotate(axis, text, *args, **kwargs))
    def cost(unread):
        parts = {"total": {"tokens": 100.0}} | ({"unread_prior": {"tokens": 40.0}} if unread
                                               else {})
        return {"cost": {"per_conversation": parts, "planner_share": 0.1}}
    for policy, unread in (("ppdpp", False), ("gdpzero", True), ("dialogxpert", False)):
        write_run(tmp_path / "runs", "esc", policy, 1,
                  random_conversations("esc", [True, False], random.Random(1), policy=policy),
                  extra=cost(unread))
    out = tmp_path / "report"
    report.main([str(tmp_path / "runs"), "--out", str(out), "--n_boot", "200"])
    rows = (out / "report.md").read_text().split("## Cost")[1].split("\n\n")[1]
    assert "| esc | ppdpp* | 100 |" in rows
    assert "| esc | gdpzero | 100 |" in rows and "| esc | dialogxpert | 100 |" in rows
    assert sorted(labels) == ["dialogxpert", "gdpzero", "ppdpp*"]


def test_the_top_share_is_the_share_of_the_top_action():
    """Seeds whose most chosen actions differ: the row's top action is that of the seeds'
    mean distribution, and its share is that action's share there, not the mean of each
    seed's own top share."""
    def strategies(distribution):
        top = max(distribution, key=distribution.get)
        return {"entropy": 0.5, "top_action": top, "top_share": distribution[top],
                "distribution": distribution, "human": None}
    runs = [{"strategies": strategies({"A": 0.6, "B": 0.3, "C": 0.1})},
            {"strategies": strategies({"A": 0.3, "B": 0.5, "C": 0.2})}]
    figures = report.strategy_figures(runs)
    assert figures["top action"] == "A" and figures["distribution"]["A"] == pytest.approx(0.45)
    assert figures["top share"] == pytest.approx(0.45)
    assert figures["entropy"] == 0.5 and figures["TV from human"] is None
    assert report.strategy_figures([{"strategies": None}])["top share"] is None


def test_runs_of_one_policy_at_other_settings_are_tabled_apart(tmp_path):
    """GDP-Zero at 5 and at 20 (the default) simulations, same seed and cases: two rows,
    each paired with dialogxpert, none skipped."""
    def settings(simulations):
        return {"policy_settings": {"mcts_simulations": simulations, "mcts_realizations": 3,
                                    "mcts_q0": 0.0, "mcts_cpuct": 1.0, "mcts_parallel": 1}}
    for parent, policy, extra, outcomes in (
            ("sims5", "gdpzero", settings(5), [False, False, True]),
            ("sims20", "gdpzero", settings(20), [True, True, True]),
            ("base", "dialogxpert", {}, [True, False, True])):
        conversations = random_conversations("esc", outcomes, random.Random(2), policy=policy)
        write_run(tmp_path / "runs" / parent, "esc", policy, 1, conversations, extra=extra)
    out = tmp_path / "report"
    report.main([str(tmp_path / "runs"), "--out", str(out), "--n_boot", "200"])
    text = (out / "report.md").read_text()
    assert "| esc | gdpzero | 1 | 3 | 1.000 [" in text
    assert "| esc | gdpzero (mcts_simulations 5) | 1 | 3 | 0.333 [" in text
    assert "Skipped" not in text
    pairs = json.loads((out / "report.json").read_text())["paired_differences"]
    assert {d["policy"] for d in pairs} == {"gdpzero", "gdpzero (mcts_simulations 5)"}


def test_report_over_tasks_seeds_and_cb(runs_root, tmp_path):
    out = tmp_path / "report"
    report.main([str(runs_root), "--out", str(out)])
    figures = json.loads((out / "report.json").read_text())
    groups = {(g["task"], g["policy"]): g for g in figures["groups"]}
    assert sorted(groups) == [("cb", "dialogxpert"), ("cb", "none"),
                              ("esc", "dialogxpert"), ("esc", "prior")]
    # by hand: the mean over seeds of each seed's mean
    for (task, policy), group in groups.items():
        per_seed = {"SR": [], "AT": [], "SL": [], "unusable": []}
        for run in group["runs"]:
            lines = run_files.read_jsonl(os.path.join(run["folder"], "test_conversations.jsonl"))
            success = [c["outcome"] == "success" for c in lines]
            per_seed["SR"].append(np.mean(success))
            per_seed["AT"].append(np.mean([c["system_turns"] if ok else 4
                                           for c, ok in zip(lines, success)]))
            per_seed["SL"].append(np.mean([(c["sale_to_list"] or 0.0) if ok else 0.0
                                           for c, ok in zip(lines, success)]))
            per_seed["unusable"].append(np.mean([sum(r["critic_invalid"] for r in c["records"])
                                                 for c in lines]))
        for name in ("SR", "AT", "unusable") + (("SL",) if task == "cb" else ()):
            assert group["metrics"][name]["mean"] == pytest.approx(np.mean(per_seed[name]))
    assert [len(groups[("esc", p)]["runs"]) for p in ("dialogxpert", "prior")] == [2, 2]
    paired = {(d["task"], d["policy"]): d for d in figures["paired_differences"]}
    assert paired[("esc", "prior")]["pairs"] == 24 and paired[("cb", "none")]["pairs"] == 10
    text = (out / "report.md").read_text()
    assert "| cb | none | 1 | 10 | " in text  # no strategy, no action plots, still a row
    esc_row = next(line for line in text.splitlines() if line.startswith("| esc | prior | 2 |"))
    assert esc_row.split(" | ")[6] == "-"  # SL only for cb
    assert "10,000 resamples" in text


def test_a_replayed_seed_counts_once_and_pairs_go_by_case_id(tmp_path):
    rng = random.Random(9)
    old = write_run(tmp_path / "train", "esc", "dialogxpert", 1,
                    random_conversations("esc", [True, False], rng))
    new = write_run(tmp_path / "test", "esc", "dialogxpert", 1,
                    random_conversations("esc", [False, False, True], rng))
    os.utime(os.path.join(old, "test_metrics.json"), (1, 1))
    # cases 2 and 0, in that order, with the outcomes the baseline had on them
    other_lines = [conversation(2, True, [("Question", "Question")], rng),
                   conversation(0, False, [("Question", "Question")] * 4, rng)]
    other = write_run(tmp_path / "other", "esc", "prior", 1, other_lines)
    runs = [report.tabled_run(f) for f in report.tabled_folders([str(tmp_path)])]
    groups, skipped = report.group_runs(runs)
    assert [run["folder"] for run in groups[("esc", "dialogxpert")].values()] == [new]
    assert skipped == [old]
    paired = report.paired_difference(groups[("esc", "dialogxpert")], groups[("esc", "prior")],
                                      n_boot=100)
    assert paired["seeds"] == [1] and paired["pairs"] == 2 and paired["SR"]["mean"] == 0.0

    for line in other_lines:
        line["case_id"] += 10
    write_jsonl(os.path.join(other, "test_conversations.jsonl"), other_lines)
    groups, _ = report.group_runs([report.tabled_run(new), report.tabled_run(other)])
    unpaired = report.paired_difference(groups[("esc", "dialogxpert")],
                                        groups[("esc", "prior")], n_boot=100)
    assert unpaired == {"seeds": [], "pairs": 0, "SR": None, "mean_return": None}


def seed_runs(root, counts, personas=False):
    """dialogxpert and prior runs of esc, one per seed, seed s on counts[s] cases (so that
    the seeds' cases differ); their folders."""
    rng = random.Random(11)
    folders = []
    for seed, count in counts.items():
        for policy, p in (("dialogxpert", 0.6), ("prior", 0.4)):
            lines = random_conversations("esc", [rng.random() < p for _ in range(count)], rng)
            for line in lines if personas else ():
                line["persona"] = {"name": rng.choice(["calm", "curt"])}
            folders.append(write_run(root, "esc", policy, seed, lines))
    return folders


def tabled_figures(root, n_boot=300):
    """The summaries' figures and the paired differences of the runs under root."""
    groups, _ = report.group_runs([report.tabled_run(f) for f in report.tabled_folders([root])])
    summaries = [report.summarize(task, policy, seeds, n_boot)
                 for (task, policy), seeds in groups.items()]
    paired = report.paired_difference(groups[("esc", "dialogxpert")], groups[("esc", "prior")],
                                      n_boot)
    return [(s["metrics"], s["personas"]) for s in summaries], paired


def test_the_intervals_do_not_depend_on_which_run_was_written_last(tmp_path):
    """A copy of the runs that does not keep their file times (cp without -p) gives the
    same report: the seeds enter the bootstrap in the order of their numbers."""
    folders = seed_runs(tmp_path / "runs", {1: 9, 2: 12, 3: 15})
    figures = []
    for order in (folders, folders[::-1]):
        for moment, folder in enumerate(order):
            os.utime(os.path.join(folder, "test_metrics.json"), (1000 + moment, 1000 + moment))
        figures.append(tabled_figures(str(tmp_path / "runs")))
    assert figures[0] == figures[1]


def test_the_figures_do_not_depend_on_the_order_of_a_run_s_lines(tmp_path):
    """Conversations written in another order (a batch that finished in another order)
    give the same figures, per persona too: a run's values are taken in case_id order."""
    folders = seed_runs(tmp_path / "runs", {1: 9, 2: 12}, personas=True)
    before = tabled_figures(str(tmp_path / "runs"))
    for folder in folders:
        path = os.path.join(folder, "test_conversations.jsonl")
        write_jsonl(path, run_files.read_jsonl(path)[::-1])
    assert tabled_figures(str(tmp_path / "runs")) == before


def test_default_output_folder_gets_a_suffix_when_it_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = report.output_folder(None), report.output_folder(None)
    assert os.path.isdir(first) and os.path.isdir(second)
    assert first.startswith(os.path.join("reports", "report_")) and second != first


def test_runs_of_different_setups_are_not_mixed(tmp_path, capsys):
    rng = random.Random(7)
    for policy, data_dir in (("dialogxpert", "data"), ("prior", "data/demo")):
        folder = write_run(tmp_path / "runs", "esc", policy, 1,
                           random_conversations("esc", [True, False], rng))
        path = os.path.join(folder, "test_metrics.json")
        metrics = json.load(open(path)) | {"config": {"data_dir": data_dir}}
        json.dump(metrics, open(path, "w"))
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "differ in --data_dir ('data' and 'data/demo')" in error
    assert "\n" not in error


def write_setup_runs(root, task, configs):
    """One run per config (a test_metrics.json "config"), each of another policy."""
    rng = random.Random(9)
    for policy, config in zip(("dialogxpert", "prior", "random"), configs):
        folder = write_run(root, task, policy, 1, random_conversations(task, [True, False], rng))
        path = os.path.join(folder, "test_metrics.json")
        json.dump(json.load(open(path)) | {"config": config}, open(path, "w"))


def setup_of(task, **flags):
    """The config that train_model writes for a run of these flags."""
    return train_model.evaluation_config(Args(data_name=task, **flags), TASKS[task])


@pytest.mark.parametrize("cap", ["system_max_new_tokens", "user_max_new_tokens",
                                 "critic_max_new_tokens", "prior_max_new_tokens"])
def test_runs_with_other_answer_caps_are_not_pooled(cap, tmp_path, capsys):
    write_setup_runs(tmp_path / "runs", "esc", [setup_of("esc"), setup_of("esc", **{cap: 8})])
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--n_boot", "10"])
    error = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in error
    assert f"differ in --{cap} ({getattr(Args(), cap)} and 8)" in error


def test_a_flag_an_older_run_did_not_record_counts_as_its_default(tmp_path, capsys):
    older = {k: v for k, v in setup_of("esc").items() if k != "user_max_new_tokens"}
    write_setup_runs(tmp_path / "same", "esc", [older, setup_of("esc")])
    report.main([str(tmp_path / "same"), "--out", str(tmp_path / "out"), "--n_boot", "10"])
    write_setup_runs(tmp_path / "other", "esc", [older, setup_of("esc", user_max_new_tokens=8)])
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "other"), "--out", str(tmp_path / "out"), "--n_boot", "10"])
    assert "differ in --user_max_new_tokens (60 and 8)" in capsys.readouterr().err


def test_an_older_run_s_unrecorded_flag_is_read_from_its_checkpoint_s_arguments(tmp_path, capsys):
    """A run whose config predates a flag, but whose best.pt.json saved the flag's value
    (8-token user answers), does not pool with a default run."""
    older = {k: v for k, v in setup_of("esc").items() if k != "user_max_new_tokens"}
    write_setup_runs(tmp_path / "runs", "esc", [older, setup_of("esc")])
    folder = next(os.path.join(root, name) for root, names, _ in os.walk(tmp_path / "runs")
                  for name in names if "dialogxpert" in name)
    with open(os.path.join(folder, "best.pt.json"), "w") as f:
        json.dump({"args": vars(Args(user_max_new_tokens=8, learning_rate=0.5))}, f)
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--n_boot", "10"])
    assert "differ in --user_max_new_tokens (8 and 60)" in capsys.readouterr().err


def write_trained_seeds(root, policy, trained):
    """Seeds 1, 2, ... of one policy on esc, each with a last.pt.json of these arguments."""
    rng = random.Random(5)
    for seed, flags in enumerate(trained, start=1):
        folder = write_run(root, "esc", policy, seed, random_conversations(
            "esc", [True, False], rng, policy=policy), extra={"config": setup_of("esc")})
        with open(os.path.join(folder, "last.pt.json"), "w") as f:
            json.dump({"args": vars(Args(seed=seed, **flags))}, f)


@pytest.mark.parametrize("policy, flag, value", [("dialogxpert", "total_episodes", 16),
                                                 ("dialogxpert", "learning_rate", 1e-3),
                                                 ("ppdpp", "ppdpp_learning_rate", 1e-3)])
def test_seeds_trained_with_other_training_flags_are_not_pooled(policy, flag, value, tmp_path,
                                                                capsys):
    write_trained_seeds(tmp_path / "same", policy, [{flag: value}, {flag: value}])
    report.main([str(tmp_path / "same"), "--out", str(tmp_path / "out"), "--n_boot", "10"])
    write_trained_seeds(tmp_path / "other", policy, [{}, {flag: value}])
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path / "other"), "--out", str(tmp_path / "out2"), "--n_boot", "10"])
    error = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in error and error.startswith("error: ")
    assert (f"are {policy} runs of esc trained with other --{flag} "
            f"({getattr(Args(), flag)!r} and {value!r})") in error


def test_a_replay_is_compared_by_the_training_of_the_checkpoint_it_tested(tmp_path, capsys):
    """A test of a checkpoint has no sidecar of its own: its checkpoint's arguments count."""
    write_trained_seeds(tmp_path / "runs", "dialogxpert", [{}])
    checkpoint = tmp_path / "elsewhere" / "best.pt"
    os.makedirs(checkpoint.parent)
    with open(f"{checkpoint}.json", "w") as f:
        json.dump({"args": vars(Args(seed=2, total_episodes=16))}, f)
    write_run(tmp_path / "runs", "esc", "dialogxpert", 2, random_conversations(
        "esc", [True, False], random.Random(6)), extra={"config": setup_of("esc"),
                                                        "checkpoint": str(checkpoint)})
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--n_boot", "10"])
    assert "trained with other --total_episodes (200 and 16)" in capsys.readouterr().err


def test_a_flag_the_policy_does_not_train_with_does_not_split_its_seeds(tmp_path):
    """dialogxpert reads no PPDPP flag: seeds that differ in one pool."""
    write_trained_seeds(tmp_path / "runs", "dialogxpert", [{}, {"ppdpp_learning_rate": 1e-3}])
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--n_boot", "10"])


def test_a_data_setting_of_another_task_does_not_split_runs(tmp_path, capsys):
    """--extes_split chooses ExTES's cases only: esc runs that differ in it pool, whether
    their config leaves it out (as now) or holds it (runs before Task.data_flags)."""
    split = {"extes_split": "10717,200,200"}
    recorded_for_every_task = setup_of("esc", **split) | split | {"extes_seed": 0}
    write_setup_runs(tmp_path / "esc", "esc", [setup_of("esc"), setup_of("esc", **split),
                                              recorded_for_every_task])
    out = report.main([str(tmp_path / "esc"), "--out", str(tmp_path / "out"), "--n_boot", "10"])
    assert "| esc | random | 1 |" in open(out).read()
    write_setup_runs(tmp_path / "extes", "extes", [setup_of("extes"), setup_of("extes", **split)])
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "extes"), "--out", str(tmp_path / "out2"), "--n_boot", "10"])
    assert "differ in --extes_split ('0.8,0.1,0.1' and '10717,200,200')" in capsys.readouterr().err


def test_report_without_runs_or_with_broken_json_exits_with_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: no run folder")

    folder = write_run(tmp_path / "runs", "esc", "prior", 1,
                       random_conversations("esc", [True], random.Random(8)))
    with open(os.path.join(folder, "test_conversations.jsonl"), "a") as f:
        f.write("{not json\n")
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(error) == 1 and "test_conversations.jsonl" in error[0]
    assert not (tmp_path / "out").exists()


def test_a_case_played_twice_in_one_run_is_one_error_line(tmp_path, capsys):
    """Pairs go by case_id: a run with a case_id twice (lines of two tests appended into
    one file) would pair one of its conversations and drop the other unseen."""
    rng = random.Random(4)
    write_run(tmp_path / "runs", "esc", "dialogxpert", 1,
              random_conversations("esc", [True, False, True], rng))
    lines = random_conversations("esc", [True, False, False], rng)
    lines[2]["case_id"] = 0
    folder = write_run(tmp_path / "runs", "esc", "prior", 1, lines)
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(error) == 1
    assert error[0].startswith(f"error: {os.path.join(folder, 'test_conversations.jsonl')} "
                               "holds case_id 0 more than once")


def test_a_bad_flag_or_an_out_that_is_a_file_is_one_error_line(tmp_path, capsys):
    from errors import UserError

    folder = write_run(tmp_path / "runs", "esc", "prior", 1,
                       random_conversations("esc", [True], random.Random(8)))
    with pytest.raises(UserError, match=r"--n_boot must be positive, got 0\. See `python "):
        report.main([folder, "--n_boot", "0"])
    (tmp_path / "a_file").write_text("kept")
    with pytest.raises(SystemExit) as stop:
        report.main([folder, "--out", str(tmp_path / "a_file")])
    error = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(error) == 1, error
    assert error[0].startswith(f"error: cannot create the report folder {tmp_path / 'a_file'}")
    assert (tmp_path / "a_file").read_text() == "kept"
    with pytest.raises(UserError, match="the following arguments are required: RUN"):
        plots.main([])


def test_report_links_a_conversation_page_per_run(runs_root, tmp_path):
    out = report.main([str(runs_root), "--out", str(tmp_path / "report"), "--n_boot", "200"])
    text = open(out).read()
    links = re.findall(r"\]\((views/[^)]+\.html)\)", text)
    assert len(links) == 6 and "## Conversations" in text  # 4 esc runs, 2 cb runs
    for link in links:
        page = open(tmp_path / "report" / link, encoding="utf-8").read()
        assert page.startswith("<!doctype html>") and 'id="conversations-data"' in page


def cell_count(line):
    """The cells of a Markdown table row: its '|' that no backslash escapes, less one."""
    return len(re.findall(r"(?<!\\)(?:\\\\)*\|", line)) - 1


def test_a_run_s_texts_with_pipes_newlines_or_markup_keep_every_table_whole(tmp_path):
    """A policy setting, the judge's model, a persona's name and a run folder's name come
    from files and flags: a '|' or a newline in them must neither split a cell nor end a
    table, and '<', backticks and brackets stay text."""
    odd = "a|b\nc <b>x</b> `y` [z](w)"
    rng = random.Random(4)
    conversations = random_conversations("esc", [True, False, True, False], rng)
    for k, c in enumerate(conversations):
        c["persona"] = {"name": odd if k % 2 else "calm", "text": "You are calm."}
    judge = {"critic_llm": "models/judge|v2\nnew", "critic": "sample",
             "critic_order": "shuffle"}
    folder = write_run(tmp_path / "runs", "esc", "gdpzero", 1, conversations,
                       extra={"policy_settings": {"mcts_simulations": "5|6\n7"}, "judge": judge,
                              "search": {"searched_turns": 2, "simulated_turns": 4,
                                         "answers_unusable": {odd: 1}}})
    renamed = os.path.join(tmp_path / "runs", "my run (1)")
    os.rename(folder, renamed)
    write_run(tmp_path / "runs", "esc", "dialogxpert", 1,
              random_conversations("esc", [True, True, False, False], rng))
    out = tmp_path / "report"
    report.main([str(tmp_path / "runs"), "--out", str(out), "--n_boot", "50"])
    lines = (out / "report.md").read_text().split("\n")
    tables = 0
    for k, line in enumerate(lines):
        if line.startswith("| task |"):  # a table's header: every row to the blank line
            tables += 1
            end = lines.index("", k)
            assert all(row.startswith("|") for row in lines[k:end]), lines[k:end]
            assert {cell_count(row) for row in lines[k:end]} == {cell_count(line)}, lines[k:end]
    assert tables == 6  # metrics, cost, strategy, search, persona, paired
    text = "\n".join(lines)
    assert "a\\|b c \\<b\\>x\\</b\\> \\`y\\` \\[z\\](w)" in text  # the persona, on one line
    assert "judge\\|v2 new sample, shuffle order" in text
    assert "gdpzero (mcts_simulations 5\\|6 7)" in text
    assert "(views/my%20run%20%281%29.html)" in text
    assert (out / "views" / "my run (1).html").exists()


def test_each_run_gets_its_own_conversation_page_when_folder_names_repeat(tmp_path):
    """Runs of one folder name under two parents (GDP-Zero at two settings), and the same
    runs re-judged by one judge (<run>/rejudged/<judge>: every folder has the judge's
    name): one page per run, of that run, linked from its own line."""
    rng = random.Random(8)
    folders = {}
    for parent, simulations in (("a", 5), ("b", 20)):
        extra = {"policy_settings": {"mcts_simulations": simulations}}
        run = write_run(tmp_path / "runs" / parent, "esc", "gdpzero", 1,
                        random_conversations("esc", [True, False], rng), extra=extra)
        judged = os.path.join(run, run_files.REJUDGED, "judge")
        os.rename(write_run(os.path.join(run, run_files.REJUDGED), "esc", "gdpzero", 1,
                            random_conversations("esc", [False, True], rng), extra=extra),
                  judged)
        label = "gdpzero (mcts_simulations 5)" if simulations == 5 else "gdpzero"
        folders[label] = {"": run, "judge": judged}
    assert len({os.path.basename(f[""]) for f in folders.values()}) == 1
    for judge in ("", "judge"):
        out = tmp_path / f"report_{judge}"
        report.main([str(tmp_path / "runs"), "--out", str(out), "--n_boot", "50"]
                    + (["--judge", judge] if judge else []))
        links = re.findall(r"- \[esc (.+?) seed 1\]\((views/[^)]+\.html)\)",
                           (out / "report.md").read_text())
        assert len({link for _, link in links}) == len(links) == 2, links
        for label, link in links:
            page = (out / link).read_text(encoding="utf-8")
            assert json.dumps(folders[label][judge]) in page, (label, link)


def test_a_run_folder_whose_name_is_not_utf8_is_reported_and_linked(tmp_path):
    """A folder name with a byte that is not UTF-8 (a lone surrogate in Python): the report
    is written, its text shows U+FFFD and its links name the byte (%FF)."""
    run = write_run(tmp_path / "runs", "esc", "prior", 1,
                    random_conversations("esc", [True, False], random.Random(9)))
    odd = os.path.join(tmp_path / "runs", os.fsdecode(b"run\xff"))
    os.rename(run, odd)
    out = tmp_path / "report"
    report.main([str(tmp_path / "runs"), "--out", str(out), "--n_boot", "20"])
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "- [esc prior seed 1](views/run%FF.html)" in text
    assert "(../runs/run%FF/actions.png)" in text and "run\ufffd/actions.png" in text
    assert os.path.exists(os.path.join(out, "views", os.fsdecode(b"run\xff.html")))
