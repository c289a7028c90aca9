"""Throughput: how close `pstage train` comes to the model's own speed, and to a usual baseline.

For each setting (model, input size, batch), measured in one run with the three paths
interleaved round by round, so load drifts hit all of them alike:
  (a) model only: a plain loop over uint8 batches already on the device: normalise, autocast
      (bf16 where the device has it), channels_last, AdamW. The ceiling.
  (b) `pstage train`: fold 0, training images / epoch seconds (validation included) from
      fold_0/history.jsonl, epochs after the first (warm-up, cache build and compile excluded).
  (c) the usual baseline script's input path: PIL open + resize + ToTensor + Normalize in
      cpu_count/2 DataLoader workers, fp32, same model and optimiser.
Prints img/s for each and the ratios b/a and b/c (medians over rounds), as a table.

    python benchmarks/throughput.py --device cpu --quick     # resnet10t 64x48, resnet18 128x96: a few minutes on 2 cores
    python benchmarks/throughput.py --device cuda             # + resnet50 224x168, the demo's 10,500 photos
    python benchmarks/throughput.py --quick --extra augment.device=false --compare augment.device=true
                                      # a second (b) column with other settings, in the same rounds

Precision is not a column: `train.precision=auto` picks it by the hardware (core/devices.py); compare
it with `--extra train.precision=32-true --compare train.precision=bf16-mixed`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pstage.core.compat  # noqa: F401

import numpy as np
import timm
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from pstage.core.devices import autocast_dtype, resolve_precision
from pstage.data.sources import is_hidden, is_image
from pstage.demo.synthetic import make_demo_data

SETTINGS = [  # (model, (H, W), batch)
    ("resnet10t", (64, 48), 64),
    ("resnet18", (128, 96), 128),
    ("resnet50", (224, 168), 128),
]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def _model(name: str, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=18).to(device).to(memory_format=torch.channels_last).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_only(name: str, size: tuple[int, int], batch: int, device: torch.device, steps: int) -> float:
    """(a): img/s of forward + backward + step on uint8 NHWC batches resident on the device."""
    model, opt = _model(name, device)
    dtype = autocast_dtype(resolve_precision("auto", device.type))
    images = torch.randint(0, 256, (batch, *size, 3), dtype=torch.uint8, device=device)
    targets = torch.randint(0, 18, (batch,), device=device)
    mean, std = MEAN.to(device), STD.to(device)

    def step() -> None:
        x = ((images.permute(0, 3, 1, 2).float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


class PilImages(Dataset):
    """The baseline's dataset: open, resize, ToTensor, Normalize per image, every epoch."""

    def __init__(self, paths: list[Path], size: tuple[int, int]):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.open(self.paths[i]).convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy())
        return (x - MEAN[0]) / STD[0], i % 18


