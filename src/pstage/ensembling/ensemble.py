"""``pstage ensemble``: blend finished runs that share a split, scored on their OOF predictions.

Methods (``pstage.ensembling.methods``, registered by name), all fitted on out-of-fold
probabilities only (never on test): mean, hill (Caruana's hill climbing, its weights reported),
stack (logistic regression, whose OOF is produced by nested cross-validation so its score is
honest). ``calibrate`` adds per-class probability weights fitted to maximise macro F1 (scored by
nested CV).
The result is written as a run directory (run.json, folds.csv, oof.csv, test.csv, submission.csv,
weights.csv), so it shows on the board, can be ensembled again, and served.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pstage.core.errors import ConfigError, RunError
from pstage.core.io import now, write_csv
from pstage.core.metrics import cv_scores, fold_macro_f1, prob_columns
from pstage.core.tasks import Task
from pstage.ensembling.methods import (
    METHODS,
    ClassWeights,
    calibrate_apply,  # noqa: F401  (part of this module's API: tests and notebooks use it)
    calibrate_fit,  # noqa: F401
    create_method,
    hill_climb,  # noqa: F401
    nested_predict,
)
from pstage.runs.rundir import RunDir, RunInfo, provenance, resolve_run, submission_frame
from pstage.runs.store import locate, publish_after, store_uri


@dataclass
class Member:
    """One run's OOF and test probabilities, rows aligned with the first member's."""

    name: str
    path: Path
    info: RunInfo
    oof: np.ndarray
    test: np.ndarray | None

    @property
    def cv(self) -> float:
        return float(self.info.score)  # type: ignore[arg-type]  # only finished runs (with a CV) are members


@dataclass
class Members:
    """Runs checked to share classes, split and images, ready to blend."""

    runs: list[Member]
    task: Task
    oof: pd.DataFrame  # image_id, fold, target (the first member's order)
    folds_csv: pd.DataFrame
    test_ids: pd.DataFrame | None
    test_format: str

    @property
    def targets(self) -> np.ndarray:
        return self.oof["target"].to_numpy()

    @property
    def folds(self) -> np.ndarray:
        return self.oof["fold"].to_numpy()


@dataclass
class EnsembleResult:
    """What ``ensemble`` wrote and how it scored against its members."""

    name: str
    path: Path
    method: str
    weights: dict[str, float]
    cv: dict[str, Any]
    nested_cv: float
    members_cv: dict[str, float]
    calibration: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stacker: dict[str, Any] | None = None
    published: str | None = None  # the ensemble's address on the team store, when ``store`` published it

    @property
    def best_member(self) -> tuple[str, float]:
        name = max(self.members_cv, key=self.members_cv.__getitem__)
        return name, self.members_cv[name]


def _read(path: Path, what: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"image_id": str, "group": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RunError(f"{path}: unreadable {what} ({exc})") from None


def check_same_split(first: str, a: pd.DataFrame, other: str, b: pd.DataFrame) -> None:
    """Refuse runs whose folds.csv differ, naming the first image that differs."""
    merged = a[["image_id", "fold"]].merge(b[["image_id", "fold"]], on="image_id", how="outer", suffixes=("_a", "_b"))
    differs = merged[merged["fold_a"].ne(merged["fold_b"])]
    if differs.empty:
        return
    row = differs.iloc[0]

    def where(fold: float, run: str) -> str:
        return f"not in {run}'s split" if pd.isna(fold) else f"in fold {int(fold)} in {run}"

    raise RunError(
        f"{first} and {other} do not share a split: image {row['image_id']} is {where(row['fold_a'], first)} but "
        f"{where(row['fold_b'], other)}; ensemble runs trained on the same data with the same split.* settings"
    )


def _member_name(path: Path, info: RunInfo, runs_dir: str | Path) -> str:
    """The run's name, qualified as user/name for a teammate's run pulled into runs/<user>/<name>."""
    try:
        relative = path.relative_to(Path(runs_dir).expanduser().resolve()).as_posix()
    except ValueError:
        relative = ""
    return relative if relative.count("/") == 1 else info.name or path.name


def load_members(runs: Sequence[str | Path], runs_dir: str | Path = "runs", tta: bool = False) -> Members:
    """Open finished runs and check they can be blended: same classes, same split, same images."""
    paths = [resolve_run(run, runs_dir) for run in runs]
    seen: dict[Path, str] = {}
    for run, path in zip(runs, paths, strict=True):
        if path in seen:
            raise ConfigError(f"run {run} is given twice (as {seen[path]} too); list each run once")
        seen[path] = str(run)
    suffix = "_tta" if tta else ""
    members: list[Member] = []
    first: dict[str, Any] = {}
    for path in paths:
        run = RunDir(path)
        info = run.info
        name = _member_name(path, info, runs_dir)
        if not info.done:
            raise RunError(f"{name}: run is {info.status}; only finished runs can be ensembled")
        oof_path, test_path = run.output(f"oof{suffix}"), run.output(f"test{suffix}")
        if not oof_path.exists():
            hint = f"run pstage predict {name} --tta first" if tta else "re-run its training to write it"
            raise RunError(f"{name}: {oof_path.name} is missing; {hint}")
        folds_csv = _read(run.output("folds"), "split")
        oof = _read(oof_path, "OOF table")
        if not members:
            first = {
                "name": name,
                "classes": info.classes,
                "folds": folds_csv,
                "oof": oof[["image_id", "fold", "target"]],
                "test": _read(test_path, "test table")[["image_id"]] if test_path.exists() else None,
                "format": run.submission_format,
            }
        else:
            if info.classes != first["classes"]:
                mismatch = next(
                    (f"'{a}' vs '{b}'" for a, b in zip(first["classes"], info.classes or [], strict=False) if a != b),
                    f"{len(first['classes'])} vs {len(info.classes or [])} classes",
                )
                raise RunError(
                    f"{first['name']} and {name} predict different classes ({mismatch}); they cannot be blended"
                )
            check_same_split(first["name"], first["folds"], name, folds_csv)
        probs = _aligned(oof, first["oof"]["image_id"], len(first["classes"]), name, first["name"], "OOF")
        test = None
        if first["test"] is not None and test_path.exists():
            test = _aligned(
                _read(test_path, "test table"),
                first["test"]["image_id"],
                len(first["classes"]),
                name,
                first["name"],
                "test",
            )
        members.append(Member(name, path, info, probs, test))
    if any(m.test is None for m in members):
        for m in members:
            m.test = None
    task = members[0].info.as_task()
    return Members(
        members,
        task,
        first["oof"].reset_index(drop=True),
        first["folds"],
        first["test"] if members[0].test is not None else None,
        first["format"],
    )


def _aligned(table: pd.DataFrame, order: pd.Series, num_classes: int, name: str, first: str, what: str) -> np.ndarray:
    """Probabilities of ``table`` in the order of ``order``'s image ids; refuses other image sets."""
    indexed = table.set_index("image_id")
    if len(indexed) != len(order) or not indexed.index.isin(order).all():
        extra = indexed.index.difference(order)
        missing = pd.Index(order).difference(indexed.index)
        image = extra[0] if len(extra) else missing[0] if len(missing) else "?"
        raise RunError(
            f"{name} and {first} have {what} predictions for different images (first: {image}); "
            "were they trained on the same folds (train.folds) and data?"
        )
    return indexed.loc[order, prob_columns(num_classes)].to_numpy(dtype=np.float64)


