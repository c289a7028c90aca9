"""How much does loading cost? pstage's cached pipeline vs model-only vs a PIL baseline.

On the demo data (384x512 source photos), same model, image size and Lightning loop for all:
  (a) model only: pre-built uint8 batches in memory (the ceiling);
  (b) pstage: batches read from the decoded-image memmap cache, without augmentation (the loading
      cost alone) and with the default per-image augmentation (basic preset, default workers);
  (c) baseline: a Dataset that opens, resizes, flips and converts every image with PIL every epoch;
  (d) pstage's default precision / memory format vs plain fp32 (and bf16-mixed), with macro F1.
Prints img/s (median of steady-state epochs, settings interleaved) and the ratios b/a and b/c.

Run: python benchmarks/input_pipeline.py [--models test_resnet,resnet10t,resnet18] [--skip-d]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pstage.core.compat  # noqa: F401

import lightning as L
import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from pstage.config import Config, load_config
from pstage.core.console import quiet_lightning
from pstage.core.devices import resolve_precision
from pstage.data.augment import build_transforms
from pstage.data.datasets import FoldData, resolve_workers
from pstage.data.prepare import prepare_caches
from pstage.data.sources import Source, load_source
from pstage.data.split import make_folds
from pstage.data.synthetic import make_demo_data
from pstage.models.module import ClassifierModule

console = Console(width=150)


class EpochTimer(L.Callback):
    """Wall time of each training epoch (validation excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._started)


