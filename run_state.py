"""Crash-safe training state: everything a run needs to continue where it stopped.

train_model.py writes `train_state.pt` in the run folder every --checkpoint_every finished
episodes, on SIGINT and SIGTERM, and at the end. It holds the Q-head, target head and
optimizer, the replay buffer, every random state (Python, NumPy, torch, the trainer's own
generators, the LLM samplers), the loop's counters, the conversations in flight and the
training log. Files are written beside their target, flushed to disk and renamed over it,
so a kill at any instant leaves the previous state whole. The state holds only tensors
and plain Python values: it is loaded with `torch.load(weights_only=True)`, which runs no
code from the file.
"""

import dataclasses
import os
import random
import signal

import numpy as np
import torch

from env import Conversation, reserve_conversation_ids
from errors import UserError

STATE_FILE = "train_state.pt"


def atomic_write(path, write):
    """write(file object) into path.tmp, fsync, rename over path, fsync the folder."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_state(run_dir, state):
    atomic_write(os.path.join(run_dir, STATE_FILE), lambda f: torch.save(state, f))


def load_state(run_dir):
    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no training state in {run_dir} ({STATE_FILE} is missing). Pass the "
                        "folder of a run that was stopped, or start a new run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: torch raises many kinds
        raise UserError(f"{path} cannot be read ({type(error).__name__}). Start a new "
                        "run") from None


# -- conversations ----------------------------------------------------------------------

def conversation_to_dict(conversation):
    return dataclasses.asdict(conversation)


# fields of conversations in states saved before the trainer kept the features itself
OLD_FIELDS = ("candidate_features", "pending")


def conversation_from_dict(values):
    values = dict(values, turns=[tuple(t) for t in values["turns"]])
    return Conversation(**{k: v for k, v in values.items() if k not in OLD_FIELDS})


def restore_features(state):
    """uid -> candidate features of the conversations in flight (older states kept them
    in each conversation)."""
    if "features" in state:
        return dict(state["features"])
    return {c["uid"]: c["candidate_features"] for c in state["active"]}


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
