"""A teacher run's split and OOF soft labels, read for knowledge distillation (``distill.teacher``).

Training reads them while it runs; ``pstage distill`` (a layer above) only sets the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pstage.config import Config
from pstage.core.errors import ConfigError, DataError, RunError
from pstage.core.metrics import prob_columns


def read_table(path: Path, what: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"image_id": str, "group": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RunError(f"{path}: unreadable {what} ({exc}); is the teacher run complete?") from None


def teacher_folds(source: Any, cfg: Config) -> pd.DataFrame:
    """The teacher's folds.csv as the split of ``source``'s training images (image_id, group, fold)."""
    teacher = Path(cfg.distill.teacher)
    saved = read_table(teacher / "folds.csv", "split").drop_duplicates("image_id").set_index("image_id")
    ids = source.train["image_id"]
    missing = ~ids.isin(saved.index)
    if missing.any():
        raise DataError(
            f"image {ids[missing].iloc[0]} is not in the teacher's split ({teacher / 'folds.csv'}); distill on the data the teacher was trained on"
        )
    fold = saved.loc[ids, "fold"].to_numpy().astype(int)
    if fold.max() >= cfg.split.folds:
        raise ConfigError(
            f"split.folds={cfg.split.folds} but the teacher's split has {fold.max() + 1} folds; the student uses the teacher's split"
        )
    return pd.DataFrame({"image_id": ids.to_numpy(), "group": source.train["group"].to_numpy(), "fold": fold})


def teacher_probs(cfg: Config, image_ids: pd.Series | np.ndarray) -> np.ndarray:
    """The teacher's OOF probabilities (N, C) for ``image_ids``: the soft labels."""
    teacher = Path(cfg.distill.teacher)
    oof = read_table(teacher / "oof.csv", "OOF table").set_index("image_id")
    ids = pd.Index(np.asarray(image_ids))
    missing = ids.difference(oof.index)
    if len(missing):
        raise DataError(
            f"image {missing[0]} has no OOF prediction in {teacher / 'oof.csv'} (was the teacher trained on every fold?); a soft label is needed for every training image"
        )
    cols = [c for c in oof.columns if c.startswith("p_")]
    probs = oof.loc[ids, prob_columns(len(cols))].to_numpy(dtype=np.float32)
    return probs / np.clip(probs.sum(1, keepdims=True), 1e-12, None)  # CSV rounding: back to sum 1
