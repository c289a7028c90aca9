"""Torch datasets over the image cache, and the per-fold Lightning DataModule.

Batches are fetched with one fancy-index into the memmap (``__getitems__``) and stay uint8 NHWC
until the model normalises them, which keeps the loader's share of a CPU step small.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pstage.core.compat  # noqa: F401  (before lightning, which imports torchvision)

import lightning as L  # noqa: E402
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from pstage.config import Config, batch_of  # noqa: E402
from pstage.core.devices import autocast_dtype  # noqa: E402
from pstage.data.cache import open_images  # noqa: E402


class CachedImages(Dataset):
    """Rows ``rows`` of a cache memmap as (uint8 HWC image, target) pairs, optionally augmented.

    With ``soft`` (N, C) teacher probabilities (distillation) each item also carries its row of them.
    With ``extras`` (name -> per-image array: "age", "weight", "soft", "teacher") each batch carries
    a third item, a dict of those arrays' rows (the training step reads what it needs).
    """

    def __init__(
        self,
        cache: str | Path,
        rows: np.ndarray,
        targets: np.ndarray | None = None,
        transform: Any = None,
        soft: np.ndarray | None = None,
        extras: dict[str, np.ndarray] | None = None,
    ):
        self.cache = str(cache)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = np.asarray(targets if targets is not None else np.full(len(self.rows), -1), dtype=np.int64)
        self.transform = transform
        self.soft = None if soft is None else np.asarray(soft, dtype=np.float32)
        self.extras = {k: np.asarray(v, dtype=np.float32) for k, v in (extras or {}).items()}
        if self.extras and self.soft is not None:
            self.extras["teacher"], self.soft = self.soft, None
        self._images: np.ndarray | None = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = open_images(self.cache)
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}  # workers re-open the memmap instead of pickling pixels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(part[0] for part in self.__getitems__([index]))

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """A whole batch with one memmap read (the DataLoader calls this instead of per-item gets)."""
        idx = np.asarray(indices)
        batch = self.images[self.rows[idx]]
        if self.transform is not None:
            batch = np.stack([self.transform(image=image)["image"] for image in batch])
        if self.extras:
            return (
                torch.from_numpy(np.ascontiguousarray(batch)),
                torch.from_numpy(self.targets[idx]),
                {k: torch.from_numpy(v[idx]) for k, v in self.extras.items()},
            )
        if self.soft is not None:
            return (
                torch.from_numpy(np.ascontiguousarray(batch)),
                torch.from_numpy(self.targets[idx]),
                torch.from_numpy(self.soft[idx]),
            )
        return torch.from_numpy(np.ascontiguousarray(batch)), torch.from_numpy(self.targets[idx])


class CombinedImages(Dataset):
    """Several CachedImages (e.g. a fold's training images and pseudo-labelled test images) as one dataset.

    Batches keep ``__getitems__``'s one-read-per-cache speed: indices are split by part, each part
    is read once, and the rows are put back in the order asked. Parts must carry the same extras.
    """

    def __init__(self, parts: list[CachedImages]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.targets = np.concatenate([p.targets for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        batch = self.__getitems__([index])
        return tuple({k: v[0] for k, v in part.items()} if isinstance(part, dict) else part[0] for part in batch)

    def __getitems__(self, indices: list[int]) -> tuple[Any, ...]:
        idx = np.asarray(indices)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        pieces, order = [], []
        for p in np.unique(which):
            mine = np.flatnonzero(which == p)
            pieces.append(self.parts[p].__getitems__((idx[mine] - self.offsets[p]).tolist()))
            order.append(mine)
        back = torch.from_numpy(np.argsort(np.concatenate(order)))

        def join(values: list[Any]) -> Any:
            if isinstance(values[0], dict):
                return {k: torch.cat([v[k] for v in values])[back] for k in values[0]}
            return torch.cat(values)[back]

        return tuple(join([piece[i] for piece in pieces]) for i in range(len(pieces[0])))


def keep_batch(batch: Any) -> Any:
    """Collate for datasets that already return whole batches (module-level so workers can pickle it)."""
    return batch


def resolve_workers(num_workers: int | str, augmenting: bool) -> int:
    """auto: no workers when there is nothing to augment (slicing the memmap is cheaper than IPC)."""
    if num_workers != "auto":
        return int(num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores - 1) if augmenting else 0


def seed_worker_transform(worker_id: int) -> None:
    """Give each DataLoader worker its own reproducible augmentation stream.

    Every worker gets a copy of the dataset's albumentations pipeline with the same internal
    random state; re-seeding it from the worker's torch seed (base seed drawn from the seeded main
    process + worker id) makes workers draw differently yet identically from run to run.
    """
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


def make_loader(
    dataset: CachedImages,
    batch_size: int,
    workers: int,
    *,
    shuffle: bool = False,
    sampler: Any = None,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=keep_batch,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker_transform if workers > 0 else None,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
    )


@contextlib.contextmanager
def inference_batches(
    cache: str | Path, rows: Sequence[int] | np.ndarray, batch_size: int, device: torch.device, precision: str
) -> Iterator[Iterator[torch.Tensor]]:
    """The cache rows, in order, as uint8 NHWC batches on ``device``; the block runs in inference mode
    under ``precision``'s autocast. What prediction and embedding (persons.*) share."""
    dtype = autocast_dtype(precision)
    loader = make_loader(CachedImages(cache, np.asarray(rows)), batch_size, 0)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        yield (images.to(device, non_blocking=True) for images, _ in loader)


def balanced_sampler(targets: np.ndarray, seed: int) -> WeightedRandomSampler:
    """Draw each class about equally often (weights inversely proportional to class frequency)."""
    counts = np.bincount(targets)
    weights = 1.0 / counts[targets]
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double),
        len(targets),
        replacement=True,
        generator=torch.Generator().manual_seed(seed),
    )


class FoldData(L.LightningDataModule):
    """Training and validation images of one fold, read from the cache."""

    def __init__(
        self,
        cache: str | Path,
        train_rows: np.ndarray,
        train_targets: np.ndarray,
        val_rows: np.ndarray,
        val_targets: np.ndarray,
        config: Config,
        transform: Any,
        train_soft: np.ndarray | None = None,
        train_extras: dict[str, np.ndarray] | None = None,
        extra_train: CachedImages | None = None,
    ):
        super().__init__()
        self.train_set: CachedImages | CombinedImages = CachedImages(
            cache, train_rows, train_targets, transform, train_soft, train_extras
        )
        if extra_train is not None:  # pseudo-labelled test images: training only, never validation
            self.train_set = CombinedImages([self.train_set, extra_train])
        self.val_set = CachedImages(cache, val_rows, val_targets)
        self.config = config
        self.workers = resolve_workers(config.train.num_workers, transform is not None)

    def train_dataloader(self) -> DataLoader:
        train = self.config.train
        sampler = balanced_sampler(self.train_set.targets, self.config.seed) if train.sampler == "balanced" else None
        # drop_last avoids a size-1 last batch, which BatchNorm rejects in training mode
        drop = len(self.train_set) > batch_of(train)
        return make_loader(self.train_set, batch_of(train), self.workers, shuffle=True, sampler=sampler, drop_last=drop)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, batch_of(self.config.train) * 2, 0)
