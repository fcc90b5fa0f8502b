"""Self-play speed benchmark: the original one-at-a-time loop against the batched one, and
the in-process engine against a served model.

    python bench.py                                   # embedded SmolLM2 on CPU, N = 16
    python bench.py --num_envs 64 --random_model qwen2.5-1.5b --max_turn 4   # on a GPU
    python bench.py --serve                           # in-process against llama.cpp's server
    python bench.py --backend openai --base_url http://HOST:PORT/v1 --llm NAME   # any server
    python bench.py --view runs/<run>                 # view.py's page of a run in chromium

Both modes play the same training episodes (same cases, model and seeds) through the real
training loop, each in its own process so that peak memory is measured per mode:
  baseline: one conversation at a time, the prior sampled as --baseline_prior_tokens tokens
            of text and parsed, the critic prompt repeated once per sample
  fast:     --num_envs conversations per batched call (finished ones replaced by new
            ones), the prior from one forward pass, critic samples decoded from the
            prompt's shared KV cache and ended at their first line break
  served:   the fast loop with every role on an OpenAI-compatible server (requests of a
            phase sent concurrently); with --serve, the embedded SmolLM2 on llama.cpp's
            server, started for the run, against the same model in process (fast)
It prints turns per second for each mode, their ratio, time per phase (prior, system,
user, critic, encoder, Q update, other), the LLM's share of wall time, tokens per second,
the tokens per second of plain batched generation of the same lengths (a `generate` call,
or for a server as many concurrent plain completions as --num_envs) and peak memory (the
server's too, when this script started it), and writes the same figures to --json_out.
Any train_model.py flag can be added (e.g. --critic_samples 10 --system_max_new_tokens 80).
"""

import argparse
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

from errors import UserError, one_line_errors
from get_args import ROLES, TRAINED_POLICIES as TRAINED, Args
from llm import EMBEDDED_LLM, LLMClient, check_device
from serve import LlamaServer

PHASES = ("prior", "system", "user", "critic", "encoder", "q_update")


class PhaseClock:
    def __init__(self, device):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextmanager
    def __call__(self, phase):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[phase] += time.perf_counter() - start
            self.calls[phase] += 1


class TimedLLM(LLMClient):
    """Times one role's calls to a shared LLM client and counts its conversations; every
    other member is the inner client's."""

    def __init__(self, inner, phase, clock):
        super().__init__(inner.name)
        self.inner, self.phase, self.clock = inner, phase, clock
        self.context_length = inner.context_length
        self.usage, self.stats, self.ledger = inner.usage, inner.stats, inner.ledger
        self.conversations = 0

    def chat(self, conversations, **kwargs):  # keyword arguments as in TransformersLLM.chat
        self.conversations += len(conversations)
        with self.clock(self.phase):
            return self.inner.chat(conversations, **kwargs)

    def option_probs(self, conversations, labels, **kwargs):
        with self.clock(self.phase):
            return self.inner.option_probs(conversations, labels, **kwargs)

    def option_scoring_problem(self, labels):
        return self.inner.option_scoring_problem(labels)

    def count_tokens(self, messages):
        return self.inner.count_tokens(messages)

    def forget(self, conversation_id):
        self.inner.forget(conversation_id)

    def rng_state(self):
        return self.inner.rng_state()

    def load_rng_state(self, state):
        self.inner.load_rng_state(state)