# --- the command --------------------------------------------------------------------------------


def ensemble(
    runs: Sequence[str | Path],
    *,
    method: str = "hill",
    name: str | None = None,
    runs_dir: str | Path = "runs",
    out: str | Path | None = None,
    calibrate: bool = False,
    tta: bool = False,
    rounds: int = 50,
    store: str | None = None,
    with_checkpoints: bool = False,
) -> EnsembleResult:
    """Blend finished runs by ``method`` and write the ensemble as a run directory ``runs_dir/name``.

    With ``store`` (the team's MLflow server), runs that are not in ``runs_dir`` are pulled from it
    (``user/name``, or a name only one teammate has) and the ensemble is published there, with
    its own not-yet-published members (their fold checkpoints too with ``with_checkpoints``).
    """
    started = time.time()
    store = store_uri(store)
    METHODS.check(method)
    if len(runs) < 2 and not calibrate:
        raise ConfigError("an ensemble needs at least two runs (or one run with --calibrate)")
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: expected at least 1")
    name = name or f"ens-{method}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", name):
        raise ConfigError(f"ensemble name '{name}': use letters, digits and . _ + = - (it becomes a folder name)")
    run_dir = (Path(runs_dir).expanduser() / name).resolve()
    if store:  # teammates' runs that are only on the store are pulled first (OOF and test tables, no models)
        runs = [locate(run, runs_dir, store) for run in runs]
    members = load_members(runs, runs_dir, tta=tta)
    if any(m.path == run_dir for m in members.runs):
        raise ConfigError(f"--name {name} is one of the members; pick a new name for the ensemble")
    if RunDir(run_dir).has_info() and RunDir(run_dir).info.kind != "ensemble":
        raise RunError(f"{run_dir} holds a training run; pick another --name for the ensemble")

    targets, folds, probs = members.targets, members.folds, [m.oof for m in members.runs]
    tests = [m.test for m in members.runs] if members.test_ids is not None else None
    combiner = create_method(method, rounds=rounds).fit(probs, targets, folds)
    oof = combiner.predict_proba(probs)
    # a method that learns is scored by nested CV (fitted without the scored fold): the honest number
    nested_probs = nested_predict(combiner, probs, targets, folds) if combiner.learns else oof
    oof = nested_probs if combiner.nested_oof else oof
    nested = fold_macro_f1(targets, nested_probs, folds)
    test = combiner.predict_proba(tests) if tests else None
    weights = combiner.member_weights(len(probs))
    history: list[dict[str, Any]] = getattr(combiner, "history_", [])

    calibration = None
    if calibrate:
        before = fold_macro_f1(targets, oof, folds)
        calibrator = ClassWeights().fit([oof], targets, folds)
        oof = nested_predict(calibrator, [oof], targets, folds)
        test = calibrator.predict_proba([test]) if test is not None else None
        nested = fold_macro_f1(targets, oof, folds)
        calibration = {
            "class_weights": calibrator.class_weights_.round(4).tolist(),
            "cv_before": before,
            "cv_nested": nested,
        }

    table = pd.concat(
        [members.oof, pd.DataFrame(oof.astype(np.float32), columns=prob_columns(members.task.num_classes))], axis=1
    )
    cv = cv_scores(table, members.task)
    result = EnsembleResult(
        name=name,
        path=run_dir,
        method=method,
        weights={m.name: float(w) for m, w in zip(members.runs, weights, strict=True)},
        cv=cv,
        nested_cv=float(nested),
        members_cv={m.name: m.cv for m in members.runs},
        calibration=calibration,
        history=[{**h, "added": members.runs[h["added"]].name} for h in history],
        stacker=combiner.record(),
    )
    _write_run(run_dir, members, table, test, result, tta, started)
    if out is not None:
        target = Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "submission.csv", target)
    done = publish_after(run_dir, store, checkpoints=with_checkpoints, runs_dir=runs_dir)
    result.published = done.url if done else None
    return result


