"""pstage distill: KD loss, soft labels from the teacher's OOF, the teacher's split, end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import run_cli
from tests.ship_runs import ship_runs


@pytest.fixture(scope="module")
def distilled(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    from pstage.distillation import distill

    runs = ship_runs(demo_root, tmp_path_factory)
    result = distill("ens", name="student", runs=runs, overrides=["train.progress=none"], temperature=3.0)
    return runs, result


def test_kd_loss() -> None:
    from pstage.models.losses import distillation

    logits = torch.randn(6, 18)
    teacher = torch.softmax(logits, -1)
    for t in (1.0, 4.0):
        same = distillation((logits / t).log_softmax(-1), teacher, t)
        assert same.abs() < 1e-5  # the student equal to the teacher: nothing to learn
        other = distillation((torch.randn(6, 18) / t).log_softmax(-1), teacher, t)
        assert other > 0


def test_training_step_mixes_kd_and_hard_loss() -> None:
    """alpha=0 is exactly the usual loss; alpha=1 is the KD term alone (which the teacher's own logits zero)."""
    from pstage.config import load_config
    from pstage.core.tasks import mask_task
    from pstage.models.module import ClassifierModule

    task = mask_task()
    images = torch.randint(0, 256, (4, 32, 24, 3), dtype=torch.uint8)
    targets = torch.tensor([0, 5, 7, 17])
    losses = {}
    for alpha in (0.0, 1.0):
        cfg = load_config(
            None,
            [
                "model.name=test_resnet",
                "data.image_size=[32,24]",
                "augment.preset=none",
                "distill.teacher=somewhere",
                f"distill.alpha={alpha}",
            ],
        )
        torch.manual_seed(0)
        module = ClassifierModule(cfg.to_dict(), task.to_dict()).train()
        module.log = lambda *a, **k: None
        with torch.no_grad():
            teacher = module(images)  # the student's own probabilities as teacher: KD term 0
        module.train()
        losses[alpha] = float(module.training_step((images, targets, teacher), 0).detach())
        plain = float(module.training_step((images, targets), 0).detach())
        if alpha == 0.0:
            assert losses[alpha] == pytest.approx(plain, rel=1e-5)
    assert abs(losses[1.0]) < 1e-3


def test_student_is_a_run_on_the_teachers_split(distilled) -> None:
    runs, result = distilled
    student = runs / "student"
    assert result.student.status == "done" and result.student.path == student
    teacher_folds = pd.read_csv(runs / "ens" / "folds.csv", dtype={"image_id": str})
    student_folds = pd.read_csv(student / "folds.csv", dtype={"image_id": str})
    pd.testing.assert_frame_equal(
        teacher_folds.sort_values("image_id").reset_index(drop=True),
        student_folds.sort_values("image_id").reset_index(drop=True),
    )
    oof = pd.read_csv(student / "oof.csv", dtype={"image_id": str})
    merged = oof.merge(teacher_folds, on="image_id")
    assert (merged["fold_x"] == merged["fold_y"]).all() and len(merged) == len(teacher_folds)
    info = json.loads((student / "run.json").read_text())
    source = info["distilled_from"]
    assert source["run"] == "ens" and source["kind"] == "ensemble" and source["temperature"] == 3.0
    assert source["cv_macro_f1"] == pytest.approx(result.teacher_cv)
    assert info["cv"]["macro_f1"] == pytest.approx(result.student_cv)
    assert result.teacher_ips > 0 and result.student_ips > 0
    config = (student / "config.yaml").read_text()
    assert "teacher: " + str(runs / "ens") in config and "temperature: 3.0" in config


def test_soft_labels_are_the_teachers_oof(distilled) -> None:
    from pstage.config import load_config
    from pstage.training.teacher import teacher_probs

    runs, _ = distilled
    cfg = load_config(runs / "student" / "config.yaml")
    oof = pd.read_csv(runs / "ens" / "oof.csv", dtype={"image_id": str})
    ids = oof["image_id"].sample(20, random_state=0)
    probs = teacher_probs(cfg, ids)
    expected = oof.set_index("image_id").loc[ids, [f"p_{i}" for i in range(18)]].to_numpy()
    np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), atol=1e-6)


def test_refusals(distilled, tmp_path: Path) -> None:
    from pstage.core.errors import ConfigError, RunError
    from pstage.distillation import distill

    runs, _ = distilled
    with pytest.raises(ConfigError, match="teacher's split"):
        distill("ens", name="s2", runs=runs, overrides=["split.folds=3"], measure_speed=False)
    with pytest.raises(ConfigError, match="is the teacher"):
        distill("ens", name="ens", runs=runs, measure_speed=False)
    broken = runs / "half"
    broken.mkdir(exist_ok=True)
    (broken / "run.json").write_text(json.dumps({"name": "half", "status": "failed"}))
    with pytest.raises(RunError, match="only a finished run can teach"):
        distill("half", runs=runs, measure_speed=False)
    out = run_cli("distill", "nope", "--runs", str(runs))
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr
