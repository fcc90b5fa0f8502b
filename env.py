"""Self-play environment: conversation state, the planner's prior, and batched steps.

One `step` advances a batch of conversations by one exchange:
  system phase: the system LLM realises each chosen action ("Emotion: ... Response: ...")
  user phase:   the user LLM answers in role
  critic phase: the critic answers its closed question; the reward and the outcome follow
Each phase is one batched LLM call. The planner (`Planner.prior`) gives the observation:
a prior over the task's whole action set, from which the top-k candidates are taken.
"""

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

import qwen_prompts as prompts
from llm import fit_prompt, stream_seed
from tasks import case_fields


_conversation_ids = itertools.count()


def reserve_conversation_ids(first_free):
    """New conversations get uids from first_free on (after restoring saved ones)."""
    global _conversation_ids
    _conversation_ids = itertools.count(max(first_free, next(_conversation_ids)))


@dataclass
class Conversation:
    case: dict
    turns: list  # (role, text) pairs
    uid: int = field(default_factory=lambda: next(_conversation_ids))  # prefix-cache key
    emotions: list = field(default_factory=list)  # the user's emotions (esc: the case's first)
    records: list = field(default_factory=list)  # one dict per system turn, for the JSONL log
    system_turns: int = 0
    outcome: str | None = None  # 'success' or 'time limit' once finished
    total_reward: float = 0.0
    sale_to_list: float | None = None
    # observation of the current state, filled by the trainer
    candidates: list = field(default_factory=list)
    candidate_priors: list = field(default_factory=list)
    candidate_features: torch.Tensor | None = None
    pending: dict = field(default_factory=dict)  # the choice being played, for the log
    prompt_cuts: dict = field(default_factory=dict)  # prompts cut to fit a context (llm.py)
    case_id: int | None = None  # the case's place in its split (pairs runs in reports)
    # the seed of this conversation's LLM samples (llm.stream_seed): the trainer derives it
    # from the run's seed and the case (evaluation) or the episode (training)
    stream: int | None = None

    def __post_init__(self):
        if self.stream is None:
            self.stream = self.uid

    def seed(self, role):
        """The seed of this turn's samples of one role."""
        return stream_seed(self.stream, self.system_turns, role)

    @property
    def done(self):
        return self.outcome is not None


@dataclass
class StepResult:
    reward: float
    terminated: bool  # success: no bootstrap from the next state
    truncated: bool  # turn limit: the next state still bootstraps


def transcript(turns):
    return "\n".join(f"{role}: {text}" for role, text in turns)


EMOTION_PATTERN = re.compile(r"emotion\s*[:\-]\s*\**\s*([A-Za-z][A-Za-z \-]{0,30})", re.I)
RESPONSE_PATTERN = re.compile(r"response\s*[:\-]\s*\**\s*(.*)", re.I | re.S)


def parse_emotion_response(text, roles=()):
    """Split "Emotion: sad Response: I hear you." into ('sad', 'I hear you.', True).

    If the format is not followed, the whole text is kept as the response with emotion
    'unknown' and ok=False, so the caller can count it. Text after a line that starts a
    new speaker's turn ("Patient: ...") is cut: the model was writing the other side."""
    emotion_match = EMOTION_PATTERN.search(text)
    response_match = RESPONSE_PATTERN.search(text)
    ok = bool(emotion_match and response_match)
    emotion = "unknown"
    if emotion_match:
        words = emotion_match.group(1).strip().lower().split()
        emotion = " ".join(w for w in words[:2] if w != "response") or "unknown"
    response = clean_turn(response_match.group(1), roles) if response_match else ""
    return emotion, response or clean_turn(text, roles), ok


def clean_turn(text, roles=()):
    """Drop a leading "Role:" and anything from a line where another turn starts."""
    text = text.strip()
    for role in roles:
        if text.lower().startswith(role.lower() + ":"):
            text = text[len(role) + 1:].strip()
    for role in roles:
        match = re.search(rf"\n\s*{re.escape(role)}\s*:", text, re.I)
        if match:
            text = text[:match.start()].strip()
    return text.strip().strip('"').strip()


