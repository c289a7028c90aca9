"""The classifier: a timm backbone, avg or GeM pooling, and one linear head per task head.

The model takes uint8 NHWC images (as the cache stores them) and normalises inside, so the data
loader never touches floats and an exported model needs no preprocessing beyond resizing.
Class probabilities over the final classes are the product of the heads' softmaxes.

Heads are picked by name from registries: ``model.head`` the layout (``HEAD_LAYOUTS``: one head
over the classes, or one per sub-task), ``model.classifier`` each classification head
(``CLASSIFIER_HEADS``) and ``model.age_head`` the age head (``AGE_HEADS``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pstage.core.compat  # noqa: F401

import timm
import torch
import torch.nn.functional as F
from timm.models import get_pretrained_cfg
from torch import nn

from pstage.core.errors import ConfigError
from pstage.core.registry import Registry
from pstage.core.tasks import Task
from pstage.models.weights import create_backbone


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent (Radenovic et al.).

    Hand-written: timm's pooling factory has avg/max/avgmax but no GeM.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class ArcFaceHead(nn.Module):
    """ArcFace (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019).

    Cosine similarity between the L2-normalised features and class centres. In training the target
    class's angle gets an additive margin m, ``s * cos(theta + m)`` (``margin_logits``); for
    probabilities the plain scaled cosine ``s * cos(theta)`` goes through a softmax (``readout``).
    With soft targets (CutMix/MixUp, pseudo-labels) the margin is applied in proportion to each
    class's target weight, which is ArcFace itself for one-hot targets.
    """

    def __init__(self, in_features: int, classes: int, scale: float = 30.0, margin: float = 0.3):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Cosines (N, K) between features and class centres."""
        return F.linear(F.normalize(features.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))

    def readout(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine * self.scale

    def margin_logits(self, cosine: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training logits: s * cos(theta + m) at the target (weighted by soft targets), s * cos(theta) elsewhere."""
        m = self.margin
        sine = (1.0 - cosine.pow(2)).clamp_min(1e-7).sqrt()
        phi = cosine * math.cos(m) - sine * math.sin(m)  # cos(theta + m)
        # past theta = pi - m, cos(theta + m) stops decreasing: use the linear penalty of insightface instead
        phi = torch.where(cosine > math.cos(math.pi - m), phi, cosine - math.sin(math.pi - m) * m)
        return self.scale * (cosine + targets * (phi - cosine))


class AgeRegressionHead(nn.Module):
    """Predicts the age in years; bucket probabilities integrate a Gaussian around it over the buckets.

    The output is the standardised age z = (age - mean) / std (mean, std: the training fold's ages,
    stored with the weights). The Gaussian's width (in std units) is learned through the bucket
    term of the loss. Buckets are [0, a), [a, b), [b, inf) on integer ages, so the edges are a - 0.5
    and b - 0.5 years; the three interval probabilities sum to 1 by construction.
    """

    def __init__(self, in_features: int, thresholds: tuple[int, ...] = (30, 60)):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)
        self.register_buffer("edges", torch.tensor([t - 0.5 for t in thresholds], dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(40.0))
        self.register_buffer("std", torch.tensor(15.0))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(0.3)))

    def set_stats(self, ages: torch.Tensor | list[float]) -> None:
        ages = torch.as_tensor(ages, dtype=torch.float32)
        self.mean.fill_(float(ages.mean()))
        self.std.fill_(max(float(ages.std()) if len(ages) > 1 else 1.0, 1.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Standardised age (N, 1)."""
        return self.linear(features)

    def years(self, z: torch.Tensor) -> torch.Tensor:
        return z.float().squeeze(-1) * self.std + self.mean

    def standardise(self, ages: torch.Tensor) -> torch.Tensor:
        return (ages.float() - self.mean) / self.std

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        """Log bucket probabilities (N, B): Gaussian CDF differences at the bucket edges."""
        edges = (self.edges - self.mean) / self.std
        sigma = self.log_sigma.float().exp().clamp_min(1e-3)
        # Gaussian CDF at the edges (N, B-1), increasing; written with erf, which exports to ONNX
        cdf = 0.5 * (1 + torch.erf((edges - z.float()) / (sigma * math.sqrt(2.0))))
        zeros, ones = torch.zeros_like(cdf[:, :1]), torch.ones_like(cdf[:, :1])
        probs = torch.cat([cdf, ones], 1) - torch.cat([zeros, cdf], 1)
        return probs.clamp_min(1e-8).log()


class OrdinalHead(nn.Module):
    """CORAL-style ordinal head (Cao et al., "Rank consistent ordinal regression for neural networks", 2020).

    One shared score f(x) and K-1 biases give the cumulative logits P(y > k) = sigmoid(f(x) + b_k).
    The biases are kept decreasing by construction (b_{k+1} = b_k - softplus(d_k)), so the bucket
    probabilities P(y = k) = P(y > k-1) - P(y > k) are never negative and sum to 1.
    """

    def __init__(self, in_features: int, buckets: int = 3):
        super().__init__()
        self.score = nn.Linear(in_features, 1, bias=False)
        self.first_bias = nn.Parameter(torch.zeros(1))
        self.gaps = nn.Parameter(torch.zeros(buckets - 2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Cumulative logits (N, K-1)."""
        biases = torch.cat([self.first_bias, self.first_bias - F.softplus(self.gaps).cumsum(0)])
        return self.score(features) + biases

    def readout(self, cumulative: torch.Tensor) -> torch.Tensor:
        """Log bucket probabilities (N, K)."""
        above = cumulative.float().sigmoid()
        zeros, ones = torch.zeros_like(above[:, :1]), torch.ones_like(above[:, :1])
        probs = torch.cat([ones, above], 1) - torch.cat([above, zeros], 1)
        return probs.clamp_min(1e-8).log()


@dataclass(frozen=True)
class HeadOptions:
    """The model.* settings a head factory may read."""

    classifier: str = "linear"
    arcface_scale: float = 30.0
    arcface_margin: float = 0.3
    age_thresholds: tuple[int, ...] = (30, 60)


# A head factory: (in_features, classes, options) -> the head's module.
HeadFactory = Callable[[int, int, HeadOptions], nn.Module]
CLASSIFIER_HEADS: Registry[HeadFactory] = Registry("classification head", "model.classifier")
AGE_HEADS: Registry[HeadFactory] = Registry("age head", "model.age_head")
# A head layout: the task as the model's heads see it (one head over the classes, or one per sub-task).
HEAD_LAYOUTS: Registry[Callable[[Task], Task]] = Registry("head layout", "model.head")


@CLASSIFIER_HEADS.register("linear")
def _linear_head(in_features: int, classes: int, options: HeadOptions) -> nn.Module:
    """A linear layer: logits."""
    return nn.Linear(in_features, classes)


@CLASSIFIER_HEADS.register("arcface")
def _arcface_head(in_features: int, classes: int, options: HeadOptions) -> nn.Module:
    """Cosines to class centres, an angular margin in training (ArcFaceHead)."""
    return ArcFaceHead(in_features, classes, options.arcface_scale, options.arcface_margin)


@AGE_HEADS.register("classify")
def _classify_age(in_features: int, classes: int, options: HeadOptions) -> nn.Module:
    """The age buckets as classes, with the classification head (model.classifier)."""
    return CLASSIFIER_HEADS.create(options.classifier, in_features, classes, options)


@AGE_HEADS.register("regress")
def _regress_age(in_features: int, classes: int, options: HeadOptions) -> nn.Module:
    """The age in years; bucket probabilities from a Gaussian around it (AgeRegressionHead)."""
    return AgeRegressionHead(in_features, tuple(options.age_thresholds))


@AGE_HEADS.register("ordinal")
def _ordinal_age(in_features: int, classes: int, options: HeadOptions) -> nn.Module:
    """CORAL cumulative logits over the ordered buckets (OrdinalHead)."""
    return OrdinalHead(in_features, classes)


@HEAD_LAYOUTS.register("linear")
def _single_head(task: Task) -> Task:
    """One softmax over the final classes (class_to_head is the identity)."""
    return Task(task.name, task.classes, {"label": task.classes}, {"label": list(range(task.num_classes))})


@HEAD_LAYOUTS.register("multi")
def _head_per_subtask(task: Task) -> Task:
    """One head per sub-task (mask, gender, age); a class's probability is the product of its heads'."""
    if not task.has_subtasks:
        raise ConfigError(
            "model.head=multi needs a task with sub-tasks (the mask task); this data has one label: use model.head=linear"
        )
    return task


def check_model_name(name: str) -> None:
    """A one-line error with the closest names when timm has no such model."""
    if timm.is_model(name):
        return
    near = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = (
        f"; did you mean {', '.join(near)}?"
        if near
        else " (list them with: python -c 'import timm; print(timm.list_models())')"
    )
    raise ConfigError(f"model.name: timm has no model '{name}'{hint}")


def check_model_input(name: str, input_size: Sequence[int], pool: str = "avg") -> None:
    """Refuse, in one line and before a run starts, a model that cannot take the run's image size or
    pooling: the same backbone and probe as training, without loading any weights."""
    Classifier(name, {"class": 2}, pretrained=False, pool=pool, input_size=tuple(input_size))


def _size_arguments(name: str, input_size: Sequence[int]) -> dict[str, Any]:
    """``img_size`` for models whose token grid is fixed when built (timm's ``fixed_input_size``:
    ViT, Swin, MaxViT, CoAtNet, ...), so they take the run's data.image_size; nothing for CNNs."""
    cfg = get_pretrained_cfg(name.partition(".")[0])
    return {"img_size": tuple(input_size)} if cfg is not None and cfg.fixed_input_size else {}


def _output_shape(backbone: nn.Module, name: str, input_size: tuple[int, int]) -> torch.Size:
    """Shape of the backbone's output for one image of ``input_size``, or a ConfigError if it cannot take it.

    Probed rather than read from ``num_features``: models with a pre-logits layer (MobileNetV3,
    ...) output ``head_hidden_size`` features, and only a forward pass says whether a backbone
    with ``global_pool=''`` returns feature maps (CNNs) or tokens (ViTs).
    """
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            shape = backbone(torch.zeros(1, 3, *input_size)).shape
    except (RuntimeError, AssertionError, ValueError) as exc:  # timm's shape checks assert; torch's ops raise
        raise ConfigError(
            f"model.name={name} cannot take data.image_size={list(input_size)} ({str(exc).splitlines()[0]}): "
            "use a larger image size (for a transformer, a multiple of its patch size)"
        ) from None
    backbone.train(was_training)
    return shape


class Classifier(nn.Module):
    """Backbone + pooling + a linear head per task head; input uint8 (N, H, W, 3).

    ``pretrained`` (auto/true/false) and ``weights`` (a local file) choose the backbone's starting
    weights (models/weights.py); normalisation always uses timm's mean/std for ``name``.
    """

    def __init__(
        self,
        name: str,
        heads: dict[str, int],
        *,
        pretrained: bool | str = False,
        weights: str | None = None,
        pool: str = "avg",
        drop_rate: float = 0.0,
        input_size: tuple[int, int] = (64, 64),
        classifier: str = "linear",
        age_head: str = "classify",
        age_thresholds: tuple[int, ...] = (30, 60),
        arcface_scale: float = 30.0,
        arcface_margin: float = 0.3,
    ):
        super().__init__()
        check_model_name(name)
        try:
            self.backbone = create_backbone(
                name,
                pretrained,
                weights,
                num_classes=0,
                global_pool="" if pool == "gem" else "avg",
                **_size_arguments(name, input_size),
            )
        except ConfigError:
            raise
        except Exception as exc:  # a timm model that cannot be built with these arguments
            raise ConfigError(
                f"model.name={name} pretrained={pretrained}: timm could not create it ({str(exc).splitlines()[0]})"
            ) from None
        self.pool = GeM() if pool == "gem" else nn.Identity()
        shape = _output_shape(self.backbone, name, tuple(input_size))
        if pool == "gem" and len(shape) != 4:
            raise ConfigError(
                f"model.pool=gem needs a convolutional backbone; {name} does not output feature maps (use model.pool=avg)"
            )
        self.dropout = nn.Dropout(drop_rate)
        options = HeadOptions(classifier, arcface_scale, arcface_margin, tuple(age_thresholds))
        self.heads = nn.ModuleDict(
            {
                head: (AGE_HEADS if head == "age" else CLASSIFIER_HEADS).create(
                    age_head if head == "age" else classifier, shape[1], n, options
                )
                for head, n in heads.items()
            }
        )
        cfg = self.backbone.pretrained_cfg
        self.register_buffer(
            "mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1) * 255, persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1) * 255, persistent=False
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW (in channels_last memory, which the permute gives for free)."""
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, raw: bool = False) -> dict[str, torch.Tensor]:
        """Logits per head for uint8 NHWC images or already normalised NCHW floats.

        A head's logits are what its softmax turns into its probabilities: for ArcFace the scaled
        cosines, for a regression or ordinal age head the log bucket probabilities. ``raw=True``
        returns each head's own output instead (cosines, standardised age, cumulative logits),
        which its training loss needs.
        """
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        features = self.pool(self.backbone(x))
        features = self.dropout(features)
        out = {head: layer(features) for head, layer in self.heads.items()}
        if raw:
            return out
        return {head: readout(self.heads[head], value) for head, value in out.items()}


def readout(layer: nn.Module, value: torch.Tensor) -> torch.Tensor:
    """A head's raw output as logits (identity for a linear head)."""
    return layer.readout(value) if hasattr(layer, "readout") else value


def class_probs(logits: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
    """Probabilities over the final classes: the product of each head's softmax at the class's head index."""
    probs = None
    for head, head_logits in logits.items():
        index = torch.as_tensor(task.class_to_head[head], device=head_logits.device)
        part = head_logits.float().softmax(-1)[:, index]
        probs = part if probs is None else probs * part
    return probs


def head_sizes(task: Task, head: str) -> dict[str, int]:
    """Head layout for ``model.head``: each head's number of outputs."""
    return {name: len(classes) for name, classes in head_task(task, head).heads.items()}


def create_classifier(name: str, task: Task, head: str = "linear", **kwargs) -> Classifier:
    AGE_HEADS.check(kwargs.get("age_head", "classify"))
    if kwargs.get("age_head", "classify") != "classify" and "age" not in head_sizes(task, head):
        raise ConfigError(f"model.age_head={kwargs['age_head']} needs an age head (model.head=multi on the mask task)")
    return Classifier(name, head_sizes(task, head), **kwargs)


def head_task(task: Task, head: str) -> Task:
    """The task as the model's heads see it, per the layout ``model.head`` names."""
    return HEAD_LAYOUTS.create(head, task)
