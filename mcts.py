"""Planners of prior work that search with the LLMs (docs/planners.md):

    gdpzero  GDPZeroPolicy: open-loop MCTS at every turn, no training (Yu et al., EMNLP
             2023; jasonyux/GDPZero core/mcts.py OpenLoopMCTS)
    dpdp     DPDPPolicy: a fast policy acts when it is sure, the MCTS otherwise (He et al.,
             ACL 2024; cs-holder/DPDP)

    python train_model.py --data_name esc --mode test --policy gdpzero --mcts_simulations 20

The search of a turn plays simulated copies of the conversations (SelfPlayEnv.branch) in
the environment's own LLMs: the planner's prior over all of the task's actions is PUCT's
prior, the system and user LLMs play the simulated turns, and the critic's reward of a
simulated turn is its value. Every conversation of the batch searches at once, in lockstep:
each round of a simulation makes one system, one user, one critic and at most one planner
call for all the conversations' trees. Nothing simulated reaches the real conversations
or their records (which the run's unusable answers are counted from); the turn's record
keeps the tree (`search`).
"""

import math
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file

from errors import UserError
from llm import stream_seed
from metrics import UNUSABLE_KEYS
from policies import Policy, read_checkpoint, save_checkpoint


# the value a simulated success backs up, whatever the critic's reward of its turn: GDP-Zero's
# terminal value (core/mcts.py:203-207, get_dialog_ended's 1.0) and DPDP's (a leaf value
# above its success_base backs up 1.0, mcts/core/mcts.py:276)
SUCCESS_VALUE = 1.0


@dataclass
class Realization:
    """One simulated state of a node (open loop: a node is a sequence of actions, and the
    turns that realise it differ from one simulation to the next)."""
    conversation: object  # a copy made by SelfPlayEnv.branch (the root: the real one)
    value: float = 0.0  # the turn that led here: SUCCESS_VALUE, or the critic's reward
    terminal: bool = False  # success or the turn limit: nothing to search beyond


@dataclass
class Node:
    prior: list | None = None  # P(s, .) over all actions; None until expanded
    order: list | None = None  # action indices, most probable first: PUCT's tie order
    visits: list | None = None  # N(s, a)
    pending: list | None = None  # descents of this round through (s, a): virtual visits
    values: list | None = None  # Q(s, a), q0 until tried
    total: int = 0  # N(s)
    realizations: list = field(default_factory=list)


@dataclass
class Descent:
    """One simulation of one conversation's tree, from the root to the value it backs up."""
    tree: "Tree"
    simulation: int = 0  # its index among the turn's simulations: the draws' stream
    path: tuple = ()  # the node reached
    edges: list = field(default_factory=list)  # (node path, action) taken
    source: Realization | None = None  # the state a new turn is simulated from
    action: int | None = None  # the action of the turn to simulate
    value: float | None = None  # set once the descent has ended


