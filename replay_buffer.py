"""Replay buffer of encoder features (not text), kept in half precision: a fixed capacity
whose oldest transitions are overwritten, or (capacity 0, the original release's) every
transition kept.

A transition is (features of the chosen action and state, reward, features of the next
state's candidates with a mask for missing ones, terminated). Only terminations stop the
bootstrap; a turn-limit ending is stored with terminated=False.
"""

import torch


class ReplayBuffer:
    FIELDS = ("features", "rewards", "next_features", "next_mask", "terminated")

    def __init__(self, capacity, feature_size, max_candidates, dtype=torch.float16):
        self.capacity = capacity  # 0: no limit, the storage doubles when full
        self.features = torch.zeros(capacity or 1024, feature_size, dtype=dtype)
        self.rewards = torch.zeros(len(self.features))
        self.next_features = torch.zeros(len(self.features), max_candidates, feature_size,
                                         dtype=dtype)
        self.next_mask = torch.zeros(len(self.features), max_candidates, dtype=torch.bool)
        self.terminated = torch.zeros(len(self.features), dtype=torch.bool)
        self.position = 0
        self.size = 0

    def _grow(self):
        for name in self.FIELDS:
            stored = getattr(self, name)
            setattr(self, name, torch.cat([stored, torch.zeros_like(stored)]))
        self.position = self.size  # the next free row (position had wrapped to 0)

    def __len__(self):
        return self.size

    def add(self, features, reward, next_features, terminated):
        """next_features: [n, feature_size] with n <= max_candidates (n may be 0 when
        terminated)."""
        if not self.capacity and self.size == len(self.features):
            self._grow()
        i = self.position
        self.features[i] = features
        self.rewards[i] = reward
        self.next_features[i].zero_()
        self.next_mask[i] = False
        n = 0 if next_features is None else len(next_features)
        if n:
            self.next_features[i, :n] = next_features
            self.next_mask[i, :n] = True
        if not terminated and n == 0:
            raise ValueError("a non-terminal transition needs the next state's candidates")
        self.terminated[i] = terminated
        self.position = (self.position + 1) % len(self.features)
        self.size = min(self.size + 1, len(self.features))

    def sample(self, batch_size, generator=None, device="cpu"):
        index = torch.randint(0, self.size, (batch_size,), generator=generator)
        return {"features": self.features[index].to(device).float(),
                "rewards": self.rewards[index].to(device),
                "next_features": self.next_features[index].to(device).float(),
                "next_mask": self.next_mask[index].to(device),
                "terminated": self.terminated[index].to(device)}

    def load_state_dict(self, state):
        for name in self.FIELDS:
            if not self.capacity:  # a buffer without limit takes the saved storage's size
                setattr(self, name, torch.zeros_like(state[name]))
            if getattr(self, name).shape != state[name].shape:
                raise ValueError(f"saved buffer '{name}' has shape {tuple(state[name].shape)}, "
                                 f"this buffer {tuple(getattr(self, name).shape)}")
            getattr(self, name).copy_(state[name])
        self.position, self.size = int(state["position"]), int(state["size"])

    def state_dict(self):
        return {name: getattr(self, name) for name in self.FIELDS} | {
            "position": torch.tensor(self.position), "size": torch.tensor(self.size)}
