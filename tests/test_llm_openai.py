"""The served backend against a real server: llama-cpp-python's OpenAI-compatible server
with the embedded SmolLM2 GGUF (serve.py), and faults injected by a proxy in front
of it. Answers are kept to a few tokens: the server shares two cores with everything else."""

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import threading
import time

import pytest
import torch

import harness
import train_model
from conftest import DEMO, ROOT, one_error_line
from fault_proxy import FaultProxy
from errors import ServerError
from llm import EMBEDDED_LLM, load_llm
from llm_openai import OpenAILLM
from serve import NATIVE_SERVER, LlamaServer

pytestmark = pytest.mark.slow  # a served model

KEY_ENV = "DIALOGXPERT_TEST_API_KEY"
QUESTIONS = [[{"role": "user", "content": "Name a colour."}],
             [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "Say hello to Ann."}]]


@pytest.fixture(scope="module")
def server():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python's server is not installed: `make test` installs it "
                    "(see requirements-serve.txt)")
    with LlamaServer(api_key=secrets.token_hex(16)) as running:
        yield running


@pytest.fixture
def client_for(server, monkeypatch):
    """A client of a URL (the server's by default), authorised by the environment variable."""
    monkeypatch.setenv(KEY_ENV, server.api_key)

    def make(url=None, role="critic", **options):
        # the context llama.cpp was started with (it lists none: see the test below)
        options = {"max_retries": 2, "request_timeout": 60.0, "context_length": 4096} | options
        llm = load_llm("openai", EMBEDDED_LLM, role=role, base_url=url or server.url,
                       api_key_env=KEY_ENV, **options)
        llm.backoff_seconds = 0.05  # short backoffs: a Retry-After wait stands out
        return llm
    return make


def test_chat_samples_and_stop_strings(client_for, capsys):
    llm = client_for()
    greedy = llm.chat(QUESTIONS, max_new_tokens=6, temperature=0)
    assert [len(answers) for answers in greedy] == [1, 1] and all(a[0] for a in greedy)
    assert llm.chat(QUESTIONS, max_new_tokens=6, temperature=0) == greedy
    samples = llm.chat(QUESTIONS, max_new_tokens=6, temperature=1.5, num_samples=3,
                       stop_at_newline=True)
    assert [len(answers) for answers in samples] == [3, 3]
    assert all("\n" not in answer for answers in samples for answer in answers)
    assert len({answer for answers in samples for answer in answers}) > 1  # seeds differ
    # llama.cpp answers one choice whatever n is: detected once, reported, topped up
    assert llm.n_supported is False and "ignores n" in capsys.readouterr().out
    assert llm.usage["requests"] == 2 + 2 + 2 * 3 and llm.usage["retries"] == 0
    assert llm.usage["prompt_tokens"] > 0 and llm.usage["completion_tokens"] > 0


def test_a_server_that_lists_no_context_length_gets_a_warning(client_for, capsys):
    llm = client_for(context_length=0)
    assert llm.context_length is None and llm.usage["requests"] == 1  # asked /models
    assert ("does not list the context length of 'embedded-smollm2'; prompts are not cut "
            "to fit it. Pass --context_length TOKENS") in capsys.readouterr().out


