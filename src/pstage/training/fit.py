"""One fit path: every model of a run (each fold model, the final fit) is built, fitted, resumed and
predicted by ``fit_model(job)``.

A ``FitJob`` says what one model is (its rows, whether it is validated, its folder, seed and epochs);
a ``FitContext`` holds what every model of the run shares (settings, data, caches, precision, rank).
``train.py`` decides which jobs run and what their results mean for the run (metrics.json, outputs).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pstage.core.compat  # noqa: F401

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.weight_averaging import EMAWeightAveraging

from pstage.config import Config, batch_of
from pstage.core.console import console
from pstage.core.devices import inference_device
from pstage.core.io import write_csv, write_json
from pstage.core.metrics import prob_columns
from pstage.data.augment import build_transforms
from pstage.data.cache import CacheInfo
from pstage.data.datasets import CachedImages, FoldData
from pstage.data.sources import Source
from pstage.inference.predict import predict_probs
from pstage.models.checkpoint import load_fold_module
from pstage.models.classifier import head_task
from pstage.models.losses import balanced_weights
from pstage.models.module import ClassifierModule
from pstage.runs.rundir import FINAL_DIR
from pstage.training.loggers import make_loggers
from pstage.training.recipes import PseudoLabels, borderline_mask
from pstage.training.teacher import teacher_probs


@dataclass(frozen=True)
class FitContext:
    """What every model of one run shares."""

    cfg: Config
    source: Source
    train_cache: CacheInfo
    test_cache: CacheInfo | None
    run_dir: Path
    precision: str
    rank0: bool
    pseudo: PseudoLabels | None = None


@dataclass
class FitJob:
    """One model to fit: a fold model (``fold`` = k, validated on ``val_rows``) or the final fit
    (``fold`` None, ``val_rows`` None: every person trains, nothing is validated)."""

    context: FitContext
    fold: int | None
    rows: pd.DataFrame  # training rows, before the recipes (borderline ages, pseudo-labels)
    val_rows: pd.DataFrame | None
    seed: int
    epochs: int  # the Trainer's max_epochs; the LR schedule spans them
    callbacks: Sequence[Callback] = ()  # added to the Trainer's (pstage tune's reporter)
    detail: str = ""  # the headline's suffix (why this many epochs)

    @property
    def name(self) -> str:
        """The model's folder under the run, and its loggers' version."""
        return FINAL_DIR if self.fold is None else f"fold_{self.fold}"

    @property
    def title(self) -> str:
        return "final fit" if self.fold is None else f"fold {self.fold}"

    @property
    def directory(self) -> Path:
        return self.context.run_dir / self.name

    @property
    def validate(self) -> bool:
        return self.val_rows is not None


@dataclass
class FitResult:
    """What ``fit_model`` returns on rank 0: the model's predictions and how its training went."""

    weights: Path  # best.ckpt (validated) or model.ckpt (the last epoch's weights)
    oof: pd.DataFrame | None  # image_id, fold, target, p_0.. for the validation rows
    history: list[dict[str, Any]]
    resumed_from_epoch: int | None
    train_images: int
    recipe_metrics: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0

    @property
    def duration_s(self) -> float:
        return round(time.time() - self.started, 2)


@dataclass
class TrainingRows:
    """What one model trains on: its rows of the training table (after the borderline recipe), their
    per-image extras for the loss, and the pseudo-labelled test images as a second dataset."""

    rows: pd.DataFrame
    extras: dict[str, np.ndarray]
    borderline: int  # training images dropped or down-weighted as borderline ages
    pseudo: CachedImages | None = None

    @property
    def count(self) -> int:
        return len(self.rows) + (len(self.pseudo) if self.pseudo is not None else 0)


