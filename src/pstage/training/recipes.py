"""Competition recipes as switches: borderline ages, pseudo-labels, final fit (age heads and ArcFace live in models.py).

Each is off by default and changes only the *training* side of a fold; validation and OOF always
keep every original training image, so a recipe's effect is read off the same CV as its baseline.

- Borderline ages (``data.borderline``): persons aged within ``years`` below a bucket threshold
  (57-59 below 60 at 3 years) are dropped from, or down-weighted in, the fold's training images.
- Pseudo-labels (``pseudo.run``): test images whose teacher top probability reaches
  ``pseudo.threshold`` join every fold's training images with the teacher's label (hard or soft);
  test images are never validated on. Caveat: the teacher's test predictions come from models
  that trained on every fold, the scored fold included, so a little of the validation persons'
  labels reaches training through the teacher, as with any pseudo-labelling under CV.
- Final fit (``train.final_fit``): one more model on every training person, for the folds'
  median best epoch count, predicting the test set alone or blended with the fold models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pstage.config import Config
from pstage.core.errors import ConfigError, DataError, RunError
from pstage.core.metrics import prob_columns
from pstage.data.sources import Source
from pstage.inference.persons import resolve_embedding, supports
from pstage.runs.rundir import RunDir

NEEDS_AGES = "the competition layout's train.csv age column"


def borderline_mask(ages: np.ndarray, cfg: Config) -> np.ndarray:
    """True for ages within ``data.borderline.years`` below one of its thresholds (a <= age < t, a = t - years)."""
    band = cfg.data.borderline
    ages = np.asarray(ages)
    if band.years == 0:
        return np.zeros(len(ages), bool)
    thresholds = band.thresholds or list(cfg.data.age_thresholds)
    return np.any([(ages >= t - band.years) & (ages < t) for t in thresholds], axis=0)


def check_recipe_data(cfg: Config, kind: str) -> None:
    """The checks that need only the data's layout (``train`` runs them before the run folder exists)."""
    if kind == "competition":  # the only layout with numeric ages
        return
    if cfg.data.borderline.years:
        raise ConfigError(
            f"data.borderline.years={cfg.data.borderline.years} needs numeric ages ({NEEDS_AGES}); this {kind} data has none: set data.borderline.years=0"
        )
    if cfg.model.age_head == "regress":
        raise ConfigError(
            f"model.age_head=regress needs numeric ages ({NEEDS_AGES}); this {kind} data has none: use model.age_head=ordinal or classify"
        )


def check_recipes(cfg: Config, source: Source) -> None:
    """Refuse, in one line, a recipe the data or the other settings cannot support (before any training)."""
    check_recipe_data(cfg, "competition" if "age" in source.train.columns else source.kind)
    if cfg.pseudo.run:
        if source.test is None:
            raise ConfigError(
                f"pseudo.run={cfg.pseudo.run}: this data has no test images to pseudo-label (competition eval/, or data.test)"
            )
        if cfg.model.age_head == "regress":
            raise ConfigError(
                "pseudo.run with model.age_head=regress: pseudo-labelled test images have no age in years; use model.age_head=ordinal or drop pseudo.run"
            )
        if cfg.distill.teacher:
            raise ConfigError("pseudo.run and distill.teacher cannot be combined; train one after the other")
    if cfg.train.final_fit != "off" and source.test is None:
        raise ConfigError(
            f"train.final_fit={cfg.train.final_fit}: this data has no test images for the final model to predict; set train.final_fit=off"
        )
    if cfg.persons.group != "off" and supports(source.task) and cfg.persons.embedding not in ("auto", "fold"):
        resolve_embedding(cfg.persons.embedding)  # a face model that cannot run here: refused before training


def resolve_teacher(cfg: Config, runs: str | Path) -> None:
    """Turn ``pseudo.run`` into an absolute run folder (a name is looked up under ``runs``)."""
    if not cfg.pseudo.run:
        return
    teacher = RunDir.find(cfg.pseudo.run, runs)
    path = teacher.path
    if not teacher.info.done:
        raise RunError(f"pseudo.run={cfg.pseudo.run}: {path} is not finished (status must be done)")
    if not teacher.output("test").is_file():
        raise RunError(f"pseudo.run={cfg.pseudo.run}: {path} has no test.csv (was it trained with test images?)")
    cfg.pseudo.run = str(path)


@dataclass
class PseudoLabels:
    """Confident test images: their test-cache rows, hard labels and the teacher's probabilities."""

    rows: np.ndarray
    targets: np.ndarray
    probs: np.ndarray
    total: int  # test images the teacher predicted

    def __len__(self) -> int:
        return len(self.rows)


def pseudo_labels(cfg: Config, source: Source) -> PseudoLabels | None:
    """The teacher's confident test predictions, aligned with the test cache (rows = source.test order)."""
    if not cfg.pseudo.run:
        return None
    teacher = Path(cfg.pseudo.run)
    try:
        test = pd.read_csv(teacher / "test.csv", dtype={"image_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RunError(f"{teacher / 'test.csv'}: unreadable ({exc})") from None
    cols = prob_columns(source.task.num_classes)
    if list(test.columns[1:]) != cols:
        raise DataError(
            f"{teacher / 'test.csv'} has {len(test.columns) - 1} probability columns; this task has {len(cols)} classes: pseudo-label with a run on the same task"
        )
    order = {image_id: i for i, image_id in enumerate(source.test["image_id"])}
    missing = ~test["image_id"].isin(order)
    if missing.any() or len(test) != len(order):
        first = test["image_id"][missing].iloc[0] if missing.any() else "some test image"
        raise DataError(
            f"pseudo.run: {teacher / 'test.csv'} does not cover this data's test set ({first} differs); use a teacher trained on the same data"
        )
    probs = test[cols].to_numpy(np.float32)
    probs = probs / np.clip(probs.sum(1, keepdims=True), 1e-12, None)
    keep = probs.max(1) >= cfg.pseudo.threshold
    rows = test["image_id"].map(order).to_numpy()[keep]
    return PseudoLabels(rows.astype(np.int64), probs[keep].argmax(1), probs[keep], len(test))


def final_epochs(fold_metrics: list[dict[str, Any]], default: int) -> int:
    """The folds' median best epoch count (1-based, rounded up); ``default`` without any."""
    best = [m["best_epoch"] + 1 for m in fold_metrics if m.get("best_epoch") is not None]
    return int(np.ceil(np.median(best))) if best else default
