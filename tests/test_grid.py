"""grid.py: planners under a grid of users and critics, from scripted models whose
answers are known: each cell's SR by hand, the ranking's change across cells, and the
bad inputs refused before any model loads."""

import json
import os
import re
from contextlib import contextmanager

import pytest

import grid
from conftest import (ScriptedLLM, build_tiny_encoder, esc_case, models_from, option_number,
                      write_json_lines)
from errors import UserError
from tasks import get_task

ESC = get_task("esc")
SOLVED, SAME = ESC.prompts["verdicts"][3], ESC.prompts["verdicts"][1]


def played(prompt):
    instruction = prompt[prompt.rindex("("):]
    return next(a for a in ESC.action_names if ESC.actions[a] in instruction)


@contextmanager
def scripted_grid():
    """Two users (told apart by --user_temperature): 'kind' thanks every turn, 'picky' only
    a Question. The run's critic ('lenient') calls a thanked turn solved; the re-judging
    critic ('contrarian') calls solved every conversation whose system never asked a
    Question (the system says which strategy it played)."""
    import critic_check
    from critic import Critic

    def system(prompt):
        return f"Emotion: calm\nResponse: I see [{played(prompt)}]."

    def user_of(args):
        def reply(prompt):
            last = re.findall(r"\[([^\]]+)\]", prompt)[-1]
            kind = args.user_temperature == 0.5
            return "Thank you." if kind or last == "Question" else "Hm."
        return ScriptedLLM(reply)

    lenient = ScriptedLLM(lambda p: option_number(p, SOLVED if "Thank you" in p else SAME))
    contrarian = ScriptedLLM(lambda p: option_number(p, SAME if "[Question]" in p else SOLVED))
    prior = ScriptedLLM(None, prior=lambda prompt, labels: [
        5.0 if label == option_number(prompt, "Question") else 1.0 for label in labels])
    saved = critic_check.load_critic
    critic_check.load_critic = lambda args: (
        Critic(ESC, contrarian, num_samples=args.critic_samples), "contrarian")
    try:
        with models_from(lambda args: {"planner": prior, "system": ScriptedLLM(system),
                                       "user": user_of(args), "critic": lenient}):
            yield
    finally:
        critic_check.load_critic = saved


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    data = root / "data"
    data.mkdir()
    for split, count in (("train", 2), ("valid", 2), ("test", 12)):
        write_json_lines(data / f"esc-{split}.txt", [esc_case(i) for i in range(count)])
    build_tiny_encoder(str(root / "encoder"))
    argv = ["--out", str(root / "grid"), "--planner", "prior", "--planner", "uniform",
            "--user", "kind=--user_temperature 0.5", "--user", "picky=--user_temperature 0.6",
            "--critic", "lenient=--critic_samples 2", "--critic", "contrarian=--critic_samples 2",
            "--n_boot", "200", "--",
            "--data_name", "esc", "--data_dir", str(data), "--encoder", str(root / "encoder"),
            "--max_turn", "2", "--num_envs", "12", "--progress", "false", "--device", "cpu",
            "--seed", "5", "--max_encoder_tokens", "64"]
    with scripted_grid():
        result = grid.main(argv)
    return root, result


