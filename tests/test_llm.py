import pytest
import torch

from conftest import DEVICE, build_tiny_llm
from llm import load_llm, resolve_llm_path
from llm_transformers import PACKED_SDPA, ReservedLayer, TransformersLLM, sample_categorical

CONVERSATIONS = [
    [{"role": "user", "content": "Which strategy? Answer with a number."}],
    [{"role": "system", "content": "You are a tutor."},
     {"role": "user", "content": "A much longer prompt, so that the batch needs left padding."}],
    [{"role": "user", "content": "x"}],
]


def reference_option_probs(llm, conversation, labels):
    """One plain forward pass per label, no batching or padding, over the tokenizer's
    vocabulary."""
    prompt = llm.encode_chat(conversation)
    label_ids = llm.label_token_ids(prompt, labels)
    scores = []
    for seq in label_ids:
        ids = torch.tensor([prompt + list(seq)], device=llm.device)
        log_probs = torch.log_softmax(llm.model(ids).logits[0, :, :llm.vocab_size].float(), -1)
        score = sum(log_probs[len(prompt) - 1 + d, seq[d]] for d in range(len(seq)))
        longer = {o[len(seq)] for o in label_ids if len(o) > len(seq) and o[:len(seq)] == seq}
        if longer:
            score += torch.log1p(-log_probs[len(prompt) - 1 + len(seq), list(longer)].exp().sum())
        scores.append(score)
    return torch.softmax(torch.stack(scores), -1)


@pytest.mark.parametrize("num_labels", [4, 19, 25])
def test_option_probs_sum_to_one_and_match_reference(tiny_llm, num_labels):
    labels = [str(i + 1) for i in range(num_labels)]
    probs = tiny_llm.option_probs(CONVERSATIONS, labels)
    assert probs.shape == (3, num_labels)
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    for row, conversation in enumerate(CONVERSATIONS):
        with torch.no_grad():
            expected = reference_option_probs(tiny_llm, conversation, labels)
        assert torch.allclose(probs[row], expected.cpu(), atol=1e-4), (row, probs[row], expected)


def test_multi_digit_labels_are_multi_token(tiny_llm):
    prompt = tiny_llm.encode_chat(CONVERSATIONS[0])
    ids = tiny_llm.label_token_ids(prompt, ["1", "12", "19"])
    assert len(ids[0]) == 1 and len(ids[1]) == 2 and ids[1][0] == ids[0][0]


def test_batched_greedy_equals_one_at_a_time(tiny_llm):
    batched = tiny_llm.chat(CONVERSATIONS, max_new_tokens=12, temperature=0)
    single = [tiny_llm.chat([c], max_new_tokens=12, temperature=0)[0] for c in CONVERSATIONS]
    assert batched == single


def test_shared_prefix_samples_equal_repeated_prompt_when_greedy(tiny_llm):
    shared = tiny_llm.chat(CONVERSATIONS, max_new_tokens=8, temperature=0, num_samples=3)
    repeated = tiny_llm.chat(CONVERSATIONS, max_new_tokens=8, temperature=0, num_samples=3,
                             shared_prefix=False)
    assert shared == repeated
    assert all(len(samples) == 3 and len(set(samples)) == 1 for samples in shared)


def test_generation_stops_at_end_of_turn_and_finished_rows_leave_the_batch(tiny_llm):
    full = [tiny_llm.chat([c], max_new_tokens=10, temperature=0)[0][0] for c in CONVERSATIONS]
    prompt = tiny_llm.encode_chat(CONVERSATIONS[0])
    tokens = tiny_llm.model.generate(torch.tensor([prompt], device=tiny_llm.device),
                                     max_new_tokens=4, do_sample=False,
                                     attention_mask=torch.ones(1, len(prompt), dtype=torch.long,
                                                               device=tiny_llm.device))
    stop_token = int(tokens[0, len(prompt) + 2])
    saved = tiny_llm.stop_ids
    tiny_llm.stop_ids = saved + [stop_token]
    try:
        cut = tiny_llm.chat(CONVERSATIONS, max_new_tokens=10, temperature=0)
    finally:
        tiny_llm.stop_ids = saved
    first_two = tiny_llm.tokenizer.decode(tokens[0, len(prompt):len(prompt) + 2]).strip()
    assert cut[0][0] == first_two
    for row in (1, 2):  # the other rows are unaffected unless they hit the same token
        if stop_token not in tiny_llm.tokenizer(full[row])["input_ids"]:
            assert cut[row][0] == full[row]


