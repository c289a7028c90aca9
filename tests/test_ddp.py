"""The distributed path for real: one fold with strategy=ddp on 2 CPU processes (gloo), one node or two."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tests.conftest import FAST, LEARN, free_port, run_cli


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


def _node(rank: int, port: int, runs: Path, data: Path, *extra: str) -> subprocess.Popen:
    """One 'machine' of a two-node DDP run: its own process, NODE_RANK, the shared rendezvous."""
    env = {**os.environ, "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.pop("LOCAL_RANK", None)
    return subprocess.Popen(
        [sys.executable, "-m", "pstage", "train", "--data", str(data), "--runs", str(runs), "--name", "two",
         *FAST, "train.folds=[0]", "train.num_nodes=2", "train.devices=1", "train.strategy=ddp",
         "train.accelerator=cpu", "train.num_workers=0", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_two_node_ddp_resumes_after_one_node_is_killed(demo_root, tmp_path):
    """train.num_nodes=2 as two processes on 127.0.0.1 (gloo); SIGKILL node 1 mid-fold, rerun both."""
    run = tmp_path / "two"
    port = free_port()
    nodes = [_node(rank, port, tmp_path, demo_root, "train.epochs=6") for rank in (0, 1)]
    last = run / "fold_0" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and all(n.poll() is None for n in nodes):
        time.sleep(0.1)
    assert last.exists(), "".join(n.communicate()[0][-2000:] for n in nodes)
    nodes[1].kill()  # one machine gone mid-fold: no clean-up on it
    try:
        nodes[0].wait(timeout=120)  # gloo notices the lost peer and the survivor fails
    except subprocess.TimeoutExpired:
        nodes[0].kill()  # a hung collective: the user stops the survivor too
    for n in nodes:
        n.communicate()
    assert json.loads((run / "run.json").read_text())["status"] in ("failed", "running")
    assert not (run / "fold_0" / "metrics.json").exists()

    port = free_port()
    nodes = [_node(rank, port, tmp_path, demo_root, "train.epochs=6") for rank in (0, 1)]
    logs = [n.communicate(timeout=400)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done"
    metrics = json.loads((run / "fold_0" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] >= 1  # continued from last.ckpt, not from scratch
    assert "resumed from last.ckpt" in logs[0]
    oof = pd.read_csv(run / "oof.csv")
    folds = pd.read_csv(run / "folds.csv")
    assert len(oof) == (folds["fold"] == 0).sum()  # every validation image once across the 2 nodes


def test_multi_node_run_needs_one_name(demo_root, tmp_path):
    """Each node would pick its own time-stamped name: refused before any folder exists."""
    out = run_cli("train", "--data", str(demo_root), "--runs", str(tmp_path), *FAST, "train.num_nodes=2")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train.num_nodes=2" in out.stderr and "--name" in out.stderr
    assert "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())
