"""Train the DialogXpert Q-adapter by LLM self-play, or evaluate a checkpoint.

    python train_model.py --data_name esc                       # train, then test the best
    python train_model.py --data_name esc --mode test --checkpoint runs/<run>/best.pt

Each turn: the planner LLM gives a prior over the task's actions, the top-k become
candidates, the Q-adapter scores each (action, conversation) pair and picks one
(epsilon-greedy in training, argmax in testing), the system and user LLMs play the turn,
and the critic LLM's verdicts give the reward. Transitions go to a replay buffer and the
Q-head learns by TD learning against a soft-updated target head.
"""

import copy
import json
import os
import random
import time
from collections import Counter

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from critic import Critic
from env import Planner, SelfPlayEnv, transcript
from get_args import parse_args
from llm import ServerError, backend_options, load_llm, resolve_llm_path
from q_adapter import (FrozenEncoder, QHead, linear_schedule, resolve_encoder_path,
                       select_action, state_text)
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


def llm_usage(planner, env):
    """Requests, retries and tokens per role so far, for clients that count them (served)."""
    llms = {"planner": planner.llm, "system": env.system_llm, "user": env.user_llm,
            "critic": env.critic.llm}
    return {role: dict(llm.usage) for role, llm in llms.items() if hasattr(llm, "usage")}


def build_env(args, task, llms):
    critic = Critic(task, llms["critic"], num_samples=args.critic_samples,
                    temperature=args.critic_temperature,
                    max_new_tokens=args.critic_max_new_tokens, shared_prefix=args.shared_prefix,
                    stop_at_newline=args.critic_stop_at_newline)
    planner = Planner(task, llms["planner"], mode=args.prior, num_samples=args.prior_samples,
                      use_emotion=args.use_emotion, max_new_tokens=args.prior_max_new_tokens)
    env = SelfPlayEnv(task, llms["system"], llms["user"], critic, max_turn=args.max_turn,
                      system_temperature=args.system_temperature,
                      user_temperature=args.user_temperature,
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
        self.optimizer = torch.optim.Adam(self.q_head.parameters(), lr=args.learning_rate)
        self.updates = 0

    def observe(self, planner, conversations, task):
        """Fill each conversation's top-k candidates, their priors and features, with one
        planner call and one encoder call for the whole batch."""
        if not conversations:
            return
        prior = planner.prior(conversations)
        k = min(self.args.top_k, prior.shape[1])
        top = prior.topk(k, dim=1)
        actions, states = [], []
        for conversation, indices, values in zip(conversations, top.indices, top.values):
            conversation.candidates = [task.action_names[i] for i in indices.tolist()]
            conversation.candidate_priors = values.tolist()
            text = state_text(transcript(conversation.turns),
                              conversation.emotions if self.args.use_emotion else [])
            actions += conversation.candidates
            states += [text] * k
        features = self.encoder.embed(actions, states)
        for i, conversation in enumerate(conversations):
            conversation.candidate_features = features[i * k:(i + 1) * k]

    @torch.no_grad()
    def q_values(self, features):
        return self.q_head(features)

    def update(self, buffer, generator):
        batch = buffer.sample(self.args.batch_size, generator, self.encoder.device)
        with torch.no_grad():
            next_q = self.target_head(batch["next_features"])
            target = td_target(batch["rewards"], next_q, batch["next_mask"],
                               batch["terminated"], self.args.gamma)
        q = self.q_head(batch["features"])
        loss = torch.nn.functional.mse_loss(q, target)
        self.optimizer.zero_grad()
        loss.backward()
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
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path)
        info = {"step": step, "updates": self.updates, "metrics": metrics,
                "optimizer_param_groups": self.optimizer.state_dict()["param_groups"],
                "args": vars(self.args)}
        with open(path + ".json", "w") as f:
            json.dump(info, f, indent=2)

    def load(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"No checkpoint at '{path}'; train one with "
                                    "`python train_model.py --data_name <task>` first")
        tensors = load_file(path, device=str(self.encoder.device))
        self.q_head.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("q_head.")})
        self.target_head.load_state_dict({k[12:]: v for k, v in tensors.items()
                                          if k.startswith("target_head.")})
        with open(path + ".json") as f:
            info = json.load(f)
        state = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
        self.optimizer.load_state_dict({"state": state,
                                        "param_groups": info["optimizer_param_groups"]})
        self.updates = info["updates"]
        return info


# ---------------------------------------------------------------------------------------
# Playing conversations
# ---------------------------------------------------------------------------------------

