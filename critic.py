"""Critic: the critic LLM answers a closed question about the conversation; its answers
become the turn's reward and decide success.

The question lists the task's verdicts as numbered options (qwen_prompts.py), and each
answer is read with `parse_verdict`: the one option it names, by number or by quoting the
option's sentence, or None when it names none or several. No keyword of free text decides
a reward, so "No, the issue has not been solved" is unusable rather than a success.

Two modes (`--critic`):
  sample  `num_samples` answers at `temperature`; the reward is the mean reward of the
          usable answers (0 when none is usable), and unusable answers are counted.
  logits  the exact distribution over the option numbers from one forward pass.
The task's reward rule (tasks.py: `Task.reward`) turns the answers read, or the
distribution, into the reward, the success and (cb) the deal price; in logits mode, when
the rule wants a price (cb: a likely deal), it is asked once, greedily.
"""

import re
from collections import Counter
from dataclasses import dataclass, field

import options
import qwen_prompts as prompts
from env import transcript
from tasks import case_fields, parse_price

# an option number at the very start of an answer: "3", "(3)", "**3.**", "Option 3:"
LEADING_LABEL = re.compile(r"[\s*_\"'`(\[#]*(?:(?:option|answer|choice)\b[\s:#]*(?:is\b\s*)?)?"
                           r"(\d{1,4})(?!\d)(?![.,]\d)", re.IGNORECASE)
# further option numbers: "option 2" anywhere, or a list item "2." / "2)" starting a line
OTHER_LABELS = re.compile(r"\b(?:option|answer|choice)\b[\s:#]*(?:is\b\s*)?(\d{1,4})(?!\d)"
                          r"|(?:^|\n)[ \t*_\"'`(\[#-]*(\d{1,4})[.)](?!\d)", re.IGNORECASE)


def _words(text):
    """Lowercase words with punctuation removed, for quoting checks."""
    return " ".join(re.sub(r"[^\w'$]+", " ", text.lower().replace("\u2019", "'")).split())


def _read(answer, verdicts):
    """(index of the one option named, text after the reference) or (None, '')."""
    named, end = set(), 0
    leading = LEADING_LABEL.match(answer)
    if leading:
        named.add(int(leading.group(1)) - 1)
        end = leading.end()
    for match in OTHER_LABELS.finditer(answer):
        named.add(int(match.group(1) or match.group(2)) - 1)
    if any(not 0 <= i < len(verdicts) for i in named):
        return None, ""  # a number that is not an option
    padded = f" {_words(answer)} "
    for i, verdict in enumerate(verdicts):
        quoted = padded.find(f" {_words(verdict)} ")
        if quoted >= 0:
            named.add(i)
            if not leading:
                end = _position_after_words(answer, len(_words(verdict).split()))
    if len(named) != 1:
        return None, ""
    return named.pop(), answer[end:]


def _position_after_words(answer, count):
    """The character position in answer after its first `count` words (approximately the
    end of a quoted option, which is where a price follows)."""
    words = list(re.finditer(r"[\w'$]+", answer))
    return words[min(count, len(words)) - 1].end() if words else 0


def parse_verdict(answer, verdicts):
    """The index of the one option in `verdicts` that a critic answer names, or None.

    An option is named by its number at the start of the answer ("3", "(3) ...",
    "Option 3"), by "option N" elsewhere, by a list item "N." starting a line, or by
    quoting its sentence. Answers naming no option, several, or a number that is not an
    option, are unusable."""
    return _read(answer, verdicts)[0]


@dataclass
class CriticResult:
    reward: float
    success: bool = False
    answers: list = field(default_factory=list)  # raw answers (sample mode, cb prices)
    option_probs: list = field(default_factory=list)  # per option: frequency or probability
    invalid: int = 0  # answers that named no option, several, or an unusable price
    deal_price: float | None = None  # cb only
    sale_to_list: float | None = None  # cb only
    # the option orders shown (each: the option at each position), and per order the
    # distribution read in it, over the options in the task's order (sample mode: the
    # frequencies of its usable answers)
    orders: list = field(default_factory=list)
    order_probs: list = field(default_factory=list)
    answer_orders: list = field(default_factory=list)  # sample mode: each answer's order
    reads: list = field(default_factory=list)  # sample mode: each answer's option, or None
    # cb: per answer the plausible price the deal rule read (None: not a deal, or none)
    prices: list | None = None


