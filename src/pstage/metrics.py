"""Scores of out-of-fold predictions: macro F1 overall, per fold and per head (mask/gender/age)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from pstage.tasks import Task


def macro_f1(targets: np.ndarray, preds: np.ndarray) -> float:
    """The competition metric: unweighted mean of per-class F1 over classes seen in either array."""
    return float(f1_score(targets, preds, average="macro", zero_division=0))


def prob_columns(num_classes: int) -> list[str]:
    return [f"p_{i}" for i in range(num_classes)]


def cv_scores(oof: pd.DataFrame, task: Task) -> dict[str, Any]:
    """CV summary of an OOF table (image_id, fold, target, p_*): mean/std of fold macro F1 and more.

    ``macro_f1`` is the mean over folds (the usual Kaggle CV); ``oof_macro_f1`` pools every image.
    """
    probs = oof[prob_columns(task.num_classes)].to_numpy()
    preds = probs.argmax(1)
    targets = oof["target"].to_numpy()
    folds = []
    for fold in sorted(oof["fold"].unique()):
        rows = (oof["fold"] == fold).to_numpy()
        folds.append({"fold": int(fold), "macro_f1": macro_f1(targets[rows], preds[rows]), "images": int(rows.sum())})
    scores = [f["macro_f1"] for f in folds]
    per_task = {}
    if task.has_subtasks:
        for head, head_targets in task.head_targets(targets).items():
            head_preds = np.asarray(task.class_to_head[head])[preds]
            per_task[head] = macro_f1(head_targets, head_preds)
    return {
        "macro_f1": float(np.mean(scores)),
        "macro_f1_std": float(np.std(scores)),
        "oof_macro_f1": macro_f1(targets, preds),
        "accuracy": float((preds == targets).mean()),
        "folds": folds,
        "per_task": per_task,
    }
