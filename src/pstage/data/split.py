"""Person-grouped, stratified K-fold: no person in two folds, classes balanced across folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pstage.core.errors import DataError
from pstage.data.sources import Source


def stratify_labels(source: Source) -> np.ndarray:
    """What to balance: the person's gender x age class for the mask task (constant per person,
    unlike the mask status), else the image's class."""
    train = source.train
    if source.task.name == "mask":
        return (train["gender"] * 3 + train["age_bucket"]).to_numpy()
    return train["target"].to_numpy()


def make_folds(source: Source, folds: int, seed: int) -> pd.DataFrame:
    """A folds table (image_id, group, fold) for the source's training images."""
    train = source.train
    groups = train["group"].to_numpy()
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise DataError(
            f"split.folds={folds} needs at least {folds} persons/groups, the data has {n_groups}: lower split.folds"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold = np.full(len(train), -1, dtype=int)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(train)), stratify_labels(source), groups)):
        fold[val_idx] = k
    return pd.DataFrame({"image_id": train["image_id"], "group": groups, "fold": fold})


def check_folds(saved: pd.DataFrame, current: pd.DataFrame, where: str) -> None:
    """Refuse to resume on data whose images or split differ from the run's saved folds.csv."""
    merged = current.merge(saved, on="image_id", how="outer", suffixes=("", "_saved"), indicator=True)
    odd = merged[(merged["_merge"] != "both") | (merged["fold"] != merged["fold_saved"])]
    if len(odd):
        row = odd.iloc[0]
        what = {"left_only": "is new", "right_only": "is gone"}.get(row["_merge"], "moved to another fold")
        raise DataError(
            f"{where}: image {row['image_id']} {what} since this run started; use a new --name for new data"
        )
