"""Experiment trackers by name (``log.loggers``): one registered factory per Lightning logger.

Each factory takes ``(cfg, run_dir, fold)`` and returns a started Lightning logger writing under
``<run>/logs``. The trackers' packages are imported inside the factories: W&B and MLflow are an
optional extra (``pstage[trackers]``) and slow to import, so only the ones a run asks for load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pstage.config import Config
from pstage.core.errors import ConfigError
from pstage.core.registry import Registry

LoggerFactory = Callable[[Config, Path, Any], Any]
LOGGERS: Registry[LoggerFactory] = Registry("logger", "log.loggers")


@LOGGERS.register("tensorboard")
def tensorboard_logger(cfg: Config, run_dir: Path, fold: Any) -> Any:
    """TensorBoard event files in <run>/logs/fold_<k>."""
    from lightning.pytorch.loggers import TensorBoardLogger  # keeps tensorboard off pstage's start-up

    return TensorBoardLogger(run_dir, name="logs", version=f"fold_{fold}", default_hp_metric=False)


@LOGGERS.register("csv")
def csv_logger(cfg: Config, run_dir: Path, fold: Any) -> Any:
    """metrics.csv in <run>/logs/csv/fold_<k>."""
    from lightning.pytorch.loggers import CSVLogger  # as above: loaded only when asked for

    return CSVLogger(run_dir / "logs", name="csv", version=f"fold_{fold}")


@LOGGERS.register("wandb")
def wandb_logger(cfg: Config, run_dir: Path, fold: Any) -> Any:
    """Weights & Biases (offline with WANDB_MODE=offline), one W&B run per fold grouped by run."""
    import wandb  # noqa: F401  (the optional trackers extra: a missing package is a one-line error)
    from lightning.pytorch.loggers import WandbLogger  # as above: loaded only when asked for

    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=cfg.log.wandb_project,
        name=f"{run_dir.name}/fold_{fold}",
        group=run_dir.name,
        save_dir=str(run_dir / "logs"),
    )
    logger.experiment  # noqa: B018  (start it now: a bad login fails here, not mid-fit)
    return logger


@LOGGERS.register("mlflow")
def mlflow_logger(cfg: Config, run_dir: Path, fold: Any) -> Any:
    """MLflow, by default a SQLite store shared by the runs folder (runs/mlflow.db)."""
    import mlflow  # noqa: F401  (the optional trackers extra: a missing package is a one-line error)
    from lightning.pytorch.loggers import MLFlowLogger  # as above: loaded only when asked for

    # One SQLite store per runs folder (MLflow 3 refuses its old file store): `mlflow ui
    # --backend-store-uri sqlite:///runs/mlflow.db` then shows every run of the folder.
    uri = cfg.log.mlflow_tracking_uri or f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    logger = MLFlowLogger(
        experiment_name="pstage",
        run_name=f"{run_dir.name}/fold_{fold}",
        tracking_uri=uri,
        artifact_location=(run_dir.parent / "mlartifacts").as_uri(),
        tags={"run": run_dir.name, "fold": str(fold)},
    )
    logger.experiment  # noqa: B018  (start it now: a bad URI fails here, not mid-fit)
    return logger


def make_loggers(cfg: Config, run_dir: Path, fold: Any) -> list[Any]:
    """The loggers log.loggers names (each once), started; a tracker that cannot start is one line."""
    loggers: list[Any] = []
    for kind in dict.fromkeys(cfg.log.loggers):
        factory = LOGGERS.get(kind)
        try:
            loggers.append(factory(cfg, run_dir, fold))
        except ImportError:
            raise ConfigError(
                f"log.loggers includes {kind}, which is not installed: pip install 'pstage[trackers]' (or remove it from log.loggers)"
            ) from None
        except Exception as exc:
            message = " ".join(str(exc).split())[:300]
            raise ConfigError(
                f"log.loggers: {kind} could not start ({message}); check log.* or remove it from log.loggers"
            ) from None
    return loggers