def choose(agent, conversations, epsilon, rng):
    """Pick one candidate per conversation; log candidates with prior and Q."""
    features = torch.cat([c.candidate_features for c in conversations])
    q_all = agent.q_values(features).cpu()
    chosen, offset = [], 0
    for conversation in conversations:
        q = q_all[offset:offset + len(conversation.candidates)]
        offset += len(q)
        index, explored = select_action(q, epsilon, rng)
        chosen.append(index)
        conversation.pending = {
            "candidates": [{"action": a, "prior": round(p, 4), "q": round(float(v), 4)}
                           for a, p, v in zip(conversation.candidates,
                                              conversation.candidate_priors, q)],
            "explored": explored}
    return chosen


def play_step(agent, planner, env, task, conversations, epsilon, rng):
    """One batched turn. Returns (chosen features, results) with next observations filled."""
    chosen = choose(agent, conversations, epsilon, rng)
    actions = [c.candidates[i] for c, i in zip(conversations, chosen)]
    chosen_features = [c.candidate_features[i] for c, i in zip(conversations, chosen)]
    pending = [c.pending for c in conversations]
    results = env.step(conversations, actions)
    for conversation, extra in zip(conversations, pending):
        conversation.records[-1].update(extra)
    # the next state's candidates: needed to act on, and to bootstrap a turn-limit ending
    agent.observe(planner, [c for c, r in zip(conversations, results) if not r.terminated], task)
    finished = [c.uid for c in conversations if c.done]
    llms = {id(x): x for x in (planner.llm, env.system_llm, env.user_llm, env.critic.llm)}
    for llm in llms.values():
        if hasattr(llm, "forget"):  # an optional method of the LLM client interface
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
               "llm_answers_unusable": dict(error_counts)}
    if task.bargaining:  # failures count 0, as in PPDPP
        metrics["SL"] = sum(c.sale_to_list or 0.0 for c in conversations
                            if c.outcome == "success") / max(n, 1)
    return metrics


def evaluate(args, agent, planner, env, task, cases, desc="eval", epsilon=0.0):
    """Play every case greedily (epsilon 0); returns (metrics, conversations)."""
    errors_before = Counter(env.errors) + Counter({"planner": planner.invalid_answers})
    rng = random.Random(args.seed)
    finished, queue = [], list(cases)
    bar = tqdm(total=len(cases), desc=desc, disable=not args.progress, leave=False)
    while queue:
        batch = [env.reset(case) for case in queue[:args.num_envs]]
        queue = queue[args.num_envs:]
        agent.observe(planner, batch, task)
        while batch:
            play_step(agent, planner, env, task, batch, epsilon, rng)
            for conversation in [c for c in batch if c.done]:
                finished.append(conversation)
                bar.update(1)
            batch = [c for c in batch if not c.done]
    bar.close()
    errors = Counter(env.errors) + Counter({"planner": planner.invalid_answers})
    errors.subtract(errors_before)
    return summarize(finished, task, args.max_turn, +errors), finished