def random_qwen_shaped_model(name, device, dtype, tokenizer_dir=""):
    """A randomly initialised model of a Qwen2.5 shape (no weights can be downloaded on the
    benchmark machines), with the tokenizer from tokenizer_dir (any chat tokenizer; a
    real BPE keeps prompt lengths realistic) or else a byte-level ChatML one."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
    from conftest import build_tiny_encoder, build_tiny_llm

    shapes = {"qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960,
                                   num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1e6,
                                   tie_word_embeddings=True),
              # a few-MB model of the same vocabulary, for smoke tests of this script
              "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=151936,
                           tie_word_embeddings=True)}
    if name not in shapes:
        raise ValueError(f"Unknown --random_model '{name}'. Expected one of {sorted(shapes)}")
    folder = tempfile.mkdtemp()
    if not tokenizer_dir:
        tokenizer_dir = build_tiny_llm(os.path.join(folder, "llm"))  # only its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(**shapes[name], eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    encoder_dir = build_tiny_encoder(os.path.join(folder, "encoder"))
    bert_shape = {} if name != "tiny" else dict(hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=64)
    bert = AutoModel.from_config(BertConfig(**bert_shape)).to(device)  # bert-base shape
    bert = bert.to(dtype)  # as FrozenEncoder.from_pretrained does
    return model, tokenizer, bert, AutoTokenizer.from_pretrained(encoder_dir)


def run_mode(mode, bench, args):
    """Play the episodes in this process; returns the figures as a dict."""
    import harness
    import trainer
    from llm import backend_options, load_llm, pick_device, pick_dtype
    from llm_transformers import TransformersLLM
    from q_adapter import FrozenEncoder, QAdapterPolicy, resolve_encoder_path
    from tasks import get_task, load_split

    harness.seed_everything(args.seed)
    task = get_task(args.data_name)
    if mode == "baseline":  # before the LLM is built: it reads prefix_cache_gb
        args = dataclasses.replace(
            args, total_episodes=bench.baseline_episodes or args.total_episodes, num_envs=1,
            prior="sample", prior_samples=1, shared_prefix=False, critic_stop_at_newline=False,
            prefix_cache_gb=0.0, prior_max_new_tokens=bench.baseline_prior_tokens)
    device = pick_device(args.device)
    clock = PhaseClock(device)  # the encoder's and the Q update's timing hook too
    if mode == "served":  # one client for every role: the server's own figures
        llm = load_llm("openai", args.llm, **backend_options(args, "self-play"))
        encoder = FrozenEncoder.from_pretrained(resolve_encoder_path(args.encoder),
                                                args.max_encoder_tokens, args.device, clock)
    elif bench.random_model:
        model, tokenizer, bert, bert_tokenizer = random_qwen_shaped_model(
            bench.random_model, device, pick_dtype(device, args.dtype),
            bench.random_model_tokenizer)
        llm = TransformersLLM(model, tokenizer, seed=args.seed, name=bench.random_model,
                              max_batch_rows=args.max_batch_rows,
                              prefix_cache_gb=args.prefix_cache_gb)
        encoder = FrozenEncoder(bert, bert_tokenizer, args.max_encoder_tokens, clock)
    else:
        llm = load_llm(args.backend, args.llm, **backend_options(args, "self-play"))
        encoder = FrozenEncoder.from_pretrained(resolve_encoder_path(args.encoder),
                                                args.max_encoder_tokens, args.device, clock)
    roles = {role: TimedLLM(llm, phase, clock) for role, phase in
             (("planner", "prior"), ("system", "system"), ("user", "user"),
              ("critic", "critic"))}
    env = harness.build_env(args, task, roles)
    agent = QAdapterPolicy(args, task, encoder, timer=clock)
    cases = load_split(args.data_dir, task.name, "train", extes_seed=args.extes_seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counters_before = llm_counters(llm)
    with tempfile.TemporaryDirectory() as run_dir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(run_dir) as writer:
            start = time.perf_counter()
            trainer.train(args, agent, env, cases, [], run_dir, writer)
            clock.sync()
            wall = time.perf_counter() - start
    turns = roles["system"].conversations
    env_steps = clock.calls["system"]
    counters_after = llm_counters(llm)

    def counted(key):  # what this run added to one of the LLM's counters
        return counters_after.get(key, 0) - counters_before.get(key, 0)

    generated, steps = counted("generated_tokens"), counted("decode_steps")
    phases = {p: clock.seconds[p] for p in PHASES}
    phases["other"] = wall - sum(phases.values())
    llm_seconds = sum(phases[p] for p in ("prior", "system", "user", "critic"))
    figures = {"mode": mode, "num_envs": args.num_envs, "episodes": args.total_episodes,
               "turns": turns, "wall_seconds": wall, "turns_per_second": turns / wall,
               "env_steps": env_steps, "conversations_per_env_step": turns / max(env_steps, 1),
               "phase_seconds": phases, "llm_share": llm_seconds / wall,
               "generated_tokens": int(generated), "prompt_tokens": int(counted("prompt_tokens")),
               "prompt_tokens_reused": int(counted("prompt_tokens_reused")),
               "prompt_positions": int(counted("prompt_positions")),
               "decode_steps": int(steps),
               "sequences_per_decode_step": counted("decoded_sequences") / max(steps, 1),
               "generated_tokens_per_second": generated / wall,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "device": str(device), "model": llm.name,
               "dtype": str(next(llm.model.parameters()).dtype) if mode != "served" else "served"}
    if mode == "served":  # the server's decoding is not visible from here
        figures |= {key: None for key in ("prompt_tokens_reused", "prompt_positions",
                                          "decode_steps", "sequences_per_decode_step")}
        figures |= {"requests": int(counted("requests")), "retries": int(counted("retries")),
                    "plain_generate_tokens_per_second": plain_completion_rate(llm, args, cases,
                                                                              task)}
    if device.type == "cuda":
        figures["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        figures["gpu"] = torch.cuda.get_device_name()
    if mode == "fast":
        figures["plain_generate_tokens_per_second"] = plain_generate_rate(llm, args, cases, task)
    return figures


def llm_counters(llm):
    """Tokens and steps so far: the in-process engine's stats, or a client's usage."""
    if llm.stats:
        return dict(llm.stats)
    return dict(llm.usage) | {"generated_tokens": llm.usage["completion_tokens"]}


def system_prompts(args, cases, task):
    """num_envs system-turn prompts, the plain workload that self-play is compared with."""
    from env import new_conversation, system_prompt

    return [system_prompt(task, new_conversation(task, cases[i % len(cases)]),
                          task.action_names[0]) for i in range(args.num_envs)]


def plain_completion_rate(llm, args, cases, task):
    """The server's tokens per second for num_envs concurrent plain chat completions of
    system_max_new_tokens tokens: the reference for served self-play throughput."""
    prompts = system_prompts(args, cases, task)
    rates = []
    for _ in range(2):  # the first round warms up
        before, start = llm.usage["completion_tokens"], time.perf_counter()
        llm.chat(prompts, max_new_tokens=args.system_max_new_tokens,
                 temperature=args.system_temperature)
        rates.append((llm.usage["completion_tokens"] - before) / (time.perf_counter() - start))
    return rates[-1]


def left_pad(sequences, pad_id, device):
    """Token id lists as one left-padded batch: (input_ids, attention_mask) on device."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        attention_mask[row, width - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def plain_generate_rate(llm, args, cases, task):
    """Tokens per second of one plain batched `generate` call: num_envs system prompts,
    system_max_new_tokens new tokens each, the reference for self-play throughput."""
    prompts = [llm.encode_chat(p) for p in system_prompts(args, cases, task)]
    input_ids, attention_mask = left_pad(prompts, llm.pad_id, llm.device)
    rates = []
    for _ in range(2):  # the first call warms up
        sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = llm.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 max_new_tokens=args.system_max_new_tokens, do_sample=True,
                                 temperature=args.system_temperature,
                                 pad_token_id=llm.pad_id)
        sync()
        new_tokens = (out[:, input_ids.shape[1]:] != llm.pad_id).sum().item()
        rates.append(new_tokens / (time.perf_counter() - start))
    return rates[-1]


