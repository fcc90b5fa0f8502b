"""Prompts never exceed the model's context: the oldest turns go first, then the longest
case text is shortened, the instruction stays, and every cut is counted."""

import pytest
from hypothesis import given, settings, strategies as st

from conftest import DEMO, DEVICE
from critic import Critic
from env import Planner, SelfPlayEnv, new_conversation, system_prompt
from errors import UserError
from harness import summarize
from llm import fit_prompt, message_tokens_bound
from tasks import get_task, load_split

CONTEXT = 700


@pytest.fixture(scope="module")
def short_llm(tiny_llm_dir):
    """The tiny byte-level model (one token a byte) with a context of CONTEXT tokens; it
    records each prompt's length plus the answer's budget."""
    from llm_transformers import TransformersLLM

    llm = TransformersLLM.from_pretrained(tiny_llm_dir, device=DEVICE, dtype="float32",
                                          context_length=CONTEXT)
    llm.seen = []
    chat, option_probs = llm.chat, llm.option_probs

    def recording_chat(conversations, max_new_tokens=64, **options):
        llm.seen += [(c, llm.count_tokens(c) + max_new_tokens) for c in conversations]
        return chat(conversations, max_new_tokens=max_new_tokens, **options)

    def recording_option_probs(conversations, labels, cache_keys=None):
        llm.seen += [(c, llm.count_tokens(c) + 1) for c in conversations]
        return option_probs(conversations, labels, cache_keys)
    llm.chat, llm.option_probs = recording_chat, recording_option_probs
    return llm


def test_huge_fields_and_long_conversations_are_cut_to_the_context(short_llm):
    task = get_task("esc")
    case = dict(load_split(DEMO, "esc", "test")[0])
    case["situation"] = "I lost my job. " * 350_000  # ~5 MB: the opening turn
    case["problem_type"] = "job crisis " * 200  # in the critic's instructions
    critic = Critic(task, short_llm, num_samples=2, max_new_tokens=8)
    env = SelfPlayEnv(task, short_llm, short_llm, critic, system_max_new_tokens=8,
                      user_max_new_tokens=8)
    planner = Planner(task, short_llm)
    conversation = env.start(case)
    conversation.turns += [("Therapist" if i % 2 else "Patient", f"turn {i}: " + "x" * 60)
                           for i in range(1, 12)]
    conversation.turns.append(("Patient", "the newest turn"))
    planner.prior([conversation])
    env.step([conversation], ["Question"])

    assert short_llm.seen and all(tokens <= CONTEXT for _, tokens in short_llm.seen)
    system_prompt = short_llm.seen[1][0]
    text = "\n".join(m["content"] for m in system_prompt)
    assert "the newest turn" in text and "turn 1:" not in text  # oldest turns went first
    assert task.actions["Question"] in text  # the instruction is kept whole
    assert "I lost my job" not in text  # the 5 MB opening was the oldest turn
    cuts = conversation.prompt_cuts
    assert {"planner", "system", "user", "critic"} <= set(cuts) and cuts["turns_dropped"] > 0
    assert cuts["texts_shortened"] >= 1  # the critic's problem_type
    assert summarize([conversation], task, 8, {})["prompt_cuts"] == cuts


def test_a_single_huge_turn_is_shortened_not_dropped(short_llm):
    task = get_task("esc")
    case = dict(load_split(DEMO, "esc", "test")[0], situation="I lost my job. " * 10_000)
    conversation = new_conversation(task, case)
    messages = system_prompt(task, conversation, "Question", short_llm, max_new_tokens=8)
    assert short_llm.count_tokens(messages) + 8 <= CONTEXT
    assert messages[1]["content"].startswith("I lost my job.")  # the start is kept
    assert "[...]" in messages[1]["content"]
    assert conversation.prompt_cuts == {"system": 1, "turns_dropped": 0, "texts_shortened": 1}


def test_prompts_that_fit_are_untouched_and_not_counted(short_llm):
    task = get_task("esc")
    conversation = new_conversation(task, load_split(DEMO, "esc", "test")[0])
    uncut = system_prompt(task, conversation, "Question")  # no client: never cut
    assert system_prompt(task, conversation, "Question", short_llm) == uncut
    assert conversation.prompt_cuts == {}


def test_an_instruction_longer_than_the_context_is_a_user_error(short_llm):
    def build(turns, fields):
        return [{"role": "system", "content": "Follow this. " * 100},
                {"role": "user", "content": "\n".join(t for _, t in turns)}]
    with pytest.raises(UserError, match="the planner prompt needs .* tokens without any "
                                        "conversation or case text"):
        fit_prompt(short_llm, build, [("Patient", "hi")], {}, 8, "planner")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=200), min_size=1, max_size=6))
def test_the_bound_without_a_tokenizer_is_never_below_the_count(short_llm, texts):
    """Served models without a tokenizer count prompts by this bound: it must not be below
    the real count of a byte-level tokenizer (the densest kind)."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]
    assert message_tokens_bound(messages) >= short_llm.count_tokens(messages)
