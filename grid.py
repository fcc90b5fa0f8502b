"""Test planners under a grid of simulated users and critics: one table of SR, AT and SL per
(user, critic), paired intervals between the planners of each cell, and how much the
ranking of the planners changes from cell to cell.

    python grid.py --out grids/esc \\
        --planner prior --planner random --planner dialogxpert=runs/<run>/best.pt \\
        --user "smol=--user_llm weights/SmolLM2-135M-Instruct" \\
        --user "served=--backend openai --base_url http://127.0.0.1:8080/v1" \\
        --critic "smol=--critic_llm weights/SmolLM2-135M-Instruct" \\
        --critic "other=--critic_llm weights/Qwen2.5-1.5B-Instruct" \\
        -- --data_name esc --data_dir data/demo --max_turn 4 --critic_samples 5

A user needs new conversations: each planner is tested (train_model.py --mode test) once
per user, with the flags after `--`, the user's flags and the first critic's flags. A
critic does not: each other critic re-judges those conversations (critic_check.py --run,
the folder rejudged/<critic>), and so does the first where a user's flags changed the
run's critic (a --backend that serves every role). Every cell plays the same cases with the same seed, so
the planners of a cell pair case by case. A user's or critic's flags are train_model.py
flags, as for one run (a served model's flags apply to every role, as --backend does).
"""

import json
import os
import re
import shlex
import sys

from errors import ArgumentParser, ServerError, UserError, one_line_errors

USAGE_HINT = "Pass e.g. --user \"smol=--user_llm weights/SmolLM2-135M-Instruct\""


def named_flags(values, flag):
    """[(name, [flags])] of --user / --critic values "NAME=FLAGS"."""
    cells = []
    for value in values:
        name, sep, flags = value.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise UserError(f"{flag} '{value}' has no NAME= before its flags (letters, digits, "
                            f"'_', '.', '-'; a folder name). {USAGE_HINT}")
        if name in [n for n, _ in cells]:
            raise UserError(f"{flag} names '{name}' twice. Give each {flag[2:]} its own name")
        cells.append((name, shlex.split(flags)))
    return cells


def planners_of(values):
    """[(policy, checkpoint or '')] of --planner values "POLICY" or "POLICY=CHECKPOINT"."""
    from get_args import TRAINED_POLICIES, UNTRAINED_POLICIES

    planners = []
    for value in values:
        policy, _, checkpoint = value.partition("=")
        if policy not in TRAINED_POLICIES + UNTRAINED_POLICIES:
            raise UserError(f"--planner '{value}': unknown policy '{policy}'. Pass one of "
                            f"{list(TRAINED_POLICIES + UNTRAINED_POLICIES)}")
        if policy in TRAINED_POLICIES and not checkpoint:
            raise UserError(f"--planner '{value}' is trained: pass its checkpoint as "
                            f"{policy}=runs/<run>/best.pt")
        if checkpoint and not os.path.isfile(checkpoint):
            raise UserError(f"--planner '{value}': {checkpoint} is not a file. Pass a run's "
                            "best.pt")
        planners.append((policy, checkpoint))
    if len({p for p in planners}) != len(planners):
        raise UserError("--planner: a planner is given twice. Give each once")
    return planners


def planner_name(policy, checkpoint):
    return policy if not checkpoint else f"{policy}={checkpoint}"