def test_finished_samples_leave_the_batch_without_changing_the_others(tiny_llm_dir):
    llm = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32")
    # every third token counts as a line break, so samples end at different steps
    llm._newline_ids = torch.arange(0, llm.vocab_size, 3, device=llm.device)
    results = []
    for compact in (False, True):
        llm.compact_streams = compact
        llm.generator.manual_seed(5)
        before = llm.stats["decoded_sequences"]
        answers = llm.chat(CONVERSATIONS, max_new_tokens=12, temperature=1.0, num_samples=6,
                           stop_at_newline=True)
        results.append((answers, llm.stats["decoded_sequences"] - before))
    (full, full_sequences), (compact, compact_sequences) = results
    assert compact == full
    assert compact_sequences < full_sequences
    assert len({len(answer) for samples in full for answer in samples}) > 3


def test_sampling_is_seeded(tiny_llm_dir):
    first = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32", seed=3)
    second = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32", seed=3)
    a = first.chat(CONVERSATIONS, max_new_tokens=6, temperature=1.0, num_samples=2)
    assert a == second.chat(CONVERSATIONS, max_new_tokens=6, temperature=1.0, num_samples=2)


def test_missing_weights_name_the_download_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_llm_weights.py"):
        resolve_llm_path(str(tmp_path / "Qwen2.5-7B-Instruct"))


def test_unknown_backend_lists_choices(tiny_llm_dir):
    with pytest.raises(ValueError, match=r"Expected one of \['openai', 'transformers'\]"):
        load_llm("vllm-typo", tiny_llm_dir)


def test_row_cap_splits_the_batch_without_changing_greedy_answers(tiny_llm):
    whole = tiny_llm.chat(CONVERSATIONS, max_new_tokens=8, temperature=0, num_samples=2)
    saved = tiny_llm.max_batch_rows
    tiny_llm.max_batch_rows = 2  # one conversation (2 samples) per group
    try:
        grouped = tiny_llm.chat(CONVERSATIONS, max_new_tokens=8, temperature=0, num_samples=2)
    finally:
        tiny_llm.max_batch_rows = saved
    assert grouped == whole


def test_stop_at_newline_ends_after_text(tiny_llm):
    full = tiny_llm.chat(CONVERSATIONS[:1], max_new_tokens=10, temperature=0)[0][0]
    ids = tiny_llm.tokenizer(full, add_special_tokens=False)["input_ids"]
    saved = tiny_llm._newline_ids
    # pretend the 4th token is a line break
    tiny_llm._newline_ids = torch.tensor([ids[3]], device=tiny_llm.device)
    try:
        cut = tiny_llm.chat(CONVERSATIONS[:1], max_new_tokens=10, temperature=0,
                            stop_at_newline=True)[0][0]
    finally:
        tiny_llm._newline_ids = saved
    expected = tiny_llm.tokenizer.decode(ids[:ids.index(ids[3]) + 1]).strip()
    assert cut == expected and len(cut) < len(full)


def _extend(conversation, text):
    return conversation[:-1] + [{"role": conversation[-1]["role"],
                                 "content": conversation[-1]["content"] + text}]


def test_prefix_cache_reuses_tokens_and_changes_nothing(tiny_llm_dir):
    plain = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32")
    cached = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32",
                                             prefix_cache_gb=0.01)
    keys = [("conversation", i) for i in range(len(CONVERSATIONS))]
    labels = [str(i + 1) for i in range(19)]
    turns = [CONVERSATIONS,
             [_extend(c, " More words.") for c in CONVERSATIONS],
             [_extend(c, " More words. And more.") if i != 1 else c
              for i, c in enumerate(CONVERSATIONS)]]
    for conversations in turns:
        expected = plain.chat(conversations, max_new_tokens=8, temperature=0, num_samples=2)
        assert cached.chat(conversations, max_new_tokens=8, temperature=0, num_samples=2,
                           cache_keys=keys) == expected
        assert torch.allclose(cached.option_probs(conversations, labels, cache_keys=keys),
                              plain.option_probs(conversations, labels), atol=1e-5)
    assert cached.stats["prompt_tokens_reused"] > 0
    assert cached.stats["prompt_tokens"] < plain.stats["prompt_tokens"]
    # a new conversation starts from the latest prompt of its role: the shared opening
    newcomer = [{"role": "system", "content": "You are a tutor."},
                {"role": "user", "content": "A different question entirely."}]
    reused = cached.stats["prompt_tokens_reused"]
    assert cached.chat([newcomer], max_new_tokens=8, temperature=0,
                       cache_keys=[("newcomer", 1)]) == plain.chat([newcomer], max_new_tokens=8,
                                                                  temperature=0)
    assert cached.stats["prompt_tokens_reused"] - reused >= 10