def fit_model(job: FitJob) -> FitResult | None:
    """Fit one model (resuming from its last.ckpt if present); on rank 0 then predict its validation
    rows (oof.csv) and the test set (test.npy). Returns None on the other DDP ranks.

    The caller writes metrics.json (which marks the model done) with ``complete``.
    """
    ctx, cfg = job.context, job.context.cfg
    started = time.time()
    job.directory.mkdir(parents=True, exist_ok=True)
    transform = build_transforms(cfg.augment, seed=job.seed, image_size=cfg.data.image_size)
    training = training_rows(cfg, ctx.source, job.rows, ctx.test_cache, ctx.pseudo, transform)
    rows = training.rows
    L.seed_everything(job.seed, workers=True, verbose=False)
    model_cfg = cfg.model_copy(deep=True)
    model_cfg.train.epochs = job.epochs  # the checkpoint records the epochs this model trains
    module = ClassifierModule(
        model_cfg.to_dict(), ctx.source.task.to_dict(), class_weights(cfg, ctx.source, rows["target"].to_numpy())
    )
    if cfg.model.age_head == "regress":  # standardise ages with the model's own training statistics
        module.model.heads["age"].set_stats(rows["age"].to_numpy(dtype=np.float32))
    val = job.val_rows if job.val_rows is not None else ctx.source.train.iloc[:0]
    datamodule = FoldData(
        ctx.train_cache.path,
        rows["cache_row"].to_numpy(),
        rows["target"].to_numpy(),
        val["cache_row"].to_numpy(dtype=np.int64),
        val["target"].to_numpy(dtype=np.int64),
        cfg,
        transform,
        teacher_labels(cfg, rows) if cfg.distill.teacher else None,
        training.extras,
        training.pseudo,
        seed=job.seed,
    )
    callbacks, best, report = _callbacks(job)
    extra = {} if job.validate else {"limit_val_batches": 0}
    trainer = make_trainer(
        cfg,
        ctx.precision,
        callbacks,
        job.epochs,
        training.count,
        make_loggers(cfg, ctx.run_dir, job.name if job.fold is None else job.fold),
        job.directory,
        **extra,
    )
    if cfg.train.compile:
        module.model = torch.compile(module.model)
    notes = recipe_notes(cfg, training)
    if ctx.rank0 and progress_mode(cfg) != "none":
        seen = f" / {len(val):,} validation images" if job.validate else " images"
        console.print(f"[bold]{job.title}[/]: {len(rows):,} train{seen}{job.detail}{notes['line']}")
    resume = job.directory / "last.ckpt"
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume.exists() else None)
    for logger in trainer.loggers:
        logger.finalize("success")
    if job.validate:
        weights = job.directory / "best.ckpt"
    else:  # nothing was validated: the last epoch's weights are the model
        weights = job.directory / "model.ckpt"
        trainer.save_checkpoint(weights, weights_only=True)
    if not ctx.rank0:
        return None
    oof = _predict(job, weights)
    return FitResult(
        weights,
        oof,
        read_history(job.directory) if job.validate else [],
        report.resumed_from_epoch if report else None,
        training.count,
        notes["metrics"],
        started,
    )


def _callbacks(job: FitJob) -> tuple[list[Callback], ModelCheckpoint | None, FoldReport | None]:
    """last.ckpt every epoch (resume); for a validated model also best.ckpt, the epoch report and early stopping."""
    cfg, folder = job.context.cfg, job.directory
    last = ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    callbacks: list[Callback] = [last, BatchSeeds(job.seed)]
    best = report = None
    mode = progress_mode(cfg)
    if job.validate:
        best = ModelCheckpoint(
            dirpath=folder,
            filename="best",
            monitor="val/macro_f1",
            mode="max",
            save_top_k=1,
            save_weights_only=True,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )
        report = FoldReport(job.title, folder, best, print_lines=mode == "epoch")
        callbacks = [best, *callbacks, report]
    callbacks.extend(job.callbacks)
    if mode == "bar":
        callbacks.append(RichProgressBar(leave=True))
    if job.validate and cfg.train.early_stopping:
        callbacks.append(EarlyStopping(monitor="val/macro_f1", mode="max", patience=cfg.train.early_stopping))
    if cfg.train.ema:
        callbacks.append(EMAWeightAveraging(decay=cfg.train.ema_decay))
    return callbacks, best, report


