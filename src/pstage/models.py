"""The classifier: a timm backbone, avg or GeM pooling, and one linear head per task head.

The model takes uint8 NHWC images (as the cache stores them) and normalises inside, so the data
loader never touches floats and an exported model needs no preprocessing beyond resizing.
Class probabilities over the final classes are the product of the heads' softmaxes.
"""

from __future__ import annotations

import difflib

import pstage.compat  # noqa: F401

import timm
import torch
from torch import nn

from pstage.errors import ConfigError
from pstage.tasks import Task


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
    except RuntimeError as exc:
        raise ConfigError(
            f"model.name={name} cannot take data.image_size={list(input_size)} ({str(exc).splitlines()[0]}): use a larger image size"
        ) from None
    backbone.train(was_training)
    return shape


class Classifier(nn.Module):
    """Backbone + pooling + a linear head per task head; input uint8 (N, H, W, 3)."""

    def __init__(
        self,
        name: str,
        heads: dict[str, int],
        *,
        pretrained: bool = False,
        pool: str = "avg",
        drop_rate: float = 0.0,
        input_size: tuple[int, int] = (64, 64),
    ):
        super().__init__()
        check_model_name(name)
        try:
            self.backbone = timm.create_model(
                name, pretrained=pretrained, num_classes=0, global_pool="" if pool == "gem" else "avg"
            )
        except Exception as exc:  # hub/network failures for pretrained weights, mostly
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
        self.heads = nn.ModuleDict({head: nn.Linear(shape[1], n) for head, n in heads.items()})
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

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for uint8 NHWC images or already normalised NCHW floats."""
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        features = self.pool(self.backbone(x))
        features = self.dropout(features)
        return {head: layer(features) for head, layer in self.heads.items()}


def class_probs(logits: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
    """Probabilities over the final classes: the product of each head's softmax at the class's head index."""
    probs = None
    for head, head_logits in logits.items():
        index = torch.as_tensor(task.class_to_head[head], device=head_logits.device)
        part = head_logits.float().softmax(-1)[:, index]
        probs = part if probs is None else probs * part
    return probs


def head_sizes(task: Task, head: str) -> dict[str, int]:
    """Head layout for ``model.head``: one head over the classes, or one per sub-task."""
    if head == "multi":
        if not task.has_subtasks:
            raise ConfigError(
                "model.head=multi needs a task with sub-tasks (the mask task); this data has one label: use model.head=linear"
            )
        return {name: len(classes) for name, classes in task.heads.items()}
    return {"label": task.num_classes}


def create_classifier(name: str, task: Task, head: str = "linear", **kwargs) -> Classifier:
    return Classifier(name, head_sizes(task, head), **kwargs)


def head_task(task: Task, head: str) -> Task:
    """The task as the model's heads see it (class_to_head for a single linear head is the identity)."""
    if head == "multi":
        return task
    return Task(task.name, task.classes, {"label": task.classes}, {"label": list(range(task.num_classes))})
