import os
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from pstage.data import cache as cache_module
from pstage.data.cache import BadImage, build_cache, decode
from pstage.data.faces import center_box


def _images(folder: Path, count: int, size=(48, 64)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        cv2.imwrite(str(path), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        paths.append(str(path))
    return paths


def test_second_build_decodes_nothing(tmp_path, monkeypatch):
    paths = _images(tmp_path / "img", 20)
    first = build_cache(paths, (32, 24), cache_dir=tmp_path / "c")
    assert first.decoded == 20 and first.count == 20
    calls = []
    monkeypatch.setattr(cache_module, "decode", lambda p: calls.append(p))
    second = build_cache(paths, (32, 24), cache_dir=tmp_path / "c")
    assert second.decoded == 0 and calls == []
    assert second.path == first.path
    images = second.open()
    assert images.shape == (20, 32, 24, 3) and images.dtype == np.uint8
    assert isinstance(images, np.memmap)


def test_cache_key_follows_files_and_settings(tmp_path):
    paths = _images(tmp_path / "img", 4)
    base = build_cache(paths, (32, 24), cache_dir=tmp_path / "c").path
    assert build_cache(paths, (16, 12), cache_dir=tmp_path / "c").path != base
    assert build_cache(paths, (32, 24), center_crop=0.8, cache_dir=tmp_path / "c").path != base
    assert build_cache(paths, (32, 24), face_crop=True, cache_dir=tmp_path / "c").path != base
    os.utime(paths[0], ns=(1, 1))
    rebuilt = build_cache(paths, (32, 24), cache_dir=tmp_path / "c")
    assert rebuilt.path != base and rebuilt.decoded == 4


def test_pixels_are_resized_rgb(tmp_path):
    path = tmp_path / "red.png"
    image = np.zeros((64, 48, 3), np.uint8)
    image[..., 2] = 255  # BGR red
    cv2.imwrite(str(path), image)
    pixels = build_cache([str(path)], (32, 24), cache_dir=tmp_path / "c").open()[0]
    assert pixels[..., 0].min() == 255 and pixels[..., 1:].max() == 0


def test_bad_images_are_reported_not_fatal(tmp_path):
    paths = _images(tmp_path / "img", 3, size=(120, 90))
    data = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(data[: len(data) // 2])  # truncated JPEG
    Path(paths[2]).write_bytes(b"not an image at all")
    info = build_cache(paths, (32, 24), cache_dir=tmp_path / "c")
    assert sorted(info.bad) == paths[1:]
    assert info.bad[paths[1]] in ("truncated image file", "not a readable image")  # OpenCV builds differ
    assert info.bad[paths[2]] == "not a readable image"
    assert info.open()[2].max() == 0
    with pytest.raises(BadImage, match="empty file"):
        Path(paths[0]).write_bytes(b"")
        decode(paths[0])


def test_truncation_check_on_bytes():
    """Some OpenCV builds decode a cut-off JPEG/PNG with grey rows; the byte check catches those."""
    ok, jpeg = cv2.imencode(".jpg", np.zeros((40, 30, 3), np.uint8))
    ok, png = cv2.imencode(".png", np.zeros((40, 30, 3), np.uint8))
    assert not cache_module._truncated(jpeg.tobytes()) and not cache_module._truncated(png.tobytes())
    assert cache_module._truncated(jpeg.tobytes()[:-20]) and cache_module._truncated(png.tobytes()[:-20])


def test_truncated_png_is_detected(tmp_path):
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (80, 60, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[:-200])
    with pytest.raises(BadImage, match="truncated|not a readable"):
        decode(str(path))


def test_no_half_cache_after_a_crash(tmp_path, monkeypatch):
    paths = _images(tmp_path / "img", 6)

    def boom(image, *args):
        raise RuntimeError("crash while decoding")

    monkeypatch.setattr(cache_module, "crop_resize", boom)  # the per-image step of build_cache
    with pytest.raises(RuntimeError):
        build_cache(paths, (32, 24), cache_dir=tmp_path / "c", workers=1)
    assert list((tmp_path / "c").iterdir()) == []


def test_memory_stays_flat_as_the_dataset_grows(tmp_path):
    """Peak Python allocations while building must not scale with the number of images."""
    peaks = []
    for count in (30, 240):
        paths = _images(tmp_path / f"img{count}", count, size=(96, 72))
        tracemalloc.start()
        build_cache(paths, (64, 48), cache_dir=tmp_path / "c", workers=2)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    pixels_240 = 240 * 64 * 48 * 3
    assert peaks[1] < peaks[0] * 2 + 1_000_000
    assert peaks[1] < pixels_240 / 2  # the images themselves live in the memmap, not in Python memory


def test_face_crop_counts_fallbacks(tmp_path):
    paths = _images(tmp_path / "img", 5, size=(128, 96))
    info = build_cache(paths, (32, 24), face_crop=True, cache_dir=tmp_path / "c")
    assert info.faces_found + info.faces_missed == 5
    assert info.faces_missed == 5  # noise has no face: every image falls back to the centre crop


def test_center_box_keeps_aspect():
    x0, y0, x1, y1 = center_box(512, 384, aspect=24 / 32, fraction=1.0)
    assert (x1 - x0) / (y1 - y0) == pytest.approx(0.75, abs=0.01)
    x0, y0, x1, y1 = center_box(512, 384, aspect=1.0, fraction=0.5)
    assert (x1 - x0, y1 - y0) == (192, 192)
