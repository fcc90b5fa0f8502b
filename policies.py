"""Who picks each turn's dialogue action: the policy interface, the baselines and the
registry of `--policy`.

A policy sees the environment's observations (a conversation with its top-k candidates and
their priors) and answers one action per conversation, with a note that the turn's record
keeps. The harness (harness.play_turn, harness.evaluate, train_model.Trainer) calls, per
batch of conversations:

    policy.start(observations)                          # new conversations
    actions, notes = policy.act(observations, rng, training, epsilon)
    results = env.step(...)                             # the harness plays the turn
    policy.observe(observations, results, training)     # the turn's outcome
    policy.end(conversation)                            # a conversation has ended
    policy.learn(LearnStep(...))                        # training: after every step

and, once before a new training run's first episode, before_training (a stage of its
own, such as PPDPP's supervised one),
and saves, restores and checkpoints it through state_dict/load_state_dict and save/load.
Policies that learn set `trainable`; those that plan with the LLMs (MCTS) are given the
environment by `attach`.

    dialogxpert  q_adapter.QAdapterPolicy: frozen encoder + Q-head over the top-k (the method)
    ppdpp        ppdpp.PPDPPPolicy: a fine-tuned classifier over all actions (Deng et al., 2024)
    gdpzero      mcts.GDPZeroPolicy: open-loop MCTS at every turn (Yu et al., 2023)
    dpdp         mcts.DPDPPolicy: a fast policy, the MCTS when it is unsure (He et al., 2024)
    prior        the planner's top candidate
    random       uniform over the top-k candidates
    uniform      uniform over all of the task's actions
    none         no strategy: the system LLM gets no instruction
"""

import importlib
import json
import os
import random
from dataclasses import dataclass, field

from safetensors import SafetensorError, safe_open
from safetensors.torch import save

import run_files
from errors import UserError


@dataclass
class LearnStep:
    """What the trainer hands a policy after each training step."""
    transitions: int  # turns played this step (transitions stored by observe)
    ended: list  # conversations that ended this step
    block_done: bool  # no conversation in flight and a block of episodes is complete
    generator: object  # the trainer's torch.Generator (saved with its state)
    history: list = field(default_factory=list)  # the policy appends its updates' figures


class Policy:
    """The defaults: a policy that keeps nothing, learns nothing and has no parameters."""

    name = "policy"
    trainable = False  # has parameters that training changes (and a checkpoint)
    uses_encoder = False  # needs the run's frozen encoder (--encoder)
    weight_flags = ()  # the flags naming weights it loads itself (harness.check_weights)
    # acts on the observations' prior (the planner's top-k); a policy that does not still
    # gets it, for the records, and its cost is booked apart (env.settle_cost)
    reads_prior = True
    # gradient updates of its parameters in training (not a supervised stage before it),
    # restored with a training state and read from a loaded checkpoint
    updates = 0

    def __init__(self, args, task, models=None):
        self.args = args
        self.task = task
        # the run's resolved models (harness.resolve_models), saved with checkpoints
        self.models = models

    def attach(self, env):
        """The environment the policy plays in (planners that simulate turns use it)."""

    def start(self, observations):
        """New conversations' first observations."""

    def start_evaluation(self):
        """harness.evaluate is about to play a split: a policy that keeps something across
        the turns of one evaluation (DPDP's percentile threshold) starts it afresh."""

    def act(self, observations, rng, training, epsilon=0.0):
        """(one action name per observation (None: no strategy), one note dict each for
        the turn's record)."""
        raise NotImplementedError

    def observe(self, observations, results, training):
        """The step results of the observations just acted on."""

    def end(self, conversation):
        """A conversation has ended: drop what the policy kept for it."""

    def learn(self, step):
        """Training: learn from what observe stored (see LearnStep)."""

    def before_training(self, train_cases, valid_cases):
        """A new training run (not a resumed one) is about to play its first episode: a
        policy that learns from data first (PPDPP's supervised stage) does it here.
        Returns the history entries of what it did."""
        return []

    def trainable_parameters(self):
        return 0

    def state_dict(self, active):
        """What a training state keeps of the policy (active: conversations in flight)."""
        return {}

    def load_state_dict(self, state):
        pass

    def save(self, path, step, metrics=None):
        raise NotImplementedError

    def load(self, path, optimizer=False):
        raise NotImplementedError

    @staticmethod
    def check_checkpoint(path, args, models):
        """Raise UserError when the checkpoint at path cannot be tested by this run."""

    @staticmethod
    def check_run(args, task, splits):
        """Raise UserError when this run's flags and data ({split: cases}) cannot serve
        the policy; called before any model loads."""

    def candidate_note(self, observation, **extra):
        """The candidates with their priors (and any per-candidate values in extra), for
        the turn's record."""
        notes = [{"action": a, "prior": round(p, 4)}
                 for a, p in zip(observation.candidates, observation.priors)]
        for key, values in extra.items():
            for note, value in zip(notes, values):
                note[key] = round(float(value), 4)
        return notes


