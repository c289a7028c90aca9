"""pstage export: ONNX parity with PyTorch (runs and ensembles), int8 scored on OOF, refusals, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import run_cli
from tests.ship_runs import ship_runs


@pytest.fixture(scope="module")
def runs(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pstage

    runs = ship_runs(demo_root, tmp_path_factory)
    if not (runs / "stk" / "run.json").exists():
        pstage.ensemble(["a", "b"], method="stack", calibrate=True, runs_dir=runs, name="stk")
    return runs


def _test_images(run_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The run's eval images, preprocessed by the training cache, in eval/info.csv order."""
    from pstage.config import load_config
    from pstage.data.cache import build_cache
    from pstage.data.sources import load_source

    cfg = load_config(run_dir / "config.yaml")
    source = load_source(cfg.data)
    d = cfg.data
    cache = build_cache(
        source.test["path"].tolist(),
        d.image_size,
        face_crop=d.face_crop,
        face_detector=d.face_detector,
        center_crop=d.center_crop,
    )
    return np.asarray(cache.open()), source.test


def _ort(path: Path, images: np.ndarray, output: str = "probs") -> np.ndarray:
    from pstage.deploy.export import ort_session

    return ort_session(path).run([output], {"images": images})[0]


def test_run_export_matches_pytorch_and_submission(runs: Path) -> None:
    """ONNX Runtime probabilities equal the fold models' mean in PyTorch within 1e-4, any batch size."""
    from pstage.config import load_config
    from pstage.deploy.export import export
    from pstage.inference.predict import fold_checkpoints, predict_probs
    from pstage.models.checkpoint import load_fold_module

    result = export("a", runs=runs)
    assert result.path == runs / "a" / "export" / "model.onnx" and result.path.exists()
    assert result.int8_path is None and result.parity_max_abs_diff < 1e-4
    images, test = _test_images(runs / "a")
    got = _ort(result.path, images)
    # the reference: each fold model in PyTorch on the same cached pixels, averaged (what predict does)
    from pstage.data.cache import build_cache

    cfg = load_config(runs / "a" / "config.yaml")
    d = cfg.data
    cache = build_cache(
        test["path"].tolist(),
        d.image_size,
        face_crop=d.face_crop,
        face_detector=d.face_detector,
        center_crop=d.center_crop,
    )
    expected = np.mean(
        [
            predict_probs(load_fold_module(c), cache.path, np.arange(len(test)), tta=cfg.tta if cfg.tta.train else None)
            for c in fold_checkpoints(runs / "a")
        ],
        axis=0,
    )
    assert got.shape == (len(test), 18)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    submission = pd.read_csv(runs / "a" / "submission.csv")
    assert (submission["ans"].to_numpy() == got.argmax(1)).all()  # the same submission
    for batch in (1, 5):  # dynamic batch
        np.testing.assert_allclose(_ort(result.path, images[:batch]), expected[:batch], atol=1e-4)
    folds = _ort(result.path, images[:3], "fold_probs")
    assert folds.shape == (3, 2, 18)
    np.testing.assert_allclose(folds.mean(1), expected[:3], atol=1e-4)

    spec = json.loads(result.preprocess.read_text())
    assert spec["input"]["dtype"] == "uint8" and spec["input"]["layout"] == "NHWC"
    assert spec["preprocess"]["image_size"] == [32, 24]
    # face_crop=auto on the competition layout: the run cropped with RetinaFace, and says so
    assert spec["preprocess"]["face_crop"] is True and spec["preprocess"]["face_detector"] == "retinaface"
    assert spec["preprocess"]["center_crop"] == cfg.data.center_crop
    assert len(spec["classes"]) == 18 and set(spec["heads"]) == {"mask", "gender", "age"}
    assert spec["normalisation"][0]["mean"] and spec["normalisation"][0]["std"]
    assert spec["folds"] == [0, 1] and spec["files"] == {"fp32": "model.onnx"}


@pytest.mark.parametrize("name", ["ens", "stk"])
def test_ensemble_export_reproduces_the_ensemble(runs: Path, name: str) -> None:
    """Weights (hill) or stacker + calibration inside the graph: the ensemble's own test.csv and submission."""
    from pstage.deploy.export import export

    result = export(name, runs=runs, score=True)
    images, _ = _test_images(runs / "a")
    got = _ort(result.path, images)
    test = pd.read_csv(runs / name / "test.csv")
    np.testing.assert_allclose(got, test[[f"p_{i}" for i in range(18)]].to_numpy(), atol=1e-4)
    assert (pd.read_csv(runs / name / "submission.csv")["ans"].to_numpy() == got.argmax(1)).all()
    spec = json.loads(result.preprocess.read_text())
    assert spec["kind"] == "ensemble" and {m["run"] for m in spec["members"]} <= {"a", "b"}
    if name == "ens":  # hill weights are fitted in-sample: the graph's OOF score is the run's CV exactly
        assert result.oof["onnx_fp32"] == pytest.approx(result.oof["run_cv"], abs=1e-6)


def test_int8_is_written_and_scored_on_oof(runs: Path) -> None:
    from pstage.deploy.export import export

    result = export("a", runs=runs, int8=True, calibration_images=64)
    assert result.int8_path is not None and result.int8_path.exists()
    assert result.sizes["model.int8.onnx"] < result.sizes["model.onnx"]
    assert result.oof["onnx_fp32"] == pytest.approx(result.oof["run_cv"], abs=1e-6)  # OOF by each image's own fold
    assert 0.0 <= result.oof["onnx_int8"] <= 1.0 and result.int8_change is not None
    probs = _ort(result.int8_path, _test_images(runs / "a")[0])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)
    spec = json.loads(result.preprocess.read_text())
    assert spec["files"]["int8"] == "model.int8.onnx" and "onnx_int8" in spec["oof_macro_f1"]


def test_refuses_mixed_preprocessing_and_unfinished_runs(runs: Path, tmp_path: Path) -> None:
    from pstage.core.errors import ConfigError, RunError
    from pstage.deploy.export import export

    # b at another image size (config edited in a copy): one graph takes one input size
    other = tmp_path / "b64"
    shutil.copytree(runs / "b", other, ignore=shutil.ignore_patterns("export"))
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["data"]["image_size"] = [64, 48]
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    info = json.loads((runs / "ens" / "run.json").read_text())
    for member in info["ensemble"]["members"]:
        member["weight"], member["path"] = 0.5, str(runs / "a" if member["run"] == "a" else other)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "run.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="data.image_size"):
        export(mixed, runs=runs)

    running = tmp_path / "running"
    running.mkdir()
    (running / "run.json").write_text(json.dumps({"name": "running", "status": "running"}))
    with pytest.raises(RunError, match="only finished runs"):
        export(running, runs=runs)
    with pytest.raises(ConfigError, match="--format"):
        export("a", runs=runs, format="tflite")


def test_cli_export(runs: Path) -> None:
    out = run_cli("export", "a", "--runs", str(runs), "--out", str(runs / "a" / "export-cli"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model.onnx" in out.stdout and (runs / "a" / "export-cli" / "preprocess.json").exists()
    bad = run_cli("export", "nope", "--runs", str(runs))
    assert bad.returncode == 2 and "run 'nope' not found" in bad.stderr and "Traceback" not in bad.stderr