class Planner:
    """The frozen LLM's prior over the task's actions."""

    def __init__(self, task, llm, mode="logits", num_samples=10, use_emotion=True,
                 max_new_tokens=4):
        self.task = task
        self.max_new_tokens = max_new_tokens  # answer length when mode is 'sample'
        self.llm = llm
        self.mode = mode
        self.num_samples = num_samples
        self.use_emotion = use_emotion
        self.labels = [str(i + 1) for i in range(len(task.actions))]
        self.invalid_answers = 0  # sampled answers that named no action (mode 'sample')

    def prompt(self, conversation):
        options = "\n".join(f"{label}. {name}"
                            for label, name in zip(self.labels, self.task.action_names))
        emotions = ", ".join(conversation.emotions) if self.use_emotion else "not tracked"

        def build(turns, _):
            text = prompts.PLANNER_TEMPLATE.format(
                system_role=self.task.system_role, user_role=self.task.user_role,
                transcript=transcript(turns), emotions=emotions or "unknown", options=options)
            return [{"role": "system", "content": self.task.prompts["planner"]},
                    {"role": "user", "content": text}]
        return fit_prompt(self.llm, build, conversation.turns, {}, self.max_new_tokens,
                          conversation.prompt_cuts, "planner")

    def prior(self, conversations):
        """[batch, num_actions] probabilities, each row summing to 1."""
        chats = [self.prompt(c) for c in conversations]
        if self.mode == "logits":
            return self.llm.option_probs(chats, self.labels,
                                         cache_keys=[(c.uid, "planner") for c in conversations])
        answers = self.llm.chat(chats, max_new_tokens=self.max_new_tokens, temperature=1.0,
                                num_samples=self.num_samples,
                                seeds=[c.seed("planner") for c in conversations])
        return torch.stack([self._prior_from_samples(a) for a in answers])

    def _prior_from_samples(self, answers):
        counts = Counter()
        for answer in answers:
            match = re.search(r"\d+", answer)
            if match and match.group(0) in self.labels:
                counts[match.group(0)] += 1
            else:
                self.invalid_answers += 1
        # add-one smoothing: an action never sampled keeps a small prior
        prior = torch.tensor([counts[label] + 1.0 for label in self.labels])
        return prior / prior.sum()


