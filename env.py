"""Self-play environment: conversation state, the planner's prior, and batched steps.

`reset` starts conversations and `step` advances a batch of them by one exchange; both
return what the agent acts on, an `Observation` per conversation: the candidate actions
with their priors (`Planner.candidates`: the top-k of the planner's prior over the task's
whole action set, or with --prior list every action that one sampled answer named). A
step has four phases, each asking its role's LLM for the whole batch at once:
  system phase: one call: the system LLM realises each chosen action ("Emotion: ...
                Response: ...")
  user phase:   one call: the user LLM answers in role
  critic phase: the critic answers its closed question (options.ask: one call for every
                conversation's first order of the options, then one per sample count of
                the other orders); in logits mode cb's price of a likely deal is one more,
                greedy call. The reward and the outcome follow
  planner:      the prior of every conversation that goes on (or ended at the turn limit,
                whose next state still bootstraps), asked as the critic asks (--prior list:
                one call per try, each asking again those whose answer named no action)
"""

import dataclasses
import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

import options
import qwen_prompts as prompts
from llm import add_cost, empty_cost, fit_prompt, stream_seed
from run_files import TurnRecord
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
    records: list = field(default_factory=list)  # per system turn: run_files.TurnRecord.to_dict
    system_turns: int = 0
    outcome: str | None = None  # 'success' or 'time limit' once finished
    total_reward: float = 0.0
    sale_to_list: float | None = None
    # the current state's candidates (SelfPlayEnv.observe): top-k actions, their priors,
    # and the first action of each order the planner was shown (Planner.prior)
    candidates: list = field(default_factory=list)
    candidate_priors: list = field(default_factory=list)
    prior_orders: list = field(default_factory=list)
    # modes list and project: the planner's sampled answers and the actions each named
    planner_answers: list = field(default_factory=list)
    # the planner's answers about the current state that named no action (modes sample,
    # list and project); the turn's record keeps them (SelfPlayEnv.end_turn)
    planner_invalid: int = 0
    prompt_cuts: dict = field(default_factory=dict)  # prompts cut to fit a context (llm.py)
    case_id: int | None = None  # the case's place in its split (pairs runs in reports)
    # the seed of this conversation's LLM samples (llm.stream_seed): the trainer derives it
    # from the run's seed and the case (evaluation) or the episode (training)
    stream: int | None = None
    # a simulated copy (SelfPlayEnv.branch): the uid of the real conversation it plans for;
    # its LLM calls are that conversation's planner cost, and it never enters a record
    owner: int | None = None
    # --user_personas: the user's persona ({"name", "text"}, personas.py), or None
    persona: dict | None = None
    # what its LLM calls cost, settled when it ends (SelfPlayEnv.settle_cost):
    # {"conversation": counts, "planner": counts}, counts as llm.COST_COUNTS
    cost: dict | None = None

    def __post_init__(self):
        if self.stream is None:
            self.stream = self.uid

    def fit(self, llm, build, fields, max_new_tokens, role):
        """build(turns, fields) -> a role's chat messages for this conversation, cut to
        the client's context (llm.fit_prompt); a cut is counted in prompt_cuts."""
        messages, cut = fit_prompt(llm, build, self.turns, fields, max_new_tokens, role)
        if cut:
            self.prompt_cuts[role] = self.prompt_cuts.get(role, 0) + 1
            for key, count in cut.items():
                self.prompt_cuts[key] = self.prompt_cuts.get(key, 0) + count
        return messages

    def seed(self, role):
        """The seed of this turn's samples of one role."""
        return stream_seed(self.stream, self.system_turns, role)

    @property
    def done(self):
        return self.outcome is not None


@dataclass
class Observation:
    """What the agent acts on: a conversation's candidates, best prior first."""
    conversation: Conversation  # the environment's: read it, never change it
    candidates: list  # action names
    priors: list  # their prior probabilities


@dataclass
class StepResult:
    reward: float
    terminated: bool  # success: no bootstrap from the next state
    done: bool  # success or the turn limit: the conversation has ended
    observation: Observation | None  # the next state (None after a success)


def transcript(turns):
    return "\n".join(f"{role}: {text}" for role, text in turns)


EMOTION_PATTERN = re.compile(r"emotion\s*[:\-]\s*\**\s*([A-Za-z][A-Za-z \-]{0,30})", re.I)
RESPONSE_PATTERN = re.compile(r"response\s*[:\-]\s*\**\s*(.*)", re.I | re.S)