class Tree:
    """The open-loop search tree of one real conversation's turn."""

    def __init__(self, policy, conversation, prior, order, simulation_seed):
        self.policy = policy
        self.seed = simulation_seed  # the real conversation's stream at this turn
        self.nodes = {(): Node(realizations=[Realization(conversation)])}
        self.expand((), prior, order)
        self.branches = []  # every copy made, to forget their cached prompts
        # the unusable answers of its LLM calls, by record key (metrics.UNUSABLE_FIGURES):
        # the system's, user's and critic's in its simulated turns, the planner's for its
        # nodes' priors (the root's included: the observation's draws, asked again)
        self.errors = Counter()
        self.rounds = 0  # rounds of simulated turns (LLM calls) that involved this tree
        self.turns = 0  # simulated turns played (a round plays up to --mcts_parallel)

    def expand(self, path, prior, order):
        node = self.nodes[path]
        n = len(prior)
        node.prior, node.order = prior, order
        node.visits, node.values = [0] * n, [self.policy.q0] * n
        node.pending = [0] * n

    def count_planner(self, unusable):
        if unusable:
            self.errors["planner_invalid"] += unusable

    def select(self, path):
        """PUCT (GDP-Zero's variant: sqrt(N(s)), N(s) = 0 counted as 1e-8, ties to the more
        probable action). Descents of the same round still under way count as visits in
        the exploration term (none when simulations run one after another)."""
        node = self.nodes[path]
        sqrt_total = math.sqrt((node.total + sum(node.pending)) or 1e-8)
        return max(node.order, key=lambda a: node.values[a] + self.policy.cpuct * node.prior[a]
                   * sqrt_total / (1 + node.visits[a] + node.pending[a]))

    def draw(self, simulation, path, what):
        return random.Random(stream_seed(self.seed, "mcts", simulation, path, what))

    def backup(self, descent):
        """The leaf's value, unchanged, to every edge of the path (one player, no
        discount: GDP-Zero's backup), which stops counting the descent as pending."""
        for path, action in descent.edges:
            node = self.nodes[path]
            node.pending[action] -= 1
            node.values[action] = ((node.visits[action] * node.values[action] + descent.value)
                                   / (node.visits[action] + 1))
            node.visits[action] += 1
            node.total += 1

    def best_action(self):
        """The most visited action of the root (ties to the more probable)."""
        root = self.nodes[()]
        return max(root.order, key=lambda a: root.visits[a])

    def note(self, names, path=()):
        """The visited part of the tree: per action its prior, visits and mean value."""
        node = self.nodes.get(path)
        if node is None or node.visits is None:
            return []
        children = []
        for a in sorted(node.order, key=lambda a: -node.visits[a]):
            if node.visits[a]:
                children.append({"action": names[a], "prior": round(node.prior[a], 4),
                                 "visits": node.visits[a], "value": round(node.values[a], 4),
                                 "children": self.note(names, path + (a,))})
        return children


