"""Experiment trackers beyond TensorBoard: W&B (offline) and MLflow (SQLite), and their failures."""

import pytest

import pstage
from pstage.core.errors import ConfigError
from tests.conftest import FAST

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")


def test_wandb_offline_and_mlflow_record_each_fold(demo_root, tmp_path):
    overrides = [*FAST, "train.folds=[0]", "log.loggers=[tensorboard,csv,wandb,mlflow]"]
    result = pstage.train(data=demo_root, runs=tmp_path, name="trk", overrides=overrides)
    assert list((result.path / "logs" / "wandb").glob("offline-run-*"))
    assert (result.path / "logs" / "csv" / "fold_0" / "metrics.csv").exists()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pstage").experiment_id])
    assert [r.info.run_name for r in runs] == ["trk/fold_0"]
    assert "val/macro_f1" in runs[0].data.metrics


def test_unreachable_tracker_is_one_line_before_training(demo_root, tmp_path):
    overrides = [*FAST, "log.loggers=[mlflow]", "log.mlflow_tracking_uri=nosuchscheme://tracker"]
    with pytest.raises(ConfigError, match=r"^log.loggers: mlflow could not start") as info:
        pstage.train(data=demo_root, runs=tmp_path, name="bad", overrides=overrides)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "bad").glob("fold_0/*.ckpt"))