class Critic:
    """Builds the critic prompt, asks the LLM for a whole batch at once, returns results.

    With order 'shuffle' the options are shown in rotations drawn from the conversation's
    stream (so paired runs see the same orders): in sample mode a turn's samples are
    spread over up to one rotation per option, in logits mode the distribution is the mean
    over all rotations. Every answer is read in the order it was shown. 'fixed' shows the
    task's order only."""

    def __init__(self, task, llm, mode="sample", num_samples=10, temperature=1.1,
                 max_new_tokens=24, shared_prefix=True, stop_at_newline=True, order="fixed"):
        if mode not in ("sample", "logits"):
            raise ValueError(f"Unknown critic mode '{mode}'. Expected one of ['logits', 'sample']")
        if order not in ("fixed", "shuffle"):
            raise ValueError(f"Unknown critic order '{order}'. Expected one of ['fixed', 'shuffle']")
        self.task = task
        self.llm = llm
        self.mode = mode
        self.num_samples = num_samples
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.shared_prefix = shared_prefix
        self.stop_at_newline = stop_at_newline  # a verdict is one line
        self.order = order
        self.labels = options.labels(len(task.verdicts))

    def orders(self, conversation):
        """The option orders shown this turn: [[option index at each position]]."""
        return options.shown_orders(conversation, len(self.task.verdicts), self.order != "fixed",
                                    0 if self.mode == "logits" else self.num_samples, "critic")

    def prompt(self, conversation, question=None, order=None):
        """The critic's chat for a conversation (env.Conversation: case and turns), with the
        options in `order` (default: the task's). The critic sees the case and the
        conversation, not the emotions that the system LLM named: those are the policy's
        own output, and without them the critic is the same instrument with and without
        --use_emotion."""
        order = order or range(len(self.task.verdicts))
        options = "\n".join(f"{label}. {self.task.verdicts[i]}"
                            for label, i in zip(self.labels, order))
        question = question or self.task.prompts["critic_question"]
        # cb's question shows the answer format with the deal option's number as shown
        labels = self.task.reward.prompt_fields(self.labels, order)

        def build(turns, fields):
            text = prompts.CRITIC_TEMPLATE.format(
                transcript=transcript(turns), question=question.format(**fields, **labels),
                options=options)
            return [{"role": "system", "content": self.task.prompts["critic"].format(**fields)},
                    {"role": "user", "content": text}]
        return conversation.fit(self.llm, build, case_fields(conversation.case),
                                self.max_new_tokens, "critic")

    def score(self, conversations, orders=None):
        """One CriticResult per conversation, from batched calls (options.ask). orders: per
        conversation, the orders to show (default: `orders`)."""
        asked = options.ask(
            self.llm, "critic", conversations, orders or [self.orders(c) for c in conversations],
            lambda conversation, order: self.prompt(conversation, order=order), self.labels,
            samples=None if self.mode == "logits" else self.num_samples,
            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            shared_prefix=self.shared_prefix, stop_at_newline=self.stop_at_newline)
        results = []
        for conversation, jobs in zip(conversations, asked):
            shown = [job.order for job in jobs]
            if self.mode == "logits":
                per_order = [job.in_task_order() for job in jobs]
                mean = [sum(column) / len(per_order) for column in zip(*per_order)]
                result = self.from_distribution(mean)
                result.order_probs = per_order
            else:
                answers = options.answers(jobs)
                result = self.from_answers(conversation.case, [answer for answer, _ in answers],
                                           shown, [job.k for _, job in answers])
            result.orders = shown
            results.append(result)
        if self.mode == "logits":
            self.ask_prices(conversations, results)
        return results

    # -- sample mode ---------------------------------------------------------------------

    def from_answers(self, case, answers, orders=None, answer_orders=None):
        """The result of a list of sampled answers for one conversation; answer j was asked
        with the options in orders[answer_orders[j]] (default: the task's order)."""
        count = len(self.task.verdicts)
        orders = orders or [list(range(count))]
        answer_orders = answer_orders or [0] * len(answers)
        read = []  # (option in the task's order or None, what the rule read with it)
        for answer, k in zip(answers, answer_orders):
            shown, rest = _read(answer, [self.task.verdicts[i] for i in orders[k]])
            read.append(self.task.reward.read(case, None if shown is None else orders[k][shown],
                                              rest))
        usable = [r for r in read if r[0] is not None]
        counts = Counter(i for i, _ in usable)
        frequencies = [counts[i] / max(len(usable), 1) for i in range(count)]
        result = CriticResult(0.0, answers=list(answers), option_probs=frequencies,
                              invalid=len(read) - len(usable), answer_orders=answer_orders,
                              reads=[i for i, _ in read],
                              prices=[price for _, price in read] if self.task.reward.deals
                              else None)
        for k in range(len(orders)):
            mine = Counter(i for (i, _), j in zip(read, answer_orders) if j == k and i is not None)
            result.order_probs.append([mine[i] / max(sum(mine.values()), 1) for i in range(count)])
        return judged(result, self.task.reward.from_reads(case, usable))

    # -- logits mode ---------------------------------------------------------------------

    def from_distribution(self, probs):
        """The result of the exact option distribution for one conversation (cb: the deal
        decision only; its price comes from `ask_prices`)."""
        return judged(CriticResult(0.0, option_probs=list(probs)),
                      self.task.reward.from_distribution(probs, self.num_samples))

    def ask_prices(self, conversations, results):
        """Ask the price of each result whose distribution the rule wants one for."""
        deals = [i for i, r in enumerate(results)
                 if self.task.reward.wants_price(r.option_probs, self.num_samples)]
        if not deals:
            return
        question = self.task.prompts["price_question"]
        answers = self.llm.chat([self.prompt(conversations[i], question, results[i].orders[0])
                                 for i in deals],
                                max_new_tokens=self.max_new_tokens, temperature=0.0,
                                stop_at_newline=self.stop_at_newline,
                                cache_keys=[(conversations[i].uid, "critic") for i in deals])
        for i, samples in zip(deals, answers):
            case, result = conversations[i].case, results[i]
            result.answers = list(samples)
            judgement = self.task.reward.from_price(case, parse_price(samples[0]))
            if judgement is None:
                result.invalid += 1
                result.prices = [None]
            else:
                judged(result, judgement)
                result.prices = [result.deal_price]


def judged(result, judgement):
    """The result with the reward rule's judgement (tasks.Judgement) in it."""
    result.reward, result.success, result.deal_price, result.sale_to_list = judgement
    return result