def test_prefix_cache_evicts_least_recently_used():
    from llm_transformers import PrefixCache

    layer = [(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))]  # 64 bytes
    store = PrefixCache(max_bytes=150)
    store.put("a", [1, 2, 3, 4], layer)
    store.put("b", [1, 2, 3, 4], layer)
    store.get("a")
    store.put("c", [1, 2, 3, 4], layer)
    assert set(store.entries) == {"a", "c"} and store.bytes == 128


def test_prefix_cache_forgets_a_finished_conversation_but_keeps_the_latest_per_role():
    from llm_transformers import PrefixCache

    layer = [(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))]
    store = PrefixCache(max_bytes=10**6)
    for key in [(1, "system"), (1, "critic"), (2, "system")]:
        store.put(key, [1, 2, 3, 4], layer)
    store.forget(1)  # (1, "critic") is the latest critic entry: kept for newcomers
    assert set(store.entries) == {(1, "critic"), (2, "system")} and store.bytes == 128
    store.forget(2)
    assert set(store.entries) == {(1, "critic"), (2, "system")}
    store.put((3, "critic"), [1, 2], layer)
    store.forget(1)
    assert set(store.entries) == {(2, "system"), (3, "critic")}


def test_sample_categorical_follows_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]] * 4 + [[0.0, 0.0, 0.0, 0.0, 2.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_categorical(probs, generator) for _ in range(5000)])
    assert draws.shape == (5000, 5)
    assert (draws[:, 4] == 4).all()  # unnormalised rows work; all mass on the last entry
    counts = torch.bincount(draws[:, :4].flatten(), minlength=5).float() / draws[:, :4].numel()
    assert counts[1] == 0 and counts[4] == 0  # zero-probability entries are never drawn
    assert torch.allclose(counts[[0, 2, 3]], torch.tensor([0.5, 0.3, 0.2]), atol=0.015)


def test_reserved_layer_matches_concatenation():
    layer = ReservedLayer(reserve=3)
    keys, values = torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8)
    for step in range(6):  # writes into the reserve, then outgrows it twice
        new_k, new_v = torch.randn(4, 2, 1 + step % 2, 8), torch.randn(4, 2, 1 + step % 2, 8)
        if step == 0:
            new_k, new_v = keys, values
        else:
            keys, values = torch.cat([keys, new_k], -2), torch.cat([values, new_v], -2)
        out_k, out_v = layer.update(new_k, new_v)
        assert torch.equal(out_k, keys) and torch.equal(out_v, values)
    assert layer.get_seq_length() == keys.shape[-2]
    keep = torch.tensor([3, 1])
    layer.batch_select_indices(keep)
    keys, values = keys[keep], values[keep]
    out_k, out_v = layer.update(torch.ones(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))
    assert torch.equal(out_k[:, :, :-1], keys) and torch.equal(out_v[:, :, :-1], values)
    assert (out_k[:, :, -1] == 1).all() and (out_v[:, :, -1] == 0).all()
    layer.crop(-2)
    assert torch.equal(layer.keys, keys[:, :, :-1])


@pytest.mark.parametrize("queries", [1, 3])
def test_packed_attention_matches_stock_sdpa(tiny_llm_dir, queries):
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()
    model.to(DEVICE)
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 200, (3, 10), generator=generator)
    prompt_mask = torch.ones(3, 10, dtype=torch.long)
    prompt_mask[1, :4] = 0  # a left-padded row
    step = torch.randint(0, 200, (3, queries), generator=generator)
    # every query sees the prompt and a random subset of the step's queries, itself included
    step_mask = torch.cat([prompt_mask.bool()[:, None, None].expand(3, 1, queries, 10),
                           (torch.rand(3, 1, queries, queries, generator=generator) > 0.5)
                           | torch.eye(queries, dtype=torch.bool)], -1)
    positions = prompt_mask.sum(-1, keepdim=True).expand(3, queries)
    prompt, prompt_mask, step, step_mask, positions = (
        t.to(DEVICE) for t in (prompt, prompt_mask, step, step_mask, positions))
    results = []
    for implementation in ("sdpa", PACKED_SDPA):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            cache = DynamicCache()
            first = model(input_ids=prompt, attention_mask=prompt_mask, cache=cache).logits
            second = model(input_ids=step, attention_mask=step_mask, cache=cache,
                           position_ids=positions).logits
            cache = DynamicCache()  # one query without a mask: the unpadded case
            model(input_ids=prompt[:1], cache=cache)
            third = model(input_ids=step[:1, :1], cache=cache).logits
        results.append((first, second, third))
    (stock_first, *stock_rest), (packed_first, *packed_rest) = results
    real = prompt_mask.bool()  # what padding positions compute is never used
    assert torch.allclose(stock_first[real], packed_first[real], atol=1e-5)
    for stock, packed in zip(stock_rest, packed_rest):
        assert torch.allclose(stock, packed, atol=1e-5)


