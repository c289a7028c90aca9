"""Torch datasets over the image cache, and the per-fold Lightning DataModule.

Batches are fetched with one fancy-index into the memmap (``__getitems__``) and stay uint8 NHWC
until the model normalises them, which keeps the loader's share of a CPU step small.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pstage.core.compat  # noqa: F401  (before lightning, which imports torchvision)

import lightning as L  # noqa: E402
import numpy as np
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

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
            seed_transform(self.transform, idx)
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


def seed_transform(transform: Any, indices: np.ndarray) -> None:
    """Seed an albumentations pipeline for one batch from its own seed and the batch's indices.

    A batch's indices are a function of (seed, epoch, batch) (``train_sampler``), so its
    augmentation is too: the same in a resumed run as in an uninterrupted one, whatever the number
    of loader workers or whether they persist (a worker-level stream would depend on how many
    batches that worker drew before). One generator shared by all transforms: albumentations'
    ``set_random_seed`` gives each transform its own generator with the same seed, which makes
    their draws identical (every transform with p=0.5 would fire together).
    """
    if not hasattr(transform, "set_random_state"):
        return
    entropy = np.random.SeedSequence([int(getattr(transform, "seed", None) or 0), *np.asarray(indices).tolist()])
    transform.set_random_state(np.random.default_rng(entropy), random.Random(int(entropy.generate_state(1)[0])))


def make_loader(
    dataset: CachedImages,
    batch_size: int,
    workers: int,
    *,
    sampler: Any = None,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=keep_batch,
        persistent_workers=workers > 0,
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


class BalancedSampler(WeightedRandomSampler):
    """Draw each class about equally often (weights inversely proportional to class frequency),
    a fresh draw per epoch that depends only on (seed, epoch), as DistributedSampler's shuffle."""

    def __init__(self, targets: np.ndarray, seed: int):
        counts = np.bincount(targets)
        weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
        super().__init__(weights, len(targets), replacement=True, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


def train_sampler(
    dataset: Dataset, targets: np.ndarray, balanced: bool, seed: int, epoch: int, replicas: int = 1, rank: int = 0
) -> DistributedSampler:
    """The training order: a shuffle (or a class-balanced draw) that is a pure function of (seed,
    epoch), split across DDP ranks, so a resumed run draws the same epochs as an uninterrupted one.

    Torch's RandomSampler draws from the global RNG at each epoch (its stream depends on the whole
    history of the process); DistributedSampler (what Lightning puts in under DDP) seeds each epoch
    with seed + epoch. Lightning calls ``set_epoch`` before each epoch, but on a resume it creates
    the first epoch's iterator before that (loader workers start fetching at once): ``epoch`` is
    the epoch to start at (FoldData keeps it in last.ckpt). Built here for one process too
    (Lightning leaves a DistributedSampler in place), so one and several processes shuffle alike.
    """
    if balanced:
        sampler = DistributedSamplerWrapper(
            BalancedSampler(targets, seed), num_replicas=replicas, rank=rank, shuffle=False
        )
    else:
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return sampler


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
        seed: int = 0,
    ):
        super().__init__()
        self.train_set: CachedImages | CombinedImages = CachedImages(
            cache, train_rows, train_targets, transform, train_soft, train_extras
        )
        if extra_train is not None:  # pseudo-labelled test images: training only, never validation
            self.train_set = CombinedImages([self.train_set, extra_train])
        self.val_set = CachedImages(cache, val_rows, val_targets)
        self.config = config
        self.seed = seed  # the training order's (train_sampler)
        self.epoch = 0  # the epoch the training order starts at: last.ckpt's on a resume
        self.workers = resolve_workers(config.train.num_workers, transform is not None)

    def train_dataloader(self) -> DataLoader:
        train, trainer = self.config.train, self.trainer
        sampler = train_sampler(
            self.train_set,
            self.train_set.targets,
            train.sampler == "balanced",
            self.seed,
            self.epoch,
            trainer.world_size if trainer is not None else 1,
            trainer.global_rank if trainer is not None else 0,
        )
        # drop_last avoids a size-1 last batch, which BatchNorm rejects in training mode
        drop = len(self.train_set) > batch_of(train)
        return make_loader(self.train_set, batch_of(train), self.workers, sampler=sampler, drop_last=drop)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's epoch in last.ckpt: the epoch Lightning passes to set_epoch next.

        On a resume Lightning builds the training loader (and its workers start fetching) before
        it restores its loops or calls set_epoch, but after it restores this state.
        """
        trainer = self.trainer
        return {"epoch": trainer.fit_loop.epoch_progress.current.processed} if trainer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, batch_of(self.config.train) * 2, 0)
