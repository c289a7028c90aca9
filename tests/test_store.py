"""The team store on a real MLflow tracking server: publish, board, pull, ensemble, export, serve, failures.

One `mlflow server` (SQLite backend, served artifacts) runs for the module on 127.0.0.1; each
"machine" is its own runs folder and USER. Two real tiny trainings (ana's through the CLI, ben's
through the Python API) are shared by the module; the other runs are written by hand (random but
well-formed OOF on a shared split), and commands whose output a test does not check are called
in-process (the API) rather than as a `pstage` subprocess, so the module stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import FAST, run_cli
from tests.ship_runs import SHIP

mlflow = pytest.importorskip("mlflow")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` in a subprocess, from this venv, on a free port; kill() and start() again."""

    def __init__(self, root: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.args, self.env = list(args), env or {}  # e.g. --app-name basic-auth and its settings

    def start(self) -> None:
        exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
        cmd += ["server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts"), *self.args]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
        # its own process group: `mlflow server` runs uvicorn in child processes, which kill() must reach too
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
            env={**os.environ, **self.env},
        )
        deadline = time.time() + 300  # several seconds when quiet; minutes on a loaded 2-core box
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a crash or a pulled plug would."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.kill()


def machine(user: str) -> dict[str, str]:
    """The environment of a teammate's machine."""
    return {"USER": user, "LOGNAME": user}


@contextlib.contextmanager
def as_user(user: str):
    """In-process calls as a teammate (run.json's user comes from $USER)."""
    saved = {k: os.environ.get(k) for k in ("USER", "LOGNAME")}
    os.environ.update(machine(user))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_run(runs: Path, name: str, user: str, folds: pd.DataFrame, targets: pd.Series, seed: int) -> Path:
    """A finished run written by hand: random (target-leaning) OOF and test probabilities on ``folds``."""
    from pstage.config import dump_config, load_config
    from pstage.core.io import now
    from pstage.core.metrics import cv_scores, prob_columns
    from pstage.core.tasks import mask_task

    task, rng = mask_task(), np.random.default_rng(seed)
    run = runs / name
    run.mkdir(parents=True)
    folds.to_csv(run / "folds.csv", index=False)
    probs = rng.dirichlet(np.ones(18), size=len(folds))
    probs[np.arange(len(folds)), targets.to_numpy()] += rng.uniform(0, 1.5, len(folds))
    probs /= probs.sum(1, keepdims=True)
    cols = prob_columns(18)
    oof = pd.concat([folds[["image_id", "fold"]], targets.rename("target"), pd.DataFrame(probs, columns=cols)], axis=1)
    oof.to_csv(run / "oof.csv", index=False, float_format="%.6g")
    test_ids = [f"t{i:03d}.jpg" for i in range(12)]
    test = pd.DataFrame(rng.dirichlet(np.ones(18), size=12), columns=cols)
    pd.concat([pd.DataFrame({"image_id": test_ids}), test], axis=1).to_csv(run / "test.csv", index=False)
    pd.DataFrame({"ImageID": test_ids, "ans": test.to_numpy().argmax(1)}).to_csv(run / "submission.csv", index=False)
    dump_config(load_config(None, [*FAST, f"seed={seed}"]), run / "config.yaml")
    info = {
        "name": name, "status": "done", "created": now(), "finished": now(), "user": user, "host": f"{user}-box",
        "git_sha": "0123abc", "pstage_version": "0.1.0", "model": "test_resnet", "image_size": [32, 24],
        "epochs": 2, "task": task.to_dict(), "classes": task.classes, "cv": cv_scores(oof, task), "duration_s": 12.0,
    }  # fmt: skip
    (run / "run.json").write_text(json.dumps(info, indent=2))
    return run


@pytest.fixture(scope="module")
def split():
    """A split of 30 persons x 7 photos into 3 folds, with targets."""
    rng = np.random.default_rng(0)
    photos = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]
    rows = [(f"p{p:03d}/{photo}", f"p{p:03d}", p % 3) for p in range(30) for photo in photos]
    folds = pd.DataFrame(rows, columns=["image_id", "group", "fold"])
    person = {g: rng.integers(0, 6) for g in folds["group"].unique()}
    mask = (
        folds["image_id"].str.split("/").str[1].map(lambda s: 0 if s.startswith("mask") else (1 if "inc" in s else 2))
    )
    targets = pd.Series(mask * 6 + folds["group"].map(person), name="target")
    return folds, targets


