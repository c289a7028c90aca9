"""Decode every image once into a uint8 memmap that every later epoch and run reads.

The cache is keyed by the file list (paths, sizes, mtimes), the output size and the crop settings
(face detector included), so a second run with the same data settings decodes nothing, and a
changed file invalidates it. Face detections are cached too, keyed by the file list and the
detector only: a new size or face margin re-crops without running the detector again.
Arrays live on disk (np.memmap), so memory stays flat however large the dataset. A cache is
written to a temporary name and renamed when complete: a crash never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pstage.data.faces import (
    DEFAULT_DETECTOR,
    FACE_COLUMNS,
    Box,
    center_box,
    crop_around,
    get_detector,
    locate,
    resolve_detector,
)

CACHE_VERSION = 2  # 2: the face detector is part of the key
FACES_VERSION = 2  # stored detections: bump when a detector's output changes (2: with landmarks)


class BadImage(Exception):
    """An image file that cannot be decoded completely."""


@dataclass
class CacheInfo:
    """Where a cache lives and what building it found."""

    path: Path
    count: int
    size: tuple[int, int]
    decoded: int = 0
    bad: dict[str, str] = field(default_factory=dict)
    faces_found: int = 0
    faces_missed: int = 0
    detector: str | None = None  # the face detector behind the crop, None without face crop
    detected: int = 0  # images the detector ran on in this call (0 when detections came from the cache)

    @property
    def face_hit_rate(self) -> float | None:
        """Faces found / readable images, None without face crop."""
        readable = self.faces_found + self.faces_missed
        return self.faces_found / readable if self.detector and readable else None

    def open(self) -> np.ndarray:
        """The cached images as a read-only (N, H, W, 3) uint8 memmap."""
        return open_images(self.path)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pstage"


def open_images(path: str | Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def _truncated(data: bytes) -> bool:
    """True for a JPEG without its end marker or a PNG without its IEND chunk.

    OpenCV decodes such files partially (grey bottom rows) with only a warning on stderr, so the
    check is done here on the bytes; other formats are trusted to the decoder.
    """
    if data[:2] == b"\xff\xd8":
        return b"\xff\xd9" not in data[-1024:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-64:]
    return False


def decode(path: str) -> np.ndarray:
    """An RGB uint8 image, or BadImage saying why not."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise BadImage(f"cannot read ({exc.strerror})") from None
    if not data:
        raise BadImage("empty file")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise BadImage("not a readable image")
    if _truncated(data):
        raise BadImage("truncated image file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def prepare(
    image: np.ndarray,
    size: tuple[int, int],
    face_crop: bool,
    face_margin: float,
    center_crop: float,
    detector: str = DEFAULT_DETECTOR,
) -> tuple[np.ndarray, bool]:
    """Crop (around the face ``detector`` finds, or the centre) and resize to ``size`` = (H, W).

    Also says whether a face was found. The path serving takes for each uploaded photo.
    """
    face = get_detector(detector).detect(image) if face_crop else None
    return crop_resize(image, size, face, face_margin, center_crop), face is not None


def crop_resize(
    image: np.ndarray, size: tuple[int, int], face: Box | None, face_margin: float, center_crop: float
) -> np.ndarray:
    """Crop around ``face`` (grown by ``face_margin``) or else the centre, and resize to ``size`` = (H, W)."""
    height, width = size
    aspect = width / height
    if face is not None:
        box = crop_around(face, aspect, face_margin, image.shape[0], image.shape[1])
    else:
        box = center_box(image.shape[0], image.shape[1], aspect, center_crop)
    x0, y0, x1, y1 = box
    crop = image[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if crop.shape[0] > height else cv2.INTER_LINEAR
    return cv2.resize(crop, (width, height), interpolation=interp)


def cache_key(
    paths: Sequence[str],
    size: tuple[int, int],
    face_crop: bool,
    face_margin: float,
    center_crop: float,
    detector: str = "haar",
) -> str:
    """Hash of everything the cached pixels depend on."""
    settings: dict = {"v": CACHE_VERSION, "size": list(size), "face_crop": face_crop, "center_crop": center_crop}
    if face_crop:
        settings.update(face_margin=face_margin, detector=detector)
    return files_key(paths, settings)


def files_key(paths: Sequence[str], settings: dict) -> str:
    """Hash of ``settings`` and of each file's path, size and mtime."""
    digest = hashlib.sha1()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:20]


