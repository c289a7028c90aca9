"""``pstage serve``: a run (or ensemble) behind a small, hardened REST API (FastAPI + uvicorn).

    POST /predict   one or many images (multipart field ``files``) -> class, decoded heads, probabilities
    GET  /health    liveness (never needs the key)
    GET  /model     what is served: run, backend, preprocessing, classes, limits
    GET  /docs      OpenAPI docs (and /openapi.json)

Backend: ONNX Runtime on ``<run>/export/model.onnx`` when the run was exported (``model.int8.onnx``
with ``backend="int8"``), else the fold models in PyTorch. Either way the graph is the one
``pstage.deploy.export`` builds, fed the pixels ``pstage.data.cache`` would have cached for training.

Hardening: an API key (``X-API-Key`` or ``Authorization: Bearer``) checked before the body is read;
a request-body limit (also for chunked uploads), a per-file limit and a pixel limit read from the
image header before decoding (decompression bombs never decode); non-images, truncated and
undecodable files get a 4xx naming the file. Binds 127.0.0.1 unless told otherwise.

Concurrent requests are batched: a worker thread takes whatever images are waiting (up to
``max_batch``, waiting at most ``max_wait_ms`` for more) and runs the model once for all of them.
"""

from __future__ import annotations

import asyncio
import io
import json
import queue
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import uvicorn
from fastapi import FastAPI, File, HTTPException, Security, UploadFile
from fastapi.security import APIKeyHeader
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from pstage.core.errors import ConfigError, RunError
from pstage.data.cache import _truncated, prepare  # the training cache's own checks and crop/resize
from pstage.deploy.export import (
    EXPORT_DIR,
    INT8_FILE,
    MODEL_FILE,
    build_model,
    ort_session,
    plan_export,
    read_preprocess,
)
from pstage.models.trust import honours_trust
from pstage.runs.rundir import RunDir, RunInfo
from pstage.runs.store import locate

BACKENDS = ("auto", "onnx", "int8", "pytorch")
OPEN_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")


@dataclass
class Limits:
    """What one request may carry. Defaults fit phone photos; lower them for an open port."""

    max_body_bytes: int = 50 * 2**20
    max_file_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000  # 40 MP decodes to 120 MB of RGB
    max_images: int = 64

    def __post_init__(self) -> None:
        for key, value in vars(self).items():
            if int(value) < 1:
                raise ConfigError(f"serve limit {key}={value}: expected a positive number")


@dataclass
class Served:
    """A loaded model: how to call it and what it expects."""

    run: str
    run_dir: Path
    info: RunInfo
    backend: str
    file: Path | None
    predict: Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> (N, C) probabilities
    preprocess: dict[str, Any]  # image_size, face_crop, face_margin, face_detector, center_crop
    classes: list[str]
    heads: dict[str, list[str]]
    class_to_head: dict[str, list[int]]
    extra: dict[str, Any] = field(default_factory=dict)


def _pull_served(run: str | Path, runs: str | Path, store: str, backend: str) -> str:
    """The run from the store (or local), with the fold models only if no published export serves it."""
    path = Path(locate(run, runs, store))
    wanted = {"auto": MODEL_FILE, "onnx": MODEL_FILE, "int8": INT8_FILE}.get(backend)
    if wanted is None or not (path / EXPORT_DIR / wanted).is_file():  # PyTorch serving needs every fold model
        path = Path(locate(path, runs, store, checkpoints=True))
    return str(path)