def test_auto_names_the_served_model_and_a_wrong_key_stops_at_once(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong")
    start = time.monotonic()
    with pytest.raises(ServerError, match=r"critic model's server .* answered HTTP 401"):
        OpenAILLM(server.url, "auto", role="critic", api_key="wrong")
    assert time.monotonic() - start < 10  # not retried
    monkeypatch.setenv(KEY_ENV, server.api_key)
    llm = load_llm("openai", "auto", role="planner", base_url=server.url, api_key_env=KEY_ENV,
                   tokenizer="none")
    assert llm.model == EMBEDDED_LLM and llm.tokenizer is None


def planner_prompts(task_name, count):
    from env import Planner, new_conversation
    from tasks import get_task, load_split

    task = get_task(task_name)
    planner = Planner(task, None)
    cases = load_split(DEMO, task_name, "train")[:count]
    return [planner.prompt(new_conversation(task, case)) for case in cases], planner.labels


# SmolLM2's GGUF is Q4_1; the in-process model is the same weights dequantized to bf16,
# so the priors differ by llama.cpp's arithmetic (8-bit activations in its matmuls) only
PRIOR_TOLERANCE = 0.05  # largest |difference| of any label's probability


@pytest.mark.parametrize("task_name", ["esc", "p4g"])  # 8 labels; 19 (two-token 10..19)
def test_prior_agrees_with_the_in_process_model(client_for, task_name):
    from llm_transformers import TransformersLLM

    conversations, labels = planner_prompts(task_name, 2)
    served = client_for(role="planner")
    assert served.option_scoring_problem(labels) is None
    served_prior = served.option_probs(conversations, labels)
    local = TransformersLLM.from_pretrained(served.tokenizer.name_or_path, device="cpu",
                                            dtype="float32")
    local_prior = local.option_probs(conversations, labels)
    assert served_prior.shape == local_prior.shape == (2, len(labels))
    assert torch.allclose(served_prior.sum(-1), torch.ones(2), atol=1e-5)
    difference = (served_prior - local_prior).abs().max().item()
    print(f"{task_name}: largest prior difference {difference:.4f}")
    assert difference < PRIOR_TOLERANCE, (served_prior, local_prior)
    # the same top choice where the in-process model is not close to a tie
    top2 = local_prior.topk(2).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * PRIOR_TOLERANCE
    assert (served_prior.argmax(-1) == local_prior.argmax(-1))[decided].all()
    # 19 labels need the distribution after "1" too: two requests per conversation
    assert served.usage["requests"] == 1 + len(conversations) * (2 if len(labels) > 9 else 1)


def test_the_critic_reads_its_verdict_distribution_from_a_served_model(client_for):
    from critic import Critic
    from env import Conversation
    from tasks import get_task, load_split

    task = get_task("esc")
    critic = Critic(task, client_for(role="critic"), mode="logits")
    case = load_split(DEMO, "esc", "train")[0]
    (result,) = critic.score([Conversation(case, [("Patient", "I feel low."),
                                                  ("Therapist", "I hear you.")], emotions=["sad"])])
    assert len(result.option_probs) == len(task.verdicts)
    assert sum(result.option_probs) == pytest.approx(1.0, abs=1e-5)
    assert min(task.reward.rewards) <= result.reward <= max(task.reward.rewards)


def test_no_tokenizer_labels_that_extend_others_fall_back_to_sampling(client_for):
    llm = client_for(role="planner", tokenizer="none")
    labels = [str(i + 1) for i in range(12)]
    assert "tokenizer" in llm.option_scoring_problem(labels)
    conversations, esc_labels = planner_prompts("esc", 1)
    assert llm.option_scoring_problem(esc_labels) is None  # 1..8: one token each
    assert torch.allclose(llm.option_probs(conversations, esc_labels).sum(), torch.tensor(1.0))


def test_a_server_without_logprobs_is_found_before_the_run_and_stops_it_cleanly_after(
        server, client_for):
    conversations, labels = planner_prompts("p4g", 1)
    with FaultProxy(server.url, always="no_logprobs") as proxy:
        llm = client_for(proxy.url, role="planner")
        assert llm.option_scoring_problem(labels) == (
            f"the server at {proxy.url} gives no log-probabilities")
        with pytest.raises(ServerError, match=r"planner model's server .* without "
                                              r"top_logprobs\. Sample instead"):
            llm.option_probs(conversations, labels)


# -- faults ------------------------------------------------------------------------------

def within(seconds, call):
    """call()'s result or exception, or a test failure after `seconds`: a hang fails fast."""
    outcome = {}

    def run():
        try:
            outcome["result"] = call()
        except Exception as error:  # handed to the test below
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"no answer or error within {seconds} s: a hang"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@pytest.mark.parametrize("faults, retries, least_seconds", [
    (["429", "429"], 2, 2.0),  # Retry-After: 1, twice: waits 2 s, not the 0.05 s backoff
    (["500"], 1, 0.0),
    (["stall"], 1, 2.0),  # no answer within --request_timeout 2 s, then retried
])
def test_faults_are_retried_and_recovered(server, client_for, faults, retries, least_seconds):
    with FaultProxy(server.url, faults) as proxy:
        llm = client_for(proxy.url, request_timeout=2.0, max_retries=3)
        start = time.monotonic()
        answers = within(60, lambda: llm.chat(QUESTIONS[:1], max_new_tokens=4, temperature=0))
        elapsed = time.monotonic() - start
    assert len(answers) == 1 and answers[0][0]  # the conversation got its answer
    assert llm.usage["retries"] == retries
    assert [what for _, what in proxy.log] == faults + ["passed"]
    assert least_seconds <= elapsed < least_seconds + 30


@pytest.mark.parametrize("fault, last", [("500", "HTTP 500"), ("stall", "no answer within 1 s")])
def test_persistent_faults_stop_with_one_clear_line_in_bounded_time(server, client_for, fault,
                                                                    last):
    with FaultProxy(server.url, always=fault) as proxy:
        llm = client_for(proxy.url, request_timeout=1.0, max_retries=2)
        start = time.monotonic()
        with pytest.raises(ServerError) as error:
            within(60, lambda: llm.chat(QUESTIONS, max_new_tokens=4))
        elapsed = time.monotonic() - start
    message = str(error.value)
    assert f"critic model's server at {proxy.url}/chat/completions failed 3 tries" in message
    assert f"(last: {last})" in message and "\n" not in message
    assert elapsed < 3 * 1.0 + 5  # three tries of at most 1 s, short backoffs
    assert server.api_key not in message


def test_server_killed_mid_run_stops_with_a_clear_error(client_for, monkeypatch):
    with LlamaServer(api_key=secrets.token_hex(16)) as doomed:
        monkeypatch.setenv(KEY_ENV, doomed.api_key)
        llm = client_for(doomed.url, max_retries=2)
        outcome = {"calls": 0}

        def run():  # phases one after another, as self-play calls them, until one fails
            try:
                while outcome["calls"] < 1000:
                    llm.chat(QUESTIONS, max_new_tokens=64, temperature=1.0)
                    outcome["calls"] += 1
            except ServerError as error:
                outcome["error"] = error

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 60
        while outcome["calls"] == 0 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)  # the run is under way: a phase has finished
        time.sleep(0.5)
        doomed.kill()
        worker.join(timeout=60)
    assert not worker.is_alive(), "the client hung after the server died"
    assert outcome["calls"] > 0  # the run was under way
    message = str(outcome.get("error"))
    assert "critic model's server" in message and "failed 3 tries" in message
    assert "(last: ConnectError" in message


