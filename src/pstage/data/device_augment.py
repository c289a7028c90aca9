"""Augmentation on the device: the presets as batch operations on the GPU (or CPU) after the transfer.

The loader then only slices the uint8 cache into (pinned) batches; flips, affine warps, colour,
blur/noise and erasing run per image but batched, with kornia (each image draws its own
parameters from torch's generator, which Lightning seeds per fold: runs are reproducible).
kornia rather than torchvision.transforms.v2: v2 draws one set of parameters per call, so a
batch would share one flip/warp; kornia's ``same_on_batch=False`` draws one per image.

The presets mirror the albumentations ones in ``augment.py`` (which still serves
``augment.transforms``, custom per-image pipelines run in the loader's workers).
"""

from __future__ import annotations

import pstage.core.compat  # noqa: F401  (kornia imports torchvision pieces on some versions)

import kornia.augmentation as K
import torch
from torch import nn

from pstage.config import AugmentConfig
from pstage.data.augment import on_device


def _basic() -> list[nn.Module]:
    """Flip, small shift/scale/rotate (reflected borders), brightness/contrast: albumentations' basic."""
    return [
        K.RandomHorizontalFlip(p=0.5),
        K.RandomAffine(degrees=10.0, translate=(0.06, 0.06), scale=(0.9, 1.1), padding_mode="reflection", p=0.7),
        K.ColorJiggle(brightness=0.2, contrast=0.2, p=0.5),
    ]


def _strong() -> list[nn.Module]:
    """basic + hue/saturation, one of blur / motion blur / noise, grey, erasing: albumentations' strong."""
    return [
        *_basic(),
        K.ColorJiggle(saturation=0.2, hue=0.045, p=0.4),
        _OneOf(0.3),
        K.RandomGrayscale(p=0.05),
        K.RandomErasing(scale=(0.0025, 0.0225), ratio=(0.5, 2.0), value=0.0, p=0.3),
    ]


class _OneOf(nn.Module):
    """With probability p, one of blur / motion blur / noise, drawn per image (albumentations' OneOf)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.ops = nn.ModuleList(
            [
                K.RandomGaussianBlur(kernel_size=(5, 5), sigma=(0.3, 1.2), p=1.0),
                K.RandomMotionBlur(kernel_size=5, angle=45.0, direction=0.5, p=1.0),
                K.RandomGaussianNoise(std=0.05, p=1.0),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(0, len(self.ops) + 1, (len(x),), device=x.device)
        keep = torch.rand(len(x), device=x.device) >= self.p
        pick[keep] = len(self.ops)  # no op
        out = x.clone()
        for i, op in enumerate(self.ops):
            rows = (pick == i).nonzero().flatten()
            if len(rows):
                out[rows] = op(x[rows])
        return out


PRESETS = {"none": list, "basic": _basic, "strong": _strong}


class DeviceAugment(nn.Module):
    """The preset as a batch op on float images in [0, 1], NCHW, on whatever device they are."""

    def __init__(self, preset: str):
        super().__init__()
        self.ops = nn.Sequential(*PRESETS[preset]())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x).clamp_(0.0, 1.0)


def build_device_augment(cfg: AugmentConfig) -> DeviceAugment | None:
    """The training module's batch augmentation, or None (off, preset none, or custom transforms)."""
    if not on_device(cfg) or cfg.preset == "none":
        return None
    return DeviceAugment(cfg.preset)
