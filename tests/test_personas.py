"""User personas (--user_personas, personas.py): drawn per conversation from its own
stream (paired across policies), given to the user simulator only, recorded, and
tabled per persona; bad persona files end in one error line before anything loads."""

import json
import os
import random
import re
from contextlib import contextmanager

import pytest

import report
import train_model
from conftest import (ScriptedLLM, build_tiny_encoder, esc_case, models_from, option_number,
                      write_json_lines)
from errors import UserError
from get_args import Args
from personas import BUILTIN, draw_persona, load_personas
from tasks import get_task

ESC = get_task("esc")
PERSONAS = [{"name": "asker", "text": "You open up when you are asked questions. (likes-Q)"},
            {"name": "doer", "text": "You only want practical advice. (likes-S)"}]
LIKES = {"likes-Q": "Question", "likes-S": "Providing Suggestions"}
SOLVED = ESC.prompts["verdicts"][3]
SAME = ESC.prompts["verdicts"][1]


@contextmanager
def persona_world(prompts):
    """Scripted LLMs where a persona wins or loses by the strategy played: the user says
    'thank you' when the system played the strategy its persona likes, and the critic
    calls that solved. The planner ranks Question first, so `prior` always plays it.
    prompts[role] collects every prompt of that role."""
    last = {}

    def case(prompt):
        return re.search(r"case (\d+)", prompt).group(1)

    def system(prompt):
        prompts["system"].append(prompt)
        instruction = prompt[prompt.rindex("("):]
        last[case(prompt)] = next(a for a in ESC.action_names if ESC.actions[a] in instruction)
        return "Emotion: calm\nResponse: I see."

    def user(prompt):
        prompts["user"].append(prompt)
        liked = [LIKES[tag] for tag in LIKES if tag in prompt]
        return "Thank you, that helps." if liked and liked[0] == last[case(prompt)] else "Hm."

    def critic(prompt):
        prompts["critic"].append(prompt)
        return option_number(prompt, SOLVED if "Thank you" in prompt else SAME)

    def prior(prompt, labels):
        prompts["planner"].append(prompt)
        return [5.0 if label == option_number(prompt, "Question") else 1.0 for label in labels]

    llms = {"planner": ScriptedLLM(None, prior=prior), "system": ScriptedLLM(system),
            "user": ScriptedLLM(user), "critic": ScriptedLLM(critic)}
    with models_from(lambda args: llms):
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("personas")
    data, encoder = root / "data", root / "encoder"
    data.mkdir()
    for split, count in (("train", 6), ("valid", 2), ("test", 16)):
        write_json_lines(data / f"esc-{split}.txt", [esc_case(i) for i in range(count)])
    build_tiny_encoder(str(encoder))
    personas = root / "personas.json"
    personas.write_text(json.dumps(PERSONAS))
    return root, personas


def common(root, *flags):
    return ["--data_name", "esc", "--data_dir", str(root / "data"), "--encoder",
            str(root / "encoder"), "--max_turn", "2", "--critic_samples", "2", "--num_envs", "8",
            "--progress", "false", "--device", "cpu", "--seed", "3", "--max_encoder_tokens", "64",
            "--output_dir", str(root / "runs"), *flags]


