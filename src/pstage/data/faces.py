"""Crop boxes: around the largest face OpenCV's bundled Haar cascade finds, else the image centre.

Boxes keep the model's aspect ratio so the later resize does not distort faces.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

_CASCADE_FILE = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
_DETECT_SIDE = 256  # detect on a downscaled copy: ~10x faster, faces here fill a large part of the photo
_local = threading.local()  # one CascadeClassifier per thread: instances are not thread-safe


def _cascade() -> cv2.CascadeClassifier:
    if not hasattr(_local, "cascade"):
        _local.cascade = cv2.CascadeClassifier(_CASCADE_FILE)
    return _local.cascade


def center_box(height: int, width: int, aspect: float, fraction: float = 1.0) -> tuple[int, int, int, int]:
    """The largest (x0, y0, x1, y1) box of ``aspect`` (= w / h) centred in the image, scaled by ``fraction``."""
    box_w = min(width, height * aspect) * fraction
    box_h = box_w / aspect
    x0, y0 = (width - box_w) / 2, (height - box_h) / 2
    return round(x0), round(y0), round(x0 + box_w), round(y0 + box_h)


def _fit_box(cx: float, cy: float, box_h: float, aspect: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A box of ``aspect`` centred at (cx, cy), shrunk to fit and shifted inside the image."""
    box_h = min(box_h, height, width / aspect)
    box_w = box_h * aspect
    x0 = min(max(cx - box_w / 2, 0), width - box_w)
    y0 = min(max(cy - box_h / 2, 0), height - box_h)
    return round(x0), round(y0), round(x0 + box_w), round(y0 + box_h)


def face_box(image: np.ndarray, aspect: float, margin: float) -> tuple[int, int, int, int] | None:
    """A crop box around the largest detected face (grown by ``margin``), or None when none is found."""
    height, width = image.shape[:2]
    scale = min(1.0, _DETECT_SIDE / max(height, width))
    small = cv2.resize(
        image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
    )
    gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
    min_side = max(12, int(min(gray.shape) * 0.15))
    faces = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(min_side, min_side))
    if len(faces) == 0:
        return None
    x, y, w, h = (v / scale for v in max(faces, key=lambda f: f[2] * f[3]))
    # Grow more downwards: the mask, chin and neck sit below the detected box.
    cx, cy = x + w / 2, y + h / 2 + h * margin * 0.15
    return _fit_box(cx, cy, h * (1 + margin), aspect, height, width)
