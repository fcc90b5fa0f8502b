"""PPDPP (Deng et al., ICLR 2024; the release dengyang17/PPDPP) as `--policy ppdpp`: a
text encoder that is fine-tuned whole, with a classifier over ALL of the task's actions
(not only the planner's top-k). docs/planners.md lists its values with their source.

    python train_model.py --data_name esc --policy ppdpp                    # SFT, then RL
    python train_model.py --data_name esc --policy ppdpp --ppdpp_sft false  # RL from scratch

Stage 1 (sft.py), once before the first episode of a new run: cross-entropy on the train
split's human system turns that carry a strategy label (tasks.Task.labelled_turns), the
epoch with the best macro precision on the valid split's labelled turns kept. Stage 2
(run.py, agent.optimize_model): REINFORCE after every finished episode on the critic's
turn rewards: discounted returns, normalised within the episode, loss -sum(log pi * G).
Training samples from the policy, testing takes its argmax.

The input (agent.build_input): each turn is tokenized alone as "Role: text"; walking back
from the newest turn, whole turns are kept while they fit in --ppdpp_max_length, in
conversation order after one classification token. The policy sees the turns only: the
case's emotion and problem type go to the user and critic prompts, as in PPDPP.
"""

import json
import math
import os
import random

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from errors import UserError
from llm import pick_device
from policies import Policy, check_saved_args, read_checkpoint, save_checkpoint
from q_adapter import resolve_encoder_path
from tasks import labelled_examples

# PPDPP's REINFORCE optimizer is transformers' AdamW at its defaults (agent.py:27): no
# weight decay and eps 1e-6; its normalisation adds float32's eps (agent.py:30)
RL_ADAM_EPS = 1e-6
NORMALISE_EPS = float(np.finfo(np.float32).eps)
SFT_ADAM_EPS = 1e-8  # sft.py:254
CHUNK = 32  # conversations per forward pass when acting


def policy_input(tokenizer, turns, max_length):
    """Token ids of the turns as PPDPP's agent.build_input: the newest turns that fit whole
    in max_length (the first older turn that does not fit ends the walk), in conversation
    order, each with its separator, after one classification token."""
    ids = []
    for role, text in reversed(turns):
        encoded = tokenizer.encode(f"{role}: {text}", verbose=False)
        if len(ids) + len(encoded) > max_length:
            break
        ids = encoded[1:] + ids
    return [tokenizer.cls_token_id] + ids


def discounted_returns(rewards, gamma):
    """G_t = r_t + gamma * G_{t+1}, from the episode's end."""
    returns, running = [], 0.0
    for reward in reversed(rewards):
        running = reward + gamma * running
        returns.append(running)
    return returns[::-1]


def normalised_returns(rewards, gamma):
    """The returns, standardised within the episode when it has more than one turn (as
    agent.optimize_model: float32, unbiased std)."""
    returns = torch.tensor(discounted_returns(rewards, gamma), dtype=torch.float32)
    if len(returns) > 1:
        returns = (returns - returns.mean()) / (returns.std() + NORMALISE_EPS)
    return returns


def macro_scores(targets, predictions):
    """(precision, recall, F1), each the mean over the classes that occur in either, a
    class never predicted scoring 0 (sklearn's average='macro', zero_division=0)."""
    classes = sorted(set(targets) | set(predictions))
    scores = []
    for c in classes:
        hits = sum(t == p == c for t, p in zip(targets, predictions))
        predicted, actual = predictions.count(c), targets.count(c)
        precision = hits / predicted if predicted else 0.0
        recall = hits / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        scores.append((precision, recall, f1))
    return tuple(sum(s[i] for s in scores) / max(len(scores), 1) for i in range(3))


def warmup_linear(step, warmup, total):
    """pytorch_transformers' WarmupLinearSchedule factor at `step`."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1.0, total - warmup))


class PPDPPNet(nn.Module):
    """The encoder's pooled output, dropout, a linear layer over the actions (agent.PPDPP)."""

    def __init__(self, encoder, num_actions, dropout):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_actions)

    def forward(self, input_ids, attention_mask):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        pooled = (out.pooler_output if out.pooler_output is not None
                  else out.last_hidden_state[:, 0])
        return self.classifier(self.dropout(pooled))


