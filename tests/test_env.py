import re

import pytest
import torch

from conftest import DEMO, ScriptedLLM
from critic import Critic
from env import (Conversation, Planner, SelfPlayEnv, clean_turn, most_candidates,
                 new_conversation, parse_emotion_response, system_prompt)
from metrics import unusable_counts
from tasks import get_task, load_split


@pytest.mark.parametrize("text,emotion,response,ok", [
    ("Emotion: sad\nResponse: I hear you.", "sad", "I hear you.", True),
    ("emotion - Anxious. response: Tell me more!", "anxious", "Tell me more!", True),
    ("**Emotion:** hopeful **Response:** Good.", "hopeful", "Good.", True),
    ("I hear you, that sounds hard.", "unknown", "I hear you, that sounds hard.", False),
    ("Emotion: sad", "sad", "Emotion: sad", False),
    ("Emotion: sad\nResponse: Okay.\nPatient: I feel bad", "sad", "Okay.", True),
    ("Emotion: deeply hurt - Response: Sorry.", "deeply hurt", "Sorry.", True),
    # a sentence about the emotion is no emotion: not its first two words ("the patient")
    ("Emotion: The patient seems anxious.\nResponse: I see.", "unknown", "I see.", True),
])
def test_parse_emotion_response(text, emotion, response, ok):
    assert parse_emotion_response(text, ("Therapist", "Patient")) == (emotion, response, ok)


def test_clean_turn_drops_role_prefix_and_other_speaker():
    assert clean_turn("Seller: fine.\nBuyer: ok", ("Buyer", "Seller")) == "fine."


def _env(task_name, critic_answer, system_answer="Emotion: calm\nResponse: Try a walk.",
         max_turn=3):
    task = get_task(task_name)
    system = ScriptedLLM(lambda p: system_answer)
    user = ScriptedLLM(lambda p: "Thanks, I will try.")
    critic = Critic(task, ScriptedLLM(lambda p: critic_answer), num_samples=3)
    return task, system, user, SelfPlayEnv(task, system, user, critic, max_turn=max_turn)


def test_empty_system_and_user_turns_become_an_ellipsis_and_are_counted():
    task, system, user, env = _env("esc", "3", system_answer="   ")
    user.reply = lambda prompt: "Patient:  "
    conversation = env.start(load_split(DEMO, "esc", "test")[0])
    env.step([conversation], ["Question"])
    record = conversation.records[0]
    assert conversation.turns[-2:] == [("Therapist", "..."), ("Patient", "...")]
    assert record["system"] == "..." and record["user"] == "..."
    assert record["system_empty"] == 1 and record["user_empty"] == 1
    counts = unusable_counts([conversation])
    assert counts["system_empty"] == 1 and counts["user_empty"] == 1


def test_step_appends_turns_emotions_and_rewards_in_one_call_per_phase():
    task, system, user, env = _env("esc", "No, but the Patient feels somewhat better.")
    conversations = [env.start(c) for c in load_split(DEMO, "esc", "train")[:3]]
    results = env.step(conversations, ["Question", "Information", "Others"])
    assert system.calls == [("chat", 3, 1)] and user.calls == [("chat", 3, 1)]
    for conversation, result in zip(conversations, results):
        assert conversation.turns[-2] == ("Therapist", "Try a walk.")
        assert conversation.turns[-1] == ("Patient", "Thanks, I will try.")
        assert conversation.emotions == [conversation.case["emotion_type"], "calm"]
        assert result.reward == 0.5 and result.terminated and result.done
        assert conversation.outcome == "success"


def test_time_limit_truncates_without_terminating():
    task, _, _, env = _env("esc", "2", max_turn=2)
    conversation = env.start(load_split(DEMO, "esc", "test")[0])
    first = env.step([conversation], ["Question"])[0]
    assert not first.terminated and not first.done and conversation.outcome is None
    second = env.step([conversation], ["Question"])[0]
    assert second.done and not second.terminated
    assert conversation.outcome == "time limit" and conversation.total_reward == -1.0


