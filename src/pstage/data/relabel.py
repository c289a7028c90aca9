"""Label overrides (``data.relabel``): a CSV of per-person gender/age and per-image mask fixes,
applied on top of the data's own labels when a source is read; the data files are never edited."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pstage.core.errors import DataError
from pstage.core.io import read_csv_table
from pstage.core.tasks import GENDERS, MASK_NAMES, MASK_STEMS

RELABEL_COLUMNS = ["person", "image_id", "gender", "age", "mask", "label"]


def read_relabel(path: Path) -> pd.DataFrame:
    """A corrections / override CSV: person-level gender/age, image-level mask (or label)."""
    frame = read_csv_table(path, [], "pass the corrections CSV (columns person,image_id,gender,age,mask)")
    unknown = [c for c in frame.columns if c not in [*RELABEL_COLUMNS, "note"]]
    if unknown or not ({"person", "image_id"} & set(frame.columns)):
        raise DataError(
            f"{path}: columns {', '.join(unknown) or '(no person or image_id)'} not understood; expected {', '.join(RELABEL_COLUMNS)}"
        )
    frame = frame.reindex(columns=RELABEL_COLUMNS, fill_value="").apply(lambda c: c.str.strip())
    return frame[(frame[["gender", "age", "mask", "label"]] != "").any(axis=1)].reset_index(drop=True)


def check_relabel(frame: pd.DataFrame, train: pd.DataFrame, path: Path, kind: str) -> None:
    """One clear line for the first correction that does not fit the data."""
    persons, images = set(train["group"]), set(train["image_id"])
    for line, row in enumerate(frame.itertuples(), start=2):
        where = f"{path} row {line}"
        if row.person and row.person not in persons:
            raise DataError(f"{where}: person '{row.person}' is not in the training data")
        if row.image_id and row.image_id not in images:
            raise DataError(f"{where}: image '{row.image_id}' is not in the training data")
        if (row.gender or row.age) and not row.person:
            raise DataError(f"{where}: gender/age are per person; fill the person column")
        if row.gender and row.gender.lower() not in GENDERS:
            raise DataError(f"{where}: gender '{row.gender}' is not male or female")
        if row.age and not row.age.isdigit():
            raise DataError(f"{where}: age '{row.age}' is not a whole number")
        if row.mask and (not row.image_id or row.mask not in [*MASK_NAMES, *MASK_STEMS]):
            raise DataError(f"{where}: mask needs an image_id and one of {', '.join(MASK_NAMES)}")
        if row.label and (not row.image_id or kind == "competition"):
            raise DataError(f"{where}: label is for image-folder/CSV data (per image_id); use gender/age/mask here")


def apply_relabel(train: pd.DataFrame, path: str, kind: str) -> pd.DataFrame:
    """Labels from an override file (data.relabel) on top of the data's own; the files are never edited."""
    overrides = read_relabel(Path(path).expanduser())
    check_relabel(overrides, train, Path(path), kind)
    train = train.copy()
    for row in overrides.itertuples():
        rows = (train["group"] == row.person) if row.person else (train["image_id"] == row.image_id)
        if row.gender:
            train.loc[rows, "gender"] = GENDERS[row.gender.lower()]
        if row.age:
            train.loc[rows, "age"] = int(row.age)
        if row.mask:
            train.loc[rows, "mask"] = MASK_NAMES.index(row.mask) if row.mask in MASK_NAMES else MASK_STEMS[row.mask]
        if row.label:
            train.loc[rows, "label"] = row.label
    return train
