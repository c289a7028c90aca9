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
    "train": ("pstage.training.train", "train"),
    "RunResult": ("pstage.training.train", "RunResult"),
    "predict": ("pstage.inference.predict", "predict"),
    "Prediction": ("pstage.inference.predict", "Prediction"),
    "ensemble": ("pstage.ensembling.ensemble", "ensemble"),
    "EnsembleResult": ("pstage.ensembling.ensemble", "EnsembleResult"),
    "board": ("pstage.report.board", "load_board"),
    "log_score": ("pstage.runs.public_lb", "log_score"),
    "Board": ("pstage.report.board", "Board"),
    "run_demo": ("pstage.demo", "run_demo"),
    "make_demo_data": ("pstage.demo.synthetic", "make_demo_data"),
    "tune": ("pstage.tuning.tune", "tune"),
    "TuneResult": ("pstage.tuning.tune", "TuneResult"),
    "export": ("pstage.deploy.export", "export"),
    "ExportResult": ("pstage.deploy.export", "ExportResult"),
    "serve": ("pstage.deploy.serve", "serve"),
    "create_app": ("pstage.deploy.serve", "create_app"),
    "distill": ("pstage.distillation", "distill"),
    "DistillResult": ("pstage.distillation", "DistillResult"),
    "load_config": ("pstage.config", "load_config"),
    "Config": ("pstage.config", "Config"),
    "load_source": ("pstage.data.sources", "load_source"),
    "load_run": ("pstage.runs.rundir", "load_run"),
    "PstageError": ("pstage.core.errors", "PstageError"),
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pstage' has no attribute {name!r}")
