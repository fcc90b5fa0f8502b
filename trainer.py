"""The training loop, the same for every policy that learns (policies.py): conversations
are played in batches of --num_envs, a finished one's place is taken by a new training case,
and the policy learns on its own schedule after each step (LearnStep). Every --eval_every
finished episodes the valid split is played greedily and the best policy so far is saved
(best.pt); the whole state is saved every --checkpoint_every episodes and on SIGINT or
SIGTERM, so that `train_model.py --resume RUN` continues it exactly."""

import os
import random
import time

import torch
from tqdm import tqdm

import run_state
from harness import (evaluate, judge_of, llm_usage, play_turn, policy_cost, split_personas,
                     summarize)
from llm import stream_seed
from personas import draw_persona
from policies import LearnStep
from q_adapter import linear_schedule
from run_files import BEST, LAST, write_history, write_results

# a policy with fewer gradient updates than this is reported as undertrained: Adam moves
# each weight by about the learning rate per update, so after a few minibatches the
# weights are still within a few learning rates of their random start (the Q-head's
# first layer starts within +-1/sqrt(width), 0.036 for bert-base), and a test measures
# the initialisation, not what was learned
MIN_UPDATES = 10


def train(args, policy, env, train_cases, valid_cases, run_dir, writer, resume=None):
    """Play and learn until --total_episodes conversations have finished; returns the path
    of the best checkpoint. `resume`: a state saved by a Trainer (run_state.py)."""
    trainer = Trainer(args, policy, env, train_cases, valid_cases, run_dir, writer, resume)
    with run_state.StopRequest() as stop:
        if resume is None:  # a resumed run has done it
            trainer.before_training()
        while trainer.loop["finished"] < args.total_episodes:
            trainer.refill()
            epsilon = linear_schedule(args.epsilon_start, args.epsilon_end,
                                      args.exploration_fraction * args.total_episodes,
                                      trainer.loop["finished"])
            results = trainer.play(epsilon)
            ended = trainer.end_finished(results)
            trainer.learn(len(results), ended, epsilon)
            trainer.evaluate_if_due()
            trainer.save_if_due(stop.requested)
        trainer.finish(stop.requested)
    return trainer.best_path


