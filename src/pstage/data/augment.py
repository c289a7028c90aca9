"""Augmentation: albumentations per image in the loader (custom pipelines, or the presets with
augment.device=false, or auto on a CPU for images larger than 64x64), CutMix/MixUp per batch; otherwise
the presets run batched on the training device (device_augment.py). Both backends build the presets
from one description (presets.py); ``augment_backend`` says which one a run used (run.json).

Per-image transforms run on the cached uint8 images in the data loader; batch mixing runs in the
training step on normalised tensors and mixes the (soft) targets with the same weights.
"""

from __future__ import annotations

import difflib
import inspect
import os
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pstage.config import AugmentConfig  # noqa: E402
from pstage.core.devices import inference_device  # noqa: E402
from pstage.core.errors import ConfigError  # noqa: E402
from pstage.data.presets import PRESETS, Preset  # noqa: E402


def albumentations_ops(preset: Preset) -> list[A.BasicTransform]:
    """The preset's ops (presets.py) as albumentations transforms, in order; ops with p=0 left out."""
    ops: list[A.BasicTransform] = []
    if preset.flip.p:
        ops.append(A.HorizontalFlip(p=preset.flip.p))
    if (affine := preset.affine).p:
        ops.append(
            A.Affine(
                scale=affine.scale,
                translate_percent=affine.translate,
                rotate=affine.rotate,
                border_mode=cv2.BORDER_REFLECT_101,
                p=affine.p,
            )
        )
    if (bc := preset.brightness_contrast).p:
        ops.append(A.RandomBrightnessContrast(brightness_limit=bc.brightness, contrast_limit=bc.contrast, p=bc.p))
    if (hsv := preset.hsv).p:
        ops.append(
            A.HueSaturationValue(
                hue_shift_limit=hsv.hue, sat_shift_limit=hsv.saturation, val_shift_limit=hsv.value, p=hsv.p
            )
        )
    if (bn := preset.blur_noise).p:
        blur = [
            A.GaussianBlur(blur_limit=bn.kernel, sigma_limit=bn.sigma),
            A.MotionBlur(blur_limit=bn.kernel),
            A.GaussNoise(std_range=bn.noise_std),
        ]
        ops.append(A.OneOf(blur, p=bn.p))
    if preset.gray.p:
        ops.append(A.ToGray(p=preset.gray.p))
    if (erase := preset.erase).p:
        ops.append(
            A.CoarseDropout(
                num_holes_range=erase.holes,
                hole_height_range=erase.height,
                hole_width_range=erase.width,
                fill=erase.fill,
                p=erase.p,
            )
        )
    return ops


def _transform(index: int, spec: Any) -> A.BasicTransform:
    """One ``{Name: {param: value}}`` (or bare ``Name``) entry of ``augment.transforms`` as an albumentations transform."""
    where = f"augment.transforms[{index}]"
    if isinstance(spec, str):  # a bare name: the transform with its default parameters
        spec = {spec: {}}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one {{TransformName: {{params}}}} mapping, got {spec!r}")
    ((name, params),) = spec.items()
    params = params or {}
    cls = getattr(A, str(name), None)
    if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
        names = [n for n in dir(A) if inspect.isclass(getattr(A, n)) and issubclass(getattr(A, n), A.BasicTransform)]
        near = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean {near[0]}?" if near else " (see albumentations.ai/docs for names)"
        raise ConfigError(f"{where}: unknown albumentations transform '{name}'{hint}")
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: parameters of {name} must be a mapping, got {params!r}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = [p for p in params if p not in accepted]
    if unknown:
        raise ConfigError(f"{where}: {name} has no parameter '{unknown[0]}' (it takes: {', '.join(sorted(accepted))})")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        raise ConfigError(f"{where}: invalid parameters for {name}: {first[0] if first else exc}") from None


SMALL_ON_CPU = 64 * 64  # pixels per image up to which the batched preset beats the loader on a CPU


