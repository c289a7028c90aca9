"""``train.time``: a whole run within a time budget, planned from measured speed."""

import json
import time

import pytest

from pstage.config import load_config, parse_duration
from pstage.core.errors import ConfigError
from pstage.training.budget import Budget, Speed
from tests.conftest import run_cli

TINY = [
    "data.image_size=[32,24]",
    "model.name=test_resnet",
    "split.folds=3",
    "train.batch_size=32",
    "optim.lr=0.01",
    "train.progress=epoch",
]


def test_budget_counts_each_tta_view_of_the_predictions():
    """tta.train predicts every validation and test image once per view: a model's overhead grows with them."""
    speed = Speed(train_image_s=0.01, predict_image_s=0.002, decode_image_s=0.001)
    one, two = (Budget(600, time.time(), speed, 10, views=v) for v in (1, 2))
    assert two.overhead(1000) - one.overhead(1000) == pytest.approx(1000 * 0.002)
    assert two.minimum(0, 0, [(800, 200, 500)]) > one.minimum(0, 0, [(800, 200, 500)])


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("15m", 900), ("2h", 7200), ("90s", 90), (90, 90), ("90", 90), ("1h30m", 5400), ("1.5m", 90), (" 2 min ", 120)],
)
def test_durations_parse(given, seconds):
    assert parse_duration(given) == seconds
    assert load_config(None, {"train": {"time": given}}).train.time == seconds


@pytest.mark.parametrize("given", ["soon", "-5s", "0", "15 parsecs", "m", True])
def test_bad_durations_are_refused(given):
    with pytest.raises(ConfigError, match=r"config key 'train.time': .*e\.g\. 15m"):
        load_config(None, {"train": {"time": given}})


def _one_line_error(out) -> str:
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def test_unparseable_budget_is_one_line(demo_root, tmp_path):
    out = run_cli("train", "--data", str(demo_root), "--runs", str(tmp_path), "--name", "r", "train.time=soon")
    assert "config key 'train.time'" in _one_line_error(out)
    assert not (tmp_path / "r").exists()


def test_budget_too_small_is_refused_before_the_run_folder_exists(demo_root, tmp_path):
    out = run_cli("train", "--data", str(demo_root), "--runs", str(tmp_path), "--name", "r", *TINY, "train.time=2s")
    line = _one_line_error(out)
    assert "train.time=2s" in line and "at least" in line, line
    minimum = float(line.split("at least ")[1].split("s")[0])
    assert minimum > 2, line  # what the run needs, imports and the cache included
    assert not (tmp_path / "r").exists()


def test_budget_is_honoured_and_mostly_used(demo_root, tmp_path):
    """40 s for the whole command (3 folds, cap 200 epochs): done within 44 s, having used most of
    it; every fold's LR schedule ran to its end; run.json says planned vs actual."""
    started = time.perf_counter()
    out = run_cli(
        "train", "--data", str(demo_root), "--runs", str(tmp_path), "--name", "b", *TINY,
        "train.epochs=200", "train.time=40s", "train.min_epochs=2", timeout=120,
    )  # fmt: skip
    took = time.perf_counter() - started
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert took <= 44, f"{took:.1f}s for a 40s budget\n{out.stdout[-3000:]}"
    assert took >= 28, f"only {took:.1f}s of a 40s budget used\n{out.stdout[-3000:]}"
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    budget = info["time_budget"]
    assert budget["budget_s"] == 40 and budget["epochs_cap"] == 200
    assert 0 < budget["minimum_s"] < 40 and budget["used_s"] <= 44
    assert sorted(budget["models"]) == ["fold_0", "fold_1", "fold_2"]
    finished_schedules = 0
    for k in range(3):
        planned = budget["models"][f"fold_{k}"]
        metrics = json.loads((tmp_path / "b" / f"fold_{k}" / "metrics.json").read_text())
        history = metrics["history"]
        assert planned["epochs"] == metrics["epochs_run"] == len(history) >= 2
        assert planned["seconds"] > 0 and planned["planned_epochs"] >= 1
        if not planned.get("stopped_mid_epoch"):
            assert planned["epochs"] == planned["planned_epochs"]
        if not (planned.get("stopped_mid_epoch") or planned.get("schedule_cut")):
            # the cosine schedule was set for the planned length: its last epoch ends at min_lr (1e-4)
            assert history[-1]["lr"] < 1e-3, history
            finished_schedules += 1
    assert finished_schedules >= 2, budget  # cutting a schedule short is the exception


