"""The metrics of one conversation, defined once for train_model.py's summaries and
report.py's tables: SR (success), AT (system turns; a failure counts the turn limit), SL
(bargaining: the deal's sale-to-list ratio on a success, 0 otherwise, as PPDPP) and the
return (the sum of the turn rewards), and the strategy bias of a run's choices."""

import math
from collections import Counter

# the record fields that count an LLM answer of the turn's exchange that could not be used
# as it was (env.py)
UNUSABLE_KEYS = ("critic_invalid", "system_format_error", "system_empty", "user_empty")
# every record field that counts unusable answers, the planner's too, and its name in a
# run's figures (llm_answers_unusable); next_planner_invalid: the answers about the state
# after a turn-limit ending's last turn
UNUSABLE_FIGURES = {"system_format_error": "system_format", "system_empty": "system_empty",
                    "user_empty": "user_empty", "critic_invalid": "critic_invalid",
                    "planner_invalid": "planner", "next_planner_invalid": "planner"}


def episode_values(outcome, system_turns, sale_to_list, total_reward, max_turn):
    success = outcome == "success"
    return {"SR": float(success), "AT": float(system_turns if success else max_turn),
            "SL": float(sale_to_list or 0.0) if success else 0.0,
            "mean_return": float(total_reward)}


def unusable_answers(records):
    """The LLM answers of a conversation's records that could not be used."""
    return float(sum(record.get(key) or 0 for record in records for key in UNUSABLE_KEYS))


def unusable_counts(conversations):
    """The unusable LLM answers of conversations, from their records, per figure name
    (UNUSABLE_FIGURES); kinds never met are left out."""
    counts = Counter()
    for conversation in conversations:
        for record in conversation.records:
            for key, name in UNUSABLE_FIGURES.items():
                counts[name] += record.get(key) or 0
    return +counts


def search_counts(conversations):
    """What the MCTS planners' searches played (the turn records' `search`, mcts.py): the
    turns searched, the simulated turns in them, and the unusable LLM answers of those
    simulated turns and of the planner's priors for the trees' nodes, per figure name
    (UNUSABLE_FIGURES), with their rate per simulated turn. None when no turn searched, or
    when some search's record is older than these counts (no `simulated_turns`)."""
    searches = [record["search"] for conversation in conversations
                for record in conversation.records if record.get("search")]
    if not searches or any("simulated_turns" not in search for search in searches):
        return None
    simulated = sum(search["simulated_turns"] for search in searches)
    unusable = Counter()
    for search in searches:
        for key, count in (search.get("errors") or {}).items():
            unusable[UNUSABLE_FIGURES.get(key, key)] += count
    return {"searched_turns": len(searches), "simulated_turns": simulated,
            "answers_unusable": dict(unusable),
            "unusable_per_simulated_turn": sum(unusable.values()) / simulated if simulated
            else None}


def distribution(counts, names):
    """{name: share} over every name (0 for those never counted); {} when nothing was."""
    total = sum(counts.get(name, 0) for name in names)
    return {name: counts.get(name, 0) / total for name in names} if total else {}


def normalised_entropy(shares):
    """Entropy of a distribution over n names, divided by log(n): 0 when one name has it
    all, 1 when every name has 1/n (the base of the logarithm cancels)."""
    if len(shares) < 2:
        return None
    return -sum(p * math.log(p) for p in shares.values() if p > 0) / math.log(len(shares))


def distances(shares, reference):
    """Total variation (half the L1 distance) and Jensen-Shannon divergence (base 2; both
    in [0, 1]) between two distributions over the same names."""
    middle = {name: (shares[name] + reference[name]) / 2 for name in shares}

    def kl(p):
        return sum(p[name] * math.log2(p[name] / middle[name]) for name in p if p[name] > 0)
    return {"total_variation": sum(abs(shares[n] - reference[n]) for n in shares) / 2,
            "js_divergence": (kl(shares) + kl(reference)) / 2}


def strategy_bias(chosen, names, human=None):
    """How concentrated a run's strategies are. chosen: (turn number, action name or None
    for no strategy) of every turn played; names: the task's actions; human: the action
    names of the human system turns of the same cases that carry a strategy label (None:
    the task's data has no labels). Overall and per turn: the share of each action,
    the normalised entropy, the most chosen action and its share; and the distances
    from the human distribution."""
    def describe(actions):
        shares = distribution(Counter(actions), names)
        top = max(shares, key=shares.get) if shares else None
        return {"turns": len(actions), "entropy": normalised_entropy(shares),
                "top_action": top, "top_share": shares[top] if top else None,
                "distribution": shares}
    with_strategy = [(turn, action) for turn, action in chosen if action is not None]
    bias = describe([action for _, action in with_strategy])
    bias["no_strategy_turns"] = len(chosen) - len(with_strategy)
    bias["per_turn"] = {turn: describe([a for t, a in with_strategy if t == turn])
                        for turn in sorted({t for t, _ in with_strategy})}
    bias["human"] = None
    if human:
        bias["human"] = describe(human)
        if bias["distribution"]:
            bias["human"] |= distances(bias["distribution"], bias["human"]["distribution"])
    return bias