@pytest.mark.slow
def test_each_cell_has_the_hand_computed_success_and_the_ranking_change(grid_run):
    root, result = grid_run
    cells = {(c["user"], c["critic"]): c for c in result["cells"]}
    assert sorted(cells) == [("kind", "contrarian"), ("kind", "lenient"),
                             ("picky", "contrarian"), ("picky", "lenient")]

    def conversations(user, planner):
        runs = os.path.join(root, "grid", "runs", user)
        folder = next(os.path.join(runs, name) for name in os.listdir(runs)
                      if f"__grid-{user}-{planner}__" in name)
        with open(os.path.join(folder, "test_conversations.jsonl")) as f:
            return [json.loads(line) for line in f]

    def actions(c):
        return [r["action"] for r in c["records"]]
    for user in ("kind", "picky"):
        prior, uniform = conversations(user, "prior"), conversations(user, "uniform")
        assert all(actions(c) == ["Question"] for c in prior)  # solved at turn 1 by both
        # lenient: kind thanks every turn (SR 1); picky only a Question
        lenient = cells[(user, "lenient")]["planners"]
        assert lenient["prior"]["SR"]["mean"] == 1.0
        picky_sr = sum("Question" in actions(c) for c in uniform) / len(uniform)
        assert lenient["uniform"]["SR"]["mean"] == pytest.approx(1.0 if user == "kind"
                                                                 else picky_sr)
        # contrarian re-judges each saved turn: solved at the first turn before any Question
        contrarian = cells[(user, "contrarian")]["planners"]
        assert contrarian["prior"]["SR"]["mean"] == 0.0
        by_hand = sum(actions(c)[0] != "Question" for c in uniform) / len(uniform)
        assert 0 < by_hand < 1
        assert contrarian["uniform"]["SR"]["mean"] == pytest.approx(by_hand)
        assert cells[(user, "contrarian")]["ranking"] == ["uniform", "prior"]
        assert cells[(user, "lenient")]["ranking"][0] == "prior"
        difference = cells[(user, "contrarian")]["differences"]["uniform"]["SR"]["mean"]
        assert difference == pytest.approx(0.0 - by_hand)  # prior - uniform, paired
    change = result["ranking_change"]
    # cells in order: (kind, lenient), (kind, contrarian), (picky, lenient), (picky, contrarian)
    assert change["tau_vs_first_cell"] == [1.0, -1.0, 1.0, -1.0]
    assert change["top_changes"] == 0.5 and change["top_planners"] == ["prior", "uniform"]
    assert change["mean_pairwise_tau"] == pytest.approx((1 - 1 - 1 - 1 - 1 + 1) / 6)
    text = open(os.path.join(root, "grid", "grid.md")).read()
    assert "## user picky, critic contrarian" in text and "| uniform | prior |" not in text


def test_a_planner_named_by_a_checkpoint_path_with_a_pipe_keeps_grid_md_s_tables_whole():
    figure = {"mean": 0.5, "low": 0.0, "high": 1.0}
    odd = "dialogxpert=runs/a|b/best.pt"
    cell = {"user": "kind", "critic": "lenient", "judge": "j", "reference": "prior",
            "planners": {"prior": {"SR": figure, "AT": figure}, odd: {"SR": figure, "AT": figure}},
            "differences": {odd: {"SR": figure}}, "ranking": [odd, "prior"]}
    text = grid.markdown({"cells": [cell], "ranking_change": {
        "tau_vs_first_cell": [1.0], "mean_pairwise_tau": 1.0, "top_changes": 0.0,
        "top_planners": [odd]}})
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    # every row of a table has as many unescaped '|' as its header
    for header, row in ((rows[0], rows[2]), (rows[3], rows[4])):
        assert row.replace("\\|", "").count("|") == header.count("|"), row
    assert "| dialogxpert=runs/a\\|b/best.pt > prior |" in rows[4]


