"""Prediction from fold checkpoints: probabilities for cached images, and ``pstage predict``.

``predict`` re-creates a run's submission from its checkpoints (optionally with TTA), or predicts
any folder/CSV of images to a CSV of classes and probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pstage.config import Config, TTAConfig, batch_of
from pstage.core.devices import inference_device, resolve_precision
from pstage.core.errors import DataError, RunError
from pstage.core.io import now, write_csv
from pstage.core.metrics import cv_scores, prob_columns
from pstage.core.tasks import Task
from pstage.data.cache import CacheInfo
from pstage.data.datasets import inference_batches
from pstage.data.prepare import data_cache, prepare_caches
from pstage.data.sources import Source, detect_kind, image_table, load_source
from pstage.inference.persons import group_test
from pstage.models.checkpoint import load_fold_module
from pstage.models.module import ClassifierModule
from pstage.models.trust import honours_trust
from pstage.runs.rundir import FINAL_DIR, RunDir, fold_id, submission_frame
from pstage.runs.store import locate


def zoom(images: torch.Tensor, scale: float) -> torch.Tensor:
    """A centre zoom of uint8 NHWC images by ``scale`` at the same size (>1 crops in, <1 pads the edges)."""
    if scale == 1.0:
        return images
    height, width = images.shape[1:3]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", antialias=scale < 1)
    if scale > 1:
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        x = x[:, :, top : top + height, left : left + width]
    else:
        pad_h, pad_w = height - size[0], width - size[1]
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode="replicate")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def tta_views(tta: TTAConfig | None) -> list[tuple[float, bool]]:
    """(zoom, mirror) pairs to average over: just the image itself without TTA."""
    if tta is None:
        return [(1.0, False)]
    return [(scale, flip) for scale in tta.scales for flip in ((False, True) if tta.hflip else (False,))]


def mean_over_views(module: torch.nn.Module, images: torch.Tensor, views: list[tuple[float, bool]]) -> torch.Tensor:
    """A model's probabilities averaged over (zoom, mirror) views of uint8 NHWC images: what
    prediction and the exported graph (deploy/export.py) both compute."""
    total = None
    for scale, flip in views:
        view = zoom(images, scale)
        probs = module(view.flip(2) if flip else view).float()  # NHWC: axis 2 is the width
        total = probs if total is None else total + probs
    return total / len(views)


def describe_tta(tta: TTAConfig) -> str:
    parts = (["hflip"] if tta.hflip else []) + [f"zoom {s:g}" for s in tta.scales if s != 1.0]
    return f"{len(tta_views(tta))} views ({', '.join(parts) or 'none'})"


def predict_probs(
    module: ClassifierModule,
    cache: str | Path,
    rows: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | None = None,
    precision: str = "32-true",
    tta: TTAConfig | None = None,
) -> np.ndarray:
    """Final-class probabilities (N, C) for cache rows; with ``tta`` averaged over its views."""
    device = device or torch.device("cpu")
    module = module.to(device).eval()
    views = tta_views(tta)
    out = []
    with inference_batches(cache, rows, batch_size, device, precision) as batches:
        for images in batches:
            out.append(mean_over_views(module, images, views).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, module.task.num_classes), np.float32)


def fold_checkpoints(run_dir: Path) -> list[Path]:
    """best.ckpt of every finished fold of a run."""
    return list(RunDir(run_dir).checkpoints("best.ckpt").values())


def ensemble_probs(
    checkpoints: Sequence[Path], cache: CacheInfo, config: Config, *, tta: bool = False, rows: np.ndarray | None = None
) -> np.ndarray:
    """Mean probabilities of the fold models over ``rows`` of ``cache`` (default: all of it)."""
    precision = resolve_precision(config.train.precision, config.train.accelerator)
    device = inference_device(config.train.accelerator)
    total = None
    for checkpoint in checkpoints:
        probs = predict_probs(
            load_fold_module(checkpoint),
            cache.path,
            np.arange(cache.count) if rows is None else rows,
            batch_size=batch_of(config.train) * 2,
            device=device,
            precision=precision,
            tta=config.tta if tta else None,
        )
        total = probs if total is None else total + probs
    return total / len(checkpoints)


def with_final_fit(run_dir: Path, config: Config, probs: np.ndarray, cache: CacheInfo, tta: bool) -> np.ndarray:
    """The fold models' mean combined with the run's final-fit model (``train.final_fit``), as training did."""
    final = run_dir / FINAL_DIR / "model.ckpt"
    if config.train.final_fit == "off" or not RunDir(run_dir).final_done():
        return probs

    return blend_final(config.train.final_fit, probs, ensemble_probs([final], cache, config, tta=tta))


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
    """What ``predict`` wrote: the output CSV and its rows (and, with TTA on the run's data, both CVs)."""

    path: Path
    frame: pd.DataFrame
    kind: str  # "submission" or "predictions"
    skipped: list[str]
    cv: float | None = None  # the run's CV macro F1 without TTA
    cv_tta: float | None = None  # the same folds' CV recomputed with TTA
    tta: str | None = None  # which views were averaged


@honours_trust
def predict(
    run: str | Path,
    data: str | Path | None = None,
    *,
    runs: str | Path = "runs",
    tta: bool = False,
    out: str | Path | None = None,
    store: str | None = None,
    trust: bool = False,
) -> Prediction:
    """Predict with a finished run's fold models.

    On competition data (the run's own by default) this re-creates ``submission.csv``; on any
    other folder or CSV of images it writes a CSV of classes and probabilities per image, averaged
    over the TTA views when the run was trained with ``tta.train`` or ``tta`` is given. With
    ``tta`` on the run's own data the OOF predictions are recomputed with TTA too, so its gain is
    measured: both CVs are returned and recorded in run.json (``tta``). With ``store`` (the team's
    MLflow server), a run that is only there is pulled first, with its fold models. ``trust``: a
    checkpoint of a run made on this machine may hold pickled objects (never one pulled from a store).
    """
    rd = RunDir.find(locate(run, runs, store, checkpoints=True) if store else run, runs)
    run_dir, info = rd.path, rd.info
    if info.kind == "ensemble":
        raise RunError(
            f"{run_dir.name} is an ensemble: its submission.csv comes from its members' predictions; "
            "for TTA run pstage predict MEMBER --tta for each member, then pstage ensemble ... --tta"
        )
    checkpoints = fold_checkpoints(run_dir)
    if not info.done or not checkpoints:
        raise RunError(
            f"{run_dir}: run is {info.status} with {len(checkpoints)} finished fold model(s); finish it with pstage train --name {run_dir.name} first"
        )
    config = rd.load_config()
    task = info.as_task()
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
        if tta and config.data.path and data_path == Path(config.data.path).resolve():
            return _predict_with_tta(run_dir, config, source, checkpoints, task, out)
        images, kind, test_format = source.test, "submission", source.test_format
    else:
        images, kind, test_format = image_table(data_path), "predictions", "generic"
    cache = data_cache(images["path"].tolist(), d)
    if cache.bad and d.on_bad_image == "error":
        path, reason = next(iter(cache.bad.items()))
        raise DataError(
            f"{path}: {reason}; fix or remove it, or set data.on_bad_image=skip to predict it from a blank image"
        )
    with_tta = tta or config.tta.train  # a run trained with tta.train predicted with its views: so does a re-run
    probs = with_final_fit(run_dir, config, ensemble_probs(checkpoints, cache, config, tta=with_tta), cache, with_tta)
    # as training decided (persons.*)
    probs, _ = group_test(info, checkpoints, cache.path, config, probs, task, images["path"].tolist())
    if kind == "submission":
        frame = submission_frame(images, probs, task, test_format)
        default = run_dir / ("submission_tta.csv" if tta else "submission.csv")
    else:
        frame = predictions_frame(images, probs, task)
        default = run_dir / "predictions" / f"{data_path.stem}{'_tta' if tta else ''}.csv"
    target = Path(out) if out else default
    target.parent.mkdir(parents=True, exist_ok=True)
    write_csv(target, frame, float_format="%.6g")
    skipped = [f"{p}: {r} (predicted from a blank image)" for p, r in cache.bad.items()]
    return Prediction(target, frame, kind, skipped, tta=describe_tta(config.tta) if with_tta else None)


def _predict_with_tta(
    run_dir: Path, config: Config, source: Source, checkpoints: list[Path], task: Task, out: str | Path | None
) -> Prediction:
    """TTA on the test images and on every OOF image (each by its own fold's model), with both CVs.

    Writes oof_tta.csv, test_tta.csv and submission_tta.csv, and records the CVs in run.json.
    """
    source, train_cache, test_cache = prepare_caches(source, config, verbose=False)
    rd = RunDir(run_dir)
    oof = pd.read_csv(rd.output("oof"), dtype={"image_id": str})
    cache_rows = source.train.set_index("image_id")["cache_row"]
    missing = ~oof["image_id"].isin(cache_rows.index)
    if missing.any():
        raise RunError(
            f"{run_dir.name}: image {oof['image_id'][missing].iloc[0]} of its OOF is not in {config.data.path} any more; "
            "TTA on OOF needs the data the run was trained on"
        )
    cols = prob_columns(task.num_classes)
    oof_tta = oof.copy()
    precision = resolve_precision(config.train.precision, config.train.accelerator)
    device = inference_device(config.train.accelerator)
    for checkpoint in checkpoints:
        fold = fold_id(checkpoint)
        rows = (oof["fold"] == fold).to_numpy()
        oof_tta.loc[rows, cols] = predict_probs(
            load_fold_module(checkpoint),
            train_cache.path,
            cache_rows.loc[oof.loc[rows, "image_id"]].to_numpy(),
            batch_size=batch_of(config.train) * 2,
            device=device,
            precision=precision,
            tta=config.tta,
        )
    probs = with_final_fit(run_dir, config, ensemble_probs(checkpoints, test_cache, config, tta=True), test_cache, True)
    probs, _ = group_test(
        RunDir(run_dir).read_info(), checkpoints, test_cache.path, config, probs, task, source.test["path"].tolist()
    )
    test = pd.concat(
        [pd.DataFrame({"image_id": source.test["image_id"].to_numpy()}), pd.DataFrame(probs, columns=cols)], axis=1
    )
    frame = submission_frame(source.test, probs, task, source.test_format)
    before, after = cv_scores(oof, task), cv_scores(oof_tta, task)
    target = Path(out) if out else run_dir / "submission_tta.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    with rd.lock():
        write_csv(rd.output("oof_tta"), oof_tta, float_format="%.6g")
        write_csv(rd.output("test_tta"), test, float_format="%.6g")
        write_csv(target, frame)
        rd.update_info(
            tta={
                "config": config.tta.model_dump(mode="json"),
                "views": describe_tta(config.tta),
                "cv": after,
                "created": now(),
            }
        )
    skipped = [s for s in source.skipped if "blank image" in s]
    return Prediction(
        target, frame, "submission", skipped, before["macro_f1"], after["macro_f1"], describe_tta(config.tta)
    )


def blend_final(mode: str, fold_mean: np.ndarray, final: np.ndarray) -> np.ndarray:
    """Test probabilities with the final fit: ``alone`` its own, ``blend`` half it, half the fold models' mean."""
    if mode == "alone":
        return final
    if mode == "blend":
        return 0.5 * fold_mean + 0.5 * final
    return fold_mean