def test_unusable_system_answers_are_counted_not_dropped():
    task, _, _, env = _env("esc", "2", system_answer="Hello!")
    conversation = env.start(load_split(DEMO, "esc", "test")[0])
    env.step([conversation], ["Question"])
    assert unusable_counts([conversation])["system_format"] == 1
    assert conversation.turns[-2] == ("Therapist", "Hello!")
    assert conversation.emotions == [conversation.case["emotion_type"], "unknown"]


def test_system_prompt_carries_instruction_and_format():
    task = get_task("cima")
    conversation = new_conversation(task, load_split(DEMO, "cima", "test")[0])
    messages = system_prompt(task, conversation, "Hint")
    assert messages[0]["role"] == "system" and conversation.case["sentence"] in messages[0]["content"]
    # the original's teacher is not handed the target translation
    assert not any(conversation.case["target"] in m["content"] for m in messages)
    assert task.actions["Hint"] in messages[-1]["content"]
    assert "Emotion:" in messages[-1]["content"] and messages[-1]["role"] == "user"


# what the release's qwen_prompts.py asks of each reply, beyond "one short sentence"
@pytest.mark.parametrize("task_name,role,asked", [
    ("cima", "system", "helpful"),  # CIMA_roleplay: "one short and helpful sentence"
    ("cb", "system", "persuasive"),  # CB_roleplay: "ONE short and persuasive sentence"
    ("p4g", "system", "persuasive"),  # P4G_roleplay: "based on that emotional state, ..."
    ("p4g", "system", "based on the Persuadee's emotional state"),
    ("esc", "user", "naturally and with emotion"),  # ESConv_roleplay: "in a natural, emotional way"
    ("extes", "user", "naturally and with emotion"),  # ExTES_roleplay: the same
])
def test_each_reply_is_asked_for_as_the_release_asks_for_it(task_name, role, asked):
    from env import user_prompt

    task = get_task(task_name)
    conversation = new_conversation(task, load_split(DEMO, task_name, "test")[0])
    messages = (system_prompt(task, conversation, task.action_names[0]) if role == "system"
                else user_prompt(task, conversation))
    assert asked in messages[0]["content"]


def test_planner_logits_prior_covers_all_actions():
    task = get_task("p4g")
    llm = ScriptedLLM(None, prior=lambda prompt, labels: [float(i) for i in range(1, len(labels) + 1)])
    planner = Planner(task, llm)
    conversation = new_conversation(task, load_split(DEMO, "p4g", "test")[0])
    prior = planner.prior([conversation])
    assert prior.shape == (1, 19)
    assert torch.allclose(prior.sum(-1), torch.ones(1))
    messages = planner.prompt(conversation)
    assert "Save the Children" in messages[0]["content"]  # the task's goal
    assert "19. Neutral inquiry" in messages[1]["content"]


def test_planner_sampling_fallback_counts_invalid_answers():
    task = get_task("esc")
    answers = iter(["3", "Strategy 3.", "I think none", "12", "3"] * 2)
    planner = Planner(task, ScriptedLLM(lambda p: next(answers)), mode="sample", num_samples=5)
    conversation = new_conversation(task, load_split(DEMO, "esc", "test")[0])
    prior = planner.prior([conversation])[0]
    assert conversation.planner_invalid == 2  # "I think none" and "12" (only 8 actions)
    assert int(prior.argmax()) == 2
    assert prior.sum().item() == pytest.approx(1.0) and (prior > 0).all()


