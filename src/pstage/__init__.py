"""pstage: a workbench for team image-classification competitions.

The Python API mirrors the CLI; heavy imports (torch, timm, Lightning) happen on first use, so
``import pstage`` and ``pstage --help`` stay fast.

    >>> import pstage
    >>> result = pstage.train("cfg.yaml", data="data/", name="r18", overrides=["train.epochs=3"])
    >>> pstage.predict("r18", data="data/", tta=True)
    >>> pstage.ensemble(["r18", "effb0"], method="hill", name="ens1")
    >>> pstage.board(["runs", "/mnt/team/runs"]).runs.head()
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "train": ("pstage.training", "train"),
    "RunResult": ("pstage.training", "RunResult"),
    "predict": ("pstage.inference", "predict"),
    "Prediction": ("pstage.inference", "Prediction"),
    "ensemble": ("pstage.ensembling", "ensemble"),
    "EnsembleResult": ("pstage.ensembling", "EnsembleResult"),
    "board": ("pstage.leaderboard", "load_board"),
    "Board": ("pstage.leaderboard", "Board"),
    "run_demo": ("pstage.demo", "run_demo"),
    "make_demo_data": ("pstage.demo_data", "make_demo_data"),
    "tune": ("pstage.tuning", "tune"),
    "TuneResult": ("pstage.tuning", "TuneResult"),
    "export": ("pstage.export", "export"),
    "ExportResult": ("pstage.export", "ExportResult"),
    "serve": ("pstage.serve", "serve"),
    "create_app": ("pstage.serve", "create_app"),
    "distill": ("pstage.distill", "distill"),
    "DistillResult": ("pstage.distill", "DistillResult"),
    "load_config": ("pstage.config", "load_config"),
    "Config": ("pstage.config", "Config"),
    "load_source": ("pstage.sources", "load_source"),
    "load_run": ("pstage.runs", "load_run"),
    "PstageError": ("pstage.errors", "PstageError"),
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pstage' has no attribute {name!r}")
