import pytest
import torch

from replay_buffer import ReplayBuffer


def test_capacity_overwrites_oldest():
    buffer = ReplayBuffer(capacity=3, feature_size=2, max_candidates=2)
    for i in range(5):
        buffer.add(torch.full((2,), float(i)), float(i), torch.ones(1, 2), terminated=False)
    assert len(buffer) == 3
    assert sorted(buffer.rewards.tolist()) == [2.0, 3.0, 4.0]
    assert buffer.features.dtype == torch.float16


def test_next_candidates_are_masked_and_terminal_needs_none():
    buffer = ReplayBuffer(capacity=4, feature_size=2, max_candidates=3)
    buffer.add(torch.zeros(2), 1.0, torch.ones(2, 2), terminated=False)
    buffer.add(torch.zeros(2), 1.0, None, terminated=True)
    assert buffer.next_mask[0].tolist() == [True, True, False]
    assert buffer.next_mask[1].tolist() == [False, False, False]
    with pytest.raises(ValueError):
        buffer.add(torch.zeros(2), 0.0, None, terminated=False)
    batch = buffer.sample(8, torch.Generator().manual_seed(0))
    assert batch["features"].shape == (8, 2) and batch["next_features"].shape == (8, 3, 2)
    assert batch["features"].dtype == torch.float32


def test_minibatches_are_drawn_uniformly_and_anew_each_time():
    buffer = ReplayBuffer(capacity=64, feature_size=2, max_candidates=1)
    for i in range(64):
        buffer.add(torch.full((2,), float(i)), float(i), torch.ones(1, 2), terminated=False)
    generator = torch.Generator().manual_seed(0)
    batches = [buffer.sample(32, generator)["rewards"] for _ in range(100)]
    assert all(not torch.equal(a, b) for a, b in zip(batches, batches[1:]))
    counts = torch.bincount(torch.cat(batches).long(), minlength=64)
    assert counts.min() >= 20 and counts.max() <= 85  # 50 expected for each transition


def test_without_a_limit_every_transition_is_kept():
    buffer = ReplayBuffer(capacity=0, feature_size=2, max_candidates=1)
    for i in range(3000):
        buffer.add(torch.full((2,), float(i)), float(i), torch.ones(1, 2), terminated=False)
    assert len(buffer) == 3000 and buffer.rewards[:3000].tolist() == [float(i) for i in range(3000)]
    restored = ReplayBuffer(capacity=0, feature_size=2, max_candidates=1)
    restored.load_state_dict(buffer.state_dict())
    restored.add(torch.zeros(2), -1.0, torch.ones(1, 2), terminated=False)
    assert len(restored) == 3001 and restored.rewards[3000] == -1.0