# -- a whole run -------------------------------------------------------------------------

def run_args(url, output_dir, encoder_dir, *extra):
    return ["--data_name", "esc", "--data_dir", DEMO,
            "--backend", "openai", "--base_url", url, "--api_key_env", KEY_ENV,
            "--encoder", encoder_dir, "--total_episodes", "2", "--num_envs", "2",
            "--max_turn", "1", "--critic_samples", "2", "--system_max_new_tokens", "8",
            "--user_max_new_tokens", "8", "--critic_max_new_tokens", "6", "--eval_every", "2",
            "--eval_cases", "1", "--max_cases", "2", "--batch_size", "2",
            "--learning_starts", "1", "--output_dir", str(output_dir), "--progress", "false",
            "--device", "cpu", "--dtype", "float32", "--context_length", "4096", *extra]


def test_train_then_test_with_every_role_served(server, client_for, tiny_encoder_dir,
                                                tmp_path, capsys):
    from tasks import load_split

    metrics, run_dir = train_model.main(run_args(server.url, tmp_path, tiny_encoder_dir))
    test_cases = len(load_split(DEMO, "esc", "test"))
    assert metrics["episodes"] == test_cases
    with open(os.path.join(run_dir, "test_conversations.jsonl")) as f:
        outcomes = [json.loads(line)["outcome"] for line in f]
    assert metrics["SR"] == pytest.approx(outcomes.count("success") / test_cases)
    usage = metrics["llm_usage"]
    assert set(usage) == {"planner", "system", "user", "critic"}
    assert all(u["requests"] > 0 and u["prompt_tokens"] > 0 for u in usage.values())
    assert usage["critic"]["completion_tokens"] > 0 and usage["planner"]["retries"] == 0
    train_metrics = json.load(open(os.path.join(run_dir, "train_metrics.json")))
    assert train_metrics["llm_usage"]["system"]["requests"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    assert {"usage/planner_requests", "usage/critic_completion_tokens",
            "usage/user_retries"} <= set(events.Tags()["scalars"])
    test_metrics, _ = train_model.main(run_args(server.url, tmp_path, tiny_encoder_dir,
                                                "--mode", "test", "--checkpoint",
                                                metrics["checkpoint"]))
    assert test_metrics["episodes"] == test_cases
    # the key is read from the environment and written nowhere
    printed = capsys.readouterr()
    assert server.api_key not in printed.out + printed.err
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert server.api_key.encode() not in f.read(), name


def test_a_planner_and_critic_that_cannot_score_options_sample_with_a_warning(
        tiny_encoder_dir, tmp_path, monkeypatch, capsys):
    from conftest import ScriptedLLM

    class NoLogprobsLLM(ScriptedLLM):
        def option_scoring_problem(self, labels):
            return "the server at http://example.invalid gives no log-probabilities"

    llm = NoLogprobsLLM(lambda prompt: "2")
    monkeypatch.setattr(harness, "load_llms", lambda args: dict.fromkeys(
        ("planner", "system", "user", "critic"), llm))
    metrics, run_dir = train_model.main(run_args("http://example.invalid/v1", tmp_path,
                                                 tiny_encoder_dir, "--critic", "logits"))
    printed = capsys.readouterr().out
    for role, flag in (("planner", "prior"), ("critic", "critic")):
        assert (f"warning: the server at http://example.invalid gives no log-probabilities; "
                f"the {role} samples its answers instead (--{flag} sample)") in printed
    assert not any(call[0] == "option_probs" for call in llm.calls)
    info = json.load(open(os.path.join(run_dir, "best.pt.json")))
    assert info["args"]["prior"] == info["args"]["critic"] == "sample"  # what the run did


def test_a_run_whose_server_fails_stops_with_one_line_and_keeps_its_q_head(
        server, client_for, tiny_encoder_dir, tmp_path):
    # the first 12 requests (the model list, the planner's probe and first prior, the
    # first turn) pass, then every answer is a 500
    with FaultProxy(server.url, always="500", passes=12) as proxy:
        start = time.monotonic()
        with pytest.raises(ServerError) as stop:  # train_model.py prints it as one line
            train_model.main(run_args(proxy.url, tmp_path, tiny_encoder_dir,
                                      "--max_retries", "1", "--total_episodes", "6",
                                      "--checkpoint_every", "1"))
        assert time.monotonic() - start < 300
    message = str(stop.value)
    assert message.startswith("the ") and "\n" not in message
    assert f"server at {proxy.url}" in message and "(last: HTTP 500)" in message
    (run_dir,) = os.listdir(tmp_path)
    info = json.load(open(os.path.join(tmp_path, run_dir, "last.pt.json")))
    assert "HTTP 500" in info["metrics"]["stopped_by"]
    # the resume command is offered when a training state was saved before the failure
    saved = os.path.exists(os.path.join(tmp_path, run_dir, "train_state.pt"))
    assert ("--resume" in message) == saved


def test_bench_measures_served_self_play_and_plain_completions(server, tiny_encoder_dir,
                                                               tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "bench.py", "--backend", "openai", "--base_url", server.url,
         "--api_key_env", KEY_ENV, "--encoder", tiny_encoder_dir, "--num_envs", "2",
         "--total_episodes", "2", "--max_turn", "1", "--critic_samples", "2",
         "--system_max_new_tokens", "6", "--user_max_new_tokens", "6",
         "--critic_max_new_tokens", "4", "--batch_size", "2", "--learning_starts", "2",
         "--device", "cpu", "--json_out", str(out)],
        cwd=ROOT, capture_output=True,
        text=True, timeout=600, env=os.environ | {KEY_ENV: server.api_key})
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(out.read_text())["served"]
    assert served["turns"] == 2 and served["requests"] > 0 and served["retries"] == 0
    assert served["generated_tokens"] > 0 and served["plain_generate_tokens_per_second"] > 0
    assert 0 < served["selfplay_vs_plain"] and served["decode_steps"] is None


