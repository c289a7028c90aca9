"""``pstage distill``: train one student run on a teacher's (usually an ensemble's) soft labels.

The soft label of every training image is the teacher's out-of-fold probability for it (the
teacher's oof.csv), so no soft label comes from a model that trained on that image. The student
trains on the teacher's exact split (its folds.csv), with

    loss = alpha * T^2 * KL(teacher^(1/T) renormalised || softmax(student / T)) + (1 - alpha) * usual loss(hard labels)

and validates on hard labels with macro F1, so its CV is comparable with the teacher's. The
student is a normal run (board, ensemble, export, serve); run.json records ``distilled_from``.

Caveat: teacher OOF for an image of fold j comes from the teacher's fold-j model, which trained on
the other folds, including the student's validation fold k. Soft labels of training images thus
carry a little information from validation images' labels; the split keeps persons apart, and the
student's CV is read as "comparable", not "strictly held out" (nested teachers would fix it at K x
the cost).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pstage.config import Config, load_config
from pstage.core.errors import ConfigError, RunError
from pstage.data.sources import load_source
from pstage.deploy.export import build_model, plan_export
from pstage.models.trust import honours_trust
from pstage.runs.rundir import RunDir, RunInfo
from pstage.runs.store import locate, publish_after, store_uri
from pstage.training.teacher import read_table
from pstage.training.train import train


@dataclass
class DistillResult:
    """The student run and how it compares with its teacher (CV macro F1, images/s in PyTorch on CPU)."""

    student: Any  # RunResult
    teacher: str
    teacher_cv: float
    student_cv: float
    teacher_ips: float
    student_ips: float
    temperature: float
    alpha: float


def images_per_second(run: str | Path, runs: str | Path = "runs", batch: int = 64, rounds: int = 3) -> float:
    """Eager PyTorch CPU throughput of a run or ensemble as served (every fold model of every member)."""
    plan = plan_export(run, runs)
    model = build_model(plan)
    height, width = plan.preprocess["image_size"]
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8))
    with torch.inference_mode():
        model(images)  # warm-up
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            model(images)
            best = min(best, time.perf_counter() - started)
    return batch / best


@honours_trust
def distill(
    teacher: str | Path,
    *,
    name: str | None = None,
    data: str | Path | None = None,
    runs: str | Path = "runs",
    overrides: list[str] | tuple[str, ...] | dict[str, Any] = (),
    temperature: float | None = None,
    alpha: float | None = None,
    measure_speed: bool = True,
    store: str | None = None,
    trust: bool = False,
) -> DistillResult:
    """Train a student on ``teacher``'s OOF soft labels and split; returns both CVs and speeds.

    The student starts from the teacher's (first member's) config, so ``overrides`` need only say
    what changes (``model.name=resnet18``); its data is the teacher's unless ``data`` is given.
    With ``store`` (the team's MLflow server), a teacher that is only there is pulled (with its
    members' fold models), and the finished student is published. ``trust``: the teacher's fold
    checkpoints may hold pickled objects if it was made on this machine (never a pulled teacher).
    """
    store = store_uri(store)
    teacher_run = RunDir.find(locate(teacher, runs, store, checkpoints=True) if store else teacher, runs)
    teacher_dir, info, teacher_name = teacher_run.path, teacher_run.info, teacher_run.name
    if not info.done:
        raise RunError(f"{teacher_name}: run is {info.status}; only a finished run can teach")
    for needed in ("oof", "folds"):
        if not teacher_run.output(needed).exists():
            raise RunError(f"{teacher_name}: {needed}.csv is missing; a teacher needs its OOF predictions and split")
    first = plan_export(teacher_dir, runs).leaves[0].config
    base = first.to_dict()
    base["distill"] = {**base.get("distill", {}), "teacher": str(teacher_dir)}
    base["train"] = {**base["train"], "folds": None}
    cfg = load_config(base, overrides)
    if cfg.split != first.split:
        raise ConfigError("split.*: a student trains on its teacher's split; drop the split.* overrides")
    if cfg.distill.teacher != str(teacher_dir):
        raise ConfigError("distill.teacher is set by pstage distill from its TEACHER argument; drop that override")
    if temperature is not None:
        cfg.distill.temperature = temperature
    if alpha is not None:
        cfg.distill.alpha = alpha
    folds = read_table(teacher_run.output("folds"), "split")
    oof = read_table(teacher_run.output("oof"), "OOF table")
    uncovered = ~folds["image_id"].isin(oof["image_id"])
    if uncovered.any():
        raise RunError(
            f"{teacher_name}: its OOF covers {len(oof)} of {len(folds)} images of its split (folds trained: {sorted(oof['fold'].unique().tolist())}); train every fold of the teacher first"
        )
    if len(info.classes or []) != sum(c.startswith("p_") for c in oof.columns):
        raise RunError(f"{teacher_name}: run.json classes and oof.csv columns disagree")
    name = name or f"{teacher_name}-student"
    student_dir = (Path(runs).expanduser() / name).resolve()
    if student_dir == teacher_dir:
        raise ConfigError(f"--name {name} is the teacher; pick a new name for the student")
    _check_classes(cfg, data, info, teacher_name)
    result = train(cfg, data=data, runs=runs, name=name)
    teacher_cv = float(info.score)  # type: ignore[arg-type]  # a finished run has a CV
    student_cv = float(result.cv["macro_f1"])
    speeds = (images_per_second(teacher_dir, runs), images_per_second(result.path, runs)) if measure_speed else (0, 0)
    student = RunDir(result.path)
    with student.lock():
        student.update_info(
            distilled_from={
                "run": teacher_name,
                "path": str(teacher_dir),
                "kind": info.kind,
                "cv_macro_f1": teacher_cv,
                "temperature": cfg.distill.temperature,
                "alpha": cfg.distill.alpha,
                "teacher_images_per_s": round(speeds[0], 1),
                "student_images_per_s": round(speeds[1], 1),
            }
        )
    publish_after(result.path, store)
    return DistillResult(
        result, teacher_name, teacher_cv, student_cv, speeds[0], speeds[1], cfg.distill.temperature, cfg.distill.alpha
    )


def _check_classes(cfg: Config, data: str | Path | None, info: RunInfo, teacher: str) -> None:
    """The student's data must give the teacher's classes (same task, same age thresholds)."""
    d = cfg.data.model_copy(update={"path": str(Path(data).expanduser().resolve())}) if data else cfg.data
    classes = load_source(d).task.classes
    teacher_classes = info.classes or []
    if classes != teacher_classes:
        raise ConfigError(
            f"the student's data gives {len(classes)} classes ({classes[0]} ...), the teacher {teacher} predicts {len(teacher_classes)} ({teacher_classes[0] if teacher_classes else '-'} ...): use the teacher's data and data.* settings"
        )