def test_split_by_length_groups_similar_lengths():
    from llm_transformers import split_by_length

    assert split_by_length([5, 100, 6, 98], overhead=10) == [[0, 2], [3, 1]]
    assert split_by_length([5, 100, 6, 98], overhead=10**6) == [[0, 2, 3, 1]]
    assert split_by_length([7], overhead=0) == [[0]]


def test_prefill_in_groups_changes_nothing(tiny_llm_dir):
    """Rows split into separate forward passes by length, then merged into one cache, give
    the same answers and option probabilities as one padded pass, with less padding."""
    conversations = CONVERSATIONS + [[{"role": "user", "content": "A long one. " * 30}]]
    labels = [str(i + 1) for i in range(12)]
    results = []
    for overhead, prefix_cache_gb in ((10**9, 0.0), (0, 0.0), (0, 0.01)):
        llm = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32",
                                              prefix_cache_gb=prefix_cache_gb)
        llm.forward_overhead_tokens = overhead
        keys = [("conversation", i) for i in range(len(conversations))]
        answers, probs = [], []
        for turn in range(2):  # the second turn reuses the prefix cache, where it is on
            turn_conversations = [_extend(c, " Go on." * turn) for c in conversations]
            answers.append(llm.chat(turn_conversations, max_new_tokens=8, temperature=0,
                                    num_samples=2, cache_keys=keys))
            probs.append(llm.option_probs(turn_conversations, labels, cache_keys=keys))
        results.append((answers, probs, llm.stats["prompt_positions"]))
    (answers, probs, padded), *split_runs = results
    for split_answers, split_probs, positions in split_runs:
        assert split_answers == answers
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(split_probs, probs))
        assert positions < padded


def test_cpu_calls_return_free_heap_pages(tiny_llm_dir, monkeypatch):
    import llm_transformers as llm_module

    if llm_module.heap_trimmer() is None:
        pytest.skip("malloc_trim is glibc's")
    llm = TransformersLLM.from_pretrained(tiny_llm_dir, device="cpu", dtype="float32")
    trims = []
    monkeypatch.setattr(llm, "trim_heap", lambda pad: trims.append(pad) or 1)
    llm.chat(CONVERSATIONS, max_new_tokens=4)
    llm.option_probs(CONVERSATIONS, ["1", "2"])
    assert trims == [0, 0] and llm.stats["heap_trims"] == 2