def print_table(results, modes):
    columns = [results[mode] for mode in modes]

    def row(label, value, fmt):
        cells = [fmt.format(value(c)) if value(c) is not None else "-" for c in columns]
        print(f"{label:24}" + "".join(f"{cell:>14}" for cell in cells))

    print(f"\n{'':24}" + "".join(f"{mode:>14}" for mode in modes))
    for label, key, fmt in (("episodes", "episodes", "{:.0f}"), ("turns", "turns", "{:.0f}"),
                            ("conversations / step", "conversations_per_env_step", "{:.1f}"),
                            ("wall s", "wall_seconds", "{:.1f}"),
                            ("turns / s", "turns_per_second", "{:.3f}")):
        row(label, lambda c: c.get(key), fmt)
    for phase in PHASES + ("other",):
        row(phase + " s", lambda c: c["phase_seconds"][phase], "{:.2f}")
    for label, key, fmt in (("LLM share of wall", "llm_share", "{:.1%}"),
                            ("generated tokens", "generated_tokens", "{:.0f}"),
                            ("prompt tokens", "prompt_tokens", "{:.0f}"),
                            ("prompt positions run", "prompt_positions", "{:.0f}"),
                            ("decode steps", "decode_steps", "{:.0f}"),
                            ("sequences / step", "sequences_per_decode_step", "{:.1f}"),
                            ("requests", "requests", "{:.0f}"),
                            ("retries", "retries", "{:.0f}"),
                            ("generated tokens / s", "generated_tokens_per_second", "{:.1f}"),
                            ("plain tokens / s", "plain_generate_tokens_per_second", "{:.1f}"),
                            ("self-play / plain", "selfplay_vs_plain", "{:.1%}"),
                            ("peak RSS GB", "peak_rss_gb", "{:.2f}"),
                            ("server peak RSS GB", "server_peak_rss_gb", "{:.2f}"),
                            ("peak GPU memory GB", "peak_gpu_memory_gb", "{:.2f}")):
        row(label, lambda c: c.get(key), fmt)
    if "speedup" in results:
        print(f"\nspeed-up (fast / baseline turns per second): {results['speedup']:.2f}x "
              f"at num_envs = {results['fast']['num_envs']}")
    print("plain tokens / s: one batched `generate` call in process, or --num_envs "
          "concurrent plain completions on a server, of --system_max_new_tokens tokens")
    for c in columns:
        print(f"{c['mode']}: device {c['device']} {c.get('gpu', '')}, dtype {c['dtype']}, "
              f"model {c['model']}")


