"""Prediction from fold checkpoints: probabilities for cached images, and ``pstage predict``.

``predict`` re-creates a run's submission from its checkpoints (optionally with TTA), or predicts
any folder/CSV of images to a CSV of classes and probabilities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pstage.cache import CacheInfo, build_cache
from pstage.config import Config, load_config
from pstage.datasets import CachedImages, make_loader
from pstage.devices import autocast_dtype, inference_device, resolve_precision
from pstage.errors import DataError, RunError
from pstage.metrics import prob_columns
from pstage.module import ClassifierModule
from pstage.runs import load_run_info, resolve_run, write_csv
from pstage.sources import detect_kind, image_table, load_source
from pstage.tasks import Task


def load_fold_module(checkpoint: str | Path) -> ClassifierModule:
    """A fold model from its checkpoint, in eval mode on the CPU.

    Built from the checkpoint's own config with ``pretrained`` off: the weights come from the
    checkpoint, so nothing is downloaded.
    """
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise RunError(f"{checkpoint}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    hparams = state["hyper_parameters"]
    config = dict(hparams["config"])
    config["model"] = {**config["model"], "pretrained": False}
    module = ClassifierModule(config, hparams["task"])
    module.load_state_dict(state["state_dict"])
    return module.eval()


def predict_probs(
    module: ClassifierModule,
    cache: str | Path,
    rows: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | None = None,
    precision: str = "32-true",
    hflip: bool = False,
) -> np.ndarray:
    """Final-class probabilities (N, C) for cache rows; with ``hflip`` averaged with the mirror image."""
    device = device or torch.device("cpu")
    module = module.to(device).eval()
    dtype = autocast_dtype(precision)
    loader = make_loader(CachedImages(cache, np.asarray(rows)), batch_size, 0)
    out = []
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for images, _ in loader:
            images = images.to(device, non_blocking=True)
            probs = module(images).float()
            if hflip:
                probs = (probs + module(images.flip(2)).float()) / 2  # NHWC: axis 2 is the width
            out.append(probs.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, module.task.num_classes), np.float32)


def fold_checkpoints(run_dir: Path) -> list[Path]:
    """best.ckpt of every finished fold of a run."""
    found = sorted(run_dir.glob("fold_*/best.ckpt"), key=lambda p: int(p.parent.name.split("_")[1]))
    return [p for p in found if (p.parent / "metrics.json").exists()]


def ensemble_probs(checkpoints: Sequence[Path], cache: CacheInfo, config: Config, *, tta: bool = False) -> np.ndarray:
    """Mean probabilities of the fold models over every image of ``cache``."""
    precision = resolve_precision(config.train.precision, config.train.accelerator)
    device = inference_device(config.train.accelerator)
    total = None
    for checkpoint in checkpoints:
        probs = predict_probs(
            load_fold_module(checkpoint),
            cache.path,
            np.arange(cache.count),
            batch_size=config.train.batch_size * 2,
            device=device,
            precision=precision,
            hflip=tta and config.tta.hflip,
        )
        total = probs if total is None else total + probs
    return total / len(checkpoints)


def submission_frame(test: pd.DataFrame, probs: np.ndarray, task: Task, test_format: str) -> pd.DataFrame:
    """The competition's ImageID,ans (eval/info.csv order), or image_id,label for other data."""
    preds = probs.argmax(1)
    if test_format == "competition":
        return pd.DataFrame({"ImageID": test["image_id"].to_numpy(), "ans": preds})
    return pd.DataFrame({"image_id": test["image_id"].to_numpy(), "label": [task.classes[i] for i in preds]})


def predictions_frame(images: pd.DataFrame, probs: np.ndarray, task: Task) -> pd.DataFrame:
    """Per image: class id and name, decoded head labels (mask task), and every probability."""
    preds = probs.argmax(1)
    frame = pd.DataFrame(
        {"image_id": images["image_id"].to_numpy(), "class": preds, "label": [task.classes[i] for i in preds]}
    )
    if task.has_subtasks:
        for head, names in task.heads.items():
            frame[head] = [names[task.class_to_head[head][i]] for i in preds]
    return pd.concat([frame, pd.DataFrame(probs, columns=prob_columns(task.num_classes))], axis=1)


@dataclass
class Prediction:
    """What ``predict`` wrote: the output CSV and its rows."""

    path: Path
    frame: pd.DataFrame
    kind: str  # "submission" or "predictions"
    skipped: list[str]


def predict(
    run: str | Path,
    data: str | Path | None = None,
    *,
    runs: str | Path = "runs",
    tta: bool = False,
    out: str | Path | None = None,
) -> Prediction:
    """Predict with a finished run's fold models.

    On competition data (the run's own by default) this re-creates ``submission.csv``; on any
    other folder or CSV of images it writes a CSV of classes and probabilities per image.
    """
    run_dir = resolve_run(run, runs)
    info = load_run_info(run_dir)
    checkpoints = fold_checkpoints(run_dir)
    if info.get("status") != "done" or not checkpoints:
        raise RunError(
            f"{run_dir}: run is {info.get('status', 'unknown')} with {len(checkpoints)} finished fold model(s); finish it with pstage train --name {run_dir.name} first"
        )
    config = load_config(run_dir / "config.yaml")
    task = Task.from_dict(info["task"])
    data_path = Path(data).expanduser().resolve() if data else (Path(config.data.path) if config.data.path else None)
    if data_path is None or not data_path.exists():
        raise DataError(
            f"data {data_path} not found: pass --data DIR (a competition folder or any folder/CSV of images)"
        )
    d = config.data
    if detect_kind(data_path) == "competition":
        source = load_source(d.model_copy(update={"path": str(data_path), "source": "competition"}))
        if source.test is None:
            raise DataError(f"{data_path}: no test images (eval/info.csv) to predict")
        images, kind, test_format = source.test, "submission", source.test_format
    else:
        images, kind, test_format = image_table(data_path), "predictions", "generic"
    cache = build_cache(
        images["path"].tolist(),
        d.image_size,
        face_crop=d.face_crop,
        face_margin=d.face_margin,
        center_crop=d.center_crop,
        cache_dir=d.cache_dir,
    )
    if cache.bad and d.on_bad_image == "error":
        path, reason = next(iter(cache.bad.items()))
        raise DataError(
            f"{path}: {reason}; fix or remove it, or set data.on_bad_image=skip to predict it from a blank image"
        )
    probs = ensemble_probs(checkpoints, cache, config, tta=tta)
    if kind == "submission":
        frame = submission_frame(images, probs, task, test_format)
        default = run_dir / ("submission_tta.csv" if tta else "submission.csv")
    else:
        frame = predictions_frame(images, probs, task)
        default = run_dir / "predictions" / f"{data_path.stem}{'_tta' if tta else ''}.csv"
    target = Path(out) if out else default
    target.parent.mkdir(parents=True, exist_ok=True)
    write_csv(target, frame, float_format="%.6g")
    return Prediction(target, frame, kind, [f"{p}: {r} (predicted from a blank image)" for p, r in cache.bad.items()])
