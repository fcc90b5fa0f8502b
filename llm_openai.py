"""Served models: a role's LLM on any OpenAI-compatible server (vLLM, SGLang, llama.cpp,
Ollama, a hosted API).

    python train_model.py --backend openai --base_url http://127.0.0.1:8080/v1 --llm auto

Each batched call of a phase sends its requests concurrently (at most --max_concurrency
in flight per role) from one background asyncio loop. A request that fails on the
connection, times out (--request_timeout, the whole request), or is answered 408, 409,
429 or 5xx is retried up to --max_retries times with exponential backoff and jitter (a
Retry-After header sets the wait); then ServerError stops the run with one line naming
the server, the role and the last status. Other answers (400, 401, 404) stop it at once.

  chat:         one request per conversation with `n` samples; a server that answers with
                fewer choices (llama.cpp ignores n) gets the rest as concurrent requests,
                decided on first use and reported once. The critic's newline stop is
                passed as `stop`.
  option_probs: with the model's tokenizer (--tokenizer), the chat template is applied
                here and the completions endpoint gives the top next-token log-probs
                after the prompt and after each label prefix that longer labels extend
                (labels 1..19 with digit tokens: after the prompt and after "1"), so the
                prior is exact as in the in-process engine (llm.label_probs). Without
                it, the chat endpoint's first-token top_logprobs, exact only for labels
                that are no prefix of another (up to 9 options); otherwise, or when the
                server gives no log-probs, option_scoring_problem says why and the
                planner samples instead.
  usage:        requests, retries, prompt and completion tokens of this role's client.
  ledger:       per conversation (llm.LLMClient.charge): its requests, retries included,
                and the tokens the server's answers report: usage's completion_tokens,
                and its prompt_tokens less those it served from its prefix cache
                (prompt_tokens_details.cached_tokens, as OpenAI and vLLM report them, or
                llama-server's timings.cache_n). A server that reports no cached count
                (llama-cpp-python) leaves prompt_tokens_reused None and prompt_tokens
                whole: an upper bound on what it ran.
"""

import asyncio
import os
import random
import threading
import time

import httpx
import torch

from errors import ServerError
from llm import (EMBEDDED_LLM, LLMClient, add_cost, chat_prompt, floor_log_prob,
                 label_prefixes, label_probs, message_tokens_bound, resolve_llm_path,
                 stream_seed)

TOP_LOGPROBS = 20  # the most that the OpenAI API returns
RETRY_STATUSES = (408, 409, 429)  # and every 5xx: the server may answer a retry
MAX_RETRY_WAIT = 60.0  # seconds; a longer Retry-After is cut to this, to keep runs bounded
_loop = None  # one event loop thread serves every client in the process


def _run(coroutine):
    """Run a coroutine on the background loop and wait for its result. The loop lives in
    its own thread so that the synchronous training loop can call it from anywhere, and
    the HTTP connections stay open between calls."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        threading.Thread(target=_loop.run_forever, daemon=True, name="llm_openai").start()
    return asyncio.run_coroutine_threadsafe(coroutine, _loop).result()


def _retry_after(value):
    """Seconds from a Retry-After header given in seconds, or None (HTTP dates and
    garbage fall back to the backoff)."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None


def answer_counts(data):
    """The ledger's token counts of one answer (see the module docstring)."""
    usage = data.get("usage") or {}
    prompt, cached = usage.get("prompt_tokens"), None
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        cached = details.get("cached_tokens")
    if cached is None:
        cached = (data.get("timings") or {}).get("cache_n")
    if prompt is not None and cached is not None:
        prompt -= cached
    return {"prompt_tokens": prompt, "prompt_tokens_reused": cached,
            "generated_tokens": usage.get("completion_tokens")}


def new_tally():
    """One conversation's counts in one call, before its requests are sent."""
    return {"calls": 1, "requests": 0, "prompt_tokens": 0, "prompt_tokens_reused": 0,
            "generated_tokens": 0, "seconds": 0}


class NoLogprobs(ServerError):
    """The server's answer carries no log-probabilities. Found by option_scoring_problem
    before a run; met later (a role whose scoring was not checked), it stops the run with
    one line like any other ServerError."""


