"""The metrics of one conversation, defined once for train_model.py's summaries and
report.py's tables: SR (success), AT (system turns; a failure counts the turn limit), SL
(bargaining: the deal's sale-to-list ratio on a success, 0 otherwise, as PPDPP) and the
return (the sum of the turn rewards)."""

# the record fields that count an LLM answer that could not be used as it was (env.py)
UNUSABLE_KEYS = ("critic_invalid", "system_format_error", "system_empty", "user_empty")


def episode_values(outcome, system_turns, sale_to_list, total_reward, max_turn):
    success = outcome == "success"
    return {"SR": float(success), "AT": float(system_turns if success else max_turn),
            "SL": float(sale_to_list or 0.0) if success else 0.0,
            "mean_return": float(total_reward)}


def unusable_answers(records):
    """The LLM answers of a conversation's records that could not be used."""
    return float(sum(record.get(key) or 0 for record in records for key in UNUSABLE_KEYS))