@honours_trust
def load_served(
    run: str | Path,
    runs: str | Path = "runs",
    backend: str = "auto",
    threads: int = 0,
    store: str | None = None,
    trust: bool = False,
) -> Served:
    """The run's exported ONNX graph if there is one (``auto``), or the one asked for.

    With ``store`` (the team's MLflow server), a run that is not local is pulled first; its fold
    models (and an ensemble's members) only when no published ONNX export will serve it. ``trust``:
    a fold checkpoint of a run made on this machine may hold pickled objects (never a pulled one).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if store:
        run = _pull_served(run, runs, store, backend)
    found = RunDir.find(run, runs)
    run_dir, info, name = found.path, found.info, found.name
    export_dir = run_dir / EXPORT_DIR
    if backend == "auto":
        backend = "onnx" if (export_dir / MODEL_FILE).exists() else "pytorch"
    if backend in ("onnx", "int8"):
        file = export_dir / (INT8_FILE if backend == "int8" else MODEL_FILE)
        if not file.exists():
            flag = " --int8" if backend == "int8" else ""
            raise RunError(f"{file} not found: run pstage export {name}{flag} first (or serve with --backend pytorch)")
        spec = read_preprocess(export_dir)
        session = ort_session(file, threads)

        def predict(images: np.ndarray) -> np.ndarray:
            return session.run(["probs"], {"images": images})[0]

        task = spec["task"]
        return Served(
            name,
            run_dir,
            info,
            "onnx-int8" if backend == "int8" else "onnx",
            file,
            predict,
            served_crop(spec["preprocess"], name),
            task["classes"],
            task["heads"],
            task["class_to_head"],
            {"members": spec["members"], "exported": spec["created"], "oof_macro_f1": spec.get("oof_macro_f1")},
        )
    import torch  # deferred: the ONNX backends serve without torch

    if threads:
        torch.set_num_threads(threads)
    plan = plan_export(run_dir, runs)
    model = build_model(plan)

    def predict_torch(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images))[0].float().numpy()

    task = plan.task
    return Served(
        name,
        run_dir,
        info,
        "pytorch",
        None,
        predict_torch,
        served_crop(plan.preprocess, name),
        task.classes,
        task.heads,
        task.class_to_head,
        {
            "members": [
                {"run": leaf.name, "path": str(leaf.path), "model": leaf.config.model.name} for leaf in plan.leaves
            ]
        },
    )


def served_crop(preprocess: dict[str, Any], run: str) -> dict[str, Any]:
    """``preprocess`` with its face detector named, refusing one that cannot run here.

    Serving must crop as training did: falling back to another detector would shift every input.
    An export whose preprocess.json names no ``face_detector`` cropped with Haar.
    """
    from pstage.data.faces import RETINAFACE_INSTALL, get_detector, unavailable  # OpenCV: only once a model is served

    if not preprocess.get("face_crop"):
        return {**preprocess, "face_detector": None}
    detector = preprocess.get("face_detector") or "haar"
    why = unavailable(detector)
    if why is not None:
        raise RunError(
            f"{run} was trained on faces cropped by {detector}, which cannot run here ({why}): {RETINAFACE_INSTALL}"
        )
    get_detector(detector)  # load it now, not on the first request
    return {**preprocess, "face_detector": detector}


# --- images -------------------------------------------------------------------------------------


class ImageRejected(Exception):
    """An upload that is not a usable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_image(data: bytes, name: str, preprocess: dict[str, Any], limits: Limits) -> np.ndarray:
    """Bytes -> the uint8 (H, W, 3) model input, exactly as ``pstage.data.cache`` prepares training images.

    The header is read first (Pillow, no pixel decoded) so an image whose pixel count exceeds
    ``limits.max_pixels`` is refused before OpenCV allocates it.
    """
    if not data:
        raise ImageRejected(422, f"{name}: empty file")
    if len(data) > limits.max_file_bytes:
        raise ImageRejected(
            413, f"{name}: {len(data):,} bytes is over the limit of {limits.max_file_bytes:,} per image"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our own limit decides
            with Image.open(io.BytesIO(data)) as header:
                kind, (width, height) = header.format, header.size
    except Image.DecompressionBombError:
        raise ImageRejected(413, f"{name}: too many pixels (decompression bomb refused)") from None
    except Exception:  # Pillow raises UnidentifiedImageError, SyntaxError, struct errors ... on junk
        raise ImageRejected(415, f"{name}: not an image (expected {', '.join(IMAGE_FORMATS)})") from None
    if kind not in IMAGE_FORMATS:
        raise ImageRejected(415, f"{name}: {kind} images are not accepted (expected {', '.join(IMAGE_FORMATS)})")
    if width * height > limits.max_pixels:
        raise ImageRejected(
            413, f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of {limits.max_pixels:,}"
        )
    if _truncated(data):
        raise ImageRejected(422, f"{name}: truncated image file")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageRejected(422, f"{name}: the {kind} image cannot be decoded (corrupt file)")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    size = tuple(preprocess["image_size"])
    out, _ = prepare(
        image,
        size,
        preprocess["face_crop"],
        preprocess.get("face_margin") or 0.6,
        preprocess["center_crop"],
        preprocess.get("face_detector") or "haar",
    )
    return out


# --- batching -----------------------------------------------------------------------------------


class Batcher:
    """Runs the model on images from concurrent requests together (one thread owns the model)."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, max_wait_ms: float = 5.0):
        self.predict, self.max_batch, self.max_wait = predict, max_batch, max_wait_ms / 1000
        self.queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self.batches = 0
        self.images = 0
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread if it is not running (an app may be started, stopped and started again)."""
        with self._lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="pstage-batcher", daemon=True)
                self.thread.start()

    def submit(self, images: np.ndarray) -> Future:
        self.start()
        future: Future = Future()
        self.queue.put((images, future))
        return future

    def close(self) -> None:
        with self._lock:
            if self.thread is not None and self.thread.is_alive():
                self.queue.put(None)
                self.thread.join(timeout=10)
            self.thread = None

    def _loop(self) -> None:
        stop = False
        while not stop:
            item = self.queue.get()
            if item is None:
                return
            items, count = [item], len(item[0])
            deadline = time.monotonic() + self.max_wait
            while count < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
                count += len(nxt[0])
            try:
                probs = self.predict(np.concatenate([images for images, _ in items]))
            except Exception as exc:  # handed to every waiting request
                for _, future in items:
                    future.set_exception(exc)
                continue
            self.batches += 1
            self.images += count
            start = 0
            for images, future in items:
                future.set_result(probs[start : start + len(images)])
                start += len(images)