class Trainer:
    """The training loop's state (conversations in flight, the policy with what it keeps,
    the counters, the random generators) and its steps."""

    def __init__(self, args, policy, env, train_cases, valid_cases, run_dir, writer,
                 resume=None):
        self.args, self.policy, self.env, self.writer = args, policy, env, writer
        self.train_cases, self.valid_cases, self.run_dir = train_cases, valid_cases, run_dir
        self.rng = random.Random(args.seed)
        self.personas = split_personas(args, "train")
        self.generator = torch.Generator().manual_seed(args.seed)
        self.best_path = os.path.join(run_dir, BEST)
        self.loop = {"started": 0, "finished": 0, "steps": 0, "next_eval": args.eval_every,
                     "best_score": None, "order": list(range(len(train_cases))),
                     "history": [],  # one dict per step, update and evaluation
                     # wall time of the loop (validation included) and of the policy's
                     # learning in it, over every session of a resumed run
                     "training_seconds": 0.0, "update_seconds": 0.0}
        self.active, self.ended = [], []  # in flight (observations), ended (conversations)
        if resume is not None:
            self.restore(resume)
        self.clock = time.perf_counter()  # when training_seconds was last brought up to date
        self.bar = tqdm(total=args.total_episodes, initial=self.loop["finished"], desc="train",
                        disable=not args.progress)
        self.saved_at = self.loop["finished"]

    def restore(self, state):
        self.loop = state["loop"]
        self.policy.load_state_dict(state)
        active = run_state.restore_conversations(state["active"])
        self.active = [self.env.observation(c) for c in active]
        self.ended = run_state.restore_conversations(state["train_log"])
        self.env.restore_ledgers(state["ledgers"])
        run_state.restore_random_states(state["random"], self.rng, self.generator,
                                        self.env.llms())
        run_state.restore_llm_caches(state["llm_caches"], self.env.llms())
        finished = self.loop["finished"]
        if finished < self.args.total_episodes and os.path.exists(
                os.path.join(self.run_dir, run_state.TEST_FILES[0])):
            kept = run_state.set_aside_test(self.run_dir, finished)
            print(f"training goes on from {finished} to {self.args.total_episodes} episodes; "
                  f"the test after {finished} is kept as {', '.join(kept)}")

    def policy_cost(self):
        """The policy's trainable parameters and the loop's seconds so far."""
        now = time.perf_counter()
        self.loop["training_seconds"] += now - self.clock
        self.clock = now
        return policy_cost(self.policy, self.loop["training_seconds"],
                           self.loop["update_seconds"])

    def save_state(self, stopping=False):
        """The whole state. The in-process LLMs' prefix caches change the floats of later
        prompts: a state saved to stop holds them, and after any other save they are
        emptied, so that the run goes on as a run resumed from that save does."""
        self.policy_cost()  # the seconds so far go into the saved loop
        write_history(self.run_dir, self.loop["history"])
        active = [o.conversation for o in self.active]
        llms = self.env.llms()
        run_state.save_state(self.run_dir, {
            "args": vars(self.args), "loop": self.loop,
            "active": [run_state.conversation_to_dict(c) for c in active],
            "train_log": [run_state.conversation_to_dict(c) for c in self.ended],
            "ledgers": self.env.ledgers(),
            "random": run_state.random_states(self.rng, self.generator, llms),
            "llm_caches": run_state.llm_caches(llms) if stopping else {}}
            | self.policy.state_dict(active))
        if not stopping:
            run_state.clear_llm_caches(llms)

    def before_training(self):
        """The policy's own stage before the first episode (PPDPP's supervised one), in
        the history as kind "pretrain" and in TensorBoard's pretrain/<name>."""
        for entry in self.policy.before_training(self.train_cases, self.valid_cases):
            self.loop["history"].append({"kind": "pretrain"} | entry)
            for name, value in entry.items():
                if isinstance(value, (int, float)) and name != "epoch":
                    self.writer.add_scalar(f"pretrain/{name}", value, entry.get("epoch", 0))

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
            stream = stream_seed(args.seed, "train", loop["started"])
            new.append((self.train_cases[index], index, stream,
                        draw_persona(self.personas, stream)))
            loop["started"] += 1
        observations = self.env.reset(new)
        self.policy.start(observations)
        self.active += observations

    def play(self, epsilon):
        """One turn of every active conversation (the policy keeps what it learns from)."""
        results = play_turn(self.policy, self.env, self.active, self.rng, training=True,
                            epsilon=epsilon)
        self.loop["steps"] += 1
        self.loop["history"].append({"kind": "step", "step": self.loop["steps"],
                                     "epsilon": epsilon})
        self.writer.add_scalar("charts/epsilon", epsilon, self.loop["steps"])
        return results

    def end_finished(self, results):
        """Finished conversations go to the training log and leave the batch; returns
        them."""
        going_on, ended = [], []
        for observation, result in zip(self.active, results):
            conversation = observation.conversation
            if not result.done:
                going_on.append(result.observation)
                continue
            self.policy.end(conversation)
            ended.append(conversation)
            self.loop["finished"] += 1
            self.bar.update(1)
            self.ended.append(conversation)
            self.writer.add_scalar("charts/episodic_return", conversation.total_reward,
                                   self.loop["finished"])
            self.writer.add_scalar("charts/episode_success",
                                   float(conversation.outcome == "success"),
                                   self.loop["finished"])
        self.active = going_on
        return ended

    def learn(self, transitions, ended, epsilon):
        """The policy learns on its own schedule; the figures of its updates are logged
        (TensorBoard's losses/<name>, the history)."""
        args, finished = self.args, self.loop["finished"]
        # a block of --update_every_episodes is over: no conversation in flight, none
        # started beyond it (the next block starts after its update)
        block_done = not self.active and (finished % max(args.update_every_episodes, 1) == 0
                                          or finished == args.total_episodes)
        step = LearnStep(transitions, ended, block_done, self.generator)
        start = time.perf_counter()
        self.policy.learn(step)
        self.loop["update_seconds"] += time.perf_counter() - start
        steps = self.loop["steps"]
        for entry in step.history:
            for name, value in entry.items():
                if name != "step":
                    self.writer.add_scalar(f"losses/{name}", value, steps)
            self.loop["history"].append({"kind": "update", "step": entry["step"],
                                         "env_step": steps} | entry | {"epsilon": epsilon})

    def evaluate_if_due(self):
        """Every eval_every finished episodes (and at the end): the valid split, its
        figures logged, and best.pt when SR (then -AT) is the best so far."""
        args, loop, finished = self.args, self.loop, self.loop["finished"]
        if finished < loop["next_eval"] and finished < args.total_episodes:
            return
        # the next mark after the episodes finished so far: conversations that end in the
        # same step may pass several marks, and the same policy is not validated again
        loop["next_eval"] = (finished // args.eval_every + 1) * args.eval_every
        metrics, _ = evaluate(args, self.policy, self.env, self.valid_cases, "valid")
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
            self.policy.save(self.best_path, finished,
                             metrics | {"policy_cost": self.policy_cost()})

    def save_if_due(self, stop_requested):
        """The whole state every checkpoint_every finished episodes, and on a signal, after
        which the run stops."""
        finished = self.loop["finished"]
        if stop_requested or finished - self.saved_at >= self.args.checkpoint_every:
            self.save_state(stopping=bool(stop_requested))
            self.saved_at = finished
            if stop_requested:
                self.bar.close()
                raise run_state.TrainingStopped(self.run_dir, stop_requested)

    def finish(self, stop_requested):
        """The state, last.pt and the training conversations with their figures."""
        self.bar.close()
        self.save_state()  # a signal from here on stops the run after these files are whole
        cost = self.policy_cost()  # training ends here; the test that follows is not in it
        self.policy.save(os.path.join(self.run_dir, LAST), self.loop["finished"],
                         {"policy_cost": cost})
        train_metrics = summarize(self.ended, self.env.task, self.args.max_turn)
        train_metrics["judge"] = judge_of(self.env)
        train_metrics["updates"] = self.policy.updates
        train_metrics["policy_cost"] = cost
        train_metrics["llm_usage"] = llm_usage(self.env)
        write_results(self.run_dir, "train", train_metrics, self.ended)
        if stop_requested:
            raise run_state.TrainingStopped(self.run_dir, stop_requested)


def episodes_open(args, loop):
    """How many episodes may have started: all of them, or with --update_every_episodes N
    those of the current block of N (the next block starts after its update)."""
    every = args.update_every_episodes
    return loop["finished"] // every * every + every if every else args.total_episodes


def update_figures(policy):
    """A policy that learns: {"updates": gradient updates of the tested policy (the
    checkpoint's, None when its sidecar does not say), "undertrained": fewer than
    MIN_UPDATES}; {} for one that does not learn."""
    if not policy.trainable:
        return {}
    updates = policy.updates
    figures = {"updates": updates, "undertrained": None if updates is None
               else updates < MIN_UPDATES}
    if policy.args.policy in ("ppdpp", "dpdp") and policy.args.ppdpp_sft:
        figures["supervised_stage"] = True  # trained on the human turns before self-play
    return figures


def undertrained_warning(args, updates):
    """The line that ends a run whose tested policy is undertrained: the count, why, and
    what to change."""
    if args.policy in ("ppdpp", "dpdp") and args.ppdpp_sft:
        return (f"warning: the tested policy made {updates} self-play updates after its "
                f"supervised stage, fewer than {MIN_UPDATES} ({args.policy} updates once per "
                "finished training episode), so its test figures measure mostly the "
                "classifier trained on the human turns. Train with more --total_episodes")
    if args.policy == "dialogxpert":
        schedule = (f"the Q-head learns once the replay buffer holds --learning_starts "
                    f"{args.learning_starts} transitions")
        remedy = "more --total_episodes or a lower --learning_starts"
    else:  # PPDPP and DPDP update once per finished training episode
        schedule = f"{args.policy} updates once per finished training episode"
        remedy = "more --total_episodes"
    state = "untrained" if updates == 0 else "undertrained"
    return (f"warning: the tested policy is {state}: {updates} gradient updates in training, "
            f"fewer than {MIN_UPDATES} ({schedule}), so its test figures measure a policy "
            f"that has not learned. Train with {remedy}")
