"""Ensemble methods as scikit-learn-style estimators, registered by name (``--method``).

Each method is fitted on the members' out-of-fold probabilities only (never on test):
  mean   soft vote, equal weights;
  hill   Caruana et al. (2004) greedy forward selection with replacement, maximising the CV metric
         itself, keeping the best prefix; its weights are reported;
  stack  a scikit-learn logistic regression on the members' log-probabilities.
``ClassWeights`` (``--calibrate``) is the same kind of estimator over one member: per-class
probability weights fitted to maximise macro F1.

The estimator API: ``fit(P, y, folds)`` (``P``: one (N, C) probability array per member) sets the
fitted attributes (``weights_``, ``coef_``, ``class_weights_``, ...); ``predict_proba(P)`` gives
(N, C); ``to_torch()`` gives a torch module mapping a list of member probability tensors (any
leading shape, classes last) to the combined probabilities, which ``pstage export`` puts in the
ONNX graph. The maths is written once, in each class's ``combine(xp, P, **params)``: numpy runs it
for ``predict_proba`` and torch (``xp=torch``) for ``to_torch``, on the same fitted parameters,
using only functions numpy and torch share (concatenate, clip, log, exp, amax, sum, @).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, clone

from pstage.core.metrics import fold_macro_f1
from pstage.core.registry import Registry

# Multipliers tried per class and pass by the calibration's coordinate ascent (about x0.37 to x2.7).
CALIBRATION_GRID = np.exp(np.linspace(-1.0, 1.0, 9))

Probs = Sequence[Any]  # one (..., C) array (numpy) or tensor (torch) per member


def softmax(xp: Any, z: Any) -> Any:
    """Softmax over the last axis, for numpy or torch arrays (``xp``: the numpy or torch module)."""
    e = xp.exp(z - xp.amax(z, axis=-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class EnsembleMethod(BaseEstimator):
    """Combines members' probabilities; subclasses define ``fit``, ``params`` and ``combine``."""

    # False: nothing is fitted, so the in-sample OOF score is already honest (no nested CV needed).
    learns: ClassVar[bool] = True
    # True: the ensemble's oof.csv is the nested OOF (a fitted model applied to predictions it was
    # fitted on would flatter itself); False: the in-sample blend, with the nested score reported.
    nested_oof: ClassVar[bool] = False

    def fit(self, P: Probs, y: np.ndarray, folds: np.ndarray) -> EnsembleMethod:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The fitted parameters ``combine`` reads (arrays, or plain numbers kept as constants)."""
        raise NotImplementedError

    @staticmethod
    def combine(xp: Any, P: Probs, **params: Any) -> Any:
        """The method's maths on numpy (``xp=numpy``) or torch (``xp=torch``) arrays."""
        raise NotImplementedError

    def predict_proba(self, P: Probs) -> np.ndarray:
        """Combined probabilities (N, C) of the members' probabilities ``P``."""
        return self.combine(np, [np.asarray(p, dtype=np.float64) for p in P], **self.params())

    def to_torch(self) -> Any:
        """An eval-mode torch module: ``module(list of member tensors) -> combined``, float32 buffers."""
        import torch  # kept off the ensembling path: only export needs a graph

        class Combiner(torch.nn.Module):
            """A fitted ensemble method as a module; the maths is the estimator's own ``combine``."""

            def __init__(self, combine: Callable[..., Any], params: dict[str, Any], name: str):
                super().__init__()
                self.combine, self.method = combine, name
                self.arrays = [k for k, v in params.items() if isinstance(v, np.ndarray)]
                self.constants = {k: v for k, v in params.items() if k not in self.arrays}
                for key in self.arrays:
                    self.register_buffer(key, torch.as_tensor(params[key], dtype=torch.float32))

            def forward(self, probs: list[torch.Tensor]) -> torch.Tensor:
                arrays = {key: getattr(self, key) for key in self.arrays}
                return self.combine(torch, probs, **arrays, **self.constants)

        return Combiner(type(self).combine, self.params(), type(self).__name__).eval()

    def member_weights(self, members: int) -> np.ndarray:
        """Per-member weights as reported (weights.csv, run.json); equal where the method has none."""
        return np.asarray(getattr(self, "weights_", np.full(members, 1 / members)), dtype=np.float64)

    def record(self) -> dict[str, Any] | None:
        """What run.json keeps beyond the member weights to re-apply the method (the stacker); None if nothing."""
        return None

    @classmethod
    def restore(cls, weights: Sequence[float], record: dict[str, Any] | None, num_classes: int) -> EnsembleMethod:
        """A fitted estimator from run.json's member weights and ``record`` (export, serve)."""
        method = cls()
        method.weights_ = np.asarray(weights, dtype=np.float64)
        return method