def pil_baseline(
    name: str, size: tuple[int, int], batch: int, device: torch.device, paths: list[Path], steps: int
) -> float:
    """(c): img/s of the usual script: PIL decode + resize each epoch in cpu_count/2 workers, fp32."""
    model, opt = _model(name, device)
    workers = max(1, (os.cpu_count() or 2) // 2)
    loader = DataLoader(
        PilImages(paths, size),
        batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    done, started = 0, None
    while done < steps + 2:
        for x, y in loader:
            if done == 2:  # after the workers' start-up and two warm-up steps
                _sync(device)
                started = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done >= steps + 2:
                break
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


def pstage_train(
    name: str, size: tuple[int, int], batch: int, device: str, data: Path, runs: Path, epochs: int, extra: list[str]
) -> float:
    """(b): training images / epoch seconds of `pstage train` fold 0, epochs after the first."""
    import pstage

    run = f"{name}-{size[0]}x{size[1]}"
    shutil.rmtree(runs / run, ignore_errors=True)
    pstage.train(
        data=data,
        runs=runs,
        name=run,
        overrides=[
            f"model.name={name}",
            f"data.image_size=[{size[0]},{size[1]}]",
            f"train.batch_size={batch}",
            f"train.epochs={epochs}",
            "train.folds=[0]",
            "log.loggers=[]",
            "train.progress=none",
            f"train.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
            *extra,
        ],
    )
    rows = [json.loads(line) for line in (runs / run / "fold_0" / "history.jsonl").read_text().splitlines()]
    folds = [line.split(",") for line in (runs / run / "folds.csv").read_text().splitlines()[1:]]
    train_images = sum(1 for parts in folds if parts[-1].strip() != "0")
    seconds = statistics.median(r["seconds"] for r in rows[1:]) if len(rows) > 1 else rows[0]["seconds"]
    return train_images / seconds


def _parse_setting(text: str) -> tuple[str, tuple[int, int], int]:
    """MODEL:HxW:BATCH -> (model, (H, W), batch)."""
    try:
        name, size, batch = text.split(":")
        height, width = (int(v) for v in size.lower().split("x"))
        return name, (height, width), int(batch)
    except ValueError:
        raise SystemExit(f"--setting {text!r}: expected MODEL:HxW:BATCH, e.g. resnet18:128x96:128") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the first two settings, few steps, a small data set")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 2)")
    ap.add_argument("--persons", type=int, default=0, help="demo persons (default 1500, quick 150)")
    ap.add_argument("--data", type=Path, default=None, help="an existing competition folder instead of demo data")
    ap.add_argument("--extra", nargs="*", default=[], help="KEY=VALUE for (b), e.g. train.compile=true")
    ap.add_argument(
        "--compare",
        nargs="*",
        default=None,
        help="KEY=VALUE for a second `pstage train` column (b'), measured in the same rounds: e.g. --extra augment.device=false --compare augment.device=true",
    )
    ap.add_argument(
        "--setting",
        nargs="*",
        default=None,
        help="MODEL:HxW:BATCH settings instead of the table's, e.g. tf_efficientnet_lite0:128x128:64 (pstage's defaults)",
    )
    ap.add_argument(
        "--epochs", type=int, default=0, help="epochs of each pstage train (default 4, quick 3; the first is not timed)"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    settings = [_parse_setting(s) for s in args.setting] if args.setting else SETTINGS[:2] if args.quick else SETTINGS
    rounds = args.rounds or 2
    persons = args.persons or (150 if args.quick else 1500)
    steps = 20 if args.quick and args.device == "cpu" else 50
    epochs = args.epochs or (3 if args.quick else 4)
    work = Path(tempfile.mkdtemp(prefix="pstage-throughput-"))
    os.environ.setdefault("XDG_CACHE_HOME", str(work / "cache"))
    data = args.data or make_demo_data(work / "data", persons=persons, eval_persons=max(10, persons // 10))
    # person folders may be symlinks (benchmarks/facemask.py's subsets): glob follows them, rglob does not
    paths = sorted(p for p in (data / "train" / "images").glob("*/*") if is_image(p.name) and not is_hidden(p.name))
    console = Console(width=140)
    results: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds):
        for name, size, batch in settings:
            key = f"{name} {size[0]}x{size[1]}, batch {batch}"
            got = results.setdefault(
                key, {"a": [], "b": [], "b2": [], "c": []} if args.compare is not None else {"a": [], "b": [], "c": []}
            )
            got["a"].append(model_only(name, size, batch, device, steps))
            got["b"].append(pstage_train(name, size, batch, args.device, data, work / "runs", epochs, args.extra))
            if args.compare is not None:
                got["b2"].append(
                    pstage_train(name, size, batch, args.device, data, work / "runs", epochs, args.compare)
                )
            got["c"].append(pil_baseline(name, size, batch, device, paths, steps))
            console.print(f"round {r + 1}: {key}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in got.items()))
    table = Table(title=f"img/s on {args.device} ({os.cpu_count()} cores), {len(paths):,} photos, rounds {rounds}")
    compared = [f"(b') {' '.join(args.compare)}", "b'/a", "b'/b"] if args.compare is not None else []
    for col in ("setting", "(a) model only", "(b) pstage train", "(c) PIL baseline", "b/a", "b/c", *compared):
        table.add_column(col, justify="left" if col == "setting" else "right")

    def ratio(top: str, bottom: str) -> float:  # the median of the per-round ratios
        return statistics.median(x / y for x, y in zip(got[top], got[bottom], strict=True))

    for key, got in results.items():
        a, b, c = (statistics.median(got[k]) for k in "abc")
        row = [key, f"{a:,.0f}", f"{b:,.0f}", f"{c:,.0f}", f"{ratio('b', 'a'):.2f}", f"{ratio('b', 'c'):.2f}"]
        if args.compare is not None:
            row += [f"{statistics.median(got['b2']):,.0f}", f"{ratio('b2', 'a'):.2f}", f"{ratio('b2', 'b'):.2f}"]
        table.add_row(*row)
    console.print(table)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
