"""Seeded label splits: which training images keep their label (pure functions of the label array)."""

from __future__ import annotations

import numpy as np


def split_per_class(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Choose exactly `per_class` indices of every class; returns (chosen, rest), both sorted."""
    labels = _check_labels(labels)
    counts = {int(c): per_class for c in np.unique(labels)}
    return _split(labels, counts, seed)


def fraction_per_class(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Choose round(fraction * n_c) indices of every class c; returns (chosen, rest), both sorted."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    labels = _check_labels(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    counts = {int(c): int(round(fraction * n)) for c, n in zip(classes, sizes, strict=True)}
    return _split(labels, counts, seed)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    return labels


def _split(labels: np.ndarray, counts: dict[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    # One generator walked over the classes in sorted order: the split depends only on (labels, seed).
    rng = np.random.default_rng(seed)
    chosen = [_choose(labels, cls, n, rng) for cls, n in sorted(counts.items())]
    chosen_idx = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), chosen_idx, assume_unique=True)
    return chosen_idx.astype(np.int64), rest.astype(np.int64)


def _choose(labels: np.ndarray, cls: int, n: int, rng: np.random.Generator) -> np.ndarray:
    members = np.flatnonzero(labels == cls)
    if n < 0 or n > len(members):
        raise ValueError(f"class {cls} has {len(members)} samples, cannot choose {n} of them")
    return rng.choice(members, size=n, replace=False)
