"""``RunInfo``: run.json as a typed record (pydantic), read and written only here.

Every field is optional and unknown keys are kept, so a run.json written by any earlier pstage
(e.g. commit e3ee71b, before ``kind`` and ``submission_format`` were recorded for training runs)
loads, and a record written back keeps exactly the keys it was read with (``exclude_unset``).
Dict-style reads (``info["cv"]``, ``info.get("tta")``) stay for notebooks written against the
raw JSON (``pstage.load_run(...).info``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pstage.core.errors import RunError
from pstage.core.tasks import Task

RUN_FILE = "run.json"
Kind = Literal["run", "ensemble", "trial"]  # trained by ``train``, blended by ``ensemble``, trained by ``tune``
Status = Literal["running", "done", "failed", "unknown"]
SubmissionFormat = Literal["competition", "generic"]  # ImageID,ans (eval/info.csv order) | image_id,label


class Record(BaseModel):
    """A JSON object with typed known keys, unknown keys kept, and read-only dict access to its JSON form."""

    model_config = ConfigDict(extra="allow")

    def record(self) -> dict[str, Any]:
        """The JSON object as written: only the keys that were read or set."""
        return self.model_dump(mode="json", exclude_unset=True)

    def __getitem__(self, key: str) -> Any:
        return self.record()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.record()

    def get(self, key: str, default: Any = None) -> Any:
        return self.record().get(key, default)


class FoldScore(Record):
    """One fold's line of ``cv.folds``: its macro F1 on its held-out persons."""

    fold: int
    macro_f1: float
    images: int | None = None
    best_epoch: int | None = None  # training runs only (0-based)
    duration_s: float | None = None


class IntervalRecord(Record):
    """``cv.interval``: the CV's bootstrap interval over persons (``pstage.core.shakeup``)."""

    low: float
    high: float
    std: float | None = None
    persons: int | None = None
    draws: int | None = None
    level: float | None = None


class CVScores(Record):
    """``cv``: macro F1 mean/std over folds (the board's score), pooled OOF, per fold and per task."""

    macro_f1: float | None = None
    macro_f1_std: float | None = None
    oof_macro_f1: float | None = None
    accuracy: float | None = None
    folds: list[FoldScore] = []
    per_task: dict[str, float] = {}
    interval: IntervalRecord | None = None  # ensembles record it; the board computes it for other runs


class TTARecord(Record):
    """``tta`` of a training run (``pstage predict --tta`` on its own data): the views and the CV with them."""

    config: dict[str, Any] | None = None
    views: str | None = None
    cv: CVScores | None = None
    created: str | None = None


class MemberRecord(Record):
    """One member of an ensemble: its run name, weight, CV and the folder it was read from."""

    run: str
    weight: float
    cv_macro_f1: float | None = None  # the member's own CV (on the folds it trained)
    path: str | None = None
    folds: list[int] | None = None  # the folds the member trained
    cv_shared: float | None = None  # its CV on the ensemble's folds (those every member trained)


class EnsembleSpec(Record):
    """``ensemble``: how the members were combined (enough for export to rebuild it as a graph)."""

    method: str
    tta: bool = False
    members: list[MemberRecord] = []
    nested_cv_macro_f1: float | None = None
    history: list[dict[str, Any]] = []
    calibration: dict[str, Any] | None = None
    stacker: dict[str, Any] | None = None
    folds: list[int] | None = None  # the folds every member trained: what the blend is fitted and scored on
    split_folds: int | None = None  # how many folds the members' split has
    persons: int | None = None  # persons (groups) on those folds
    images: int | None = None


class ShakeupRecord(Record):
    """``shakeup`` of an ensemble: P(each run beats the best) on a leaderboard of ``leaderboard`` units."""

    best: str
    leaderboard: int
    unit: str  # what one unit of the leaderboard is: persons, or images
    beats_best: dict[str, float] = {}
    draws: int | None = None


class LeaderboardScore(Record):
    """One line of ``leaderboard``: a public-leaderboard score logged by ``pstage lb`` for the run's submission."""

    score: float
    at: str
    user: str | None = None
    cv: float | None = None  # the run's CV when the score was logged (the CV of the scored submission)
    submission: str | None = None  # sha256 (16 hex) of the scored file, to tell a later, different submission
    file: str | None = None  # submission.csv, or submission_tta.csv
    note: str | None = None


class RunInfo(Record):
    """run.json: identity, status, provenance, what was trained, the CV; one record per run folder."""

    name: str | None = None
    kind: Kind = "run"
    status: Status = "unknown"
    error: str | None = None  # why a failed run failed
    created: str | None = None
    finished: str | None = None
    user: str | None = None  # provenance: who, where, with which code
    host: str | None = None
    git_sha: str | None = None
    pstage_version: str | None = None
    model: str | None = None
    image_size: list[int] | None = None
    epochs: int | None = None
    duration_s: float | None = None
    task: dict[str, Any] | None = None
    classes: list[str] | None = None
    submission_format: SubmissionFormat | None = None  # absent in runs before it was recorded: see RunDir
    cv: CVScores | None = None
    tta: TTARecord | None = None
    folds_trained: list[int] | None = None
    ensemble: EnsembleSpec | None = None
    distilled_from: dict[str, Any] | None = None
    trial: dict[str, Any] | None = None  # a tune trial: its study and number
    time_budget: dict[str, Any] | None = None  # train.time: the budget, planned vs actual epochs and seconds
    shakeup: ShakeupRecord | None = None
    leaderboard: list[LeaderboardScore] | None = None  # public-leaderboard scores (``pstage lb``), oldest first

    @property
    def done(self) -> bool:
        """Finished: the only state the board, ensembles, export and predict accept."""
        return self.status == "done"

    @property
    def score(self) -> float | None:
        """The CV macro F1 (mean over folds), if the run has one."""
        return self.cv.macro_f1 if self.cv is not None else None

    @property
    def members(self) -> list[MemberRecord]:
        """An ensemble's members in the order they were given (empty for a training run)."""
        return list(self.ensemble.members) if self.ensemble is not None else []

    def as_task(self) -> Task:
        """The run's task (classes and heads)."""
        if self.task is None:
            raise RunError(f"{self.name}: {RUN_FILE} records no task; was the run trained by pstage?")
        return Task.from_dict(self.task)

    def updated(self, **fields: Any) -> RunInfo:
        """A copy with ``fields`` set (validated), every other key as it was."""
        return RunInfo.model_validate({**self.record(), **fields})


class RunInfoError(RunError):
    """run.json missing, unreadable or not a run record; ``reason`` is the short why (the board lists it)."""

    def __init__(self, run_dir: Path, reason: str):
        super().__init__(f"{run_dir}: {reason}")
        self.reason = reason


def parse_run_info(values: Any, run_dir: Path) -> RunInfo:
    """A run.json object validated as a RunInfo; anything else is a RunInfoError naming the key."""
    if not isinstance(values, dict):
        raise RunInfoError(run_dir, f"{RUN_FILE} is not a run record")
    try:
        return RunInfo.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RunInfoError(run_dir, f"{RUN_FILE} is not a run record ({where}: {first['msg']})") from None


def read_run_info(run_dir: Path) -> RunInfo:
    """run.json of ``run_dir``, typed; a missing, unreadable or malformed file is one RunInfoError."""
    path = run_dir / RUN_FILE
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunInfoError(run_dir, f"no {RUN_FILE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunInfoError(run_dir, f"{RUN_FILE} unreadable ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise RunInfoError(run_dir, f"{RUN_FILE} is not valid JSON (line {exc.lineno}); a crashed copy?") from None
    return parse_run_info(values, run_dir)