@pytest.mark.skipif(not os.path.isfile(NATIVE_SERVER),
                    reason="llama.cpp's llama-server is not built (make llama-server)")
def test_the_native_llama_server_serves_samples_and_the_prior(monkeypatch):
    """llama.cpp's own server with parallel slots (serve.py --engine native): the same
    client gets n samples, the exact prior from the completions endpoint, and stop."""
    from llm_transformers import TransformersLLM

    with LlamaServer(engine="native", slots=4, api_key=secrets.token_hex(16)) as native:
        monkeypatch.setenv(KEY_ENV, native.api_key)
        client = load_llm("openai", EMBEDDED_LLM, role="planner", base_url=native.url,
                          api_key_env=KEY_ENV, context_length=4096)
        samples = client.chat(QUESTIONS, max_new_tokens=6, temperature=1.0, num_samples=3,
                              stop_at_newline=True)
        assert [len(s) for s in samples] == [3, 3]
        assert all("\n" not in text for s in samples for text in s)
        conversations, labels = planner_prompts("esc", 2)
        prior = client.option_probs(conversations, labels)
        assert prior.shape == (2, len(labels))
        assert torch.allclose(prior.sum(-1), torch.ones(2), atol=1e-5)
        local = TransformersLLM.from_pretrained(client.tokenizer.name_or_path, device="cpu",
                                                dtype="float32")
        difference = (prior - local.option_probs(conversations, labels)).abs().max().item()
        print(f"native server: largest prior difference {difference:.4f}")
        assert difference < PRIOR_TOLERANCE