def parse_emotion_response(text, roles=()):
    """Split "Emotion: sad Response: I hear you." into ('sad', 'I hear you.', True).

    An emotion of more than two words is 'unknown'. If the format is not followed, the
    whole text is kept as the response with emotion 'unknown' and ok=False, so the caller
    can count it. Text after a line that starts a new speaker's turn ("Patient: ...") is
    cut: the model was writing the other side."""
    emotion_match = EMOTION_PATTERN.search(text)
    response_match = RESPONSE_PATTERN.search(text)
    ok = bool(emotion_match and response_match)
    emotion = "unknown"
    if emotion_match:
        words = [w for w in emotion_match.group(1).lower().split() if w.strip("-")]
        words = words[:words.index("response")] if "response" in words else words
        # one or two words name an emotion; more are a sentence or a fragment of one
        emotion = " ".join(words) if 0 < len(words) <= 2 else "unknown"
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


def most_candidates(task, prior, k):
    """The most candidates a state can have under --prior `prior`: the top k, or with
    'list' (the release's rule) every action."""
    n = len(task.actions)
    return n if prior == "list" else min(k, n)


# -- a conversation's start and the system and user prompts: functions of the task and the
# conversation, which SelfPlayEnv calls with its clients and settings ---------------------

def new_conversation(task, case, case_id=None, stream=None, persona=None):
    """A new conversation of the case, as it opens; persona: the user's
    (personas.draw_persona) or None."""
    return Conversation(case=case, turns=task.opening(case),
                        emotions=list(task.initial_emotions(case)), case_id=case_id,
                        stream=stream, persona=persona)


def chat_view(turns, own_role, system_text):
    """The turns as one speaker's chat: its own turns are the assistant's."""
    messages = [{"role": "system", "content": system_text}]
    for role, text in turns:
        messages.append({"role": "assistant" if role == own_role else "user", "content": text})
    return messages


def system_prompt(task, conversation, action, llm=None, max_new_tokens=80, use_emotion=True):
    """The system LLM's chat for its next turn, with the instruction of `action` (None: no
    strategy) and, with use_emotion, the "Emotion: ... Response: ..." format; cut to fit
    llm's context with max_new_tokens to spare (llm None: not cut)."""
    template = prompts.SYSTEM_TURN_WITH_EMOTION if use_emotion else prompts.SYSTEM_TURN
    instruction = template.format(system_role=task.system_role, user_role=task.user_role,
                                  instruction=task.actions[action]
                                  if action is not None else "").strip()

    def build(turns, fields):
        messages = chat_view(turns, task.system_role, task.prompts["system"].format(**fields))
        if messages[-1]["role"] == "user":
            messages[-1]["content"] += f"\n\n({instruction})"
        else:
            messages.append({"role": "user", "content": f"({instruction})"})
        return messages
    return conversation.fit(llm, build, case_fields(conversation.case), max_new_tokens,
                            "system")


def user_prompt(task, conversation, llm=None, max_new_tokens=60):
    """The user LLM's chat for its next turn, in role (and in its persona, if any); cut to
    fit llm's context with max_new_tokens to spare (llm None: not cut)."""
    persona = conversation.persona

    def build(turns, fields):
        text = task.prompts["user"].format(**fields)
        if persona:
            text += " " + prompts.USER_PERSONA.format(user_role=task.user_role,
                                                      persona=persona["text"])
        return chat_view(turns, task.user_role, text)
    return conversation.fit(llm, build, case_fields(conversation.case), max_new_tokens,
                            "user")


