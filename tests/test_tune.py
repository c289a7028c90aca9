"""``pstage tune``: search space validation, seeding, cross-fold reporting, and real (tiny) studies.

Trials train on the 30-person demo data at 32x24 with one fold of 1-2 epochs, so a trial takes a
few seconds. Pruning is made deterministic with the threshold pruner: ``prune_below`` above any
possible F1 prunes every trial that reaches step 1, and one warm-up step spares the 1-epoch trials.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pstage.config import load_config
from pstage.core.errors import ConfigError
from pstage.tuning.reporter import CrossFoldReporter
from pstage.tuning.space import check_space
from pstage.tuning.study import TrialSeededSampler, open_storage, storage_url
from pstage.tuning.tune import tune
from tests.conftest import run_cli

BASE = {
    "data": {"image_size": [32, 24]},
    "model": {"name": "test_resnet"},
    "split": {"folds": 2},
    "train": {"epochs": 1, "batch_size": 32, "progress": "none"},
    "optim": {"lr": 0.01},
    "log": {"loggers": []},
}


def _config(tmp_path: Path, name: str = "cfg", **tune: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**BASE, "tune": {"folds": [0], **tune}}, sort_keys=False))
    return path


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


# ---------------------------------------------------------------------------------------------
# Fast: validation, seeding, reporting


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"optim.lrr": {"low": 1e-4, "high": 1e-2}},
            "unknown key 'optim.lrr' in the search space; did you mean 'optim.lr'?",
        ),
        ({"model.name": []}, "tune.space[model.name]': empty categorical"),
        ({"optim.lr": {"low": 0.1, "high": 0.01}}, "tune.space[optim.lr]': low (0.1) must be below high (0.01)"),
        ({"optim.lr": {"low": 0.0, "high": 0.1, "log": True}}, "log scale needs low > 0"),
        ({"optim.lr": {"low": 1e-3}}, "a range needs both low and high"),
        ({"train.folds": [[0], [1]]}, "'train.folds' cannot be searched"),
        ({"train.epochs": {"type": "int", "low": 1.5, "high": 4}}, "an int range needs integer low, high and step"),
    ],
)
def test_bad_search_space_is_one_line_naming_the_key(space, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, {"tune": {"space": space}})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_space_shorthands_and_values_checked_against_the_config():
    cfg = load_config(
        None,
        [
            "tune.space={optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}, data.image_size: [[32, 24], [40, 30]]}",
            "tune.space.model.name=[test_resnet, resnet10t]",  # nested override flattens to a dotted key
        ],
    )
    assert set(cfg.tune.space) == {"optim.lr", "data.image_size", "model.name"}
    assert cfg.tune.space["data.image_size"].choices == [[32, 24], [40, 30]]
    assert load_config(cfg.to_dict()) == cfg  # a run's config.yaml with a space reloads unchanged
    check_space(cfg)  # valid: nothing raised
    for bad, message in [
        ("tune.space={optim.lr: {low: -1.0, high: 1.0}}", "tune.space[optim.lr]: -1.0 is not a valid value"),
        ("tune.space={model.name: [test_resnet, no_such_net]}", "tune.space[model.name]"),
        ("tune.space={loss.name: {low: 1, high: 2}}", "'loss.name' is not a number; give choices"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_space(load_config(None, [bad]))


def test_storage_specs_and_unreachable_storage_are_one_line(tmp_path):
    assert storage_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'tune.db'}"
    assert storage_url("x.log", tmp_path) == "x.log"
    assert isinstance(open_storage(f"journal:{tmp_path / 'team' / 'mask.log'}"), optuna.storages.JournalStorage)
    with pytest.raises(ConfigError, match="expected an SQLAlchemy URL"):
        storage_url("somewhere", tmp_path)
    with pytest.raises(ConfigError, match=r"cannot open it .*folder .* does not exist\); check the path"):
        open_storage("sqlite:////nonexistent/deeper/tune.db")
    # No server listens on port 1: a missing driver or a refused connection, either way one line.
    with pytest.raises(ConfigError) as info:
        open_storage("postgresql://team:secret@127.0.0.1:1/studies")
    assert "cannot open it" in str(info.value) and "secret" not in str(info.value)
    assert "\n" not in str(info.value)


def test_workers_with_one_seed_sample_different_trials_reproducibly():
    """Two workers (two samplers, same seed, one storage) must not propose the same startup trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.InMemoryStorage()

    def worker() -> optuna.Study:
        return optuna.create_study(
            storage=storage,
            study_name="s",
            direction="maximize",
            load_if_exists=True,
            sampler=TrialSeededSampler("tpe", 7, 5),
        )

    a, b = worker(), worker()
    ta, tb = a.ask(), b.ask()
    xa, xb = ta.suggest_float("x", 0, 1), tb.suggest_float("x", 0, 1)
    assert ta.number != tb.number and xa != xb
    # Trial n always samples with seed + n: a fresh study reproduces the same first value.
    fresh = optuna.create_study(sampler=TrialSeededSampler("tpe", 7, 5))
    assert fresh.ask().suggest_float("x", 0, 1) == xa


