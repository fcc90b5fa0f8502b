"""Train a dialogue policy by LLM self-play, or test one: DialogXpert by default.

    python train_model.py --data_name esc                       # train, then test the best
    python train_model.py --data_name esc --mode test --checkpoint runs/<run>/best.pt
    python train_model.py --data_name esc --policy ppdpp        # a planner of prior work

Each turn: the planner LLM gives a prior over the task's actions, the top-k become
candidates, the policy picks one (DialogXpert: the Q-adapter scores each (action,
conversation) pair, epsilon-greedy in training, argmax in testing; the others are in
policies.py), the system and user LLMs play the turn, and the critic LLM's verdicts give
the reward. This script reads top-down: arguments, data, models, environment, policy, then
training (trainer.py) and the test (harness.evaluate).
"""

import os
import signal
import sys

from get_args import EVALUATION_CONFIG, MODEL_FLAGS, ROLES, Args, given_flags, parse_args

if __name__ == "__main__":
    # --help and argument errors answer here, before torch and the models' libraries load
    CLI_ARGS = parse_args()
    # Ctrl-C while the libraries load: one line, no traceback
    signal.signal(signal.SIGINT, lambda *_: (print("stopped by SIGINT while starting: nothing "
                                                   "to resume", file=sys.stderr), os._exit(130)))

import itertools  # noqa: E402 (the arguments come first)
import json
import time
from contextlib import contextmanager

from torch.utils.tensorboard import SummaryWriter

import harness
import run_state
from errors import ServerError, UserError
from harness import (build_env, evaluate, judge_of, llm_usage, policy_cost, resolve_models,
                     scorable_args, seed_everything)
from llm import check_device
from policies import TEST_FLAGS, make_policy, policy_class, read_checkpoint, recorded_args
from q_adapter import FrozenEncoder, resolve_encoder_path
from run_files import LAST, write_results
from tasks import get_task, load_split
from trainer import train, undertrained_warning, update_figures


def main(argv=None):
    return run_seeds(parse_args(argv), given_flags(argv))


def run_seeds(args, given=None):
    """One run, or with --seeds one run per seed and a report over them; returns the
    (last) run's (test metrics, run folder). given: the flags given on the command line
    (None: those that differ from their defaults)."""
    if not args.seeds:
        return run(args, given)
    results = [run(Args(**vars(args) | {"seed": int(seed), "seeds": ""}), given)
               for seed in args.seeds.split(",")]
    import report  # matplotlib loads only when a report is made

    report.main([folder for _, folder in results] +
                ["--out", os.path.join(args.output_dir, f"report_{args.data_name}_"
                                       f"{args.policy}_{int(time.time())}")])
    return results[-1]


def run(args, given=None):
    """Train then test, or test a checkpoint; returns (test metrics, run folder). given:
    the flags given on the command line (None: those that differ from their defaults)."""
    given = given_flags(args=args) if given is None else given
    resume = None
    if args.resume:  # the saved run's own arguments; how it reports and its total may change
        resume = run_state.load_state(args.resume)
        args = run_state.resumed_args(resume, args, given)
    task = get_task(args.data_name)
    if args.mode == "test" and args.checkpoint:  # a replay: the checkpoint's run's settings
        args = replay_settings(args, given, task)
    seed_everything(args.seed)
    # every model name resolved ('auto' included) before the checks that compare them
    models = resolve_models(args)
    # data, checkpoint, weights and output folder are checked before any model is loaded
    splits = load_cases(args, task)
    if args.mode == "test" and args.checkpoint:
        policy_class(args.policy).check_checkpoint(args.checkpoint, args, models)
    policy_class(args.policy).check_run(args, task, splits)
    for split in splits:  # the user personas' files (personas.py) read before any model loads
        harness.split_personas(args, split)
    # every weight folder the run loads, all missing ones in one error, before the run
    # folder exists
    harness.check_weights(args)
    check_device(args.device)
    name = args.exp_name if args.policy == "dialogxpert" else f"{args.exp_name}-{args.policy}"
    run_dir = args.resume or make_run_dir(
        args.output_dir, f"{task.name}__{name}__{args.seed}__{int(time.time())}")
    print(f"Run folder: {run_dir}" + (" (resumed)" if resume else ""))

    with removed_if_empty(None if resume else run_dir):
        llms = harness.load_llms(args)
        args = scorable_args(args, task, llms)  # before the planner and the critic are built
        models = resolve_models(args, llms)  # served names are known now
        encoder = None  # the frozen encoder: DialogXpert's features, --prior project's matches
        if policy_class(args.policy).uses_encoder or args.prior == "project":
            encoder = FrozenEncoder.from_pretrained(resolve_encoder_path(args.encoder),
                                                    args.max_encoder_tokens, args.device)
        env = build_env(args, task, llms, embed=encoder.embed_texts if encoder else None)
        policy = make_policy(args, task, encoder, models)
        policy.attach(env)
    checkpoint, metrics, conversations = train_and_test(args, policy, env, splits, run_dir,
                                                        resume)
    metrics = {"task": task.name, "policy": args.policy, "seed": args.seed,
               "max_turn": args.max_turn,
               "config": evaluation_config(args, task)
               | {"models": models}} | metrics
    metrics["policy_settings"] = {name: getattr(args, name)
                                  for name in TEST_FLAGS.get(args.policy, ())}
    metrics["judge"] = judge_of(env)
    metrics["checkpoint"] = checkpoint
    metrics |= update_figures(policy)  # the tested policy's updates, and whether too few
    metrics["llm_usage"] = llm_usage(env)
    # the whole training's seconds are last.pt's (best.pt's: those up to its save)
    metrics["policy_cost"] = policy_cost(policy, checkpoint=os.path.join(run_dir, LAST)
                                         if args.mode == "train" else checkpoint)
    write_results(run_dir, "test", metrics, conversations)
    print(json.dumps(metrics, indent=2))
    import plots  # matplotlib loads only now

    for path in plots.plot_run(run_dir):
        print(f"figure: {path}")
    if metrics.get("undertrained"):
        print(undertrained_warning(args, metrics["updates"]))
    return metrics, run_dir


