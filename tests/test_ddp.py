"""The distributed path for real: one fold with strategy=ddp on 2 CPU processes (gloo)."""

import json

import numpy as np
import pandas as pd

from tests.conftest import LEARN, run_cli


def test_ddp_two_cpu_processes(learn_root, tmp_path):
    out = run_cli(
        "train",
        "--data",
        str(learn_root),
        "--runs",
        str(tmp_path),
        *LEARN,
        "train.folds=[0]",
        "train.strategy=ddp",
        "train.devices=2",
        "train.accelerator=cpu",
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # both processes wrote into the one auto-named run
    run = runs[0]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done"
    folds = pd.read_csv(run / "folds.csv")
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == (folds["fold"] == 0).sum()  # every validation image exactly once, despite 2 ranks
    assert oof.shape[1] == 3 + 18
    test = pd.read_csv(run / "test.csv")
    assert test.shape == (7 * 6, 1 + 18) and np.allclose(test.filter(like="p_").sum(1), 1, atol=1e-3)
    assert info["cv"]["macro_f1"] > 2 / 18, info["cv"]  # a sane model, not just the right shapes
    assert info["cv"]["per_task"]["gender"] > 0.6, info["cv"]
