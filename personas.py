"""User personas: one per conversation, given to the user simulator with its task prompt.

A planner tuned against one simulated user can fail against others (TRIP, Zhang et al.
2024, trains and tests against a population of users built from the Big-Five personality
traits and decision-making styles). `--user_personas builtin` is such a population: each
of the five traits (its high pole) with each of four decision-making styles, 20 personas,
described here in our own words. `--user_personas FILE` reads one's own: a JSON list of
{"name": ..., "text": ...}, the text written to the user as "you". `--test_user_personas`
gives the test another population (validation plays the training one).

The persona of a conversation is drawn from the conversation's own stream (llm.stream_seed),
so every policy meets the same persona in the same test case and training episode.
"""

import json
import random

from errors import UserError
from llm import stream_seed

TRAITS = {
    "openness": "You are curious and open to new ideas, and you like to hear other ways of "
                "seeing your situation.",
    "conscientiousness": "You are careful and organised; you want concrete, well-founded "
                         "steps and distrust vague promises.",
    "extraversion": "You are talkative and warm; you share a lot and respond well to a "
                    "personal, friendly tone.",
    "agreeableness": "You are trusting and cooperative; you avoid conflict and are easily "
                     "moved by kindness.",
    "neuroticism": "You are anxious and easily upset; you worry about what could go wrong "
                   "and need reassurance before you move on.",
}
STYLES = {
    "directive": "You decide quickly and want the other person to get to the point.",
    "analytical": "You decide slowly and want facts, reasons and details first.",
    "conceptual": "You decide by the big picture and respond to ideas and possibilities.",
    "behavioral": "You decide by how people make you feel and what others around you think.",
}
BUILTIN = [{"name": f"{trait}/{style}", "text": f"{trait_text} {style_text}"}
           for trait, trait_text in TRAITS.items() for style, style_text in STYLES.items()]


def load_personas(spec, flag="--user_personas"):
    """The population named by a --user_personas value: None for 'none' (or ''), the
    builtin population, or a JSON file's list. A bad file ends in one UserError."""
    if spec in ("", "none"):
        return None
    if spec == "builtin":
        return list(BUILTIN)
    try:
        with open(spec, encoding="utf-8") as f:
            personas = json.load(f)
    except UnicodeDecodeError as error:
        raise UserError(f"{flag} {spec} is not UTF-8 text (byte {error.start}). Save it as "
                        "UTF-8") from None
    except OSError as error:
        raise UserError(f"{flag} {spec} cannot be read ({error.strerror}). Pass 'none', "
                        "'builtin' or a JSON file of personas") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{flag} {spec} is not JSON (line {error.lineno}: {error.msg}). "
                        'Write a list of {"name": ..., "text": ...}') from None
    if not isinstance(personas, list) or not personas:
        raise UserError(f"{flag} {spec} holds no personas. Write a non-empty JSON list of "
                        '{"name": ..., "text": ...}')
    names = set()
    for i, persona in enumerate(personas):
        if not (isinstance(persona, dict) and all(
                isinstance(persona.get(key), str) and persona[key].strip()
                for key in ("name", "text"))):
            raise UserError(f"{flag} {spec}: persona {i + 1} has no name or no text. Give "
                            'each persona a non-empty "name" and "text"')
        if persona["name"] in names:
            raise UserError(f"{flag} {spec}: the name '{persona['name']}' is given to two "
                            "personas. Give each persona its own name")
        names.add(persona["name"])
    return [{"name": p["name"].strip(), "text": p["text"].strip()} for p in personas]


def draw_persona(population, stream):
    """The persona of the conversation whose LLM samples come from `stream` (None when
    there is no population): the same stream, the same persona, whatever the policy."""
    if not population:
        return None
    return dict(population[random.Random(stream_seed(stream, "persona")).randrange(
        len(population))])