class SelfPlayEnv:
    def __init__(self, task, system_llm, user_llm, critic, max_turn=8,
                 system_temperature=0.7, user_temperature=0.7, eval_temperature=0.0,
                 system_max_new_tokens=80, user_max_new_tokens=60, use_emotion=True):
        self.task = task
        self.system_llm = system_llm
        self.user_llm = user_llm
        self.critic = critic
        self.max_turn = max_turn
        self.system_temperature = system_temperature
        self.user_temperature = user_temperature
        self.eval_temperature = eval_temperature  # system and user turns in evaluation
        self.system_max_new_tokens = system_max_new_tokens
        self.user_max_new_tokens = user_max_new_tokens
        self.use_emotion = use_emotion
        self.errors = Counter()  # LLM answers that could not be used as they were

    def reset(self, case, case_id=None, stream=None):
        return Conversation(case=case, turns=self.task.opening(case),
                            emotions=list(self.task.initial_emotions(case)), case_id=case_id,
                            stream=stream)

    # -- prompts -------------------------------------------------------------------------

    @staticmethod
    def _chat_view(turns, own_role, system_text):
        messages = [{"role": "system", "content": system_text}]
        for role, text in turns:
            messages.append({"role": "assistant" if role == own_role else "user",
                             "content": text})
        return messages

    def system_prompt(self, conversation, action):
        template = prompts.SYSTEM_TURN_WITH_EMOTION if self.use_emotion else prompts.SYSTEM_TURN
        instruction = template.format(system_role=self.task.system_role,
                                      user_role=self.task.user_role,
                                      instruction=self.task.actions[action]
                                      if action is not None else "").strip()

        def build(turns, fields):
            messages = self._chat_view(turns, self.task.system_role,
                                       self.task.prompts["system"].format(**fields))
            if messages[-1]["role"] == "user":
                messages[-1]["content"] += f"\n\n({instruction})"
            else:
                messages.append({"role": "user", "content": f"({instruction})"})
            return messages
        return fit_prompt(self.system_llm, build, conversation.turns,
                          case_fields(conversation.case), self.system_max_new_tokens,
                          conversation.prompt_cuts, "system")

    def user_prompt(self, conversation):
        def build(turns, fields):
            return self._chat_view(turns, self.task.user_role,
                                   self.task.prompts["user"].format(**fields))
        return fit_prompt(self.user_llm, build, conversation.turns,
                          case_fields(conversation.case), self.user_max_new_tokens,
                          conversation.prompt_cuts, "user")

    # -- one batched step ----------------------------------------------------------------

    def step(self, conversations, actions, evaluation=False):
        """Play one exchange of every conversation. An action None gives the system LLM no
        strategy (the 'none' baseline). In evaluation the system and user turns decode at
        eval_temperature (greedy by default); the critic is unchanged."""
        system_temperature = self.eval_temperature if evaluation else self.system_temperature
        user_temperature = self.eval_temperature if evaluation else self.user_temperature
        roles = (self.task.system_role, self.task.user_role)
        records = [{"turn": c.system_turns + 1, "action": a} for c, a in zip(conversations, actions)]

        system_answers = self.system_llm.chat(
            [self.system_prompt(c, a) for c, a in zip(conversations, actions)],
            max_new_tokens=self.system_max_new_tokens, temperature=system_temperature,
            cache_keys=[(c.uid, "system") for c in conversations],
            seeds=[c.seed("system") for c in conversations])
        for conversation, answer, record in zip(conversations, system_answers, records):
            if self.use_emotion:
                emotion, response, ok = parse_emotion_response(answer[0], roles)
                if not ok:
                    self.errors["system_format"] += 1
                    record["system_format_error"] = 1
                conversation.emotions.append(emotion)
                record["emotion"] = emotion
            else:
                response = clean_turn(answer[0], roles)
            if not response:
                self.errors["system_empty"] += 1
                record["system_empty"] = 1
                response = "..."
            record["system_raw"], record["system"] = answer[0], response
            conversation.turns.append((self.task.system_role, response))
            conversation.system_turns += 1

        user_answers = self.user_llm.chat(
            [self.user_prompt(c) for c in conversations],
            max_new_tokens=self.user_max_new_tokens, temperature=user_temperature,
            cache_keys=[(c.uid, "user") for c in conversations],
            seeds=[c.seed("user") for c in conversations])
        for conversation, answer, record in zip(conversations, user_answers, records):
            response = clean_turn(answer[0], roles)
            if not response:
                self.errors["user_empty"] += 1
                record["user_empty"] = 1
                response = "..."
            record["user"] = response
            conversation.turns.append((self.task.user_role, response))

        verdicts = self.critic.score(conversations)
        results = []
        for conversation, verdict, record in zip(conversations, verdicts, records):
            self.errors["critic_invalid"] += verdict.invalid
            # the only endings are success and the turn limit, as in the original release
            truncated = not verdict.success and conversation.system_turns >= self.max_turn
            conversation.outcome = ("success" if verdict.success
                                    else "time limit" if truncated else None)
            conversation.total_reward += verdict.reward
            if verdict.sale_to_list is not None:
                conversation.sale_to_list = verdict.sale_to_list
            record.update(critic_answers=verdict.answers, critic_invalid=verdict.invalid,
                          critic_option_probs=[round(p, 4) for p in verdict.option_probs],
                          reward=verdict.reward, outcome=conversation.outcome)
            if verdict.deal_price is not None:
                record["deal_price"] = verdict.deal_price
            conversation.records.append(record)
            results.append(StepResult(verdict.reward, verdict.success, truncated))
        return results