def write_results(run_dir, name, metrics, conversations):
    with open(os.path.join(run_dir, f"{name}_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(run_dir, f"{name}_conversations.jsonl"), "w") as f:
        for c in conversations:
            f.write(json.dumps({"case": c.case, "turns": c.turns, "emotions": c.emotions, "outcome": c.outcome,
                                "total_reward": c.total_reward, "sale_to_list": c.sale_to_list,
                                "records": c.records}) + "\n")


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

def train(args, agent, planner, env, task, train_cases, valid_cases, run_dir, writer):
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    buffer = ReplayBuffer(args.buffer_size, agent.encoder.width, args.top_k)
    best_path, best_score = os.path.join(run_dir, "best.pt"), None
    order = list(range(len(train_cases)))
    started = finished = steps = 0
    active = []
    train_log = []
    bar = tqdm(total=args.total_episodes, desc="train", disable=not args.progress)
    next_eval = args.eval_every
    while finished < args.total_episodes:
        # finished conversations have left the batch; new cases take their place
        new = []
        while len(active) + len(new) < args.num_envs and started < args.total_episodes:
            if started % len(order) == 0:
                rng.shuffle(order)
            new.append(env.reset(train_cases[order[started % len(order)]]))
            started += 1
        agent.observe(planner, new, task)
        active += new
        epsilon = linear_schedule(args.epsilon_start, args.epsilon_end,
                                  args.exploration_fraction * args.total_episodes, finished)
        chosen_features, results = play_step(agent, planner, env, task, active, epsilon, rng)
        steps += 1
        for conversation, features, result in zip(active, chosen_features, results):
            next_features = None if result.terminated else conversation.candidate_features
            buffer.add(features.cpu(), result.reward,
                       None if next_features is None else next_features.cpu(), result.terminated)
        if len(buffer) >= args.learning_starts:
            for _ in range(args.updates_per_step * len(active)):
                loss, q_mean = agent.update(buffer, generator)
            writer.add_scalar("losses/td_loss", loss, steps)
            writer.add_scalar("losses/q_values", q_mean, steps)
        writer.add_scalar("charts/epsilon", epsilon, steps)
        for conversation in [c for c in active if c.done]:
            finished += 1
            bar.update(1)
            train_log.append(conversation)
            writer.add_scalar("charts/episodic_return", conversation.total_reward, finished)
            writer.add_scalar("charts/episode_success",
                              float(conversation.outcome == "success"), finished)
        active = [c for c in active if not c.done]
        if finished >= next_eval or finished >= args.total_episodes:
            next_eval += args.eval_every
            metrics, _ = evaluate(args, agent, planner, env, task, valid_cases, "valid")
            writer.add_scalar("eval/SR", metrics["SR"], finished)
            writer.add_scalar("eval/AT", metrics["AT"], finished)
            if task.bargaining:
                writer.add_scalar("eval/SL", metrics["SL"], finished)
            for role, usage in llm_usage(planner, env).items():
                for name, count in usage.items():
                    writer.add_scalar(f"usage/{role}_{name}", count, finished)
            score = (metrics["SR"], -metrics["AT"])
            tqdm.write(f"[episode {finished}] valid SR={metrics['SR']:.3f} AT={metrics['AT']:.2f}")
            if best_score is None or score > best_score:
                best_score = score
                agent.save(best_path, finished, metrics)
    bar.close()
    agent.save(os.path.join(run_dir, "last.pt"), finished)
    train_metrics = summarize(train_log, task, args.max_turn, env.errors)
    train_metrics["llm_usage"] = llm_usage(planner, env)
    write_results(run_dir, "train", train_metrics, train_log)
    return best_path


def main(argv=None):
    args = parse_args(argv)
    seed_everything(args.seed)
    task = get_task(args.data_name)

    def split(name):
        cases = load_split(args.data_dir, task.name, name, extes_seed=args.extes_seed)
        if not cases:
            raise SystemExit(f"error: the {name} split of '{task.name}' in {args.data_dir} is empty")
        return cases[:args.max_cases] if args.max_cases else cases

    # read every split first: a missing file fails before any model is loaded
    test_cases = split("test")
    if args.mode == "train":
        train_cases, valid_cases = split("train"), split("valid")
        if args.eval_cases:
            valid_cases = valid_cases[:args.eval_cases]

    try:
        llms = load_llms(args)
        planner, env = build_env(args, task, llms)
        scoring_problem = getattr(llms["planner"], "option_scoring_problem", None)  # optional
        problem = args.prior == "logits" and scoring_problem and scoring_problem(planner.labels)
    except ServerError as error:
        raise SystemExit(f"error: {error}") from None
    if problem:
        print(f"warning: {problem}; the planner samples its prior instead (--prior sample)")
        args.prior = planner.mode = "sample"
    encoder = FrozenEncoder.from_pretrained(resolve_encoder_path(args.encoder),
                                            args.max_encoder_tokens, args.device)
    agent = Agent(args, encoder)

    run_name = f"{task.name}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    print(f"Run folder: {run_dir}")
    try:
        if args.mode == "train":
            with SummaryWriter(run_dir) as writer:
                writer.add_text("args", json.dumps(vars(args), indent=2))
                checkpoint = train(args, agent, planner, env, task, train_cases, valid_cases,
                                   run_dir, writer)
        else:
            checkpoint = args.checkpoint
        agent.load(checkpoint)
        metrics, conversations = evaluate(args, agent, planner, env, task, test_cases, "test")
    except ServerError as error:  # a served model is gone: keep the Q-head learned so far
        agent.save(os.path.join(run_dir, "last.pt"), None,
                   {"stopped_by": str(error), "llm_usage": llm_usage(planner, env)})
        raise SystemExit(f"error: {error}") from None
    metrics["checkpoint"] = checkpoint
    metrics["llm_usage"] = llm_usage(planner, env)
    write_results(run_dir, "test", metrics, conversations)
    print(json.dumps(metrics, indent=2))
    return metrics, run_dir


if __name__ == "__main__":
    main()
