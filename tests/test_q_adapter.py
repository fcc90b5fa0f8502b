import contextlib

import torch

from conftest import transformers_warnings
from q_adapter import FrozenEncoder, encoder_input


def test_embed_in_length_sorted_chunks_equals_one_at_a_time(tiny_encoder_dir):
    encoder = FrozenEncoder.from_pretrained(tiny_encoder_dir, max_tokens=64, device="cpu")
    actions = ["Question", "Reflection of feelings", "Question", "Self-disclosure", "Others"]
    states = ["Seeker: I feel low. " * 9, "hi", "Seeker: work is hard.", "x " * 20, ""]
    batched = encoder.embed(actions, states, batch_size=2)
    single = torch.cat([encoder.embed([a], [s]) for a, s in zip(actions, states)])
    assert batched.shape == (5, encoder.width)
    assert torch.allclose(batched, single, atol=1e-5)
    assert not torch.allclose(batched[0], batched[2])  # rows stay with their pairs


def test_long_states_lose_their_oldest_tokens_not_the_action(tiny_encoder_dir):
    encoder = FrozenEncoder.from_pretrained(tiny_encoder_dir, max_tokens=32, device="cpu")
    recent = " the latest turn of the conversation" * 2
    long_a, long_b = "a " * 100 + recent, "b " * 100 + recent
    same_tail = encoder.embed(["Question", "Question"], [long_a, long_b])
    assert torch.allclose(same_tail[0], same_tail[1], atol=1e-6)
    other_action = encoder.embed(["Others"], [long_a])
    assert not torch.allclose(same_tail[0], other_action[0])


def test_long_states_keep_the_action_and_the_emotion_line_whole(tiny_encoder_dir):
    encoder = FrozenEncoder.from_pretrained(tiny_encoder_dir, max_tokens=48, device="cpu")
    old_a, old_b = "Seeker: " + "a " * 100, "Seeker: " + "b " * 100
    recent = "\nSupporter: I hear you.\nSeeker: the latest turn"
    emotions = ["User emotions: sadness, anger\n", "User emotions: sadness, joy\n"]
    features = encoder.embed(["Question"] * 3, [old_a + recent, old_a + recent, old_b + recent],
                             kept=[emotions[0], emotions[1], emotions[0]])
    # the emotion line is kept: other emotions, other features; the oldest turns are cut
    assert not torch.allclose(features[0], features[1])
    assert torch.allclose(features[0], features[2], atol=1e-6)
    # the pair stays within the encoder's limit and ends with the latest tokens
    first, kept, cut = encoder_input("Question", [("Seeker", "a " * 100)], ["sad"], "pair")
    ids = encoder._fit(first, kept, cut)["input_ids"]
    assert len(ids) == 48
    text = encoder.tokenizer.decode(ids).replace(" ", "")
    assert text.startswith("[CLS]question[SEP]useremotions:sad")


def test_the_original_encoder_text_is_one_segment_without_emotions():
    turns = [("Patient", "I feel low."), ("Therapist", "Why?")]
    first, kept, cut = encoder_input("Question", turns, ["sad"], "original")
    assert first is None and "sad" not in kept + cut
    assert kept + cut == "Action: Question for Observation: Patient: I feel low. Therapist: Why? "


def test_inputs_the_encoder_cuts_bring_no_too_long_warning(tiny_encoder_dir):
    encoder = FrozenEncoder.from_pretrained(tiny_encoder_dir, max_tokens=32, device="cpu")
    encoder.tokenizer.model_max_length = 32  # as bert-base's 512 with --max_encoder_tokens 512
    long = "Seeker: " + "a " * 100
    with transformers_warnings() as warnings:
        encoder.embed(["Question", "Others"], [long, "short"], kept=["", ""])
        encoder.embed_texts([long])
        assert not [w for w in warnings if "sequence length is longer" in w]
        encoder.tokenizer(long)  # the tokenizer's own warning, which this catches
        assert [w for w in warnings if "sequence length is longer" in w]


def test_the_timing_hook_encloses_every_embedding_and_every_update(tiny_encoder_dir):
    """bench.py times the encoder and the Q update through the hook their constructors
    take: each forward pass of the encoder and of the Q-head runs inside its phase."""
    from conftest import q_policy
    from get_args import Args

    open_phases, seen = [], []

    @contextlib.contextmanager
    def timer(phase):
        open_phases.append(phase)
        try:
            yield
        finally:
            open_phases.pop()

    encoder = FrozenEncoder.from_pretrained(tiny_encoder_dir, max_tokens=32, device="cpu",
                                            timer=timer)
    encoder.model.register_forward_hook(lambda *_: seen.append(("encoder", *open_phases)))
    encoder.embed(["Question"], ["Seeker: hi"])
    encoder.embed_texts(["Ask how they feel."])  # the planner's projection (--prior project)
    assert seen == [("encoder", "encoder")] * 2
    policy = q_policy(Args(hidden_size=8, batch_size=2, top_k=2), encoder, timer=timer)
    policy.q_head.register_forward_hook(lambda *_: seen.append(("q_head", *open_phases)))
    for _ in range(2):
        policy.buffer.add(torch.zeros(encoder.width), 1.0, torch.zeros(2, encoder.width),
                          terminated=False)
    policy.update(torch.Generator().manual_seed(0))
    assert seen[2:] == [("q_head", "q_update")]
    assert not open_phases
