"""Resume after SIGKILL: a real process is killed mid-fold, then the same command finishes the run."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd

from tests.conftest import FAST, run_cli


def test_sigkill_mid_fold_then_resume(demo_root, tmp_path):
    args = [
        "train",
        "--data",
        str(demo_root),
        "--runs",
        str(tmp_path),
        "--name",
        "r",
        *FAST,
        "split.folds=2",
        "train.epochs=8",
    ]
    run = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pstage", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    target = run / "fold_1" / "last.ckpt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists(), proc.stdout.read().decode()[-3000:]

    # killed during fold 1: fold 0 is finished, fold 1 is not, the run is not done
    assert (run / "fold_0" / "metrics.json").exists()
    assert not (run / "fold_1" / "metrics.json").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "submission.csv").exists()
    fold0 = (run / "fold_0" / "metrics.json").stat().st_mtime_ns

    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming (folds 0 already done)" in out.stdout
    assert "fold 1: resumed from last.ckpt at epoch" in out.stdout
    assert (run / "fold_0" / "metrics.json").stat().st_mtime_ns == fold0  # not retrained
    metrics = json.loads((run / "fold_1" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] >= 1
    assert [row["epoch"] for row in metrics["history"]] == list(range(8))  # no epoch lost or doubled

    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and [f["fold"] for f in info["cv"]["folds"]] == [0, 1]
    assert len(pd.read_csv(run / "oof.csv")) == 7 * 30
