"""``pstage train``: cross-validated training of one run, fold by fold, resumable after any crash.

Flow: config -> source table -> decoded cache -> person-grouped folds -> per fold a Lightning fit,
then OOF and test probabilities from the fold's best checkpoint -> run outputs (oof.csv, test.csv,
submission.csv) -> run.json, written last. A fold is finished when its metrics.json exists;
re-running the same command skips finished folds and resumes the others from last.ckpt.

Under DDP every process runs this same code (Lightning re-launches the command); only rank 0
writes run files, predicts and reports.
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pstage.core.compat  # noqa: F401

import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import Callback
from timm.optim import list_optimizers

from pstage.config import Config, diff_configs, dump_config, load_config, load_run_config
from pstage.core.console import console, optional_step, quiet_lightning
from pstage.core.devices import inference_device, is_rank_zero, resolve_precision
from pstage.core.errors import ConfigError, DataError, RunError
from pstage.core.io import now, write_csv
from pstage.core.metrics import cv_scores, macro_f1, prob_columns
from pstage.data.augment import augment_backend, build_transforms
from pstage.data.cache import CacheInfo
from pstage.data.datasets import resolve_workers
from pstage.data.prepare import prepare_caches, resolve_face_crop
from pstage.data.sources import Source, detect_kind, load_source
from pstage.data.split import check_folds, make_folds
from pstage.inference.persons import describe_grouping, group_run, resolve_group
from pstage.inference.predict import blend_final, fold_checkpoints, tta_views
from pstage.models.classifier import check_model_input, check_model_name
from pstage.models.weights import resolve_weights
from pstage.runs.rundir import FINAL_DIR, RunDir, RunInfo, RunLock, provenance, submission_frame
from pstage.runs.store import publish_after, store_uri
from pstage.training.batch_size import resolve_batch
from pstage.training.budget import Budget, BudgetStop, Speed, cache_seconds, probe_speed
from pstage.training.fit import FitContext, FitJob, complete, fit_model
from pstage.training.names import check_names
from pstage.training.recipes import (
    PseudoLabels,
    check_recipe_data,
    check_recipes,
    final_epochs,
    pseudo_labels,
    resolve_teacher,
)
from pstage.training.teacher import teacher_folds

RUN_NAME_ENV = "PSTAGE_RUN_NAME"  # passes an auto-generated name to the processes DDP launches
# Keys that may change between attempts of one run: where things are, how fast, which folds.
RESUMABLE_KEYS = (
    "data.path",
    "data.cache_dir",
    "train.num_workers",
    "train.progress",
    "train.accelerator",
    "train.devices",
    "train.strategy",
    "train.num_nodes",
    "train.folds",
    "log.",
    "tune.",  # the search space is the study's, not the run's
)


@dataclass
class RunResult:
    """What a finished ``train`` produced."""

    name: str
    path: Path
    status: str
    cv: dict[str, Any]
    duration_s: float
    skipped: list[str] = field(default_factory=list)
    published: str | None = None  # the run's address on the team store, when ``store`` published it

    @property
    def submission(self) -> Path | None:
        path = self.path / "submission.csv"
        return path if path.exists() else None


def check_optimizer(name: str) -> None:
    names = list_optimizers()
    if name.lower() not in names:
        near = difflib.get_close_matches(name.lower(), names, n=2)
        raise ConfigError(
            f"optim.name: timm has no optimizer '{name}'"
            + (f"; did you mean {', '.join(near)}?" if near else f" (some: {', '.join(names[:12])})")
        )


def default_name(cfg: Config) -> str:
    return f"{cfg.model.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"


def train(
    config: str | Path | dict[str, Any] | Config | None = None,
    *,
    data: str | Path | None = None,
    runs: str | Path = "runs",
    name: str | None = None,
    overrides: list[str] | tuple[str, ...] | dict[str, Any] = (),
    fold_callbacks: Callable[[int], Sequence[Callback]] | None = None,
    started: float | None = None,
    store: str | None = None,
    with_checkpoints: bool = False,
) -> RunResult | None:
    """Train a cross-validated run into ``runs/<name>`` and return its result.

    Re-running with the same name resumes: finished folds are kept, an unfinished fold continues
    from its last checkpoint. Returns None in the non-zero ranks of a DDP run.
    ``fold_callbacks(k)`` may add Lightning callbacks to fold k's Trainer (``pstage tune`` reports
    every epoch to Optuna through it and prunes by raising from it).
    ``started`` is when ``train.time``'s clock started (the CLI passes its own start; default now).
    ``store`` (an MLflow server, ``http://HOST:PORT``) publishes the finished run to the team store,
    its fold checkpoints too with ``with_checkpoints``; a store that is down is one warning line.
    """
    started = time.time() if started is None else started
    store = store_uri(store)  # a malformed address stops here, before any training
    quiet_lightning()
    cfg = load_config(config, overrides)
    if data is not None:
        cfg.data.path = str(data)
    if not cfg.data.path:
        raise DataError("no data given: pass --data DIR (or set data.path in the config)")
    cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    if cfg.data.relabel:
        cfg.data.relabel = str(Path(cfg.data.relabel).expanduser().resolve())
    if not Path(cfg.data.path).exists():
        raise DataError(f"data path {cfg.data.path} does not exist")
    check_model_name(cfg.model.name)
    check_model_input(cfg.model.name, cfg.data.image_size, cfg.model.pool)
    check_optimizer(cfg.optim.name)
    check_names(cfg)
    if cfg.model.weights:
        cfg.model.weights = str(Path(cfg.model.weights).expanduser().resolve())
    # before the run folder exists: a bad weights file (or pretrained=true with none) fails here
    resolve_weights(cfg.model.name, cfg.model.pretrained, cfg.model.weights)
    resolve_precision(cfg.train.precision, cfg.train.accelerator)  # a precision this machine cannot run: refused now
    if cfg.data.borderline.years or cfg.model.age_head == "regress":  # recipes that need numeric ages
        check_recipe_data(cfg, cfg.data.source if cfg.data.source != "auto" else detect_kind(Path(cfg.data.path)))
    resolve_teacher(cfg, runs)
    rank0 = is_rank_zero()
    if cfg.train.num_nodes > 1 and not name and not os.environ.get(RUN_NAME_ENV):
        raise ConfigError(
            f"train.num_nodes={cfg.train.num_nodes}: give every node the same --name, so they all write one run"
        )
    name = name or (None if rank0 else os.environ.get(RUN_NAME_ENV)) or default_name(cfg)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", name):
        raise ConfigError(f"run name '{name}': use letters, digits and . _ + = - (it becomes a folder name)")
    run_dir = (Path(runs).expanduser() / name).resolve()
    if cfg.data.face_crop == "auto" and (run_dir / "config.yaml").exists():  # a resumed run keeps its crop
        saved = load_run_config(run_dir / "config.yaml").data
        cfg.data.face_crop, cfg.data.face_detector = saved.face_crop, saved.face_detector
    cfg.data = resolve_face_crop(cfg.data)  # config.yaml records the crop and detector actually used
    preflight = None
    if cfg.train.time is not None and rank0 and not RunDir(run_dir).has_info():
        preflight = _check_budget(cfg, started)  # a budget too small is refused before the run folder exists
    if not rank0:
        _wait_for_rank_zero(run_dir)
        _run(cfg, run_dir, rank0=False, fold_callbacks=fold_callbacks, started=started)
        return None
    os.environ[RUN_NAME_ENV] = name
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        result = _run(cfg, run_dir, rank0=True, fold_callbacks=fold_callbacks, started=started, preflight=preflight)
    if result is not None and result.status == "done":
        done = publish_after(result.path, store, checkpoints=with_checkpoints)
        result.published = done.url if done else None
    return result


@dataclass
class Preflight:
    """What the budget check found before the run folder existed (reused by the run)."""

    source: Source
    speed: Speed
    minimum_s: float
    folds: list[int]  # the folds this run trains (train.folds, or as many as the budget holds)


def _check_budget(cfg: Config, started: float) -> Preflight:
    """Refuse a ``train.time`` too short for the cache plus one epoch and the predictions of each fold;
    with ``train.folds`` unset, plan how many folds the budget holds (``_plan_folds``)."""
    source = load_source(cfg.data)
    precision = resolve_precision(cfg.train.precision, cfg.train.accelerator)
    speed = probe_speed(cfg, source.task, source, precision)
    budget = Budget(cfg.train.time, started, speed, cfg.train.epochs, views=_views(cfg))
    n, k = len(source.train), cfg.split.folds
    n_test = 0 if source.test is None else len(source.test)
    final = [(n, 0, n_test)] if cfg.train.final_fit != "off" else []
    cache_s = cache_seconds(source, cfg, speed)
    fold = (n - n // k, n // k, n_test)
    wanted = _wanted(cfg)
    budget.grouping_per_fold = _grouping_per_fold(cfg, source)
    if _budget_plans_folds(cfg):
        wanted = _plan_folds(cfg, budget, cache_s, fold, final)
    budget.folds = wanted
    minimum = budget.minimum(time.time() - started, cache_s, [fold] * len(wanted) + final)
    if cfg.train.time < minimum:
        what = f"{len(wanted)} fold(s)" + (" and the final fit" if final else "")
        raise ConfigError(
            f"train.time={cfg.train.time:g}s is too short: the cache and one epoch of each of {what} need at least "
            f"{math.ceil(minimum)}s on this machine; give train.time={math.ceil(minimum * 1.5)}s or more"
            + (", or train fewer folds (train.folds=[0])" if len(wanted) > 1 else "")
        )
    return Preflight(source, speed, minimum, wanted)


def _budget_plans_folds(cfg: Config) -> bool:
    """train.time chooses (and re-checks) how many folds to train: with train.folds unset, in one
    process (with DDP the other ranks could not know the plan)."""
    return cfg.train.folds is None and cfg.train.single_process


def _views(cfg: Config) -> int:
    """How many times the fold models predict each validation and test image (tta.train: once per view)."""
    return len(tta_views(cfg.tta.in_training))


def _grouping_per_fold(cfg: Config, source: Source) -> float:
    """Images the person grouping embeds after the last model, per trained fold (the fold's OOF rows,
    and every test image once per fold model); 0 when grouping is off or cannot apply."""
    if source.test is None or not resolve_group(cfg.persons.group, source.task):
        return 0.0
    return len(source.train) / cfg.split.folds + len(source.test)


def _least_epochs(cfg: Config) -> int:
    """The epochs each budget-planned fold must get: train.min_epochs, capped by train.epochs."""
    return min(cfg.train.min_epochs, cfg.train.epochs)


def _plan_folds(
    cfg: Config, budget: Budget, cache_s: float, fold: tuple[int, int, int], final: list[tuple[int, int, int]]
) -> list[int]:
    """The first m of the split's folds, m as large as gives each model ``train.min_epochs`` epochs
    (capped by ``train.epochs``) in the budget, at least 1. A budget split into K models of one or
    two epochs each learns little (issue #12's 300-person row); fewer, longer-trained models win."""
    want = _least_epochs(cfg)
    models = [fold] * cfg.split.folds + final
    return list(range(max(1, budget.affordable(models, want, fixed=len(final), before=cache_s))))


RANK_ZERO_WAIT_S = float(os.environ.get("PSTAGE_RANK_ZERO_WAIT_S", "600"))


def _wait_for_rank_zero(run_dir: Path, timeout: float = RANK_ZERO_WAIT_S) -> None:
    """A worker of another node waits until rank 0 has started (or re-opened) the run folder.

    Nodes start independently; a worker that wrote into a fresh folder before rank 0 created its
    run.json would make rank 0 refuse it as "not a pstage run". Processes that Lightning spawns on
    rank 0's machine start after it, so for them this returns at once."""
    deadline = time.time() + timeout
    while not RunDir(run_dir).has_info():
        if time.time() > deadline:
            raise RunError(
                f"{run_dir}: rank 0 did not start this run within {timeout:.0f}s; start node 0 (NODE_RANK=0) "
                "with the same --runs and --name"
            )
        time.sleep(0.2)


def _wanted(cfg: Config) -> list[int]:
    return cfg.train.folds if cfg.train.folds is not None else list(range(cfg.split.folds))


def _start(cfg: Config, run_dir: Path) -> RunInfo:
    """Create or re-open the run: refuse changed settings, write config.yaml and a running run.json."""
    info = RunInfo()
    if RunDir(run_dir).has_info():
        info = RunDir(run_dir).read_info()
        saved = load_run_config(run_dir / "config.yaml").to_dict()
        changes = [c for c in diff_configs(saved, cfg.to_dict()) if not c[0].startswith(RESUMABLE_KEYS)]
        if changes:
            key, old, new = changes[0]
            more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
            raise RunError(
                f"{run_dir} was trained with {key}={old}; this command asks {key}={new}{more}: use a new --name, or the run's own settings to resume it"
            )
    elif any(p.name != ".lock" for p in run_dir.iterdir()):
        raise RunError(f"{run_dir} exists and is not a pstage run; choose another --name")
    dump_config(cfg, run_dir / "config.yaml")
    return info


def _write_status(run_dir: Path, info: dict[str, Any], status: str, **extra: Any) -> dict[str, Any]:
    info = {**{k: v for k, v in info.items() if k != "error"}, **extra, "status": status}
    RunDir(run_dir).write_info(info)
    return info


def _run(
    cfg: Config,
    run_dir: Path,
    rank0: bool,
    fold_callbacks: Callable[[int], Sequence[Callback]] | None = None,
    started: float | None = None,
    preflight: Preflight | None = None,
) -> RunResult | None:
    """The run's life: start (or resume), folds, outputs, run.json.

    run.json is written before anything else, so a run killed at any point is recognised and
    resumed. A run that was already done keeps its run.json until the new state is done too:
    re-running it (more folds, moved data) never hides finished results behind "failed".
    """
    clock = time.time() if started is None else started
    started = time.time()
    previous = _start(cfg, run_dir) if rank0 else RunInfo()
    was_done = previous.done
    spent_before = float(previous.duration_s or 0.0)
    budget: Budget | None = None
    info: dict[str, Any] = {
        "name": run_dir.name,
        "status": "running",
        "created": previous.created or now(),
        "finished": None,
        **provenance(),
        "model": cfg.model.name,
        "image_size": list(cfg.data.image_size),
        "epochs": cfg.train.epochs,
        "weights": resolve_weights(cfg.model.name, cfg.model.pretrained, cfg.model.weights).record(),
        "duration_s": spent_before,
    }

    def record(status: str, **extra: Any) -> None:
        nonlocal info
        if rank0 and not (was_done and status != "done"):
            if budget is not None:
                extra["time_budget"] = budget.to_dict(budget.spent_before + time.time() - clock)
            info = _write_status(run_dir, info, status, duration_s=spent_before + time.time() - started, **extra)

    record("running")
    precision = resolve_precision(cfg.train.precision, cfg.train.accelerator)
    wanted = _wanted(cfg)
    planned = (previous.get("time_budget") or {}).get("folds") if cfg.train.folds is None else None
    if preflight is not None:
        wanted = preflight.folds
    elif planned and cfg.train.time is not None:  # a resumed budgeted run keeps its planned folds
        wanted = [int(k) for k in planned]
    if rank0:
        if cfg.train.time is not None and len(wanted) < len(_wanted(cfg)):
            console.print(
                f"  train.time={cfg.train.time:g}s holds {len(wanted)} of the {cfg.split.folds} folds with "
                f"train.min_epochs={cfg.train.min_epochs} epochs each: training fold(s) {', '.join(map(str, wanted))} "
                "(train.folds=[...] chooses them yourself)"
            )
        length = (
            f"within {cfg.train.time:g}s (train.time; at most {cfg.train.epochs} epochs each)"
            if cfg.train.time is not None
            else f"x {cfg.train.epochs} epochs"
        )
        console.print(
            f"[bold]{run_dir.name}[/]: {cfg.model.name} {cfg.data.image_size[0]}x{cfg.data.image_size[1]}, "
            f"{len(wanted)} fold(s) {length}, precision {precision} -> {run_dir}"
        )
    try:
        source = preflight.source if preflight is not None else load_source(cfg.data)
        check_recipes(cfg, source)
        resolve_group(cfg.persons.group, source.task)  # persons.group=on for a task it cannot serve: refused now
        info.update(task=source.task.to_dict(), classes=source.task.classes, submission_format=source.test_format)
        if cfg.train.time is not None:
            before = previous.get("time_budget")
            if was_done and before:  # a finished run asked for more folds: a new command, with a budget of its own
                before = {**before, "used_s": 0.0}
            budget = _open_budget(cfg, source, precision, clock, before, preflight)
            budget.folds = wanted
            budget.grouping_per_fold = _grouping_per_fold(cfg, source)
            budget.record = lambda: record("running")
        caching = time.time()
        source, train_cache, test_cache = prepare_caches(source, cfg, verbose=rank0)
        if budget is not None and budget.cache_s is None:
            budget.cache_s = time.time() - caching
        folds = _folds(source, cfg, run_dir, rank0)
        pending = [k for k in wanted if k not in RunDir(run_dir).folds()]
        final_pending = cfg.train.final_fit != "off" and not RunDir(run_dir).final_done()
        pseudo = pseudo_labels(cfg, source)
        if pseudo is not None and rank0:
            console.print(
                f"  pseudo-labels: {len(pseudo)}/{pseudo.total} test images with teacher confidence >= {cfg.pseudo.threshold:g} join every training fold"
            )
        info["resolved"] = {
            "precision": precision,
            "num_workers": resolve_workers(
                cfg.train.num_workers, build_transforms(cfg.augment, image_size=cfg.data.image_size) is not None
            ),
        }
        fit_cfg = _resolve_batch(cfg, previous, source, folds, precision)
        info["resolved"].update(batch_size=fit_cfg.train.batch_size, lr=fit_cfg.optim.lr)
        info["resolved"]["augment"] = augment_backend(cfg.augment, cfg.data.image_size, cfg.train.accelerator)
        if rank0:
            if was_done and not pending and not final_pending:
                console.print(f"  already done (CV macro F1 {previous.score:.4f}); nothing to train")
                return _result(run_dir, previous.record())
            done = sorted(set(wanted) - set(pending))
            if done:
                console.print(f"  resuming (folds {', '.join(map(str, done))} already done)")
            record("running")
        ctx = FitContext(fit_cfg, source, train_cache, test_cache, run_dir, precision, rank0, pseudo)
        queue = list(pending)
        while queue:
            k = queue.pop(0)
            left = len(queue) + 1 + final_pending  # models still to fit, this one included
            fit_fold(ctx, folds, k, fold_callbacks(k) if fold_callbacks else (), budget, left)
            if budget is not None and queue and _budget_plans_folds(cfg):
                queue = _trim_folds(cfg, budget, folds, test_cache, queue, final_pending)
            record("running")
        final_skipped = None
        if final_pending:  # the folds' models make the outputs if the final fit cannot
            _, final_skipped = optional_step("final fit", lambda: fit_final(ctx, budget))
        if not rank0:
            return None
        cv = _write_outputs(run_dir, source, test_cache, cfg.train.final_fit)
        persons = _group_persons(cfg, run_dir, source, train_cache, test_cache)
        recipes = _recipes_summary(cfg, run_dir, pseudo)
        if final_skipped:
            recipes["final_fit"] = {"mode": cfg.train.final_fit, "skipped": final_skipped}
        record(
            "done",
            cv=cv,
            **({"persons": persons} if persons else {}),
            **({"recipes": recipes} if recipes else {}),
            finished=now(),
            folds_trained=_finished_folds(run_dir),
            data=_data_summary(source, train_cache, test_cache),
            skipped=source.skipped,
        )
        return _result(run_dir, info)
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else f"{type(exc).__name__}: {exc}"
        record("failed", error=reason)
        raise


def _trim_folds(
    cfg: Config,
    budget: Budget,
    folds: pd.DataFrame,
    test_cache: CacheInfo | None,
    queue: list[int],
    final_pending: bool,
) -> list[int]:
    """The budget's planned folds still to train, less those the measured speed says can no longer
    get ``train.min_epochs`` epochs each (dropped from the end; the plan in run.json follows). The
    fold plan is made from a probe before any data is loaded; on facemask it once planned 3 folds
    of 3 epochs where 2 fitted, and the last fold would have trained 1-2 epochs."""
    n_test = test_cache.count if test_cache is not None else 0
    sizes = folds["fold"].value_counts()
    models = [(len(folds) - int(sizes.get(k, 0)), int(sizes.get(k, 0)), n_test) for k in queue]
    final = [(len(folds), 0, n_test)] if final_pending else []
    want = _least_epochs(cfg)
    done = len(budget.folds or []) - len(queue)
    keep = budget.affordable(models + final, want, fixed=len(final), done=done)
    if keep >= len(queue):
        return queue
    dropped = queue[keep:]
    budget.folds = [k for k in (budget.folds or []) if k not in dropped]
    console.print(
        f"  train.time: at the measured speed the {len(queue)} fold(s) left cannot each get train.min_epochs={want} "
        f"epochs: dropping fold(s) {', '.join(map(str, dropped))}; the run trains fold(s) {', '.join(map(str, budget.folds))}"
    )
    return queue[:keep]


def _resolve_batch(cfg: Config, previous: RunInfo, source: Source, folds: pd.DataFrame, precision: str) -> Config:
    """The config the models train with: train.batch_size=auto resolved on the device (a resumed run
    keeps the batch and lr it started with, so its folds stay comparable)."""
    if cfg.train.batch_size != "auto":
        return cfg
    resolved = previous.get("resolved") or {}
    if isinstance(resolved.get("batch_size"), int):
        values = cfg.to_dict()
        values["train"]["batch_size"], values["optim"]["lr"] = resolved["batch_size"], resolved["lr"]
        return Config.model_validate(values)
    largest_fold = int(folds["fold"].value_counts().max()) if len(folds) else 0
    device = inference_device(cfg.train.accelerator)
    return resolve_batch(cfg, source.task, device, precision, len(source.train) - largest_fold)


def _group_persons(
    cfg: Config, run_dir: Path, source: Source, train_cache: CacheInfo, test_cache: CacheInfo | None
) -> dict[str, Any] | None:
    """``persons.*``: person-consistent test predictions, chosen and scored on OOF (run.json ``persons``).

    Optional: when grouping fails the run keeps its ungrouped outputs, one line says why and
    run.json records the reason (``persons.skipped``)."""
    record, reason = optional_step(
        "persons: grouping",
        lambda: group_run(
            run_dir,
            cfg,
            source.task,
            source.train,
            train_cache.path,
            source.test,
            test_cache.path if test_cache is not None else None,
            source.test_format,
            fold_checkpoints(run_dir),
        ),
    )
    if reason is not None:
        return {"group": cfg.persons.group, "applied": False, "skipped": reason}
    if record:
        console.print(f"  {describe_grouping(record)}")
    return record


def _open_budget(
    cfg: Config,
    source: Source,
    precision: str,
    clock: float,
    previous: dict[str, Any] | None,
    preflight: Preflight | None,
) -> Budget:
    """The run's Budget: new (speed from the preflight probe), or resumed from run.json's time_budget,
    whose plans it keeps and whose time already spent it counts."""
    assert cfg.train.time is not None
    if preflight is not None:
        speed = preflight.speed
    elif previous and previous.get("probe_s"):
        speed = Speed(**previous["probe_s"])
    else:  # a DDP worker, or a run that had no budget before
        speed = probe_speed(cfg, source.task, source, precision)
    budget = Budget(
        cfg.train.time,
        clock,
        speed,
        cfg.train.epochs,
        previous,
        float((previous or {}).get("used_s", 0.0)),
        views=_views(cfg),
    )
    if preflight is not None:
        budget.minimum_s = preflight.minimum_s
    return budget


def _result(run_dir: Path, info: dict[str, Any]) -> RunResult:
    return RunResult(
        info["name"],
        run_dir,
        info["status"],
        info.get("cv", {}),
        float(info.get("duration_s", 0.0)),
        info.get("skipped", []),
    )


def _data_summary(source: Source, train_cache: CacheInfo, test_cache: CacheInfo | None) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "path": str(source.root),
        "kind": source.kind,
        "train_images": len(source.train),
        "groups": int(source.train["group"].nunique()),
        "test_images": test_cache.count if test_cache else 0,
    }
    if train_cache.detector:  # the face crop: which detector, and how often it found a face
        summary["face_crop"] = {
            name: {
                "detector": cache.detector,
                "faces_found": cache.faces_found,
                "images": cache.faces_found + cache.faces_missed,
                "hit_rate": round(cache.face_hit_rate or 0.0, 4),
            }
            for name, cache in (("train", train_cache), ("test", test_cache))
            if cache is not None
        }
    return summary


def _finished_folds(run_dir: Path) -> list[int]:
    return RunDir(run_dir).folds()


def _folds(source: Source, cfg: Config, run_dir: Path, rank0: bool) -> pd.DataFrame:
    if cfg.distill.teacher:  # a student trains on its teacher's exact split
        folds = teacher_folds(source, cfg)
    else:
        folds = make_folds(source, cfg.split.folds, cfg.split.seed)
    saved = run_dir / "folds.csv"
    if saved.exists():
        check_folds(pd.read_csv(saved, dtype={"image_id": str, "group": str}), folds, str(saved))
    elif rank0:
        write_csv(saved, folds)
    return folds


def fit_fold(
    ctx: FitContext,
    folds: pd.DataFrame,
    k: int,
    callbacks: Sequence[Callback] = (),
    budget: Budget | None = None,
    models_left: int = 1,
) -> None:
    """Train fold ``k`` (resuming from last.ckpt if present); on rank 0 then write its predictions and metrics.json.

    With a ``budget`` (train.time) its epochs are planned in its share of the time left."""
    cfg, train_rows = ctx.cfg, ctx.source.train
    is_val = (folds["fold"] == k).to_numpy()
    job = FitJob(ctx, k, train_rows[~is_val], train_rows[is_val], cfg.seed + k, cfg.train.epochs, callbacks)
    stop = _plan(job, budget, models_left, cfg.train.epochs)
    result = fit_model(job)
    if result is None:
        return
    if budget is not None and stop is not None:
        budget.finish(job.name, result.duration_s, len(result.history), stop.epoch_seconds)
    oof, history = result.oof, result.history
    assert oof is not None  # a validated model always predicts its validation rows
    score = macro_f1(oof["target"].to_numpy(), oof[prob_columns(ctx.source.task.num_classes)].to_numpy().argmax(1))
    best_epoch = max(history, key=lambda r: r["val_macro_f1"] or -1)["epoch"] if history else None
    metrics = {
        "fold": k,
        "macro_f1": score,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "val_images": len(oof),
        "resumed_from_epoch": result.resumed_from_epoch,
        "duration_s": result.duration_s,
        **result.recipe_metrics,
        "history": history,
    }
    complete(job, metrics)
    console.print(
        f"  fold {k} done: macro F1 {score:.4f} (best epoch {None if best_epoch is None else best_epoch + 1}) in {metrics['duration_s']:.0f}s"
    )


def _plan(job: FitJob, budget: Budget | None, models_left: int, cap: int) -> BudgetStop | None:
    """train.time: plan ``job``'s epochs in its share of the budget and add the callback that keeps it there."""
    if budget is None:
        return None
    ctx = job.context
    n_val = 0 if job.val_rows is None else len(job.val_rows)
    n_test = ctx.test_cache.count if ctx.test_cache is not None else 0
    stop = budget.start(job.name, len(job.rows), n_val, n_test, models_left, cap)
    job.epochs = stop.planned
    job.callbacks = [*job.callbacks, stop]
    share = budget.models[job.name].get("share_s")
    job.detail += f", {stop.planned} epochs planned" + (f" for {share:.0f}s of train.time" if share else "")
    return stop


def fit_final(ctx: FitContext, budget: Budget | None = None) -> None:
    """``train.final_fit``: one model on every training person for the folds' median best epoch count.

    Nothing is validated (there is no held-out person left); the epoch count comes from the CV.
    Writes final/model.ckpt (weights) and final/test.npy, then final/metrics.json (marks it done).
    """
    cfg, run_dir = ctx.cfg, ctx.run_dir
    fold_metrics = [RunDir(run_dir).fold_metrics(k) for k in _finished_folds(run_dir)]
    epochs = final_epochs(fold_metrics, cfg.train.epochs)
    job = FitJob(
        ctx,
        None,
        ctx.source.train,
        None,
        cfg.seed + cfg.split.folds,  # a seed no fold uses
        epochs,
        detail=f" (every person), {epochs} epochs (the folds' median best)",
    )
    stop = _plan(job, budget, 1, epochs)
    result = fit_model(job)
    if result is None:
        return
    if budget is not None and stop is not None:
        budget.finish(job.name, result.duration_s, stop.epochs_done, stop.epoch_seconds)
    epochs = (stop.epochs_done or stop.planned) if stop is not None else epochs  # the epochs it trained
    metrics = {
        "mode": cfg.train.final_fit,
        "epochs": epochs,
        "fold_best_epochs": [m.get("best_epoch") for m in fold_metrics],
        "duration_s": result.duration_s,
        **result.recipe_metrics,
        "train_images": result.train_images,
    }
    complete(job, metrics)
    console.print(
        f"  final fit done: {epochs} epochs on {result.train_images:,} images in {metrics['duration_s']:.0f}s"
    )


def _recipes_summary(cfg: Config, run_dir: Path, pseudo: PseudoLabels | None) -> dict[str, Any]:
    """run.json ``recipes``: which recipes shaped this run and what they did (empty when none)."""
    out: dict[str, Any] = {}
    if cfg.data.borderline.years:
        out["borderline"] = cfg.data.borderline.model_dump(mode="json")
    if cfg.model.age_head != "classify":
        out["age_head"] = cfg.model.age_head
    if cfg.model.classifier != "linear":
        out["classifier"] = cfg.model.classifier
    if pseudo is not None:
        out["pseudo"] = {
            "teacher": cfg.pseudo.run,
            "threshold": cfg.pseudo.threshold,
            "images": len(pseudo),
            "test_images": pseudo.total,
        }
    if cfg.train.final_fit != "off" and RunDir(run_dir).final_done():
        final = RunDir(run_dir).final_metrics()
        out["final_fit"] = {k: final.get(k) for k in ("mode", "epochs", "duration_s", "train_images")}
    return out


def _write_outputs(
    run_dir: Path, source: Source, test_cache: CacheInfo | None, final_fit: str = "off"
) -> dict[str, Any]:
    """oof.csv, test.csv and submission.csv from every finished fold (test: with the final fit, if any); returns the CV summary."""
    task = source.task
    fold_dirs = [RunDir(run_dir).fold_dir(k) for k in _finished_folds(run_dir)]
    if not fold_dirs:
        raise RunError(f"{run_dir}: no finished fold to summarise")
    oof = pd.concat([pd.read_csv(d / "oof.csv", dtype={"image_id": str}) for d in fold_dirs], ignore_index=True)
    order = {image_id: i for i, image_id in enumerate(source.train["image_id"])}
    oof = (
        oof.assign(_order=oof["image_id"].map(order))
        .sort_values("_order")
        .drop(columns="_order")
        .reset_index(drop=True)
    )
    write_csv(run_dir / "oof.csv", oof, float_format="%.6g")
    for stale in ("oof_tta.csv", "test_tta.csv", "submission_tta.csv"):  # from the folds before a re-run
        (run_dir / stale).unlink(missing_ok=True)
    if source.test is not None and test_cache is not None:
        probs = np.mean([np.load(d / "test.npy") for d in fold_dirs], axis=0)
        final = run_dir / FINAL_DIR / "test.npy"
        if final_fit != "off" and final.exists():
            probs = blend_final(final_fit, probs, np.load(final))
        test = pd.concat(
            [
                pd.DataFrame({"image_id": source.test["image_id"].to_numpy()}),
                pd.DataFrame(probs, columns=prob_columns(task.num_classes)),
            ],
            axis=1,
        )
        write_csv(run_dir / "test.csv", test, float_format="%.6g")
        write_csv(run_dir / "submission.csv", submission_frame(source.test, probs, task, source.test_format))
    cv = cv_scores(oof, task)
    for fold in cv["folds"]:
        metrics = RunDir(run_dir).fold_metrics(fold["fold"])
        fold.update(best_epoch=metrics.get("best_epoch"), duration_s=metrics.get("duration_s"))
    return cv