@pytest.mark.parametrize("evaluation", [False, True])
def test_unusable_planner_answers_are_recorded_on_their_turns_and_counted_once(evaluation):
    """The prior a turn acted on is counted on its record; in training, the prior of the
    state after a turn-limit ending's last turn (its bootstrap), on that record as
    next_planner_invalid; in evaluation that state is not asked (nothing reads it)."""
    task = get_task("esc")
    planner_llm = ScriptedLLM(lambda prompt: "none of them")
    planner = Planner(task, planner_llm, mode="sample", num_samples=2)
    critic = Critic(task, ScriptedLLM(lambda p: "2"), num_samples=2)
    env = SelfPlayEnv(task, ScriptedLLM(lambda p: "Emotion: sad\nResponse: I see."),
                      ScriptedLLM(lambda p: "Okay."), critic, planner=planner, max_turn=2)
    conversation = env.reset([(load_split(DEMO, "esc", "test")[0], 0, 1)])[0].conversation
    env.step([conversation], ["Question"], evaluation=evaluation)
    results = env.step([conversation], ["Question"], evaluation=evaluation)
    assert conversation.outcome == "time limit"
    assert [r.get("planner_invalid") for r in conversation.records] == [2, 2]
    last = None if evaluation else 2
    assert [r.get("next_planner_invalid") for r in conversation.records] == [None, last]
    assert (results[0].observation is None) == evaluation
    asked = sum(batch * samples for _, batch, samples in planner_llm.calls)
    assert asked == 4 + 2 * (not evaluation)
    assert unusable_counts([conversation]) == {"planner": asked}


def test_batched_step_equals_one_conversation_at_a_time(tiny_llm):
    """Greedy decoding: a batch of conversations advances exactly as each would alone."""
    task = get_task("esc")
    critic = Critic(task, tiny_llm, num_samples=3, temperature=0.0, max_new_tokens=6)
    env = SelfPlayEnv(task, tiny_llm, tiny_llm, critic, system_temperature=0.0,
                      user_temperature=0.0, system_max_new_tokens=8, user_max_new_tokens=8)
    cases = load_split(DEMO, "esc", "train")[:3]
    actions = ["Question", "Others", "Information"]
    batched = [env.start(c) for c in cases]
    env.step(batched, actions)
    for case, action, together in zip(cases, actions, batched):
        alone = env.start(case)
        env.step([alone], [action])
        assert alone.turns == together.turns
        assert alone.records[0]["critic_answers"] == together.records[0]["critic_answers"]


def test_shared_prefix_critic_gives_the_same_greedy_verdicts(tiny_llm):
    task = get_task("esc")
    case = load_split(DEMO, "esc", "test")[0]
    results = []
    for shared in (True, False):
        critic = Critic(task, tiny_llm, num_samples=4, temperature=0.0, max_new_tokens=6,
                        shared_prefix=shared)
        results.append(critic.score([Conversation(case, [("Patient", "hi")], emotions=["sad"]),
                                     Conversation(case, [("Patient", "hello there")])]))
    assert [r.answers for r in results[0]] == [r.answers for r in results[1]]


def test_evaluation_decodes_system_and_user_greedily_and_training_samples():
    temperatures = []

    class Recording(ScriptedLLM):
        def chat(self, conversations, temperature=0.0, **kwargs):
            temperatures.append(temperature)
            return super().chat(conversations, temperature=temperature, **kwargs)

    task = get_task("esc")
    critic = Critic(task, Recording(lambda p: "2"), num_samples=2, temperature=1.1)
    env = SelfPlayEnv(task, Recording(lambda p: "Emotion: sad\nResponse: Hi."),
                      Recording(lambda p: "Ok."), critic, system_temperature=0.7,
                      user_temperature=0.6, eval_temperature=0.0)
    case = load_split(DEMO, "esc", "test")[0]
    env.step([env.start(case)], ["Question"])
    env.step([env.start(case)], ["Question"], evaluation=True)
    assert temperatures == [0.7, 0.6, 1.1, 0.0, 0.0, 1.1]


@pytest.mark.parametrize("answer", ["1", "No, the Patient's issue has not been solved.", "?"])
def test_no_failure_ending_only_success_or_the_turn_limit(answer):
    task, _, _, env = _env("esc", answer, max_turn=3)
    conversation = env.start(load_split(DEMO, "esc", "test")[0])
    for turn in range(3):
        result = env.step([conversation], ["Question"])[0]
        assert not result.terminated
    assert result.done and not result.terminated and conversation.outcome == "time limit"


