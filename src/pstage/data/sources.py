"""Read a dataset into one table of images: the competition layout, an image-folder tree or a CSV.

Every source yields ``train`` (image_id, path, group, target, + per-head targets) and optionally
``test`` (image_id, path). Structural problems (missing files, bad rows) are collected and raised as
one line naming the first, or skipped and reported with ``data.on_bad_image=skip``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pstage.config import DataConfig
from pstage.core.errors import DataError
from pstage.core.io import read_csv_table
from pstage.core.tasks import GENDERS, MASK_STEMS, Task, age_bucket, label_task, mask_label, mask_task
from pstage.data.relabel import apply_relabel

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}


@dataclass
class Source:
    """A dataset read from disk: what to train on, what to predict, and what was skipped."""

    kind: str
    root: Path
    task: Task
    train: pd.DataFrame
    test: pd.DataFrame | None
    test_format: str = "generic"  # "competition": eval/info.csv order, ImageID,ans
    skipped: list[str] = field(default_factory=list)


def is_hidden(name: str) -> bool:
    """macOS junk (``._x``, ``.DS_Store``) and other dot-files are never data."""
    return name.startswith(".")


def is_image(name: str) -> bool:
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _problems(problems: list[str], on_bad: str, hint: str) -> list[str]:
    """Raise the first problem (error mode) or return them all to be reported (skip mode)."""
    if problems and on_bad == "error":
        more = f" ({len(problems) - 1} more like it)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; {hint}")
    return problems


def detect_kind(path: Path) -> str:
    """competition (train/train.csv), csv (a .csv file) or folder (class sub-folders)."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise DataError(f"{path} is a file but not a CSV: point --data at a folder or a .csv file")
    if (path / "train" / "train.csv").exists() or (path / "train" / "images").is_dir():
        return "competition"
    return "folder"


def load_source(cfg: DataConfig) -> Source:
    """Read the dataset at ``cfg.path`` (layout from ``cfg.source``, detected when auto)."""
    if not cfg.path:
        raise DataError("no data given: pass --data DIR (or set data.path in the config)")
    root = Path(cfg.path).expanduser().resolve()
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    kind = detect_kind(root) if cfg.source == "auto" else cfg.source
    readers = {"competition": read_competition, "folder": read_folder, "csv": read_csv_source}
    return readers[kind](root, cfg)


# --- competition layout -------------------------------------------------------------------------


def read_competition(root: Path, cfg: DataConfig) -> Source:
    """train/train.csv + train/images/<person>/<7 photos>; eval/info.csv + eval/images."""
    train_csv = root / "train" / "train.csv"
    images = root / "train" / "images"
    layout = "expected the competition layout: train/train.csv, train/images/<person>/, eval/info.csv, eval/images/"
    people = read_csv_table(train_csv, ["gender", "age", "path"], layout)
    if not images.is_dir():
        raise DataError(f"{images} not found; {layout}")
    skip_hint = "fix the data or set data.on_bad_image=skip to leave such images out"
    problems: list[str] = []
    rows = []
    seen: set[str] = set()
    for line, person in enumerate(people.itertuples(index=False), start=2):
        folder, where = person.path.strip(), f"{train_csv} line {line}"
        gender = GENDERS.get(person.gender.strip().lower())
        if gender is None:
            raise DataError(f"{where}: gender '{person.gender}' is not male or female")
        try:
            age = int(float(person.age))
        except ValueError:
            raise DataError(f"{where}: age '{person.age}' is not a number") from None
        if not folder:
            raise DataError(f"{where}: empty path")
        if folder in seen:
            raise DataError(f"{where}: person folder '{folder}' is listed twice")
        seen.add(folder)
        files, issues = _person_files(images / folder)
        problems.extend(issues)
        for stem, file in sorted(files.items()):
            rows.append((f"{folder}/{stem}", str(file), folder, MASK_STEMS[stem], gender, age))
    skipped = _problems(problems, cfg.on_bad_image, skip_hint)
    if not rows:
        raise DataError(f"{images}: no training images found")
    train = pd.DataFrame(rows, columns=["image_id", "path", "group", "mask", "gender", "age"])
    if cfg.relabel:
        train = apply_relabel(train, cfg.relabel, "competition")
    train["age_bucket"] = age_bucket(train["age"].to_numpy(), cfg.age_thresholds)
    train["target"] = mask_label(train["mask"], train["gender"], train["age_bucket"])
    test = _read_eval(root / "eval")
    return Source("competition", root, mask_task(cfg.age_thresholds), train, test, "competition", skipped)


def _person_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The person's photos by stem, and what is wrong with the folder (missing, extra, duplicate)."""
    if not folder.is_dir():
        return {}, [f"{folder}: person folder not found (listed in train.csv)"]
    files: dict[str, Path] = {}
    issues = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_hidden(entry.name):
            continue
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in IMAGE_EXTENSIONS or stem not in MASK_STEMS:
            issues.append(f"{entry.path}: unexpected file (a person folder holds mask1-5, incorrect_mask, normal)")
        elif stem in files:
            issues.append(f"{entry.path}: second '{stem}' image beside {files[stem].name}")
        else:
            files[stem] = Path(entry.path)
    missing = [s for s in MASK_STEMS if s not in files]
    if missing:
        issues.append(f"{folder}: missing {', '.join(missing)} (a person folder holds mask1-5, incorrect_mask, normal)")
    return files, issues


