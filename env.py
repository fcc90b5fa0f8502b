"""Self-play environment: conversation state, the planner's prior, and batched steps.

One `step` advances a batch of conversations by one exchange:
  system phase: the system LLM realises each chosen action ("Emotion: ... Response: ...")
  user phase:   the user LLM answers in role
  critic phase: the critic answers its closed question; the reward and the outcome follow
Each phase is one batched LLM call. The planner (`Planner.prior`) gives the observation:
a prior over the task's whole action set, from which the top-k candidates are taken.
"""

import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

import qwen_prompts as prompts
from llm import (ask_in_orders, fit_prompt, order_seed, rotations, split_samples,
                 stream_seed)
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
    prior_orders: list = field(default_factory=list)  # the planner's orders (Planner.prior)
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
    """The frozen LLM's prior over the task's actions.

    The actions are asked as a numbered list. With order 'rotate' the list is shown in
    several rotations (`rotations`, 0: all of them) drawn from the conversation's stream,
    and the prior is the mean of the priors read in each, mapped back to the task's
    action order: a preference for the first listed number is spread over every action
    instead of choosing it. 'fixed' shows the task's order only."""

    def __init__(self, task, llm, mode="logits", num_samples=10, use_emotion=True,
                 max_new_tokens=4, order="fixed", rotations=0):
        self.task = task
        self.max_new_tokens = max_new_tokens  # answer length when mode is 'sample'
        self.llm = llm
        self.mode = mode
        self.num_samples = num_samples
        self.use_emotion = use_emotion
        self.order = order
        self.rotations = rotations
        self.labels = [str(i + 1) for i in range(len(task.actions))]
        self.invalid_answers = 0  # sampled answers that named no action (mode 'sample')

    def orders(self, conversation):
        """The action orders shown this turn: [[action index at each position]]."""
        n = len(self.task.actions)
        if self.order == "fixed":
            return [list(range(n))]
        return rotations(n, self.rotations, stream_seed(conversation.stream,
                                                        conversation.system_turns, "planner_order"))

    def prompt(self, conversation, order=None):
        names = self.task.action_names
        options = "\n".join(f"{label}. {names[a]}"
                            for label, a in zip(self.labels, order or range(len(names))))
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
        """[batch, num_actions] probabilities in the task's action order, each row summing
        to 1. Each conversation's `prior_orders` gets the orders shown (the first action
        of each, which fixes a rotation)."""
        jobs, orders = [], []
        for i, conversation in enumerate(conversations):
            shown = self.orders(conversation)
            if self.mode == "sample":
                shown = split_samples(self.num_samples, shown)
            else:
                shown = [(order, 1) for order in shown]
            orders.append([order for order, _ in shown])
            conversation.prior_orders = [order[0] for order, _ in shown]
            for k, (order, count) in enumerate(shown):
                jobs.append((i, k, self.prompt(conversation, order), count,
                             order_seed(conversation.seed("planner"), k)))

        def ask(part):
            chats = [job[2] for job in part]
            if self.mode == "logits":
                keys = [(conversations[job[0]].uid, "planner") for job in part]
                return list(self.llm.option_probs(chats, self.labels, cache_keys=keys))
            return self.llm.chat(chats, max_new_tokens=self.max_new_tokens, temperature=1.0,
                                 num_samples=part[0][3], seeds=[job[4] for job in part])
        results = ask_in_orders(ask, jobs)
        n = len(self.task.actions)
        rows = []
        for i, conversation_orders in enumerate(orders):
            if self.mode == "logits":
                row = torch.zeros(n)
                for k, order in enumerate(conversation_orders):
                    row[order] += results[(i, k)].float()  # position -> its action
                rows.append(row / len(conversation_orders))
            else:
                answers = [(answer, order) for k, order in enumerate(conversation_orders)
                           for answer in results[(i, k)]]
                rows.append(self._prior_from_samples(*zip(*answers)))
        return torch.stack(rows)

    def _prior_from_samples(self, answers, orders=None):
        """A smoothed prior over the actions from sampled answers; answer j was asked with
        the actions in orders[j] (default: the task's order)."""
        counts = Counter()
        orders = orders or [range(len(self.labels))] * len(answers)
        for answer, order in zip(answers, orders):
            match = re.search(r"\d+", answer)
            if match and match.group(0) in self.labels:
                counts[order[int(match.group(0)) - 1]] += 1
            else:
                self.invalid_answers += 1
        # add-one smoothing: an action never sampled keeps a small prior
        prior = torch.tensor([counts[a] + 1.0 for a in range(len(self.labels))])
        return prior / prior.sum()

    def candidates(self, conversations, k):
        """The top-k actions of each conversation's prior: (prior [batch, n], [[action
        index]], [[prior]]). Equal priors (unsampled actions in sample mode) are ordered
        by a draw from the conversation's stream, not by their place in the list."""
        prior = self.prior(conversations)
        indices, values = [], []
        for conversation, row in zip(conversations, prior.tolist()):
            draw = random.Random(stream_seed(conversation.stream, conversation.system_turns,
                                             "planner_ties"))
            ties = [draw.random() for _ in row]
            top = sorted(range(len(row)), key=lambda a: (-row[a], ties[a]))[:k]
            indices.append(top)
            values.append([row[a] for a in top])
        return prior, indices, values


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
                          critic_orders=verdict.orders,
                          critic_order_probs=[[round(p, 4) for p in row]
                                              for row in verdict.order_probs],
                          reward=verdict.reward, outcome=conversation.outcome)
            if verdict.reads:  # sample mode: the order each answer saw, the option it named
                record.update(critic_answer_orders=verdict.answer_orders,
                              critic_reads=verdict.reads)
            if verdict.deal_price is not None:
                record["deal_price"] = verdict.deal_price
            conversation.records.append(record)
            results.append(StepResult(verdict.reward, verdict.success, truncated))
        return results
