"""``pstage export``: a run, or an ensemble of runs, as one ONNX graph (optionally int8) that serves alone.

The graph takes what the cache stores, uint8 RGB images (N, H, W, 3) with a dynamic batch, and
returns final-class probabilities: normalisation is inside the graph (as in the PyTorch model),
the mean over fold models, then the ensemble's blend (weights or stacker) and calibration. The
decode/crop/resize that happens before the graph is written to ``preprocess.json`` beside it and
re-used verbatim by ``pstage serve`` (``pstage.data.cache.prepare``), so served pixels equal trained ones.

A second output, ``fold_probs`` (N, K, C), keeps each fold model's combined prediction: every
image of the run's OOF can be scored by the one fold model that never saw it, which is how the
int8 model's macro F1 change is measured on OOF (the same number as the run's CV for fp32).

Exporter: TorchScript-based ``torch.onnx.export(dynamo=False)``. timm CNNs trace cleanly with it,
and the dynamo exporter needs ``onnxscript`` (not a dependency) for no gain on these models.
Members with different preprocessing (image size, crop) are refused: one graph has one input.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd

from pstage.config import Config
from pstage.core.errors import ConfigError, DataError, RunError
from pstage.core.io import now, sha256_file, write_json
from pstage.core.metrics import cv_scores, prob_columns
from pstage.core.tasks import Task
from pstage.data.prepare import data_cache
from pstage.data.sources import load_source
from pstage.ensembling.methods import METHODS, ClassWeights
from pstage.models.trust import honours_trust
from pstage.runs.rundir import RunDir, RunInfo, RunLock
from pstage.runs.store import locate

EXPORT_DIR = "export"
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
PREPROCESS_FILE = "preprocess.json"
OPSET = 17
FORMATS = ("onnx",)
PREPROCESS_KEYS = ("image_size", "face_crop", "face_margin", "face_detector", "center_crop")


@dataclass
class Leaf:
    """A training run inside the exported graph: its fold checkpoints and data settings."""

    name: str
    path: Path
    config: Config
    checkpoints: list[Path]
    folds: list[int]

    @property
    def preprocess(self) -> dict[str, Any]:
        d = self.config.data
        return {
            "image_size": [int(d.image_size[0]), int(d.image_size[1])],
            "face_crop": d.face_crop,
            "face_margin": d.face_margin if d.face_crop else None,
            "face_detector": d.face_detector if d.face_crop else None,
            "center_crop": d.center_crop,
        }


@dataclass
class Plan:
    """What a run exports to: a tree of runs/ensembles, its leaves, the task and the fold ids."""

    run_dir: Path
    info: RunInfo
    task: Task
    leaves: list[Leaf]
    tree: dict[str, Any]
    folds: list[int] = field(default_factory=list)

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.leaves[0].preprocess

    @property
    def config(self) -> Config:
        return self.leaves[0].config


def require(*modules: str) -> None:
    """A one-line ConfigError when the serve extra (onnx, onnxruntime, fastapi, ...) is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not installed: pip install 'pstage[serve]'")


def _finished(run: RunDir) -> None:
    if not run.info.done:
        raise RunError(
            f"{run.path}: run is {run.info.status}; only finished runs can be exported (finish it with pstage train --name {run.path.name})"
        )


