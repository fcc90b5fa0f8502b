import torch

from q_adapter import FrozenEncoder


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