def _read_eval(eval_dir: Path) -> pd.DataFrame:
    info = eval_dir / "info.csv"
    hint = "the competition layout keeps the test set in eval/info.csv (ImageID,ans) and eval/images/"
    frame = read_csv_table(info, ["ImageID"], hint)
    images = eval_dir / "images"
    if not images.is_dir():
        raise DataError(f"{images} not found; {hint}")
    present = set(os.listdir(images))
    ids = frame["ImageID"].str.strip()
    missing = [i for i in ids if i not in present]
    if missing:
        more = f" ({len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{info} lists {missing[0]} but {images / missing[0]} does not exist{more}")
    if ids.duplicated().any():
        raise DataError(f"{info}: ImageID {ids[ids.duplicated()].iloc[0]} is listed twice")
    return pd.DataFrame({"image_id": ids, "path": [str(images / i) for i in ids]})


# --- image folder and CSV -----------------------------------------------------------------------


def _list_images(folder: Path) -> list[Path]:
    """Every image under ``folder``, recursively, skipping hidden files and folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image(f))
    return found


def _class_order(labels: pd.Series) -> list[str]:
    """Class names sorted numerically when they are all integers, else alphabetically."""
    names = sorted(set(labels))
    if all(n.lstrip("-").isdigit() for n in names):
        names = sorted(names, key=int)
    return names


def _labelled(frame: pd.DataFrame, root: Path, kind: str, cfg: DataConfig, test: pd.DataFrame | None) -> Source:
    if cfg.relabel:
        frame = apply_relabel(frame, cfg.relabel, kind)
    classes = _class_order(frame["label"])
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class(es); a classifier needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    frame = frame.assign(target=frame["label"].map(index).astype(int))
    return Source(kind, root, label_task(classes), frame.reset_index(drop=True), test)


def read_folder(root: Path, cfg: DataConfig) -> Source:
    """``root/<class>/*`` (or ``root/train/<class>/*`` with ``root/test/``) - one class per folder."""
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not is_hidden(d.name))
    rows = []
    for name in classes:
        for file in _list_images(train_dir / name):
            rel = file.relative_to(train_dir).as_posix()
            rows.append((rel, str(file), rel, name))
    if not rows:
        raise DataError(f"{train_dir}: no images in class sub-folders (expected {train_dir}/<class>/<image>.jpg)")
    frame = pd.DataFrame(rows, columns=["image_id", "path", "group", "label"])
    test_path = (
        Path(cfg.test) if cfg.test else (root / "test" if train_dir != root and (root / "test").is_dir() else None)
    )
    return _labelled(frame, train_dir, "folder", cfg, _read_test(test_path) if test_path else None)


def read_csv_source(root: Path, cfg: DataConfig) -> Source:
    """A CSV of ``path,label[,group]``; relative paths are relative to the CSV's folder."""
    frame = read_csv_table(root, ["path", "label"], "")
    base = root.parent
    paths = [str(p if Path(p).is_absolute() else base / p) for p in frame["path"].str.strip()]
    missing = [p for p in paths if not Path(p).is_file()]
    problems = [f"{root}: {m} does not exist" for m in missing]
    skipped = _problems(problems, cfg.on_bad_image, "fix the CSV or set data.on_bad_image=skip")
    out = pd.DataFrame({"image_id": frame["path"].str.strip(), "path": paths, "label": frame["label"].str.strip()})
    out["group"] = frame["group"].str.strip() if "group" in frame.columns else out["image_id"]
    out = out[~out["path"].isin(missing)]
    test = _read_test(Path(cfg.test)) if cfg.test else None
    source = _labelled(out, root, "csv", cfg, test)
    source.skipped = skipped
    return source


def _read_test(path: Path) -> pd.DataFrame:
    """Test images from a folder (recursively) or a CSV with a ``path`` column."""
    if not path.exists():
        raise DataError(f"test data {path} does not exist (data.test)")
    if path.is_file():
        frame = read_csv_table(path, ["path"], "")
        paths = [p if Path(p).is_absolute() else str(path.parent / p) for p in frame["path"].str.strip()]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"{path} lists {missing[0]}, which does not exist")
        return pd.DataFrame({"image_id": frame["path"].str.strip(), "path": paths})
    files = _list_images(path)
    if not files:
        raise DataError(f"{path}: no .jpg/.jpeg/.png images found")
    return pd.DataFrame({"image_id": [f.relative_to(path).as_posix() for f in files], "path": [str(f) for f in files]})


def image_table(path: str | Path) -> pd.DataFrame:
    """Images to predict from a folder or CSV (used by ``pstage predict`` on arbitrary images)."""
    return _read_test(Path(path).expanduser().resolve())


def drop_images(source: Source, bad: dict[str, str]) -> Source:
    """The source without training images that failed to decode (skip mode)."""
    keep = ~source.train["path"].isin(bad)
    source.train = source.train[keep].reset_index(drop=True)
    source.skipped.extend(f"{p}: {reason}" for p, reason in bad.items())
    return source


def targets_matrix(frame: pd.DataFrame) -> np.ndarray:
    return frame["target"].to_numpy(dtype=np.int64)
