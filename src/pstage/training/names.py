"""The names a training config picks from registries, checked at the edge of ``pstage train``.

``pstage.config`` cannot check them (it is a layer below the registries' modules), so ``train``
(and ``tune``, for its base config and search space) calls ``check_names`` before any work: an
unknown name is one line with the registered names and the closest one.
"""

from __future__ import annotations

from typing import Any

from pstage.core.registry import Registry, check_config
from pstage.models.classifier import AGE_HEADS, CLASSIFIER_HEADS, HEAD_LAYOUTS
from pstage.models.losses import LOSSES
from pstage.training.loggers import LOGGERS

# Config key -> registry: model.head, model.classifier, model.age_head, loss.name, log.loggers.
REGISTRIES: tuple[Registry[Any], ...] = (HEAD_LAYOUTS, CLASSIFIER_HEADS, AGE_HEADS, LOSSES, LOGGERS)


def check_names(cfg: Any) -> None:
    """A ConfigError naming the key, the registered names and the closest, for any unknown name."""
    check_config(cfg, REGISTRIES)
