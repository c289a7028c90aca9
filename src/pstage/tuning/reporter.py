"""Per-epoch reporting of a trial to its search engine (Optuna or Ray), across the folds it trains.

A trial trains several folds one after another, so the value reported after each validation epoch
is a *running CV estimate*: the mean over the folds seen so far of each fold's best validation
macro F1 up to now (finished folds count with their best epoch, the current fold with its best
epoch so far). It never decreases within a fold, and after the last epoch it equals the mean of
the folds' best-epoch macro F1, i.e. run.json's ``cv.macro_f1``. Steps run on across folds:
``step = position of the fold in the trial's folds x epochs + epoch``, so a pruner compares
trials at the same amount of training.

Imports Lightning: only trial code imports this module (``pstage tune --show`` and ``--help``
stay light).
"""

from __future__ import annotations

from collections.abc import Callable

import pstage.core.compat  # noqa: F401

import lightning as L
from lightning.pytorch.callbacks import Callback

MONITOR = "val/macro_f1"

# report(value, step, where) -> None; raises to stop the trial (optuna.TrialPruned for Optuna).
Report = Callable[[float, int, str], None]


class CrossFoldReporter:
    """Turns per-fold validation epochs into one monotone series of (step, running value)."""

    def __init__(self, folds: list[int], epochs: int, report: Report):
        self.folds, self.epochs, self.report = list(folds), epochs, report
        self.best: dict[int, float] = {}
        self.last_step = -1

    def value(self) -> float:
        """Running CV estimate: mean over the folds seen so far of their best macro F1."""
        return sum(self.best.values()) / len(self.best) if self.best else 0.0

    def epoch_end(self, fold: int, epoch: int, score: float) -> None:
        self.best[fold] = max(self.best.get(fold, float("-inf")), score)
        step = self.folds.index(fold) * self.epochs + epoch
        self.last_step = step
        self.report(self.value(), step, f"fold {fold} epoch {epoch + 1}")

    def callbacks(self, fold: int) -> list[Callback]:
        """The Lightning callbacks for fold ``fold`` (the ``fold_callbacks`` hook of ``train``)."""
        return [_EpochHook(self, fold)]


class _EpochHook(Callback):
    """Reports after every validation epoch of one fold.

    pstage's own callback rather than optuna-integration's PyTorchLightningPruningCallback: that one
    reports ``step = epoch`` and the raw epoch metric, so the folds of one trial would overwrite
    each other's steps (Optuna ignores a repeated step), and in DDP it requires an RDB storage.
    """

    def __init__(self, reporter: CrossFoldReporter, fold: int):
        self.reporter, self.fold = reporter, fold

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        score = trainer.callback_metrics.get(MONITOR)
        if score is not None:
            # Raising here (optuna.TrialPruned) ends the fit; train() marks the run failed, never done.
            self.reporter.epoch_end(self.fold, trainer.current_epoch, float(score))