class Planner:
    """The frozen LLM's prior over the task's actions, and each state's candidates.

    The actions are asked as a numbered list. With order 'rotate' the list is shown in
    several rotations (`rotations`, 0: all of them) drawn from the conversation's stream,
    and the prior is the mean of the priors read in each, mapped back to the task's
    action order: a preference for the first listed number is spread over every action
    instead of choosing it. 'fixed' shows the task's order only.

    Modes (--prior): 'logits' reads the option numbers' probabilities; 'sample' counts the
    numbers of sampled answers; both give the top-k as candidates. 'list' is the original
    release's rule: one sampled answer to "which k options are the most suitable?", and
    every action number in it, in its order, is a candidate (`read_list`). 'project'
    samples plans in free text and projects each onto an action (`project`); the prior
    is the frequencies of the projected actions."""

    # answer length by mode when max_new_tokens is 0 (list: the original release's 25)
    ANSWER_TOKENS = {"logits": 4, "sample": 4, "list": 25, "project": 32}

    def __init__(self, task, llm, mode="logits", num_samples=10, use_emotion=True,
                 max_new_tokens=0, order="fixed", rotations=0, embed=None,
                 match_threshold=0.2):
        self.task = task
        self.llm = llm
        self.mode = mode
        self.max_new_tokens = max_new_tokens or self.ANSWER_TOKENS[mode]  # sampled answers
        self.num_samples = num_samples  # sample, project: answers per turn; list: tries
        self.use_emotion = use_emotion
        self.order = order
        self.rotations = rotations
        self.labels = options.labels(len(task.actions))
        # project: texts -> [len(texts), width] embeddings (the Q-adapter's encoder), for
        # the nearest action of a plan that names none; None: such plans are unusable
        self.embed = embed
        self.match_threshold = match_threshold  # least cosine similarity of a nearest action
        self._action_embeddings = None

    def orders(self, conversation):
        """The action orders shown this turn: [[action index at each position]]."""
        return options.shown_orders(conversation, len(self.task.actions), self.order != "fixed",
                                    self.rotations, "planner")

    def prompt(self, conversation, order=None, count=None):
        """The planner's chat for one order of the actions. The question follows the mode:
        one option's number, the numbers of `count` options (list's candidates; list's
        prior over every action, which the MCTS asks, is one option's number), or a plan
        (project, whose options are shown without numbers)."""
        names = self.task.action_names
        shown = [names[a] for a in (order or range(len(names)))]
        if self.mode == "project":
            options, question = "\n".join(f"- {name}" for name in shown), "plan"
        else:
            options = "\n".join(f"{label}. {name}" for label, name in zip(self.labels, shown))
            question = "list" if self.mode == "list" and count is not None else "one"
        question = prompts.PLANNER_QUESTIONS[question].format(
            count=count, system_role=self.task.system_role)
        emotions = ", ".join(conversation.emotions) if self.use_emotion else "not tracked"

        def build(turns, _):
            text = prompts.PLANNER_TEMPLATE.format(
                system_role=self.task.system_role, user_role=self.task.user_role,
                transcript=transcript(turns), emotions=emotions or "unknown", options=options,
                question=question)
            return [{"role": "system", "content": self.task.prompts["planner"]},
                    {"role": "user", "content": text}]
        return conversation.fit(self.llm, build, {}, self.max_new_tokens, "planner")

    def prior(self, conversations):
        """[batch, num_actions] probabilities in the task's action order, each row summing
        to 1 (modes logits, sample and project; list, whose candidates come from `listed`,
        gives the MCTS its prior as sample does). Each conversation's `prior_orders` gets
        the orders shown (the first action of each, which fixes a rotation), and its
        `planner_invalid` the answers that named no action."""
        asked = options.ask(self.llm, "planner", conversations,
                            [self.orders(c) for c in conversations], self.prompt, self.labels,
                            samples=None if self.mode == "logits" else self.num_samples,
                            max_new_tokens=self.max_new_tokens, temperature=1.0)
        rows = []
        for conversation, jobs in zip(conversations, asked):
            conversation.prior_orders = [job.order[0] for job in jobs]
            if self.mode == "logits":
                row = torch.zeros(len(self.task.actions))
                for job in jobs:
                    row += torch.tensor(job.in_task_order())
                rows.append(row / len(jobs))
                conversation.planner_invalid = 0
                continue
            answers = options.answers(jobs)
            if self.mode == "project":
                row = self._prior_from_plans(conversation, [answer for answer, _ in answers])
            else:
                row, conversation.planner_invalid = self._prior_from_samples(
                    [answer for answer, _ in answers], [job.order for _, job in answers])
            rows.append(row)
        return torch.stack(rows)

    def _prior_from_samples(self, answers, orders=None):
        """A smoothed prior over the actions from sampled answers, and the number of
        answers that named no action; answer j was asked with the actions in orders[j]
        (default: the task's order)."""
        counts = Counter()
        orders = orders or [range(len(self.labels))] * len(answers)
        for answer, order in zip(answers, orders):
            match = re.search(r"\d+", answer)
            if match and match.group(0) in self.labels:
                counts[order[int(match.group(0)) - 1]] += 1
        # add-one smoothing: an action never sampled keeps a small prior
        prior = torch.tensor([counts[a] + 1.0 for a in range(len(self.labels))])
        return prior / prior.sum(), len(answers) - sum(counts.values())

    # -- project: free-text plans projected onto the actions ------------------------------

    def project(self, plans):
        """The action index of each plan, or None when it matches no action. First
        RL-LLM-Prior's text match: the action whose name the plan contains most often
        (case-insensitive; a tie goes to the name met first, then the longer name, so
        "counter-noprice" is not "counter"). A plan that names no action goes to the
        action nearest to it by the encoder (cosine similarity of the plan and the
        action's name and instruction), if that is at least match_threshold."""
        names = self.task.action_names
        projected, unnamed = [], []
        for i, plan in enumerate(plans):
            text = plan.lower()
            found = [(-text.count(name.lower()), text.find(name.lower()), -len(name), a)
                     for a, name in enumerate(names) if name.lower() in text]
            projected.append(min(found)[3] if found else None)
            if not found and plan.strip() and self.embed is not None:
                unnamed.append(i)
        if unnamed:
            if self._action_embeddings is None:
                self._action_embeddings = torch.nn.functional.normalize(self.embed(
                    [f"{name}: {self.task.actions[name]}" for name in names]).float(), dim=-1)
            plan_embeddings = torch.nn.functional.normalize(
                self.embed([plans[i] for i in unnamed]).float(), dim=-1)
            similarity = plan_embeddings @ self._action_embeddings.to(plan_embeddings.device).T
            best, nearest = similarity.max(dim=-1)
            for i, value, action in zip(unnamed, best.tolist(), nearest.tolist()):
                if value >= self.match_threshold:
                    projected[i] = action
        return projected

    def _prior_from_plans(self, conversation, plans):
        """The frequencies of the plans' projected actions (uniform when none matched);
        the plans that matched no action are the conversation's `planner_invalid`."""
        projected = self.project(plans)
        conversation.planner_answers = [
            {"answer": plan, "actions": [] if a is None else [self.task.action_names[a]]}
            for plan, a in zip(plans, projected)]
        counts = Counter(a for a in projected if a is not None)
        conversation.planner_invalid = len(plans) - sum(counts.values())
        if not counts:
            return torch.full((len(self.labels),), 1.0 / len(self.labels))
        prior = torch.tensor([float(counts[a]) for a in range(len(self.labels))])
        return prior / prior.sum()

    # -- list: the original release's candidates ------------------------------------------

    @staticmethod
    def read_list(answer, order):
        """The actions that one answer names, by their numbers as shown in `order`, in the
        answer's order. The original's rule is every integer of the answer in its order,
        with these changes: a repeated action is kept once (the original listed it twice,
        so its epsilon draw picked it twice as often); 0 and numbers above the list are
        dropped (the original read 0 as the last action, by Python's index -1, and
        crashed on a larger number)."""
        actions = []
        for number in re.findall(r"\d+", answer):
            position = int(number) - 1
            if 0 <= position < len(order) and order[position] not in actions:
                actions.append(order[position])
        return actions

    def listed(self, conversations, k):
        """The candidates of each conversation by the original's rule: [[action index]].
        An answer that names no action is asked again, with a new sample, up to
        num_samples answers in all (the original dropped the training episode and crashed
        in test); each such answer is counted in the conversation's `planner_invalid`. If
        none names one, every action in the task's order is a candidate."""
        chosen = [None] * len(conversations)
        shown = []
        for conversation in conversations:
            shown.append(self.orders(conversation)[0])
            conversation.prior_orders = [shown[-1][0]]
            conversation.planner_answers = []
            conversation.planner_invalid = 0
        chats = [self.prompt(c, order, k) for c, order in zip(conversations, shown)]
        pending = list(range(len(conversations)))
        for attempt in range(self.num_samples):
            if not pending:
                break
            seeds = [conversations[i].seed("planner") if attempt == 0 else
                     stream_seed(conversations[i].seed("planner"), "ask again", attempt)
                     for i in pending]
            answers = self.llm.chat([chats[i] for i in pending],
                                    max_new_tokens=self.max_new_tokens, temperature=1.0,
                                    seeds=seeds)
            still = []
            for i, answer in zip(pending, answers):
                actions = self.read_list(answer[0], shown[i])
                conversations[i].planner_answers.append(
                    {"answer": answer[0], "actions": [self.task.action_names[a] for a in actions]})
                if actions:
                    chosen[i] = actions
                else:
                    conversations[i].planner_invalid += 1
                    still.append(i)
            pending = still
        everything = list(range(len(self.task.actions)))
        return [actions or everything for actions in chosen]

    def candidates(self, conversations, k):
        """Each conversation's candidates: (prior [batch, n], [[action index]], [[prior]]).
        Modes logits, sample and project: the top-k actions of the prior. Equal priors
        (unsampled actions) are ordered by a draw from the conversation's stream, not by
        their place in the list. Mode list: the actions the answer named, in its order, a
        number that varies by state; each gets the same prior, 1 / their number."""
        if self.mode == "list":
            indices = self.listed(conversations, k)
            prior = torch.zeros(len(conversations), len(self.task.actions))
            for row, actions in zip(prior, indices):
                row[actions] = 1.0 / len(actions)
            return prior, indices, [[1.0 / len(actions)] * len(actions) for actions in indices]
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
    """The conversations' world. `planner` None: an environment that only plays turns
    (`start`, `step`, whose `observation` is then None); `reset` and `observe` need the
    planner. Prompts alone need no environment (system_prompt, user_prompt). The LLM
    answers that could not be used as they were are counted in the turns' records
    (metrics.unusable_counts)."""

    def __init__(self, task, system_llm, user_llm, critic, planner=None, top_k=4, max_turn=8,
                 system_temperature=0.7, user_temperature=0.7, eval_temperature=0.0,
                 system_max_new_tokens=80, user_max_new_tokens=60, use_emotion=True,
                 prior_read=True):
        self.task = task
        self.planner = planner
        # whether the policy reads the observations' prior (Policy.reads_prior); if not, the
        # planner is still asked, for the records, and its cost is booked apart
        self.prior_read = prior_read
        self.top_k = min(top_k, len(task.actions))
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
        self.owners = {}  # uid of a simulated copy (branch) -> uid of its real conversation

    def start(self, case, case_id=None, stream=None, persona=None):
        """A new conversation of the case (new_conversation), without a planner call."""
        return new_conversation(self.task, case, case_id, stream, persona)

    def reset(self, cases):
        """New conversations of [(case, case_id, stream[, persona])] and their observations,
        with one planner call for the batch."""
        return self.observe([self.start(*case) for case in cases])

    def observe(self, conversations):
        """Each conversation's top-k candidates and priors, from one planner call."""
        if not conversations:
            return []
        _, top, top_priors = self.planner.candidates(conversations, self.top_k)
        for conversation, indices, values in zip(conversations, top, top_priors):
            conversation.candidates = [self.task.action_names[i] for i in indices]
            conversation.candidate_priors = values
        return [self.observation(c) for c in conversations]

    def branch(self, conversation, stream=None):
        """A simulated copy of the conversation for a planner's lookahead (MCTS): its own
        uid, owned by the real conversation (`owner`), whose planner cost its LLM calls
        count as (`owners`). The real conversation is never changed by it. stream: the
        seed of the copy's samples (default: the conversation's, so that the copy draws
        what the conversation would). The copy's user has no persona: a persona is the
        user's own, which no planner is told. Each client's cache lets the copy's first prompt of
        a role extend the conversation's last one (LLMClient.branch)."""
        copy = dataclasses.replace(
            conversation, uid=next(_conversation_ids), turns=list(conversation.turns),
            emotions=list(conversation.emotions), records=[],
            candidates=list(conversation.candidates),
            candidate_priors=list(conversation.candidate_priors),
            prior_orders=list(conversation.prior_orders), prompt_cuts={},
            persona=None,  # the user's persona is hidden from the planner's lookahead
            stream=conversation.stream if stream is None else stream,
            owner=conversation.owner if conversation.owner is not None else conversation.uid)
        self.owners[copy.uid] = copy.owner
        for llm in self._clients():
            llm.branch(copy.uid, conversation.uid)
        return copy

    def settle_cost(self, uid):
        """What the conversation `uid` cost, taken from its clients' ledgers: its own
        system, user and critic calls are its "conversation" cost; its planner calls (the
        prior), and every call of its simulated copies (branch), are its "planner" cost;
        for a policy that does not read the prior (prior_read False), its planner calls are
        its "unread_prior" cost instead: asked for the records, not for the policy. Roles
        that share a client are counted once."""
        copies = {copy for copy, owner in self.owners.items() if owner == uid}
        cost = {"conversation": empty_cost(), "planner": empty_cost()}
        if not self.prior_read:
            cost["unread_prior"] = empty_cost()
        clients = {id(llm): llm for llm in self.llms().values() if llm is not None}
        for llm in clients.values():
            for (key_uid, *_, role), counts in llm.take_charges(copies | {uid}).items():
                if key_uid != uid:
                    part = "planner"  # a simulated copy's call
                elif role != "planner":
                    part = "conversation"
                else:
                    part = "planner" if self.prior_read else "unread_prior"
                add_cost(cost[part], counts)
        for copy in copies:
            del self.owners[copy]
        return cost

    def ledgers(self):
        """What settle_cost has yet to settle (the conversations in flight), as a training
        state saves it (restore_ledgers): each role's ledger and the copies' owners."""
        return {"owners": dict(self.owners),
                "roles": {role: dict(llm.ledger) for role, llm in self.llms().items()
                          if llm is not None}}

    def restore_ledgers(self, saved):
        self.owners.update(saved["owners"])
        for role, ledger in saved["roles"].items():
            self.llms()[role].ledger.update(ledger)  # roles that share a client: the same

    def simulate(self, branches, actions, evaluation=False):
        """One exchange of simulated copies (`branch`), as `step` plays it: one batched
        system, user and critic call, at the temperatures of `step`. The copies keep their
        turns, outcome, reward and records (with the unusable answers in them); the real
        conversations are untouched. Returns the verdicts."""
        if any(b.owner is None for b in branches):
            raise ValueError("simulate plays copies made by SelfPlayEnv.branch only")
        return self.exchange(branches, actions, evaluation)

    def simulated_prior(self, branches):
        """The planner's prior [batch, n] of simulated copies, with one planner call, and
        the number of its answers that named no action, per copy."""
        prior = self.planner.prior(branches)
        return prior, [branch.planner_invalid for branch in branches]

    def forget(self, conversations):
        """Drop the cached prompts of conversations that will not be extended (finished
        ones, a search's copies)."""
        for llm in self._clients():
            for conversation in conversations:
                llm.forget(conversation.uid)

    def _clients(self):
        return list({id(llm): llm for llm in self.llms().values() if llm is not None}.values())

    @staticmethod
    def observation(conversation):
        """The observation of a conversation's current state (as last observed)."""
        return Observation(conversation, conversation.candidates, conversation.candidate_priors)

    def llms(self):
        """The LLM client of each role (roles may share one client)."""
        return {"planner": self.planner.llm if self.planner else None,
                "system": self.system_llm, "user": self.user_llm, "critic": self.critic.llm}

    # -- prompts: this environment's clients and settings ----------------------------------

    def system_prompt(self, conversation, action):
        return system_prompt(self.task, conversation, action, self.system_llm,
                             self.system_max_new_tokens, self.use_emotion)

    def user_prompt(self, conversation):
        return user_prompt(self.task, conversation, self.user_llm, self.user_max_new_tokens)

    # -- one batched step ----------------------------------------------------------------

    def step(self, conversations, actions, evaluation=False, notes=None):
        """Play one exchange of every conversation; one StepResult each. An action None
        gives the system LLM no strategy (the 'none' baseline). In evaluation the system
        and user turns decode at eval_temperature (greedy by default); the critic is
        unchanged. notes: per conversation, a dict that the turn's record keeps (the
        agent's choice, for the log)."""
        verdicts = self.exchange(conversations, actions, evaluation, notes)
        # the next state's candidates: to act on, and in training to bootstrap a turn-limit
        # ending (in evaluation nothing reads the state after the last turn: not asked)
        going_on = [c for c, v in zip(conversations, verdicts)
                    if not v.success and not (evaluation and c.done)]
        observations = dict(zip((c.uid for c in going_on),
                                self.observe(going_on) if self.planner else []))
        clients = {id(llm): llm for llm in self.llms().values() if llm is not None}
        for conversation in conversations:
            if conversation.done:
                if conversation.uid in observations and conversation.planner_invalid:
                    # the turn limit: the prior of the state after the last turn
                    conversation.records[-1]["next_planner_invalid"] = conversation.planner_invalid
                for llm in clients.values():
                    llm.forget(conversation.uid)  # its cached prompts will not be extended
                if conversation.owner is None:
                    conversation.cost = self.settle_cost(conversation.uid)
        return [StepResult(v.reward, v.success, c.done, observations.get(c.uid))
                for c, v in zip(conversations, verdicts)]

    def exchange(self, conversations, actions, evaluation=False, notes=None):
        """The system turn, the user's answer and the critic's verdict of every
        conversation, each phase asked for the whole batch at once, and each turn's record
        written; returns the verdicts.
        notes: per conversation, the agent's note for its record (default none)."""
        records = [TurnRecord(turn=c.system_turns + 1, action=a)
                   for c, a in zip(conversations, actions)]
        self.play_system(conversations, actions, records,
                         self.eval_temperature if evaluation else self.system_temperature)
        self.play_user(conversations, records,
                       self.eval_temperature if evaluation else self.user_temperature)
        verdicts = self.critic.score(conversations)
        for conversation, verdict, record, note in zip(conversations, verdicts, records,
                                                        notes or [{}] * len(conversations)):
            self.end_turn(conversation, verdict, record, note)
        return verdicts

    def play_system(self, conversations, actions, records, temperature):
        """The system turns: each action's instruction realised, the user's emotion named."""
        roles = (self.task.system_role, self.task.user_role)
        answers = self.system_llm.chat(
            [self.system_prompt(c, a) for c, a in zip(conversations, actions)],
            max_new_tokens=self.system_max_new_tokens, temperature=temperature,
            cache_keys=[(c.uid, "system") for c in conversations],
            seeds=[c.seed("system") for c in conversations])
        for conversation, answer, record in zip(conversations, answers, records):
            if self.use_emotion:
                emotion, response, ok = parse_emotion_response(answer[0], roles)
                if not ok:
                    record.system_format_error = 1
                conversation.emotions.append(emotion)
                record.emotion = emotion
            else:
                response = clean_turn(answer[0], roles)
            response = self.said(response, "system_empty", record)
            record.system_raw, record.system = answer[0], response
            conversation.turns.append((self.task.system_role, response))
            conversation.system_turns += 1

    def play_user(self, conversations, records, temperature):
        roles = (self.task.system_role, self.task.user_role)
        answers = self.user_llm.chat(
            [self.user_prompt(c) for c in conversations],
            max_new_tokens=self.user_max_new_tokens, temperature=temperature,
            cache_keys=[(c.uid, "user") for c in conversations],
            seeds=[c.seed("user") for c in conversations])
        for conversation, answer, record in zip(conversations, answers, records):
            response = self.said(clean_turn(answer[0], roles), "user_empty", record)
            record.user = response
            conversation.turns.append((self.task.user_role, response))

    def said(self, response, empty, record):
        """The response, or "..." for an empty one, counted as `empty` in the turn's
        record (TurnRecord.system_empty or user_empty)."""
        if response:
            return response
        setattr(record, empty, 1)
        return "..."

    def end_turn(self, conversation, verdict, record, note):
        """The critic's verdict: the reward, the ending, and the turn's record (a
        run_files.TurnRecord, kept as its dict: with the agent's note and the turn's
        prompt cuts)."""
        # the only endings are success and the turn limit, as in the original release
        truncated = not verdict.success and conversation.system_turns >= self.max_turn
        conversation.outcome = ("success" if verdict.success
                                else "time limit" if truncated else None)
        conversation.total_reward += verdict.reward
        if verdict.sale_to_list is not None:
            conversation.sale_to_list = verdict.sale_to_list
        record.set_verdict(verdict, conversation.outcome)
        record.note = note
        if self.planner is not None:
            record.prior_orders = conversation.prior_orders
            record.planner_answers = conversation.planner_answers or None
            record.planner_invalid = conversation.planner_invalid or None
        conversation.records.append({})  # the turn's place: turn_prompt_cuts counts those before
        record.prompt_cuts = turn_prompt_cuts(conversation) or None
        conversation.records[-1] = record.to_dict()


def turn_prompt_cuts(conversation):
    """The prompt cuts (llm.fit_prompt) of the latest turn: the conversation's counts less
    those of its earlier records, so the turn's planner, system, user and critic prompts."""
    before = Counter()
    for record in conversation.records[:-1]:
        before.update(record.get("prompt_cuts", {}))
    return dict(Counter(conversation.prompt_cuts) - before)
