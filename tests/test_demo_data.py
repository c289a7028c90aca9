"""Tests of the synthetic mask-status data set: layout, labels, junk files, determinism and reuse."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pstage.core.tasks import age_bucket
from pstage.demo.synthetic import (
    AGE_THRESHOLDS,
    INFO_COLUMNS,
    STEMS,
    TRAIN_COLUMNS,
    TRUTH_COLUMNS,
    make_demo_data,
    person_spec,
    render_person,
    truth_class,
)

SIZE = (64, 48)
PERSONS, EVAL_PERSONS = 14, 4


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _visible(folder: Path) -> list[Path]:
    """Non-hidden files of a folder."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small data set generated once, serially, for the read-only tests."""
    return make_demo_data(tmp_path_factory.mktemp("demo"), PERSONS, EVAL_PERSONS, SIZE, seed=0, workers=1)


def test_layout_and_train_csv(demo: Path) -> None:
    assert sorted(p.name for p in demo.iterdir()) == ["demo.json", "demo_truth.csv", "eval", "train"]
    train = pd.read_csv(demo / "train" / "train.csv", dtype=str)
    assert list(train.columns) == TRAIN_COLUMNS
    assert len(train) == PERSONS
    assert train["id"].str.fullmatch(r"\d{6}").all()
    assert set(train["gender"]) <= {"male", "female"}
    assert (train["race"] == "Asian").all()
    assert (train["path"] == train["id"] + "_" + train["gender"] + "_Asian_" + train["age"]).all()
    folders = _visible(demo / "train" / "images")
    assert [p.name for p in folders] == sorted(train["path"])
    for folder in folders:
        files = _visible(folder)
        assert sorted(p.stem for p in files) == sorted(STEMS)
        assert len({p.suffix for p in files}) == 1
        assert files[0].suffix.lower() in {".jpg", ".jpeg", ".png"}


def test_images_decode_at_requested_size(demo: Path) -> None:
    images = [p for p in (demo / "train" / "images").rglob("*") if p.is_file() and not p.name.startswith(".")]
    images += _visible(demo / "eval" / "images")
    assert len(images) == 7 * (PERSONS + EVAL_PERSONS)
    for path in images:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (*SIZE, 3), path


def test_eval_info_matches_truth(demo: Path) -> None:
    info = pd.read_csv(demo / "eval" / "info.csv")
    truth = pd.read_csv(demo / "demo_truth.csv", dtype={"person": str})
    assert list(info.columns) == INFO_COLUMNS
    assert list(truth.columns) == TRUTH_COLUMNS
    assert len(info) == len(truth) == 7 * EVAL_PERSONS
    assert (info["ans"] == 0).all()
    assert list(info["ImageID"]) == list(truth["ImageID"])
    assert info["ImageID"].str.fullmatch(r"[0-9a-f]{40}\.(jpg|png)").all()
    assert {p.name for p in _visible(demo / "eval" / "images")} == set(info["ImageID"])
    assert list(info["ImageID"]) != sorted(info["ImageID"])  # shuffled


def test_truth_labels_follow_formula(demo: Path) -> None:
    truth = pd.read_csv(demo / "demo_truth.csv", dtype={"person": str})
    buckets = age_bucket(truth["age"].to_numpy(), AGE_THRESHOLDS)
    assert (truth["ans"] == truth["mask"] * 6 + truth["gender"] * 3 + buckets).all()
    assert truth["ans"].between(0, 17).all()
    for _, rows in truth.groupby("person"):
        assert sorted(rows["mask"]) == [0, 0, 0, 0, 0, 1, 2]
        assert rows["gender"].nunique() == 1 and rows["age"].nunique() == 1


def test_train_and_eval_persons_disjoint(demo: Path) -> None:
    train = pd.read_csv(demo / "train" / "train.csv", dtype=str)
    truth = pd.read_csv(demo / "demo_truth.csv", dtype={"person": str})
    assert truth["person"].nunique() == EVAL_PERSONS
    assert not set(train["id"]) & set(truth["person"])