def test_kendall_tau_by_hand():
    assert grid.kendall_tau(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert grid.kendall_tau(["a", "b", "c"], ["c", "b", "a"]) == -1.0
    assert grid.kendall_tau(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(1 / 3)


@pytest.mark.slow
def test_a_checkpoint_planner_plays_the_grids_seed_and_setup(tmp_path):
    """A trained planner in the grid keeps only its own flags from its checkpoint: the seed,
    turn limit and critic are the grid's, so its conversations pair with the baselines'."""
    from conftest import make_runs

    trained, = make_runs(str(tmp_path), test_cases=12, train_episodes=4, max_turn=3,
                         baseline=None)  # seed 1, --max_turn 3, --critic_samples 4
    argv = ["--out", str(tmp_path / "grid"), "--planner", "prior", "--planner",
            f"dialogxpert={trained}/best.pt", "--user", "kind=--user_temperature 0.5",
            "--critic", "lenient=--critic_samples 2", "--n_boot", "200", "--",
            "--data_name", "esc", "--data_dir", str(tmp_path / "data"), "--encoder",
            str(tmp_path / "encoder"), "--max_turn", "8", "--num_envs", "12",
            "--progress", "false", "--device", "cpu", "--max_encoder_tokens", "64"]
    with scripted_grid():
        result = grid.main(argv)
    cell, = result["cells"]
    difference = cell["differences"][f"dialogxpert={trained}/best.pt"]
    assert difference["pairs"] == 12 and difference["seeds"] == [42]
    runs = os.path.join(tmp_path, "grid", "runs", "kind")
    for name in os.listdir(runs):
        with open(os.path.join(runs, name, "test_metrics.json")) as f:
            metrics = json.load(f)
        assert (metrics["seed"], metrics["max_turn"], metrics["config"]["critic_samples"]) == (
            42, 8, 2)


@pytest.mark.parametrize("argv, expected", [
    (["--user", "nameless"], "has no NAME="),
    (["--user", "a=--user_temperature 0.5", "--user", "a=--user_temperature 0.6"], "twice"),
    (["--planner", "dialogxpert"], "pass its checkpoint"),
    (["--planner", "nope"], "unknown policy"),
    (["--user", "a=--max_turn -3"], "grid cell 'a'"),
    # the bad cell second: checked before the first cell's run starts
    (["--user", "u=--max_turn 2", "--user", "a=--llm weights/no_such_model"],
     "weights/no_such_model"),
    (["--user", "u=--max_turn 2", "--user", "a=--backend openai --base_url http://127.0.0.1:9/v1"],
     "does not answer"),
    (["--user", "..=--max_turn 2"], "has no NAME="),
    # a critic column is checked before the first run too, every problem in one line
    (["--user", "a=--llm weights/no_such_model", "--critic", "c=--critic_samples 2",
      "--critic", "d=--critic_llm weights/no_critic"], "weights/no_such_model"),
    (["--user", "a=--llm weights/no_such_model", "--critic", "c=--critic_samples 2",
      "--critic", "d=--critic_llm weights/no_critic"], "weights/no_critic"),
    (["--critic", "c=--backend openai --base_url http://127.0.0.1:9/v1"],
     "would change every role"),
])
def test_bad_grid_input_is_one_error_before_any_model_loads(tmp_path, argv, expected):
    base = {"--planner": ["--planner", "prior"], "--user": ["--user", "u=--max_turn 2"]}
    for flag, default in base.items():
        if flag not in argv:
            argv = default + argv
    critic = [] if "--critic" in argv else ["--critic", "c=--critic_samples 2"]
    argv = (["--out", str(tmp_path / "out")] + argv + critic + ["--", "--data_dir", "data/demo"])
    loaded = []
    with models_from(loaded.append), pytest.raises(UserError, match=re.escape(expected)):
        grid.main(argv)
    assert not loaded and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("user,expected", [
    ("u=--max_turn -1", "refused (--max_turn=-1 is out of range. Pass a value >= 1)"),
    ("u=--max_turn x", "refused (argument --max_turn: invalid int value: 'x'."),
])
def test_a_refused_cell_flag_is_one_error_that_names_the_cell(tmp_path, capsys, user, expected):
    argv = ["--out", str(tmp_path / "out"), "--planner", "prior", "--user", user,
            "--critic", "c=--critic_samples 2", "--", "--data_dir", "data/demo"]
    with pytest.raises(UserError, match=re.escape(expected)) as error:
        grid.main(argv)
    assert "grid cell 'u'" in str(error.value) and "\n" not in str(error.value)
    assert capsys.readouterr().err == ""  # nothing printed before the one line


def test_an_out_that_cannot_be_created_is_one_error_before_any_model_loads(tmp_path):
    (tmp_path / "a_file").write_text("")
    argv = ["--out", str(tmp_path / "a_file"), "--planner", "prior", "--user", "u=--max_turn 2",
            "--critic", "c=--critic_samples 2", "--", "--data_dir", "data/demo"]
    loaded = []
    with models_from(loaded.append), pytest.raises(UserError, match=re.escape(
            f"cannot create the grid folder {tmp_path / 'a_file'} (File exists). Pass a "
            "writable --out")):
        grid.main(argv)
    assert not loaded


def test_a_row_that_changes_the_runs_critic_is_rejudged_by_the_first_critic_too():
    from get_args import parse_args

    judges = {"c": ([], parse_args([])), "d": ([], parse_args(["--critic_llm", "other"]))}
    assert grid.judged_live(parse_args(["--user_llm", "u"]), "c", judges, ["c", "d"])
    served = parse_args(["--backend", "openai", "--base_url", "http://127.0.0.1:1/v1"])
    assert not grid.judged_live(served, "c", judges, ["c", "d"])  # its live critic was served
    assert not grid.judged_live(parse_args([]), "d", judges, ["c", "d"])
