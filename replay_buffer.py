"""Fixed-capacity replay buffer of encoder features (not text), kept in half precision.

A transition is (features of the chosen action and state, reward, features of the next
state's candidates with a mask for missing ones, terminated). Only terminations stop the
bootstrap; a turn-limit ending is stored with terminated=False.
"""

import torch


class ReplayBuffer:
    def __init__(self, capacity, feature_size, max_candidates, dtype=torch.float16):
        self.capacity = capacity
        self.features = torch.zeros(capacity, feature_size, dtype=dtype)
        self.rewards = torch.zeros(capacity)
        self.next_features = torch.zeros(capacity, max_candidates, feature_size, dtype=dtype)
        self.next_mask = torch.zeros(capacity, max_candidates, dtype=torch.bool)
        self.terminated = torch.zeros(capacity, dtype=torch.bool)
        self.position = 0
        self.size = 0

    def __len__(self):
        return self.size

    def add(self, features, reward, next_features, terminated):
        """next_features: [n, feature_size] with n <= max_candidates (n may be 0 when
        terminated)."""
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
        self.position = (self.position + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size, generator=None, device="cpu"):
        index = torch.randint(0, self.size, (batch_size,), generator=generator)
        return {"features": self.features[index].to(device).float(),
                "rewards": self.rewards[index].to(device),
                "next_features": self.next_features[index].to(device).float(),
                "next_mask": self.next_mask[index].to(device),
                "terminated": self.terminated[index].to(device)}

    def load_state_dict(self, state):
        for name in ("features", "rewards", "next_features", "next_mask", "terminated"):
            if getattr(self, name).shape != state[name].shape:
                raise ValueError(f"saved buffer '{name}' has shape {tuple(state[name].shape)}, "
                                 f"this buffer {tuple(getattr(self, name).shape)}")
            getattr(self, name).copy_(state[name])
        self.position, self.size = int(state["position"]), int(state["size"])

    def state_dict(self):
        return {name: getattr(self, name) for name in
                ("features", "rewards", "next_features", "next_mask", "terminated")} | {
            "position": torch.tensor(self.position), "size": torch.tensor(self.size)}
