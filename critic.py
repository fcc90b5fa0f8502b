"""Critic: sample verdicts from an LLM and turn them into a scalar reward.

A verdict sentence is recognised if the answer contains it, or else if the answer contains
words that belong to exactly one of the task's verdicts (e.g. "worse" or "solved").
Answers that match no verdict, or several, are counted as invalid and left out of the mean.
For bargaining (cb) the reward of a deal is the sale-to-list ratio of the agreed price:
(seller_price - deal_price) / (seller_price - buyer_price), 1 at the buyer's target price,
0 at the seller's list price.
"""

import re
import statistics
from dataclasses import dataclass, field

import qwen_prompts as prompts
from tasks import case_fields

PRICE_SLOT = "[price]"
# Words too common to identify a verdict on their own, even when only one verdict has them.
STOP_WORDS = {"a", "an", "the", "at", "of", "to", "and", "has", "have", "is", "are", "been",
              "they", "about", "but", "no", "yes", "now", "it", "on", "in", "yet", "only",
              "patient's", "user's", "student's", "persuadee's"}
PRICE_PATTERN = re.compile(r"\$?\s*(\d[\d,]*(?:\.\d+)?)\s*(k\b)?", re.IGNORECASE)


def _normalise(text):
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9$.,'\[\] ]", " ", text.lower())).strip()


def _words(text):
    return set(re.findall(r"[a-z']+", text.lower()))


def parse_price(text):
    """The first number in the text as a price ("$1,200", "1200.50", "1.2k"), or None."""
    match = PRICE_PATTERN.search(text)
    if match is None:
        return None
    value = float(match.group(1).replace(",", ""))
    return value * 1000 if match.group(2) else value


@dataclass
class Verdict:
    sentence: str | None  # the verdict recognised, None if the answer was unusable
    reward: float | None
    price: float | None = None


@dataclass
class CriticResult:
    reward: float  # mean reward over the usable verdicts
    verdicts: list = field(default_factory=list)  # raw answers
    invalid: int = 0  # answers that matched no verdict
    deal_price: float | None = None  # cb only
    sale_to_list: float | None = None  # cb only


class VerdictParser:
    """Maps one critic answer to one of the task's verdict sentences."""

    def __init__(self, verdicts):
        self.verdicts = verdicts
        words = {v: _words(v.replace(PRICE_SLOT, "")) - STOP_WORDS for v in verdicts}
        self.keywords = {v: {w for w in ws if not any(w in words[o] for o in verdicts if o != v)}
                         for v, ws in words.items()}
        empty = [v for v, ws in self.keywords.items() if not ws]
        if empty and len(verdicts) > 2:
            raise ValueError(f"Verdicts {empty} share all their words with other verdicts; "
                             "give each verdict a distinguishing word in qwen_prompts.py")

    def parse(self, answer):
        text = _normalise(answer)
        for verdict in self.verdicts:
            pattern = re.escape(_normalise(verdict).rstrip(".")).replace(
                re.escape(PRICE_SLOT.lower()), r"\s*\$?\s*\d[\d,]*(?:\.\d+)?\s*k?")
            match = re.search(pattern, text)
            if match:
                price = parse_price(match.group(0)) if PRICE_SLOT in verdict else None
                return Verdict(verdict, self.verdicts[verdict], price)
        hits = [v for v, ws in self.keywords.items() if ws & _words(answer)]
        if PRICE_SLOT in "".join(self.verdicts):
            return self._parse_deal(answer, hits)
        if len(hits) == 1:
            return Verdict(hits[0], self.verdicts[hits[0]])
        return Verdict(None, None)

    def _parse_deal(self, answer, hits):
        """Bargaining: "not ... deal" means no deal; "deal ... <price>" is a deal."""
        no_deal = [v for v in self.verdicts if PRICE_SLOT not in v]
        deal = [v for v in self.verdicts if PRICE_SLOT in v]
        lowered = answer.lower()
        if re.search(r"\b(not|no|haven't|didn't|hasn't)\b", lowered) and "deal" in lowered:
            return Verdict(no_deal[0], self.verdicts[no_deal[0]])
        price = parse_price(lowered.split("deal", 1)[-1]) if "deal" in lowered else None
        if price is not None:
            return Verdict(deal[0], self.verdicts[deal[0]], price)
        return Verdict(None, None)


class Critic:
    """Builds the critic prompt, samples verdicts in one batched call, returns rewards."""

    def __init__(self, task, llm, num_samples=10, temperature=1.1, max_new_tokens=24,
                 shared_prefix=True, stop_at_newline=True):
        self.task = task
        self.llm = llm
        self.num_samples = num_samples
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.shared_prefix = shared_prefix
        self.stop_at_newline = stop_at_newline  # a verdict is one line
        self.parser = VerdictParser(task.verdicts)

    def prompt(self, case, transcript, emotions):
        fields = case_fields(self.task.name, case)
        question = prompts.CRITIC_PROMPT[self.task.name].format(**fields)
        text = prompts.CRITIC_TEMPLATE.format(
            system_role=self.task.system_role, user_role=self.task.user_role,
            transcript=transcript, emotions=", ".join(emotions) or "unknown",
            question=question, verdicts="\n".join(self.task.verdicts))
        return [{"role": "user", "content": text}]

    def score(self, cases, transcripts, emotion_histories, cache_keys=None):
        conversations = [self.prompt(c, t, e)
                         for c, t, e in zip(cases, transcripts, emotion_histories)]
        answers = self.llm.chat(conversations, max_new_tokens=self.max_new_tokens,
                                temperature=self.temperature, num_samples=self.num_samples,
                                shared_prefix=self.shared_prefix,
                                stop_at_newline=self.stop_at_newline, cache_keys=cache_keys)
        return [self.reward(case, samples) for case, samples in zip(cases, answers)]

    def reward(self, case, answers):
        parsed = [self.parser.parse(a) for a in answers]
        usable = [p for p in parsed if p.sentence is not None]
        invalid = len(parsed) - len(usable)
        if self.task.bargaining:
            return self._bargain_reward(case, answers, usable, invalid)
        reward = statistics.fmean(p.reward for p in usable) if usable else 0.0
        return CriticResult(reward, answers, invalid)

    def _bargain_reward(self, case, answers, usable, invalid):
        no_deal_reward = min(self.task.verdicts.values())
        deals = [p for p in usable if p.price is not None]
        if not usable or len(deals) * 2 <= len(usable):  # majority says no deal
            return CriticResult(no_deal_reward, answers, invalid)
        price = statistics.median(p.price for p in deals)
        ratio = sale_to_list(price, case["buyer_price"], case["seller_price"])
        return CriticResult(ratio, answers, invalid, deal_price=price, sale_to_list=ratio)


def sale_to_list(price, buyer_price, seller_price):
    return (seller_price - price) / (seller_price - buyer_price)


def outcome(task, result):
    """'success', 'failure' or None (the dialogue goes on) for one critic result."""
    if task.bargaining:
        return "success" if result.deal_price is not None else None
    if result.reward >= task.success_threshold:
        return "success"
    if task.failure_threshold is not None and result.reward <= task.failure_threshold:
        return "failure"
    return None