METHODS: Registry[type[EnsembleMethod]] = Registry("ensemble method", "--method")


class Blend(EnsembleMethod):
    """A weighted mean of the members' probabilities (``weights_``, summing to 1)."""

    def params(self) -> dict[str, Any]:
        return {"weights": self.weights_}

    @staticmethod
    def combine(xp: Any, P: Probs, *, weights: Any) -> Any:
        return sum(weights[i] * p for i, p in enumerate(P))


@METHODS.register("mean")
class Mean(Blend):
    """Soft vote: equal weights."""

    learns = False

    def fit(self, P: Probs, y: np.ndarray, folds: np.ndarray) -> Mean:
        self.weights_ = np.full(len(P), 1 / len(P))
        return self


@METHODS.register("hill")
class HillClimb(Blend):
    """Caruana's greedy forward selection with replacement; ``weights_`` and the selection ``history_``."""

    def __init__(self, rounds: int = 50):
        self.rounds = rounds

    def fit(self, P: Probs, y: np.ndarray, folds: np.ndarray) -> HillClimb:
        self.weights_, self.history_ = hill_climb(P, y, folds, self.rounds)
        return self


@METHODS.register("stack")
class Stack(EnsembleMethod):
    """Multinomial logistic regression on the members' log-probabilities (class-balanced: macro F1).

    Fitted attributes as scikit-learn's: ``classes_``, ``coef_`` (K, M*C) or its binary form
    (1, M*C), ``intercept_``; and ``n_classes_``: a class the regression never saw gets 0.
    """

    nested_oof = True

    def __init__(self, C: float = 1.0, clip: float = 1e-6):
        self.C = C
        self.clip = clip

    def fit(self, P: Probs, y: np.ndarray, folds: np.ndarray) -> Stack:
        from sklearn.linear_model import LogisticRegression  # only stacking needs it

        features = np.log(np.clip(np.concatenate(list(P), axis=-1), self.clip, 1.0))
        model = LogisticRegression(C=self.C, max_iter=2000, class_weight="balanced").fit(features, y)
        self.classes_, self.coef_, self.intercept_ = model.classes_, model.coef_, model.intercept_
        self.n_classes_ = int(np.asarray(P[0]).shape[-1])
        return self

    def params(self) -> dict[str, Any]:
        coef, intercept = np.asarray(self.coef_, np.float64), np.asarray(self.intercept_, np.float64)
        if coef.shape[0] == 1 and len(self.classes_) == 2:  # scikit-learn's binary form: one logit, for class 1
            coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([0 * intercept, intercept])
        scatter = np.zeros((len(self.classes_), self.n_classes_))
        scatter[np.arange(len(self.classes_)), np.asarray(self.classes_)] = 1.0
        return {"coef": coef.T.copy(), "intercept": intercept, "scatter": scatter, "clip": float(self.clip)}

    @staticmethod
    def combine(xp: Any, P: Probs, *, coef: Any, intercept: Any, scatter: Any, clip: float) -> Any:
        features = xp.log(xp.clip(xp.concatenate(list(P), -1), clip, 1.0))
        return softmax(xp, features @ coef + intercept) @ scatter  # classes never seen in fitting get 0

    def record(self) -> dict[str, Any]:
        # Enough to re-apply the stacker anywhere: p = softmax(log(clip(P)) @ coef.T + intercept).
        return {
            "classes": np.asarray(self.classes_).tolist(),
            "coef": np.round(self.coef_, 6).tolist(),
            "intercept": np.round(self.intercept_, 6).tolist(),
            "clip": self.clip,
        }

    @classmethod
    def restore(cls, weights: Sequence[float], record: dict[str, Any] | None, num_classes: int) -> Stack:
        if record is None:
            raise ValueError("a stacked ensemble's run.json has no stacker")
        method = cls(clip=float(record["clip"]))
        method.classes_ = np.asarray(record["classes"])
        method.coef_, method.intercept_ = np.asarray(record["coef"]), np.asarray(record["intercept"])
        method.n_classes_ = num_classes
        return method