@pytest.mark.slow
def test_parsing_arguments_imports_no_engine():
    import subprocess
    import sys

    from conftest import ROOT

    check = ("import sys, get_args; get_args.parse_args(['--backend', 'openai', '--base_url', "
             "'http://127.0.0.1:1/v1']); loaded = {'transformers', 'llm_transformers', "
             "'llm_openai', 'httpx'} & set(sys.modules); assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_served_backend_needs_a_server(capsys):
    from get_args import parse_args

    with pytest.raises(SystemExit, match="2"):
        parse_args(["--backend", "openai"])
    assert "error: --backend openai needs --base_url" in capsys.readouterr().err
    parse_args(["--backend", "openai"] + [f"--{role}_base_url=http://127.0.0.1:1/v1"
                                         for role in ("planner", "system", "user", "critic")])


def test_sampler_state_round_trip(tiny_llm):
    """A resumed run continues the LLM's random stream where the saved state left it."""
    chat = [[{"role": "user", "content": "Hello"}]]
    state = tiny_llm.rng_state()
    first = tiny_llm.chat(chat, max_new_tokens=8, temperature=1.0, num_samples=3)
    tiny_llm.load_rng_state(state)
    assert tiny_llm.chat(chat, max_new_tokens=8, temperature=1.0, num_samples=3) == first


def test_a_device_this_machine_lacks_is_one_user_error():
    from errors import UserError
    from llm import check_device

    assert check_device("auto") is None and check_device("cpu") is None
    with pytest.raises(UserError, match=r"--device cuda:99: torch sees \d+ CUDA device\(s\) "
                                        r"here\. Pass --device auto or cpu"):
        check_device("cuda:99")


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_seeded_samples_do_not_depend_on_the_rest_of_the_batch(tiny_llm_dir, shared_prefix):
    """A conversation's seeded samples are the same alone, in a batch, in reverse order, in
    groups of the row cap, prefilled in groups by length, and with a cached prefix."""
    conversations = CONVERSATIONS + [[{"role": "user", "content": "A long one. " * 30}]]
    seeds = [11, 22, 33, 44]
    options = dict(max_new_tokens=8, temperature=1.0, num_samples=3,
                   shared_prefix=shared_prefix)
    llm = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32")
    batch = llm.chat(conversations, seeds=seeds, **options)
    assert len({answer for samples in batch for answer in samples}) == 12
    assert [llm.chat([c], seeds=[s], **options)[0]
            for c, s in zip(conversations, seeds)] == batch
    assert llm.chat(conversations[::-1], seeds=seeds[::-1], **options)[::-1] == batch
    llm.max_batch_rows = 3  # one conversation a group with its samples as rows
    assert llm.chat(conversations, seeds=seeds, **options) == batch
    llm.max_batch_rows, llm.forward_overhead_tokens = 160, 0  # a pass per length group
    assert llm.chat(conversations, seeds=seeds, **options) == batch
    cached = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32",
                                             prefix_cache_gb=0.01)
    keys = [(i, "critic") for i in range(len(conversations))]
    cached.chat([_extend(c, " Earlier.") if i % 2 else c for i, c in enumerate(conversations)],
                seeds=seeds, cache_keys=keys, **options)
    assert cached.chat(conversations, seeds=seeds, cache_keys=keys, **options) == batch
    assert cached.stats["prompt_tokens_reused"] > 0


def test_a_branch_starts_from_its_owners_prompt_and_answers_as_a_fresh_one(tiny_llm_dir):
    plain = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32")
    cached = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32",
                                             prefix_cache_gb=0.01)
    owner, other = CONVERSATIONS[1], CONVERSATIONS[0]
    cached.chat([owner, other], max_new_tokens=4, cache_keys=[(1, "user"), (2, "user")])
    cached.branch(3, 1)  # a search's copy of conversation 1, asked after conversation 2
    copy = _extend(owner, " A simulated turn.")
    before = cached.stats["prompt_tokens_reused"]
    assert cached.chat([copy], max_new_tokens=8, temperature=1.0, num_samples=2, seeds=[5],
                       cache_keys=[(3, "user")]) == plain.chat(
        [copy], max_new_tokens=8, temperature=1.0, num_samples=2, seeds=[5])
    owner_ids, copy_ids = plain.encode_chat(owner), plain.encode_chat(copy)
    shared = next(i for i, (a, b) in enumerate(zip(owner_ids, copy_ids)) if a != b)
    assert cached.stats["prompt_tokens_reused"] - before == shared


def test_a_cached_prompt_is_reused_up_to_where_a_new_prompt_departs_from_it(tiny_llm_dir):
    """An entry that is no prefix of the new prompt gives only the tokens they share; one
    that extends past a shorter prompt gives all but the prompt's last token."""
    plain = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32")
    cached = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32",
                                             prefix_cache_gb=0.01)
    first = [{"role": "user", "content": "Tell me about the sea and the sky."}]
    later = [[{"role": "user", "content": "Tell me about the moon, the sea and the sky."}],
             [{"role": "user", "content": "Tell me"}]]
    labels = [str(i + 1) for i in range(12)]
    first_ids = plain.encode_chat(first)
    for conversation in later:
        cached.chat([first], max_new_tokens=2, cache_keys=[("a", "critic")])
        ids = plain.encode_chat(conversation)
        shared = min(next(i for i, (a, b) in enumerate(zip(first_ids, ids + [-1])) if a != b),
                     len(ids) - 1)
        before = cached.stats["prompt_tokens_reused"]
        assert cached.chat([conversation], max_new_tokens=8, cache_keys=[("a", "critic")]) == \
            plain.chat([conversation], max_new_tokens=8)
        assert cached.stats["prompt_tokens_reused"] - before == shared
        cached.chat([first], max_new_tokens=2, cache_keys=[("a", "critic")])
        assert torch.allclose(cached.option_probs([conversation], labels,
                                                  cache_keys=[("a", "critic")]),
                              plain.option_probs([conversation], labels), atol=1e-5)