def store_client(server: Server):
    return mlflow.tracking.MlflowClient(tracking_uri=server.uri)


def published(server: Server, name: str, user: str):
    client = store_client(server)
    ids = [e.experiment_id for e in client.search_experiments(filter_string="name LIKE 'pstage-%'")]
    runs = client.search_runs(ids, filter_string=f"tags.`pstage.name` = '{name}' and tags.`pstage.user` = '{user}'")
    return runs


# --- the team scenario -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def team(server, demo_root, tmp_path_factory):
    """ana trains r1 with --store --with-checkpoints (the CLI); ben trains r2 with pstage.train(store=...).

    fp32 and no person grouping (tests.ship_runs.SHIP): served predictions match test.csv per image.
    """
    import pstage

    root = tmp_path_factory.mktemp("team")
    ana = run_cli(
        "train", "--data", str(demo_root), "--runs", str(root / "ana"), "--name", "r1", "--store", server.uri,
        "--with-checkpoints", *SHIP, env=machine("ana"), timeout=900,
    )  # fmt: skip
    assert ana.returncode == 0, ana.stdout[-3000:] + ana.stderr[-3000:]
    with as_user("ben"):  # the Python API, as in a notebook; published without checkpoints
        ben = pstage.train(data=demo_root, runs=root / "ben", name="r2", overrides=[*SHIP, "seed=1"], store=server.uri)
    assert ben is not None and ben.status == "done"
    (root / "cho").mkdir()
    return root, ana, ben


def test_train_publishes_run_json_and_files(server, team):
    root, ana, _ = team
    assert "published ana/r1 (" in ana.stdout and f"{server.uri}/#/experiments/" in ana.stdout
    (run,) = published(server, "r1", "ana")
    info = json.loads((root / "ana" / "r1" / "run.json").read_text())
    assert run.data.tags["pstage.published"] and run.data.tags["mlflow.runName"] == "ana/r1"
    assert run.data.tags["pstage.user"] == "ana" and run.data.tags["mlflow.user"] == "ana"
    assert run.data.tags["pstage.kind"] == "train" and run.data.tags["pstage.host"] == info["host"]
    assert run.data.tags["pstage.git_sha"] == (info["git_sha"] or "")
    assert len(run.data.tags["pstage.split"]) == 10
    assert run.data.metrics["cv_macro_f1"] == pytest.approx(info["cv"]["macro_f1"])
    assert run.data.metrics["cv_age"] == pytest.approx(info["cv"]["per_task"]["age"])
    assert run.data.metrics["fold_1_macro_f1"] == pytest.approx(info["cv"]["folds"][1]["macro_f1"])
    assert run.data.params["model.name"] == "test_resnet" and run.data.params["split.folds"] == "2"
    client = store_client(server)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run.json", "oof.csv", "test.csv", "folds.csv", "config.yaml", "submission.csv"} <= names
    assert {"pstage-manifest.json", "fold_0", "fold_1"} <= names
    assert {a.path for a in client.list_artifacts(run.info.run_id, "fold_0")} >= {"fold_0/best.ckpt"}
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name.startswith("pstage-mask-")
    (ben_run,) = published(server, "r2", "ben")
    assert ben_run.info.experiment_id == run.info.experiment_id  # one experiment per competition
    assert team[2].published == f"{server.uri}/#/experiments/{ben_run.info.experiment_id}/runs/{ben_run.info.run_id}"


