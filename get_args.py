"""All arguments of train_model.py and bench.py, in one dataclass.

Every field is a command-line flag of the same name (`--data_name esc`, `--top_k 4`);
booleans take true/false. `python train_model.py --help` lists them with their help text.
"""

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass, field

from errors import ArgumentParser, UserError
from tasks import TASKS

# the LLM roles: each has its --<role>_llm and --<role>_base_url
ROLES = ("planner", "system", "user", "critic")
# --backend name -> the module that defines its client's load(name, **options) (llm.py)
BACKENDS = {"transformers": "llm_transformers", "openai": "llm_openai"}
# --policy: those that train (a checkpoint), and those that only play (policies.py)
TRAINED_POLICIES = ("dialogxpert", "ppdpp", "dpdp")
UNTRAINED_POLICIES = ("gdpzero", "prior", "random", "uniform", "none")


# --recipe original: the values of the original release (declare-lab/dialogxpert:
# misc.get_args_train, llm_priors.train_qnetwork, q_adapter.QAdapter, env.Env). Why the
# project's differ, value by value: README, "Two recipes".
RECIPES = {
    "project": {},  # the dataclass defaults below
    "original": {
        "optimizer": "adamw", "learning_rate": 1e-3,
        "tau": 0.005,  # soft update after every minibatch (as here)
        "loss_reduction": "sum", "max_grad_norm": 1.0,
        "buffer_size": 0,  # every transition kept
        "update_every_episodes": 2, "replay_ratio": 4.0,  # 2 episodes, then 4*|B|/32 draws
        "learning_starts": 1,  # so the first update comes after the first 2 episodes
        "epsilon_start": 0.5, "epsilon_end": 0.5,
        "total_episodes": 2000,  # 1,000 steps of 2 episodes
        "hidden_size": 64,
        "encoder_input": "original",
        # misc.get_args_train: --model_path Qwen2.5-14B, loaded by misc.backup_loading in
        # float16 (the release names no Instruct model; its prompts use the chat template)
        "llm": "weights/Qwen2.5-14B", "dtype": "float16",
        "encoder": "weights/bert-base-uncased",
        "system_max_new_tokens": 200, "user_max_new_tokens": 200, "critic_max_new_tokens": 25,
        "system_temperature": 0.0, "user_temperature": 0.0,  # generate(do_sample=False)
        "seed": 1,
        "extes_split": "10717,200,200",
        # env.get_prior_actions_llm: options always in the task's order ("(1) ... (n)"), the
        # critic's too; the candidates are every number of one sampled "TOP 4" answer
        # (generate(max_new_tokens=25, temperature=1.0)), top_k unused
        "prior_order": "fixed", "critic_order": "fixed",
        "prior": "list", "prior_max_new_tokens": 25,
    },
}


