"""Crash-safe training state: everything a run needs to continue where it stopped.

train_model.py writes `train_state.pt` in the run folder every --checkpoint_every finished
episodes, on SIGINT and SIGTERM, and at the end. It holds the Q-head, target head and
optimizer, the replay buffer, every random state (Python, NumPy, torch, the trainer's own
generators, the LLM samplers), the loop's counters, the conversations in flight and the
training log. Files are written beside their target, flushed to disk and renamed over it,
so a kill at any instant leaves the previous state whole. The state holds only tensors
and plain Python values: it is loaded with `torch.load(weights_only=True)`, which runs no
code from the file. It carries its format (STATE_FORMAT); a state of another format is
refused, since only the format this code writes can be read.
"""

import dataclasses
import os
import random
import shutil
import signal

import numpy as np
import torch

import run_files
from env import Conversation, reserve_conversation_ids
from errors import UserError
from get_args import Args

STATE_FILE = run_files.TRAIN_STATE
# the layout of train_state.pt, saved in it as "format": raised whenever a key is added,
# removed or changes meaning. States written before it was kept have none: format 1
STATE_FORMAT = 2
# the files of a run's test; a run whose training goes on keeps them under new names
TEST_FILES = (run_files.metrics_file("test"), run_files.conversations_file("test"))
# flags that change only how a run reports: a resumed run takes them from the command line
REPORTING_FLAGS = ("progress", "debug")


def save_state(run_dir, state):
    state = {"format": STATE_FORMAT} | state
    run_files.atomic_write(os.path.join(run_dir, STATE_FILE), lambda f: torch.save(state, f))


def load_state(run_dir):
    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no training state in {run_dir} ({STATE_FILE} is missing). Pass the "
                        "folder of a run that was stopped, or start a new run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: torch raises many kinds
        raise UserError(f"{path} cannot be read ({type(error).__name__}). Start a new "
                        "run") from None
    saved = state.get("format", 1) if isinstance(state, dict) else None
    if saved != STATE_FORMAT:
        raise UserError(f"{path} has training-state format {saved}, this code reads format "
                        f"{STATE_FORMAT}. Resume it with the commit that wrote it, or start a "
                        "new run")
    return state


# -- resuming -----------------------------------------------------------------------------

def resumed_args(state, args, given):
    """The arguments of a resumed run (args.resume): the saved run's, with the command
    line's --progress and --debug, and its --total_episodes (training goes on to it). Any
    other flag given with a value other than the saved one is refused, all in one error;
    so is a finished run (trained and tested) without a larger --total_episodes."""
    run_dir = args.resume
    try:
        saved = Args(**state["args"] | {"resume": run_dir})
    except (KeyError, TypeError, ValueError) as error:  # no arguments, or not this code's
        raise UserError(f"the arguments saved in {os.path.join(run_dir, STATE_FILE)} cannot "
                        f"be used ({type(error).__name__}: {error}). Resume it with the "
                        "commit that wrote it, or start a new run") from None
    conflicts = [f"--{f.name} {getattr(args, f.name)} (saved: {getattr(saved, f.name)})"
                 for f in dataclasses.fields(Args)
                 if f.name in given and f.name not in ("resume", "total_episodes",
                                                       *REPORTING_FLAGS)
                 and getattr(args, f.name) != getattr(saved, f.name)]
    if conflicts:
        raise UserError(f"--resume {run_dir} keeps the run's own settings, and these flags "
                        f"differ from them: {', '.join(conflicts)}. Leave them out, or start "
                        "a new run with them")
    total = args.total_episodes if "total_episodes" in given else saved.total_episodes
    if total < saved.total_episodes:
        raise UserError(f"--total_episodes {total} is below the {saved.total_episodes} "
                        f"episodes of the run in {run_dir}. Pass a larger one to train it "
                        "further, or none")
    tested = os.path.exists(os.path.join(run_dir, TEST_FILES[0]))
    if tested and total == saved.total_episodes:
        raise UserError(f"the run in {run_dir} is finished: trained to {total} episodes and "
                        "tested. Pass a larger --total_episodes with --resume to train it "
                        f"further, or test it with --mode test --checkpoint {run_dir}/best.pt")
    return Args(**vars(saved) | {"total_episodes": total}
                | {name: getattr(args, name) for name in REPORTING_FLAGS})


def set_aside_test(run_dir, episodes):
    """Training goes on past the test made after `episodes` episodes: its files are
    renamed test_at_<episodes>_*, and the best.pt it tested is kept as
    best_at_<episodes>.pt (a hard link: best.pt is replaced, never written in place).
    Returns the new names."""
    kept = []
    for name in TEST_FILES:
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            kept.append(name.replace("test_", f"test_at_{episodes}_", 1))
            os.replace(path, os.path.join(run_dir, kept[-1]))
    for name in (run_files.BEST, run_files.sidecar(run_files.BEST)):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            kept.append(name.replace("best", f"best_at_{episodes}", 1))
            target = os.path.join(run_dir, kept[-1])
            if os.path.exists(target):  # set aside before, then tested again at the same count
                os.remove(target)
            try:
                os.link(path, target)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, target)
    return kept


# -- conversations ----------------------------------------------------------------------

def conversation_to_dict(conversation):
    return dataclasses.asdict(conversation)


def conversation_from_dict(values):
    return Conversation(**dict(values, turns=[tuple(t) for t in values["turns"]]))


def restore_conversations(dicts):
    conversations = [conversation_from_dict(d) for d in dicts]
    reserve_conversation_ids(max((c.uid for c in conversations), default=-1) + 1)
    return conversations


# -- random states ----------------------------------------------------------------------

def random_states(rng, generator, llms):
    """Python's, NumPy's and torch's global states, the trainer's own rng and torch
    generator, and each LLM client's sampler (clients that have one)."""
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "rng": rng.getstate(),
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                      *numpy_state[2:]],
            "torch": torch.get_rng_state(), "generator": generator.get_state(),
            "llms": {role: state for role, state in ((role, llm.rng_state())
                                                      for role, llm in llms.items())
                     if state is not None}}


def restore_random_states(states, rng, generator, llms):
    random.setstate(_tuples(states["python"]))
    rng.setstate(_tuples(states["rng"]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    for role, state in states["llms"].items():
        llms[role].load_rng_state(state)


def _clients(llms):
    """{role: client}, each client once (in-process roles may share one model)."""
    seen = {}
    for role, llm in llms.items():
        seen.setdefault(id(llm), (role, llm))
    return dict(seen.values())


def llm_caches(llms):
    """Each client's cache (see LLMClient.cache_state), by the first role that uses it."""
    return {role: state for role, state in ((role, llm.cache_state())
                                            for role, llm in _clients(llms).items())
            if state is not None}


def restore_llm_caches(states, llms):
    for role, state in states.items():
        llms[role].load_cache_state(state)


def clear_llm_caches(llms):
    for llm in _clients(llms).values():
        llm.clear_cache()


def _tuples(value):
    """random.setstate wants the tuples that saving turned into lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# -- stopping on a signal -----------------------------------------------------------------

class StopRequest:
    """Set by SIGINT or SIGTERM; the training loop saves its state and stops at the end of
    the current step. A second signal acts as usual (the saved state stays whole)."""

    def __init__(self):
        self.requested = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class TrainingStopped(Exception):
    """Training stopped on a signal after saving its state."""

    def __init__(self, run_dir, signal_name):
        super().__init__(f"stopped by {signal_name}: the training state is saved in "
                         f"{os.path.join(run_dir, STATE_FILE)}. Resume with `python "
                         f"train_model.py --resume {run_dir}`")