def test_cross_fold_reporter_runs_steps_on_across_folds():
    seen: list[tuple[float, int]] = []
    reporter = CrossFoldReporter([2, 0], epochs=3, report=lambda value, step, where: seen.append((value, step)))
    for fold, scores in ((2, [0.2, 0.5, 0.4]), (0, [0.1, 0.3, 0.2])):
        for epoch, score in enumerate(scores):
            reporter.epoch_end(fold, epoch, score)
    assert [s for _, s in seen] == [0, 1, 2, 3, 4, 5]
    values = [v for v, _ in seen]
    assert values[:3] == [0.2, 0.5, 0.5]  # best so far within a fold: never drops
    assert values[-1] == pytest.approx((0.5 + 0.3) / 2)  # the mean of the folds' best epochs, like cv.macro_f1


def test_backend_ray_without_ray_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed: import ray fails
    with pytest.raises(ConfigError, match=r"pip install 'pstage\[ray\]'"):
        tune(_config(tmp_path), trials=1, data=tmp_path, runs=tmp_path / "runs", backend="ray")


def test_cli_bad_space_key_exits_2_with_one_line(tmp_path):
    path = _config(tmp_path, space={"optim.lrr": [0.1, 0.01]})
    out = run_cli("tune", "--config", str(path), "--trials", "2", "--data", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: config key 'tune.space': unknown key 'optim.lrr' in the search space; did you mean 'optim.lr'?"
    ]


# ---------------------------------------------------------------------------------------------
# Slow: real studies


@pytest.mark.slow
def test_study_prunes_resumes_and_its_best_config_trains_as_is(tmp_path, demo_root):
    from pstage.training.train import train

    runs = tmp_path / "runs"
    storage = str(tmp_path / "team.journal")  # Optuna's journal file (the NFS-friendly storage)
    path = _config(
        tmp_path,
        name="mask-v1",
        seed=2,  # trial n samples with seed 2+n: epochs come out [1, 2, 1, 2, 1]
        pruner="threshold",
        prune_below=1.01,  # no F1 reaches it: every trial that reaches step 1 (a 2nd epoch) is pruned
        pruner_warmup_steps=1,
        space={"train.epochs": [1, 2], "optim.lr": {"low": 1e-3, "high": 3e-2, "log": True}},
    )
    result = tune(path, trials=4, storage=storage, data=demo_root, runs=runs)
    study = _study(storage, "mask-v1")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED] * 2
    for t in trials:
        info = json.loads((runs / t.user_attrs["run"] / "run.json").read_text())
        assert t.user_attrs["run"] == f"mask-v1-{t.number:03d}"
        if t.state == TrialState.COMPLETE:  # a normal, finished run: on the board, ensemble-able
            assert info["status"] == "done"
            assert info["cv"]["macro_f1"] == pytest.approx(t.value)
            assert t.params["train.epochs"] == 1
        else:  # pruned: never done, pruning step recorded, no resumable checkpoint left behind
            assert info["status"] == "failed" and "pruned at step 1" in info["error"]
            assert t.intermediate_values.keys() == {0, 1}
            assert not list((runs / t.user_attrs["run"]).glob("fold_*/last.ckpt"))
    assert result.counts == {"COMPLETE": 2, "PRUNED": 2}
    assert result.best is not None and result.best["run"] in ("mask-v1-000", "mask-v1-002")
    out = runs / "tune" / "mask-v1"
    assert {"best.yaml", "trials.csv", "history.png", "intermediate.png", "importances.json"} <= {
        p.name for p in out.iterdir()
    }
    assert set(json.loads((out / "importances.json").read_text())) == {"train.epochs", "optim.lr"}

    # Re-running continues the study up to --trials: nothing to do at 4, one more trial at 5.
    tune(path, trials=4, storage=storage, data=demo_root, runs=runs)
    assert len(_study(storage, "mask-v1").trials) == 4
    tune(path, trials=5, storage=storage, data=demo_root, runs=runs)
    trials = _study(storage, "mask-v1").get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4] and trials[4].state == TrialState.COMPLETE
    assert sorted(p.name for p in runs.glob("mask-v1-*")) == [f"mask-v1-{n:03d}" for n in range(5)]

    # --show reports from the storage alone; the best config trains as-is (every fold).
    shown = tune(study="mask-v1", storage=storage, runs=runs, show=True)
    assert shown.best is not None and shown.files["best_config"] == out / "best.yaml"
    best_cfg = load_config(out / "best.yaml")
    assert best_cfg.train.folds is None and best_cfg.tune.space == {}
    assert best_cfg.optim.lr == pytest.approx(shown.best["params"]["optim.lr"])
    retrained = train(out / "best.yaml", runs=runs, name="mask-v1-best")
    assert retrained is not None and retrained.status == "done"
    assert [f["fold"] for f in retrained.cv["folds"]] == [0, 1]