def on_device(cfg: AugmentConfig, image_size: tuple[int, int] | list[int] | None = None) -> bool:
    """Whether the preset runs batched on the training device (device_augment.py) rather than per
    image in the loader: augment.device true/false, or auto = unless ``augment.transforms`` lists a
    custom albumentations pipeline (those stay per image), on a CUDA machine, and on a CPU for
    images of at most 64x64 pixels (``image_size`` unknown counts as larger).

    Measured on 2 CPU cores (benchmarks/throughput.py, strong preset, `pstage train` img/s batched
    vs loader, interleaved rounds): resnet10t 64x48 1.10x on drawn faces, 1.11-1.16x on real ones
    (albumentations' per-image overhead dominates small images, and its worker takes a core from
    the model's two threads); resnet18 128x96 1.01x (drawn); the default tf_efficientnet_lite0
    128x128 1.04x on drawn faces, 0.94-1.02x on real ones, and a facemask 15-minute run trained
    slower epochs batched (per pixel, OpenCV on uint8 in a worker that overlaps the step is as
    cheap as float warps inside the step).
    """
    if cfg.device is True and cfg.transforms is not None:
        raise ConfigError(
            "augment.device=true runs the presets on the device; augment.transforms (albumentations, per image) runs in the loader: set augment.device=auto or false"
        )
    if cfg.device == "auto":
        if cfg.transforms is not None:
            return False
        if torch.cuda.is_available():
            return True
        return image_size is not None and image_size[0] * image_size[1] <= SMALL_ON_CPU
    return cfg.device is True


def augment_backend(
    cfg: AugmentConfig, image_size: tuple[int, int] | list[int] | None, accelerator: str
) -> dict[str, str]:
    """Where a run's augmentation runs, for run.json's ``resolved.augment``: the preset (``custom``
    for ``augment.transforms``), the backend (``device``: batched in the training step, ``loader``:
    albumentations per image, ``none``) and the training device (``cpu`` or ``cuda``)."""
    preset = "custom" if cfg.transforms is not None else cfg.preset
    if (cfg.transforms is None and cfg.preset == "none") or cfg.transforms == []:
        backend = "none"
    else:
        backend = "device" if on_device(cfg, image_size) else "loader"
    return {"preset": preset, "backend": backend, "device": inference_device(accelerator).type}


def build_transforms(
    cfg: AugmentConfig, seed: int | None = None, image_size: tuple[int, int] | list[int] | None = None
) -> A.Compose | None:
    """The per-image training transforms (None when there are none or the preset runs on the
    device, so loading can batch-slice).

    albumentations keeps its own random state, which global seeding does not reach: ``seed``
    makes the draws reproducible (the loader re-seeds it per batch from ``seed`` and the batch's
    indices, datasets.seed_transform).
    """
    if on_device(cfg, image_size):
        return None
    transforms = (
        [_transform(i, spec) for i, spec in enumerate(cfg.transforms)]
        if cfg.transforms is not None
        else albumentations_ops(PRESETS[cfg.preset])
    )
    return A.Compose(transforms, seed=seed) if transforms else None


def mix_batch(
    images: torch.Tensor, targets: torch.Tensor, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix or MixUp a batch (N, C, H, W) with soft targets (N, K); each with its probability.

    CutMix ``vertical`` swaps the left or right half of each image with another image's (faces are
    roughly symmetric, so both halves keep mask, gender and age cues); ``random`` pastes a box.
    Target weights follow the pixel share each image keeps.
    """
    roll = rng.random()
    if roll < cfg.cutmix.p:
        perm = torch.from_numpy(rng.permutation(len(images))).to(images.device)
        height, width = images.shape[-2:]
        if cfg.cutmix.mode == "vertical":
            half = width // 2
            cols = slice(0, half) if rng.random() < 0.5 else slice(half, width)
            images = images.clone()
            images[..., cols] = images[perm][..., cols]
            kept = 1.0 - (cols.stop - cols.start) / width
        else:
            lam = rng.beta(cfg.cutmix.alpha, cfg.cutmix.alpha)
            cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
            cy, cx = rng.integers(height), rng.integers(width)
            y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
            x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
            images = images.clone()
            images[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
            kept = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        return images, kept * targets + (1 - kept) * targets[perm]
    if roll < cfg.cutmix.p + cfg.mixup.p * (1 - cfg.cutmix.p):
        perm = torch.from_numpy(rng.permutation(len(images))).to(images.device)
        lam = float(rng.beta(cfg.mixup.alpha, cfg.mixup.alpha))
        return lam * images + (1 - lam) * images[perm], lam * targets + (1 - lam) * targets[perm]
    return images, targets