def state_write_figures(args, widths, repeats=3):
    """Seconds and size of one training-state write (run_state.save_state: fsync and
    rename) with a full replay buffer of --buffer_size transitions, per encoder width
    (384: MiniLM, 768: BERT-base), best of `repeats`."""
    import run_state
    from q_adapter import QHead
    from replay_buffer import ReplayBuffer

    figures = {}
    for width in widths:
        buffer = ReplayBuffer(args.buffer_size, width, args.top_k)
        buffer.features.normal_()
        buffer.next_features.normal_()
        buffer.next_mask.fill_(True)
        buffer.size = args.buffer_size
        head = QHead(width, args.hidden_size)
        optimizer = torch.optim.Adam(head.parameters())
        head(torch.randn(2, width)).sum().backward()
        optimizer.step()
        state = {"agent": {"q_head": head.state_dict(), "target_head": head.state_dict(),
                           "optimizer": optimizer.state_dict()},
                 "buffer": buffer.state_dict()}
        with tempfile.TemporaryDirectory(dir=".") as folder:
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                run_state.save_state(folder, state)
                seconds.append(time.perf_counter() - start)
            size = os.path.getsize(os.path.join(folder, run_state.STATE_FILE))
        figures[width] = {"seconds": min(seconds), "megabytes": size / 1e6}
        print(f"training state, buffer {args.buffer_size} x top-{args.top_k}, width {width}: "
              f"{size / 1e6:.1f} MB written in {min(seconds):.2f} s")
    return figures


