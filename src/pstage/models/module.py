"""The LightningModule: the science of one fold (model, loss, mixing, optimizer, validation F1).

The engineering (devices, precision, DDP, checkpoints, loggers) is the Trainer's, set up in
``training.py``. Checkpoints carry the config and task, so a fold model loads on its own.
"""

from __future__ import annotations

from typing import Any

import pstage.core.compat  # noqa: F401

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torchmetrics.classification import MulticlassF1Score

from pstage.config import Config
from pstage.core.tasks import Task
from pstage.data.augment import mix_batch
from pstage.data.device_augment import build_device_augment
from pstage.models.classifier import (
    AgeRegressionHead,
    ArcFaceHead,
    OrdinalHead,
    class_probs,
    create_classifier,
    head_task,
    readout,
)
from pstage.models.losses import create_loss, distillation, ordinal_loss


def uses_channels_last(model: torch.nn.Module, setting: str | bool) -> bool:
    """auto: on for convolutional networks (NHWC kernels are faster on CPU and tensor cores)."""
    if setting in ("on", True):
        return True
    if setting in ("off", False):
        return False
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) >= 4


class ClassifierModule(L.LightningModule):
    """Trains a Classifier on soft targets and validates macro F1 over the final classes."""

    def __init__(
        self, config: dict[str, Any], task: dict[str, Any], class_weights: dict[str, list[float]] | None = None
    ):
        super().__init__()
        self.save_hyperparameters()
        self.config = Config.model_validate(config)
        self.task = Task.from_dict(task)
        cfg = self.config
        self.model = create_classifier(
            cfg.model.name,
            self.task,
            cfg.model.head,
            pretrained=cfg.model.pretrained,
            weights=cfg.model.weights,
            pool=cfg.model.pool,
            drop_rate=cfg.model.drop_rate,
            input_size=tuple(cfg.data.image_size),
            classifier=cfg.model.classifier,
            age_head=cfg.model.age_head,
            age_thresholds=tuple(cfg.data.age_thresholds),
            arcface_scale=cfg.model.arcface_scale,
            arcface_margin=cfg.model.arcface_margin,
        )
        self.heads = head_task(self.task, cfg.model.head)
        self.loss_fn = create_loss(cfg.loss)  # loss.name from the LOSSES registry, its settings bound
        self.channels_last = uses_channels_last(self.model, cfg.train.channels_last)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        for head, index in self.heads.class_to_head.items():  # (C, K_h) maps final-class targets to head targets
            self.register_buffer(
                f"map_{head}", F.one_hot(torch.tensor(index), len(self.heads.heads[head])).float(), persistent=False
            )
            weights = (class_weights or {}).get(head)
            self.register_buffer(f"weight_{head}", torch.tensor(weights) if weights else None, persistent=False)
        # the preset, batched on the device (None: per image in the loader, or no augmentation)
        self.augment = build_device_augment(cfg.augment, cfg.data.image_size)
        self.val_f1 = MulticlassF1Score(num_classes=self.task.num_classes, average="macro")
        self._rng = np.random.default_rng(cfg.seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Final-class probabilities for uint8 NHWC images."""
        return class_probs(self.model(self._inputs(images)), self.heads)

    def _inputs(self, images: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """uint8 NHWC -> the model's normalised input; ``augment``: the device preset first (training)."""
        if augment and self.augment is not None:
            x = self.augment(images, self.model.mean, self.model.std)
        else:
            x = self.model.normalize(images)
        return x if self.channels_last else x.contiguous()

    def on_train_epoch_start(self) -> None:
        # a fresh, reproducible mixing stream per epoch and rank (also right after a resume)
        self._rng = np.random.default_rng([self.config.seed, self.current_epoch, self.global_rank])

    def training_step(self, batch: tuple[Any, ...], batch_idx: int) -> torch.Tensor:
        # A third item: the teacher's soft labels (pstage distill), or a dict of per-image extras:
        # "teacher" (N, C), "soft" (N, C) targets, "age" (N,) in years (age regression), "weight" (N,) loss weights.
        images, targets, *rest = batch
        extras = rest[0] if rest and isinstance(rest[0], dict) else ({"teacher": rest[0]} if rest else {})
        teacher = extras.get("teacher")
        if "soft" in extras:  # target distributions (pseudo.soft: the teacher's probabilities; one-hot for real images)
            soft = extras["soft"].float()
        else:
            soft = F.one_hot(targets, self.task.num_classes).float()
        # everything per image is mixed by CutMix/MixUp like the labels: appended as columns, split after
        parts = [soft]
        if teacher is not None:
            parts.append(teacher.float())
        for key in ("age", "weight"):
            if key in extras:
                parts.append(extras[key].float().view(-1, 1))
        x, mixed = mix_batch(
            self._inputs(images, augment=True),
            torch.cat(parts, 1) if len(parts) > 1 else soft,
            self.config.augment,
            self._rng,
        )
        c = self.task.num_classes
        soft = mixed[:, :c]
        col = c
        if teacher is not None:
            teacher_probs, col = mixed[:, col : col + c], col + c
        ages = weights = None
        if "age" in extras:
            ages, col = mixed[:, col], col + 1
        if "weight" in extras:
            weights = mixed[:, col]
        raw = self.model(x, raw=True)
        loss = sum(self._head_loss(h, out, soft @ getattr(self, f"map_{h}"), ages, weights) for h, out in raw.items())
        if teacher is not None:
            logits = {h: readout(self.model.heads[h], out) for h, out in raw.items()}
            kd = self.config.distill
            kd_loss = distillation(self._log_probs(logits, kd.temperature), teacher_probs, kd.temperature)
            loss = kd.alpha * kd_loss + (1 - kd.alpha) * loss
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images), sync_dist=True
        )
        return loss

    def _head_loss(
        self,
        head: str,
        out: torch.Tensor,
        target: torch.Tensor,
        ages: torch.Tensor | None,
        weights: torch.Tensor | None,
    ) -> torch.Tensor:
        """One head's loss on its raw output, per the head's kind (linear, ArcFace, age regression, ordinal)."""
        layer = self.model.heads[head]
        if isinstance(layer, OrdinalHead):
            return ordinal_loss(out, target, weights)
        if isinstance(layer, AgeRegressionHead):
            if ages is None:
                raise RuntimeError("model.age_head=regress: the batch carries no ages")
            z_error = F.smooth_l1_loss(out.float().squeeze(-1), layer.standardise(ages), reduction="none")
            regression = (
                z_error.mean() if weights is None else (z_error * weights).sum() / weights.sum().clamp_min(1e-8)
            )
            logits = layer.readout(out)  # log bucket probabilities: the bucket term trains the Gaussian's width
        elif isinstance(layer, ArcFaceHead):
            regression, logits = 0.0, layer.margin_logits(out, target)
        else:
            regression, logits = 0.0, out
        return regression + self.loss_fn(logits, target, weight=getattr(self, f"weight_{head}"), sample_weight=weights)

    def _log_probs(self, logits: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        """Log-probabilities over the final classes at a temperature (a sum over heads for multi-head models)."""
        out = None
        for head, head_logits in logits.items():
            part = (head_logits.float() / temperature).log_softmax(-1) @ getattr(self, f"map_{head}").T
            out = part if out is None else out + part
        return out

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, targets = batch
        probs = self(images)
        loss = F.nll_loss(probs.clamp_min(1e-8).log(), targets)
        self.val_f1.update(probs.argmax(1), targets)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(images), sync_dist=True)
        self.log("val/macro_f1", self.val_f1, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        optim = self.config.optim
        optimizer = create_optimizer_v2(
            self.model, opt=optim.name, lr=optim.lr, weight_decay=optim.weight_decay, momentum=optim.momentum
        )
        if optim.scheduler == "none":
            return optimizer
        epochs = self.trainer.max_epochs
        per_epoch = max(1, int(np.ceil(self.trainer.estimated_stepping_batches / epochs)))
        self._updates_per_epoch = per_epoch
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched="cosine" if optim.scheduler == "cosine" else "constant",
            num_epochs=epochs,
            warmup_epochs=optim.warmup_epochs,
            warmup_lr=optim.lr * 0.01,
            min_lr=optim.lr * optim.min_lr_ratio,
            step_on_epochs=False,
            updates_per_epoch=per_epoch,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def plan_epochs(self, epochs: int) -> None:
        """Set the LR schedule's length to ``epochs`` (train.time re-plans a model as it trains), so a
        cosine schedule still ends at its minimum with the last planned epoch."""
        for config in self.trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "t_initial"):
                config.scheduler.t_initial = epochs * self._updates_per_epoch

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)  # timm schedulers step by update count
