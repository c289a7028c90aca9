"""Losses over soft targets (so CutMix/MixUp and label smoothing share one path).

Each loss takes logits (N, K) and target distributions (N, K). Hand-written where torch has none:
focal loss and soft macro-F1 are a few lines each and need soft-target support.
``loss.name`` picks one from ``LOSSES`` by name; a new loss is one registered factory below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pstage.config import LossConfig
from pstage.core.registry import Registry

# (logits, targets, weight=None, sample_weight=None) -> scalar loss, its settings bound from loss.*
LossFn = Callable[..., torch.Tensor]
LOSSES: Registry[Callable[[LossConfig], LossFn]] = Registry("loss", "loss.name")


def smooth(targets: torch.Tensor, amount: float) -> torch.Tensor:
    return targets * (1 - amount) + amount / targets.shape[-1] if amount else targets


def weighted_mean(values: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-image values, weighted by ``sample_weight`` when given."""
    if sample_weight is None:
        return values.mean()
    return (values * sample_weight).sum() / sample_weight.sum().clamp_min(1e-8)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    if sample_weight is None:
        return F.cross_entropy(logits.float(), targets, weight=weight, label_smoothing=label_smoothing)
    per_image = F.cross_entropy(
        logits.float(), targets, weight=weight, label_smoothing=label_smoothing, reduction="none"
    )
    return weighted_mean(per_image, sample_weight)


def focal(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 2.0,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss (Lin et al.): cross-entropy scaled by (1 - p)^gamma to focus on hard images."""
    log_p = logits.float().log_softmax(-1)
    t = smooth(targets, label_smoothing)
    loss = -(t * (1 - log_p.exp()).pow(gamma) * log_p)
    if weight is not None:
        loss = loss * weight
    return weighted_mean(loss.sum(-1), sample_weight)


def soft_f1(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """1 - macro F1 computed on probabilities (differentiable), averaged over classes present.

    ``sample_weight`` scales each image's share of the soft counts (tp, fp, fn).
    """
    p = logits.float().softmax(-1)
    t = smooth(targets, label_smoothing)
    if sample_weight is not None:
        p, t = p * sample_weight[:, None], t * sample_weight[:, None]
    tp = (p * t).sum(0)
    fp = (p * (1 - t)).sum(0)
    fn = ((1 - p) * t).sum(0)
    f1 = 2 * tp / (2 * tp + fp + fn + 1e-7)
    present = (t.sum(0) > 0) | (p.sum(0) > 0.5)
    if weight is not None:
        return 1 - (f1 * weight)[present].sum() / weight[present].sum()
    return 1 - f1[present].mean()


@LOSSES.register("ce")
def _ce(cfg: LossConfig) -> LossFn:
    """Cross-entropy."""
    return functools.partial(cross_entropy, label_smoothing=cfg.label_smoothing)


@LOSSES.register("focal")
def _focal(cfg: LossConfig) -> LossFn:
    """Focal loss with focusing parameter loss.focal_gamma."""
    return functools.partial(focal, label_smoothing=cfg.label_smoothing, gamma=cfg.focal_gamma)


@LOSSES.register("f1")
def _f1(cfg: LossConfig) -> LossFn:
    """Soft macro-F1."""
    return functools.partial(soft_f1, label_smoothing=cfg.label_smoothing)


def create_loss(cfg: LossConfig) -> LossFn:
    """The loss ``cfg.name`` with its settings (label smoothing, focal gamma) bound: ``fn(logits, targets, weight, sample_weight)``."""
    return LOSSES.create(cfg.name, cfg)


def compute_loss(
    name: str,
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 2.0,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``name`` (ce, focal, f1) over soft targets; ``sample_weight`` (N,) weights images (borderline ages)."""
    loss = create_loss(LossConfig(name=name, label_smoothing=label_smoothing, focal_gamma=gamma))
    return loss(logits, targets, weight=weight, sample_weight=sample_weight)


def ordinal_loss(
    cumulative_logits: torch.Tensor, targets: torch.Tensor, sample_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """CORAL loss: binary cross-entropy of each cumulative logit P(y > k) against its (soft) target.

    ``targets`` (N, K) are bucket distributions; the target of level k is their mass above k.
    """
    above = targets.float().flip(-1).cumsum(-1).flip(-1)[:, 1:]  # P(y > k) for k = 0..K-2
    per_image = F.binary_cross_entropy_with_logits(cumulative_logits.float(), above, reduction="none").sum(-1)
    return weighted_mean(per_image, sample_weight)


def distillation(log_student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al.): T^2 * KL(teacher_T || student_T), mean over images.

    ``log_student``: the student's log-probabilities over the final classes computed from logits / T;
    ``teacher``: the teacher's probabilities, softened to teacher^(1/T) renormalised. The T^2
    keeps the gradient's scale independent of T.
    """
    log_teacher = teacher.float().clamp_min(1e-8).log() / temperature
    log_teacher = log_teacher - log_teacher.logsumexp(-1, keepdim=True)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean()
    return kl * temperature**2


def balanced_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights normalised to mean 1 (absent classes get weight 1)."""
    counts = torch.bincount(targets, minlength=num_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.ones_like(counts))
    return weights / weights.mean()