def _predict(job: FitJob, weights: Path) -> pd.DataFrame | None:
    """OOF probabilities (written to oof.csv) for the validation rows, test probabilities to test.npy;
    averaged over the TTA views with ``tta.train``."""
    ctx, cfg = job.context, job.context.cfg
    tta = cfg.tta.in_training
    model = load_fold_module(weights)
    device = inference_device(cfg.train.accelerator)
    batch = batch_of(cfg.train) * 2
    frame = None
    if job.val_rows is not None:
        val = job.val_rows
        oof = predict_probs(
            model,
            ctx.train_cache.path,
            val["cache_row"].to_numpy(),
            batch_size=batch,
            device=device,
            precision=ctx.precision,
            tta=tta,
        )
        ids = pd.DataFrame(
            {"image_id": val["image_id"].to_numpy(), "fold": job.fold, "target": val["target"].to_numpy()}
        )
        frame = pd.concat([ids, pd.DataFrame(oof, columns=prob_columns(ctx.source.task.num_classes))], axis=1)
        write_csv(job.directory / "oof.csv", frame, float_format="%.6g")
    if ctx.test_cache is not None:
        probs = predict_probs(
            model,
            ctx.test_cache.path,
            np.arange(ctx.test_cache.count),
            batch_size=batch,
            device=device,
            precision=ctx.precision,
            tta=tta,
        )
        tmp = job.directory / ".test.tmp.npy"
        np.save(tmp, probs.astype(np.float32))
        os.replace(tmp, job.directory / "test.npy")
    return frame


def complete(job: FitJob, metrics: dict[str, Any]) -> None:
    """Write the model's metrics.json (which marks it done) and drop its last.ckpt, whose job
    (weights + optimizer state, ~3x the weights) ends with the model."""
    write_json(job.directory / "metrics.json", metrics)
    (job.directory / "last.ckpt").unlink(missing_ok=True)


class BatchSeeds(Callback):
    """Seed torch, numpy and random before each training batch from (seed, epoch, batch, rank).

    What draws from the global generators in a training step (dropout, drop-path, the batched
    augmentation of device_augment.py) then depends on where the step is, not on what the
    process did before: a run resumed from last.ckpt trains its remaining epochs exactly as the
    uninterrupted run does. Saving the generators' states in last.ckpt instead (Lightning keeps
    none) would not be enough: a resumed run builds its loader (which draws its workers' seed)
    at another point than an uninterrupted one, and a persistent loader worker's augmentation
    state lives in another process. The loader's own randomness is keyed like this
    (datasets.train_sampler, datasets.seed_transform).
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        state = np.random.SeedSequence([self.seed, trainer.current_epoch, batch_idx, trainer.global_rank])
        seed = int(state.generate_state(1)[0])
        # only the generators a step draws from (torch.manual_seed probes every device type: ~100x slower)
        torch.default_generator.manual_seed(seed)
        if pl_module.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)


class FoldReport(Callback):
    """Per epoch: one console line, and a line in <model>/history.jsonl (kept across resumes)."""

    def __init__(self, title: str, folder: Path, best: ModelCheckpoint, print_lines: bool):
        self.title, self.folder, self.best, self.print_lines = title, folder, best, print_lines
        self.resumed_from_epoch: int | None = None
        self._started = time.time()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self.resumed_from_epoch = trainer.current_epoch
            if trainer.is_global_zero:
                console.print(
                    f"  {self.title}: resumed from last.ckpt at epoch {trainer.current_epoch}/{trainer.max_epochs}"
                )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.time()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {
            "epoch": trainer.current_epoch,
            "train_loss": m.get("train/loss"),
            "val_loss": m.get("val/loss"),
            "val_macro_f1": m.get("val/macro_f1"),
            "lr": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,  # where the schedule is
            "seconds": round(time.time() - self._started, 2),
        }
        with open(self.folder / "history.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.print_lines:
            best = (
                self.best.best_model_score is not None
                and row["val_macro_f1"] is not None
                and abs(float(self.best.best_model_score) - row["val_macro_f1"]) < 1e-9
            )
            console.print(
                f"  {self.title} epoch {trainer.current_epoch + 1:>2}/{trainer.max_epochs}  train loss {_shown(row['train_loss']):.3f}  val loss {_shown(row['val_loss']):.3f}  "
                f"val macro F1 {_shown(row['val_macro_f1']):.4f}{' *' if best else '  '}  {row['seconds']:.1f}s"
            )


def _shown(value: float | None) -> float:
    """A logged number for the epoch line: NaN only when it was not logged (a macro F1 of 0.0 is 0.0)."""
    return float("nan") if value is None else value


def read_history(folder: Path) -> list[dict[str, Any]]:
    """Epoch rows of a model, the last write of each epoch winning (a resume may repeat one)."""
    path = folder / "history.jsonl"
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def class_weights(cfg: Config, source: Source, targets: np.ndarray) -> dict[str, list[float]] | None:
    """loss.class_weights=balanced: per head, weights inverse to its classes' frequency in ``targets``."""
    if cfg.loss.class_weights != "balanced":
        return None
    heads = head_task(source.task, cfg.model.head)
    out = {}
    for head, head_targets in heads.head_targets(targets).items():
        out[head] = balanced_weights(torch.as_tensor(head_targets), len(heads.heads[head])).tolist()
    return out


