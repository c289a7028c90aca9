"""How much does loading cost? pstage's cached pipeline vs model-only vs a PIL baseline.

On the demo data (384x512 source photos), same model, image size and Lightning loop for all:
  (a) model only: pre-built uint8 batches in memory (the ceiling);
  (b) pstage: the decoded-image memmap cache + default augmentation and workers (steady-state epoch);
  (c) baseline: a Dataset that opens, resizes and converts every image with PIL every epoch;
  (d) pstage's default precision / memory format vs plain fp32 (and bf16-mixed), with macro F1.
Prints img/s per setting and the ratios b/a and b/c. Run: python benchmarks/input_pipeline.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pstage.compat  # noqa: F401

import lightning as L
import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from pstage.augment import build_transforms
from pstage.config import load_config
from pstage.console import quiet_lightning
from pstage.datasets import FoldData, resolve_workers
from pstage.demo_data import make_demo_data
from pstage.devices import resolve_precision
from pstage.module import ClassifierModule
from pstage.sources import load_source
from pstage.split import make_folds
from pstage.training import prepare_caches

console = Console()


class EpochTimer(L.Callback):
    """Wall time of each training epoch (validation excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.times.append(time.perf_counter() - self._t)


class InMemory(Dataset):
    """Pre-built uint8 NHWC batches: no decoding, no copying, no augmentation."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[i]


class PilBaseline(Dataset):
    """The usual baseline script: open + resize + convert with PIL for every image, every epoch."""

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


def fit_throughput(
    cfg, task, loader: DataLoader, images_per_epoch: int, epochs: int = 2, precision: str | None = None
) -> float:
    """Images per second of the last (steady-state) training epoch."""
    L.seed_everything(0, verbose=False)
    module = ClassifierModule(cfg.to_dict(), task.to_dict())
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        precision=precision or resolve_precision(cfg.train.precision, "cpu"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return images_per_epoch / timer.times[-1]


def pipeline_rows(model: str, size: tuple[int, int], data: Path, limit: int, epochs: int) -> dict[str, float]:
    cfg = load_config(
        None,
        [f"data.path={data}", f"model.name={model}", f"data.image_size=[{size[0]},{size[1]}]", "train.progress=none"],
    )
    source = load_source(cfg.data)
    source.train = source.train.iloc[:limit].reset_index(drop=True)
    source.test = None
    train_cache, _ = prepare_caches(source, cfg, verbose=False)
    rows, targets = source.train["cache_row"].to_numpy(), source.train["target"].to_numpy()
    batch = cfg.train.batch_size
    n = len(rows) // batch * batch

    images = torch.from_numpy(np.ascontiguousarray(train_cache.open()[rows[:n]]))
    batches = [(images[i : i + batch], torch.from_numpy(targets[i : i + batch])) for i in range(0, n, batch)]
    a = fit_throughput(cfg, source.task, DataLoader(InMemory(batches), batch_size=None, shuffle=True), n, epochs)

    data_module = FoldData(
        train_cache.path, rows, targets, rows[:batch], targets[:batch], cfg, build_transforms(cfg.augment)
    )
    b = fit_throughput(cfg, source.task, data_module.train_dataloader(), n, epochs)

    workers = resolve_workers("auto", True)
    baseline = PilBaseline(source.train["path"].tolist(), targets, size)
    c = fit_throughput(
        cfg,
        source.task,
        DataLoader(
            baseline,
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=workers > 0,
        ),
        n,
        epochs,
    )
    return {"a": a, "b": b, "c": c}


def precision_rows(model: str, size: tuple[int, int], data: Path, epochs: int) -> list[tuple[str, float, float]]:
    """(d): default settings vs fp32 vs bf16 on one fold: steady-state img/s and validation macro F1."""
    out = []
    settings = [
        ("pstage default", []),
        ("fp32, NCHW", ["train.precision=32-true", "train.channels_last=off"]),
        ("bf16-mixed, NHWC", ["train.precision=bf16-mixed", "train.channels_last=on"]),
    ]
    for label, extra in settings:
        cfg = load_config(
            None,
            [
                f"data.path={data}",
                f"model.name={model}",
                f"data.image_size=[{size[0]},{size[1]}]",
                f"train.epochs={epochs}",
                "train.progress=none",
                *extra,
            ],
        )
        source = load_source(cfg.data)
        source.test = None
        cache, _ = prepare_caches(source, cfg, verbose=False)
        folds = make_folds(source, cfg.split.folds, cfg.split.seed)
        val = (folds["fold"] == 0).to_numpy()
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
        timer = EpochTimer()
        precision = resolve_precision(cfg.train.precision, "cpu")
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
            num_sanity_val_steps=0,
        )
        if label.startswith("bf16"):  # emulated bf16 can be 10x+ slower: time two epochs' worth of steps only
            trainer = L.Trainer(
                max_epochs=1,
                limit_train_batches=4,
                accelerator="cpu",
                devices=1,
                precision=precision,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[timer],
                limit_val_batches=0,
            )
            trainer.fit(module, datamodule=data_module)
            out.append((f"{label} ({precision})", 4 * cfg.train.batch_size / timer.times[-1], float("nan")))
            continue
        trainer.fit(module, datamodule=data_module)
        f1 = float(trainer.callback_metrics["val/macro_f1"])
        steps = len(tr) // cfg.train.batch_size
        out.append(
            (
                f"{label} ({precision}, channels_last={module.channels_last})",
                steps * cfg.train.batch_size / np.median(timer.times[1:] or timer.times),
                f1,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="demo data folder (generated if missing)")
    parser.add_argument("--size", default="64x48", help="model input HxW")
    parser.add_argument("--images", type=int, default=1024, help="training images per epoch for (a)-(c)")
    parser.add_argument("--models", default="test_resnet,resnet18", help="comma-separated timm models for (a)-(c)")
    parser.add_argument("--d-model", default="resnet18", help="model for (d)")
    parser.add_argument("--d-epochs", type=int, default=6, help="epochs for (d)'s F1 comparison")
    parser.add_argument("--skip-d", action="store_true")
    args = parser.parse_args()
    quiet_lightning()
    torch.set_num_threads(os.cpu_count() or 1)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    data = args.data or Path(tempfile.gettempdir()) / "pstage-bench-demo"
    make_demo_data(data, persons=300, eval_persons=60, image_size=(512, 384), seed=0)
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, input {size[0]}x{size[1]} from 512x384 photos, {args.images} images per epoch"
    )

    table = Table(title="(a)-(c) training throughput, steady-state epoch (img/s)", title_justify="left")
    for column in ("model", "(a) model only", "(b) pstage cache", "(c) PIL baseline", "b/a", "b/c"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for model in args.models.split(","):
        r = pipeline_rows(model, size, data, args.images, epochs=2)
        table.add_row(
            model, f"{r['a']:.0f}", f"{r['b']:.0f}", f"{r['c']:.0f}", f"{r['b'] / r['a']:.2f}", f"{r['b'] / r['c']:.2f}"
        )
        console.print(table) if model == args.models.split(",")[-1] else None
    if args.skip_d:
        return
    rows = precision_rows(args.d_model, size, data, args.d_epochs)
    table = Table(
        title=f"(d) {args.d_model}: pstage defaults vs plain fp32 (fold 0 of 5, {args.d_epochs} epochs)",
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