class Baseline(Policy):
    """A fixed rule over the candidates; its draws come from the conversation's own stream
    ("policy"), so they are paired across runs."""

    def act(self, observations, rng, training, epsilon=0.0):
        actions, notes = [], []
        for observation in observations:
            actions.append(self.pick(observation))
            notes.append({"candidates": self.candidate_note(observation), "explored": False,
                          "policy": self.name})
        return actions, notes

    def pick(self, observation):
        raise NotImplementedError


class PriorPolicy(Baseline):
    name = "prior"

    def pick(self, observation):
        return observation.candidates[0]  # the candidates are in order of prior


class RandomPolicy(Baseline):
    name = "random"

    def pick(self, observation):
        draw = random.Random(observation.conversation.seed("policy"))
        return observation.candidates[draw.randrange(len(observation.candidates))]


class UniformPolicy(Baseline):
    name = "uniform"
    reads_prior = False  # a draw over every action

    def pick(self, observation):
        return random.Random(observation.conversation.seed("policy")).choice(
            self.task.action_names)


class NoStrategyPolicy(Baseline):
    name = "none"
    reads_prior = False

    def pick(self, observation):
        return None


# name -> (module, class); a module is imported only when its policy is chosen
POLICIES = {"dialogxpert": ("q_adapter", "QAdapterPolicy"), "ppdpp": ("ppdpp", "PPDPPPolicy"),
            "gdpzero": ("mcts", "GDPZeroPolicy"), "dpdp": ("mcts", "DPDPPolicy"),
            "prior": ("policies", "PriorPolicy"), "random": ("policies", "RandomPolicy"),
            "uniform": ("policies", "UniformPolicy"), "none": ("policies", "NoStrategyPolicy")}


# a trained policy's own flags that change how its checkpoint acts in a test: a replay
# (--mode test --checkpoint) takes them from the checkpoint, with the evaluation setup
MCTS_FLAGS = ("mcts_simulations", "mcts_realizations", "mcts_q0", "mcts_cpuct", "mcts_parallel")
# a policy's own flags that change how it acts in a test: a replay takes them from its
# checkpoint, and test_metrics.json records them ("policy_settings")
TEST_FLAGS = {"dialogxpert": ("hidden_size", "encoder_input"),
              "gdpzero": MCTS_FLAGS,
              "ppdpp": ("policy_encoder", "ppdpp_max_length"),
              "dpdp": ("policy_encoder", "ppdpp_max_length") + MCTS_FLAGS
                       + ("dpdp_threshold", "dpdp_percentile")}


def policy_class(name):
    if name not in POLICIES:
        raise ValueError(f"Unknown --policy '{name}'. Expected one of {sorted(POLICIES)}")
    module, cls = POLICIES[name]
    return getattr(importlib.import_module(module), cls)


def make_policy(args, task, encoder=None, models=None):
    """The --policy of args; `encoder` is the run's frozen encoder (for those that use it),
    `models` the run's resolved models (harness.resolve_models) that its checkpoints name."""
    cls = policy_class(args.policy)
    if cls.uses_encoder:
        return cls(args, task, encoder, models=models)
    return cls(args, task, models=models)


# -- checkpoints: safetensors weights and a JSON sidecar (path + ".json") ----------------

def save_checkpoint(path, tensors, info):
    """Each file is replaced whole, so a kill never leaves a torn checkpoint."""
    run_files.atomic_write(run_files.sidecar(path),
                           lambda f: f.write(json.dumps(info, indent=2).encode()))
    weights = save({k: v.contiguous().cpu() for k, v in tensors.items()})
    run_files.atomic_write(path, lambda f: f.write(weights))


def read_checkpoint(path):
    """(the sidecar's info, the tensor names, {name: shape}) of a checkpoint, checked to
    exist and be readable, without loading its weights."""
    info_path = path + ".json"
    if not (os.path.isfile(path) and os.path.isfile(info_path)):
        raise UserError(f"no checkpoint at {path} (with {info_path} beside it). Pass the "
                        "best.pt of a training run")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info, dict) or not isinstance(info.get("args"), dict):
            raise UserError(f"the checkpoint {path} cannot be read ({info_path} holds no "
                            "'args' object). Pass the best.pt of a training run")
        with safe_open(path, framework="pt") as f:
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    except (OSError, ValueError, TypeError, SafetensorError) as error:
        raise UserError(f"the checkpoint {path} cannot be read ({error}). Pass the best.pt of "
                        "a training run") from None
    return info, set(shapes), shapes


def check_saved_args(path, saved, args, names):
    """The arguments `names` of the checkpoint's run equal this run's."""
    for name, value in recorded_args(path, saved, names).items():
        if value != getattr(args, name):
            raise UserError(f"the checkpoint {path} was trained with --{name} {value!r}, this "
                            f"run has {getattr(args, name)!r}. Pass --{name} {value} or a "
                            "checkpoint trained for this run")


def recorded_args(path, saved, names):
    """{name: value} of `names` in a checkpoint's saved arguments, every one of them there:
    a checkpoint without one was written before that flag existed."""
    missing = [f"--{name}" for name in names if name not in saved]
    if missing:
        raise UserError(f"the checkpoint {path} does not record {', '.join(missing)}: it was "
                        "written by an earlier version of this code. Test it with the commit "
                        "that wrote it, or train a new one")
    return {name: saved[name] for name in names}
