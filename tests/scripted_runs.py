"""Real runs of train_model.py on esc with scripted LLM clients (conftest.ScriptedLLM) and a
tiny random encoder: a trained run and a random-policy baseline on the same test cases and
seed (a paired evaluation). view.py is tested on these, and benchmarked at scale:

    python tests/scripted_runs.py /tmp/scripted --cases 10000    # then bench.py --view RUN

The scripted world: the prior ranks "Question" fourth; a turn that plays it solves the
problem (the critic answers 4), other turns get a mix of usable and unusable critic
answers; the system breaks the "Emotion: ... Response: ..." format on every fourth case,
and on case ids ending in 1 the user and one critic answer carry HTML and a script.
"""

import argparse
import json
import os
import re
import sys
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import train_model  # noqa: E402 (after the paths)
from conftest import ScriptedLLM, build_tiny_encoder  # noqa: E402
from tasks import get_task  # noqa: E402

TASK = get_task("esc")
PRIOR_ORDER = ["Others", "Self-disclosure", "Affirmation and Reassurance", "Question",
               "Information", "Providing Suggestions", "Reflection of feelings",
               "Restatement or Paraphrasing"]
# markup an LLM might write: the page must show it as text and run none of it
INJECTED = ('</script><script>window.injected = 1</script><img src=x '
            'onerror="window.injected = 2"></textarea><b>bold</b>')
CRITIC_CYCLE = ["2", "Option 9", "3", "I cannot tell."]


def case_number(prompt):
    return int(re.search(r"case (\d+)", prompt).group(1))


def played_action(prompt):
    """The action whose instruction the system LLM was given (None: no strategy)."""
    instruction = prompt[prompt.rindex("("):]
    return next((a for a in TASK.action_names if TASK.actions[a] in instruction), None)


def scripted_llms():
    last = {}  # case -> the action of its latest system turn
    asked = {}  # case -> critic answers given so far

    def system(prompt):
        case = case_number(prompt)
        last[case] = played_action(prompt)
        if case % 4 == 3:
            return f"I would try this: {last[case]}."  # no "Emotion: ... Response: ..."
        return f"Emotion: worried\nResponse: Let us talk it through ({last[case]})."

    def user(prompt):
        case = case_number(prompt)
        return INJECTED if case % 10 == 1 else "I see. That helps a little."

    def critic(prompt):
        case = case_number(prompt)
        asked[case] = asked.get(case, 0) + 1
        if last[case] == "Question":
            return "4"
        if case % 10 == 1 and asked[case] % 4 == 1:
            return INJECTED
        return CRITIC_CYCLE[asked[case] % len(CRITIC_CYCLE)]

    prior = ScriptedLLM(None, prior=lambda prompt, labels: [
        10.0 - PRIOR_ORDER.index(n) for n in TASK.action_names])
    return {"planner": prior, "system": ScriptedLLM(system), "user": ScriptedLLM(user),
            "critic": ScriptedLLM(critic)}


def esc_case(i):
    return {"emotion_type": "sadness", "problem_type": "job", "dialog": [],
            "situation": f"I feel low about my job, case {i}."}


@contextmanager
def scripted_models():
    """train_model.load_llms gives the scripted clients while inside."""
    saved = train_model.load_llms
    train_model.load_llms = lambda args: scripted_llms()
    try:
        yield
    finally:
        train_model.load_llms = saved


def make_runs(root, test_cases=12, train_episodes=8, max_turn=3, baseline="random"):
    """Data, encoder, a trained run and (baseline not None) a baseline test run under root;
    returns their run folders."""
    data, encoder = os.path.join(root, "data"), os.path.join(root, "encoder")
    os.makedirs(data, exist_ok=True)
    for split, first, count in (("train", 0, 8), ("valid", 1000, 4), ("test", 0, test_cases)):
        with open(os.path.join(data, f"esc-{split}.txt"), "w") as f:
            f.writelines(json.dumps(esc_case(first + i)) + "\n" for i in range(count))
    if not os.path.isdir(encoder):
        build_tiny_encoder(encoder)
    common = ["--data_name", "esc", "--data_dir", data, "--encoder", encoder,
              "--max_turn", str(max_turn), "--critic_samples", "4", "--num_envs", "64",
              "--progress", "false", "--device", "cpu", "--seed", "1",
              "--output_dir", os.path.join(root, "runs"), "--max_encoder_tokens", "64"]
    with scripted_models():
        _, trained = train_model.main(common + [
            "--total_episodes", str(train_episodes), "--eval_every", str(train_episodes // 2),
            "--batch_size", "4", "--learning_starts", "4", "--exp_name", "trained"])
        runs = [trained]
        if baseline:
            runs.append(train_model.main(common + ["--mode", "test", "--policy", baseline,
                                                   "--exp_name", "baseline"])[1])
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder for the data, the encoder and the runs")
    parser.add_argument("--cases", type=int, default=12, help="test cases")
    parser.add_argument("--baseline", default="random",
                        help="the baseline policy's test run ('' for none)")
    args = parser.parse_args()
    for folder in make_runs(args.root, args.cases, baseline=args.baseline or None):
        print(f"run: {folder}")


if __name__ == "__main__":
    main()