def prior_probe(args, count, shifts=(0, 1, 2, 4)):
    """How much of the planner's prior is the position of the options: on the first
    `count` human conversations of the valid split (the opening and the first four human
    turns), the top-1 action of the prior read in the task's list shifted by each of
    `shifts` places (fixed), and of the mean over every rotation (rotate, which does not
    depend on the list it starts from)."""
    from env import Conversation, Planner
    from llm import backend_options, load_llm
    from tasks import get_task, load_split

    task = get_task(args.data_name)
    cases = load_split(args.data_dir, task.name, "valid", extes_seed=args.extes_seed)[:count]
    llm = load_llm(args.backend, args.llm, **backend_options(args, "planner"))
    planner = Planner(task, llm, use_emotion=args.use_emotion)
    n = len(task.actions)
    conversations = [Conversation(case, task.opening(case) + task.human_dialog(case)[
        len(task.opening(case)):][:4], emotions=list(task.initial_emotions(case)), stream=i)
        for i, case in enumerate(cases)]
    tops = {}
    for shift in shifts:
        order = [(shift + i) % n for i in range(n)]
        probs = llm.option_probs([planner.prompt(c, order) for c in conversations],
                                 planner.labels)
        tops[shift] = [order[int(row.argmax())] for row in probs]
    rotating = Planner(task, llm, use_emotion=args.use_emotion, order="rotate")
    rotated = rotating.prior(conversations)
    top_rotated = [int(row.argmax()) for row in rotated]
    figures = {
        "conversations": len(conversations),
        "fixed_top1_is_first_listed": {s: sum(t == s for t in tops[s]) / len(cases)
                                       for s in shifts},
        "fixed_top1_same_after_a_shift_by_one": sum(
            a == b for a, b in zip(tops[shifts[0]], tops[shifts[1]])) / len(cases),
        "rotate_top1_is_first_listed": {s: sum(t == s for t in top_rotated) / len(cases)
                                        for s in shifts},
        "rotate_top1_actions": {task.action_names[a]: top_rotated.count(a)
                                for a in sorted(set(top_rotated))},
        "rotate_mean_top1_prior": float(rotated.max(dim=1).values.mean()),
        "uniform_prior": 1 / n}
    print(json.dumps(figures, indent=2))
    return figures


