"""``pstage report RUN``: what a run learned and where it fails, as one HTML page.

CV per fold, learning curves, the 18x18 confusion matrix and one per task, per-class F1 and
support, and the most confident OOF mistakes with a Grad-CAM heat map of where the fold's model
looked. With ``audit`` it adds the label-issue audit (see ``pstage.report.audit``).
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_fscore_support

from pstage.core.errors import RunError
from pstage.core.metrics import prob_columns
from pstage.core.tasks import Task
from pstage.models.checkpoint import load_fold_module
from pstage.models.trust import honours_trust
from pstage.report.audit import audit as run_audit
from pstage.report.pages import figure, new_figure, page, table, tiles
from pstage.report.pictures import pictures_of
from pstage.runs.rundir import Run, resolve_run
from pstage.runs.store import locate

MISTAKES = 12


@dataclass
class ReportResult:
    """The page and what it found (a notebook can use the frames directly)."""

    path: Path
    per_class: pd.DataFrame
    mistakes: pd.DataFrame
    audit: Any | None
    seconds: float


def confusion(targets: np.ndarray, preds: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(targets * n + preds, minlength=n * n).reshape(n, n)


def _matrix_figure(matrix: np.ndarray, names: list[str], title: str) -> str:
    size = max(3.5, 0.42 * len(names) + 1.5)
    fig, ax = new_figure(size, size * 0.9)
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=75 if len(names) > 3 else 0, fontsize=7)
    ax.set_yticks(ticks, names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (colour: share of the true row; numbers: images)", fontsize=9)
    for i in ticks:
        for j in ticks:
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    return figure(fig, title)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _curves(run: Run) -> str:
    folds = run.folds()
    if not folds:
        return "<p>No per-fold history (an ensemble: see its members' reports).</p>"
    fig, (loss_ax, f1_ax) = new_figure(11, 3.2, ncols=2)
    for k in folds:
        history = run.fold_metrics(k).get("history") or []
        epochs = [h["epoch"] + 1 for h in history]
        fold = f"fold {k}"
        line = loss_ax.plot(epochs, [h["train_loss"] for h in history], label=f"{fold} train")[0]
        loss_ax.plot(epochs, [h["val_loss"] for h in history], "--", color=line.get_color(), label=f"{fold} val")
        f1_ax.plot(epochs, [h["val_macro_f1"] for h in history], color=line.get_color(), label=fold)
    loss_ax.set_title("loss (solid: train, dashed: validation)")
    f1_ax.set_title("validation macro F1")
    for ax in (loss_ax, f1_ax):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    return figure(fig, "learning curves")


def grad_cam(module: Any, images: np.ndarray, classes: list[int]) -> np.ndarray | None:
    """Grad-CAM heat maps (N, H, W) in [0, 1] for uint8 NHWC images and the given classes.

    A forward hook on the backbone's global pool keeps its input (the last stage's feature map)
    and a tensor hook its gradient; the map is the ReLU of the gradient-weighted channels (Selvaraju et al.).
    None for backbones without a spatial feature map (e.g. vision transformers' tokens).
    """
    stash: dict[str, torch.Tensor] = {}

    def keep(_module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        act = inputs[0] if pooled else output
        stash["act"] = act
        if act.requires_grad:
            act.register_hook(lambda grad: stash.__setitem__("grad", grad))

    net = module.model
    # timm CNNs end in `global_pool`: its input is the last stage's feature map.
    pool = getattr(net.backbone, "global_pool", None)
    pooled = isinstance(pool, torch.nn.Module)
    handle = (pool if pooled else net.backbone).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            batch = torch.from_numpy(np.ascontiguousarray(images))
            logits = net(module._inputs(batch))
            # The class score before the softmax, as in the paper: a final class's score is the sum
            # of its heads' logits (its probability is the product of the heads' softmaxes).
            score = sum(
                logits[head][torch.arange(len(classes)), torch.as_tensor(index)[classes]]
                for head, index in module.heads.class_to_head.items()
            ).sum()
            module.zero_grad(set_to_none=True)
            score.backward()
    finally:
        handle.remove()
    act, grad = stash.get("act"), stash.get("grad")
    if act is None or grad is None or act.ndim != 4:
        return None
    cam = F.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-8)[:, None, None]
    return (cam / peak).detach().numpy()


def overlay(image: np.ndarray, heat: np.ndarray, scale: int = 3) -> np.ndarray:
    """The image with a JET heat map blended over it, enlarged ``scale`` times for viewing."""
    coloured = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blended = (0.55 * image + 0.45 * coloured).astype(np.uint8)
    pair = np.concatenate([image, blended], axis=1)
    return cv2.resize(pair, (pair.shape[1] * scale, pair.shape[0] * scale), interpolation=cv2.INTER_NEAREST)


def _mistakes(
    run: Run, oof: pd.DataFrame, task: Task, with_cam: bool, pictures: tuple[Any, pd.Series] | str
) -> tuple[str, pd.DataFrame]:
    probs = oof[prob_columns(task.num_classes)].to_numpy()
    preds = probs.argmax(1)
    frame = oof[["image_id", "fold", "target"]].assign(pred=preds, confidence=probs.max(1))
    wrong = frame[frame["pred"] != frame["target"]].sort_values("confidence", ascending=False).head(MISTAKES)
    if wrong.empty:
        return "<p>No OOF mistakes.</p>", wrong
    if isinstance(pictures, str):
        return f"<p class='warn'>{html.escape(pictures)}</p>" + table(["image", "true", "predicted", "p"], []), wrong
    images, rows = pictures
    items, cam_note = [], ""
    for fold, group in wrong.groupby("fold", sort=False):
        pixels = np.stack([images[rows[i]] for i in group["image_id"]])
        heat = None
        checkpoint = run.fold_dir(fold) / "best.ckpt"
        if with_cam and checkpoint.exists():
            heat = grad_cam(load_fold_module(checkpoint), pixels, group["pred"].tolist())
            if heat is None:
                cam_note = "<p>This backbone has no spatial feature map, so no Grad-CAM.</p>"
        for k, row in enumerate(group.itertuples()):
            picture = overlay(pixels[k], heat[k]) if heat is not None else pixels[k]
            caption = f"{row.image_id}\ntrue: {task.classes[row.target]}\npred: {task.classes[row.pred]} ({row.confidence:.2f})"
            items.append((picture, caption))
    intro = (
        f"<p>The {len(wrong)} OOF images the model was most sure about and got wrong (each predicted by the fold model "
        "that never saw it). Left: the input as the model saw it; right: Grad-CAM for the predicted class "
        "(red = where the evidence came from). Many confident mistakes of one kind often mean wrong labels.</p>"
    )
    return intro + cam_note + tiles(items), wrong


@honours_trust
def report(
    run: str | Path,
    *,
    runs: str | Path = "runs",
    audit: bool = False,
    out: str | Path | None = None,
    store: str | None = None,
    trust: bool = False,
) -> ReportResult:
    """Write ``report.html`` for a finished run (or ensemble); with ``audit`` add the label audit.

    ``store``: a teammate's published run is pulled first, with its fold models (for Grad-CAM).
    ``trust``: a fold checkpoint of a run made on this machine may hold pickled objects.
    """
    if store:
        run = locate(run, runs, store, checkpoints=True)

    started = time.time()
    loaded = Run(resolve_run(run, runs))
    if not loaded.info.done:
        raise RunError(f"{loaded.name}: run is {loaded.status}; finish it before reporting on it")
    oof = loaded.table("oof")
    if oof is None:
        raise RunError(f"{loaded.path}/oof.csv is missing; re-run its training to write it")
    task = loaded.info.as_task()
    probs = oof[prob_columns(task.num_classes)].to_numpy()
    targets, preds = oof["target"].to_numpy(), probs.argmax(1)
    cv = loaded.cv
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, preds, labels=range(task.num_classes), zero_division=0
    )
    per_class = pd.DataFrame(
        {"class": task.classes, "precision": precision, "recall": recall, "f1": f1, "support": support}
    )
    summary = table(
        ["", "value"],
        [
            ["run", loaded.name],
            ["model", loaded.info.model or "?"],
            ["CV macro F1 (mean ± std over folds)", f"{cv.macro_f1:.4f} ± {cv.macro_f1_std or 0:.4f}"],
            ["pooled OOF macro F1", f"{_nan(cv.oof_macro_f1):.4f}"],
            *[[f"{head} macro F1", f"{v:.4f}"] for head, v in cv.per_task.items()],
            ["OOF images", f"{len(oof):,}"],
        ],
    )
    folds = table(
        ["fold", "macro F1", "images", "best epoch", "seconds"],
        [
            [
                f.fold,
                f.macro_f1,
                f.images,
                "-" if f.best_epoch is None else f.best_epoch + 1,
                f"{f.duration_s or 0:.0f}",
            ]
            for f in cv.folds
        ],
    )
    matrices = [
        _matrix_figure(
            confusion(targets, preds, task.num_classes), [str(i) for i in range(task.num_classes)], "all classes"
        )
    ]
    if task.has_subtasks:
        for head, names in task.heads.items():
            index = np.asarray(task.class_to_head[head])
            matrices.append(_matrix_figure(confusion(index[targets], index[preds], len(names)), names, head))
    legend = "<p class='muted'>" + ", ".join(f"{i} = {name}" for i, name in enumerate(task.classes)) + "</p>"
    class_rows = [
        [f"{i} {r['class']}", r["precision"], r["recall"], r["f1"], int(r["support"])] for i, r in per_class.iterrows()
    ]
    pictures = pictures_of(loaded)  # once, for the mistakes grid and the audit's
    mistakes_html, mistakes = _mistakes(loaded, oof, task, loaded.info.kind != "ensemble", pictures)
    sections = [
        ("summary", "Summary", summary),
        ("folds", "CV per fold", folds),
        ("curves", "Learning curves", _curves(loaded)),
        ("confusion", "Confusion matrices", legend + "".join(matrices)),
        ("per-class", "Per-class F1 and support", table(["class", "precision", "recall", "F1", "support"], class_rows)),
        ("mistakes", "Most confident OOF mistakes, with Grad-CAM", mistakes_html),
    ]
    found = None
    if audit:
        found = run_audit(loaded, task, oof, pictures)
        sections.append(("audit", "Label-issue audit", found.html))
    path = page(f"Report: {loaded.name}", f"pstage report {loaded.name}", sections, out or loaded.path / "report.html")
    return ReportResult(path, per_class, mistakes, found, time.time() - started)