def test_hidden_junk_files_are_not_images(demo: Path) -> None:
    junk = [p for p in demo.rglob(".*") if p.is_file()]
    assert any(p.parent.name == "images" and p.name.startswith("._") for p in junk)
    for path in junk:
        assert cv2.imread(str(path)) is None


def test_manifest(demo: Path) -> None:
    manifest = json.loads((demo / "demo.json").read_text())
    assert manifest["persons"] == PERSONS and manifest["eval_persons"] == EVAL_PERSONS
    assert manifest["image_size"] == list(SIZE) and manifest["seed"] == 0
    assert manifest["eval_images"] == 7 * EVAL_PERSONS


def test_truth_class() -> None:
    assert truth_class("mask3", "male", 25) == 0
    assert truth_class("incorrect_mask", "female", 45) == 6 + 3 + 1
    assert truth_class("normal", "female", 60) == 17
    assert age_bucket([18, 29, 30, 59, 60, 75], AGE_THRESHOLDS).tolist() == [0, 0, 1, 1, 2, 2]


def test_population_fractions() -> None:
    people = [person_spec(0, i, 3000) for i in range(3000)]
    exts = pd.Series([p.ext for p in people])
    assert 0.72 < (exts == ".jpg").mean() < 0.82
    assert 0.07 < (exts == ".jpeg").mean() < 0.13
    assert 0.07 < (exts == ".png").mean() < 0.13
    assert 0.01 < exts.str.contains("[A-Z]").mean() < 0.05
    assert 0.03 < np.mean([p.junk > 0 for p in people]) < 0.07
    assert 0.55 < np.mean([p.gender == "female" for p in people]) < 0.65
    buckets = np.bincount(age_bucket([p.age for p in people], AGE_THRESHOLDS), minlength=3) / len(people)
    assert abs(buckets[0] - 0.45) < 0.04 and abs(buckets[1] - 0.40) < 0.04 and abs(buckets[2] - 0.15) < 0.03
    assert min(p.age for p in people) >= 18


@pytest.mark.parametrize("size", [(16, 16), (40, 30), (120, 90)])
def test_render_scales_with_size(size: tuple[int, int]) -> None:
    photos = render_person(person_spec(1, 3, 10), size)
    assert list(photos) == list(STEMS)
    assert all(img.shape == (*size, 3) and img.dtype == np.uint8 for img in photos.values())


def test_deterministic_and_independent_of_workers(demo: Path, tmp_path: Path) -> None:
    again = make_demo_data(tmp_path / "again", PERSONS, EVAL_PERSONS, SIZE, seed=0, workers=2)
    assert _files(again) == _files(demo)
    other = make_demo_data(tmp_path / "other", PERSONS, EVAL_PERSONS, SIZE, seed=1, workers=1)
    a, b = _files(demo), _files(other)
    assert a["train/train.csv"] != b["train/train.csv"]
    assert a.keys() != b.keys()


def test_reuse_does_not_rewrite(tmp_path: Path) -> None:
    root = make_demo_data(tmp_path / "d", 3, 1, SIZE, seed=5, workers=1)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert make_demo_data(str(tmp_path / "d"), 3, 1, SIZE, seed=5, workers=2) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_regenerates_on_new_arguments_or_partial_content(tmp_path: Path) -> None:
    root = make_demo_data(tmp_path / "d", 3, 1, SIZE, seed=5, workers=1)
    (root / "notes.txt").write_text("keep me")
    stale = root / "train" / "images" / "stale_folder"
    stale.mkdir()
    make_demo_data(root, 4, 1, SIZE, seed=5, workers=1)
    assert len(pd.read_csv(root / "train" / "train.csv")) == 4
    assert (root / "notes.txt").read_text() == "keep me"
    assert not stale.exists()
    (root / "demo.json").unlink()  # an interrupted run never wrote its manifest
    stale.mkdir()
    make_demo_data(root, 4, 1, SIZE, seed=5, workers=1)
    assert (root / "demo.json").is_file() and not stale.exists()


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        make_demo_data(tmp_path, 2, 1, (8, 8))
    with pytest.raises(ValueError, match="persons"):
        make_demo_data(tmp_path, 0, 1, SIZE)
    assert not (tmp_path / "train").exists()