@pytest.mark.slow
def test_two_workers_on_one_storage_share_the_trials(tmp_path, demo_root):
    runs = tmp_path / "runs"
    path = _config(tmp_path, name="team", pruner="none", space={"optim.lr": {"low": 1e-3, "high": 3e-2, "log": True}})
    args = ["tune", "--config", str(path), "--trials", "4", "--data", str(demo_root), "--runs", str(runs)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "pstage", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    study = _study(storage_url(None, runs), "team")
    finished = study.get_trials(states=(TrialState.COMPLETE,))
    # N between them (a worker may start one more if both finish in the same instant).
    assert 4 <= len(finished) <= 5 and len(study.trials) == len(finished)
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both took trials
    assert len({t.user_attrs["run"] for t in finished}) == len(finished)  # no trial run twice
    assert len({t.params["optim.lr"] for t in finished}) == len(finished)  # distinct proposals
    for t in finished:
        assert json.loads((runs / t.user_attrs["run"] / "run.json").read_text())["status"] == "done"
    shown = run_cli("tune", "--study", "team", "--runs", str(runs), "--show")
    assert shown.returncode == 0 and "team-000" in shown.stdout and "best: trial" in shown.stdout


@pytest.mark.slow
def test_ctrl_c_marks_the_running_trial_failed_and_exits_130(tmp_path, demo_root):
    runs = tmp_path / "runs"
    path = _config(tmp_path, name="stop", space={"optim.lr": [0.01, 0.02]})
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pstage",
            "tune",
            "--config",
            str(path),
            "--trials",
            "3",
            "--data",
            str(demo_root),
            "--runs",
            str(runs),
            "train.epochs=30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell's background job inherits SIGINT ignored, and Python then never raises
        # KeyboardInterrupt: give the worker the default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    history = runs / "stop-000" / "fold_0" / "history.jsonl"
    deadline = time.time() + 120
    while not history.exists() and time.time() < deadline and worker.poll() is None:
        time.sleep(0.2)
    assert history.exists(), worker.communicate()[0][-2000:]
    os.kill(worker.pid, signal.SIGINT)
    out = worker.communicate(timeout=60)[0]
    assert worker.returncode == 130, out[-2000:]
    assert "interrupted: trial 0 (stop-000) marked failed" in out
    assert [t.state for t in _study(storage_url(None, runs), "stop").trials] == [TrialState.FAIL]
    assert json.loads((runs / "stop-000" / "run.json").read_text())["status"] == "failed"