def test_budget_plans_fewer_folds_when_all_would_learn_little(demo_root, tmp_path):
    """train.folds unset: a budget that cannot give each of the 3 folds train.min_epochs epochs trains
    only the first folds that it can (fold 0 here), names that in one line, and records the plan."""
    out = run_cli(
        "train", "--data", str(demo_root), "--runs", str(tmp_path), "--name", "f", *TINY,
        "train.epochs=1000", "train.min_epochs=1000", "train.time=45s", timeout=150,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "holds 1 of the 3 folds" in out.stdout, out.stdout[-3000:]
    info = json.loads((tmp_path / "f" / "run.json").read_text())
    assert info["status"] == "done" and info["folds_trained"] == [0]
    assert info["time_budget"]["folds"] == [0] and list(info["time_budget"]["models"]) == ["fold_0"]
    assert (tmp_path / "f" / "submission.csv").exists()
    # the same command again: the plan is kept, the run is already done
    again = run_cli(
        "train", "--data", str(demo_root), "--runs", str(tmp_path), "--name", "f", *TINY,
        "train.epochs=1000", "train.min_epochs=1000", "train.time=45s", timeout=150,
    )  # fmt: skip
    assert again.returncode == 0 and "already done" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]


def test_measured_speed_drops_planned_folds_that_would_learn_too_little():
    """After a fold, the budget's planned folds that can no longer get train.min_epochs epochs each
    are dropped from the end (and from the plan run.json records), never those that still fit."""
    import pandas as pd

    from pstage.training.train import _trim_folds

    speed = Speed(train_image_s=0.001, predict_image_s=0.001, decode_image_s=0.001)
    budget = Budget(100, time.time(), speed, 10)
    budget.rates = {"train_image_s": 0.01, "val_image_s": 0.005, "rest_s": 0.0}  # as if measured
    budget.overhead_s = 1.0
    budget.folds = [0, 1, 2, 3, 4]
    folds = pd.DataFrame({"fold": [k for k in range(5) for _ in range(200)]})  # 800 train / 200 val per fold
    cfg = load_config(None, ["train.min_epochs=3"])
    # a fold needs 3 x (800 x 0.01 + 200 x 0.005) + 1 = 28 s: 3 of the 4 left fit in ~98 s
    assert budget.affordable([(800, 200, 0)] * 4, 3) == 3
    assert _trim_folds(cfg, budget, folds, None, [1, 2, 3, 4], False) == [1, 2, 3]
    assert budget.folds == [0, 1, 2, 3]
    assert _trim_folds(cfg, budget, folds, None, [1, 2], False) == [1, 2]  # what fits stays
    assert budget.affordable([(800, 200, 0)] * 2 + [(1000, 0, 0)], 3, fixed=1) == 2  # the final fit always runs


def test_the_fold_plan_and_its_recheck_are_one_search():
    """The plan before the run (which also pays for the cache) and the re-check after a fold ask the
    same question, so on the same speed they agree; the grouping pass is reserved per planned fold."""
    from pstage.training.train import _plan_folds

    speed = Speed(train_image_s=0.01, predict_image_s=0.005, decode_image_s=0.001)
    budget = Budget(100, time.time(), speed, 10)
    budget.overhead_s = 1.0
    cfg = load_config(None, ["train.min_epochs=3"])
    fold = (800, 200, 0)  # 3 x 9 s + 1 s = 28 s per fold
    assert _plan_folds(cfg, budget, 0.0, fold, []) == [0, 1, 2]
    assert budget.affordable([fold] * 5, 3) == 3
    assert _plan_folds(cfg, budget, 30.0, fold, []) == [0, 1]  # the cache first: one fold fewer
    assert _plan_folds(cfg, budget, 99.0, fold, []) == [0]  # always at least fold 0 (the minimum check refuses)
    budget.grouping_per_fold = 2000  # 10 s of grouping per fold: 3 x (28 + 10) > 98 s
    assert _plan_folds(cfg, budget, 0.0, fold, []) == [0, 1]
    assert budget.affordable([fold] * 2, 3) == 2
    assert budget.affordable([fold] * 2, 3, done=3) == 1  # folds already trained are grouped too
