"""Optuna on a real PostgreSQL (started by the tests): workers sharing a study, a worker killed.

Each ``pstage tune`` worker is its own process, as on separate machines; trials are the tiny ones
of test_tune (32x24 images, one fold). The heartbeat is shortened by config keys so a killed
worker's trial turns FAIL in seconds instead of the default 3 minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pstage.tuning.study import open_storage
from tests.conftest import run_cli
from tests.postgres import postgres_server
from tests.test_tune import BASE

INTERVAL, GRACE = 1, 4  # tune.heartbeat_interval / tune.heartbeat_grace (seconds)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def _config(tmp_path: Path, **train: object) -> Path:
    path = tmp_path / "pg.yaml"
    values = {
        **BASE,
        "train": {**BASE["train"], **train},
        "tune": {
            "folds": [0],
            "pruner": "none",
            "heartbeat_interval": INTERVAL,
            "heartbeat_grace": GRACE,
            "space": {"optim.lr": {"low": 1e-3, "high": 3e-2, "log": True}},
        },
    }
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _worker(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pstage", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _trials(url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=open_storage(url)).get_trials()


@pytest.mark.slow
def test_two_workers_on_postgresql_finish_n_trials_once_each(tmp_path, demo_root, postgres):
    runs = tmp_path / "runs"
    args = ["tune", "--config", str(_config(tmp_path)), "--data", str(demo_root), "--runs", str(runs),
            "--trials", "4", "--storage", postgres, "--study", "p"]  # fmt: skip
    workers = [_worker(args) for _ in range(2)]
    logs = [w.communicate(timeout=400)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    trials = _trials(postgres, "p")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    # N between them (a worker may start one more if both finish in the same instant), none twice.
    assert 4 <= len(done) <= 5 and len(trials) == len(done)
    assert len({t.user_attrs["run"] for t in done}) == len(done)
    assert len({t.params["optim.lr"] for t in done}) == len(done)  # distinct proposals
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both took trials
    for t in done:
        assert json.loads((runs / t.user_attrs["run"] / "run.json").read_text())["status"] == "done"
    # A re-run continues the study (here: nothing left) instead of adding trials.
    again = run_cli(*args)
    assert again.returncode == 0 and "nothing to run" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert len(_trials(postgres, "p")) == len(trials)


@pytest.mark.slow
def test_killed_worker_trial_fails_by_heartbeat_and_the_survivor_completes(tmp_path, demo_root, postgres):
    runs = tmp_path / "runs"
    args = ["tune", "--config", str(_config(tmp_path, epochs=2)), "--data", str(demo_root), "--runs", str(runs),
            "--trials", "3", "--storage", postgres, "--study", "k"]  # fmt: skip
    doomed = _worker(args)
    history = runs / "k-000" / "fold_0" / "history.jsonl"  # the doomed worker's first trial, one epoch in
    deadline = time.time() + 300
    while not history.exists() and time.time() < deadline and doomed.poll() is None:
        time.sleep(0.2)
    assert history.exists(), doomed.communicate()[0][-3000:]
    survivor = _worker(args)
    os.kill(doomed.pid, signal.SIGKILL)  # mid-trial: no clean-up runs, the trial is left RUNNING
    killed_at = time.time()
    doomed.wait(timeout=30)
    log = survivor.communicate(timeout=400)[0]
    assert survivor.returncode == 0, log[-3000:]
    trials = _trials(postgres, "k")
    assert trials[0].state == TrialState.FAIL  # by the heartbeat: the killed worker could not mark it
    failed_after = trials[0].datetime_complete.timestamp() - killed_at
    assert GRACE - INTERVAL - 1 <= failed_after <= GRACE + 120, failed_after
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and len(trials) == 4  # the survivor completed the study: 3 finished trials
    assert len({t.params["optim.lr"] for t in done}) == 3
    for t in done:
        assert json.loads((runs / t.user_attrs["run"] / "run.json").read_text())["status"] == "done"
    again = run_cli(*args)
    assert again.returncode == 0 and "nothing to run" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert len(_trials(postgres, "k")) == 4
