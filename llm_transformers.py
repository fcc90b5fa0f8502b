"""The in-process backend: a local Hugging Face chat model on this project's own batched
decoding loop (see docs/speed.md).

A batch of conversations shares one forward pass per token, sampled answers to one prompt
share the prompt's KV cache, rows that have finished stop costing compute, and each
conversation's last prompt per role keeps its KV cache so that the next turn runs only its
new tokens. The engine's parts (PrefixCache, packed_sdpa_attention, ReservedLayer,
split_by_length, sample_categorical) follow transformers 5's internals.

    llm = load("weights/Qwen2.5-1.5B-Instruct", device="cuda")   # or llm.load_llm(...)
"""

import ctypes
import functools
import inspect
import platform
import sys
import time
from collections import OrderedDict

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from llm import (LLMClient, chat_prompt, label_probs, pick_device, pick_dtype,
                 resolve_llm_path, stream_seed)

def heap_trimmer():
    """glibc's malloc_trim, or None on other C libraries.

    PyTorch's CPU tensors are freed into the C heap, and glibc keeps the free pages of a
    fragmented heap: over a 96-episode benchmark the process grew from 1.5 to 3.0 GB of
    RSS with 1.7 to 1.8 GB in use. malloc_trim(0) returns the free pages to the system
    (20 to 90 ms a call there)."""
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        return ctypes.CDLL("libc.so.6").malloc_trim
    return None