def test_third_machine_boards_pulls_and_ensembles(server, team, demo_root):
    root, _, _ = team
    cho = root / "cho"
    board = run_cli("board", "--store", server.uri, "--html", "board.html", cwd=cho, env=machine("cho"))
    assert board.returncode == 0, board.stderr
    lines = board.stdout.splitlines()
    assert any("ana/r1" in line and " ana " in line for line in lines), board.stdout
    assert any("ben/r2" in line and " ben " in line for line in lines), board.stdout
    assert "ana/r1" in (cho / "board.html").read_text()
    ens = run_cli(
        "ensemble", "r1", "r2", "--store", server.uri, "--name", "team", "--method", "mean", cwd=cho, env=machine("cho")
    )
    assert ens.returncode == 0, ens.stdout + ens.stderr
    assert (cho / "runs" / "team" / "run.json").exists() and (cho / "runs" / "ana" / "r1" / "oof.csv").exists()
    info = json.loads((cho / "runs" / "team" / "run.json").read_text())
    assert info["status"] == "done" and [m["run"] for m in info["ensemble"]["members"]] == ["ana/r1", "ben/r2"]
    assert not (cho / "runs" / "ana" / "r1" / "fold_0" / "best.ckpt").exists()  # an ensemble needs no checkpoints
    assert "published cho/team" in ens.stdout
    (run,) = published(server, "team", "cho")
    assert run.data.tags["pstage.kind"] == "ensemble" and run.data.tags["pstage.members"] == "ana/r1,ben/r2"
    board = run_cli("board", "--store", server.uri, "--sort", "name", cwd=cho, env=machine("cho"))
    assert "ana/r1" in board.stdout and "ben/r2" in board.stdout and "team" in board.stdout
    # on demand with checkpoints: predict pulls ana's fold models into the pulled copy
    pred = run_cli(
        "predict", "ana/r1", "--store", server.uri, "--data", str(demo_root), "--out", "p.csv", cwd=cho,
        env=machine("cho"),
    )  # fmt: skip
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert (cho / "runs" / "ana" / "r1" / "fold_0" / "best.ckpt").exists() and (cho / "p.csv").exists()


def _eval_images(demo_root: Path, count: int) -> list[tuple[str, bytes]]:
    names = pd.read_csv(demo_root / "eval" / "info.csv")["ImageID"].iloc[:count]
    return [(name, (demo_root / "eval" / "images" / name).read_bytes()) for name in names]


def _served_equals(served, test_csv: Path, demo_root: Path) -> None:
    """Three eval photos through the FastAPI app get the probabilities the ensemble wrote to test.csv."""
    from fastapi.testclient import TestClient

    from pstage.deploy.serve import create_app

    expected = pd.read_csv(test_csv).set_index("image_id")
    with TestClient(create_app(served)) as client:
        response = client.post("/predict", files=[("files", image) for image in _eval_images(demo_root, 3)])
    assert response.status_code == 200, response.text
    for prediction in response.json()["predictions"]:
        want = expected.loc[prediction["filename"], [f"p_{i}" for i in range(18)]].to_numpy(dtype=float)
        np.testing.assert_allclose(prediction["probabilities"], want, atol=1e-4)


