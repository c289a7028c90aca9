"""Loading a fold model from its Lightning checkpoint (inference, export, reports, distillation)."""

from __future__ import annotations

from pathlib import Path

import pstage.core.compat  # noqa: F401

import torch

from pstage.core.errors import RunError
from pstage.models.module import ClassifierModule


def load_fold_module(checkpoint: str | Path) -> ClassifierModule:
    """A fold model from its checkpoint, in eval mode on the CPU.

    Built from the checkpoint's own config with ``pretrained`` off and no ``weights`` file: the
    weights come from the checkpoint, so nothing is downloaded or read from elsewhere.
    """
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise RunError(f"{checkpoint}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    hparams = state["hyper_parameters"]
    config = dict(hparams["config"])
    config["model"] = {**config["model"], "pretrained": False, "weights": None}
    module = ClassifierModule(config, hparams["task"])
    module.load_state_dict(state["state_dict"])
    return module.eval()