class PrefixCache:
    """KV caches of recent prompts, keyed by the caller: (conversation, role) pairs.

    A conversation's next prompt for the same role mostly repeats the last one (the same
    instructions and earlier turns), so only the tokens after their common prefix need a
    forward pass. A conversation's first prompt for a role starts from the latest prompt of
    that role, which opens with the same instructions; a copy of a conversation (`branch`)
    starts from its nearest ancestor's prompt of the role, which holds all but its new
    turns. Least recently used entries are dropped beyond `max_bytes`."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.entries = OrderedDict()  # key -> (token ids, [(keys, values) per layer])
        self.latest = {}  # role -> key of its latest entry
        self.parents = {}  # conversation -> the conversation it was copied from
        self.bytes = 0

    @staticmethod
    def _size(layers):
        return sum(k.numel() * k.element_size() * 2 for k, _ in layers)

    def get(self, key):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        if not isinstance(key, tuple):
            return None
        owner = self.parents.get(key[0])
        while owner is not None:  # the nearest ancestor's entry of the role
            if (owner, *key[1:]) in self.entries:
                return self.get((owner, *key[1:]))
            owner = self.parents.get(owner)
        return self.entries.get(self.latest.get(key[-1]))

    def branch(self, child, parent):
        self.parents[child] = parent

    def forget(self, owner):
        """Drop the entries of (owner, role) keys, except the latest entry of each role,
        which later conversations start from."""
        self.parents.pop(owner, None)
        for key in [k for k in self.entries if isinstance(k, tuple) and k[0] == owner
                    and self.latest.get(k[-1]) != k]:
            self.bytes -= self._size(self.entries.pop(key)[1])

    def clear(self):
        self.entries.clear()
        self.latest.clear()
        self.parents.clear()
        self.bytes = 0

    def state(self):
        """The entries (least recently used first), each role's latest and the copies'
        parents, as lists and tensors."""
        return {"entries": [[key, ids, [[k, v] for k, v in layers]]
                            for key, (ids, layers) in self.entries.items()],
                "latest": dict(self.latest), "parents": dict(self.parents)}

    def load_state(self, state, device):
        self.clear()
        for key, ids, layers in state["entries"]:
            self.put(key, ids, [(k.to(device), v.to(device)) for k, v in layers])
        self.latest, self.parents = dict(state["latest"]), dict(state["parents"])

    def put(self, key, ids, layers):
        if key in self.entries:
            self.bytes -= self._size(self.entries.pop(key)[1])
        self.entries[key] = (ids, layers)
        self.bytes += self._size(layers)
        if isinstance(key, tuple):
            self.latest[key[-1]] = key
        while self.bytes > self.max_bytes and self.entries:
            self.bytes -= self._size(self.entries.popitem(last=False)[1][1])


PACKED_SDPA = "packed_sdpa"


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0,
                          scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention, except for decoding steps of grouped-query models.

    A decoding step has few queries per row: one, or one per sample stream in tree
    decoding. For those (and for short masked prefills of up to 64 tokens), the query
    heads that share a key/value head are stacked along the query axis, [batch, heads, q,
    dim] -> [batch, kv_heads, groups * q, dim], so that attention reads each key/value head
    once. The stock path instead copies every key/value head `groups` times per layer when
    a multi-query mask is given, and on CPU takes a ~5x slower kernel (enable_gqa) when no
    mask is given. Longer prefills and all other cases go to the stock function."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_length, dim = query.shape
    plain = dropout == 0.0 and not any(kwargs.get(k) is not None for k in
                                       ("softcap", "sinks", "s_aux", "position_bias"))
    mask_ok = attention_mask is None or (attention_mask.dim() == 4
                                         and attention_mask.shape[1] == 1
                                         and attention_mask.shape[2] == q_length)
    if groups == 1 or not plain or not mask_ok or not (
            q_length == 1 or (q_length <= 64 and attention_mask is not None)):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, is_causal=is_causal,
                                      **kwargs)
    packed = query.reshape(batch, heads // groups, groups * q_length, dim)
    mask = attention_mask
    if mask is not None and q_length > 1:  # rows of the packed query: (group, query)
        mask = mask.repeat(1, 1, groups, 1)
    if query.device.type == "cpu" and groups * q_length <= 32:
        out = _matmul_attention(packed, key, value, mask, scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(packed, key, value,
                                                               attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q_length, dim).transpose(1, 2).contiguous(), None


def _matmul_attention(query, key, value, mask, scaling):
    """Attention as two matmuls and a float32 softmax, as transformers' eager attention
    computes it. For a few queries per row, PyTorch's CPU flash kernel is slower: 1.24
    against 0.80 ms a layer for 16 rows of 700 tokens on the 2-core development machine.
    Masked scores get the lowest float instead of -inf, so a row that sees nothing (a
    padding position) stays finite."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float()
    scores.mul_(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        else:
            scores += mask
    return torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


class ReservedLayer(DynamicLayer):
    """One layer's KV cache with room for `reserve` more tokens at the end of its buffers.

    transformers' DynamicLayer concatenates every new token onto the whole cache, a full
    copy per layer per decoding step (on a 2-core CPU about a third of a 16-row step).
    Here new tokens are written into the spare room and `keys`/`values` are views of the
    filled part; the buffers are reallocated only when the room runs out."""

    def __init__(self, reserve=0):
        super().__init__()
        self.reserve = reserve
        self.length = 0
        self._keys = self._values = None

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.length = 0
        self._keys = self._values = None
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._keys is None or end > self._keys.shape[-2]:
            self._keys = self._grow(self._keys, key_states, end)
            self._values = self._grow(self._values, value_states, end)
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self._set_length(end)
        return self.keys, self.values

    def _grow(self, buffer, states, end):
        batch, heads, _, dim = states.shape
        grown = states.new_empty(batch, heads, end + self.reserve, dim)
        if self.length:
            grown[:, :, :self.length] = buffer[:, :, :self.length]
        return grown

    def _set_length(self, length):
        self.length = length
        self.keys = self._keys[:, :, :length]
        self.values = self._values[:, :, :length]

    @classmethod
    def allocate(cls, like, batch, length, reserve):
        """A layer of `length` positions for `batch` rows, shaped like the states `like`;
        the positions are filled with write_rows."""
        layer = cls(reserve)
        layer.lazy_initialization(like, like)
        heads, dim = like.shape[1], like.shape[3]
        layer._keys = like.new_empty(batch, heads, length + reserve, dim)
        layer._values = like.new_empty(batch, heads, length + reserve, dim)
        layer._set_length(length)
        return layer

    def write_rows(self, rows, keys, values):
        """Set all positions of the given rows (a tensor of row indices)."""
        self._keys[rows, :, :self.length] = keys
        self._values[rows, :, :self.length] = values

    def crop(self, tokens_to_remove):
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of tokens to remove")
        if self.length:
            self._set_length(max(0, self.length + tokens_to_remove))

    def batch_repeat_interleave(self, repeats):
        if self.length:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._set_length(self.length)

    def batch_select_indices(self, indices):
        if self.length:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._set_length(self.length)


def reserved_cache(reserve):
    """A DynamicCache whose layers keep room for `reserve` more tokens (see ReservedLayer)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(ReservedLayer, reserve=reserve)
    return cache


def split_by_length(lengths, overhead):
    """Groups of row indices to run in separate forward passes. A pass costs its rows times
    its longest row (the others are padded to it) plus `overhead` tokens' worth of fixed
    cost; rows are sorted by length and cut where that total is least (dynamic programming
    over the cut points)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cost of the first j sorted rows
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for start in range(end):
            cost = best[start] + (end - start) * longest + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def _common_prefix_length(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TransformersLLM(LLMClient):
    """A local causal LM with a chat template, decoded by a batched sampling loop."""

    def __init__(self, model, tokenizer, seed=0, name="model", max_batch_rows=0,
                 prefix_cache_gb=0.0, context_length=0):
        super().__init__(name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        if tokenizer.chat_template is None:
            raise ValueError(f"The tokenizer of '{name}' has no chat template; use an "
                             "instruction-tuned (chat) model.")
        self.device = next(model.parameters()).device
        if model.config._attn_implementation == "sdpa":
            model.set_attn_implementation(PACKED_SDPA)
        if self.device.type == "cuda":
            # cuDNN's attention builds a new execution plan for every new sequence length,
            # and self-play meets a new length at every decoding step; the flash and
            # memory-efficient kernels need no plan
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.stop_ids = self._stop_token_ids()
        # rows decoded together; the KV cache of a batch grows with rows x length
        self.max_batch_rows = max_batch_rows or (160 if self.device.type == "cpu" else 1024)
        self._newline_ids = None  # tokens that contain a line break, found on first use
        # decode a row's unfinished samples only (see _generate); off: all until the last ends
        self.compact_streams = True
        if prefix_cache_gb < 0:  # automatic: it pays where compute is scarce (docs/speed.md)
            prefix_cache_gb = 1.0 if self.device.type == "cpu" else 0.0
        self.prefix_cache = PrefixCache(prefix_cache_gb * 2**30) if prefix_cache_gb > 0 else None
        # fixed cost of a forward pass, in prompt tokens' worth of compute: a CPU is
        # compute-bound (~1 ms a token for a 135M model) and pays ~50 ms a pass for reading
        # the weights; a GPU runs a few thousand tokens in about the time of one pass
        self.forward_overhead_tokens = 64 if self.device.type == "cpu" else 4096
        # transformers 5 renamed the forward argument past_key_values to cache
        forward_arguments = inspect.signature(self.model.forward).parameters
        self.cache_argument = "cache" if "cache" in forward_arguments else "past_key_values"
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.stop_ids[0]
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # the embedding matrix may be padded past the tokenizer's vocabulary
        self.vocab_size = len(tokenizer)
        # on CPU, the heap's free pages go back to the system after every call
        self.trim_heap = heap_trimmer() if self.device.type == "cpu" else None
        # tokens a prompt and its answer may use (llm.fit_prompt): the model's positions,
        # or fewer when asked (context_length also bounds the KV cache's memory)
        positions = getattr(model.config, "max_position_embeddings", None)
        self.context_length = min(filter(None, (context_length, positions)), default=None)

    @classmethod
    def from_pretrained(cls, path, device="auto", dtype="auto", seed=0, max_batch_rows=0,
                        prefix_cache_gb=0.0, context_length=0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = pick_device(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(device, dtype))
        return cls(model.to(device), tokenizer, seed=seed, name=path,
                   max_batch_rows=max_batch_rows, prefix_cache_gb=prefix_cache_gb,
                   context_length=context_length)

    def rng_state(self):
        return self.generator.get_state()

    def load_rng_state(self, state):
        self.generator.set_state(state)

    def cache_state(self):
        """The prefix cache: a prompt that reuses a cached prefix gets slightly other floats
        than one computed whole (docs/outputs.md#stopping-and-resuming)."""
        return self.prefix_cache.state() if self.prefix_cache is not None else None

    def load_cache_state(self, state):
        if self.prefix_cache is not None:
            self.prefix_cache.load_state(state, self.device)

    def clear_cache(self):
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def forget(self, conversation_id):
        """Drop the prefix-cache entries of a finished conversation."""
        if self.prefix_cache is not None:
            self.prefix_cache.forget(conversation_id)

    def branch(self, conversation_id, parent_id):
        if self.prefix_cache is not None:
            self.prefix_cache.branch(conversation_id, parent_id)

    def _stop_token_ids(self):
        ids = set()
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        if not ids:
            raise ValueError(f"The tokenizer of '{self.name}' has no end-of-turn token")
        return sorted(ids)

    # -- prompts --------------------------------------------------------------------------

    def encode_chat(self, messages):
        return chat_prompt(self.tokenizer, messages)[1]

    def count_tokens(self, messages):
        return len(self.encode_chat(messages))

    def _left_pad(self, sequences):
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, width - len(seq):] = torch.tensor(seq)
            attention_mask[row, width - len(seq):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _prefill(self, rows, keys=None, store_lengths=None, keep=1, reserve=0):
        """Forward prompt rows into a fresh KV cache; returns (logits of the last `keep`
        positions, cache, attention mask, position of each row's last token, reused).

        Rows with a key reuse the prefix cache (see _prefill_group); afterwards each key's
        entry holds the first store_lengths[i] tokens of its row (default: all of it).
        Padding costs as much compute as a real token, so rows whose numbers of new tokens
        differ a lot are run in separate forward passes (split_by_length). The result is
        one cache with each row's tokens right-aligned, [pad][row], and room for `reserve`
        more tokens per row; it equals a plain left-padded forward of the rows. Also
        returned: the tokens of each row reused from the prefix cache (for the ledger)."""
        keys = keys or [None] * len(rows)
        cached = [self.prefix_cache.get(k) if self.prefix_cache and k is not None else None
                  for k in keys]
        # at least `keep` tokens of each row are new: their logits are wanted
        reuse = [max(0, min(_common_prefix_length(entry[0], row), len(row) - keep))
                 if entry else 0 for entry, row in zip(cached, rows)]
        groups = split_by_length([len(row) - n for row, n in zip(rows, reuse)],
                                 self.forward_overhead_tokens)
        stored = set()
        if len(groups) == 1 and not any(reuse):  # one plain left-padded batch: [pad][row]
            logits, cache, mask = self._prefill_group(rows, cached, reuse, keep, reserve)
            self._store(rows, keys, store_lengths, cache, mask, stored)
            return logits, cache, mask, mask.sum(-1, keepdim=True) - 1, reuse
        lengths = torch.tensor([len(row) for row in rows], device=self.device)
        width = int(lengths.max())
        mask = (torch.arange(width, device=self.device) >= width - lengths[:, None]).long()
        logits, cache = None, reserved_cache(reserve)
        for group in groups:
            pick = lambda items: [items[i] for i in group]  # noqa: E731
            group_logits, group_cache, group_mask = self._prefill_group(
                pick(rows), pick(cached), pick(reuse), keep, 0)
            self._store(pick(rows), pick(keys), store_lengths and pick(store_lengths),
                        group_cache, group_mask, stored)
            index = torch.tensor(group, device=self.device)
            if logits is None:
                logits = group_logits.new_empty(len(rows), *group_logits.shape[1:])
            logits[index] = group_logits
            # for every column of the merged cache, the group cache position it comes from:
            # a stable sort of the 0/1 mask lists each row's padding, then its tokens in order
            source = group_mask.sort(dim=1, stable=True).indices[:, -width:]
            source = torch.nn.functional.pad(source, (width - source.shape[1], 0))
            for layer_index, layer in enumerate(group_cache.layers):
                if layer_index == len(cache.layers):
                    cache.layers.append(ReservedLayer.allocate(
                        layer.keys, len(rows), width, reserve))
                gather = source[:, None, :, None].expand(-1, layer.keys.shape[1], -1,
                                                         layer.keys.shape[3])
                cache.layers[layer_index].write_rows(index, layer.keys.gather(2, gather),
                                                     layer.values.gather(2, gather))
                group_cache.layers[layer_index] = None  # free it now: peak memory
        return logits, cache, mask, lengths[:, None] - 1, reuse

    def _prefill_group(self, rows, cached, reuse, keep, reserve):
        """One forward pass over the rows' new tokens; returns (logits of the last `keep`
        positions, cache, attention mask). The cached part of every row comes first, the
        new tokens last, each block left-padded: [pad][cached][pad][new]. Padding is masked
        out and positions count real tokens only."""
        width = max(reuse)
        new_ids, new_mask = self._left_pad([row[n:] for row, n in zip(rows, reuse)])
        # the cached part goes in first: make room for the new tokens too
        cache = reserved_cache(reserve + (new_ids.shape[1] if width else 0))
        old_mask = new_mask.new_zeros(len(rows), width)
        if width:
            layers = next(entry[1] for entry in cached if entry)
            for layer, (sample_k, sample_v) in enumerate(layers):
                shape = (len(rows), sample_k.shape[1], width, sample_k.shape[3])
                k = sample_k.new_zeros(shape)
                v = sample_v.new_zeros(shape)
                for i, (entry, n) in enumerate(zip(cached, reuse)):
                    if n:
                        k[i, :, width - n:] = entry[1][layer][0][0, :, :n]
                        v[i, :, width - n:] = entry[1][layer][1][0, :, :n]
                cache.update(k, v, layer)
            for i, n in enumerate(reuse):
                old_mask[i, width - n:] = 1
        attention_mask = torch.cat([old_mask, new_mask], 1)
        reuse_t = torch.tensor(reuse, device=self.device)[:, None]
        position_ids = (reuse_t + new_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=new_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, logits_to_keep=keep,
                         **{self.cache_argument: cache})
        self.stats["prompt_tokens"] += int(new_mask.sum())
        self.stats["prompt_positions"] += new_mask.numel()  # padding included
        self.stats["prompt_tokens_reused"] += sum(reuse)
        return out.logits[:, -keep:].float(), cache, attention_mask

    def _store(self, rows, keys, store_lengths, cache, attention_mask, stored):
        if self.prefix_cache is None:
            return
        for i, (row, key) in enumerate(zip(rows, keys)):
            if key is None or key in stored:
                continue
            stored.add(key)
            length = store_lengths[i] if store_lengths else len(row)
            where = attention_mask[i].nonzero().squeeze(-1)[:length]
            layers = [(layer.keys[i:i + 1, :, where].clone(), layer.values[i:i + 1, :, where].clone())
                      for layer in cache.layers]
            self.prefix_cache.put(key, list(row[:length]), layers)

    def _forward(self, input_ids, attention_mask, cache, position_ids, keep=1):
        """Logits of the last `keep` positions; the cache object is updated in place."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, logits_to_keep=keep,
                         **{self.cache_argument: cache})
        return out.logits[:, -keep:].float(), cache

    # -- generation -----------------------------------------------------------------------

    @torch.no_grad()
    def chat(self, conversations, max_new_tokens=64, temperature=0.0, num_samples=1,
             shared_prefix=True, stop_at_newline=False, cache_keys=None, seeds=None):
        """Answer each conversation `num_samples` times.

        With shared_prefix the prompt is run once and its samples are decoded from one
        copy of its KV cache (see _generate); otherwise the prompt is repeated num_samples
        times (the original release's behaviour, kept for the benchmark). temperature 0
        decodes greedily. With stop_at_newline an answer ends at its first line break after
        some text (a critic verdict is one line). At most `max_batch_rows` rows decode together: the
        conversations are split into groups that fit, which bounds the KV cache's memory.
        cache_keys (one per conversation, or None) let a prompt reuse the KV cache of the
        last prompt with the same key (see PrefixCache). seeds (one per conversation, or
        None: the client's own generator) give each conversation its own random stream."""
        start = time.perf_counter()
        prompts = [self.encode_chat(c) for c in conversations]
        keys = cache_keys or [None] * len(prompts)
        per_group = max(1, self.max_batch_rows // num_samples)
        texts, costs = [], []
        for first in range(0, len(prompts), per_group):
            group_texts, group_costs = self._generate(
                prompts[first:first + per_group], max_new_tokens, temperature, num_samples,
                shared_prefix, stop_at_newline, keys[first:first + per_group],
                seeds and seeds[first:first + per_group])
            texts += group_texts
            costs += group_costs
        self._trim_heap()
        seconds = time.perf_counter() - start
        self.stats["generate_seconds"] += seconds
        self.charge(cache_keys, costs, seconds)
        return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(conversations))]

    def _trim_heap(self):
        if self.trim_heap is not None:
            self.trim_heap(0)
            self.stats["heap_trims"] += 1

    def _generate(self, prompts, max_new_tokens, temperature, num_samples,
                  shared_prefix, stop_at_newline, keys, seeds):
        """Decode num_samples answers per prompt; returns the texts, prompt by prompt, and
        each prompt's counts for the ledger (llm.COST_COUNTS but seconds).

        With shared_prefix the samples of one prompt are decoded as `num_samples` query
        streams of one row: each step feeds one token per stream, at the same position,
        and a 4D attention mask lets a stream see the prompt and its own earlier tokens
        only. The prompt's KV cache is held once per row and read once per step for all
        its samples (tree decoding), instead of being copied for every sample."""
        streams = num_samples if shared_prefix else 1
        if not shared_prefix:
            prompts = [p for p in prompts for _ in range(num_samples)]
            keys = [k for k in keys for _ in range(num_samples)]
            seeds = seeds and [stream_seed(s, j) for s in seeds for j in range(num_samples)]
        # with seeds, each row draws from a generator of its own, all its steps' uniforms
        # at once (one transfer a call), else every step from the client's generator
        own = None
        if seeds and temperature > 0:
            own = torch.stack([torch.rand(max_new_tokens, streams,
                                          generator=torch.Generator().manual_seed(s))
                               for s in seeds]).to(self.device)
        logits, cache, prompt_mask, last_position, reused = self._prefill(
            prompts, keys, reserve=max_new_tokens * streams)
        logits = logits[:, -1:].expand(-1, streams, -1)  # every stream starts from the prompt
        next_position = last_position + 1  # [rows, 1]: all streams of a row are at one position

        rows = logits.shape[0]
        stop_ids = torch.tensor(self.stop_ids, device=self.device)
        newline_ids = self.newline_token_ids() if stop_at_newline else None
        # generated tokens stay on the device; one host sync per step (the "all done?"
        # check), so the CPU can queue the next forward while the GPU finishes this one
        tokens = torch.full((rows, streams, max_new_tokens), self.stop_ids[0], device=self.device)
        done = torch.zeros(rows, streams, dtype=torch.bool, device=self.device)
        has_text = torch.zeros(rows, streams, dtype=torch.bool, device=self.device)
        lengths = torch.full((rows, streams), max_new_tokens, device=self.device)
        active = torch.arange(rows, device=self.device)  # rows with a stream still going
        width = prompt_mask.shape[1]
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(rows, max_new_tokens)], 1)
        # streams > 1: the query slots of a row hold its unfinished streams (-1: an idle
        # slot, when other rows have more unfinished streams); owner is the stream of each
        # generated KV position (-2 for an idle slot's), so a stream sees only its own tokens
        slots = torch.arange(streams, device=self.device).repeat(rows, 1)
        owner = slots.new_empty(rows, 0)
        for step in range(max_new_tokens):
            # one uniform per (row, stream) and step, whatever the batch holds by now: the
            # samples do not depend on when other rows or streams finish
            uniforms = None
            if temperature > 0:
                if own is None:
                    draws = torch.rand(rows, streams, generator=self.generator,
                                       device=self.device)
                else:
                    draws = own[:, step]
                uniforms = draws[active[:, None], slots.clamp(min=0)]
            if streams == 1:
                next_tokens = self._sample(logits[:, 0], temperature, uniforms)[:, None]
            else:
                picked = self._sample(logits.reshape(-1, logits.shape[-1]), temperature,
                                      None if uniforms is None else uniforms.reshape(-1, 1))
                # finished streams get the stop token: it changes nothing for them
                next_tokens = torch.full((len(active), streams + 1), self.stop_ids[0],
                                         device=self.device)
                next_tokens.scatter_(1, torch.where(slots >= 0, slots, streams),
                                     picked.view(len(active), -1))
                next_tokens = next_tokens[:, :streams]
            tokens[active, :, step] = next_tokens
            ends = torch.isin(next_tokens, stop_ids)
            if stop_at_newline:
                is_newline = torch.isin(next_tokens, newline_ids)
                ends |= is_newline & has_text[active]
                has_text[active] |= ~is_newline
            lengths[active] = torch.where(ends & ~done[active], step + 1, lengths[active])
            done[active] |= ends
            if step == max_new_tokens - 1:
                break
            going = ~done[active]
            counts = going.sum(dim=1)
            # the one sync of the step: rows still going, and the most streams one has
            remaining, most = torch.stack([(counts > 0).sum(), counts.max()]).tolist()
            if remaining == 0:
                break
            if remaining < len(active):  # drop finished rows from the batch and the cache
                keep = (counts > 0).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                active, going, mask = active[keep], going[keep], mask[keep]
                next_tokens, slots, owner = next_tokens[keep], slots[keep], owner[keep]
                next_position = next_position[keep]
            if streams == 1:
                step_tokens = next_tokens
                step_mask = mask[:, :width + step + 1]
            else:
                if most < slots.shape[1] and self.compact_streams:
                    # fewer query slots: each row's unfinished streams first, then idle ones
                    order = (~going).to(torch.uint8).sort(dim=1, stable=True).indices[:, :most]
                    slots = torch.where(going.gather(1, order), order, -1)
                step_tokens = next_tokens.gather(1, slots.clamp(min=0))
                owner = torch.cat([owner, torch.where(slots >= 0, slots, -2)], 1)
                # [rows, 1, slots, prompt + generated positions]
                step_mask = torch.cat(
                    [mask[:, :width].bool()[:, None, None, :].expand(-1, 1, slots.shape[1], width),
                     (owner[:, None, :] == slots[:, :, None])[:, None]], dim=-1)
            logits, cache = self._forward(step_tokens, step_mask, cache,
                                          next_position.expand(-1, step_tokens.shape[1]),
                                          keep=step_tokens.shape[1])
            self.stats["decode_steps"] += 1  # forward passes of one token per sequence
            self.stats["decoded_sequences"] += step_tokens.numel()  # summed over steps
            next_position = next_position + 1
        tokens, lengths = tokens.view(rows * streams, -1), lengths.view(-1).tolist()
        texts = []
        for row, length in zip(tokens.tolist(), lengths):
            self.stats["generated_tokens"] += length
            kept = [t for t in row[:length] if t not in self.stop_ids]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True).strip())
        # a prompt's rows (num_samples of them without a shared prefix) and its samples
        # come in prompt order; a sample's tokens include the stop token it drew
        asked = len(texts) // num_samples
        each = len(prompts) // asked  # forward rows per prompt
        costs = [{"calls": 1, "requests": None,
                  "prompt_tokens": sum(len(prompts[r]) - reused[r]
                                       for r in range(i * each, (i + 1) * each)),
                  "prompt_tokens_reused": sum(reused[i * each:(i + 1) * each]),
                  "generated_tokens": sum(lengths[i * num_samples:(i + 1) * num_samples])}
                 for i in range(asked)]
        return texts, costs

    def newline_token_ids(self):
        if self._newline_ids is None:
            pieces = self.tokenizer.batch_decode([[i] for i in range(self.vocab_size)])
            ids = [i for i, piece in enumerate(pieces) if "\n" in piece]
            self._newline_ids = torch.tensor(ids or [-1], device=self.device)
        return self._newline_ids

    def _sample(self, logits, temperature, uniforms=None):
        if logits.shape[-1] > self.vocab_size:
            logits[:, self.vocab_size:] = float("-inf")
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_categorical(probs, self.generator, uniforms)

    # -- option scoring -------------------------------------------------------------------

    @torch.no_grad()
    def option_probs(self, conversations, labels, cache_keys=None):
        """P(answer = label) for each label, normalised over the labels, in one batched
        forward pass.

        A label is a token sequence (with digit-by-digit tokenizers "12" is "1","2"), scored
        by llm.label_probs. The next-token distributions it needs are read from one forward
        pass over prompt + p for each label prefix p that longer labels extend; usually that
        is a single row per conversation (e.g. prompt + "1" for 19 options)."""
        start = time.perf_counter()
        prompts = [self.encode_chat(c) for c in conversations]
        label_ids = [self.label_token_ids(p, labels) for p in prompts]
        keys = cache_keys or [None] * len(prompts)
        rows, row_owner, row_prefixes, row_keys, prompt_lengths = [], [], [], [], []
        for i, (prompt, ids) in enumerate(zip(prompts, label_ids)):
            for path in _maximal_prefixes(ids):
                rows.append(prompt + list(path))
                row_owner.append(i)
                row_prefixes.append(path)
                row_keys.append(keys[i])
                prompt_lengths.append(len(prompt))
        # rows end aligned, so the positions needed are among the last `keep`; computing
        # logits only there avoids a [rows, length, vocab] tensor
        keep = max(len(path) for path in row_prefixes) + 1
        logits, _, _, _, reused = self._prefill(rows, row_keys, prompt_lengths, keep)
        # over the tokens the sampler can draw: none past the tokenizer's vocabulary
        log_probs = torch.log_softmax(logits[..., :self.vocab_size], dim=-1)

        # next-token distributions after every prefix that a forward row covers
        dist = [dict() for _ in prompts]
        for row, (owner, path) in enumerate(zip(row_owner, row_prefixes)):
            for depth in range(len(path) + 1):
                dist[owner].setdefault(path[:depth], log_probs[row, keep - 1 - len(path) + depth])
        result = torch.stack([label_probs(ids, lambda prefix, token, i=i: dist[i][prefix][token])
                              for i, ids in enumerate(label_ids)])
        self._trim_heap()
        seconds = time.perf_counter() - start
        self.stats["prior_seconds"] += seconds
        # a conversation's rows: its prompt followed by each label prefix that is read
        costs = [{"calls": 1, "requests": None, "prompt_tokens": 0, "prompt_tokens_reused": 0,
                  "generated_tokens": 0} for _ in prompts]
        for row, owner in enumerate(row_owner):
            costs[owner]["prompt_tokens"] += len(rows[row]) - reused[row]
            costs[owner]["prompt_tokens_reused"] += reused[row]
        self.charge(cache_keys, costs, seconds)
        return result


def sample_categorical(probs, generator, uniforms=None):
    """One index per row, drawn with probability proportional to `probs` (rows need not
    sum to 1), by inverting the cumulative distribution at a uniform draw (drawn from
    `generator`, or given: `uniforms`, [rows, 1] in [0, 1)).

    torch.multinomial draws an exponential variable for every entry (on a 2-core CPU,
    ~170 ms for 160 rows of a 49k vocabulary); this needs one uniform per row, a cumsum
    and a binary search (~9 ms)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # u < total, so the first entry with cdf > u exists and has nonzero probability
    if uniforms is None:
        uniforms = torch.rand(total.shape, generator=generator, device=probs.device)
    u = torch.minimum(uniforms.to(cdf.dtype) * total, total * (1 - 1e-6))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def _maximal_prefixes(label_ids):
    """The label prefixes that some longer label extends, keeping only those that are not
    themselves prefixes of another such prefix. Always at least the empty prefix."""
    internal = {seq[:d] for seq in label_ids for d in range(len(seq))}
    maximal = [p for p in internal
               if not any(len(q) > len(p) and q[:len(p)] == p for q in internal)]
    return sorted(maximal) or [()]


def load(name, device="auto", dtype="auto", seed=0, max_batch_rows=0, prefix_cache_gb=0.0,
         context_length=0):
    """The backend factory's entry (llm.load_llm): `name` is a model folder, 'auto' or
    'embedded-smollm2' (see llm.resolve_llm_path)."""
    return TransformersLLM.from_pretrained(resolve_llm_path(name), device=device, dtype=dtype,
                                           seed=seed, max_batch_rows=max_batch_rows,
                                           prefix_cache_gb=prefix_cache_gb,
                                           context_length=context_length)