def order_costs(results):
    """Per turn: seconds of the prior and the critic, and prompt tokens, under fixed and
    controlled orders (the fast mode's figures of each)."""
    rows = {}
    for name, figures in results.items():
        turns = max(figures["turns"], 1)
        rows[name] = {"prior_seconds_per_turn": figures["phase_seconds"]["prior"] / turns,
                      "critic_seconds_per_turn": figures["phase_seconds"]["critic"] / turns,
                      "prompt_tokens_per_turn": figures["prompt_tokens"] / turns,
                      "prompt_tokens_reused_per_turn": figures["prompt_tokens_reused"] / turns,
                      "turns_per_second": figures["turns_per_second"]}
    print("| per turn | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for key in next(iter(rows.values())):
        print(f"| {key} | " + " | ".join(f"{row[key]:.4g}" for row in rows.values()) + " |")
    return rows


def run_child(mode, flags, name):
    """One mode's figures, from a process of its own (so that its peak memory is its own)."""
    command = [sys.executable, os.path.abspath(__file__), "--only", mode, *flags]
    print(f"running {name} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the {name} run failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


# in the page: pick the first outcome, or open the first conversation listed; the time
# until the browser has laid the page out again, in milliseconds
FILTER_JS = """() => { const start = performance.now();
  const box = document.getElementById("f-outcome"); box.value = box.options[1].value;
  box.dispatchEvent(new Event("change"));
  document.body.offsetHeight; return performance.now() - start; }"""
OPEN_JS = """() => { const start = performance.now(); document.querySelector("#rows tr").click();
  document.body.offsetHeight; return performance.now() - start; }"""


def view_figures(folders, repeats=3, browser=None):
    """Size of view.py's page of these runs and, in headless chromium, the seconds from
    navigation to the list shown (the file read, parsed and the first page of rows laid
    out), to filter it by outcome, and to open a conversation; best of `repeats` loads.
    browser: a Playwright browser context to use (default: one started here)."""
    import view

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "view.html")
        start = time.perf_counter()
        view.write_page(folders, path)
        written = time.perf_counter() - start
        with open(path, encoding="utf-8") as f:
            count = len(re.search(r'id="conversations-data">(.*?)</script>', f.read(),
                                  re.S).group(1).split("\n"))
        if browser is None:
            from playwright.sync_api import sync_playwright

            with sync_playwright() as playwright:
                context = playwright.chromium.launch_persistent_context(
                    os.path.join(folder, "profile"), executable_path=view.CHROMIUM,
                    args=view.CHROMIUM_FLAGS, headless=True)
                times = page_times(context, path, repeats)
                context.close()
        else:
            times = page_times(browser, path, repeats)
        figures = {"conversations": count, "runs": len(folders),
                   "megabytes": os.path.getsize(path) / 1e6, "write_seconds": written}
    figures |= {f"{name}_seconds": min(values) for name, values in times.items()}
    print(f"view page of {count} conversations ({len(folders)} run(s)): "
          f"{figures['megabytes']:.1f} MB, written in {written:.1f} s; in chromium, best of "
          f"{repeats}: list shown {figures['open_seconds']:.2f} s after navigation, filtered "
          f"by outcome in {figures['filter_seconds']:.3f} s, a conversation opened in "
          f"{figures['conversation_seconds']:.3f} s")
    return figures


def page_times(context, path, repeats):
    times = defaultdict(list)
    for _ in range(repeats):
        page = context.new_page()  # a fresh page: the file is read and parsed again
        page.goto("file://" + path)
        page.wait_for_function("window.viewReady !== undefined", timeout=120_000)
        times["open"].append(page.evaluate("window.viewReady") / 1000)
        times["filter"].append(page.evaluate(FILTER_JS) / 1000)
        times["conversation"].append(page.evaluate(OPEN_JS) / 1000)
        page.close()
    return times


PLANNERS = ("dialogxpert", "ppdpp", "gdpzero", "dpdp")


def planner_figures(args, planners=PLANNERS):
    """Seconds and LLM tokens per turn of each planner at the same batch (--num_envs
    conversations of the train split's cases, played as a test: untrained policies, whose
    cost does not depend on their weights), and GDP-Zero's search with the simulations of
    the whole batch in each LLM call against one conversation at a time (--num_envs 1, the
    same conversations), and with --mcts_parallel above 1 against one simulation after
    another on the same batch. One model in process serves every role."""
    import harness
    from llm import backend_options, load_llm
    from policies import make_policy, policy_class
    from q_adapter import FrozenEncoder, resolve_encoder_path
    from tasks import get_task, load_split

    harness.seed_everything(args.seed)
    task = get_task(args.data_name)
    llm = load_llm(args.backend, args.llm, **backend_options(args, "self-play"))
    encoder = FrozenEncoder.from_pretrained(resolve_encoder_path(args.encoder),
                                            args.max_encoder_tokens, args.device)
    cases = load_split(args.data_dir, task.name, "train", extes_seed=args.extes_seed)
    cases = (cases * args.num_envs)[:args.num_envs]
    runs = [(name, name, args.num_envs, args.mcts_parallel) for name in planners]
    if "gdpzero" in planners:
        if args.mcts_parallel > 1:
            runs.append(("gdpzero, sims in turn", "gdpzero", args.num_envs, 1))
        runs.append(("gdpzero, one at a time", "gdpzero", 1, 1))
    figures = {}
    for label, name, num_envs, parallel in runs:
        # an untrained policy plays as in a test (mode only passes the flags' checks)
        run_args = Args(**vars(args) | {"policy": name, "num_envs": num_envs,
                                        "mcts_parallel": parallel,
                                        "mode": "train" if name in TRAINED else "test"})
        env = harness.build_env(run_args, task, dict.fromkeys(ROLES, llm))
        policy = make_policy(run_args, task, encoder if policy_class(name).uses_encoder
                             else None)
        policy.attach(env)
        before = {key: llm.stats[key] for key in TOKEN_COUNTERS}
        start = time.perf_counter()
        _, conversations = harness.evaluate(run_args, policy, env, cases, "bench")
        seconds = time.perf_counter() - start
        turns = sum(c.system_turns for c in conversations)
        figures[label] = {"num_envs": num_envs,
                          "mcts_parallel": getattr(policy, "parallel", None),  # as searched
                          "conversations": len(conversations),
                          "turns": turns, "seconds": seconds, "seconds_per_turn": seconds / turns}
        figures[label] |= {f"{key}_per_turn": (llm.stats[key] - before[key]) / turns
                           for key in TOKEN_COUNTERS}
        # every token that went through the model (prompt run and generated), per second:
        # where this stays the same across planners, wall time follows the tokens run
        run = sum(llm.stats[key] - before[key] for key in ("prompt_tokens", "generated_tokens"))
        figures[label]["tokens_run_per_second"] = run / seconds
        print(f"{label:>24}: {seconds / turns:7.2f} s/turn, "
              + ", ".join(f"{key} {(llm.stats[key] - before[key]) / turns:,.0f}/turn"
                          for key in TOKEN_COUNTERS)
              + f", {run / seconds:,.0f} tokens run/s", flush=True)
    base = figures.get("dialogxpert", {}).get("seconds_per_turn")
    for label, row in figures.items():
        row["vs_dialogxpert"] = row["seconds_per_turn"] / base if base else None
    return figures


TOKEN_COUNTERS = ("prompt_tokens", "prompt_tokens_reused", "generated_tokens")


def missing_weights(args, bench):
    """The one-line error of harness.check_weights for what this benchmark loads (the
    planner probe: the LLM; the others: the LLM and the encoder, and PPDPP's for the
    planners that fine-tune one), or None. --serve plays the embedded model."""
    from harness import check_weights

    planners = set(bench.planners.split(",")) if bench.planners else set()
    encoders = () if bench.prior_probe else ("encoder",) + (
        ("policy_encoder",) if planners & {"ppdpp", "dpdp"} else ())
    try:
        check_weights(args, roles=() if bench.serve else ROLES, encoder_flags=encoders)
    except UserError as error:
        return str(error)
    return None


def main(argv=None):
    from get_args import build_parser

    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--random_model", default="",
                        help="benchmark a randomly initialised model of this shape "
                             "(qwen2.5-1.5b, or tiny for a smoke test) instead of --llm")
    parser.add_argument("--random_model_tokenizer", default="",
                        help="tokenizer folder for --random_model (default: byte-level)")
    parser.add_argument("--baseline_episodes", type=int, default=0,
                        help="play only the first this many of the episodes in the slow "
                             "baseline (default: all); turns per second stay comparable")
    parser.add_argument("--baseline_prior_tokens", type=int, default=25,
                        help="tokens sampled for the prior in the baseline mode")
    parser.add_argument("--serve", action="store_true",
                        help="compare the in-process engine (fast) with llama.cpp's server "
                             "(served) on the embedded SmolLM2, the server started here")
    parser.add_argument("--serve_threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="llama.cpp threads for --serve")
    parser.add_argument("--serve_engine", choices=("python", "native"), default="python",
                        help="the server of --serve (serve.py): llama-cpp-python's, or "
                             "llama.cpp's llama-server with --num_envs parallel slots")
    parser.add_argument("--state_write", default="",
                        help="only time writing a training state with a full buffer, for "
                             "these encoder widths (e.g. 384,768)")
    parser.add_argument("--orders", action="store_true",
                        help="the fast loop with fixed option orders against controlled "
                             "ones (--prior_order rotate, --critic_order shuffle): the cost "
                             "of the orders per turn")
    parser.add_argument("--prior_probe", type=int, default=0,
                        help="only probe the planner's position preference on this many "
                             "valid conversations (--data_dir must hold the valid split)")
    parser.add_argument("--planners", default="",
                        help="only time these planners (e.g. dialogxpert,ppdpp,gdpzero,dpdp): "
                             "seconds and LLM tokens per turn at the same batch, and "
                             "GDP-Zero batched against one conversation at a time")
    parser.add_argument("--json_out", default="bench_results/bench.json")
    parser.add_argument("--view", nargs="+", metavar="RUN", default=None,
                        help="only measure view.py's page of these runs in headless "
                             "chromium: size, time to open, filter and show a conversation")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)  # child process
    # 96 episodes are six batches of 16: when the episodes run out the batch drains
    # (its last steps serve a few conversations at nearly the cost of a full batch), as it
    # does once at the end of training; with few batches that tail dominates the figure.
    # The baseline's 32 episodes: a turn's cost grows with the conversation's length, and
    # with 16 the baseline's sampled conversations were 1.4 to 2.3 turns long on average
    parser.set_defaults(data_dir="data/demo", num_envs=16, total_episodes=96,
                        baseline_episodes=32, max_turn=4,
                        critic_samples=10, learning_starts=16, eval_every=10**9,
                        progress=False)
    namespace = parser.parse_args(argv)
    bench = argparse.Namespace(**{k: vars(namespace).pop(k) for k in
                                  ("random_model", "random_model_tokenizer",
                                   "baseline_episodes", "baseline_prior_tokens", "json_out",
                                   "only", "serve", "serve_threads", "serve_engine",
                                   "state_write", "orders", "prior_probe", "view", "planners")})
    try:
        args = Args(**vars(namespace))
    except ValueError as error:
        raise UserError(str(error)) from None
    if bench.state_write and not re.fullmatch(r"\d+(,\d+)*", bench.state_write):
        raise UserError(f"--state_write '{bench.state_write}' is not a list of widths. Pass "
                        "integers separated by commas, e.g. --state_write 384,768")
    if bench.view:
        view_figures(bench.view)
        return 0
    if bench.state_write:
        state_write_figures(args, [int(w) for w in bench.state_write.split(",")])
        return 0
    check_device(args.device)
    if not bench.random_model:  # a random model loads no weights
        problem = missing_weights(args, bench)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if bench.prior_probe:
        prior_probe(args, bench.prior_probe)
        return 0
    if bench.planners:
        results = {"planners": planner_figures(args, bench.planners.split(",")),
                   "args": vars(args)}
        os.makedirs(os.path.dirname(bench.json_out) or ".", exist_ok=True)
        with open(bench.json_out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"figures written to {bench.json_out}")
        return 0
    if bench.only:
        print(json.dumps(run_mode(bench.only, bench, args)))
        return 0
    given = argv if argv is not None else sys.argv[1:]
    if bench.orders:
        results = {}
        for name, flags in (("fixed orders", ["fixed", "fixed"]),
                            ("controlled orders", ["rotate", "shuffle"])):
            results[name] = run_child("fast", [a for a in given if a != "--orders"] + [
                "--prior_order", flags[0], "--critic_order", flags[1]], name)
        results["per_turn"] = order_costs(results)
        os.makedirs(os.path.dirname(bench.json_out) or ".", exist_ok=True)
        with open(bench.json_out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"figures written to {bench.json_out}")
        return 0

    modes = (("fast", "served") if bench.serve else ("served",) if args.backend == "openai"
             else ("fast", "baseline"))
    results = {}
    serving = LlamaServer(threads=bench.serve_threads, engine=bench.serve_engine,
                          slots=args.num_envs) if bench.serve else nullcontext()
    with serving as server:
        for mode in modes:
            flags = list(given)
            if server is not None:  # the same model in process and on the server
                flags += ["--llm", EMBEDDED_LLM] + (
                    ["--backend", "openai", "--base_url", server.url] if mode == "served" else [])
            results[mode] = run_child(mode, flags, mode)
            results[mode]["selfplay_vs_plain"] = (
                results[mode]["generated_tokens_per_second"] /
                results[mode]["plain_generate_tokens_per_second"]) if mode != "baseline" else None
            if server is not None and mode == "served":
                results[mode]["server_peak_rss_gb"] = server.peak_rss_gb()
    if "baseline" in results:
        results["speedup"] = (results["fast"]["turns_per_second"] /
                              results["baseline"]["turns_per_second"])
    results["args"] = vars(args)
    print_table(results, modes)
    os.makedirs(os.path.dirname(bench.json_out) or ".", exist_ok=True)
    with open(bench.json_out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"figures written to {bench.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
