"""``pstage tune --backend ray`` for real: Ray Tune + ASHA on a local Ray (2 CPUs), trials as runs.

Ray starts in the ``pstage`` subprocess (about 5-15 s on 2 cores), each trial in a Ray worker
process that imports torch and Lightning again, so these tests are the suite's slowest tune tests:
two of them, a few trials of 32x24 images, one fold, one epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from pstage.report.board import load_board
from pstage.tuning.study import open_storage, storage_url
from tests.conftest import run_cli
from tests.test_tune import BASE

pytest.importorskip("ray", reason="the ray extra is part of the set-up (make venv)")


def _config(tmp_path: Path, name: str, **tune: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**BASE, "tune": {"folds": [0], **tune}}, sort_keys=False))
    return path


def _trials(runs: Path, study: str) -> list:
    import optuna

    return optuna.load_study(study_name=study, storage=open_storage(storage_url(None, runs))).get_trials()


@pytest.mark.slow
def test_ray_backend_trials_are_runs_and_a_crashing_trial_is_failed(tmp_path, demo_root):
    runs = tmp_path / "runs"
    # Seed 6 proposes transformer-engine first (it cannot run here: the trial is refused before its run
    # folder exists), then 32-true twice: the refusal is FAIL and the search goes on until 2 trials are
    # finished, as with Optuna.
    path = _config(
        tmp_path,
        "rayst",
        seed=6,
        space={
            "train.precision": ["transformer-engine", "32-true"],
            "optim.lr": {"low": 1e-3, "high": 3e-2, "log": True},
        },
    )
    out = run_cli(
        "tune", "--config", str(path), "--data", str(demo_root), "--runs", str(runs), "--trials", "2",
        "--backend", "ray", timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials = _trials(runs, "rayst")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].params["train.precision"] == "transformer-engine"
    assert not (runs / "rayst-000").exists()  # refused before anything was written
    assert "trial rayst-000 failed: train.precision=transformer-engine needs a CUDA GPU" in " ".join(out.stdout.split())
    assert "going on" in out.stdout
    for t in trials[1:]:
        info = json.loads((runs / t.user_attrs["run"] / "run.json").read_text())
        assert info["status"] == "done" and info["cv"]["macro_f1"] == pytest.approx(t.value)
        assert t.user_attrs["worker"].startswith("ray:")
    board = load_board([runs])  # the done trials are ordinary runs on the board; the crashed one is not
    assert sorted(board.runs["name"]) == ["rayst-001", "rayst-002"]
    assert "study rayst: 2 complete" in out.stdout and (runs / "tune" / "rayst" / "best.yaml").is_file()
    # Re-running at the same target runs nothing (and does not start Ray).
    again = run_cli(
        "tune",
        "--config",
        str(path),
        "--data",
        str(demo_root),
        "--runs",
        str(runs),
        "--trials",
        "2",
        "--backend",
        "ray",
    )
    assert again.returncode == 0 and "2/2 trials finished" in again.stdout and "Ray up" not in again.stdout
    assert len(_trials(runs, "rayst")) == 3


@pytest.mark.slow
def test_ray_backend_ctrl_c_marks_the_running_trial_failed_and_exits_130(tmp_path, demo_root):
    runs = tmp_path / "runs"
    path = _config(tmp_path, "raystop", space={"optim.lr": [0.01, 0.02]})
    worker = subprocess.Popen(
        [sys.executable, "-m", "pstage", "tune", "--config", str(path), "--trials", "3", "--data", str(demo_root),
         "--runs", str(runs), "--backend", "ray", "train.epochs=30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal would (see test_tune)
    )  # fmt: skip
    history = runs / "raystop-000" / "fold_0" / "history.jsonl"
    deadline = time.time() + 300
    while not history.exists() and time.time() < deadline and worker.poll() is None:
        time.sleep(0.5)
    assert history.exists(), worker.communicate()[0][-3000:]
    os.kill(worker.pid, signal.SIGINT)
    out = worker.communicate(timeout=120)[0]
    assert worker.returncode == 130, out[-3000:]
    assert "interrupted: trial 0 (raystop-000) marked failed" in out
    assert [t.state for t in _trials(runs, "raystop")] == [TrialState.FAIL]
    assert json.loads((runs / "raystop-000" / "run.json").read_text())["status"] == "failed"