class InMemory(Dataset):
    """Pre-built uint8 NHWC batches: no decoding, no copying, no augmentation."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[i]


class PilBaseline(Dataset):
    """The usual baseline script: open + resize + flip + convert with PIL for every image, every epoch."""

    def __init__(self, paths: list[str], targets: np.ndarray, size: tuple[int, int]):
        self.paths, self.targets, self.size = paths, targets, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
            if np.random.rand() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            return torch.from_numpy(np.asarray(image).copy()), int(self.targets[i])


def _trainer(precision: str, timer: EpochTimer, **limits: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
        **limits,
    )


def epoch_times(cfg: Config, source: Source, loader: DataLoader, epochs: int = 3) -> list[float]:
    """Wall times of the steady-state training epochs (the first one warms up and is dropped)."""
    L.seed_everything(0, verbose=False)
    module = ClassifierModule(cfg.to_dict(), source.task.to_dict())
    timer = EpochTimer()
    trainer = _trainer(resolve_precision(cfg.train.precision, "cpu"), timer, max_epochs=epochs, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    return timer.times[1:]


def _setup(model: str, size: tuple[int, int], data: Path, extra: list[str] = ()) -> tuple[Config, Source]:
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"model.name={model}",
            f"data.image_size=[{size[0]},{size[1]}]",
            "train.progress=none",
            *extra,
        ],
    )
    source = load_source(cfg.data)
    source.test = None
    return cfg, source


def pipeline_rows(model: str, size: tuple[int, int], data: Path, limit: int, rounds: int) -> dict[str, float]:
    """img/s of (a), (b) without and with augmentation, and (c): medians over interleaved rounds.

    Interleaving (a b b+aug c, a b b+aug c, ...) spreads the machine's slow spells over all four
    settings instead of letting one of them absorb them.
    """
    cfg, source = _setup(model, size, data)
    source.train = source.train.iloc[:limit].reset_index(drop=True)
    source, cache, _ = prepare_caches(source, cfg, verbose=False)
    rows, targets = source.train["cache_row"].to_numpy(), source.train["target"].to_numpy()
    batch = cfg.train.batch_size
    n = len(rows) // batch * batch
    images = torch.from_numpy(np.array(cache.open()[rows[:n]]))  # a writable in-memory copy
    batches = [(images[i : i + batch], torch.from_numpy(targets[i : i + batch])) for i in range(0, n, batch)]
    workers = resolve_workers("auto", True)

    def pstage_loader(transform: object) -> DataLoader:
        return FoldData(cache.path, rows, targets, rows[:batch], targets[:batch], cfg, transform).train_dataloader()

    loaders: dict[str, Callable[[], DataLoader]] = {
        "a": lambda: DataLoader(InMemory(batches), batch_size=None, shuffle=True),
        "b": lambda: pstage_loader(None),
        "b+aug": lambda: pstage_loader(build_transforms(cfg.augment)),
        "c": lambda: DataLoader(
            PilBaseline(source.train["path"].tolist(), targets, size),
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=workers > 0,
        ),
    }
    times: dict[str, list[float]] = {key: [] for key in loaders}
    for _ in range(rounds):
        for key, make in loaders.items():
            times[key].extend(epoch_times(cfg, source, make()))
    return {key: n / float(np.median(values)) for key, values in times.items()}


def precision_rows(model: str, size: tuple[int, int], data: Path, epochs: int) -> list[tuple[str, float, float]]:
    """(d): default settings vs fp32 vs bf16 on fold 0: steady-state img/s and validation macro F1."""
    settings = [
        ("pstage default", []),
        ("fp32, NCHW", ["train.precision=32-true", "train.channels_last=off"]),
        ("bf16-mixed, NHWC", ["train.precision=bf16-mixed", "train.channels_last=on"]),
    ]
    out = []
    for label, extra in settings:
        cfg, source = _setup(model, size, data, [f"train.epochs={epochs}", *extra])
        source, cache, _ = prepare_caches(source, cfg, verbose=False)
        val = (make_folds(source, cfg.split.folds, cfg.split.seed)["fold"] == 0).to_numpy()
        tr, va = source.train[~val], source.train[val]
        data_module = FoldData(
            cache.path,
            tr["cache_row"].to_numpy(),
            tr["target"].to_numpy(),
            va["cache_row"].to_numpy(),
            va["target"].to_numpy(),
            cfg,
            build_transforms(cfg.augment),
        )
        L.seed_everything(0, verbose=False)
        module = ClassifierModule(cfg.to_dict(), source.task.to_dict())
        precision = resolve_precision(cfg.train.precision, "cpu")
        timer = EpochTimer()
        slow = precision.startswith("bf16") and "bf16" in label  # emulated bf16 can be 10x slower: time 3 steps
        limits = {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 0} if slow else {"max_epochs": epochs}
        trainer = _trainer(precision, timer, **limits)
        trainer.fit(module, datamodule=data_module)
        if slow:
            out.append((f"{label} ({precision})", 3 * cfg.train.batch_size / timer.times[-1], float("nan")))
            continue
        f1 = float(trainer.callback_metrics["val/macro_f1"])
        speed = (len(tr) // cfg.train.batch_size) * cfg.train.batch_size / float(np.median(timer.times[1:]))
        out.append((f"{label} ({precision}, channels_last={module.channels_last})", speed, f1))
    return out


def main() -> None:
    warnings.filterwarnings("ignore", message=".*validation_step.*but have no .val_dataloader.*")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="demo data folder (generated if missing)")
    parser.add_argument("--size", default="64x48", help="model input HxW (pstage's default)")
    parser.add_argument("--images", type=int, default=1024, help="training images per epoch for (a)-(c)")
    parser.add_argument("--models", default="test_resnet,resnet10t,resnet18", help="comma-separated timm models")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of 3 epochs per setting for (a)-(c)")
    parser.add_argument("--d-model", default="resnet10t", help="model for (d) (default: pstage's default model)")
    parser.add_argument("--d-size", default=None, help="model input HxW for (d) (default: --size)")
    parser.add_argument("--d-epochs", type=int, default=6, help="epochs for (d)'s F1 comparison")
    parser.add_argument("--skip-d", action="store_true")
    args = parser.parse_args()
    quiet_lightning()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    data = args.data or Path(tempfile.gettempdir()) / "pstage-bench-demo"
    make_demo_data(data, persons=300, eval_persons=60, image_size=(512, 384), seed=0)
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
        f"input {size[0]}x{size[1]} from 512x384 photos; {args.images} images per epoch"
    )
    table = Table(
        title=f"(a)-(c) training img/s: median of {2 * args.rounds} steady-state epochs from {args.rounds} interleaved rounds",
        title_justify="left",
    )
    for column in (
        "model",
        "(a) model only",
        "(b) cache",
        "(b) cache+aug",
        "(c) PIL",
        "b/a",
        "b+aug/a",
        "b/c",
        "b+aug/c",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model in args.models.split(","):
        r = pipeline_rows(model, size, data, args.images, args.rounds)
        ratios = (r["b"] / r["a"], r["b+aug"] / r["a"], r["b"] / r["c"], r["b+aug"] / r["c"])
        table.add_row(model, *(f"{r[k]:.0f}" for k in ("a", "b", "b+aug", "c")), *(f"{x:.2f}" for x in ratios))
    console.print(table)
    if args.skip_d:
        return
    d_size = tuple(int(v) for v in (args.d_size or args.size).lower().split("x"))
    rows = precision_rows(args.d_model, d_size, data, args.d_epochs)
    table = Table(
        title=f"(d) {args.d_model} {d_size[0]}x{d_size[1]}: pstage defaults vs plain fp32 (fold 0 of 5, {args.d_epochs} epochs)",
        title_justify="left",
    )
    for column in ("setting", "img/s", "vs fp32", "val macro F1"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    fp32 = rows[1][1]
    for label, speed, f1 in rows:
        table.add_row(label, f"{speed:.0f}", f"{speed / fp32:.2f}x", "-" if np.isnan(f1) else f"{f1:.4f}")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