def test_sampled_tokens_follow_the_softmax_of_the_logits_over_the_temperature(tiny_llm_dir):
    """The first tokens of many samples against softmax(logits / T) of a plain forward
    pass (a chi-square test), and temperature 0 against the argmax."""
    from scipy.stats import chisquare

    llm = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32")
    with torch.no_grad():
        llm.model.lm_head.weight.mul_(40)  # logits a few units apart: a skewed distribution
        prompt = llm.encode_chat(CONVERSATIONS[0])
        logits = llm.model(torch.tensor([prompt], device=llm.device)).logits[0, -1].float()
    drawn = []
    sample = llm._sample
    llm._sample = lambda *args: drawn.append(sample(*args)) or drawn[-1]
    for temperature in (0.7, 1.5):
        drawn.clear()
        llm.chat(CONVERSATIONS[:1], max_new_tokens=1, temperature=temperature,
                 num_samples=3000, seeds=[9])
        counts = torch.bincount(drawn[0].cpu(), minlength=len(logits)).double()
        expected = torch.softmax(logits.cpu().double() / temperature, -1) * counts.sum()
        rare = expected < 5  # pooled into one bin, as a chi-square test needs
        observed = torch.cat([counts[~rare], counts[rare].sum()[None]])
        expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
        assert (~rare).sum() >= 10
        assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3, temperature
    drawn.clear()
    llm.chat(CONVERSATIONS[:1], max_new_tokens=1, temperature=0)
    assert drawn[0].tolist() == [int(logits.argmax())]


def test_stop_at_newline_skips_leading_line_breaks(tiny_llm, monkeypatch):
    """A line break before any text does not end the answer; the first one after text
    does (docs/served.md: the in-process engine skips leading line breaks)."""
    drawn, sample = [], tiny_llm._sample
    monkeypatch.setattr(tiny_llm, "_sample",
                        lambda *args: drawn.append(sample(*args)) or drawn[-1])
    tiny_llm.chat(CONVERSATIONS[:1], max_new_tokens=10, temperature=0)
    tokens = [int(step[0]) for step in drawn]  # the greedy answer's tokens
    assert tokens[0] not in tokens[1:4] and not set(tokens[:4]) & set(tiny_llm.stop_ids)
    # pretend the first and the 4th tokens are line breaks
    monkeypatch.setattr(tiny_llm, "_newline_ids", torch.tensor([tokens[0], tokens[3]],
                                                               device=tiny_llm.device))
    cut = tiny_llm.chat(CONVERSATIONS[:1], max_new_tokens=10, temperature=0,
                        stop_at_newline=True)[0][0]
    assert cut == tiny_llm.tokenizer.decode(tokens[:4]).strip()


def test_option_probs_leave_out_the_embeddings_past_the_tokenizer_as_the_sampler_does(
        tmp_path):
    """A model whose embedding matrix is padded past its tokenizer (Qwen2.5's is) never
    draws those rows' tokens; the chance that a label goes on ("1" to "12") is read
    without them too."""
    llm = TransformersLLM.from_pretrained(build_tiny_llm(str(tmp_path), vocab_size=300),
                                          device=DEVICE, dtype="float32")
    head = llm.model.lm_head.weight
    with torch.no_grad():  # "0" to "2" and the padding rows the likeliest after "1"
        ids = llm.encode_chat(CONVERSATIONS[0]) + llm.tokenizer("1")["input_ids"]
        likeliest = llm.model(torch.tensor([ids], device=llm.device)).logits[0, -1].argmax()
        head[llm.tokenizer("012")["input_ids"]] = head[likeliest].clone()
        head[llm.vocab_size:] = head[likeliest].clone()
        head.mul_(20)
    labels = [str(i + 1) for i in range(12)]
    probs = llm.option_probs(CONVERSATIONS, labels)
    for row, conversation in enumerate(CONVERSATIONS):
        with torch.no_grad():
            expected = reference_option_probs(llm, conversation, labels)
        assert torch.allclose(probs[row], expected.cpu(), atol=1e-4), (row, probs[row], expected)
