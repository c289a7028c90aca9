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
from pstage.core.shakeup import DRAWS, Interval, cv_interval, win_probability
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
from pstage.runs.rundir import PULLED, RunDir, RunInfo, provenance, resolve_run, submission_frame
from pstage.runs.shakeup import leaderboard_size
from pstage.runs.store import locate, publish_after, store_uri


@dataclass
class Member:
    """One run's OOF and test probabilities, rows aligned with the first member's."""

    name: str
    path: Path
    info: RunInfo
    oof: np.ndarray  # on the ensemble's folds (those every member trained)
    test: np.ndarray | None
    folds: list[int] = field(default_factory=list)  # the folds the member trained

    @property
    def cv(self) -> float:
        """The member's own CV, on the folds it trained (its board score)."""
        return float(self.info.score)  # type: ignore[arg-type]  # only finished runs (with a CV) are members


@dataclass
class Members:
    """Runs checked to share classes, split and images, ready to blend on the folds they all trained."""

    runs: list[Member]
    task: Task
    oof: pd.DataFrame  # image_id, fold, target of the shared folds (the first member's order)
    folds_csv: pd.DataFrame
    test_ids: pd.DataFrame | None
    test_format: str
    shared: list[int] = field(default_factory=list)  # the folds every member trained
    persons: np.ndarray = field(default_factory=lambda: np.array([]))  # each OOF row's person (folds.csv group)

    @property
    def split_folds(self) -> int:
        """How many folds the split has."""
        return int(self.folds_csv["fold"].nunique())

    def nest_groups(self) -> np.ndarray:
        """The partition nested CV leaves out one part of: the folds; with one shared fold, 5 groups of its
        persons (scikit-learn's GroupKFold), so that weights are still scored on persons they were not fitted on."""
        if len(self.shared) > 1:
            return self.folds
        from sklearn.model_selection import GroupKFold  # only a one-fold ensemble needs it

        n = len(np.unique(self.persons))
        if n < 2:
            raise RunError(f"fold {self.shared[0]} holds a single person: too few to fit and score blend weights on")
        groups = np.zeros(len(self.persons), dtype=np.int64)
        for k, (_, rows) in enumerate(GroupKFold(n_splits=min(5, n)).split(self.persons, groups=self.persons)):
            groups[rows] = k
        return groups

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
    members_cv: dict[str, float]  # each member's CV on the ensemble's folds (comparable with the ensemble's)
    calibration: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stacker: dict[str, Any] | None = None
    published: str | None = None  # the ensemble's address on the team store, when ``store`` published it
    folds: list[int] = field(default_factory=list)  # the folds every member trained: the blend's and CV's rows
    split_folds: int = 0  # how many folds the split has
    persons: int = 0  # persons on those folds
    images: int = 0
    members_folds: dict[str, list[int]] = field(default_factory=dict)  # the folds each member trained
    members_own_cv: dict[str, float] = field(default_factory=dict)  # each member's own CV (its folds)
    interval: Interval | None = None  # the CV's bootstrap interval over persons
    shakeup: dict[str, Any] | None = None  # P(each run beats the best) on a leaderboard of the test's size

    @property
    def best_member(self) -> tuple[str, float]:
        """The member with the best CV on the ensemble's folds (``members_cv``)."""
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
    """Open finished runs and check they can be blended: same classes, same split, same images.

    Members need not have trained the same folds (a time budget picks how many): the OOF rows
    kept are those of the folds every member trained; their test predictions are blended whole.
    """
    paths = [resolve_run(run, runs_dir) for run in runs]
    seen: dict[Path, str] = {}
    for run, path in zip(runs, paths, strict=True):
        if path in seen:
            raise ConfigError(f"run {run} is given twice (as {seen[path]} too); list each run once")
        seen[path] = str(run)
    suffix = "_tta" if tta else ""
    opened: list[tuple[str, Path, RunInfo, pd.DataFrame, Path]] = []
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
        if not opened:
            first = {
                "name": name,
                "classes": info.classes,
                "folds": folds_csv,
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
        opened.append((name, path, info, oof, test_path))
    trained = {name: sorted(int(k) for k in oof["fold"].unique()) for name, _, _, oof, _ in opened}
    shared = sorted(set.intersection(*(set(folds) for folds in trained.values())))
    if not shared:
        raise RunError(no_shared_fold(opened, trained))
    reference = opened[0][3]
    reference = reference.loc[reference["fold"].isin(shared), ["image_id", "fold", "target"]].reset_index(drop=True)
    members: list[Member] = []
    for name, path, info, oof, test_path in opened:
        probs = _aligned(
            oof[oof["fold"].isin(shared)], reference["image_id"], len(first["classes"]), name, first["name"], "OOF"
        )
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
        members.append(Member(name, path, info, probs, test, trained[name]))
    if any(m.test is None for m in members):
        for m in members:
            m.test = None
    task = members[0].info.as_task()
    persons = reference["image_id"].map(first["folds"].set_index("image_id")["group"]).fillna(reference["image_id"])
    return Members(
        members,
        task,
        reference,
        first["folds"],
        first["test"] if members[0].test is not None else None,
        first["format"],
        shared,
        persons.astype(str).to_numpy(),
    )


def no_shared_fold(
    opened: Sequence[tuple[str, Path, RunInfo, pd.DataFrame, Path]], trained: dict[str, list[int]]
) -> str:
    """One line: each member's folds, and the command that trains the fold most members already have."""
    counts = pd.Series([k for folds in trained.values() for k in folds]).value_counts()
    fold = int(min(counts[counts == counts.max()].index))  # the most shared fold (lowest on a tie)
    lacking = [(name, path, info) for name, path, info, _, _ in opened if fold not in trained[name]]
    which = "; ".join(f"{name}: {_fold_list(folds)}" for name, folds in trained.items())
    return (
        f"no fold was trained by every member ({which}); add fold {fold} to {' and '.join(n for n, _, _ in lacking)}, "
        "then ensemble again: " + "; ".join(_continue_command(name, path, info, fold) for name, path, info in lacking)
    )


def _fold_list(folds: Sequence[int]) -> str:
    return ("fold " if len(folds) == 1 else "folds ") + ",".join(map(str, folds))


def _continue_command(name: str, path: Path, info: RunInfo, fold: int) -> str:
    """The command that adds ``fold`` to a run (the same --name continues it); a teammate's run: its owner's."""
    if info.kind == "ensemble":
        return f"{name} is an ensemble: ensemble its members again once they share fold {fold}"
    if (path / PULLED).is_file():
        return (
            f"{info.user or 'its owner'} runs pstage train --config runs/{info.name}/config.yaml --name {info.name} "
            f"train.folds=[{fold}] --store URI"
        )
    runs = path.parent
    where = "" if runs.resolve() == Path("runs").resolve() else f" --runs {runs}"
    return f"pstage train --config {path / 'config.yaml'}{where} --name {path.name} train.folds=[{fold}]"


def _aligned(table: pd.DataFrame, order: pd.Series, num_classes: int, name: str, first: str, what: str) -> np.ndarray:
    """Probabilities of ``table`` in the order of ``order``'s image ids; refuses other image sets (the
    OOF tables here are cut to the shared folds, so a difference means other data, not other folds)."""
    indexed = table.set_index("image_id")
    if len(indexed) != len(order) or not indexed.index.isin(order).all():
        extra = indexed.index.difference(order)
        missing = pd.Index(order).difference(indexed.index)
        image = extra[0] if len(extra) else missing[0] if len(missing) else "?"
        raise RunError(
            f"{name} and {first} have {what} predictions for different images (first: {image}); "
            "were they trained on the same data?"
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
    lb_persons: int | None = None,
) -> EnsembleResult:
    """Blend finished runs by ``method`` and write the ensemble as a run directory ``runs_dir/name``.

    The blend is fitted and scored on the folds every member trained (members share the split,
    not necessarily the trained folds); the test predictions are blended whole. The result says
    which folds and how many persons the score rests on, the CV's bootstrap interval over
    persons, and P(each member beats the best) on a leaderboard of ``lb_persons`` persons
    (default: the test set's size; for the mask task its images / 7).

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
    if lb_persons is not None and lb_persons < 1:
        raise ConfigError(f"--lb-persons {lb_persons}: expected the leaderboard's size, at least 1 person")
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
    groups = members.nest_groups()  # what nested CV leaves out: the folds, or persons of a single fold
    tests = [m.test for m in members.runs] if members.test_ids is not None else None
    combiner = create_method(method, rounds=rounds).fit(probs, targets, folds)
    oof = combiner.predict_proba(probs)
    # a method that learns is scored by nested CV (fitted without the scored fold): the honest number
    nested_probs = nested_predict(combiner, probs, targets, folds, groups) if combiner.learns else oof
    oof = nested_probs if combiner.nested_oof else oof
    nested = fold_macro_f1(targets, nested_probs, folds)
    test = combiner.predict_proba(tests) if tests else None
    weights = combiner.member_weights(len(probs))
    history: list[dict[str, Any]] = getattr(combiner, "history_", [])

    calibration = None
    if calibrate:
        before = fold_macro_f1(targets, oof, folds)
        calibrator = ClassWeights().fit([oof], targets, folds)
        oof = nested_predict(calibrator, [oof], targets, folds, groups)
        nested_probs = oof
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
    interval = cv_interval(targets, oof, folds, members.persons)
    cv["interval"] = interval.record()
    members_cv = {m.name: fold_macro_f1(targets, m.oof, folds) for m in members.runs}
    result = EnsembleResult(
        name=name,
        path=run_dir,
        method=method,
        weights={m.name: float(w) for m, w in zip(members.runs, weights, strict=True)},
        cv=cv,
        nested_cv=float(nested),
        members_cv=members_cv,
        calibration=calibration,
        history=[{**h, "added": members.runs[h["added"]].name} for h in history],
        stacker=combiner.record(),
        folds=members.shared,
        split_folds=members.split_folds,
        persons=int(len(np.unique(members.persons))),
        images=len(members.oof),
        members_folds={m.name: m.folds for m in members.runs},
        members_own_cv={m.name: m.cv for m in members.runs},
        interval=interval,
    )
    result.shakeup = _shakeup(members, name, nested_probs, lb_persons)
    _write_run(run_dir, members, table, test, result, tta, started)
    if out is not None:
        target = Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "submission.csv", target)
    done = publish_after(run_dir, store, checkpoints=with_checkpoints, runs_dir=runs_dir)
    result.published = done.url if done else None
    return result


def _shakeup(members: Members, name: str, honest: np.ndarray, lb_persons: int | None) -> dict[str, Any]:
    """P(each run beats the best by CV on the shared folds) on a leaderboard of the test set's size.

    The ensemble takes part with its nested OOF (weights fitted without the scored persons), so it
    is not favoured by having been fitted on the rows it is compared on."""
    targets, folds = members.targets, members.folds
    candidates = {name: honest, **{m.name: m.oof for m in members.runs}}
    scores = {key: fold_macro_f1(targets, probs, folds) for key, probs in candidates.items()}
    best = max(scores, key=scores.__getitem__)
    size = None if members.test_ids is None else leaderboard_size(members.runs[0].info, len(members.test_ids))
    if lb_persons is not None:
        size = (lb_persons, "persons (--lb-persons)")
    if size is None:  # no test set: a leaderboard as large as the OOF
        size = (int(len(np.unique(members.persons))), "persons (no test set: the OOF's)")
    beats = {
        key: round(win_probability(targets, probs, candidates[best], members.persons, size[0]), 4)
        for key, probs in candidates.items()
        if key != best
    }
    return {
        "best": best,
        "leaderboard": size[0],
        "unit": size[1],
        "beats_best": beats,
        "draws": DRAWS,
        "scores": scores,
    }


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
                "cv_shared": [result.members_cv[m.name] for m in members.runs],
                "folds": [" ".join(map(str, m.folds)) for m in members.runs],
                "path": [str(m.path) for m in members.runs],
            }
        )
        records = [
            {**record, "folds": m.folds}
            for record, m in zip(weights.drop(columns="folds").to_dict("records"), members.runs, strict=True)
        ]
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
            "folds_trained": result.folds,
            "ensemble": {
                "method": result.method,
                "tta": tta,
                "members": records,
                "nested_cv_macro_f1": result.nested_cv,
                "history": result.history,
                "calibration": result.calibration,
                "stacker": result.stacker,
                "folds": result.folds,
                "split_folds": result.split_folds,
                "persons": result.persons,
                "images": result.images,
            },
            **({"shakeup": {k: v for k, v in result.shakeup.items() if k != "scores"}} if result.shakeup else {}),
            "duration_s": round(time.time() - started, 2),
        }
        run.write_info(info)