def test_teammates_ensemble_exports_and_serves_from_an_empty_machine(server, team, demo_root):
    """ben blends ana's published r1 with his own r2 (the API); dan and eve, with empty runs folders,
    export and serve ben/duo: the members are pulled on demand, with their fold models."""
    import pstage
    from pstage.deploy.serve import load_served
    from pstage.runs.store import publish

    root = team[0]
    with as_user("ben"):
        duo = pstage.ensemble(["ana/r1", "r2"], method="mean", runs_dir=root / "ben", name="duo", store=server.uri)
    assert duo.published and (root / "ben" / "ana" / "r1" / "oof.csv").exists()
    (stored,) = published(server, "duo", "ben")
    assert stored.data.tags["pstage.members"] == "ana/r1,r2"  # r2 is ben's own: a bare name
    dan = root / "dan"
    dan.mkdir()
    # ben published r2 without its fold models: dan's export says what ben must run, and stops
    refused = run_cli("export", "ben/duo", "--store", server.uri, cwd=dan, env=machine("dan"))
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and [line for line in lines if line.startswith("error:")] == lines[-1:], lines
    assert "ben/r2 was published without its fold checkpoints" in lines[-1]
    assert "pstage push r2 --store URI --with-checkpoints" in lines[-1]
    assert not (dan / "runs" / "ben" / "r2").exists()
    # pushing the ensemble with checkpoints publishes its own members' fold models first
    publish("duo", server.uri, runs_dir=root / "ben", checkpoints=True)
    (r2,) = published(server, "r2", "ben")
    assert r2.data.tags["pstage.checkpoints"] == "true"
    out = run_cli("export", "ben/duo", "--store", server.uri, cwd=dan, env=machine("dan"))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    runs = dan / "runs"
    assert (runs / "ben" / "duo" / "export" / "model.onnx").exists()
    for member in ("ana/r1", "ben/r2"):  # ben's bare r2 lands beside his ensemble, where it is found
        assert sorted(p.parent.name for p in (runs / member).glob("fold_*/best.ckpt")) == ["fold_0", "fold_1"]
    assert "pulled ben/r2 from the store" in out.stderr
    test_csv = root / "ben" / "duo" / "test.csv"
    onnx = load_served("ben/duo", runs=runs)  # dan's export serves alone
    assert onnx.backend == "onnx"
    _served_equals(onnx, test_csv, demo_root)
    eve = root / "eve" / "runs"
    eve.mkdir(parents=True)
    with_torch = load_served("ben/duo", runs=eve, store=server.uri, backend="pytorch")
    assert with_torch.backend == "pytorch" and (eve / "ben" / "r2" / "fold_1" / "best.ckpt").exists()
    _served_equals(with_torch, test_csv, demo_root)


def test_pull_is_checksummed_resumable_and_cached(server, team, tmp_path):
    from pstage.runs.store import pull

    first = run_cli("pull", "ana/r1", "--store", server.uri, "--runs", str(tmp_path))
    assert first.returncode == 0, first.stderr
    run = tmp_path / "ana" / "r1"
    assert "file(s) downloaded" in first.stdout and (run / "run.json").exists()
    for name in ("oof.csv", "folds.csv", "test.csv", "config.yaml", "submission.csv"):
        assert (run / name).read_bytes() == (team[0] / "ana" / "r1" / name).read_bytes()
    assert pull("ana/r1", server.uri, tmp_path) == (run, 0)  # cached: nothing downloaded
    # an interrupted pull: run.json not there yet, one file damaged: only those two come again
    (run / "run.json").unlink()
    (run / "oof.csv").write_text("damaged")
    assert pull("ana/r1", server.uri, tmp_path) == (run, 2)
    assert (run / "oof.csv").read_bytes() == (team[0] / "ana" / "r1" / "oof.csv").read_bytes()


def test_same_name_from_two_users_stays_distinct(server, split, tmp_path):
    from pstage.runs.store import publish

    folds, targets = split
    for user, seed in (("ana", 3), ("ben", 4)):
        publish(make_run(tmp_path / user, "r18", user, folds, targets, seed), server.uri)
    moved = folds.copy()
    moved.loc[0, "fold"] = (moved.loc[0, "fold"] + 1) % 3  # one photo in another fold
    publish(make_run(tmp_path / "ben", "other-split", "ben", moved, targets, seed=5), server.uri)
    cho = tmp_path / "cho"
    cho.mkdir()
    ambiguous = run_cli("pull", "r18", "--store", server.uri, cwd=cho)
    assert ambiguous.returncode == 2 and "published by several users (ana/r18, ben/r18)" in ambiguous.stderr
    ens = run_cli("ensemble", "ana/r18", "ben/r18", "--store", server.uri, "--name", "e18", cwd=cho)
    assert ens.returncode == 0, ens.stderr
    weights = pd.read_csv(cho / "runs" / "e18" / "weights.csv")
    assert sorted(weights["run"]) == ["ana/r18", "ben/r18"]
    assert (cho / "runs" / "ana" / "r18").is_dir() and (cho / "runs" / "ben" / "r18").is_dir()
    bad = run_cli("ensemble", "ana/r18", "ben/other-split", "--store", server.uri, "--name", "bad", cwd=cho)
    assert bad.returncode == 2
    assert f"do not share a split: image {folds.loc[0, 'image_id']} is in fold" in bad.stderr, bad.stderr


