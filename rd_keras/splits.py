"""Which examples a run sees, and in which order: seeded, class-stratified subsets and held-out splits, and
the per-pass permutation of in-memory data.

None of it depends on the order the examples were listed in. An image folder lists its files class by
class, so "the first N" or "the last fraction" of it is one or two classes; a shuffle buffer smaller than
the data set then feeds batches of a single class. Every subset here draws from each class in proportion
to its size (largest remainder, so the total is exact), and every pass over in-memory data is a full
random permutation.
"""

import numpy as np


def stratified_indices(labels, n, seed):
    """Sorted indices of `n` examples drawn at random from each class in proportion to its count (all of
    them when `n >= len(labels)`); the same `(labels, n, seed)` always give the same indices."""
    labels = np.asarray(labels)
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"`n` must be an integer >= 0. Received: n={n!r}")
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(int)
    # Largest remainders first (ties to the smaller label), so the parts add up to exactly n.
    order = np.lexsort((classes, -(quota - take)))
    take[order[:n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def holdout(labels, fraction, seed):
    """`(train_indices, held_out_indices)`: a stratified random `fraction` of the examples held out (e.g. a
    validation split), the rest kept, both sorted. Raises ValueError when either part would be empty."""
    count = len(labels)
    held = int(round(count * fraction))
    if not 0 < held < count:
        raise ValueError(f"`validation_split` holds out {held} of {count} train examples; both parts must be "
                         f"non-empty. Received: validation_split={fraction}")
    held_out = stratified_indices(labels, held, seed)
    keep = np.ones(count, bool)
    keep[held_out] = False
    return np.flatnonzero(keep), held_out


def pass_permutation(count, seed, epoch):
    """The order of pass `epoch` over `count` in-memory examples: a full permutation drawn from (seed, epoch)
    alone, so a resumed run rebuilds exactly the pass it stopped in."""
    return np.random.default_rng([seed, epoch, 1]).permutation(count)
