import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pstage.config import DataConfig
from pstage.core.errors import DataError
from pstage.data.sources import load_source


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def test_competition_layout(demo_root):
    source = load_source(_cfg(demo_root))
    people = pd.read_csv(demo_root / "train" / "train.csv", dtype={"id": str})
    assert source.kind == "competition"
    assert source.task.num_classes == 18
    assert len(source.train) == 7 * len(people)
    # hidden junk (._mask1.jpg, .DS_Store) is never read as data
    assert not source.train["path"].map(lambda p: Path(p).name.startswith(".")).any()
    # labels follow mask*6 + gender*3 + age bucket
    row = source.train.iloc[0]
    assert row["target"] == row["mask"] * 6 + row["gender"] * 3 + row["age_bucket"]
    normal = source.train[source.train["image_id"].str.endswith("/normal")]
    assert (normal["mask"] == 2).all()
    assert set(source.train["group"]) == set(people["path"])
    info = pd.read_csv(demo_root / "eval" / "info.csv")
    assert source.test["image_id"].tolist() == info["ImageID"].tolist()


def test_mixed_case_extensions_are_read(demo_copy):
    folder = demo_copy / "train" / "images" / pd.read_csv(demo_copy / "train" / "train.csv")["path"][0]
    for file in folder.iterdir():
        if not file.name.startswith("."):
            file.rename(file.with_suffix(file.suffix.upper()))
    source = load_source(_cfg(demo_copy))
    mine = source.train[source.train["path"].str.contains(f"/{folder.name}/", regex=False)]
    assert len(mine) == 7 and mine["path"].str.endswith((".JPG", ".JPEG", ".PNG")).all()


def test_age_thresholds_are_configurable(demo_root):
    default = load_source(_cfg(demo_root))
    shifted = load_source(_cfg(demo_root, age_thresholds=(25, 50)))
    expected = np.digitize(default.train["age"], [25, 50])
    assert (shifted.train["age_bucket"].to_numpy() == expected).all()
    assert shifted.task.heads["age"] == ["<25", "25-49", ">=50"]


def test_missing_train_csv(demo_copy):
    (demo_copy / "train" / "train.csv").unlink()
    with pytest.raises(DataError, match=r"train/train.csv not found; expected the competition layout"):
        load_source(_cfg(demo_copy, source="competition"))


def test_missing_images_dir(demo_copy):
    shutil.rmtree(demo_copy / "train" / "images")
    with pytest.raises(DataError, match=r"train/images not found"):
        load_source(_cfg(demo_copy))


def test_missing_info_csv(demo_copy):
    (demo_copy / "eval" / "info.csv").unlink()
    with pytest.raises(DataError, match=r"eval/info.csv not found; the competition layout keeps the test set"):
        load_source(_cfg(demo_copy))


def test_missing_and_extra_person_files(demo_copy):
    person = pd.read_csv(demo_copy / "train" / "train.csv")["path"][2]
    folder = demo_copy / "train" / "images" / person
    next(folder.glob("mask3.*")).unlink()
    with pytest.raises(DataError, match=rf"{person}: missing mask3 .*on_bad_image=skip"):
        load_source(_cfg(demo_copy))
    source = load_source(_cfg(demo_copy, on_bad_image="skip"))
    assert len(source.train) == 7 * 30 - 1
    assert any("missing mask3" in s for s in source.skipped)
    (folder / "mask6.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"mask6.jpg: unexpected file"):
        load_source(_cfg(demo_copy))


def test_bad_rows_in_train_csv(demo_copy):
    csv = demo_copy / "train" / "train.csv"
    frame = pd.read_csv(csv, dtype=str)
    frame.loc[3, "gender"] = "m"
    frame.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"train.csv line 5: gender 'm' is not male or female"):
        load_source(_cfg(demo_copy))
    frame.loc[3, "gender"] = "male"
    frame.loc[4, "age"] = "old"
    frame.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"line 6: age 'old' is not a number"):
        load_source(_cfg(demo_copy))
    frame.drop(columns="age").to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) age"):
        load_source(_cfg(demo_copy))


def test_eval_image_missing(demo_copy):
    first = pd.read_csv(demo_copy / "eval" / "info.csv")["ImageID"][0]
    (demo_copy / "eval" / "images" / first).unlink()
    with pytest.raises(DataError, match=rf"lists {first} but .* does not exist"):
        load_source(_cfg(demo_copy))


def _write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((20, 16, 3), value, np.uint8))


def test_image_folder_tree(tmp_path):
    for cls, value in (("cat", 10), ("dog", 200)):
        for i in range(3):
            _write_image(tmp_path / "train" / cls / f"{i}.png", value)
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    _write_image(tmp_path / "test" / "x.jpg", 10)
    source = load_source(_cfg(tmp_path))
    assert source.kind == "folder"
    assert source.task.classes == ["cat", "dog"]
    assert sorted(source.train["target"]) == [0, 0, 0, 1, 1, 1]
    assert source.test["image_id"].tolist() == ["x.jpg"]


def test_csv_source_with_groups(tmp_path):
    rows = []
    for i in range(6):
        _write_image(tmp_path / "img" / f"{i}.jpg", i * 40)
        rows.append({"path": f"img/{i}.jpg", "label": str(i % 3), "group": f"g{i // 2}"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    source = load_source(_cfg(tmp_path / "labels.csv"))
    assert source.kind == "csv"
    assert source.task.classes == ["0", "1", "2"]
    assert source.train["group"].tolist() == ["g0", "g0", "g1", "g1", "g2", "g2"]
    pd.DataFrame(rows + [{"path": "img/none.jpg", "label": "1", "group": "g9"}]).to_csv(
        tmp_path / "labels.csv", index=False
    )
    with pytest.raises(DataError, match=r"img/none.jpg does not exist"):
        load_source(_cfg(tmp_path / "labels.csv"))


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(_cfg(tmp_path / "nope"))
    with pytest.raises(DataError, match="no data given"):
        load_source(DataConfig())
