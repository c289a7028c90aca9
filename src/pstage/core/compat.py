"""Make torchvision importable on a CPU-only torch paired with a CUDA-linked torchvision wheel.

Such a wheel registers fake kernels for ``torchvision::nms`` before the op schema exists and
raises ``operator torchvision::nms does not exist``; timm, torchmetrics and Lightning all import
torchvision. Defining the two schemas ourselves lets the import finish (the ops themselves are
never used by pstage). Where torchvision loads natively this module does nothing. No library
offers this fix, hence the hand-written shim.
"""

from __future__ import annotations

import sys

import torch

_LIBRARY: torch.library.Library | None = None  # kept alive: a collected Library drops its ops


def ensure_torchvision() -> None:
    """Import torchvision, defining its missing detection-op schemas first when needed."""
    global _LIBRARY
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401


ensure_torchvision()
