"""Shared fixtures: a tiny random chat LM, a tiny random BERT encoder and a scripted LLM
client. All build offline in well under a second. Also every helper that more than one
test file uses (test files import only from here, never from each other): the demo data
(DEMO), the scripted learning worlds (World, sequence_world, harm_world, bargain_world,
esc_cases, cb_cases) and the scripted runs of train_model.py (make_runs; the command line
tests/scripted_runs.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llm import LLMClient  # noqa: E402 (after the path)
from tasks import get_task  # noqa: E402

def one_error_line(script, *args, timeout=300):
    """Run `python script args` in the project root; assert that it ended with exit code 2
    and exactly one line on stderr, and return that line."""
    done = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 2 and done.stderr.splitlines() == [done.stderr.strip()], \
        done.stderr[-3000:]
    return done.stderr.strip()


SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
DEMO = os.path.join(ROOT, "data", "demo")
# the device of the LLM tests: cpu here and in CI; DIALOGXPERT_TEST_DEVICE=cuda on a GPU machine
DEVICE = os.environ.get("DIALOGXPERT_TEST_DEVICE", "cpu")
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_llm(folder, seed=0, vocab_size=None, config_overrides=None):
    """A random Llama-style chat model with a byte-level tokenizer (digits are single
    tokens, so multi-digit labels are multi-token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<pad>", bos_token=None)
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab_size or len(vocab), hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=4096,
                    eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"],
                    bos_token_id=None, tie_word_embeddings=False)
    settings.update(config_overrides or {})
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_encoder(folder, seed=0):
    """A random 2-layer BERT with a character vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)},
                                  do_lower_case=True)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=512))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a whole run, a served model, the browser, a "
                            "subprocess or a benchmark (over about 2 s); `make test-fast` "
                            "leaves these out")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    return build_tiny_llm(str(tmp_path_factory.mktemp("tiny_llm")))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    return build_tiny_encoder(str(tmp_path_factory.mktemp("tiny_encoder")))


@pytest.fixture(scope="session")
def tiny_llm(tiny_llm_dir):
    from llm_transformers import TransformersLLM

    return TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32")


class ScriptedLLM(LLMClient):
    """An LLM client whose answers come from Python functions of the prompt text.

    reply(prompt_text) -> str is called once per requested sample;
    prior(prompt_text, labels) -> list of weights, for option_probs.

    Each call is charged to the ledger as a real client's is (LLMClient.charge), with the
    client's own token counts: count_tokens of the prompt, and an answer's UTF-8 bytes;
    `log` keeps every call's [(cache key, prompt tokens, generated tokens)]."""

    def __init__(self, reply, prior=None):
        super().__init__()
        self.reply = reply
        self.prior = prior
        self.calls = []
        self.log = []

    def chat(self, conversations, max_new_tokens=64, temperature=0.0, num_samples=1,
             shared_prefix=True, stop_at_newline=False, cache_keys=None, seeds=None):
        start = time.perf_counter()
        self.calls.append(("chat", len(conversations), num_samples))
        texts = ["\n".join(m["content"] for m in c) for c in conversations]
        answers = [[self.reply(t) for _ in range(num_samples)] for t in texts]
        self._charge(conversations, answers, cache_keys, start)
        return answers

    def option_probs(self, conversations, labels, cache_keys=None):
        start = time.perf_counter()
        self.calls.append(("option_probs", len(conversations)))
        if self.prior is None:
            probs = torch.full((len(conversations), len(labels)), 1.0 / len(labels))
        else:
            weights = torch.tensor([self.prior(c[-1]["content"], labels)
                                    for c in conversations], dtype=torch.float)
            probs = weights / weights.sum(-1, keepdim=True)
        self._charge(conversations, [[] for _ in conversations], cache_keys, start)
        return probs

    def _charge(self, conversations, answers, cache_keys, start):
        keys = cache_keys or [None] * len(conversations)
        rows = [(key, self.count_tokens(c), sum(len(a.encode()) for a in texts))
                for key, c, texts in zip(keys, conversations, answers)]
        self.log.append(rows)
        self.charge(cache_keys, [{"calls": 1, "requests": None, "prompt_tokens": prompt,
                                  "prompt_tokens_reused": 0, "generated_tokens": generated}
                                 for _, prompt, generated in rows],
                    time.perf_counter() - start)


def listed_options(prompt):
    """The numbered options of a planner or critic question, in the order shown."""
    return [match.group(1) for match in re.finditer(r"^\d+\. (.+)$", prompt, re.M)]


def option_number(prompt, option):
    """The number that a planner or critic question shows for an option (its text)."""
    return str(listed_options(prompt).index(option) + 1)