def load_cases(args, task):
    """{split: cases} of the splits this run plays (--max_cases, --eval_cases applied)."""
    def split(name):
        cases = load_split(args.data_dir, task.name, name, extes_seed=args.extes_seed,
                           extes_split=args.extes_split)
        if not cases and task.split_seeded:
            raise UserError(f"--extes_split {args.extes_split} leaves the {name} split of "
                            f"'{task.name}' in {args.data_dir} no cases. Give it a larger share")
        if not cases:
            raise UserError(f"the {name} split of '{task.name}' in {args.data_dir} has no "
                            "cases. Download the data again with download_data.py")
        return cases[:args.max_cases] if args.max_cases else cases

    splits = {"test": split("test")}
    if args.mode == "train":
        splits["train"], splits["valid"] = split("train"), split("valid")
        if args.eval_cases:
            splits["valid"] = splits["valid"][:args.eval_cases]
    return splits


def train_and_test(args, policy, env, splits, run_dir, resume):
    """Train (--mode train), then test the best checkpoint, the given one, or a baseline
    policy; returns (checkpoint, test metrics, test conversations). A stop keeps what
    was learned: the training state on Ctrl-C, last.pt when a served model is gone."""
    try:
        if args.mode == "train":
            with SummaryWriter(run_dir) as writer:
                writer.add_text("args", json.dumps(vars(args), indent=2))
                checkpoint = train(args, policy, env, splits["train"], splits["valid"],
                                   run_dir, writer, resume)
        else:
            checkpoint = args.checkpoint or None  # a baseline policy has none
        if checkpoint:
            policy.load(checkpoint)
        return (checkpoint, *evaluate(args, policy, env, splits["test"], "test"))
    except KeyboardInterrupt:  # Ctrl-C while testing after training: the state is whole
        if args.mode == "train" and os.path.exists(os.path.join(run_dir, run_state.STATE_FILE)):
            raise run_state.TrainingStopped(run_dir, "SIGINT") from None
        raise
    except ServerError as error:  # a served model is gone: keep what was learned
        if policy.trainable:
            policy.save(os.path.join(run_dir, LAST), None,
                        {"stopped_by": str(error), "llm_usage": llm_usage(env)})
        if args.mode == "train" and os.path.exists(os.path.join(run_dir, run_state.STATE_FILE)):
            raise ServerError(f"{error} The training state of the last save is in {run_dir}: "
                              f"resume with `python train_model.py --resume {run_dir}`",
                              error.status) from None
        raise


def make_run_dir(output_dir, run_name):
    """A new folder: a run started in the same second as another gets a suffix."""
    for attempt in itertools.count():
        path = os.path.join(output_dir, run_name + (f"_{attempt}" if attempt else ""))
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
        except OSError as error:
            raise UserError(f"cannot create the run folder {path} ({error.strerror}). Pass a "
                            "writable --output_dir") from None


@contextmanager
def removed_if_empty(run_dir):
    """A new run folder (None: none) that the block leaves empty when it fails (a model
    that does not load, a server that does not answer) is removed: no empty run is left."""
    try:
        yield
    except BaseException:
        if run_dir and not os.listdir(run_dir):
            os.rmdir(run_dir)
        raise


def evaluation_flags(task):
    """The flags of the evaluation setup of a run of `task`."""
    return EVALUATION_CONFIG + task.data_flags


def evaluation_config(args, task):
    """test_metrics.json's "config" of a run, but for its models."""
    return {name: getattr(args, name) for name in evaluation_flags(task)}


def replay_settings(args, given, task):
    """--mode test --checkpoint: args with the seed, models, evaluation setup and the
    policy's own test flags (policies.TEST_FLAGS) of the checkpoint's run, except the
    flags given (`given`); prints those it took and those that override the checkpoint."""
    names = (("seed",) + MODEL_FLAGS + evaluation_flags(task)
             + TEST_FLAGS.get(args.policy, ()))
    # a flag given need not be recorded (a checkpoint older than it); where it is, the
    # value given overrides the recorded one
    recorded = read_checkpoint(args.checkpoint)[0]["args"]
    saved = recorded_args(args.checkpoint, recorded, [name for name in names if name not in given])
    saved |= {name: recorded[name] for name in names if name in given and name in recorded}
    changed = {name: value for name, value in saved.items() if value != getattr(args, name)}
    taken = {name: value for name, value in changed.items() if name not in given}
    if taken:
        print("From the checkpoint: " + " ".join(f"--{name} {flag_text(value)}"
                                                 for name, value in taken.items()))
    overrides = [f"--{name} {flag_text(getattr(args, name))} overrides the checkpoint's "
                 f"{flag_text(value)}" for name, value in changed.items() if name in given]
    if overrides:
        print("; ".join(overrides))
    try:
        return Args(**vars(args) | taken)
    except ValueError as error:
        raise UserError(f"the settings of the checkpoint {args.checkpoint} with the flags "
                        f"given do not agree: {error}") from None


def flag_text(value):
    """A value as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else "''"


def cli(args, given=None):
    """python train_model.py: a user error is one line on stderr and exit code 2."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run_seeds(args, given)
    except run_state.TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # before training started or after it ended: no state to keep
        print("stopped by SIGINT outside training: nothing to resume", file=sys.stderr)
        sys.exit(130)
    except (UserError, ServerError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli(CLI_ARGS, given_flags())