def plan_export(run: str | Path, runs_dir: str | Path = "runs") -> Plan:
    """Resolve a run (or an ensemble, recursively) into the leaves and combiners the graph is built from."""
    top = RunDir.find(run, runs_dir)
    run_dir, info = top.path, top.info
    _finished(top)
    leaves: list[Leaf] = []

    def walk(run: RunDir) -> dict[str, Any]:
        _finished(run)
        name = run.name
        spec = run.info.ensemble
        if run.info.kind == "ensemble" and spec is not None:
            members = []
            for record in spec.members:
                if spec.stacker is None and record.weight <= 0:
                    continue  # hill climbing may give a run weight 0: it costs nothing served
                members.append({"weight": record.weight, **walk(run.member(record, runs_dir))})
            calibration = spec.calibration
            return {
                "kind": "ensemble",
                "name": name,
                "method": spec.method,
                "members": members,
                "stacker": spec.stacker,
                "class_weights": calibration["class_weights"] if calibration else None,
            }
        checkpoints = run.checkpoints("best.ckpt")
        if not checkpoints:
            raise RunError(f"{name}: no finished fold model (fold_*/best.ckpt) to export")
        leaves.append(Leaf(name, run.path, run.load_config(), list(checkpoints.values()), list(checkpoints)))
        return {"kind": "run", "name": name, "leaf": len(leaves) - 1}

    tree = walk(top)
    first = leaves[0]
    for leaf in leaves[1:]:
        if leaf.preprocess != first.preprocess:
            key = next(k for k in PREPROCESS_KEYS if leaf.preprocess[k] != first.preprocess[k])
            raise ConfigError(
                f"{run_dir.name}: members preprocess differently ({first.name} data.{key}={first.preprocess[key]}, "
                f"{leaf.name} data.{key}={leaf.preprocess[key]}); one graph takes one input: export the members separately"
            )
        if leaf.folds != first.folds:
            raise RunError(
                f"{run_dir.name}: members have different finished folds ({first.name} {first.folds}, {leaf.name} {leaf.folds}); finish their folds first"
            )
    return Plan(run_dir, info, info.as_task(), leaves, tree, first.folds)


def build_model(plan: Plan) -> Any:
    """The whole plan as one eval-mode torch module: uint8 NHWC -> (probs (N, C), fold_probs (N, K, C))."""
    import torch  # deferred: the ONNX serve path imports this module and runs without torch
    from torch import nn  # deferred: the ONNX serve path imports this module and runs without torch

    from pstage.inference.predict import mean_over_views, tta_views  # deferred: imports torch (see above)
    from pstage.models.checkpoint import load_fold_module  # deferred: imports torch (see above)

    num_classes = plan.task.num_classes

    class RunGraph(nn.Module):
        """A training run: each fold model's final-class probabilities, and their mean; averaged over
        the TTA views when the run predicted with them (tta.train), so the graph reproduces the run."""

        def __init__(self, leaf: Leaf):
            super().__init__()
            self.folds = nn.ModuleList(load_fold_module(c) for c in leaf.checkpoints)
            self.views = tta_views(leaf.config.tta.in_training)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            per_fold = torch.stack([mean_over_views(fold, images, self.views) for fold in self.folds], 1)
            return per_fold.mean(1), per_fold

    class EnsembleGraph(nn.Module):
        """The ensemble's method (blend weights or stacker), then calibration: the estimators' own torch maths."""

        def __init__(self, node: dict[str, Any]):
            super().__init__()
            self.members = nn.ModuleList(build(m) for m in node["members"])
            weights = [float(m["weight"]) for m in node["members"]]
            method = METHODS.get(node["method"], "ensemble.method").restore(weights, node["stacker"], num_classes)
            self.method = method.to_torch()
            calibration = node["class_weights"]
            self.calibration = (
                ClassWeights.restore([], {"class_weights": calibration}, num_classes).to_torch()
                if calibration
                else None
            )

        def combine(self, probs: list[torch.Tensor]) -> torch.Tensor:
            out = self.method(probs)
            return out if self.calibration is None else self.calibration([out])

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            outs = [member(images) for member in self.members]
            return self.combine([o[0] for o in outs]), self.combine([o[1] for o in outs])

    def build(node: dict[str, Any]) -> nn.Module:
        return RunGraph(plan.leaves[node["leaf"]]) if node["kind"] == "run" else EnsembleGraph(node)

    return build(plan.tree).eval()


