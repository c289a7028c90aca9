"""A run's shake-up, read from its run folder: the CV's interval over persons, and P(it beats another run).

The maths is ``pstage.core.shakeup``; here a run's oof.csv is joined with its folds.csv (the
persons) and the results are cached per user ($XDG_CACHE_HOME/pstage/shakeup.json, keyed by the
tables' path, size and modification time), because the board is read far more often than runs
change: measured on 1,500 persons x 7 photos (2 CPU cores), reading a run's tables takes ~0.05 s
and 1,000 draws ~0.15 s, so a board of 30 runs would wait ~6 s on every call without the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pstage.core.io import write_json
from pstage.core.shakeup import DRAWS, SEED, Interval, cv_interval, win_probability
from pstage.runs.info import RunInfo
from pstage.runs.rundir import RunDir

PHOTOS_PER_PERSON = 7  # the mask task: every person has 7 photos (5 masks, 1 incorrect, 1 none)
CACHE_ENTRIES = 5000  # the cache keeps this many results, newest


@dataclass
class OOF:
    """A run's out-of-fold predictions with each image's person (folds.csv ``group``)."""

    image_ids: np.ndarray
    targets: np.ndarray
    probs: np.ndarray
    folds: np.ndarray
    persons: np.ndarray


def read_oof(run: RunDir) -> OOF | None:
    """oof.csv joined with folds.csv's persons (an image with no person is its own); None without a
    readable oof.csv (the board and publishing carry on without the shake-up of such a run)."""
    try:
        table = run.table("oof")
        if table is None or table.empty:
            return None
        classes = run.info.classes or []
        num_classes = len(classes) or sum(c.startswith("p_") for c in table.columns)
        split = run.table("folds")
        persons = table["image_id"]
        if split is not None and "group" in split.columns:
            persons = table["image_id"].map(split.set_index("image_id")["group"]).fillna(table["image_id"])
        return OOF(
            table["image_id"].to_numpy(),
            table["target"].to_numpy(dtype=np.int64),
            table[[f"p_{k}" for k in range(num_classes)]].to_numpy(dtype=np.float64),
            table["fold"].to_numpy(),
            persons.astype(str).to_numpy(),
        )
    except (OSError, KeyError, ValueError, pd.errors.ParserError):
        return None


def leaderboard_size(info: RunInfo, test_images: int | None) -> tuple[int, str] | None:
    """The default leaderboard size for ``--lb-persons``: test persons, as far as they can be told.

    The competition's test photos are shuffled, not grouped by person: for the mask task its
    size in persons is the test images / 7; for other data one image is one unit.
    """
    if not test_images:
        return None
    if (info.task or {}).get("name") == "mask":
        return max(1, round(test_images / PHOTOS_PER_PERSON)), f"persons (test images / {PHOTOS_PER_PERSON})"
    return test_images, "images (one test image = one unit)"


def test_images(run: RunDir) -> int | None:
    """How many test images the run predicted (run.json's data summary, else test.csv's rows)."""
    data = run.info.get("data") or {}
    if isinstance(data, dict) and data.get("test_images"):
        return int(data["test_images"])
    path = run.output("test")
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        return max(0, sum(1 for _ in handle) - 1)


# --- the cache ---------------------------------------------------------------------------------


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pstage" / "shakeup.json"


def _stamp(run: RunDir) -> str:
    """What identifies a run's tables without reading them: path, size and mtime of oof.csv and folds.csv."""
    parts = []
    for name in ("oof", "folds"):
        path = run.output(name)
        stat = path.stat() if path.is_file() else None
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}" if stat else f"{path}:-")
    return "|".join(parts)


def _cached(key: str, compute: Any) -> Any:
    """``compute()``'s JSON value, from the cache when ``key`` was computed before."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = cache_file()
    try:
        entries = json.loads(path.read_text())
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    if digest in entries:
        return entries[digest]
    value = compute()
    entries[digest] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, dict(list(entries.items())[-CACHE_ENTRIES:]))
    except OSError:
        pass  # a read-only home only costs the recomputation next time
    return value


# --- the measures ------------------------------------------------------------------------------


def run_interval(run: RunDir, draws: int = DRAWS, seed: int = SEED) -> Interval | None:
    """The run's CV with its bootstrap interval over persons (run.json's, if it records one; else cached)."""
    recorded = run.info.cv.interval if run.info.cv is not None else None
    if recorded is not None and run.info.score is not None:
        return Interval(
            float(run.info.score),
            recorded.low,
            recorded.high,
            float(recorded.std or 0.0),
            int(recorded.persons or 0),
            int(recorded.draws or draws),
        )

    def compute() -> dict[str, Any] | None:
        oof = read_oof(run)
        if oof is None:
            return None
        found = cv_interval(oof.targets, oof.probs, oof.folds, oof.persons, draws=draws, seed=seed)
        return {**found.record(), "score": found.score}

    value = _cached(f"interval|{_stamp(run)}|{draws}|{seed}", compute)
    if value is None:
        return None
    return Interval(value["score"], value["low"], value["high"], value["std"], value["persons"], value["draws"])


def paired(a: OOF, b: OOF) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(targets, probs of a, probs of b, persons) on the images both predicted out of fold; None if none."""
    common, ia, ib = np.intersect1d(a.image_ids, b.image_ids, return_indices=True)
    if not len(common):
        return None
    return a.targets[ia], a.probs[ia], b.probs[ib], a.persons[ia]


def beats(run: RunDir, best: RunDir, leaderboard: int, draws: int = DRAWS, seed: int = SEED) -> float | None:
    """P(``run`` scores above ``best`` on a leaderboard of ``leaderboard`` persons drawn from the OOF
    persons both predicted; None when they share no OOF image."""

    def compute() -> float | None:
        a, b = read_oof(run), read_oof(best)
        if a is None or b is None:
            return None
        pair = paired(a, b)
        if pair is None:
            return None
        targets, pa, pb, persons = pair
        return win_probability(targets, pa, pb, persons, leaderboard, draws=draws, seed=seed)

    return _cached(f"beats|{_stamp(run)}|{_stamp(best)}|{leaderboard}|{draws}|{seed}", compute)


def with_interval(run: RunDir, info: dict[str, Any]) -> dict[str, Any]:
    """``info`` (run.json's record) with ``cv.interval`` filled from the run's tables when it has none,
    so a published run's board row (the store's ``pstage.info`` tag) carries it without its tables."""
    cv = info.get("cv") or {}
    if not cv or cv.get("interval"):
        return info
    found = run_interval(run)
    return info if found is None else {**info, "cv": {**cv, "interval": found.record()}}