class ClassWeights(EnsembleMethod):
    """``--calibrate``: per-class weights on one member's probabilities, fitted for CV macro F1, renormalised."""

    def __init__(self, passes: int = 3):
        self.passes = passes

    def fit(self, P: Probs, y: np.ndarray, folds: np.ndarray) -> ClassWeights:
        (probs,) = P
        self.class_weights_ = calibrate_fit(np.asarray(probs, dtype=np.float64), y, folds, self.passes)
        return self

    def params(self) -> dict[str, Any]:
        return {"class_weights": np.asarray(self.class_weights_, dtype=np.float64)}

    @staticmethod
    def combine(xp: Any, P: Probs, *, class_weights: Any) -> Any:
        (probs,) = P
        scaled = probs * class_weights
        return scaled / xp.clip(scaled.sum(-1, keepdims=True), 1e-12, None)

    @classmethod
    def restore(cls, weights: Sequence[float], record: dict[str, Any] | None, num_classes: int) -> ClassWeights:
        """From run.json's ``calibration`` record (its ``class_weights``)."""
        method = cls()
        method.class_weights_ = np.asarray((record or {})["class_weights"], dtype=np.float64)
        return method


def create_method(name: str, **options: Any) -> EnsembleMethod:
    """An unfitted ``name`` method, given those of ``options`` it takes (e.g. hill's rounds)."""
    method = METHODS.get(name)()
    return method.set_params(**{k: v for k, v in options.items() if k in method.get_params()})


def nested_predict(
    method: EnsembleMethod, P: Probs, y: np.ndarray, folds: np.ndarray, groups: np.ndarray | None = None
) -> np.ndarray:
    """Out-of-fold predictions of ``method``: a fresh copy fitted on the other folds predicts each fold.

    ``groups`` (default: the folds) is the partition left out in turn; an ensemble resting on one
    fold passes groups of its persons, and each copy is still fitted for the CV metric on ``folds``.
    """
    P = [np.asarray(p) for p in P]
    out = np.zeros(P[0].shape)
    groups = folds if groups is None else groups
    for k in np.unique(groups):
        outer = groups == k
        fitted = clone(method).fit([p[~outer] for p in P], y[~outer], folds[~outer])
        out[outer] = fitted.predict_proba([p[outer] for p in P])
    return out


# --- the fitting algorithms --------------------------------------------------------------------


def hill_climb(
    probs: Sequence[np.ndarray], targets: np.ndarray, folds: np.ndarray, rounds: int = 50
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Caruana's greedy forward selection with replacement; returns weights (sum 1) and the path.

    Starts from the best single member, adds whichever member most improves the CV metric (repeats
    allowed, which is how weights arise), and keeps the prefix with the best score, so the result
    is never worse than the best member on the data it was fitted on.
    """
    scores = [fold_macro_f1(targets, p, folds) for p in probs]
    chosen = [int(np.argmax(scores))]
    total = probs[chosen[0]].copy()
    history = [{"step": 1, "added": chosen[0], "score": scores[chosen[0]]}]
    for step in range(2, rounds + 1):
        candidates = [fold_macro_f1(targets, total + p, folds) for p in probs]  # argmax ignores the 1/n scale
        best = int(np.argmax(candidates))
        chosen.append(best)
        total += probs[best]
        history.append({"step": step, "added": best, "score": candidates[best]})
    stop = int(np.argmax([h["score"] for h in history]))  # first best: the shortest best prefix
    counts = np.bincount(chosen[: stop + 1], minlength=len(probs)).astype(np.float64)
    return counts / counts.sum(), history[: stop + 1]


def calibrate_fit(probs: np.ndarray, targets: np.ndarray, folds: np.ndarray, passes: int = 3) -> np.ndarray:
    """Per-class weights on probabilities that maximise the CV macro F1 (coordinate ascent).

    Macro F1 rewards getting rare classes right more than accuracy does; scaling a rare class's
    probability up trades a few common-class hits for many rare-class ones. No threshold to tune.
    """
    weights = np.ones(probs.shape[1])
    best = fold_macro_f1(targets, probs, folds)
    for _ in range(passes):
        improved = False
        for c in range(probs.shape[1]):
            for factor in CALIBRATION_GRID:
                trial = weights.copy()
                trial[c] *= factor
                score = fold_macro_f1(targets, probs * trial, folds)
                if score > best + 1e-12:
                    best, weights, improved = score, trial, True
        if not improved:
            break
    return weights / np.exp(np.log(weights).mean())


def calibrate_apply(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``probs`` with per-class ``weights`` applied and renormalised (ClassWeights' maths)."""
    return ClassWeights.combine(np, [np.asarray(probs, dtype=np.float64)], class_weights=np.asarray(weights))