def parse(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="grid.py --out DIR --planner P [--planner P ...] "
                                           "--user NAME=FLAGS [...] --critic NAME=FLAGS [...] "
                                           "-- [train_model.py flags]")
    parser.add_argument("--out", required=True, help="folder of the runs and grid.md/.json")
    parser.add_argument("--planner", action="append", required=True,
                        help="POLICY (untrained) or POLICY=CHECKPOINT; the first is each "
                             "cell's reference for paired differences")
    parser.add_argument("--user", action="append", required=True,
                        help="NAME=FLAGS: the user simulator of a row (train_model.py flags)")
    parser.add_argument("--critic", action="append", required=True,
                        help="NAME=FLAGS: the critic of a column (train_model.py flags)")
    parser.add_argument("--n_boot", type=int, default=10000, help="bootstrap resamples")
    argv = sys.argv[1:] if argv is None else list(argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.n_boot < 1:
        parser.error(f"--n_boot must be positive, got {args.n_boot}")
    return args, common


def plan(args, common):
    """Every run and re-judging of the grid, its arguments parsed before any model loads:
    ({(user, planner): (run Args, the flags it counts as given)}, {critic: (critic_check
    argv, its critic)}, critics, users)."""
    from get_args import given_flags, read_args
    from tasks import get_task
    from train_model import MODEL_FLAGS, evaluation_flags

    planners = planners_of(args.planner)
    users, critics = named_flags(args.user, "--user"), named_flags(args.critic, "--critic")
    first_critic = critics[0][1]
    changed = sorted(given_flags(first_critic) & RUN_WIDE_FLAGS)
    if changed:
        raise UserError(f"the first --critic ({critics[0][0]}) sets {', '.join('--' + f for f in changed)}, "
                        "which would change every role of every run, not only the critic. Give "
                        "that critic as a later --critic (it re-judges the conversations)")
    runs = {}
    for user, user_flags in users:
        for policy, checkpoint in planners:
            argv = (common + user_flags + first_critic +
                    ["--mode", "test", "--policy", policy, "--exp_name", f"grid-{user}",
                     "--output_dir", os.path.join(args.out, "runs", user)] +
                    (["--checkpoint", checkpoint] if checkpoint else []))
            run_args = checked_args(read_args, argv, user)
            # every planner of a cell plays the grid's seed, LLMs and evaluation setup; a
            # checkpoint gives only its encoder and its policy's own flags (replay_settings)
            given = (given_flags(argv) | {"seed"} | (set(MODEL_FLAGS) - {"encoder"})
                     | set(evaluation_flags(get_task(run_args.data_name))))
            runs[(user, planner_name(policy, checkpoint))] = (run_args, given)
    judges = {}  # critic -> (its critic_check.py flags, its Args)
    for critic, critic_flags in critics:
        judges[critic] = (common + critic_flags,
                          checked_args(read_args, common + critic_flags, critic))
    return runs, judges, [name for name, _ in critics], [name for name, _ in users]


# flags that choose the LLMs of every role: not a critic's to set for the runs
RUN_WIDE_FLAGS = {"backend", "llm", "base_url", "planner_llm", "system_llm", "user_llm",
                  "planner_base_url", "system_base_url", "user_base_url"}


def check_cells(runs, judges):
    """Every cell's models, servers and checkpoints, before any loads: all problems in one
    UserError. A checkpoint planner's Args get the checkpoint's own settings here."""
    import train_model
    from get_args import ROLES
    from harness import check_weights, resolve_models
    from llm import check_device
    from policies import policy_class
    from tasks import get_task

    problems = []

    def check(step, *values):
        try:
            step(*values)
        except (UserError, ServerError) as error:
            if str(error) not in problems:
                problems.append(str(error))

    def servers(args, roles):
        if args.backend == "openai":
            for role in roles:
                check(probe_server, getattr(args, f"{role}_base_url") or args.base_url)

    for key, (run_args, given) in runs.items():
        if run_args.checkpoint:
            run_args = train_model.replay_settings(run_args, given, get_task(run_args.data_name))
            runs[key] = (run_args, given)
            check(lambda a: policy_class(a.policy).check_checkpoint(a.checkpoint, a,
                                                                   resolve_models(a)), run_args)
        check(check_weights, run_args)
        check(check_device, run_args.device)
        servers(run_args, ROLES)
    for _, critic_args in judges.values():
        check(lambda a: check_weights(a, roles=("critic",), encoder_flags=()), critic_args)
        servers(critic_args, ("critic",))
    if problems:
        raise UserError(" | ".join(problems))


def critic_model(args):
    """The critic a run with these arguments has: engine, model, server."""
    served = args.backend == "openai"
    return (args.backend, args.critic_llm or args.llm,
            (args.critic_base_url or args.base_url) if served else "")


def judged_live(run_args, critic, judges, critics):
    """Whether the run's own verdicts are the critic's: the first critic, unless the user's
    flags changed the run's critic (a row whose --backend serves every role)."""
    return critic == critics[0] and critic_model(run_args) == critic_model(judges[critic][1])


def checked_args(read_args, argv, cell):
    """The Args of a cell's flags; a refused flag is one UserError that names the cell."""
    try:
        return read_args(argv)
    except UserError as error:
        raise UserError(f"the flags of the grid cell '{cell}' were refused ({error}): "
                        f"{shlex.join(argv)}. Fix that --user or --critic") from None


def run_grid(args, common):
    import critic_check
    import train_model

    runs, judges, critics, users = plan(args, common)
    check_cells(runs, judges)
    try:  # the runs' folders go inside it
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the grid folder {args.out} ({error.strerror}). Pass a "
                        "writable --out") from None
    folders = {}
    for (user, planner), (run_args, given) in runs.items():
        print(f"grid: user {user}, planner {planner}", flush=True)
        _, folders[(user, planner)] = train_model.run(run_args, given)
    for critic, (argv, _) in judges.items():
        for (user, planner), folder in folders.items():
            if judged_live(runs[(user, planner)][0], critic, judges, critics):
                continue
            print(f"grid: critic {critic} re-judges user {user}, planner {planner}", flush=True)
            critic_check.main(argv + ["--run", folder, "--judge_name", critic, "--out",
                                      os.path.join(args.out, "cards", critic, user,
                                                   os.path.basename(folder))])
    live = {key: [c for c in critics if judged_live(run_args, c, judges, critics)]
            for key, (run_args, _) in runs.items()}
    return table(args, folders, users, critics, live)