class OpenAILLM(LLMClient):
    """One role's client of an OpenAI-compatible server (see the module docstring)."""

    def __init__(self, base_url, model="auto", role="llm", api_key=None, tokenizer="auto",
                 max_concurrency=32, request_timeout=120.0, max_retries=4, seed=0,
                 backoff_seconds=0.5, context_length=0):
        self.base_url = base_url.rstrip("/")
        self.role = role
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.seed = seed
        # the key goes into the connection's headers only: never stored elsewhere or shown
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(headers=headers, timeout=request_timeout,
                                      limits=httpx.Limits(max_connections=max_concurrency))
        self.slots = asyncio.Semaphore(max_concurrency)
        super().__init__(model)
        self.usage.update(requests=0, retries=0, prompt_tokens=0, completion_tokens=0)
        self.n_supported = None  # does one request return n samples? decided on first use
        self.requests_sent = 0  # numbers the requests' seeds
        self._models = None  # the server's model list, asked on first use
        self.model = self.name = self._served_model() if model == "auto" else model
        self.endpoint = f"{self.base_url} ({self.model})"
        self.tokenizer = self._load_tokenizer(tokenizer)
        self.context_length = context_length or self._served_context_length()
        self._scoring_problems = {}

    def _listed_models(self):
        """The server's /models list, asked once."""
        if self._models is None:
            self._models = _run(self._request("GET", "/models", None)).get("data") or []
        return self._models

    def _served_model(self):
        """The first model the server lists: 'auto' needs no name for one-model servers."""
        if not self._listed_models():
            raise ServerError(f"the server at {self.base_url} lists no model; name one with "
                              f"--{self.role}_llm or --llm")
        return self._listed_models()[0]["id"]

    def _served_context_length(self):
        """The context the server lists for the model (vLLM and SGLang: max_model_len), or
        None with a warning: prompts then go uncut (llama.cpp and Ollama list none)."""
        try:
            listed = self._listed_models()
        except ServerError as error:  # a server or proxy without /models
            listed = []
            print(f"warning: {error}")
        length = next((m.get("max_model_len") for m in listed if m.get("id") == self.model),
                      None)
        if isinstance(length, int) and length > 0:
            return length
        print(f"warning: the {self.role} server at {self.base_url} does not list the "
              f"context length of '{self.model}'; prompts are not cut to fit it. Pass "
              "--context_length TOKENS")
        return None

    def count_tokens(self, messages):
        """The prompt's tokens with the model's tokenizer, else an upper bound on them."""
        if self.tokenizer is None:
            return message_tokens_bound(messages)
        return len(chat_prompt(self.tokenizer, messages)[1])

    def _load_tokenizer(self, name):
        """The served model's tokenizer, for the exact prior: 'auto' finds it where the
        model name is a local model folder or 'embedded-smollm2'; 'none' goes without."""
        if name == "none" or (name == "auto" and self.model != EMBEDDED_LLM
                              and not os.path.exists(os.path.join(self.model, "config.json"))):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(resolve_llm_path(
            self.model if name == "auto" else name))

    # -- requests ---------------------------------------------------------------------------

    async def _request(self, method, path, body, tries=None, tally=None):
        """JSON answer of one request, retried on connection errors, timeouts,
        RETRY_STATUSES and 5xx. tally: a conversation's counts, which every attempt adds
        a request to."""
        url = self.base_url + path
        tries = tries or self.max_retries + 1
        last, status = "no answer", None
        for attempt in range(tries):
            wait = None
            try:
                async with self.slots:
                    self.usage["requests"] += 1
                    if tally is not None:
                        tally["requests"] += 1
                    async with asyncio.timeout(self.request_timeout):
                        response = await self.http.request(method, url, json=body)
            except TimeoutError:
                last, status = f"no answer within {self.request_timeout:g} s", None
            except httpx.TransportError as error:  # refused, reset, read timeout, ...
                last, status = f"{type(error).__name__} {error}".strip(), None
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise ServerError(f"the {self.role} model's server at {url} answered "
                                          f"200 without JSON: {response.text[:200]!r}. Check "
                                          "that the URL ends in /v1", 200) from None
                status = response.status_code
                last = f"HTTP {status}"
                if status not in RETRY_STATUSES and status < 500:
                    raise ServerError(
                        f"the {self.role} model's server at {url} answered {last}: "
                        f"{response.text[:200]!r}. Check the model name (--{self.role}_llm), "
                        "the URL and the API key's variable (--api_key_env)", status)
                wait = _retry_after(response.headers.get("retry-after"))
            if attempt + 1 == tries:
                break
            if wait is None:  # exponential backoff with jitter, so clients do not align
                wait = self.backoff_seconds * 2 ** attempt * random.uniform(0.5, 1.5)
            self.usage["retries"] += 1
            await asyncio.sleep(min(wait, MAX_RETRY_WAIT))
        raise ServerError(f"the {self.role} model's server at {url} failed {tries} tries "
                          f"(last: {last}). Check that it is up (make serve), or raise "
                          "--max_retries / --request_timeout", status)

    async def _post(self, path, body, tries=None, seed=None, tally=None):
        self.requests_sent += 1
        # a seed per request: reproducible, and concurrent samples of one prompt differ
        if seed is None:
            seed = self.seed * 100003 + self.requests_sent
        data = await self._request("POST", path, body | {"seed": seed % 2**31}, tries, tally)
        usage = data.get("usage") or {}
        self.usage["prompt_tokens"] += usage.get("prompt_tokens") or 0
        self.usage["completion_tokens"] += usage.get("completion_tokens") or 0
        if tally is not None:
            add_cost(tally, answer_counts(data) | {"calls": 0, "requests": 0, "seconds": 0})
        return data

    # -- chat -------------------------------------------------------------------------------

    def rng_state(self):
        """The requests' seeds are numbered: a resumed run continues the numbering."""
        return self.requests_sent

    def load_rng_state(self, state):
        self.requests_sent = int(state)

    def chat(self, conversations, max_new_tokens=64, temperature=0.0, num_samples=1,
             shared_prefix=True, stop_at_newline=False, cache_keys=None, seeds=None):
        """num_samples answers per conversation. shared_prefix and cache_keys are the
        in-process engine's; a serving engine shares prompt caches by itself. seeds (one
        per conversation) set the requests' seeds, else they are numbered."""
        # top_p 1: no nucleus cut (llama.cpp's server would apply its default of 0.95)
        body = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": 1.0}
        if stop_at_newline:
            body["stop"] = ["\n"]
        seeds = seeds or [None] * len(conversations)
        start, tallies = time.perf_counter(), [new_tally() for _ in conversations]
        texts = _run(self._gather([self._samples(c, body, num_samples, seed, tally)
                                   for c, seed, tally in zip(conversations, seeds, tallies)]))
        self.charge(cache_keys, tallies, time.perf_counter() - start)
        return texts

    @staticmethod
    async def _gather(coroutines):
        """All results in order; when one fails, the others are cancelled (their retries
        would only keep a dead server busy after the run has stopped)."""
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _samples(self, messages, body, num_samples, seed=None, tally=None):
        texts = []
        if num_samples > 1 and self.n_supported is not False:
            # the seed of sample 0: a server that ignores n draws that sample alone, as it
            # does on every later call once that is known
            texts = await self._choices(messages, body, num_samples,
                                        None if seed is None else stream_seed(seed, 0), tally)
            if self.n_supported is None:
                self.n_supported = len(texts) >= num_samples
                print(f"{self.endpoint}: " + ("one request returns n samples" if self.n_supported
                      else "the server ignores n; one request per sample"), flush=True)
        more = await asyncio.gather(*[
            self._choices(messages, body, 1, None if seed is None else stream_seed(seed, k), tally)
            for k in range(len(texts), num_samples)])
        return (texts + [text for answer in more for text in answer])[:num_samples]

    async def _choices(self, messages, body, n, seed=None, tally=None):
        data = await self._post("/chat/completions", body | {"messages": messages} |
                                ({"n": n} if n > 1 else {}), seed=seed, tally=tally)
        return [(choice["message"].get("content") or "").strip() for choice in data["choices"]]

    # -- the prior --------------------------------------------------------------------------

    def option_scoring_problem(self, labels):
        """Why option_probs cannot be exact for these labels here, or None. Asks the
        server once per set of labels (one short request)."""
        key = tuple(labels)
        if key not in self._scoring_problems:
            self._scoring_problems[key] = self._find_scoring_problem(labels)
        return self._scoring_problems[key]

    def _find_scoring_problem(self, labels):
        if self.tokenizer is None and any(a != b and b.startswith(a)
                                          for a in labels for b in labels):
            return (f"the {self.role} model's option labels ({labels[0]} to {labels[-1]}) "
                    "may be several tokens long, and scoring them exactly needs the "
                    "model's tokenizer (--tokenizer PATH)")
        probe = [{"role": "user", "content": "Answer with a number from 1 to 3."}]
        try:
            _run(self._option_log_probs(probe, labels[:1], tries=1))
        except NoLogprobs:
            return f"the server at {self.base_url} gives no log-probabilities"
        except ServerError as error:
            if error.status is None:  # unreachable: not a missing feature
                raise
            return f"the server at {self.base_url} refused a log-probability request ({error})"
        return None

    def option_probs(self, conversations, labels, cache_keys=None):
        """P(answer = label) for each label, normalised over the labels ([batch, labels])."""
        start, tallies = time.perf_counter(), [new_tally() for _ in conversations]
        probs = _run(self._gather([self._option_log_probs(c, labels, tally=tally)
                                   for c, tally in zip(conversations, tallies)]))
        self.charge(cache_keys, tallies, time.perf_counter() - start)
        return torch.stack(probs)

    async def _option_log_probs(self, messages, labels, tries=None, tally=None):
        if self.tokenizer is None:
            top = await self._chat_top_logprobs(messages, tries, tally)
            tokens = [(label,) for label in labels]
            return label_probs(tokens, lambda prefix, token: top.get(token, floor_log_prob(top)))
        prompt, prompt_ids = chat_prompt(self.tokenizer, messages)
        label_ids = self.label_token_ids(prompt_ids, labels)
        prefixes = label_prefixes(label_ids)
        tops = await asyncio.gather(*[
            self._completion_top_logprobs(prompt + self.tokenizer.decode(list(p)), tries, tally)
            for p in prefixes])
        after = dict(zip(prefixes, tops))
        pieces = {t: self.tokenizer.decode([t]) for seq in label_ids for t in seq}
        return label_probs(label_ids, lambda prefix, token: after[prefix].get(
            pieces[token], floor_log_prob(after[prefix])))

    def _no_logprobs(self, endpoint):
        return (f"the {self.role} model's server at {self.base_url} returned {endpoint} "
                "without top_logprobs. Sample instead (--prior sample, --critic sample), or "
                "start a server that returns them (llama.cpp: --logits_all true)")

    async def _completion_top_logprobs(self, prompt, tries, tally=None):
        data = await self._post("/completions", {
            "model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
            "logprobs": TOP_LOGPROBS}, tries, tally=tally)
        logprobs = data["choices"][0].get("logprobs") or {}
        if logprobs.get("top_logprobs"):  # the OpenAI completions format: {token: logprob}
            return logprobs["top_logprobs"][0]
        content = logprobs.get("content")  # llama-server: the chat format, token by token
        if content and content[0].get("top_logprobs"):
            return {e["token"]: e["logprob"] for e in content[0]["top_logprobs"]}
        raise NoLogprobs(self._no_logprobs("completions"))

    async def _chat_top_logprobs(self, messages, tries, tally=None):
        data = await self._post("/chat/completions", {
            "model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
            "logprobs": True, "top_logprobs": TOP_LOGPROBS}, tries, tally=tally)
        content = (data["choices"][0].get("logprobs") or {}).get("content")
        if not content or not content[0].get("top_logprobs"):
            raise NoLogprobs(self._no_logprobs("chat completions"))
        top = {}
        for entry in content[0]["top_logprobs"]:  # " 3" and "3" both answer 3
            text = entry["token"].strip()
            top[text] = max(top.get(text, -1e9), entry["logprob"])
        return top


def load(name, role="llm", base_url="", api_key_env="OPENAI_API_KEY", tokenizer="auto",
         max_concurrency=32, request_timeout=120.0, max_retries=4, seed=0, context_length=0):
    """The backend factory's entry (llm.load_llm): `name` is the served model's name, or
    'auto' for the first one the server lists. The API key is read from the environment
    variable named by api_key_env (none is sent when it is unset: local servers)."""
    if not base_url:
        raise ValueError(f"--backend openai needs the server of the {role} model: "
                         f"--base_url http://HOST:PORT/v1 (or --{role}_base_url)")
    api_key = os.environ.get(api_key_env) if api_key_env else None
    return OpenAILLM(base_url, name, role, api_key=api_key, tokenizer=tokenizer,
                     max_concurrency=max_concurrency, request_timeout=request_timeout,
                     max_retries=max_retries, seed=seed, context_length=context_length)
