"""How far a CV score, and a leaderboard rank, can move: the bootstrap over persons (the split's unit).

A CV macro F1 is measured on a sample of persons, and so is the private leaderboard. Resampling
whole persons (all of their images together, as the split keeps them) gives an interval for the
CV, and, drawing a leaderboard's worth of persons for two runs at once (paired), the probability
that one beats the other on a leaderboard of that size.

Hand-written because no library resamples *groups* for a metric like macro F1 at this speed:
scikit-learn's ``resample`` and scipy's ``bootstrap`` draw rows one statistic call at a time
(1,000 f1_score calls on 10,000 images take ~10 s); here each person is reduced once to its
per-class counts (true positives, true labels, predictions), a draw is a vector of how often
each person was drawn, and the confusion counts of every draw are one matrix product.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController  # scikit-learn's dependency

DRAWS = 1000
SEED = 0
LEVEL = 0.95
CHUNK = 4_000_000  # draws x units per block: bounds memory (~32 MB of float64) for any data size


@dataclass(frozen=True)
class Interval:
    """A CV macro F1 (the mean over folds of fold macro F1) with its bootstrap interval over persons."""

    score: float
    low: float
    high: float
    std: float
    persons: int
    draws: int
    level: float = LEVEL

    def record(self) -> dict[str, float | int]:
        """For run.json (rounded: the interval's own error is ~0.001 at 1,000 draws)."""
        return {
            "low": round(self.low, 4),
            "high": round(self.high, 4),
            "std": round(self.std, 4),
            "persons": self.persons,
            "draws": self.draws,
            "level": self.level,
        }


@functools.cache
def _blas() -> ThreadpoolController:
    """The loaded BLAS libraries, found once (finding them costs ~8 ms; limiting them then costs nothing)."""
    return ThreadpoolController()


def one_blas_thread() -> Any:
    """A context in which BLAS runs on one thread: the bootstrap's many small matrix products only
    contend for cores with more threads (far slower on busy cores)."""
    return _blas().limit(limits=1, user_api="blas")


def unit_counts(
    targets: np.ndarray, preds: np.ndarray, units: np.ndarray, num_units: int, num_classes: int
) -> np.ndarray:
    """(units, 3 x classes): per unit (person), its true positives, true labels and predictions per class."""
    targets, preds, units = (np.asarray(a, dtype=np.int64) for a in (targets, preds, units))
    out = np.zeros((num_units, 3, num_classes))
    np.add.at(out, (units[targets == preds], 0, targets[targets == preds]), 1.0)
    np.add.at(out, (units, 1, targets), 1.0)
    np.add.at(out, (units, 2, preds), 1.0)
    return out.reshape(num_units, 3 * num_classes)


def macro_f1_of_counts(counts: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro F1 of each row of summed unit counts (..., 3 x classes): as ``fast_macro_f1``, over the
    classes seen in either labels or predictions."""
    tp, true, pred = (counts[..., i * num_classes : (i + 1) * num_classes] for i in range(3))
    denom = true + pred
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(denom, dtype=np.float64), where=present)
    return f1.sum(-1) / np.maximum(present.sum(-1), 1)


def pooled_macro_f1(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Macro F1 of one set of predictions (``core.metrics.fast_macro_f1``'s number, without importing
    scikit-learn: the board imports this module and must start fast)."""
    counts = unit_counts(targets, preds, np.zeros(len(targets), dtype=np.int64), 1, num_classes)[0]
    return float(macro_f1_of_counts(counts, num_classes))


def draw_counts(rng: np.random.Generator, num_units: int, draws: int, size: int | None = None) -> Iterator[np.ndarray]:
    """Blocks of (draws, units): how often each unit is drawn when ``size`` (default: all) are drawn with replacement."""
    size = num_units if size is None else size
    step = max(1, CHUNK // max(size, num_units))
    for start in range(0, draws, step):
        n = min(step, draws - start)
        picks = rng.integers(0, num_units, size=(n, size)) + (np.arange(n) * num_units)[:, None]
        yield np.bincount(picks.ravel(), minlength=n * num_units).reshape(n, num_units).astype(np.float64)


def _codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    uniques, codes = np.unique(np.asarray(values), return_inverse=True)
    return codes.reshape(-1), len(uniques)


def cv_draws(
    targets: np.ndarray,
    preds: np.ndarray,
    folds: np.ndarray,
    persons: np.ndarray,
    num_classes: int,
    draws: int = DRAWS,
    seed: int = SEED,
) -> np.ndarray:
    """Bootstrap draws of the CV macro F1: each fold's persons resampled within the fold (fold sizes
    kept, as the split made them), each fold scored, the folds averaged, as run.json's CV is."""
    rng = np.random.default_rng(seed)
    total = np.zeros(draws)
    fold_ids = np.unique(folds)
    with one_blas_thread():
        for k in fold_ids:
            rows = folds == k
            codes, n = _codes(persons[rows])
            counts = unit_counts(targets[rows], preds[rows], codes, n, num_classes)
            scores = [macro_f1_of_counts(w @ counts, num_classes) for w in draw_counts(rng, n, draws)]
            total += np.concatenate(scores)
    return total / len(fold_ids)


def cv_interval(
    targets: np.ndarray,
    probs: np.ndarray,
    folds: np.ndarray,
    persons: np.ndarray,
    draws: int = DRAWS,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """The CV macro F1 of OOF probabilities with its percentile bootstrap interval over persons."""
    num_classes = probs.shape[1]
    preds = np.asarray(probs).argmax(1)
    targets, folds, persons = np.asarray(targets), np.asarray(folds), np.asarray(persons)
    point = np.mean([pooled_macro_f1(targets[folds == k], preds[folds == k], num_classes) for k in np.unique(folds)])
    samples = cv_draws(targets, preds, folds, persons, num_classes, draws, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(float(point), float(low), float(high), float(samples.std()), len(np.unique(persons)), draws, level)


def win_probability(
    targets: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    persons: np.ndarray,
    leaderboard: int,
    draws: int = DRAWS,
    seed: int = SEED,
) -> float:
    """P(macro F1 of A > that of B) on a leaderboard of ``leaderboard`` persons drawn with replacement
    from these (paired: both runs are scored on the same draw; a tie counts half)."""
    num_classes = probs_a.shape[1]
    codes, n = _codes(persons)
    a = unit_counts(targets, np.asarray(probs_a).argmax(1), codes, n, num_classes)
    b = unit_counts(targets, np.asarray(probs_b).argmax(1), codes, n, num_classes)
    rng = np.random.default_rng(seed)
    wins = 0.0
    with one_blas_thread():
        for w in draw_counts(rng, n, draws, leaderboard):
            fa, fb = macro_f1_of_counts(w @ a, num_classes), macro_f1_of_counts(w @ b, num_classes)
            wins += float((fa > fb).sum() + 0.5 * (fa == fb).sum())
    return wins / draws