class GDPZeroPolicy(Policy):
    """GDP-Zero: open-loop MCTS over all of the task's actions at every turn, no training."""

    name = "gdpzero"
    # the search asks the planner for its root's prior itself (a copy's call, its planner
    # cost); the observation's prior, asked again for every policy, only breaks exact ties
    reads_prior = False

    def __init__(self, args, task, models=None):
        super().__init__(args, task, models)
        self.simulations = args.mcts_simulations
        self.realizations = args.mcts_realizations
        self.q0 = args.mcts_q0
        self.cpuct = args.mcts_cpuct
        self.parallel = args.mcts_parallel
        self.env = None

    def attach(self, env):
        self.env = env

    def act(self, observations, rng, training, epsilon=0.0):
        trees = self.search(observations, evaluation=not training)
        actions, notes = [], []
        for observation, tree in zip(observations, trees):
            actions.append(self.task.action_names[tree.best_action()])
            notes.append({"candidates": self.candidate_note(observation), "explored": False,
                          "policy": self.name, "search": self.search_note(tree)})
        return actions, notes

    def search_note(self, tree):
        return {"simulations": self.simulations, "rounds": tree.rounds,
                "simulated_turns": tree.turns, "errors": dict(tree.errors),
                "tree": tree.note(self.task.action_names)}

    # -- the search ----------------------------------------------------------------------

    def search(self, observations, evaluation, prior=None):
        """One tree per observed conversation, searched together; returns the trees.
        prior(copies) -> ([batch, actions] tensor, unusable answers per copy): PUCT's prior
        of the nodes (default: the planner's, env.simulated_prior)."""
        if self.env is None:
            raise RuntimeError("the MCTS plays in the environment: call attach(env) first")
        env = self.env
        self.prior = prior or env.simulated_prior
        conversations = [o.conversation for o in observations]
        # the root's prior over all actions: the planner asked again on a copy with the
        # conversation's own stream, so it is the observation's prior (and its prompt is
        # cached; under --prior list, the one-option question instead of the observation's
        # list); PUCT breaks ties in the observation's candidate order, which ranks by the
        # planner's prior: another prior (DPDP's fast policy) breaks them by its own
        planner_prior = prior is None
        copies = [env.branch(c) for c in conversations]
        priors, invalid = self.prior(copies)
        trees = []
        for observation, conversation, root_prior in zip(observations, conversations,
                                                         priors.tolist()):
            order = self.action_order(root_prior,
                                      observation.candidates if planner_prior else ())
            trees.append(Tree(self, conversation, root_prior, order,
                              stream_seed(conversation.stream, conversation.system_turns)))
        for tree, copy, unusable in zip(trees, copies, invalid):
            tree.branches.append(copy)
            tree.count_planner(unusable)
        for first in range(0, self.simulations, self.parallel):
            self.simulate(trees, range(first, min(first + self.parallel, self.simulations)),
                          evaluation)
        env.forget([copy for tree in trees for copy in tree.branches])
        return trees

    def action_order(self, prior, first=()):
        """Action indices by decreasing prior; `first` (action names) leads in its order."""
        index = {name: i for i, name in enumerate(self.task.action_names)}
        leading = [index[name] for name in first]
        return leading + sorted((a for a in range(len(prior)) if a not in leading),
                                key=lambda a: -prior[a])

    def simulate(self, trees, simulations, evaluation):
        """The given simulations of every tree (one, or --mcts_parallel of them): descend by
        PUCT; where a turn must be simulated, the descents of all trees that need one share
        the round's LLM calls."""
        descents = [Descent(tree, simulation) for tree in trees for simulation in simulations]
        going = descents
        while going:
            for descent in going:
                self.descend(descent)
            playing = [d for d in going if d.value is None]
            if not playing:
                break
            for tree in {id(d.tree): d.tree for d in playing}.values():
                tree.rounds += 1
            self.play(playing, evaluation)
            going = [d for d in playing if d.value is None]
        for descent in descents:
            descent.tree.backup(descent)

    def descend(self, descent):
        """Select actions down the tree until a turn must be simulated (descent.source and
        descent.action set) or a stored terminal state ends the descent (its value)."""
        tree, simulation = descent.tree, descent.simulation
        while True:
            node = tree.nodes[descent.path]
            action = tree.select(descent.path)
            descent.edges.append((descent.path, action))
            node.pending[action] += 1
            child_path = descent.path + (action,)
            child = tree.nodes.get(child_path)
            if child is None or len(child.realizations) < self.realizations:
                # a new realization, simulated from one of this node's states
                states = [r for r in node.realizations if not r.terminal]
                draw = tree.draw(simulation, descent.path, "source")
                descent.source, descent.action = draw.choice(states), action
                return
            reached = tree.draw(simulation, child_path, "realization").choice(
                child.realizations)
            if reached.terminal:
                descent.value = reached.value
                return
            descent.path = child_path

    def play(self, descents, evaluation):
        """Simulate the pending turn of every descent (one system, user and critic call),
        then expand the new nodes (one planner call)."""
        env, names = self.env, self.task.action_names
        copies = []
        for descent in descents:
            child_path = descent.path + (descent.action,)
            copy = env.branch(descent.source.conversation,
                              stream=stream_seed(descent.tree.seed, "mcts", descent.simulation,
                                                 child_path))
            descent.tree.branches.append(copy)
            copies.append(copy)
        verdicts = env.simulate(copies, [names[d.action] for d in descents], evaluation)
        expanding = []
        for descent, copy, verdict in zip(descents, copies, verdicts):
            tree, child_path = descent.tree, descent.path + (descent.action,)
            tree.turns += 1
            tree.errors.update({key: copy.records[-1][key] for key in UNUSABLE_KEYS
                                if copy.records[-1].get(key)})
            # a success is worth SUCCESS_VALUE, other turns the critic's reward
            reached = Realization(copy, SUCCESS_VALUE if verdict.success else verdict.reward,
                                  copy.done)
            child = tree.nodes.setdefault(child_path, Node())
            child.realizations.append(reached)
            descent.path = child_path
            if reached.terminal:
                descent.value = reached.value
            elif child.prior is None:
                descent.value = reached.value  # a new leaf: its value, and its prior below
                if not any(d.tree is tree and d.path == child_path for d, _ in expanding):
                    expanding.append((descent, copy))  # (parallel descents: once per node)
            # else: an expanded node with a new state: the descent goes on from it
        if expanding:
            priors, invalid = self.prior([copy for _, copy in expanding])
            for (descent, _), prior, unusable in zip(expanding, priors.tolist(), invalid):
                descent.tree.expand(descent.path, prior, self.action_order(prior))
                descent.tree.count_planner(unusable)