def is_cached(
    paths: Sequence[str],
    size: Sequence[int],
    face_crop: bool = False,
    face_margin: float = 0.6,
    center_crop: float = 1.0,
    face_detector: str = DEFAULT_DETECTOR,
    cache_dir: str | Path | None = None,
) -> bool:
    """Whether ``build_cache`` would reuse a finished cache for these settings (nothing to decode)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    detector = resolve_detector(face_detector) if face_crop is True else None
    key = cache_key(paths, (int(size[0]), int(size[1])), face_crop is True, face_margin, center_crop, detector or "")
    return (root / f"{key}.json").exists() and (root / f"{key}.npy").exists()


def build_cache(
    paths: Sequence[str],
    size: tuple[int, int],
    *,
    face_crop: bool = False,
    face_margin: float = 0.6,
    center_crop: float = 1.0,
    face_detector: str = DEFAULT_DETECTOR,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CacheInfo:
    """Decode, crop and resize ``paths`` into a memmap (or reuse the one already built).

    Unreadable images become black frames and are listed in ``CacheInfo.bad``; the caller decides
    whether that is an error. ``progress`` is called with the number of images done so far. With
    ``face_crop`` the detector is ``face_detector`` when it can run here, else Haar (one line says so);
    its detections are stored beside the cache and reused by any later build of the same files.
    """
    if not isinstance(face_crop, bool):  # "auto" is resolved by the caller, who knows the data
        raise ValueError(f"face_crop must be True or False here, not {face_crop!r} (resolve 'auto' first)")
    size = (int(size[0]), int(size[1]))
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    detector = resolve_detector(face_detector) if face_crop else None
    key = cache_key(paths, size, face_crop, face_margin, center_crop, detector or "")
    array_path, meta_path = root / f"{key}.npy", root / f"{key}.json"
    if meta_path.exists() and array_path.exists():
        meta = json.loads(meta_path.read_text())
        return CacheInfo(
            array_path,
            meta["count"],
            size,
            0,
            meta["bad"],
            meta["faces_found"],
            meta["faces_missed"],
            meta.get("detector"),
        )

    faces_path = detections_path(paths, detector or "", root)
    known = _load_faces(faces_path, len(paths)) if detector else None
    faces = np.full((len(paths), FACE_COLUMNS), np.nan, np.float32)
    tmp = root / f"{key}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npy"
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size[0], size[1], 3))
    bad: dict[str, str] = {}

    def work(index: int) -> tuple[bool, bool]:
        """Decode, detect (unless known) and crop one image: (face found, detector ran)."""
        try:
            image = decode(paths[index])
        except BadImage as exc:
            bad[paths[index]] = str(exc)
            return False, False
        face, ran = None, False
        if detector and known is not None:
            face = None if np.isnan(known[index, 0]) else tuple(float(v) for v in known[index, :4])
        elif detector:
            row, ran = locate(detector, image), True
            if row is not None:
                faces[index] = row
                face = tuple(float(v) for v in row[:4])
        images[index] = crop_resize(image, size, face, face_margin, center_crop)
        return face is not None, ran

    found = detected = 0
    try:
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:  # cv2 and ONNX Runtime release the GIL
            for done, (hit, ran) in enumerate(pool.map(work, range(len(paths)), chunksize=16), start=1):
                found += hit
                detected += ran
                if progress is not None:
                    progress(done)
        images.flush()
        os.replace(tmp, array_path)  # POSIX: renaming an open, flushed memmap is safe
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if detected:
        _save(faces_path, faces)
    missed = len(paths) - len(bad) - found if face_crop else 0
    info = CacheInfo(
        array_path, len(paths), size, len(paths), dict(sorted(bad.items())), found, missed, detector, detected
    )
    meta = {
        "count": info.count,
        "size": list(size),
        "bad": info.bad,
        "detector": detector,
        "faces_found": found,
        "faces_missed": missed,
        "face_hit_rate": info.face_hit_rate,
    }
    meta_tmp = meta_path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, meta_path)  # written last: its presence marks the cache complete
    return info


def detections_path(paths: Sequence[str], detector: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``detector``'s detections of ``paths`` are stored (beside the caches built from them)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / f"faces-{files_key(paths, {'v': FACES_VERSION, 'detector': detector})}.npy"


def load_detections(paths: Sequence[str], detector: str, cache_dir: str | Path | None = None) -> np.ndarray | None:
    """``detector``'s stored detections of ``paths`` (N, FACE_COLUMNS; NaN rows: no face), or None when
    no cache build with that detector stored them."""
    return _load_faces(detections_path(paths, detector, cache_dir), len(paths))


def _load_faces(path: Path, count: int) -> np.ndarray | None:
    """Cached detections (N, FACE_COLUMNS): box, landmarks (NaN: none), or None when absent or unreadable."""
    try:
        faces = np.load(path)
    except (OSError, ValueError):
        return None
    return faces if faces.shape == (count, FACE_COLUMNS) else None


def _save(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (a temporary name, then a rename)."""
    tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex[:8]}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