def _write_run(
    run_dir: Path,
    members: Members,
    oof: pd.DataFrame,
    test: np.ndarray | None,
    result: EnsembleResult,
    tta: bool,
    started: float,
) -> None:
    """The ensemble as a run directory; run.json last, so a crash never leaves a 'done' half-run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run = RunDir(run_dir)
    with run.lock():
        # re-blending under the same name keeps the run's identity (its store uid derives from `created`):
        # publishing it again updates the one published run instead of adding a second with its name
        created = (run.read_info().created if run.has_info() else None) or now()
        run.info_file.unlink(missing_ok=True)
        for stale in ("test.csv", "submission.csv"):
            (run_dir / stale).unlink(missing_ok=True)
        write_csv(run_dir / "folds.csv", members.folds_csv)
        write_csv(run_dir / "oof.csv", oof, float_format="%.6g")
        if test is not None and members.test_ids is not None:
            cols = prob_columns(members.task.num_classes)
            frame = pd.concat([members.test_ids.reset_index(drop=True), pd.DataFrame(test, columns=cols)], axis=1)
            write_csv(run_dir / "test.csv", frame, float_format="%.6g")
            write_csv(
                run_dir / "submission.csv",
                submission_frame(members.test_ids, test, members.task, members.test_format),
            )
        weights = pd.DataFrame(
            {
                "run": [m.name for m in members.runs],
                "weight": [result.weights[m.name] for m in members.runs],
                "cv_macro_f1": [m.cv for m in members.runs],
                "path": [str(m.path) for m in members.runs],
            }
        )
        write_csv(run_dir / "weights.csv", weights)
        info = {
            "name": result.name,
            "kind": "ensemble",
            "status": "done",
            "created": created,
            "finished": now(),
            **provenance(),
            "model": f"{result.method} of {len(members.runs)} runs",
            "image_size": None,
            "epochs": None,
            "task": members.task.to_dict(),
            "classes": members.task.classes,
            "submission_format": members.test_format,
            "cv": result.cv,
            "ensemble": {
                "method": result.method,
                "tta": tta,
                "members": weights.to_dict("records"),
                "nested_cv_macro_f1": result.nested_cv,
                "history": result.history,
                "calibration": result.calibration,
                "stacker": result.stacker,
            },
            "duration_s": round(time.time() - started, 2),
        }
        run.write_info(info)
