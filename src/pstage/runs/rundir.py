"""The run directory contract (shared/DESIGN.md): atomic writes, run.json, lookup by name, a lock.

Every file a later stage reads is written to a temporary name and renamed, so a crash leaves
either the old file or the new one, never half of one. run.json is written last.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pstage.core.errors import RunError
from pstage.core.io import read_json
from pstage.core.tasks import Task

RUN_FILE = "run.json"


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
    from pstage import __version__

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


def load_run_info(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: unreadable ({exc})") from None


class RunLock:
    """An exclusive lock on a run directory, so two processes never train the same run at once.

    flock is released by the kernel when the process dies, even by SIGKILL, so a crash never
    leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
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


class Run:
    """A run directory opened for reading (notebooks, board, ensembles): info plus its tables."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.info = load_run_info(self.path)

    def __repr__(self) -> str:
        return f"Run({self.name!r}, status={self.status!r}, cv={self.cv.get('macro_f1')})"

    @property
    def name(self) -> str:
        return self.info.get("name", self.path.name)

    @property
    def status(self) -> str:
        return self.info.get("status", "unknown")

    @property
    def cv(self) -> dict[str, Any]:
        return self.info.get("cv") or {}

    def config(self) -> dict[str, Any]:
        import yaml

        return yaml.safe_load((self.path / "config.yaml").read_text())

    def table(self, name: str) -> pd.DataFrame | None:
        """``oof``, ``test``, ``folds`` or ``submission`` as a DataFrame (None if the file is absent)."""
        path = self.path / f"{name}.csv"
        return pd.read_csv(path, dtype={"image_id": str, "ImageID": str, "group": str}) if path.exists() else None


def load_run(run: str | Path, runs: str | Path = "runs") -> Run:
    """Open a run by folder or by name under ``runs``."""
    return Run(resolve_run(run, runs))
