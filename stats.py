"""Confidence intervals for evaluation results, with numpy only.

A result is a list of groups, one per training seed, each a list of per-conversation
values. The intervals are percentile bootstraps: over conversations when there is one
seed; with several, seeds are resampled too, so that the seed-to-seed spread of RL
training counts in the interval. When every seed played the same cases (crossed=True:
groups[s][i] is case i in every seed), one resample of cases serves all seeds, as the
design has it; otherwise each seed's conversations are resampled on their own. With few
seeds (under 5) the seed part of the interval rests on few distinct values: it is rough.
"""

import numpy as np

CHUNK = 2 ** 20  # indices drawn at once: bounds memory for large groups


def _check(groups, name="groups"):
    """The groups as float arrays, or a ValueError that says what is wrong."""
    if len(groups) == 0:
        raise ValueError(f"{name} is empty: give one list of per-conversation values per seed")
    arrays = [np.asarray(values, dtype=float) for values in groups]
    for index, values in enumerate(arrays):
        if values.ndim != 1 or len(values) == 0:
            raise ValueError(f"{name}[{index}] (seed {index}) has no values: give at least "
                             "one value per seed, or leave the seed out")
    return arrays


def _resampled_means(values, count, rng):
    """`count` means of `values` resampled with replacement."""
    rows = max(1, CHUNK // len(values))
    means = np.empty(count)
    for start in range(0, count, rows):
        stop = min(start + rows, count)
        indices = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[indices].mean(axis=1)
    return means


def bootstrap_ci(groups, n_boot=10000, seed=0, level=0.95, crossed=False):
    """(mean, low, high) of a metric measured on several seeds.

    `groups[s]` holds the per-conversation values of seed s. `mean` is the mean of the
    per-seed means. The interval is a percentile bootstrap with `n_boot` resamples:
    with one seed, over conversations; with several, hierarchical: each resample draws
    as many seeds as there are, with replacement, then each drawn seed's conversations
    with replacement, and takes the mean over drawn seeds of each one's mean. A seed
    drawn twice gets two independent resamples of its conversations. crossed=True (all
    seeds played the same cases, in the same order): each resample draws seeds and one
    set of cases, used in every drawn seed. Deterministic given `seed`.
    """
    arrays = _check(groups)
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level must lie in (0, 1) and n_boot be positive, got {level} and "
                         f"{n_boot}")
    rng = np.random.default_rng(seed)
    mean = float(np.mean([values.mean() for values in arrays]))
    tail = (1 - level) / 2
    if crossed and len(arrays) > 1:
        if len({len(values) for values in arrays}) != 1:
            raise ValueError("crossed=True needs the same cases in every seed")
        table = np.stack(arrays)  # [seeds, cases]
        statistics = np.empty(n_boot)
        rows = max(1, CHUNK // table.shape[1])
        for start in range(0, n_boot, rows):
            count = min(rows, n_boot - start)
            cases = rng.multinomial(table.shape[1], np.full(table.shape[1],
                                                            1 / table.shape[1]), size=count)
            seeds = rng.multinomial(len(arrays), np.full(len(arrays), 1 / len(arrays)),
                                    size=count)
            seed_means = cases @ table.T / table.shape[1]  # [count, seeds]
            statistics[start:start + count] = (seeds * seed_means).sum(1) / len(arrays)
        low, high = np.quantile(statistics, [tail, 1 - tail])
        return mean, float(low), float(high)
    # which seed fills each of the len(arrays) places of each resample
    drawn = rng.integers(0, len(arrays), size=(n_boot, len(arrays)))
    seed_means = np.empty(drawn.shape)
    for index, values in enumerate(arrays):
        places = drawn == index
        seed_means[places] = _resampled_means(values, int(places.sum()), rng)
    statistics = seed_means.mean(axis=1)
    low, high = np.quantile(statistics, [tail, 1 - tail])
    return mean, float(low), float(high)


def paired_bootstrap_ci(groups_a, groups_b, n_boot=10000, seed=0, level=0.95,
                        crossed=False):
    """(mean_diff, low, high) for mean(a) - mean(b), where groups_a[s][i] and
    groups_b[s][i] are the same case in seed s (both policies met the same case).

    A paired, hierarchical percentile bootstrap: the same seeds and the same case indices
    are drawn for a and b. That equals bootstrap_ci on the per-case differences a - b,
    which is how it is computed; pairing removes the case-to-case spread both share.
    """
    arrays_a, arrays_b = _check(groups_a, "groups_a"), _check(groups_b, "groups_b")
    if len(arrays_a) != len(arrays_b):
        raise ValueError(f"groups_a has {len(arrays_a)} seeds but groups_b has "
                         f"{len(arrays_b)}: pair the same seeds")
    for index, (a, b) in enumerate(zip(arrays_a, arrays_b)):
        if len(a) != len(b):
            raise ValueError(f"seed {index}: {len(a)} values in groups_a but {len(b)} in "
                             "groups_b: pair each case of a with the same case of b")
    return bootstrap_ci([a - b for a, b in zip(arrays_a, arrays_b)], n_boot, seed, level,
                        crossed)
