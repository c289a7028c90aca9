"""The run directory contract (shared/DESIGN.md): a typed run.json, the folder layout, lookup by name, a lock.

``RunDir`` is the one reader and writer of a run folder: its record (``RunInfo``), its finished
folds and their checkpoints, its output tables and, for an ensemble, its members and leaves.
Every file a later stage reads is written to a temporary name and renamed, so a crash leaves
either the old file or the new one, never half of one. run.json is written last.
"""

from __future__ import annotations

import fcntl
import getpass
import os
import re
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from pstage import __version__
from pstage.core.errors import RunError
from pstage.core.io import read_json, write_json
from pstage.core.tasks import Task
from pstage.runs.info import (
    RUN_FILE,
    CVScores,
    MemberRecord,
    RunInfo,
    RunInfoError,
    SubmissionFormat,
    parse_run_info,
    read_run_info,
)

if TYPE_CHECKING:
    from pstage.config import Config

__all__ = [
    "FINAL_DIR",
    "RUN_FILE",
    "Run",
    "RunDir",
    "RunInfo",
    "RunInfoError",
    "RunLock",
    "fold_id",
    "load_run",
    "provenance",
    "resolve_run",
    "submission_frame",
]

PULLED = ".pstage-store.json"  # in a run pulled from the team store: which store, uid and digest it came from
FINAL_DIR = "final"  # the final-fit model (train.final_fit); not fold_*: every fold_* consumer keeps its meaning
_FOLD_DIR = re.compile(r"fold_(\d+)")
TABLES = ("oof", "test", "folds", "submission", "weights", "oof_tta", "test_tta", "submission_tta")


def fold_id(path: str | Path) -> int | None:
    """The fold number of a ``fold_<k>`` folder (or of a file in one), else None."""
    path = Path(path)
    for part in (path.name, path.parent.name):
        match = _FOLD_DIR.fullmatch(part)
        if match:
            return int(match.group(1))
    return None


def submission_frame(test: pd.DataFrame, probs: np.ndarray, task: Task, test_format: str) -> pd.DataFrame:
    """The competition's ImageID,ans (eval/info.csv order), or image_id,label for other data."""
    preds = probs.argmax(1)
    if test_format == "competition":
        return pd.DataFrame({"ImageID": test["image_id"].to_numpy(), "ans": preds})
    return pd.DataFrame({"image_id": test["image_id"].to_numpy(), "label": [task.classes[i] for i in preds]})