def write_json_lines(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------
# Scripted worlds whose best policy is known (test_learning.py; also test_policies,
# test_recipes, test_resume and test_train)
# ---------------------------------------------------------------------------------------

SYSTEM_TEXT = "I hear you."


class World:
    """A scripted task world. The system always says the same words, so an action is
    visible to the agent only through the user's reply: the next state must be read
    after that reply. `history[key]` holds the actions played in each conversation."""

    def __init__(self, task_name, prior_order, user_reply, critic_answers, num_samples=2):
        self.task = get_task(task_name)
        self.history = {}
        names = self.task.action_names
        order = prior_order if callable(prior_order) else lambda prompt: prior_order
        self.prior = ScriptedLLM(None, prior=lambda prompt, labels: [
            10.0 - order(prompt).index(n) if n in order(prompt) else 0.1 for n in names])

        def system(prompt):
            key = self.key(prompt)
            instruction = prompt[prompt.rindex("("):]
            action = next(a for a in names if self.task.actions[a] in instruction)
            turn = prompt.count(SYSTEM_TEXT)  # system turns already played
            self.history[key] = self.history.get(key, [])[:turn] + [action]
            return f"Emotion: calm\nResponse: {SYSTEM_TEXT}"

        self.system = ScriptedLLM(system)
        self.user = ScriptedLLM(lambda prompt: user_reply(self.history[self.key(prompt)]))
        self.critic = ScriptedLLM(lambda prompt: self._critic(prompt, critic_answers))

    @staticmethod
    def key(prompt):
        return re.search(r"case (\d+)", prompt).group(1)

    def _critic(self, prompt, critic_answers):
        # the critic is asked num_samples times per turn: cycle through the answers
        answers = critic_answers(self.history[self.key(prompt)])
        self.asked = (getattr(self, "asked", -1) + 1)
        return answers[self.asked % len(answers)]

    def env(self, max_turn, top_k=4):
        from critic import Critic
        from env import Planner, SelfPlayEnv

        critic = Critic(self.task, self.critic, num_samples=2)
        return SelfPlayEnv(self.task, self.system, self.user, critic,
                           planner=Planner(self.task, self.prior), top_k=top_k,
                           max_turn=max_turn)


def esc_cases(first, count):
    return [{"emotion_type": "sadness", "problem_type": "job", "situation": f"I feel low, case {i}.",
             "dialog": []} for i in range(first, first + count)]


def cb_cases(first, count):
    return [{"item_name": f"bike case {i}", "buyer_price": 100, "seller_price": 200,
             "buyer_item_description": "A bike.", "seller_item_description": "A bike."}
            for i in range(first, first + count)]


# (a) success needs "Question" then "Providing Suggestions"; "Others" pays more at once

FIRST, SECOND, DECOY = "Question", "Providing Suggestions", "Others"


def sequence_world():
    def user_reply(history):
        return "Tell me what I can do." if history[-1] == FIRST else "Okay."

    def critic_answers(history):
        if history[-2:] == [FIRST, SECOND]:
            return ["4"]  # solved: +1, success
        return {FIRST: ["2"], DECOY: ["3", "1"]}.get(history[-1], ["1"])  # -0.5, -0.25, -1

    # the same prior in every state, so that only the user's reply tells the states apart
    return World("esc", [DECOY, FIRST, SECOND, "Information"], user_reply, critic_answers)


# (b) one action makes the patient feel worse; the others leave them the same

HARMFUL = "Self-disclosure"


def harm_world():
    def critic_answers(history):
        return ["1"] if history[-1] == HARMFUL else ["2"]  # worse: -1, same: -0.5

    return World("esc", [HARMFUL, "Question", "Others", "Information"],
                 lambda history: "Okay.", critic_answers)


# (c) bargaining: three actions close a deal at different prices

PRICES = {"counter": 120, "propose": 170, "agree": 200}  # sale-to-list 0.8, 0.3, 0.0


def bargain_world():
    def critic_answers(history):
        price = PRICES.get(history[-1])
        return [f"2, {price}"] if price else ["1"]

    return World("cb", ["agree", "propose", "inquire", "counter"],
                 lambda history: "Fine.", critic_answers)


# ---------------------------------------------------------------------------------------
# Real runs of train_model.py on esc with scripted LLM clients and a tiny random encoder:
# a trained run and a random-policy baseline on the same test cases and seed (a paired
# evaluation). view.py is tested on these (test_view.py), and benchmarked at scale:
#
#     python tests/scripted_runs.py /tmp/scripted --cases 10000    # then bench.py --view RUN
#
# The scripted world: the prior ranks "Question" fourth; a turn that plays it solves the
# problem (the critic answers 4), other turns get a mix of usable and unusable critic
# answers; the system breaks the "Emotion: ... Response: ..." format on every fourth case,
# and on case ids ending in 1 the user and one critic answer carry HTML and a script.
# ---------------------------------------------------------------------------------------

RUN_TASK = get_task("esc")
RUN_PRIOR_ORDER = ["Others", "Self-disclosure", "Affirmation and Reassurance", "Question",
                   "Information", "Providing Suggestions", "Reflection of feelings",
                   "Restatement or Paraphrasing"]
# markup an LLM might write: the page must show it as text and run none of it
INJECTED = ('</script><script>window.injected = 1</script><img src=x '
            'onerror="window.injected = 2"></textarea><b>bold</b>')
RUN_CRITIC_CYCLE = ["2", "Option 9", "3", "I cannot tell."]


def case_number(prompt):
    return int(re.search(r"case (\d+)", prompt).group(1))


def played_action(prompt):
    """The action whose instruction the system LLM was given (None: no strategy)."""
    instruction = prompt[prompt.rindex("("):]
    return next((a for a in RUN_TASK.action_names if RUN_TASK.actions[a] in instruction),
                None)


def scripted_llms():
    last = {}  # case -> the action of its latest system turn
    asked = {}  # case -> critic answers given so far

    def system(prompt):
        case = case_number(prompt)
        last[case] = played_action(prompt)
        if case % 4 == 3:
            return f"I would try this: {last[case]}."  # no "Emotion: ... Response: ..."
        return f"Emotion: worried\nResponse: Let us talk it through ({last[case]})."

    def user(prompt):
        case = case_number(prompt)
        return INJECTED if case % 10 == 1 else "I see. That helps a little."

    def critic(prompt):
        case = case_number(prompt)
        asked[case] = asked.get(case, 0) + 1
        if last[case] == "Question":
            return "4"
        if case % 10 == 1 and asked[case] % 4 == 1:
            return INJECTED
        return RUN_CRITIC_CYCLE[asked[case] % len(RUN_CRITIC_CYCLE)]

    prior = ScriptedLLM(None, prior=lambda prompt, labels: [
        10.0 - RUN_PRIOR_ORDER.index(n) for n in RUN_TASK.action_names])
    return {"planner": prior, "system": ScriptedLLM(system), "user": ScriptedLLM(user),
            "critic": ScriptedLLM(critic)}


def interrupt_at_system_call(world, count):
    """SIGINT to this process from inside the world's count-th system answer (mid-step),
    as a Ctrl-C would arrive."""
    reply, calls = world.system.reply, []

    def interrupting_reply(prompt):
        calls.append(prompt)
        if len(calls) == count:
            os.kill(os.getpid(), signal.SIGINT)
        return reply(prompt)
    world.system.reply = interrupting_reply


def q_policy(args, encoder, **options):
    """The DialogXpert policy (Q-adapter) of args's task on this encoder; options: its
    constructor's (models, timer)."""
    from q_adapter import QAdapterPolicy

    return QAdapterPolicy(args, get_task(args.data_name), encoder, **options)


def esc_case(i):
    return {"emotion_type": "sadness", "problem_type": "job", "dialog": [],
            "situation": f"I feel low about my job, case {i}."}


@contextmanager
def transformers_warnings():
    """The messages that transformers logs at WARNING or above while inside (its own
    handler writes to the stderr it found at import, which pytest may have replaced)."""
    import logging

    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger("transformers").removeHandler(handler)


@contextmanager
def models_from(load_llms):
    """harness.load_llms is load_llms(args) -> {role: client} while inside."""
    import harness

    saved = harness.load_llms
    harness.load_llms = load_llms
    try:
        yield
    finally:
        harness.load_llms = saved


def scripted_models():
    """harness.load_llms gives the scripted clients while inside."""
    return models_from(lambda args: scripted_llms())


def make_runs(root, test_cases=12, train_episodes=8, max_turn=3, baseline="random"):
    """Data, encoder, a trained run and (baseline not None) a baseline test run under root;
    returns their run folders."""
    import train_model

    data, encoder = os.path.join(root, "data"), os.path.join(root, "encoder")
    os.makedirs(data, exist_ok=True)
    for split, first, count in (("train", 0, 8), ("valid", 1000, 4), ("test", 0, test_cases)):
        with open(os.path.join(data, f"esc-{split}.txt"), "w") as f:
            f.writelines(json.dumps(esc_case(first + i)) + "\n" for i in range(count))
    if not os.path.isdir(encoder):
        build_tiny_encoder(encoder)
    common = ["--data_name", "esc", "--data_dir", data, "--encoder", encoder,
              "--max_turn", str(max_turn), "--critic_samples", "4", "--num_envs", "64",
              "--progress", "false", "--device", "cpu", "--seed", "1",
              "--output_dir", os.path.join(root, "runs"), "--max_encoder_tokens", "64"]
    with scripted_models():
        _, trained = train_model.main(common + [
            "--total_episodes", str(train_episodes), "--eval_every", str(train_episodes // 2),
            "--batch_size", "4", "--learning_starts", "4", "--exp_name", "trained"])
        runs = [trained]
        if baseline:
            runs.append(train_model.main(common + ["--mode", "test", "--policy", baseline,
                                                   "--exp_name", "baseline"])[1])
    return runs