@pytest.mark.parametrize("task_name", ["esc", "extes", "cima", "cb", "p4g"])
def test_openings_follow_the_original(task_name):
    task = get_task(task_name)
    case = load_split(DEMO, task_name, "test")[0]
    conversation = new_conversation(task, case)
    expected = {
        "esc": [("Patient", case.get("situation"))],
        "extes": [("Patient", case.get("description"))],
        "cima": [("Teacher", case["dialog"][0]["text"]), ("Student", case["dialog"][1]["text"])]
        if task_name == "cima" else None,
        "p4g": [("Persuader", case["dialog"][0]["text"]), ("Persuadee", case["dialog"][1]["text"])]
        if task_name == "p4g" else None,
        "cb": [("Buyer", f"Hi, how much is the {case.get('item_name')}?"),
               ("Seller", f"Hi, this is a good {case.get('item_name')} and its price is "
                          f"{case.get('seller_price')}.")],
    }[task_name]
    assert conversation.turns == expected
    assert conversation.emotions == ([case["emotion_type"]] if task_name == "esc" else [])


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=500))
def test_emotion_response_split_never_raises(text):
    emotion, response, ok = parse_emotion_response(text, ("Therapist", "Patient"))
    assert isinstance(emotion, str) and isinstance(response, str) and isinstance(ok, bool)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=60), min_size=1, max_size=5))
def test_sampled_prior_answers_never_raise_and_give_a_distribution(answers):
    planner = Planner(get_task("esc"), None, mode="sample")
    prior, _ = planner._prior_from_samples(answers)
    assert prior.shape == (8,) and torch.isfinite(prior).all()
    assert prior.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("unit", ["Emotion: ", "response -", "\n", "Patient:", "**"])
def test_emotion_response_split_time_is_linear(unit):
    import time

    def seconds(n):  # the best of three, so that a busy CPU does not decide it
        text = (unit * n)[:n]
        times = []
        for _ in range(3):
            start = time.perf_counter()
            parse_emotion_response(text, ("Therapist", "Patient"))
            clean_turn(text, ("Therapist", "Patient"))
            times.append(time.perf_counter() - start)
        return min(times)
    # linear: 10x the text in about 10x the time; a quadratic split takes 100x
    assert seconds(100_000) < 30 * seconds(10_000) + 0.05


# -- the original release's candidates (--prior list) --------------------------------------

@pytest.mark.parametrize("answer,actions", [
    ("3, 1, 4, 2", [2, 0, 3, 1]),  # every number, in the answer's order
    ("1,2,4,5", [0, 1, 3, 4]),
    ("5, 5, 2, 5", [4, 1]),  # a repeat is kept once
    ("0, 2", [1]),  # 0 is no option (the original read it as the last action)
    ("9, 12, 3", [2]),  # beyond the 8 options (the original crashed)
    ("Options (1) and (6).", [0, 5]),
    ("I would rather not say.", []),  # no numbers: no candidates from this answer
    ("", []),
])
def test_the_release_candidates_are_the_answers_numbers_in_order(answer, actions):
    assert Planner.read_list(answer, list(range(8))) == actions


def test_listed_numbers_are_read_in_the_order_shown():
    order = [3, 4, 5, 6, 7, 0, 1, 2]  # a rotation: position 1 shows action 3
    assert Planner.read_list("1, 8", order) == [3, 2]


def test_an_answer_without_numbers_is_asked_again_then_every_action_is_a_candidate():
    task = get_task("esc")
    replies = {"first": iter(["no idea", "none", "4, 2"]), "second": iter(["?"] * 5)}

    def reply(prompt):
        return next(replies["first" if "case 0" in prompt else "second"])

    planner = Planner(task, ScriptedLLM(reply), mode="list", num_samples=5)
    conversations = [new_conversation(task, {**load_split(DEMO, "esc", "test")[0],
                                             "situation": f"case {i}"}) for i in range(2)]
    prior, indices, priors = planner.candidates(conversations, 4)
    assert indices == [[3, 1], list(range(8))]
    assert priors == [[0.5, 0.5], [1 / 8] * 8] and torch.allclose(prior.sum(-1), torch.ones(2))
    # each answer that named no action
    assert [c.planner_invalid for c in conversations] == [2, 5]
    assert [a["answer"] for a in conversations[0].planner_answers] == ["no idea", "none", "4, 2"]
    assert conversations[0].planner_answers[-1]["actions"] == [task.action_names[3],
                                                              task.action_names[1]]
    assert "Which 4 options" in planner.prompt(conversations[0], count=4)[-1]["content"]


