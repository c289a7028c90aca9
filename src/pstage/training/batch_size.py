"""``train.batch_size: auto``: the largest batch that fits on the GPU, and the learning rate scaled to it.

Lightning's BatchSizeFinder runs real fit steps through the DataModule and needs a mutable
``batch_size`` attribute on it; a direct probe of forward + backward on synthetic uint8 batches is
shorter, deterministic, and leaves no trainer state behind.
"""

from __future__ import annotations

import math

import pstage.core.compat  # noqa: F401

import torch

from pstage.config import DEFAULT_BATCH, Config
from pstage.core.devices import autocast_dtype
from pstage.core.tasks import Task
from pstage.models.module import ClassifierModule

MAX_BATCH = 1024  # beyond this a few-epoch competition run loses more to fewer steps than it gains in speed
MIN_STEPS = 16  # an epoch keeps at least this many optimizer steps
SGD_LIKE = ("sgd", "momentum", "nesterov", "sgdp", "sgdw")


def scaled_lr(lr: float, optimizer: str, batch: int) -> float:
    """Linear scaling for SGD-like optimizers (Goyal et al. 2017), square-root for adaptive ones
    (Malladi et al. 2022, the SDE scaling rule for Adam), both relative to the default batch of 64."""
    ratio = batch / DEFAULT_BATCH
    linear = any(optimizer.lower().startswith(name) for name in SGD_LIKE)
    return lr * (ratio if linear else math.sqrt(ratio))


def fits(module: ClassifierModule, batch: int, size: tuple[int, int], device: torch.device, precision: str) -> bool:
    """One forward + backward of ``batch`` images without running out of device memory."""
    dtype = autocast_dtype(precision)
    try:
        images = torch.randint(0, 256, (batch, *size, 3), dtype=torch.uint8, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = module.model(module._inputs(images, augment=True), raw=True)
            loss = sum(v.float().mean() for v in out.values())
        loss.backward()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        module.model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def auto_batch_size(cfg: Config, task: Task, device: torch.device, precision: str, train_images: int) -> int:
    """The batch for ``auto``: 64 off CUDA; on CUDA the largest power of two from 64 that fits,
    capped by MAX_BATCH and by train_images / MIN_STEPS."""
    if device.type != "cuda":
        return DEFAULT_BATCH
    cap = max(DEFAULT_BATCH, min(MAX_BATCH, 2 ** int(math.log2(max(1, train_images // MIN_STEPS)))))
    module = ClassifierModule(cfg.to_dict(), task.to_dict()).to(device).train()
    size = tuple(cfg.data.image_size)
    batch = DEFAULT_BATCH
    while batch * 2 <= cap and fits(module, batch * 2, size, device, precision):
        batch *= 2
    del module
    torch.cuda.empty_cache()
    return batch


def resolve_batch(cfg: Config, task: Task, device: torch.device, precision: str, train_images: int) -> Config:
    """The config a run trains with: ``auto`` replaced by the probed batch, the lr scaled with it."""
    if cfg.train.batch_size != "auto":
        return cfg
    batch = auto_batch_size(cfg, task, device, precision, train_images)
    values = cfg.to_dict()
    values["train"]["batch_size"] = batch
    values["optim"]["lr"] = scaled_lr(cfg.optim.lr, cfg.optim.name, batch)
    return Config.model_validate(values)