@pytest.mark.parametrize("flags,message", [
    (["--port", "-5"], "error: --port -5 is not a port: pass one in 0..65535 (0: a free one)"),
    (["--threads", "0"], "error: --threads 0 is out of range: pass a value >= 1"),
    (["--context", "x"], "error: argument --context: invalid int value: 'x'"),
])
def test_bad_serve_flags_are_one_error_line_before_a_server_starts(flags, message):
    line = one_error_line("serve.py", *flags, timeout=120)
    assert line.startswith(message), line


def test_a_seeded_sample_is_the_same_before_and_after_the_server_is_found_to_ignore_n():
    """A server that ignores n (llama.cpp) is found on the first call, whose first sample
    comes from the request that asked for n: it must carry the seed that sample has on
    every later call, or the first call of a run (or of a resumed run) draws other text."""
    import httpx

    def server(request):  # one choice whatever n is; its text is the request's seed
        seed = json.loads(request.content)["seed"]
        return httpx.Response(200, json={"choices": [{"message": {"content": str(seed)}}],
                                         "usage": {}})
    llm = OpenAILLM("http://server.test/v1", model="m", tokenizer="none", context_length=512)
    llm.http = httpx.AsyncClient(transport=httpx.MockTransport(server))
    first = llm.chat(QUESTIONS[:1], temperature=1.0, num_samples=3, seeds=[7])
    assert llm.n_supported is False
    assert llm.chat(QUESTIONS[:1], temperature=1.0, num_samples=3, seeds=[7]) == first
    assert len(set(first[0])) == 3