def git_sha(cwd: str | Path | None = None) -> str | None:
    """The commit of the working directory's git repository, if there is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """Who ran it, where, with which code: the fields teammates need on a shared board."""
    try:  # $USER first: `USER=ana pstage train` names the teammate even where LOGNAME says otherwise
        user = os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"user": user, "host": socket.gethostname(), "git_sha": git_sha(), "pstage_version": __version__}


def resolve_run(run: str | Path, runs_dir: str | Path = "runs") -> Path:
    """A run directory from a path or a name under ``runs_dir``."""
    path = Path(run)
    for candidate in (path, Path(runs_dir) / str(run)):
        if (candidate / RUN_FILE).is_file():
            return candidate.resolve()
    if path.is_dir() or (Path(runs_dir) / str(run)).is_dir():
        raise RunError(f"{run}: a folder but not a pstage run (no {RUN_FILE}); was its training started?")
    raise RunError(
        f"run '{run}' not found (looked for {path} and {Path(runs_dir) / str(run)}); pass a run folder or a name under --runs"
    )


class RunLock:
    """An exclusive lock on a run directory, so two processes never train the same run at once.

    flock is released by the kernel when the process dies, even by SIGKILL, so a crash never
    leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._handle: Any = None

    def __enter__(self) -> RunLock:
        self._handle = open(self.path, "a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "another process"
            self._handle.close()
            raise RunError(
                f"{self.path.parent} is being trained right now by {holder}; wait for it or use another --name"
            ) from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._handle.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


class RunDir:
    """A run folder: its record, folds, checkpoints, output tables and (ensembles) members.

    ``info`` is read once on first use; ``read_info`` re-reads it (after another process wrote it).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._info: RunInfo | None = None

    @classmethod
    def find(cls, run: str | Path, runs_dir: str | Path = "runs") -> RunDir:
        """The run named ``run`` (a folder, or a name under ``runs_dir``); a missing one is a RunError."""
        return cls(resolve_run(run, runs_dir))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and self.path.resolve() == other.path.resolve()

    def __hash__(self) -> int:
        return hash(self.path.resolve())

    # --- the record -------------------------------------------------------------------------------

    @property
    def info_file(self) -> Path:
        return self.path / RUN_FILE

    def has_info(self) -> bool:
        """Whether run.json exists (a run that was at least started)."""
        return self.info_file.is_file()

    @property
    def info(self) -> RunInfo:
        if self._info is None:
            self._info = read_run_info(self.path)
        return self._info

    def read_info(self) -> RunInfo:
        """run.json as it is on disk now."""
        self._info = read_run_info(self.path)
        return self._info

    def write_info(self, info: RunInfo | Mapping[str, Any]) -> RunInfo:
        """Validate and write run.json atomically (callers write it last, holding the lock)."""
        typed = info if isinstance(info, RunInfo) else parse_run_info(dict(info), self.path)
        write_json(self.info_file, typed.record())
        self._info = typed
        return typed

    def update_info(self, **fields: Any) -> RunInfo:
        """Re-read run.json, set ``fields``, write it back (hold the lock around it)."""
        return self.write_info({**self.read_info().record(), **fields})

    def lock(self) -> RunLock:
        return RunLock(self.path)

    @property
    def name(self) -> str:
        return (self.info.name if self.has_info() else None) or self.path.name

    @property
    def status(self) -> str:
        return self.info.status

    @property
    def task(self) -> Task:
        return self.info.as_task()

    # --- folds, checkpoints ---------------------------------------------------------------------------

    def fold_dir(self, fold: int) -> Path:
        return self.path / f"fold_{fold}"

    @property
    def final_dir(self) -> Path:
        return self.path / FINAL_DIR

    def folds(self) -> list[int]:
        """The finished folds (a fold is finished when its metrics.json exists), ascending."""
        found = (fold_id(p) for p in self.path.glob("fold_*/metrics.json"))
        return sorted(k for k in found if k is not None)

    def fold_metrics(self, fold: int) -> dict[str, Any]:
        """fold_<k>/metrics.json: the fold's score, best epoch, history."""
        return read_json(self.fold_dir(fold) / "metrics.json")

    def checkpoints(self, file: str = "best.ckpt") -> dict[int, Path]:
        """fold -> its checkpoint ``file``, for every finished fold that has one, ascending."""
        return {k: self.fold_dir(k) / file for k in self.folds() if (self.fold_dir(k) / file).is_file()}

    def final_metrics(self) -> dict[str, Any]:
        """final/metrics.json: the final fit's mode, epochs, images."""
        return read_json(self.final_dir / "metrics.json")

    def final_done(self) -> bool:
        """Whether the final fit (``train.final_fit``) finished."""
        return (self.final_dir / "metrics.json").is_file()

    # --- outputs ----------------------------------------------------------------------------------------

    def output(self, name: str) -> Path:
        """The path of an output table (``oof``, ``test``, ``folds``, ``submission``, ..., ``_tta`` ones)."""
        return self.path / f"{name}.csv"

    def table(self, name: str) -> pd.DataFrame | None:
        """``oof``, ``test``, ``folds`` or ``submission`` as a DataFrame (None if the file is absent)."""
        path = self.output(name)
        return pd.read_csv(path, dtype={"image_id": str, "ImageID": str, "group": str}) if path.exists() else None

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    def config(self) -> dict[str, Any]:
        """config.yaml as a dict (as saved)."""
        return yaml.safe_load(self.config_file.read_text())

    def load_config(self) -> Config:
        """config.yaml validated as a Config."""
        from pstage.config import load_run_config  # the config layer sits below runs; imported here only for its cost

        return load_run_config(self.config_file)

    @property
    def submission_format(self) -> SubmissionFormat:
        """``competition`` (ImageID,ans) or ``generic`` (image_id,label); runs from before pstage
        recorded it in run.json are told by their submission.csv header."""
        if self.info.submission_format is not None:
            return self.info.submission_format
        path = self.output("submission")
        if path.exists() and path.read_text().split("\n", 1)[0].strip() == "ImageID,ans":
            return "competition"
        return "generic"

    # --- ensembles ------------------------------------------------------------------------------------

    def member(self, record: MemberRecord, runs_dir: str | Path = "runs") -> RunDir:
        """A member's run folder: the recorded path (unless the ensemble was pulled from the team store),
        else beside the ensemble (moved together, or pulled to ``runs/<user>/`` with its owner's own
        runs), else its name under ``runs_dir``."""
        pulled = (self.path / PULLED).is_file()  # then record.path is a folder on the teammate's machine
        if record.path and not pulled and (Path(record.path) / RUN_FILE).is_file():
            return RunDir(Path(record.path).resolve())
        beside = self.path.parent / record.run
        if (beside / RUN_FILE).is_file() and beside.resolve() != self.path.resolve():
            return RunDir(beside.resolve())
        try:
            return RunDir.find(record.run, runs_dir)
        except RunError:
            raise RunError(
                f"{self.name}: member {record.run} not found at {record.path} nor under {runs_dir}; pass --runs to the folder holding it"
            ) from None

    def members(self, runs_dir: str | Path = "runs") -> list[RunDir]:
        """An ensemble's member runs, in its order (empty for a training run)."""
        return [self.member(record, runs_dir) for record in self.info.members]

    def leaves(self, runs_dir: str | Path = "runs") -> list[RunDir]:
        """The training runs under this run: itself, or an ensemble's members' leaves, each once, in order."""
        if self.info.kind != "ensemble":
            return [self]
        out: list[RunDir] = []
        for member in self.members(runs_dir):
            out += [leaf for leaf in member.leaves(runs_dir) if leaf not in out]
        return out


class Run(RunDir):
    """A run directory opened for reading (notebooks, board, ensembles): info plus its tables."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.read_info()

    def __repr__(self) -> str:
        return f"Run({self.name!r}, status={self.status!r}, cv={self.info.score})"

    @property
    def cv(self) -> CVScores:
        return self.info.cv or CVScores()


def load_run(run: str | Path, runs: str | Path = "runs") -> Run:
    """Open a run by folder or by name under ``runs``."""
    return Run(resolve_run(run, runs))