def read_conversations(folder, split="test"):
    with open(os.path.join(folder, f"{split}_conversations.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_a_one_strategy_planner_wins_with_one_persona_and_loses_with_the_other(folders):
    root, personas = folders
    prompts = {"planner": [], "system": [], "user": [], "critic": []}
    with persona_world(prompts):
        metrics, folder = train_model.main(common(root, "--mode", "test", "--policy", "prior",
                                                  "--user_personas", str(personas)))
    conversations = read_conversations(folder)
    names = [c["persona"]["name"] for c in conversations]
    assert set(names) == {"asker", "doer"}  # 16 cases: both drawn
    # by hand: the prior plays Question, which only the asker thanks for on turn 1
    for c in conversations:
        assert c["records"][0]["action"] == "Question"
        assert c["outcome"] == ("success" if c["persona"]["name"] == "asker" else "time limit")
    askers = names.count("asker")
    assert metrics["personas"] == {
        "asker": {"episodes": askers, "SR": 1.0, "AT": 1.0},
        "doer": {"episodes": 16 - askers, "SR": 0.0, "AT": 2.0}}
    assert metrics["SR"] == askers / 16
    # the persona is in every user prompt (in the task's terms), and only there
    assert all("The Patient you play has this personality: You" in p and
               ("likes-Q" in p) != ("likes-S" in p) for p in prompts["user"])
    assert not any("likes-" in p for role in ("planner", "system", "critic")
                   for p in prompts[role])
    # report.py tables SR and AT per persona, and the strategy bias (one action: entropy 0)
    text = open(report.main([folder, "--out", str(root / "report"), "--n_boot", "200"])).read()
    assert (f"| esc | prior | asker | {askers} | 1.000 [1.000, 1.000] | 1.00 [1.00, 1.00] |"
            in text)
    assert (f"| esc | prior | doer | {16 - askers} | 0.000 [0.000, 0.000] | 2.00 [2.00, 2.00] |"
            in text)
    assert "| esc | prior | Question | 0.000 | 1.000 | - | - |" in text  # no labels in the cases
    assert os.path.isfile(root / "report" / "strategies.png") and "strategies.png" in text


@pytest.mark.slow
def test_personas_are_paired_across_policies_and_split_between_training_and_test(folders):
    root, personas = folders
    prompts = {"planner": [], "system": [], "user": [], "critic": []}
    with persona_world(prompts):
        _, prior = train_model.main(common(root, "--mode", "test", "--policy", "prior",
                                           "--user_personas", str(personas)))
        _, uniform = train_model.main(common(root, "--mode", "test", "--policy", "uniform",
                                             "--num_envs", "3", "--user_personas", str(personas)))
        _, trained = train_model.main(common(
            root, "--total_episodes", "4", "--eval_every", "4", "--batch_size", "2",
            "--learning_starts", "2", "--user_personas", "builtin",
            "--test_user_personas", str(personas)))

    def drawn(folder, split="test"):
        return {c["case_id"]: c["persona"]["name"] for c in read_conversations(folder, split)}
    assert drawn(prior) == drawn(uniform) == drawn(trained)
    builtin = {p["name"] for p in BUILTIN}
    assert {c["persona"]["name"] for c in read_conversations(trained, "train")} <= builtin
    # the draw is the stream's, not the global random state's
    population = load_personas("builtin")
    random.seed(1)
    first = [draw_persona(population, stream) for stream in range(50)]
    random.seed(2)
    assert [draw_persona(population, stream) for stream in range(50)] == first
    assert len({p["name"] for p in first}) > 10  # spread over the 20 personas
    assert draw_persona(None, 7) is None and load_personas("none") is None


@pytest.mark.parametrize("content, expected", [
    (None, "cannot be read"),
    ("[]", "holds no personas"),
    ("{not json", "is not JSON"),
    (b'[{"name": "a\xff", "text": "x"}]', "is not UTF-8 text"),
    ('[{"name": "a"}]', "persona 1 has no name or no text"),
    ('[{"name": "a", "text": "x"}, {"name": "", "text": "y"}]', "persona 2 has no name"),
    ('[{"name": "a", "text": "x"}, {"name": "a", "text": "y"}]', "given to two personas"),
])
def test_a_bad_persona_file_is_one_error_line_before_the_run_folder(tmp_path, capsys, content,
                                                                    expected):
    path = tmp_path / "personas.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=expected):
        load_personas(str(path))
    args = Args(data_dir="data/demo", output_dir=str(tmp_path / "runs"),
                test_user_personas=str(path), progress=False)
    with pytest.raises(SystemExit):
        train_model.cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --test_user_personas") and expected in err[0]
    assert not os.path.exists(tmp_path / "runs")  # nothing created, no model loaded


def test_a_persona_is_hidden_from_lookahead_copies_and_kept_by_re_judging():
    from conftest import World, esc_case
    from critic_check import rejudged_conversation
    from critic import CriticResult
    from run_files import ConversationRecord, TurnRecord

    world = World("esc", ESC.action_names, lambda history: "ok", lambda history: ["2"])
    env = world.env(max_turn=2)
    real = env.start(esc_case(1), 0, 7, persona=PERSONAS[0])
    copy = env.branch(real)
    assert copy.persona is None and real.persona == PERSONAS[0]
    assert "likes-Q" in str(env.user_prompt(real)) and "likes-Q" not in str(env.user_prompt(copy))
    saved = ConversationRecord(case=esc_case(1), turns=[["Therapist", "Hi."], ["Patient", "Hm."]],
                               case_id=0, persona=PERSONAS[1])
    result = CriticResult(reward=1.0, success=True, answers=["4"], option_probs=[0, 0, 0, 1],
                          orders=[[0, 1, 2, 3]], order_probs=[[0, 0, 0, 1]])
    assert rejudged_conversation(saved, [(TurnRecord(turn=1, reward=0.0), result)],
                                 2).persona == PERSONAS[1]