# --- the app ------------------------------------------------------------------------------------


class ImagePrediction(BaseModel):
    filename: str = Field(description="The uploaded file's name.")
    class_id: int = Field(description="Predicted class id (the competition's label).")
    label: str = Field(description="Predicted class name.")
    heads: dict[str, str] = Field(description="The class decoded into its heads (mask, gender, age for the mask task).")
    probabilities: list[float] = Field(description="Probability of every class, indexed by class id (see GET /model).")


class PredictResponse(BaseModel):
    model: str
    backend: str
    predictions: list[ImagePrediction]


class Health(BaseModel):
    status: str
    model: str
    backend: str
    uptime_s: float


class ModelInfo(BaseModel):
    run: str
    kind: str
    backend: str
    file: str | None
    cv_macro_f1: float | None
    preprocess: dict[str, Any]
    classes: list[str]
    heads: dict[str, list[str]]
    members: list[dict[str, Any]]
    limits: dict[str, int]
    batching: dict[str, float]
    extra: dict[str, Any]


class Problem(BaseModel):
    detail: str


def _json(status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[dict, dict]:
    body = json.dumps({"detail": detail}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *(headers or []),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class Guard:
    """ASGI middleware: API key and body-size limit, checked before a byte of the body is read."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key")
        if given is None:
            auth = headers.get(b"authorization", b"")
            given = auth[7:] if auth[:7].lower() == b"bearer " else None
        return given is not None and secrets.compare_digest(given, self.api_key.encode())

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorised(headers):
            for message in _json(
                401, "missing or wrong API key: send it as the X-API-Key header", [(b"www-authenticate", b"Bearer")]
            ):
                await send(message)
            return
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                for message in _json(400, "invalid Content-Length header"):
                    await send(message)
                return
            if int(length) > self.max_body:
                for message in _json(
                    413, f"request body of {int(length):,} bytes is over the limit of {self.max_body:,}"
                ):
                    await send(message)
                return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPException(413, f"request body is over the limit of {self.max_body:,} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(
    served: Served,
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
) -> Any:
    """The FastAPI app serving ``served`` (wrapped in the key/size guard)."""
    limits = limits or Limits()
    batcher = Batcher(served.predict, max_batch=max_batch, max_wait_ms=max_wait_ms)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        batcher.start()
        yield
        batcher.close()

    key_scheme = APIKeyHeader(
        name="X-API-Key", auto_error=False, description="The key given to pstage serve --api-key."
    )
    secured = [Security(key_scheme)] if api_key else []
    errors = {
        401: {"model": Problem, "description": "Missing or wrong API key."},
        413: {"model": Problem, "description": "Body, file or pixel count over the limit."},
        415: {"model": Problem, "description": "Not an image."},
        422: {"model": Problem, "description": "Truncated, corrupt or missing image."},
    }
    app = FastAPI(
        title=f"pstage: {served.run}",
        version="1",
        description=f"Predictions of run {served.run} ({served.backend}) over {len(served.classes)} classes.",
        lifespan=lifespan,
    )

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        """Liveness: the model is loaded and answering."""
        return Health(status="ok", model=served.run, backend=served.backend, uptime_s=round(time.time() - started, 1))

    @app.get("/model", response_model=ModelInfo, dependencies=secured, responses={401: errors[401]})
    async def model_info() -> ModelInfo:
        """What is served: run, backend, preprocessing, classes and heads, request limits."""
        return ModelInfo(
            run=served.run,
            kind=served.info.kind,
            backend=served.backend,
            file=str(served.file) if served.file else None,
            cv_macro_f1=served.info.score,
            preprocess=served.preprocess,
            classes=served.classes,
            heads=served.heads,
            members=served.extra.get("members", []),
            limits=dict(vars(limits)),
            batching={
                "max_batch": max_batch,
                "max_wait_ms": max_wait_ms,
                "batches": batcher.batches,
                "images": batcher.images,
            },
            extra={k: v for k, v in served.extra.items() if k != "members"},
        )

    @app.post("/predict", response_model=PredictResponse, dependencies=secured, responses=errors)
    async def predict(
        files: list[UploadFile] = File(..., description="One or more images (JPEG, PNG, BMP, WEBP, TIFF)."),
    ) -> PredictResponse:
        """Classify one or many images (repeat the ``files`` field)."""
        if not files:
            raise HTTPException(422, "no image: send one or more files in the multipart field 'files'")
        if len(files) > limits.max_images:
            raise HTTPException(413, f"{len(files)} images is over the limit of {limits.max_images} per request")
        names = [f.filename or f"file {i}" for i, f in enumerate(files)]
        contents = [await f.read(limits.max_file_bytes + 1) for f in files]

        def prepare_all() -> np.ndarray:
            return np.stack(
                [read_image(data, n, served.preprocess, limits) for data, n in zip(contents, names, strict=True)]
            )

        try:
            images = await run_in_threadpool(prepare_all)
        except ImageRejected as exc:
            raise HTTPException(exc.status, str(exc)) from None
        probs = await asyncio.wrap_future(batcher.submit(images))
        out = []
        for name, p in zip(names, probs, strict=True):
            c = int(np.argmax(p))
            heads = (
                {h: served.heads[h][served.class_to_head[h][c]] for h in served.heads} if len(served.heads) > 1 else {}
            )
            out.append(
                ImagePrediction(
                    filename=name,
                    class_id=c,
                    label=served.classes[c],
                    heads=heads,
                    probabilities=[round(float(x), 6) for x in p],
                )
            )
        return PredictResponse(model=served.run, backend=served.backend, predictions=out)

    app.state.batcher = batcher
    app.state.served = served
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    return app


def serve(
    run: str | Path,
    *,
    runs: str | Path = "runs",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    backend: str = "auto",
    limits: Limits | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    log_level: str = "info",
    on_ready: Callable[[Served], None] | None = None,
    store: str | None = None,
    trust: bool = False,
) -> None:
    """Serve a run with uvicorn until interrupted (127.0.0.1 unless ``host`` says otherwise).

    ``store``: a teammate's published run (or ensemble) is pulled first; ``trust``: see ``load_served``."""

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: expected 1..65535")

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host"
            ) from None
    served = load_served(run, runs, backend, store=store, trust=trust)
    app = create_app(served, api_key=api_key, limits=limits, max_batch=max_batch, max_wait_ms=max_wait_ms)
    if on_ready is not None:
        on_ready(served)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