def _normalisation(plan: Plan, model: Any) -> list[dict[str, Any]]:
    """mean/std (0-255 scale) of every leaf's backbone, as applied inside the graph."""
    graphs = [m for m in model.modules() if type(m).__name__ == "RunGraph"]  # depth-first: the leaves' order
    out = []
    for leaf, graph in zip(plan.leaves, graphs, strict=True):
        classifier = graph.folds[0].model
        out.append(
            {
                "run": leaf.name,
                "model": leaf.config.model.name,
                "mean": [round(float(v), 4) for v in classifier.mean.flatten()],
                "std": [round(float(v), 4) for v in classifier.std.flatten()],
            }
        )
    return out


@dataclass
class OOFImages:
    """The run's out-of-fold images, preprocessed exactly as in training, with folds and targets."""

    images: np.ndarray  # (N, H, W, 3) uint8
    image_ids: np.ndarray
    folds: np.ndarray
    targets: np.ndarray


def oof_images(plan: Plan, data: str | Path | None = None) -> OOFImages:
    """Decode (through the shared cache) every image of the run's oof.csv with the run's settings."""
    cfg = plan.config
    path = Path(data).expanduser().resolve() if data else (Path(cfg.data.path) if cfg.data.path else None)
    if path is None or not path.exists():
        raise DataError(
            f"{plan.run_dir.name}: its training data {path} is not there; pass --data DIR (the data it was trained on)"
        )
    source = load_source(cfg.data.model_copy(update={"path": str(path)}))
    oof = pd.read_csv(plan.run_dir / "oof.csv", dtype={"image_id": str})
    paths = source.train.set_index("image_id")["path"]
    missing = ~oof["image_id"].isin(paths.index)
    if missing.any():
        raise DataError(
            f"{path}: image {oof['image_id'][missing].iloc[0]} of {plan.run_dir.name}'s OOF is not in it; pass --data DIR (the data it was trained on)"
        )
    cache = data_cache(paths.loc[oof["image_id"]].tolist(), cfg.data)
    return OOFImages(
        np.asarray(cache.open()),
        oof["image_id"].to_numpy(),
        oof["fold"].to_numpy(),
        oof["target"].to_numpy(),
    )


def fold_predictions(
    predict: Callable[[np.ndarray], np.ndarray], oof: OOFImages, folds: list[int], batch_size: int = 64
) -> np.ndarray:
    """OOF probabilities: each image by the fold model that did not see it (``predict`` -> fold_probs)."""
    column = {fold: i for i, fold in enumerate(folds)}
    rows = np.array([column.get(int(f), -1) for f in oof.folds])
    if (rows < 0).any():
        raise RunError(f"OOF image {oof.image_ids[rows < 0][0]} is in a fold with no exported model")
    out = []
    for start in range(0, len(oof.images), batch_size):
        per_fold = predict(oof.images[start : start + batch_size])
        out.append(per_fold[np.arange(len(per_fold)), rows[start : start + batch_size]])
    return np.concatenate(out)


def oof_score(probs: np.ndarray, oof: OOFImages, task: Task) -> dict[str, Any]:
    """The CV summary (run.json's ``cv`` format) of OOF probabilities."""
    frame = pd.concat(
        [
            pd.DataFrame({"image_id": oof.image_ids, "fold": oof.folds, "target": oof.targets}),
            pd.DataFrame(probs, columns=prob_columns(task.num_classes)),
        ],
        axis=1,
    )
    return cv_scores(frame, task)


def ort_session(path: str | Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session (``threads`` 0: its default, one per core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise RunError(
            f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]}); re-run pstage export"
        ) from None


def _quantize(fp32: Path, int8: Path, calibration: np.ndarray, work: Path) -> None:
    """Static int8 (QDQ, per-channel weights) calibrated on training images.

    Static rather than dynamic: dynamic quantization leaves convolutions' activations in float
    (ConvInteger is slow or missing on CPU), so a CNN gets little from it.
    """
    # optional extra [serve]: onnxruntime.quantization imports onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    # optional extra [serve]: as above
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 32)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": np.ascontiguousarray(batch)}

    prepared = work / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        op_types_to_quantize=["Conv", "Gemm"],  # the backbones and heads; softmax, blends and stacker stay fp32
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


