"""Deterministic train/validation split of a site's training cases.

Every process of a site (Flower starts a fresh one per message) must agree on which cases are
held out for evaluating the global model, without storing anything: the split is a pure function
of the sorted case ids and a seed (nnU-Net's fold-0 idea: 1 in 5 held out).
"""

from __future__ import annotations

import numpy as np


def split_cases(
    case_ids: list[str], val_fraction: float = 0.2, seed: int = 12345
) -> tuple[list[str], list[str]]:
    """(train, validation) ids. One case or none: everything trains, nothing is held out."""
    ids = sorted(case_ids)
    if len(ids) < 2:
        return ids, []
    n_val = max(1, int(round(len(ids) * val_fraction)))
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    train = [c for c in ids if c not in set(val)]
    return train, val


def fold_split(case_ids: list[str], fold: int, folds: int, seed: int = 12345
               ) -> tuple[list[str], list[str]]:
    """(train, validation) ids of ``fold`` in a ``folds``-fold cross-validation.

    nnU-Net's idea (``KFold(shuffle=True, random_state=12345)`` over the sorted ids): one seeded
    permutation of the sorted ids cut into ``folds`` near-equal parts; part ``fold`` validates.
    Every site splits its own cases this way, so each fold's model is validated on every site's
    fold and each case is validated exactly once over the folds. A site with fewer cases than
    folds validates nothing in the folds its parts do not reach (it still trains in them)."""
    if folds < 2:
        return split_cases(case_ids, seed=seed)
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: folds are numbered 0..{folds - 1}")
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    part = np.array_split(order, folds)[fold]
    val = sorted(ids[i] for i in part)
    held = set(val)
    return [c for c in ids if c not in held], val