def teacher_labels(cfg: Config, rows: pd.DataFrame) -> np.ndarray:
    """The distillation teacher's OOF probabilities for ``rows`` (its soft labels)."""
    return teacher_probs(cfg, rows["image_id"])


def make_trainer(
    cfg: Config,
    precision: str,
    callbacks: list[Callback],
    epochs: int,
    samples: int,
    loggers: list[Any],
    root: Path,
    **extra: Any,
) -> L.Trainer:
    """The Trainer every model of a run is fitted with (folds and the final fit): flags from train.*."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        strategy=cfg.train.strategy,
        num_nodes=cfg.train.num_nodes,
        precision=precision,
        accumulate_grad_batches=cfg.train.accumulate_grad_batches,
        gradient_clip_val=cfg.train.gradient_clip_val,
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=progress_mode(cfg) == "bar",
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=min(50, max(1, samples // batch_of(cfg.train))),
        default_root_dir=root,
        **extra,
    )


def progress_mode(cfg: Config) -> str:
    """train.progress resolved: auto is a bar on a terminal, a line per epoch otherwise."""
    mode = cfg.train.progress
    if mode == "auto":
        return "bar" if console.is_terminal else "epoch"
    return mode


def training_rows(
    cfg: Config,
    source: Source,
    rows: pd.DataFrame,
    test_cache: CacheInfo | None = None,
    pseudo: PseudoLabels | None = None,
    transform: Any = None,
) -> TrainingRows:
    """The training side of a fold (or of the final fit): borderline ages out or down-weighted,
    ages for a regression head, pseudo-labelled test images. Validation rows never pass here."""
    extras: dict[str, np.ndarray] = {}
    border = 0
    if cfg.data.borderline.years:
        band = borderline_mask(rows["age"].to_numpy(), cfg)
        border = int(band.sum())
        if cfg.data.borderline.mode == "drop":
            rows = rows[~band]
        else:
            extras["weight"] = np.where(band, cfg.data.borderline.weight, 1.0)
    if cfg.model.age_head == "regress":
        extras["age"] = rows["age"].to_numpy(dtype=np.float32)
    extra = None
    if pseudo is not None and len(pseudo) and test_cache is not None:
        pseudo_extras = {}
        if "weight" in extras:
            pseudo_extras["weight"] = np.ones(len(pseudo))
        if cfg.pseudo.soft:
            extras["soft"] = np.eye(source.task.num_classes)[rows["target"].to_numpy()]
            pseudo_extras["soft"] = pseudo.probs
        extra = CachedImages(test_cache.path, pseudo.rows, pseudo.targets, transform, extras=pseudo_extras)
    return TrainingRows(rows, extras, border, extra)


def recipe_notes(cfg: Config, training: TrainingRows) -> dict[str, Any]:
    """What the recipes changed in a model's training images: a console suffix and metrics.json keys."""
    metrics: dict[str, Any] = {}
    parts = []
    if cfg.data.borderline.years:
        verb = "dropped" if cfg.data.borderline.mode == "drop" else f"weighted {cfg.data.borderline.weight:g}"
        metrics["borderline_images"] = training.borderline
        parts.append(f"{training.borderline} borderline-age images {verb}")
    if training.pseudo is not None:
        metrics["pseudo_images"] = len(training.pseudo)
        parts.append(f"+{len(training.pseudo)} pseudo-labelled test images")
    if metrics:
        metrics["train_images"] = training.count
    return {"metrics": metrics, "line": f" ({', '.join(parts)})" if parts else ""}