# -- DPDP ------------------------------------------------------------------------------------

# DPDP's self-play update (ppdpp/agent.py optimize_model; flags of ppdpp/run.py): actor loss
# plus this weight times the critic's (--critic_loss_w 1.0), gradients clipped to this norm
# (--max_grad_norm 1.0)
CRITIC_LOSS_WEIGHT = 1.0
MAX_GRAD_NORM = 1.0


class QHead(torch.nn.Module):
    """DPDP's critic (ppdpp/qnet.py Qnet): dropout, linear, ReLU, dropout, linear: one
    value per action, from the fast policy's pooled encoding."""

    def __init__(self, dropout, width, num_actions):
        super().__init__()
        self.dropout = torch.nn.Dropout(dropout)
        self.fc1 = torch.nn.Linear(width, width)
        self.fc2 = torch.nn.Linear(width, num_actions)

    def forward(self, features):
        return self.fc2(self.dropout(torch.relu(self.fc1(self.dropout(features)))))


class GapThreshold:
    """When DPDP's fast policy acts in testing, from the gap between its two most probable
    actions. Fixed (--dpdp_percentile -1): the gap is at least --dpdp_threshold. With
    --dpdp_percentile R, DPDP's running percentile (ppdpp/agent.py select_action): the gap
    is above (strict, as DPDP's) the (100 R)-th percentile of the gaps of the earlier
    decisions of the evaluation (numpy's linear interpolation), --dpdp_threshold while
    fewer than 2 are known; R = 0 is threshold 0 and R = 1 threshold 1, whatever is known.
    The conversations of one batch decide on the gaps of earlier batches only; then the
    batch's gaps join them in the batch's order. start() clears them (a new evaluation)."""

    def __init__(self, fixed, percentile):
        self.fixed = fixed
        self.percentile = None if percentile == -1.0 else percentile
        self.gaps = []  # the evaluation's gaps so far, in the order they were decided

    def start(self):
        self.gaps = []

    def current(self):
        """The threshold of the next batch's decisions."""
        if self.percentile is None:
            return self.fixed
        if self.percentile in (0.0, 1.0):  # as DPDP: its extremes need no gaps
            return self.percentile
        if len(self.gaps) < 2:
            return self.fixed
        return float(np.percentile(self.gaps, 100 * self.percentile))

    def decide(self, gaps):
        """(for each gap of one batch, whether the fast policy acts; the threshold used)."""
        threshold = self.current()
        if self.percentile is None:
            return [gap >= threshold for gap in gaps], threshold
        self.gaps.extend(gaps)
        return [gap > threshold for gap in gaps], threshold