@dataclass
class Args:
    # --- task and data
    data_name: str = field(default="esc", metadata={"help": "task: " + ", ".join(TASKS)})
    data_dir: str = field(default="data", metadata={
        "help": "folder with the benchmark files (see download_data.py); data/demo has a few "
                "demo cases per task"})
    mode: str = field(default="train", metadata={
        "help": "train (train, keep the best checkpoint on valid, then test it) or test "
                "(load --checkpoint and play the test split greedily)"})
    policy: str = field(default="dialogxpert", metadata={
        "help": "who picks the action (policies.py): dialogxpert (the Q-adapter); the "
                "planners of prior work: ppdpp (a fine-tuned classifier), gdpzero (MCTS at "
                "every turn, no training), dpdp (a fast policy, the MCTS when unsure); or a "
                "baseline with --mode test and no checkpoint: prior (the planner's top "
                "action), random (uniform over the top-k), uniform (over all actions), none "
                "(no strategy)"})
    seeds: str = field(default="", metadata={
        "help": "comma-separated seeds, e.g. 1,2,3: one run per seed (each as --seed, "
                "which it replaces), then report.py over them"})
    checkpoint: str = field(default="", metadata={"help": "checkpoint file for --mode test"})
    resume: str = field(default="", metadata={
        "help": "run folder of a stopped training run: continue it with its own arguments"})
    checkpoint_every: int = field(default=10, metadata={
        "help": "finished episodes between saves of the whole training state (also saved "
                "on SIGINT, SIGTERM and at the end)"})
    seed: int = field(default=42, metadata={"help": "seeds everything, once, at start"})
    extes_seed: int = field(default=0, metadata={
        "help": "fixed seed of the ExTES train/valid/test split (independent of --seed)"})
    extes_split: str = field(default="0.8,0.1,0.1", metadata={
        "help": "ExTES train,valid,test sizes: fractions (0.8,0.1,0.1) or case counts "
                "(10717,200,200)"})
    max_cases: int = field(default=0, metadata={
        "help": "use at most this many cases of each split (0: all)"})
    user_personas: str = field(default="none", metadata={
        "help": "one persona per conversation for the user simulator: none, builtin (Big-Five "
                "traits x decision-making styles) or a JSON file of {name, text} (personas.py)"})
    test_user_personas: str = field(default="", metadata={
        "help": "the test's personas (none, builtin or a file; default: --user_personas)"})

    # --- models
    backend: str = field(default="transformers", metadata={
        "help": "LLM engine: transformers (in this process) or openai (an OpenAI-compatible "
                "server: see --base_url)"})
    llm: str = field(default="auto", metadata={
        "help": "model folder for every role; 'auto' uses weights/Qwen2.5-1.5B-Instruct if "
                "downloaded, else the embedded SmolLM2-135M-Instruct. With --backend openai: "
                "the served model's name ('auto': the first the server lists)"})
    planner_llm: str = field(default="", metadata={"help": "planner model (default: --llm)"})
    system_llm: str = field(default="", metadata={"help": "system model (default: --llm)"})
    user_llm: str = field(default="", metadata={"help": "user model (default: --llm)"})
    critic_llm: str = field(default="", metadata={"help": "critic model (default: --llm)"})
    encoder: str = field(default="auto", metadata={
        "help": "frozen text encoder for the Q-adapter; 'auto' uses weights/bert-base-uncased "
                "if downloaded, else the embedded all-MiniLM-L6-v2"})
    device: str = field(default="auto", metadata={"help": "auto, cuda, mps or cpu"})
    dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16, float32"})

    # --- served models (--backend openai)
    base_url: str = field(default="", metadata={
        "help": "OpenAI-compatible server of every role, e.g. http://127.0.0.1:8080/v1"})
    planner_base_url: str = field(default="", metadata={"help": "planner's server (default: --base_url)"})
    system_base_url: str = field(default="", metadata={"help": "system's server (default: --base_url)"})
    user_base_url: str = field(default="", metadata={"help": "user's server (default: --base_url)"})
    critic_base_url: str = field(default="", metadata={"help": "critic's server (default: --base_url)"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "environment variable holding the API key (never printed or saved; unset: "
                "no key is sent)"})
    tokenizer: str = field(default="auto", metadata={
        "help": "local tokenizer folder of the served model, for an exact prior over "
                "multi-token labels; 'auto': each role's model name when it is a local "
                "folder or embedded-smollm2; 'none': without"})
    max_concurrency: int = field(default=32, metadata={
        "help": "requests in flight at once per role"})
    request_timeout: float = field(default=120.0, metadata={
        "help": "seconds one request may take before it is retried"})
    max_retries: int = field(default=4, metadata={
        "help": "retries of a request after a connection error, timeout, 429 or 5xx, with "
                "exponential backoff; then the run stops"})

    # --- self-play
    num_envs: int = field(default=8, metadata={
        "help": "conversations played together; each LLM phase is one batched call"})
    top_k: int = field(default=4, metadata={
        "help": "candidate actions taken from the prior (--prior list: the number of options "
                "asked for)"})
    max_turn: int = field(default=8, metadata={"help": "system turns before a time-limit end"})
    critic: str = field(default="sample", metadata={
        "help": "sample (sample --critic_samples answers, the mean reward of the usable ones) "
                "or logits (the exact distribution over the critic's options from one forward "
                "pass; the reward is its expectation)"})
    critic_samples: int = field(default=10, metadata={
        "help": "answers sampled per turn (logits mode, cb: a deal needs P(deal) ** "
                "critic_samples >= 0.5)"})
    critic_temperature: float = field(default=1.1, metadata={"help": "critic sampling temperature"})
    system_temperature: float = field(default=0.7, metadata={"help": "0 decodes greedily"})
    user_temperature: float = field(default=0.7, metadata={"help": "0 decodes greedily"})
    eval_temperature: float = field(default=0.0, metadata={
        "help": "system and user temperature in valid and test conversations (0: greedy, so "
                "checkpoint choice and test figures are not decoding noise)"})
    system_max_new_tokens: int = field(default=80, metadata={"help": "system turn length cap"})
    user_max_new_tokens: int = field(default=60, metadata={"help": "user turn length cap"})
    critic_max_new_tokens: int = field(default=24, metadata={"help": "verdict length cap"})
    prior: str = field(default="logits", metadata={
        "help": "the planner's prior and candidates: logits (one forward pass over option "
                "labels), sample (sample --prior_samples answers and count the numbers; for "
                "backends without logits), list (the original release's: one sampled answer "
                "to 'the --top_k most suitable options', and every action number in it, in "
                "its order, is a candidate) or project (--prior_samples plans in free text, "
                "each projected onto an action by name or by the encoder's nearest action; "
                "the prior is their frequencies). Except with list, the --top_k most "
                "probable actions are the candidates"})
    prior_samples: int = field(default=10, metadata={
        "help": "answers sampled per turn with --prior sample or project; with list, the "
                "most answers asked when an answer names no action"})
    prior_max_new_tokens: int = field(default=0, metadata={
        "help": "length of a sampled planner answer (0: by --prior: 4 for sample, 25 for "
                "list, the original's, 32 for project)"})
    prior_match_threshold: float = field(default=0.2, metadata={
        "help": "--prior project: the least cosine similarity between a plan that names no "
                "action and its nearest action (by the encoder); below it the plan is "
                "unusable. Depends on the encoder; 0.2 separated paraphrases from unrelated "
                "text with the embedded MiniLM (docs/internals.md)"})
    prior_order: str = field(default="rotate", metadata={
        "help": "order of the actions in the planner's question: rotate (the prior is the "
                "mean over --prior_rotations rotations of the list, so a preference for a "
                "listed position is spread over all actions) or fixed (the task's order)"})
    prior_rotations: int = field(default=0, metadata={
        "help": "rotations of the action list with --prior_order rotate, evenly spaced "
                "(0: all of them, one per action)"})
    critic_order: str = field(default="shuffle", metadata={
        "help": "order of the critic's options: shuffle (sample: a turn's samples spread "
                "over rotations of the options; logits: the mean distribution over all "
                "rotations) or fixed (the task's order)"})
    critic_stop_at_newline: bool = field(default=True, metadata={
        "help": "end each verdict at its first line break"})
    max_batch_rows: int = field(default=0, metadata={
        "help": "most sequences decoded together, bounding KV-cache memory (0: 160 on CPU, "
                "1024 on a GPU)"})
    prefix_cache_gb: float = field(default=-1.0, metadata={
        "help": "memory for KV caches of each conversation's last prompt per role, so a "
                "new turn's prompt only runs its new tokens (0: off; -1: 1 GB on CPU, off "
                "on a GPU, where it measured slower: see docs/speed.md)"})
    context_length: int = field(default=0, metadata={
        "help": "tokens a prompt and its answer may use; longer prompts lose their oldest "
                "turns first (0: the model's own context, or what the server lists)"})
    shared_prefix: bool = field(default=True, metadata={
        "help": "critic samples share the prompt's KV cache instead of repeating the prompt"})
    use_emotion: bool = field(default=True, metadata={
        "help": "ask the system LLM for the user's emotion and show the history to the "
                "planner and the encoder (the critic never sees it)"})

    # --- Q-learning (--recipe original: the values of the original release, see RECIPES)
    recipe: str = field(default="project", metadata={
        "help": "project (this repository's values) or original (the original release's: "
                "see README); each value can still be set by its own flag"})
    total_episodes: int = field(default=200, metadata={"help": "training conversations"})
    gamma: float = field(default=0.99, metadata={"help": "discount factor"})
    tau: float = field(default=0.01, metadata={"help": "soft target update rate"})
    learning_rate: float = field(default=1e-4, metadata={"help": "optimizer learning rate"})
    optimizer: str = field(default="adam", metadata={
        "help": "adam, or adamw (torch's default weight decay 0.01)"})
    loss_reduction: str = field(default="mean", metadata={
        "help": "TD loss over a minibatch: mean or sum of squared errors"})
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "clip the gradient to this norm (0: no clipping)"})
    batch_size: int = field(default=32, metadata={"help": "replay minibatch size"})
    buffer_size: int = field(default=10000, metadata={
        "help": "replay buffer capacity (0: keep every transition)"})
    learning_starts: int = field(default=32, metadata={"help": "transitions before updates"})
    updates_per_step: int = field(default=1, metadata={
        "help": "gradient steps per collected transition (when --update_every_episodes 0)"})
    update_every_episodes: int = field(default=0, metadata={
        "help": "0: update after every turn; N: play N episodes, then draw "
                "ceil(replay_ratio * len(buffer) / batch_size) minibatches with replacement"})
    replay_ratio: float = field(default=4.0, metadata={
        "help": "with --update_every_episodes: transitions drawn per update, per transition "
                "in the buffer"})
    encoder_input: str = field(default="pair", metadata={
        "help": "pair: (action, emotions + conversation); original: 'Action: {action} for "
                "Observation: {conversation}' as one text, no emotions"})
    epsilon_start: float = field(default=1.0, metadata={"help": "exploration at the start"})
    epsilon_end: float = field(default=0.05, metadata={"help": "exploration at the end"})
    exploration_fraction: float = field(default=0.5, metadata={
        "help": "share of total_episodes over which epsilon decays linearly"})
    hidden_size: int = field(default=256, metadata={"help": "Q-head MLP width"})
    max_encoder_tokens: int = field(default=512, metadata={
        "help": "encoder input length; longer texts keep their most recent tokens"})

    # --- planners of prior work (defaults: each release's own values, docs/planners.md)
    policy_encoder: str = field(default="auto", metadata={
        "help": "ppdpp: the text encoder it fine-tunes (RoBERTa-large in the paper); 'auto' "
                "as --encoder"})
    ppdpp_sft: bool = field(default=True, metadata={
        "help": "ppdpp: fit the train split's strategy-labelled human turns before "
                "REINFORCE; false starts from the encoder alone, as PPDPP without its SFT "
                "checkpoint"})
    ppdpp_sft_epochs: int = field(default=10, metadata={"help": "ppdpp: supervised epochs"})
    ppdpp_sft_batch_size: int = field(default=2, metadata={
        "help": "ppdpp: supervised batch size (per GPU in PPDPP)"})
    ppdpp_sft_learning_rate: float = field(default=6e-6, metadata={
        "help": "ppdpp: supervised peak learning rate (AdamW, linear warmup then decay)"})
    ppdpp_sft_warmup_steps: int = field(default=400, metadata={
        "help": "ppdpp: supervised warmup steps"})
    ppdpp_sft_weight_decay: float = field(default=0.01, metadata={
        "help": "ppdpp: supervised weight decay (not on biases and LayerNorm weights)"})
    ppdpp_sft_max_grad_norm: float = field(default=1.0, metadata={
        "help": "ppdpp: supervised gradient clipping norm"})
    ppdpp_learning_rate: float = field(default=1e-6, metadata={
        "help": "ppdpp: REINFORCE learning rate (AdamW, no weight decay)"})
    ppdpp_gamma: float = field(default=0.999, metadata={
        "help": "ppdpp: discount of the REINFORCE returns"})
    ppdpp_max_length: int = field(default=512, metadata={
        "help": "ppdpp: input tokens; the newest turns are kept whole, older ones dropped"})
    ppdpp_dropout: float = field(default=0.5, metadata={
        "help": "ppdpp: dropout before the classifier (supervised stage)"})
    # GDP-Zero's and DPDP's MCTS (mcts.py); the defaults are GDP-Zero's (jasonyux/GDPZero
    # runners/gdpzero.py, lines 92, 230-232)
    mcts_simulations: int = field(default=20, metadata={
        "help": "MCTS simulations per turn (GDP-Zero's num_mcts_sims; DPDP's scripts: 10)"})
    mcts_realizations: int = field(default=3, metadata={
        "help": "simulated turns kept per tree node, open loop (GDP-Zero's max_realizations; "
                "DPDP's scripts: 1)"})
    mcts_q0: float = field(default=0.0, metadata={
        "help": "the value of an action not yet tried (GDP-Zero's Q_0; higher explores more)"})
    mcts_cpuct: float = field(default=1.0, metadata={
        "help": "weight of the prior's exploration term in PUCT (GDP-Zero's cpuct)"})
    mcts_parallel: int = field(default=1, metadata={
        "help": "simulations of a tree that share each round's LLM calls, pending ones "
                "counted as visits (virtual visits); 1: one after another, as GDP-Zero"})
    dpdp_threshold: float = field(default=0.5, metadata={
        "help": "dpdp: the fast policy acts when its two most probable actions are at least "
                "this far apart, the MCTS otherwise; in [0, 1]: 0 always the fast policy, 1 "
                "the MCTS unless the fast policy is certain; with --dpdp_percentile, the "
                "threshold while fewer than 2 gaps are known (DPDP's sub_value, "
                "ppdpp/run.py)"})
    dpdp_percentile: float = field(default=-1.0, metadata={
        "help": "dpdp: R in [0, 1]: the threshold of each test decision is the (100 R)-th "
                "percentile of the gaps of the evaluation's earlier decisions, and the fast "
                "policy acts when its gap is above it (DPDP's mcts_applied_ratio, "
                "ppdpp/agent.py); 0: threshold 0, 1: threshold 1 (always the MCTS), "
                "--dpdp_threshold while fewer than 2 gaps are known; -1: off, the fixed "
                "--dpdp_threshold"})


    # --- evaluation and logging
    eval_every: int = field(default=50, metadata={"help": "episodes between valid evaluations"})
    eval_cases: int = field(default=0, metadata={"help": "valid cases per evaluation (0: all)"})
    output_dir: str = field(default="runs", metadata={"help": "where runs are written"})
    exp_name: str = field(default="dialogxpert", metadata={"help": "run name prefix"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    debug: bool = field(default=False, metadata={
        "help": "show the traceback of a user error instead of one line"})

    def __post_init__(self):
        if self.data_name not in TASKS:
            raise ValueError(f"Unknown --data_name '{self.data_name}'. Expected one of "
                             f"{sorted(TASKS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown --backend '{self.backend}'. Expected one of "
                             f"{sorted(BACKENDS)}")
        choices = {"mode": ("train", "test"), "prior": ("logits", "sample", "list", "project"),
                   "policy": TRAINED_POLICIES + UNTRAINED_POLICIES,
                   "critic": ("sample", "logits"), "prior_order": ("rotate", "fixed"),
                   "critic_order": ("shuffle", "fixed"), "recipe": tuple(RECIPES),
                   "optimizer": ("adam", "adamw"), "loss_reduction": ("mean", "sum"),
                   "encoder_input": ("pair", "original"),
                   "dtype": ("auto", "bfloat16", "float16", "float32")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Unknown --{name} '{getattr(self, name)}'. Expected one of "
                                 f"{list(allowed)}")
        if self.resume and self.mode != "train":
            raise ValueError("--resume continues a training run; test a checkpoint with "
                             "--mode test --checkpoint PATH")
        if self.policy in UNTRAINED_POLICIES and self.mode != "test":
            raise ValueError(f"--policy {self.policy} has nothing to train: run it with "
                             "--mode test (no checkpoint needed)")
        if self.policy in UNTRAINED_POLICIES and self.checkpoint:
            raise ValueError(f"--policy {self.policy} uses no checkpoint: leave out "
                             f"--checkpoint, or use a trained policy {list(TRAINED_POLICIES)}")
        if self.mode == "test" and not self.checkpoint and self.policy in TRAINED_POLICIES:
            raise ValueError(f"--mode test --policy {self.policy} needs --checkpoint PATH (a "
                             "best.pt from its training run), or a policy that needs no "
                             f"training {list(UNTRAINED_POLICIES)}")
        if (self.policy in ("ppdpp", "dpdp") and self.mode == "train" and self.ppdpp_sft
                and TASKS[self.data_name].labelled_turns is None):
            raise ValueError(f"--ppdpp_sft true needs strategy-labelled human turns, and the "
                             f"data of '{self.data_name}' has none. Pass --ppdpp_sft false "
                             "(REINFORCE from scratch, as PPDPP without its SFT checkpoint)")
        if self.dpdp_percentile != -1.0 and self.policy != "dpdp":
            raise ValueError(f"--dpdp_percentile sets the threshold of --policy dpdp, and this "
                             f"run's policy is {self.policy}. Leave it out, or pass --policy "
                             "dpdp")
        if self.seeds and (self.resume or self.checkpoint):
            raise ValueError("--seeds starts new runs: leave out --resume and --checkpoint")
        if self.seeds and not re.fullmatch(r"\d+(,\d+)*", self.seeds):
            raise ValueError(f"--seeds '{self.seeds}' is not a list of seeds. Pass "
                             "integers separated by commas, e.g. --seeds 1,2,3")
        if self.seeds and len(set(self.seeds.split(","))) < len(self.seeds.split(",")):
            raise ValueError(f"--seeds '{self.seeds}' repeats a seed. Pass each seed once")
        for name in ("base_url",) + tuple(f"{role}_base_url" for role in ROLES):
            if getattr(self, name) and not re.match(r"https?://", getattr(self, name)):
                raise ValueError(f"--{name} '{getattr(self, name)}' is not an http:// or "
                                 "https:// address. Pass e.g. http://127.0.0.1:8080/v1")
        if self.backend == "openai" and not self.base_url and not all(
                getattr(self, f"{role}_base_url") for role in ROLES):
            raise ValueError("--backend openai needs --base_url http://HOST:PORT/v1 (or one "
                             "--<role>_base_url per role); `make serve` starts a local server")
        self._check_ranges()

    def _check_ranges(self):
        """Every numeric argument inside its meaningful range, before anything loads."""
        def require(ok, name, rule, why=""):
            if not ok:
                raise ValueError(f"--{name}={getattr(self, name)!r} is out of range{why}. "
                                 f"Pass a value {rule}")
        for name in ("top_k", "num_envs", "max_turn", "critic_samples", "total_episodes",
                     "checkpoint_every",
                     "batch_size", "learning_starts", "updates_per_step",
                     "hidden_size", "max_encoder_tokens", "eval_every", "prior_samples",
                     "system_max_new_tokens", "user_max_new_tokens", "critic_max_new_tokens",
                     "ppdpp_sft_epochs", "ppdpp_sft_batch_size"):
            require(getattr(self, name) >= 1, name, ">= 1")
        # numpy's generator takes seeds in [0, 2**32)
        require(0 <= self.seed < 2**32, "seed", "in [0, 4294967295]")
        if self.seeds and max(map(int, self.seeds.split(","))) >= 2**32:
            raise ValueError(f"--seeds '{self.seeds}' has a seed above 4294967295. Pass seeds "
                             "in [0, 4294967295]")
        require(self.ppdpp_max_length >= 8, "ppdpp_max_length", ">= 8 (tokens)")
        for name in ("ppdpp_sft_learning_rate", "ppdpp_learning_rate"):
            require(getattr(self, name) > 0, name, "> 0")
        for name in ("ppdpp_sft_warmup_steps", "ppdpp_sft_weight_decay",
                     "ppdpp_sft_max_grad_norm"):
            require(getattr(self, name) >= 0, name, ">= 0")
        require(0.0 <= self.ppdpp_dropout < 1.0, "ppdpp_dropout", "in [0, 1)")
        require(self.prior_max_new_tokens >= 0, "prior_max_new_tokens", ">= 0 (0: by --prior)")
        require(-1.0 <= self.prior_match_threshold <= 1.0, "prior_match_threshold",
                "in [-1, 1] (a cosine similarity)")
        require(self.max_concurrency >= 1, "max_concurrency", ">= 1")
        require(self.request_timeout > 0, "request_timeout", "> 0 (seconds)")
        require(self.max_retries >= 0, "max_retries", ">= 0")
        for name in ("max_cases", "eval_cases", "max_batch_rows", "buffer_size",
                     "update_every_episodes", "prior_rotations"):
            require(getattr(self, name) >= 0, name, ">= 0 (0: no limit)")
        longest_answer = max(self.system_max_new_tokens, self.user_max_new_tokens,
                             self.critic_max_new_tokens, self.prior_max_new_tokens)
        require(self.context_length == 0 or self.context_length > longest_answer,
                "context_length", f"above the longest answer ({longest_answer} tokens), "
                "or 0 (the model's own)")
        require(self.mcts_simulations >= 1, "mcts_simulations", ">= 1",
                ": the MCTS needs a simulation to choose an action")
        require(self.mcts_realizations >= 1, "mcts_realizations", ">= 1")
        require(self.mcts_parallel >= 1, "mcts_parallel", ">= 1 (1: one simulation after another)")
        require(self.mcts_cpuct >= 0, "mcts_cpuct", ">= 0")
        for name in ("gamma", "ppdpp_gamma", "epsilon_start", "epsilon_end",
                     "exploration_fraction", "dpdp_threshold"):
            require(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]")
        require(self.dpdp_percentile == -1.0 or 0.0 <= self.dpdp_percentile <= 1.0,
                "dpdp_percentile", "in [0, 1], or -1 (off: the fixed --dpdp_threshold)")
        require(0.0 < self.tau <= 1.0, "tau", "in (0, 1]")
        require(self.learning_rate > 0, "learning_rate", "> 0")
        for name in ("critic_temperature", "system_temperature", "user_temperature",
                     "eval_temperature"):
            require(getattr(self, name) >= 0, name, ">= 0 (0 decodes greedily)")
        require(self.prefix_cache_gb >= 0 or self.prefix_cache_gb == -1, "prefix_cache_gb",
                ">= 0 or -1 (automatic)")
        require(self.replay_ratio > 0, "replay_ratio", "> 0")
        require(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0: no clipping)")
        require(re.fullmatch(r"\d+,\d+,\d+|(\d*\.?\d+,){2}\d*\.?\d+", self.extes_split) is not None,
                "extes_split", "like 0.8,0.1,0.1 (fractions) or 10717,200,200 (counts)")
        if "." in self.extes_split:  # fractions: the test split takes the rest
            require(abs(sum(map(float, self.extes_split.split(","))) - 1) < 1e-6,
                    "extes_split", "whose fractions add up to 1, like 0.8,0.1,0.1")
        require(self.buffer_size == 0 or self.learning_starts <= self.buffer_size,
                "learning_starts",
                f"<= --buffer_size ({self.buffer_size})", ": learning would never start")
        require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None, "device",
                "among auto, cpu, mps, cuda, cuda:N")


def _parse_bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def recipe_args(recipe="project", **values):
    """Args with the recipe's values, then `values` (explicit flags) over them."""
    if recipe not in RECIPES:
        raise ValueError(f"Unknown --recipe '{recipe}'. Expected one of {list(RECIPES)}")
    return Args(**RECIPES[recipe] | values | {"recipe": recipe})


# The evaluation setup: every flag that changes which cases a test plays, how its turns are
# played or how they are judged. test_metrics.json records it ("config"), report.py pools
# only runs that agree on it, and a replay (--mode test --checkpoint) takes it from the
# checkpoint. The models are recorded resolved, as the config's "models" (resolve_models);
# the task's own data flags (Task.data_flags) only for the task that reads them. Left out,
# as they do not change what is evaluated: where and how fast it runs (device, num_envs,
# max_batch_rows, prefix_cache_gb, shared_prefix, max_concurrency, request_timeout,
# max_retries: at most the last bits of the arithmetic; except that with --policy dpdp
# --dpdp_percentile, num_envs sets which earlier gaps a decision sees: docs/planners.md);
# training (system_temperature and user_temperature, since a test decodes at
# eval_temperature, and every Q-learning and PPDPP flag: they make the policy under test,
# which its checkpoint holds); the output
# (output_dir, exp_name, progress, debug, checkpoint_every); and the task, policy and seed,
# which test_metrics.json records on their own.
EVALUATION_CONFIG = (
    "data_dir", "max_cases", "max_turn", "top_k", "use_emotion", "context_length",
    "backend", "dtype", "tokenizer", "max_encoder_tokens",
    "system_max_new_tokens", "user_max_new_tokens", "eval_temperature",
    "prior", "prior_samples", "prior_max_new_tokens", "prior_match_threshold", "prior_order",
    "prior_rotations",
    "critic", "critic_samples", "critic_temperature", "critic_max_new_tokens",
    "critic_stop_at_newline", "critic_order",
    "user_personas", "test_user_personas")  # a persona file by its path (personas.py)
# the flags that name the models and reach them; the config holds the models they resolve to
MODEL_FLAGS = ("llm", "planner_llm", "system_llm", "user_llm", "critic_llm", "encoder",
               "base_url", "planner_base_url", "system_base_url", "user_base_url",
               "critic_base_url", "api_key_env")


# the sections of --help, each flag in one
HELP_GROUPS = {
    "task and data": ("data_name", "data_dir", "max_cases", "extes_seed", "extes_split", "seed",
                      "user_personas", "test_user_personas"),
    "training": ("recipe", "total_episodes", "num_envs", "top_k", "max_turn", "use_emotion",
                 "encoder", "encoder_input", "max_encoder_tokens", "hidden_size", "gamma",
                 "tau", "learning_rate", "optimizer", "loss_reduction", "max_grad_norm",
                 "batch_size", "buffer_size", "learning_starts", "updates_per_step",
                 "update_every_episodes", "replay_ratio", "epsilon_start", "epsilon_end",
                 "exploration_fraction", "system_temperature", "user_temperature"),
    "LLMs and servers": (
        "backend", "llm", "planner_llm", "system_llm", "user_llm", "critic_llm", "device",
        "dtype", "base_url", "planner_base_url", "system_base_url", "user_base_url",
        "critic_base_url", "api_key_env", "tokenizer", "max_concurrency", "request_timeout",
        "max_retries", "prior", "prior_samples", "prior_max_new_tokens",
        "prior_match_threshold", "prior_order",
        "prior_rotations", "critic", "critic_samples", "critic_temperature", "critic_order",
        "critic_max_new_tokens", "critic_stop_at_newline", "system_max_new_tokens",
        "user_max_new_tokens", "max_batch_rows", "prefix_cache_gb", "context_length",
        "shared_prefix"),
    "evaluation": ("mode", "policy", "checkpoint", "seeds", "eval_every", "eval_cases",
                   "eval_temperature"),
    "planners of prior work": (
        "policy_encoder", "ppdpp_sft", "ppdpp_sft_epochs", "ppdpp_sft_batch_size",
        "ppdpp_sft_learning_rate", "ppdpp_sft_warmup_steps", "ppdpp_sft_weight_decay",
        "ppdpp_sft_max_grad_norm", "ppdpp_learning_rate", "ppdpp_gamma", "ppdpp_max_length",
        "ppdpp_dropout", "mcts_simulations", "mcts_realizations", "mcts_q0", "mcts_cpuct",
        "mcts_parallel", "dpdp_threshold", "dpdp_percentile"),
    "output": ("output_dir", "exp_name", "checkpoint_every", "resume", "progress", "debug"),
}


def build_parser(description=None, defaults=True):
    """defaults=False: flags not given stay out of the namespace (to find the given ones)."""
    parser = ArgumentParser(description=description)
    fields = {f.name: f for f in dataclasses.fields(Args)}
    grouped = [name for names in HELP_GROUPS.values() for name in names]
    if sorted(grouped) != sorted(fields):  # a new flag needs its section
        raise ValueError(f"HELP_GROUPS must name every Args field once: "
                         f"{sorted(set(fields) ^ set(grouped))}")
    for title, names in HELP_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = fields[name]
            kind = _parse_bool if f.type in (bool, "bool") else {"int": int, "float": float}.get(
                f.type if isinstance(f.type, str) else f.type.__name__, str)
            extra = {"nargs": "?", "const": True} if kind is _parse_bool else {}  # --debug
            group.add_argument(f"--{f.name}", type=kind, **extra,
                               default=f.default if defaults else argparse.SUPPRESS,
                               help=f"{f.metadata.get('help', '')} (default: {f.default})")
    return parser


def given_flags(argv=None, args=None):
    """The names of the flags given on the command line (argv; None: sys.argv), or, for
    Args built in code (args), those whose value differs from their recipe's."""
    if args is not None:
        defaults = recipe_args(args.recipe)
        return frozenset(name for name, value in vars(args).items()
                         if value != getattr(defaults, name))
    return frozenset(vars(build_parser(defaults=False).parse_args(argv)))


# the flags that only some policies read, by the start of their names: given to another
# policy they would change nothing
POLICY_FLAGS = {"policy_encoder": ("ppdpp", "dpdp"), "ppdpp_": ("ppdpp", "dpdp"),
                "mcts_": ("gdpzero", "dpdp"), "dpdp_": ("dpdp",)}


def unread_policy_flags(args, given):
    """The warning for flags given (`given`: their names) that only policies other than
    args.policy read, or None. A warning, not an error: one set of flags looped over
    several policies (make results, the docs' harness check) is a normal command line."""
    unread = {name: readers for name in sorted(given) for start, readers in POLICY_FLAGS.items()
              if name.startswith(start) and args.policy not in readers}
    if not unread:
        return None
    readers = sorted({policy for policies in unread.values() for policy in policies})
    return (f"warning: {', '.join('--' + name for name in unread)}: flag(s) of --policy "
            f"{' or '.join(readers)}, unused by --policy {args.policy}")


def read_args(argv=None):
    """The arguments of argv (None: sys.argv); a bad flag or value is a UserError.
    --recipe sets its values first; a flag given on the command line overrides them."""
    build_parser(__doc__).parse_args(argv)  # --help, and argparse's own errors
    given = vars(build_parser(__doc__, defaults=False).parse_args(argv))
    try:
        return recipe_args(**given)
    except ValueError as error:
        raise UserError(str(error)) from None


def parse_args(argv=None):
    """train_model.py's command line: read_args, with one warning line on stderr for flags
    of another policy (unread_policy_flags); or one line `error: ...` on stderr and exit
    code 2 (as argparse)."""
    try:
        args = read_args(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    warning = unread_policy_flags(args, given_flags(argv))
    if warning:
        print(warning, file=sys.stderr)
    return args
