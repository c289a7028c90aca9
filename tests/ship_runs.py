"""Tiny trained runs shared by the export, serve and distill tests (built once per session, idempotent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FAST

# fp32: the export tests compare ONNX (fp32) with the runs' own test.csv at 1e-4, which bf16 autocast
# (the CPU default) misses by ~1e-4 once the inputs are face crops.
# persons.group=off: the exported graph and the server predict photo by photo; grouping test photos
# by person is a set-level step of pstage train/predict that a per-image graph cannot reproduce
SHIP = [*FAST, "split.folds=2", "train.progress=none", "train.precision=32-true", "persons.group=off"]


def ship_runs(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/a (linear head), runs/b (multi-head, other seed) and runs/ens (hill of a and b).

    Trained into one folder under the session's base temp dir; a second caller finds them done
    (train() returns at once for a finished run), so the three test modules pay for them once.
    """
    import pstage

    runs = tmp_path_factory.getbasetemp() / "ship-runs"
    if not (runs / "ens" / "run.json").exists():
        pstage.train(data=demo_root, runs=runs, name="a", overrides=SHIP)
        pstage.train(data=demo_root, runs=runs, name="b", overrides=[*SHIP, "seed=1", "model.head=multi"])
        pstage.ensemble(["a", "b"], method="hill", runs_dir=runs, name="ens")
    return runs