@dataclass
class ExportResult:
    """What ``export`` wrote and measured."""

    run: str
    path: Path  # model.onnx
    preprocess: Path
    int8_path: Path | None
    parity_max_abs_diff: float
    oof: dict[str, float] = field(default_factory=dict)  # backend -> CV macro F1 on OOF
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def int8_change(self) -> float | None:
        if "onnx_int8" not in self.oof:
            return None
        return self.oof["onnx_int8"] - self.oof["onnx_fp32"]


@honours_trust
def export(
    run: str | Path,
    *,
    runs: str | Path = "runs",
    format: str = "onnx",
    int8: bool = False,
    data: str | Path | None = None,
    out: str | Path | None = None,
    calibration_images: int = 256,
    score: bool | None = None,
    store: str | None = None,
    trust: bool = False,
) -> ExportResult:
    """Export a finished run or ensemble to ``<run>/export/model.onnx`` (+ ``model.int8.onnx``).

    Checks the graph against PyTorch on sample images (max |diff| recorded). ``int8`` calibrates
    on ``calibration_images`` training images and scores fp32 and int8 on the run's OOF (needs
    the training data: the run's own ``data.path`` or ``data``); ``score`` forces or skips that.
    With ``store`` (the team's MLflow server), a run or ensemble that is not local is pulled first,
    with every member (recursively) and their fold models: a teammate's ensemble exports from an
    empty runs folder.
    """
    if store:  # before the heavy imports: a wrong name or store answers at once
        run = locate(run, runs, store, checkpoints=True)
    require("onnx", "onnxruntime")
    import onnx  # optional extra [serve]: require() above says how to install it
    import torch  # deferred: the ONNX serve path imports this module and runs without torch

    started = time.time()
    if format not in FORMATS:
        raise ConfigError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    if calibration_images < 1:
        raise ConfigError(f"--calibration-images {calibration_images}: expected at least 1")
    plan = plan_export(run, runs)
    target = Path(out).expanduser().resolve() if out else plan.run_dir / EXPORT_DIR
    model = build_model(plan)
    height, width = plan.preprocess["image_size"]
    rng = np.random.default_rng(0)
    sample = rng.integers(0, 256, (4, height, width, 3), dtype=np.uint8)
    score = int8 if score is None else score
    oof = oof_images(plan, data) if (int8 or score) else None
    if oof is not None and len(oof.images):
        sample = oof.images[rng.choice(len(oof.images), min(8, len(oof.images)), replace=False)]

    work = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    work.mkdir(parents=True)
    try:
        fp32 = work / MODEL_FILE
        with torch.inference_mode():
            expected = model(torch.from_numpy(sample))[0].numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about constants the graph rightly bakes in
            torch.onnx.export(
                model,
                (torch.from_numpy(sample[:2]),),
                str(fp32),
                input_names=["images"],
                output_names=["probs", "fold_probs"],
                dynamic_axes={"images": {0: "batch"}, "probs": {0: "batch"}, "fold_probs": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        onnx.checker.check_model(str(fp32))
        session = ort_session(fp32)
        got = session.run(["probs"], {"images": sample})[0]
        diff = float(np.abs(got - expected).max())
        if diff > 1e-4:
            raise RunError(
                f"{plan.run_dir.name}: the ONNX graph differs from PyTorch by {diff:.2e} (> 1e-4); not exported"
            )
        scores: dict[str, float] = {}
        if oof is not None:
            scores["run_cv"] = float(plan.info.score)  # type: ignore[arg-type]  # a finished run has a CV
            scores["onnx_fp32"] = oof_score(
                fold_predictions(lambda x: session.run(["fold_probs"], {"images": x})[0], oof, plan.folds),
                oof,
                plan.task,
            )["macro_f1"]
        int8_file = None
        if int8:
            assert oof is not None
            pick = rng.choice(len(oof.images), min(calibration_images, len(oof.images)), replace=False)
            int8_file = work / INT8_FILE
            _quantize(fp32, int8_file, oof.images[np.sort(pick)], work)
            (work / "prepared.onnx").unlink(missing_ok=True)
            quantized = ort_session(int8_file)
            scores["onnx_int8"] = oof_score(
                fold_predictions(lambda x: quantized.run(["fold_probs"], {"images": x})[0], oof, plan.folds),
                oof,
                plan.task,
            )["macro_f1"]
        sizes = {p.name: p.stat().st_size for p in (fp32, int8_file) if p is not None}
        spec = _preprocess_spec(plan, model, diff, scores, sizes, int8_file is not None, fp32)
        write_json(work / PREPROCESS_FILE, spec)
        with RunLock(plan.run_dir):
            old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
            if target.exists():
                os.replace(target, old)
            os.replace(work, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(
        plan.info.name or plan.run_dir.name,
        target / MODEL_FILE,
        target / PREPROCESS_FILE,
        target / INT8_FILE if int8 else None,
        diff,
        scores,
        sizes,
        round(time.time() - started, 2),
    )


def _preprocess_spec(
    plan: Plan,
    model: Any,
    diff: float,
    scores: dict[str, float],
    sizes: dict[str, int],
    has_int8: bool,
    fp32: Path,
) -> dict[str, Any]:
    """Everything a client (or ``pstage serve``) needs to feed the graph the pixels training saw."""
    p = plan.preprocess
    return {
        "run": plan.info.name or plan.run_dir.name,
        "run_path": str(plan.run_dir),
        "kind": plan.info.kind,
        "created": now(),
        "files": {"fp32": MODEL_FILE, **({"int8": INT8_FILE} if has_int8 else {})},
        "sha256": {MODEL_FILE: sha256_file(fp32)},
        "sizes": sizes,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "layout": "NHWC",
            "channels": "RGB",
            "shape": ["batch", p["image_size"][0], p["image_size"][1], 3],
        },
        "outputs": {
            "probs": "(batch, classes) final-class probabilities (mean over folds, then the ensemble's combination)",
            "fold_probs": "(batch, folds, classes) the same per fold model (for scoring OOF images)",
        },
        "preprocess": {
            "decode": "OpenCV imdecode (IMREAD_COLOR: applies EXIF orientation) -> RGB; truncated JPEG/PNG refused",
            "crop": "face crop (face_detector: retinaface or haar, box grown by face_margin) when face_crop, else (and when no face is found) centre crop keeping center_crop of the image at the output aspect",
            "resize": "cv2.resize to image_size (H, W): INTER_AREA when shrinking, else INTER_LINEAR",
            "normalize": "inside the graph: (x - mean) / std on the 0-255 scale, per member model",
            **p,
        },
        "normalisation": _normalisation(plan, model),
        "classes": plan.task.classes,
        "heads": plan.task.heads if plan.task.has_subtasks else {},
        "class_to_head": plan.task.class_to_head if plan.task.has_subtasks else {},
        "task": plan.task.to_dict(),
        "folds": plan.folds,
        "members": [
            {"run": leaf.name, "path": str(leaf.path), "model": leaf.config.model.name} for leaf in plan.leaves
        ],
        "cv_macro_f1": plan.info.score,
        "oof_macro_f1": scores,
        "parity_max_abs_diff": diff,
        "opset": OPSET,
        "exporter": "torch.onnx.export(dynamo=False)",
    }


def read_preprocess(export_dir: Path) -> dict[str, Any]:
    """The preprocess.json of an export folder, or a RunError saying how to make one."""
    path = export_dir / PREPROCESS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: unreadable ({exc}); re-run pstage export") from None