def test_republish_updates_one_mlflow_run(server, split, tmp_path):
    from pstage.runs.store import publish

    folds, targets = split
    run = make_run(tmp_path, "again", "dee", folds, targets, seed=6)
    first = run_cli("push", str(run), "--store", server.uri)  # the CLI's line; the API below
    assert first.returncode == 0 and "published dee/again (6 file(s) uploaded)" in first.stdout, first.stderr
    second = publish(run, server.uri)
    assert second.unchanged and second.uploaded == 0
    (run / "report.html").write_text("<!doctype html><title>r</title><p>report</p>")
    third = publish(run, server.uri)
    assert not third.unchanged and third.uploaded == 1 and third.run_id == second.run_id
    (stored,) = published(server, "again", "dee")
    assert "report.html" in {a.path for a in store_client(server).list_artifacts(stored.info.run_id)}


def test_bad_or_unreachable_store_is_one_line(server, team, tmp_path):
    root = team[0]
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (
        ("push", "r1", "--runs", str(root / "ana"), "--store", dead),
        ("pull", "ana/r1", "--runs", str(tmp_path), "--store", dead),
        ("board", "--store", dead),
        ("board", "--store", "ftp://nowhere"),
        ("push", "r1", "--runs", str(root / "ana"), "--store", "127.0.0.1:5000"),
        ("pull", "nobody/nothing", "--runs", str(tmp_path), "--store", server.uri),
    ):
        out = run_cli(*args, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stderr.startswith("error:") and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not list(tmp_path.glob("ana/*"))
    # a store that is down never fails a training: one line says so, the run is done locally
    copy = Path(shutil.copytree(root / "ana", tmp_path / "ana-copy"))
    config = copy / "r1" / "config.yaml"
    out = run_cli("train", "--config", str(config), "--runs", str(copy), "--name", "r1", "--store", dead)
    assert out.returncode == 0, out.stderr[-2000:]
    warning = [line for line in out.stderr.splitlines() if "not published" in line]
    assert len(warning) == 1 and f"pstage push {copy / 'r1'} --store {dead}" in warning[0], out.stderr
    assert json.loads((copy / "r1" / "run.json").read_text())["status"] == "done"
    env = run_cli("board", cwd=tmp_path, env={"PSTAGE_STORE": dead})
    assert env.returncode == 2 and "unreachable" in env.stderr


def test_tune_publishes_its_trials_and_the_api_board_lists_them(server, demo_root, tmp_path, monkeypatch):
    """`pstage tune --store`: the finished trial runs are published (kind trial); pstage.board(store=) shows them."""
    import yaml

    import pstage
    from pstage.runs.store import StoreError

    config = tmp_path / "lrs.yaml"
    tiny = {  # tests/test_tune.py's tiniest study: one fold of one epoch per trial
        "data": {"image_size": [32, 24]}, "model": {"name": "test_resnet"}, "split": {"folds": 2},
        "train": {"epochs": 1, "batch_size": 32, "progress": "none"}, "optim": {"lr": 0.01}, "log": {"loggers": []},
        "tune": {"folds": [0], "space": {"optim.lr": [0.01, 0.02]}},
    }  # fmt: skip
    config.write_text(yaml.safe_dump(tiny))
    out = run_cli(
        "tune", "--config", str(config), "--trials", "1", "--data", str(demo_root), "--runs", str(tmp_path / "fay"),
        "--store", server.uri, env=machine("fay"), timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "published fay/lrs-000 (" in out.stdout
    (trial,) = published(server, "lrs-000", "fay")
    assert trial.data.tags["pstage.kind"] == "trial" and trial.data.tags["pstage.published"]
    monkeypatch.chdir(tmp_path)  # no ./runs here: the board is the store's alone
    board = pstage.board(store=server.uri).runs.set_index("name")
    assert board.loc["fay/lrs-000", "kind"] == "trial" and board.loc["fay/lrs-000", "user"] == "fay"
    assert board.loc["fay/lrs-000", "cv"] == pytest.approx(trial.data.metrics["cv_macro_f1"])
    with pytest.raises(StoreError, match="unreachable"):
        pstage.board(store=f"http://127.0.0.1:{free_port()}")


def test_distill_pulls_a_published_teacher_and_publishes_the_student(server, team, tmp_path):
    """pstage.distill(store=): gus, with an empty runs folder, distils ana's published r1; the student is published."""
    import pstage

    with as_user("gus"):
        result = pstage.distill(
            "ana/r1", name="kid", runs=tmp_path, store=server.uri, measure_speed=False,
            overrides=["train.epochs=1", "train.progress=none"],
        )  # fmt: skip
    assert (tmp_path / "ana" / "r1" / "fold_0" / "best.ckpt").exists()  # pulled with its fold models
    assert result.student.status == "done" and result.teacher == "r1"
    (kid,) = published(server, "kid", "gus")
    assert (
        kid.data.tags["pstage.published"]
        and kid.data.tags["pstage.split"] == published(server, "r1", "ana")[0].data.tags["pstage.split"]
    )  # the student trained on its teacher's split


class KillingProxy:
    """A TCP relay to the server that kills the server the moment a request for ``trigger`` passes."""

    def __init__(self, server: Server, trigger: bytes):
        self.server, self.trigger, self.fired = server, trigger, threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.server.port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if watch and self.trigger in chunk and not self.fired.is_set():
                    self.fired.set()
                    self.server.kill()  # mid-publish: some artifacts landed, this one never will
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_server_killed_mid_publish_leaves_it_unpublished_until_push(server, split, tmp_path):
    import pstage
    from pstage.runs.store import StoreError, publish, pull

    folds, targets = split
    run = make_run(tmp_path, "half", "eve", folds, targets, seed=7)
    proxy = KillingProxy(server, b"/artifacts/oof.csv HTTP")
    try:
        out = run_cli("push", str(run), "--store", proxy.uri)
    finally:
        proxy.close()
        assert proxy.fired.is_set()
        server.start()  # the same database and artifacts, as after a reboot
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    (stored,) = published(server, "half", "eve")
    assert stored.data.tags["pstage.published"] == ""  # created, some files, never marked published
    assert "eve/half" not in set(pstage.board([], store=server.uri).runs["name"])
    with pytest.raises(StoreError, match="publishing never completed.*pstage push half --store"):
        pull("eve/half", server.uri, tmp_path / "other")
    done = publish(run, server.uri)
    assert not done.unchanged and done.uploaded >= 1
    (again,) = published(server, "half", "eve")
    assert again.info.run_id == stored.info.run_id and again.data.tags["pstage.published"]
    assert "eve/half" in set(pstage.board([], store=server.uri).runs["name"])


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("PSTAGE_REQUIRE_BROWSER"), reason="no chromium (apt-get install chromium)"
)
def test_mlflow_ui_shows_the_team_runs(server, team, tmp_path):
    """The experiment page, in headless Chromium: the team's runs, with CV and per-task metric columns."""
    from playwright.sync_api import sync_playwright

    (run,) = published(server, "r1", "ana")
    metrics = ("cv_macro_f1", "cv_mask", "cv_gender", "cv_age")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 2400, "height": 800})
            page.goto(f"{server.uri}/#/experiments/{run.info.experiment_id}/runs", wait_until="load", timeout=180_000)
            page.get_by_text("ana/r1").first.wait_for(timeout=180_000)  # training runs view, not the GenAI pages
            page.get_by_text("ben/r2").first.wait_for(timeout=30_000)
            page.get_by_role(
                "button", name="Columns"
            ).first.click()  # the toolbar's; a second one appears in some layouts
            page.get_by_text(re.compile(r"^Metrics \(\d+\)$")).click()  # every metric becomes a column
            page.keyboard.press("Escape")
            page.wait_for_timeout(1000)
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "mlflow-ui.png"))
        finally:
            browser.close()
    for key in metrics:
        assert key in text, text[:3000]
    assert str(run.data.metrics["cv_macro_f1"])[:8] in text  # the value, in ana/r1's row


def test_store_code_keeps_mlflow_off_the_fast_paths():
    code = (
        "import sys; from pstage.cli import app; import pstage.runs.store, pstage.report.board; "
        "assert 'mlflow' not in sys.modules and 'torch' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