class DPDPPolicy(Policy):
    """DPDP: System 1 is PPDPP's classifier (ppdpp.PPDPPPolicy, with its input and its
    supervised stage); in testing it acts when its two most probable actions are far enough
    apart (GapThreshold: at least --dpdp_threshold, or above a running percentile of the
    gaps with --dpdp_percentile), and System 2, the MCTS, acts otherwise. In training every turn
    is the MCTS's (its prior: the fast policy), and after each episode the fast policy
    learns the MCTS's actions by actor-critic with a Q-head (DPDP's optimize_model)."""

    name = "dpdp"
    trainable = True
    weight_flags = ("policy_encoder",)  # the fast policy is PPDPP's
    reads_prior = False  # the fast policy, or the search's own root prior (GDPZeroPolicy)

    def __init__(self, args, task, models=None):
        super().__init__(args, task, models)
        from ppdpp import RL_ADAM_EPS, PPDPPPolicy

        self.fast = PPDPPPolicy(args, task)
        self.mcts = GDPZeroPolicy(args, task)
        self.threshold = GapThreshold(args.dpdp_threshold, args.dpdp_percentile)
        net = self.fast.net
        self.q_head = QHead(args.ppdpp_dropout, net.classifier.in_features,
                            len(task.action_names)).to(self.fast.device)
        # the classifier's input is DPDP's state encoding (the pooled output after
        # dropout), which its Q-head reads too: kept from the same forward pass
        self.features = None
        net.classifier.register_forward_hook(self._keep_features)
        # one optimizer over both heads and the encoder, as DPDP's (transformers' AdamW
        # at its defaults)
        self.optimizer = torch.optim.AdamW(
            list(net.parameters()) + list(self.q_head.parameters()),
            lr=args.ppdpp_learning_rate, eps=RL_ADAM_EPS, weight_decay=0.0)
        self.updates = 0

    def _keep_features(self, module, inputs, output):
        self.features = inputs[0]

    def attach(self, env):
        self.mcts.attach(env)

    def start_evaluation(self):
        self.threshold.start()

    def fast_prior(self, copies):
        """The fast policy's distribution as PUCT's prior (DPDP's --use_policy_prior)."""
        return self.fast.probabilities(self.fast.inputs([c.turns for c in copies])), \
            [0] * len(copies)

    def act(self, observations, rng, training, epsilon=0.0):
        probs = self.fast.probabilities(self.fast.inputs([o.conversation.turns
                                                          for o in observations]))
        top = probs.topk(2, dim=-1).values
        gaps = (top[:, 0] - top[:, 1]).tolist()
        # testing: System 1 when sure; training: always the MCTS (DPDP's select_action)
        fast, threshold = ([False] * len(gaps), None) if training else self.threshold.decide(gaps)
        searched = [o for o, f in zip(observations, fast) if not f]
        trees = iter(self.mcts.search(searched, evaluation=not training,
                                      prior=self.fast_prior if training else None)
                     if searched else [])
        names = self.task.action_names
        actions, notes = [], []
        for observation, row, gap, by_fast in zip(observations, probs, gaps, fast):
            note = {"candidates": self.candidate_note(
                        observation, policy_prob=[row[names.index(a)]
                                                  for a in observation.candidates]),
                    "explored": False, "policy": self.name,
                    "dpdp": "fast" if by_fast else "mcts", "fast_gap": round(gap, 4)}
            if threshold is not None:
                note["dpdp_threshold_used"] = round(threshold, 4)
            if by_fast:
                actions.append(names[int(row.argmax())])
            else:
                tree = next(trees)
                actions.append(names[tree.best_action()])
                note["search"] = self.mcts.search_note(tree)
            notes.append(note)
        return actions, notes

    # -- self-play: the fast policy learns the MCTS's actions -----------------------------

    def learn(self, step):
        for conversation in step.ended:
            actor, critic = self.update(conversation)
            step.history.append({"step": self.updates, "actor_loss": actor,
                                 "critic_loss": critic,
                                 "episode_return": conversation.total_reward})

    def update(self, conversation):
        """DPDP's optimize_model on one episode: G_t the discounted returns (not
        normalised), the critic fits Q(s_t, a_t) to G_t, the actor's loss is
        -log pi(a_t | s_t) (G_t - Q(s_t, a_t)), a_t the action played (the MCTS's)."""
        from ppdpp import discounted_returns

        records = conversation.records
        ends = [len(conversation.turns) - 2 * (len(records) - t) for t in range(len(records))]
        states = self.fast.inputs([conversation.turns[:end] for end in ends])
        actions = torch.tensor([self.task.action_names.index(r["action"]) for r in records],
                               device=self.fast.device)
        returns = torch.tensor(discounted_returns([r["reward"] for r in records],
                                                  self.args.ppdpp_gamma),
                               dtype=torch.float32, device=self.fast.device)
        # without dropout, as ppdpp.PPDPPPolicy.reinforce: the log-probabilities are the
        # acting policy's, and a resumed run repeats the update exactly
        self.fast.net.eval()
        self.q_head.eval()
        log_probs = self.fast.logits(states).float().log_softmax(-1)
        values = self.q_head(self.features).float().gather(1, actions[:, None]).squeeze(1)
        critic_loss = torch.nn.functional.mse_loss(values, returns)
        chosen = log_probs.gather(1, actions[:, None]).squeeze(1)
        actor_loss = (-chosen * (returns - values).detach()).mean()
        self.optimizer.zero_grad()
        (actor_loss + CRITIC_LOSS_WEIGHT * critic_loss).backward()
        torch.nn.utils.clip_grad_norm_(list(self.fast.net.parameters())
                                       + list(self.q_head.parameters()), MAX_GRAD_NORM)
        self.optimizer.step()
        self.updates += 1
        return actor_loss.item(), critic_loss.item()

    # -- the fast policy's own stage, checks and saving -----------------------------------

    def before_training(self, train_cases, valid_cases):
        """PPDPP's supervised stage on the labelled human turns (DPDP's offline stage
        also fits its Q-head to annotated returns, which this data has not)."""
        return self.fast.before_training(train_cases, valid_cases)

    @staticmethod
    def check_run(args, task, splits):
        from ppdpp import PPDPPPolicy

        PPDPPPolicy.check_run(args, task, splits)

    def trainable_parameters(self):
        return self.fast.trainable_parameters() + sum(p.numel()
                                                      for p in self.q_head.parameters())

    def state_dict(self, active):
        return {"dpdp": {"net": self.fast.net.state_dict(), "q_head": self.q_head.state_dict(),
                         "optimizer": self.optimizer.state_dict(), "updates": self.updates}}

    def load_state_dict(self, state):
        saved = state["dpdp"]
        self.fast.net.load_state_dict(saved["net"])
        self.q_head.load_state_dict(saved["q_head"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.updates = saved["updates"]

    def save(self, path, step, metrics=None):
        tensors = {f"net.{k}": v for k, v in self.fast.net.state_dict().items()}
        tensors |= {f"q_head.{k}": v for k, v in self.q_head.state_dict().items()}
        save_checkpoint(path, tensors, {"step": step, "updates": self.updates,
                                        "metrics": metrics, "policy": self.name,
                                        "actions": self.task.action_names,
                                        "args": vars(self.args), "models": self.models})

    def load(self, path, optimizer=False):
        info = self.fast.load(path)
        tensors = load_file(path, device=str(self.fast.device))
        self.q_head.load_state_dict({k[len("q_head."):]: v for k, v in tensors.items()
                                     if k.startswith("q_head.")})
        self.updates = self.fast.updates  # the sidecar's, which both save
        return info

    @staticmethod
    def check_checkpoint(path, args, models):
        """A PPDPP classifier (ppdpp.PPDPPPolicy.check_checkpoint) with DPDP's Q-head."""
        from ppdpp import PPDPPPolicy

        PPDPPPolicy.check_checkpoint(path, args, models)
        if "q_head.fc1.weight" not in read_checkpoint(path)[1]:
            raise UserError(f"the checkpoint {path} has no DPDP Q-head. Pass the best.pt of "
                            "a --policy dpdp training run")