class PPDPPPolicy(Policy):
    """PPDPP: its own trainable encoder (--policy_encoder) and classifier over all actions."""

    name = "ppdpp"
    trainable = True
    uses_encoder = False  # it fine-tunes an encoder of its own, not the frozen one
    weight_flags = ("policy_encoder",)
    reads_prior = False  # its classifier scores every action itself

    def __init__(self, args, task, models=None):
        super().__init__(args, task, models)
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder_path(args.policy_encoder)
        self.device = pick_device(args.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.max_length = min(args.ppdpp_max_length, self.tokenizer.model_max_length,
                              encoder.config.max_position_embeddings)
        self.net = PPDPPNet(encoder, len(task.action_names), args.ppdpp_dropout).to(self.device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=args.ppdpp_learning_rate,
                                           eps=RL_ADAM_EPS, weight_decay=0.0)
        self.updates = 0

    # -- the network -----------------------------------------------------------------------

    def inputs(self, turn_lists):
        return [policy_input(self.tokenizer, turns, self.max_length) for turns in turn_lists]

    def logits(self, inputs):
        """[len(inputs), actions] logits of token id lists (padded on the right)."""
        ids = torch.full((len(inputs), max(map(len, inputs))), self.tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(inputs):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return self.net(ids.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def probabilities(self, inputs):
        """[len(inputs), actions] on the CPU, without dropout."""
        self.net.eval()
        return torch.cat([self.logits(inputs[i:i + CHUNK]).float().softmax(-1).cpu()
                          for i in range(0, len(inputs), CHUNK)])

    def trainable_parameters(self):
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    # -- acting ----------------------------------------------------------------------------

    def act(self, observations, rng, training, epsilon=0.0):
        """Training: a draw from the policy (from the conversation's own stream, so paired
        and resumable); testing: its argmax. epsilon is not used: PPDPP explores by
        sampling."""
        if not observations:
            return [], []
        probs = self.probabilities(self.inputs([o.conversation.turns for o in observations]))
        names = self.task.action_names
        actions, notes = [], []
        for observation, row in zip(observations, probs):
            best = int(row.argmax())
            index = best
            if training:
                draw = random.Random(observation.conversation.seed("policy")).random()
                cumulative = row.double().cumsum(0)
                index = min(int((cumulative <= draw).sum()), len(names) - 1)
            actions.append(names[index])
            notes.append({"candidates": self.candidate_note(
                              observation, policy_prob=[row[names.index(a)]
                                                        for a in observation.candidates]),
                          "explored": index != best, "policy": self.name,
                          "action_prob": round(float(row[index]), 4),
                          "in_top_k": names[index] in observation.candidates})
        return actions, notes

    # -- stage 2: REINFORCE ----------------------------------------------------------------

    def learn(self, step):
        """One update per finished episode, in the order they ended (as run.py)."""
        for conversation in step.ended:
            loss = self.reinforce(conversation)
            step.history.append({"step": self.updates, "pg_loss": loss,
                                 "episode_return": conversation.total_reward,
                                 "turns": len(conversation.records)})

    def reinforce(self, conversation):
        """-sum_t log pi(a_t | s_t) * G_t over the episode, G normalised. Each turn's state
        is rebuilt from the conversation (a turn adds a system and a user turn), so the
        log-probabilities are those of the acting policy, without dropout."""
        records = conversation.records
        if len(conversation.turns) < 2 * len(records):
            raise RuntimeError(f"conversation {conversation.uid} has {len(conversation.turns)} "
                               f"turns for {len(records)} system turns")
        ends = [len(conversation.turns) - 2 * (len(records) - t) for t in range(len(records))]
        states = self.inputs([conversation.turns[:end] for end in ends])
        actions = torch.tensor([self.task.action_names.index(r["action"]) for r in records],
                               device=self.device)
        returns = normalised_returns([r["reward"] for r in records], self.args.ppdpp_gamma)
        self.net.eval()
        log_probs = self.logits(states).float().log_softmax(-1)
        chosen = log_probs.gather(1, actions[:, None]).squeeze(1)
        loss = -(chosen * returns.to(self.device)).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        return loss.item()

    # -- stage 1: supervised ---------------------------------------------------------------

    @staticmethod
    def check_run(args, task, splits):
        """A supervised stage has labelled turns to learn from (harness.check_weights
        checks the encoder)."""
        if args.mode != "train" or not args.ppdpp_sft:
            return
        examples, counts = labelled_examples(task, splits["train"])
        if not examples:
            raise UserError(
                f"--ppdpp_sft true: the train split of '{task.name}' in {args.data_dir} has "
                f"no system turn whose strategy label names an action ({counts['system_turns']}"
                f" system turns, {counts['unlabelled_turns']} unlabelled, labels that name no "
                f"action: {counts['unmapped_labels'] or 'none'}). Pass --ppdpp_sft false "
                "(REINFORCE from scratch, as PPDPP without its SFT checkpoint)")

    def before_training(self, train_cases, valid_cases):
        """sft.py: AdamW with weight decay (not on biases and LayerNorm weights), linear
        warmup then decay, clipping, dropout on; after each epoch the valid split's
        labelled turns are scored and the epoch with the best macro precision is kept (as
        sft.py:132, which compares precision). Returns one history entry per epoch and a
        summary."""
        args = self.args
        if not args.ppdpp_sft:
            return []
        examples, counts = labelled_examples(self.task, train_cases)
        if not examples:  # check_run refuses such a run before the models load
            raise UserError(f"no labelled system turns in the train split of "
                            f"'{self.task.name}'. Pass --ppdpp_sft false")
        train = list(zip(self.inputs([t for t, _ in examples]), [a for _, a in examples]))
        valid_examples, valid_counts = labelled_examples(self.task, valid_cases)
        valid = list(zip(self.inputs([t for t, _ in valid_examples]),
                         [a for _, a in valid_examples]))
        no_decay = ("bias", "LayerNorm.weight")
        named = list(self.net.named_parameters())
        optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if not any(k in n for k in no_decay)],
              "weight_decay": args.ppdpp_sft_weight_decay},
             {"params": [p for n, p in named if any(k in n for k in no_decay)],
              "weight_decay": 0.0}], lr=args.ppdpp_sft_learning_rate, eps=SFT_ADAM_EPS)
        generator = torch.Generator().manual_seed(args.seed)
        batches = math.ceil(len(train) / args.ppdpp_sft_batch_size)
        total, step, history = batches * args.ppdpp_sft_epochs, 0, []
        best_score, best_state, best_epoch = 0.0, None, None
        for epoch in range(1, args.ppdpp_sft_epochs + 1):
            order = torch.randperm(len(train), generator=generator).tolist()
            loss_sum = 0.0
            self.net.train()
            for start in range(0, len(order), args.ppdpp_sft_batch_size):
                batch = [train[i] for i in order[start:start + args.ppdpp_sft_batch_size]]
                labels = torch.tensor([a for _, a in batch], device=self.device)
                loss = nn.functional.cross_entropy(self.logits([x for x, _ in batch]).float(),
                                                   labels)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.net.parameters(), args.ppdpp_sft_max_grad_norm)
                step += 1  # sft.py steps its schedule before the optimizer
                for group in optimizer.param_groups:
                    group["lr"] = args.ppdpp_sft_learning_rate * warmup_linear(
                        step, args.ppdpp_sft_warmup_steps, total)
                optimizer.step()
                loss_sum += loss.item()
            entry = {"stage": "sft", "epoch": epoch, "sft_loss": loss_sum / batches,
                     "train_accuracy": self.accuracy(train)}
            if valid:
                predictions = self.predict([x for x, _ in valid])
                targets = [a for _, a in valid]
                precision, recall, f1 = macro_scores(targets, predictions)
                entry |= {"valid_macro_precision": precision, "valid_macro_f1": f1,
                          "valid_accuracy": sum(p == t for p, t in zip(predictions, targets))
                          / len(targets)}
                if precision > best_score:
                    best_score, best_epoch = precision, epoch
                    best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            history.append(entry)
        if best_state is not None:
            self.net.load_state_dict(best_state)
        history.append({"stage": "sft", "kept_epoch": best_epoch or args.ppdpp_sft_epochs,
                        "train": counts, "valid": valid_counts})
        return history

    def predict(self, inputs):
        return self.probabilities(inputs).argmax(-1).tolist()

    def accuracy(self, labelled):
        predictions = self.predict([x for x, _ in labelled])
        return sum(p == a for p, (_, a) in zip(predictions, labelled)) / len(labelled)

    # -- saving ----------------------------------------------------------------------------

    def state_dict(self, active):
        """The network and the REINFORCE optimizer (the conversations in flight are the
        trainer's, and each turn's state is rebuilt from them)."""
        return {"ppdpp": {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                          "updates": self.updates}}

    def load_state_dict(self, state):
        saved = state["ppdpp"]
        self.net.load_state_dict(saved["net"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.updates = saved["updates"]

    def save(self, path, step, metrics=None):
        """The network's weights (train_state.pt keeps the optimizer) and a JSON sidecar."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        save_checkpoint(path, tensors, {"step": step, "updates": self.updates,
                                        "metrics": metrics, "policy": self.name,
                                        "actions": self.task.action_names,
                                        "args": vars(self.args), "models": self.models})

    def load(self, path, optimizer=False):
        """The network of a checkpoint (checked by check_checkpoint) and its update count."""
        tensors = load_file(path, device=str(self.device))
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        with open(path + ".json") as f:
            info = json.load(f)
        self.updates = info.get("updates")  # None: a sidecar that does not say
        return info

    @staticmethod
    def check_checkpoint(path, args, models):
        """A PPDPP network for this task's actions on an encoder as wide as this run's."""
        info, names, shapes = read_checkpoint(path)
        if "net.classifier.weight" not in names:
            raise UserError(f"the checkpoint {path} has no PPDPP classifier. Pass the best.pt "
                            "of a --policy ppdpp training run")
        check_saved_args(path, info["args"], args, ("data_name", "policy_encoder",
                                                    "ppdpp_max_length"))
        try:
            encoder_path = resolve_encoder_path(args.policy_encoder)
        except FileNotFoundError:  # harness.check_weights reports it with the others
            return
        with open(os.path.join(encoder_path, "config.json")) as f:
            width = json.load(f)["hidden_size"]
        if list(shapes["net.classifier.weight"])[1] != width:
            raise UserError(f"the checkpoint {path} has a classifier for a "
                            f"{shapes['net.classifier.weight'][1]}-wide encoder, this run's "
                            f"--policy_encoder gives {width}. Pass the encoder it was "
                            "trained with")
