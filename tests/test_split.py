import pandas as pd
import pytest

from pstage.config import DataConfig
from pstage.core.errors import DataError
from pstage.data.sources import load_source
from pstage.data.split import check_folds, make_folds


def test_no_person_in_two_folds_and_strata_spread(demo_root):
    source = load_source(DataConfig(path=str(demo_root)))
    folds = make_folds(source, 5, seed=1)
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    # every fold validates all mask states of its persons
    merged = folds.merge(source.train[["image_id", "mask"]], on="image_id")
    assert (merged.groupby("fold")["mask"].nunique() == 3).all()
    # folds are near equal in persons
    persons = folds.groupby("fold")["group"].nunique()
    assert persons.max() - persons.min() <= 2


def test_split_is_deterministic_by_seed(demo_root):
    source = load_source(DataConfig(path=str(demo_root)))
    a, b, c = make_folds(source, 3, 7), make_folds(source, 3, 7), make_folds(source, 3, 8)
    assert a.equals(b)
    assert not a["fold"].equals(c["fold"])


def test_changed_split_is_refused(demo_root):
    source = load_source(DataConfig(path=str(demo_root)))
    folds = make_folds(source, 3, 7)
    moved = folds.copy()
    moved.loc[0, "fold"] = (moved.loc[0, "fold"] + 1) % 3
    with pytest.raises(DataError, match=f"image {folds.loc[0, 'image_id']} moved to another fold"):
        check_folds(moved, folds, "folds.csv")
    with pytest.raises(DataError, match="is new since this run started"):
        check_folds(folds.iloc[1:], folds, "folds.csv")


def test_too_few_persons(demo_root):
    source = load_source(DataConfig(path=str(demo_root)))
    source.train = source.train[source.train["group"].isin(source.train["group"].unique()[:2])]
    with pytest.raises(DataError, match="split.folds=3 needs at least 3 persons/groups, the data has 2"):
        make_folds(source, 3, 0)
    assert isinstance(make_folds(source, 2, 0), pd.DataFrame)
