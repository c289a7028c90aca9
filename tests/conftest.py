"""Shared fixtures: an offline, isolated environment and small generated datasets.

Everything runs on tiny images (32x24 model input from 64x48 photos) so the suite stays fast on
2 CPU cores; subprocess tests inherit the isolated HOME/XDG dirs, so no test writes to the real
home or reaches a network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Seconds-fast settings for tests of plumbing (outputs, resume, errors); not meant to learn much.
FAST = [
    "data.image_size=[32,24]",
    "model.name=test_resnet",
    "split.folds=3",
    "train.epochs=2",
    "train.batch_size=32",
    "optim.lr=0.01",
    "train.progress=epoch",
]
# The smallest setting measured to learn well above chance (CV macro F1 ~0.3 vs 0.056) in ~1 min
# on 2 cores: 120 persons of 64x48 photos, 3 folds x 12 epochs of timm's tiny test_resnet.
LEARN = [
    "data.image_size=[64,48]",
    "model.name=test_resnet",
    "split.folds=3",
    "train.epochs=12",
    "train.batch_size=32",
    "optim.lr=0.01",
    "train.progress=epoch",
    "tta.train=false",  # so that `pstage predict --tta` has a gain to measure (test_training)
]


def pytest_configure(config: pytest.Config) -> None:
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="pstage-test-home-"))
    os.environ.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        NO_ALBUMENTATIONS_UPDATE="1",
        PYTHONWARNINGS="ignore::DeprecationWarning",
        COLUMNS="200",
    )


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small competition-layout dataset (30 train persons, 6 eval persons, 64x48 photos); read-only by convention."""
    from pstage.demo.synthetic import make_demo_data

    return make_demo_data(
        tmp_path_factory.mktemp("demo") / "data", persons=30, eval_persons=6, image_size=(64, 48), seed=0
    )


@pytest.fixture(scope="session")
def learn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 train persons (64x48 photos): enough for a tiny model to learn in a minute."""
    from pstage.demo.synthetic import make_demo_data

    return make_demo_data(
        tmp_path_factory.mktemp("learn") / "data", persons=120, eval_persons=6, image_size=(64, 48), seed=1
    )


@pytest.fixture(scope="session")
def learned(learn_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real end-to-end CLI run, shared by the tests that inspect a finished run."""
    runs = tmp_path_factory.mktemp("runs")
    out = run_cli("train", "--data", str(learn_root), "--runs", str(runs), "--name", "base", *LEARN, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs / "base", out


@pytest.fixture
def demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the demo dataset that a test may damage."""
    return Path(shutil.copytree(demo_root, tmp_path / "data"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (for a server or a DDP rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m pstage ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "pstage", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