def probe_server(base_url, timeout=10):
    """One line if the server at base_url does not answer its model list."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=timeout):
            return
    except (urllib.error.URLError, OSError) as error:
        raise UserError(f"the server {base_url} of a grid cell does not answer ({error}). "
                        "Start it (e.g. `make serve`) or fix that cell's flags") from None


def table(args, folders, users, critics, live):
    """grid.json and grid.md of the finished runs and re-judgings."""
    import report

    planners = list(dict.fromkeys(planner for _, planner in folders))
    cells = []
    for user in users:
        for critic in critics:
            runs = {planner: report.tabled_run(
                folders[(user, planner)] if critic in live[(user, planner)]
                else os.path.join(folders[(user, planner)], "rejudged", critic))
                for planner in planners}
            summaries = {p: report.summarize(run["task"], p, {run["seed"]: run}, args.n_boot)
                         for p, run in runs.items()}
            reference = planners[0]
            differences = {p: report.paired_difference({runs[reference]["seed"]: runs[reference]},
                                                       {run["seed"]: run}, args.n_boot)
                           for p, run in runs.items() if p != reference}
            cells.append({"user": user, "critic": critic, "judge": summaries[reference]["judge"],
                          "planners": {p: s["metrics"] for p, s in summaries.items()},
                          "unusable": {p: s["metrics"].get("unusable") for p, s in summaries.items()},
                          "differences": differences, "reference": reference,
                          "ranking": ranking({p: s["metrics"] for p, s in summaries.items()})})
    result = {"users": users, "critics": critics, "planners": planners, "cells": cells,
              "ranking_change": ranking_change([c["ranking"] for c in cells]),
              "n_boot": args.n_boot}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grid.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with open(os.path.join(args.out, "grid.md"), "w") as f:
        f.write(text)
    print(text)
    print(os.path.join(args.out, "grid.md"))
    return result


def ranking(metrics):
    """The planners best first: higher SR, then fewer turns (AT), then the name."""
    return sorted(metrics, key=lambda p: (-metrics[p]["SR"]["mean"], metrics[p]["AT"]["mean"], p))


def kendall_tau(first, second):
    """Kendall's tau between two orderings of the same items: 1 the same order, -1 reversed."""
    where = {item: i for i, item in enumerate(second)}
    pairs = [(a, b) for i, a in enumerate(first) for b in first[i + 1:]]
    if not pairs:
        return 1.0
    return sum(1 if where[a] < where[b] else -1 for a, b in pairs) / len(pairs)


def ranking_change(rankings):
    """How much the planners' order changes across cells: Kendall's tau of each cell's
    ranking against the first cell's, their mean over every pair of cells, and the share
    of cells whose best planner is not the first cell's."""
    against_first = [kendall_tau(rankings[0], r) for r in rankings]
    pairs = [kendall_tau(a, b) for i, a in enumerate(rankings) for b in rankings[i + 1:]]
    return {"tau_vs_first_cell": against_first,
            "mean_pairwise_tau": sum(pairs) / len(pairs) if pairs else 1.0,
            "top_changes": sum(r[0] != rankings[0][0] for r in rankings) / len(rankings),
            "top_planners": sorted({r[0] for r in rankings})}


def markdown(result):
    from report import cell, markdown_text

    lines = ["# Planners under a grid of users and critics", "",
             "Each cell: mean [95% bootstrap interval] over the test cases; every cell plays "
             "the same cases and seed. A different user means new conversations; a different "
             "critic re-judges the first critic's conversations of the same user. All of "
             "these are simulated: the figures measure the planners with these simulators, "
             "and a difference between cells can be the simulators' bias.", ""]
    for c in result["cells"]:
        lines += [f"## user {c['user']}, critic {c['critic']}", "", f"judge: {c['judge']}", "",
                  "| planner | SR | AT | SL | unusable LLM answers / conv. | "
                  f"SR ({c['reference']} - planner) |", "|---|---|---|---|---|---|"]
        for planner, figures in c["planners"].items():
            difference = c["differences"].get(planner, {}).get("SR")
            # a planner's name holds its checkpoint's path: escaped for the table
            lines.append(f"| {markdown_text(planner)} | {cell(figures['SR'], '.3f')} | {cell(figures['AT'], '.2f')}"
                         f" | {cell(figures.get('SL'), '.3f')} | {cell(figures.get('unusable'), '.2f')}"
                         f" | {cell(difference, '.3f') if difference else '-'} |")
        lines += ["", "ranking: " + " > ".join(c["ranking"]), ""]
    change = result["ranking_change"]
    lines += ["## How the ranking changes", "",
              "| user | critic | ranking | Kendall's tau vs the first cell |", "|---|---|---|---|"]
    for c, tau in zip(result["cells"], change["tau_vs_first_cell"]):
        ranking = " > ".join(markdown_text(planner) for planner in c["ranking"])
        lines.append(f"| {c['user']} | {c['critic']} | {ranking} | {tau:.2f} |")
    lines += ["", f"Mean Kendall's tau over every pair of cells: {change['mean_pairwise_tau']:.2f} "
              f"(1: the same order everywhere). Cells whose best planner is not the first "
              f"cell's: {change['top_changes']:.0%}; best planners seen: "
              f"{', '.join(change['top_planners'])}. Rankings use the means only (SR, then AT)."
              " With intervals that overlap, a change of order can be noise.", ""]
    return "\n".join(lines)


def main(argv=None):
    args, common = parse(argv)
    return run_grid(args, common)


def cli():
    one_line_errors(main)


if __name__ == "__main__":
    cli()
