"""Resume after SIGKILL: a real process is killed mid-fold, then the same command finishes the run,
with the same oof.csv, test predictions and epoch history as the same command run uninterrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tests.conftest import FAST, run_cli

EPOCHS = 6


def _args(data: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--runs",
        str(runs),
        "--name",
        name,
        *FAST,
        "split.folds=2",
        f"train.epochs={EPOCHS}",
        *extra,
    ]


def _kill_mid_epoch(args: list[str], model: Path, epochs_done: int = 3) -> None:
    """Start ``pstage ARGS`` and SIGKILL it once ``model`` has finished ``epochs_done`` epochs.

    history.jsonl gains epoch k's row just before last.ckpt of epoch k is written, so at that
    row count last.ckpt of epoch epochs_done - 2 or later exists and the kill lands while the
    next epoch trains (or, rarely, while the last epoch's last.ckpt is being written): the resume
    then restarts from a finished epoch's last.ckpt and trains again the epoch that was under way.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "pstage", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    history = model / "history.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if history.exists() and len(history.read_text().splitlines()) >= epochs_done:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (model / "last.ckpt").exists(), proc.stdout.read().decode()[-3000:]
    assert not (model / "metrics.json").exists()  # killed before the model finished


def _epochs(model: Path) -> list[dict]:
    """The model's epoch rows as metrics.json reports them, without their wall times."""
    history = json.loads((model / "metrics.json").read_text())["history"]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _distance(resumed: Path, uninterrupted: Path) -> str:
    """How far two oof.csv are apart: the largest probability difference and the changed predictions."""
    a, b = pd.read_csv(resumed / "oof.csv"), pd.read_csv(uninterrupted / "oof.csv")
    p, q = a.filter(like="p_").to_numpy(), b.filter(like="p_").to_numpy()
    changed = int((p.argmax(1) != q.argmax(1)).sum())
    return f"oof.csv differs: max |p diff| {np.abs(p - q).max():.3g}, {changed} of {len(p)} predicted classes changed"


def _assert_same_run(resumed: Path, uninterrupted: Path, model: str) -> None:
    """Bit-for-bit the same predictions and the same training curve (every epoch's losses and F1).

    oof.csv and test.npy come from the best epoch's weights: they test the resumed training when
    that epoch came after the kill (as in the first test's fold 1); the history always does.
    """
    same = (resumed / "oof.csv").read_bytes() == (uninterrupted / "oof.csv").read_bytes()
    assert same, _distance(resumed, uninterrupted)
    assert np.array_equal(np.load(resumed / model / "test.npy"), np.load(uninterrupted / model / "test.npy"))
    assert _epochs(resumed / model) == _epochs(uninterrupted / model)


def test_sigkill_mid_fold_then_resume(demo_root, tmp_path):
    """The batched (device) augmentation path: 32x24 images on a CPU, no loader workers."""
    args = _args(demo_root, tmp_path, "r")
    run = tmp_path / "r"
    _kill_mid_epoch(args, run / "fold_1")

    # killed during fold 1: fold 0 is finished, fold 1 is not, the run is not done
    assert (run / "fold_0" / "metrics.json").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "submission.csv").exists()
    fold0 = (run / "fold_0" / "metrics.json").stat().st_mtime_ns

    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming (folds 0 already done)" in out.stdout
    assert "fold 1: resumed from last.ckpt at epoch" in out.stdout
    assert (run / "fold_0" / "metrics.json").stat().st_mtime_ns == fold0  # not retrained
    metrics = json.loads((run / "fold_1" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] >= 2
    assert [row["epoch"] for row in metrics["history"]] == list(range(EPOCHS))  # no epoch lost or doubled

    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and [f["fold"] for f in info["cv"]["folds"]] == [0, 1]
    assert len((run / "oof.csv").read_text().splitlines()) == 7 * 30 + 1

    # the same command, never interrupted (another name: its own run folder)
    ref = run_cli(*_args(demo_root, tmp_path, "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    _assert_same_run(run, tmp_path / "ref", "fold_1")


def test_resume_equal_with_loader_augmentation(demo_root, tmp_path):
    """The albumentations path in a loader worker (persistent: its stream would carry over
    epochs) with the class-balanced sampler; one fold to stay cheap."""
    extra = ["augment.device=false", "train.num_workers=1", "train.sampler=balanced", "train.folds=[0]"]
    args = _args(demo_root, tmp_path, "r", *extra)
    _kill_mid_epoch(args, tmp_path / "r" / "fold_0")
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "fold_0" / "metrics.json").read_text())["resumed_from_epoch"] >= 2

    ref = run_cli(*_args(demo_root, tmp_path, "ref", *extra))
    assert ref.returncode == 0, ref.stderr[-3000:]
    _assert_same_run(tmp_path / "r", tmp_path / "ref", "fold_0")
