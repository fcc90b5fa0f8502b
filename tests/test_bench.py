import json
import subprocess
import sys

import pytest

from conftest import ROOT, one_error_line

pytestmark = pytest.mark.slow  # benchmarks run as subprocesses


def test_bench_runs_both_modes_and_writes_figures(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "bench.py", "--random_model", "tiny", "--num_envs", "4",
         "--total_episodes", "4", "--baseline_episodes", "2", "--max_turn", "2",
         "--critic_samples", "3", "--system_max_new_tokens", "5", "--user_max_new_tokens", "5",
         "--critic_max_new_tokens", "5", "--baseline_prior_tokens", "5", "--batch_size", "4",
         "--learning_starts", "4", "--device", "cpu", "--dtype", "float32",
         "--json_out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "speed-up" in done.stdout
    figures = json.loads(out.read_text())
    fast, base = figures["fast"], figures["baseline"]
    assert fast["turns"] == 4 * 2 and base["turns"] == 2 * 2  # random model: time limits
    assert fast["num_envs"] == 4 and base["num_envs"] == 1
    for mode in (fast, base):
        assert set(mode["phase_seconds"]) == {"prior", "system", "user", "critic", "encoder",
                                              "q_update", "other"}
        assert mode["generated_tokens"] > 0 and mode["peak_rss_gb"] > 0
        # every phase of a training turn was timed, the encoder and the Q update included
        assert all(mode["phase_seconds"][phase] > 0 for phase in
                   ("prior", "system", "user", "critic", "encoder", "q_update"))
        assert mode["turns_per_second"] == pytest.approx(mode["turns"] / mode["wall_seconds"])
    assert figures["speedup"] == pytest.approx(fast["turns_per_second"]
                                               / base["turns_per_second"])
    assert fast["plain_generate_tokens_per_second"] > 0
    # the baseline is the original loop: no prefix cache, so no prompt token is reused
    assert base["prompt_tokens_reused"] == 0 and fast["prompt_tokens_reused"] > 0


def test_bench_times_a_training_state_write_whose_size_matches_the_buffer():
    import bench
    from get_args import Args

    args = Args(buffer_size=100, top_k=4, hidden_size=8, learning_starts=1)
    figures = bench.state_write_figures(args, [16], repeats=1)
    # float16 features: 100 x (1 + 4) x 16 x 2 bytes, plus masks, rewards and the heads
    assert 100 * 5 * 16 * 2 / 1e6 < figures[16]["megabytes"] < 0.1
    assert figures[16]["seconds"] > 0


def test_bench_times_every_planner_and_the_search_one_conversation_at_a_time(
        tmp_path, tiny_llm_dir, tiny_encoder_dir):
    out = tmp_path / "planners.json"
    done = subprocess.run(
        [sys.executable, "bench.py", "--planners", "dialogxpert,ppdpp,gdpzero,dpdp",
         "--llm", tiny_llm_dir, "--encoder", tiny_encoder_dir, "--policy_encoder",
         tiny_encoder_dir, "--num_envs", "2", "--max_turn", "1", "--critic_samples", "2",
         "--system_max_new_tokens", "4", "--user_max_new_tokens", "4",
         "--critic_max_new_tokens", "4", "--mcts_simulations", "2", "--mcts_parallel", "2",
         "--device", "cpu",
         "--dtype", "float32", "--max_encoder_tokens", "64", "--json_out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())["planners"]
    assert set(figures) == {"dialogxpert", "ppdpp", "gdpzero", "dpdp",
                            "gdpzero, sims in turn", "gdpzero, one at a time"}
    assert figures["gdpzero, one at a time"]["num_envs"] == 1
    assert [figures[name]["mcts_parallel"] for name in
            ("gdpzero", "gdpzero, sims in turn", "gdpzero, one at a time")] == [2, 1, 1]
    assert all(row["turns"] == 2 and row["seconds_per_turn"] > 0 for row in figures.values())
    for row in figures.values():  # prompt tokens run and generated, per second
        assert row["tokens_run_per_second"] == pytest.approx(
            (row["prompt_tokens_per_turn"] + row["generated_tokens_per_turn"]) * row["turns"]
            / row["seconds"])
    # the search's simulated turns generate text that the other planners do not
    assert figures["gdpzero"]["generated_tokens_per_turn"] > \
        figures["dialogxpert"]["generated_tokens_per_turn"]


@pytest.mark.parametrize("flags,message", [
    (["--max_turn", "-1"], "error: --max_turn=-1 is out of range. Pass a value >= 1"),
    (["--max_turn", "x"], "error: argument --max_turn: invalid int value: 'x'. See `python "
                          "bench.py --help`"),
    (["--view", "no_such_run"], "error: no_such_run is not a folder."),
    (["--state_write", "a,b"], "error: --state_write 'a,b' is not a list of widths."),
])
def test_bad_input_is_one_error_line(flags, message):
    line = one_error_line("bench.py", *flags)
    assert line.startswith(message), line