def test_a_list_planners_candidates_reach_the_observation_and_the_record():
    task = get_task("esc")
    planner = Planner(task, ScriptedLLM(lambda prompt: "2, 2, 7"), mode="list")
    critic = Critic(task, ScriptedLLM(lambda p: "2"), num_samples=2)
    env = SelfPlayEnv(task, ScriptedLLM(lambda p: "Emotion: sad\nResponse: I see."),
                      ScriptedLLM(lambda p: "Okay."), critic, planner=planner, max_turn=3)
    observation = env.reset([(load_split(DEMO, "esc", "test")[0], 0, 1)])[0]
    names = task.action_names
    assert observation.candidates == [names[1], names[6]] and observation.priors == [0.5, 0.5]
    assert most_candidates(task, planner.mode, 4) == 8  # the replay buffer's width
    env.step([observation.conversation], [names[1]])
    record = observation.conversation.records[0]
    assert record["planner_answers"] == [{"answer": "2, 2, 7", "actions": [names[1], names[6]]}]


# -- free-text plans projected onto the actions (--prior project) --------------------------

class WordEncoder:
    """bag_of_words with one vocabulary across calls, so the plans and the actions share it."""

    def __init__(self):
        self.vocabulary = {}

    def __call__(self, texts):
        embeddings = torch.zeros(len(texts), 512)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                if len(word) > 4:
                    embeddings[i, self.vocabulary.setdefault(word, len(self.vocabulary))] += 1.0
        return embeddings


@pytest.mark.parametrize("plan,action", [
    ("Ask a Question about what happened.", "Question"),  # RL-LLM-Prior's text match
    ("question, then maybe information", "Question"),  # a tie: the name met first
    ("Information. More information!", "Information"),  # the name named most often
    # paraphrases: no name, the encoder's nearest action
    ("Suggest what they could do about it.", "Providing Suggestions"),
    ("Affirm them and reassure them.", "Affirmation and Reassurance"),
    ("Restate their situation in your own words.", "Restatement or Paraphrasing"),
    ("Some factual help for their situation.", "Information"),
    ("Zzz.", None),  # nothing in common with any action: unusable
    ("", None),
])
def test_a_plan_is_projected_onto_an_action_by_name_or_as_a_paraphrase(plan, action):
    task = get_task("esc")
    planner = Planner(task, None, mode="project", embed=WordEncoder(), match_threshold=0.3)
    projected = planner.project([plan])[0]
    assert (None if projected is None else task.action_names[projected]) == action


def test_cb_counter_noprice_is_not_read_as_counter():
    planner = Planner(get_task("cb"), None, mode="project")
    names = get_task("cb").action_names
    assert [names[a] for a in planner.project(["counter-noprice", "counter at 150"])] == [
        "counter-noprice", "counter"]


def test_the_projected_prior_is_the_plans_frequencies_and_unusable_plans_are_counted():
    task = get_task("esc")
    plans = iter(["Ask a question.", "Suggest what they could do.", "Ask another question.",
                  "Zzz.", "Hmm."])
    planner = Planner(task, ScriptedLLM(lambda prompt: next(plans)), mode="project",
                      num_samples=5, embed=WordEncoder(), match_threshold=0.3)
    conversation = new_conversation(task, load_split(DEMO, "esc", "test")[0])
    prompt = planner.prompt(conversation)[-1]["content"]
    assert "- Question" in prompt and "1. Question" not in prompt  # no numbers to answer with
    prior, indices, _ = planner.candidates([conversation], 4)
    names = task.action_names
    assert prior[0, names.index("Question")] == pytest.approx(2 / 3)
    assert prior[0, names.index("Providing Suggestions")] == pytest.approx(1 / 3)
    assert [names[a] for a in indices[0][:2]] == ["Question", "Providing Suggestions"]
    assert conversation.planner_invalid == 2  # "Zzz." and "Hmm." matched no action
    assert [a["actions"] for a in conversation.planner_answers] == [
        ["Question"], ["Providing Suggestions"], ["Question"], [], []]
