"""Asking an LLM a numbered question, as the planner (env.Planner) and the critic
(critic.Critic) do: the options' labels, the orders they are shown in, how a turn's
samples are spread over the orders, the batched calls, and the answers or distributions
folded back into the task's order. Each caller keeps its prompt and what it makes of the
result.

An order is the option shown at each position. A conversation is asked its question in
one or more orders (`shown_orders`): with `samples` None each order once for the labels'
probabilities, else the samples spread over the orders (`split_samples`). Each job is a
`Job`; `ask` sends every job of one sample count in one batched call, so a turn with
several orders makes a call for each count, every conversation's first order first.
"""

import random
from dataclasses import dataclass

from llm import stream_seed


def labels(count):
    """The options' labels, as the question numbers them: "1" to str(count)."""
    return [str(i + 1) for i in range(count)]


def rotations(n, count, seed):
    """`count` rotations of a list of n options (0 or more than n: all n), evenly spaced
    from a start drawn from `seed`. A rotation is the order shown: position -> option."""
    count = n if count <= 0 or count > n else count
    start = random.Random(seed).randrange(n)
    return [[(start + (k * n) // count + i) % n for i in range(n)] for k in range(count)]


def shown_orders(conversation, n, rotate, count, role):
    """The orders a role shows this turn: the task's order only, or with `rotate` `count`
    rotations (0: all) drawn from the conversation's stream at this turn, so that paired
    runs see the same orders."""
    if not rotate:
        return [list(range(n))]
    return rotations(n, count, stream_seed(conversation.stream, conversation.system_turns,
                                           f"{role}_order"))


def split_samples(num_samples, orders):
    """Samples per order: num_samples spread as evenly as possible (the first orders get
    one more); orders that would get none are left out. Returns [(order, count)]."""
    orders = orders[:num_samples]
    base, extra = divmod(num_samples, len(orders))
    return [(order, base + (k < extra)) for k, order in enumerate(orders)]


def order_seed(seed, k):
    """The sample seed of a turn's k-th order: the role's own seed for the first, so that
    one fixed order draws exactly what it drew before orders existed."""
    return seed if k == 0 else stream_seed(seed, "order", k)


@dataclass
class Job:
    """One conversation's question in one order, and what came back."""
    conversation: int  # the conversation's place in the batch
    k: int  # the order's place among the conversation's orders (0: asked first)
    order: list  # the option shown at each position
    count: int  # answers to sample (1 when the labels' probabilities are read)
    chat: list  # the prompt's messages
    seed: int  # the seed of its samples
    result: object = None  # the sampled answers, or the labels' probabilities (a tensor)

    def in_task_order(self):
        """The labels' probabilities as a list over the options in the task's order."""
        probs = [0.0] * len(self.order)
        for option, value in zip(self.order, self.result.tolist()):
            probs[option] = value
        return probs


def ask(llm, role, conversations, orders, prompt, labels, samples=None, **chat_options):
    """Ask each conversation its question in each of its orders; returns per conversation
    its jobs, in the order of its orders, each with its result.

    orders: per conversation, the orders shown; prompt(conversation, order) -> its chat;
    samples: None reads the labels' probabilities (llm.option_probs), else that many
    answers a conversation are sampled (llm.chat with chat_options), spread over its
    orders. Each order's samples have their own seed (`order_seed` of the role's).

    Every conversation's first order goes first, so that its prompt's KV cache (in
    process) or the server's prefix cache holds the conversation when the other orders,
    which differ only in the options after it, are asked; they follow grouped by count."""
    asked = []
    for i, (conversation, shown) in enumerate(zip(conversations, orders)):
        counts = ([(order, 1) for order in shown] if samples is None
                  else split_samples(samples, shown))
        asked.append([Job(i, k, order, count, prompt(conversation, order),
                          order_seed(conversation.seed(role), k))
                      for k, (order, count) in enumerate(counts)])
    jobs = [job for mine in asked for job in mine]
    for group in ([job for job in jobs if job.k == 0], [job for job in jobs if job.k != 0]):
        for count in sorted({job.count for job in group}, reverse=True):
            part = [job for job in group if job.count == count]
            chats = [job.chat for job in part]
            keys = [(conversations[job.conversation].uid, role) for job in part]
            if samples is None:
                results = list(llm.option_probs(chats, labels, cache_keys=keys))
            else:
                results = llm.chat(chats, num_samples=count, cache_keys=keys,
                                   seeds=[job.seed for job in part], **chat_options)
            for job, result in zip(part, results):
                job.result = result
    return asked


def answers(jobs):
    """One conversation's sampled answers with the job each was asked in: [(answer, job)]."""
    return [(answer, job) for job in jobs for answer in job.result]
