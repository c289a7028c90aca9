"""pstage serve: predictions equal the run's, API key, limits, bad uploads, schemathesis, concurrent load, CLI."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.ship_runs import ship_runs

KEY = "s3cret-key"
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def runs(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pstage.deploy.export import export

    runs = ship_runs(demo_root, tmp_path_factory)
    export("a", runs=runs)
    return runs


@pytest.fixture(scope="module")
def app(runs: Path):
    from pstage.deploy.serve import Limits, create_app, load_served

    served = load_served("a", runs=runs)
    assert served.backend == "onnx"
    return create_app(
        served,
        api_key=KEY,
        limits=Limits(max_body_bytes=3_000_000, max_file_bytes=1_000_000, max_pixels=1_000_000, max_images=8),
    )


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        yield client


def _jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels with almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _eval_image(demo_root: Path, i: int = 0) -> tuple[str, bytes]:
    info = pd.read_csv(demo_root / "eval" / "info.csv")
    name = info["ImageID"].iloc[i]
    return name, (demo_root / "eval" / "images" / name).read_bytes()


def test_predictions_equal_the_runs_own(client, runs: Path, demo_root: Path) -> None:
    """An eval photo sent as a file gets the probabilities the run wrote to test.csv: same preprocessing."""
    test = pd.read_csv(runs / "a" / "test.csv").set_index("image_id")
    files = [("files", _eval_image(demo_root, i)) for i in range(3)]
    response = client.post("/predict", files=files, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "a" and body["backend"] == "onnx" and len(body["predictions"]) == 3
    for prediction in body["predictions"]:
        expected = test.loc[prediction["filename"], [f"p_{i}" for i in range(18)]].to_numpy(dtype=float)
        np.testing.assert_allclose(prediction["probabilities"], expected, atol=1e-4)
        assert prediction["class_id"] == int(expected.argmax())
        assert set(prediction["heads"]) == {"mask", "gender", "age"}
        assert prediction["label"] == "/".join(prediction["heads"][h] for h in ("mask", "gender", "age"))


def test_health_model_and_docs(client) -> None:
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/model", headers=AUTH).json()
    assert info["run"] == "a" and info["backend"] == "onnx" and len(info["classes"]) == 18
    assert info["preprocess"]["image_size"] == [32, 24] and info["limits"]["max_pixels"] == 1_000_000
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/predict" in schema["paths"] and "APIKeyHeader" in schema["components"]["securitySchemes"]


def test_api_key(client) -> None:
    files = [("files", ("x.jpg", _jpeg(), "image/jpeg"))]
    assert client.post("/predict", files=files).status_code == 401
    assert client.post("/predict", files=files, headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/model").status_code == 401
    assert client.post("/predict", files=files, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/health").status_code == 200  # liveness needs no key


@pytest.mark.parametrize(
    ("upload", "status", "message"),
    [
        (("notes.txt", b"hello, not an image", "text/plain"), 415, "not an image"),
        (("empty.jpg", b"", "image/jpeg"), 422, "empty file"),
        (("cut.jpg", _jpeg(1, (120, 90))[:-400], "image/jpeg"), 422, "truncated"),
        (("junk.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 300 + b"\xff\xd9", "image/jpeg"), 415, "not an image"),
        (("bomb.png", _png_header_only(50_000, 50_000), "image/png"), 413, "pixels"),
        (
            ("big.png", cv2.imencode(".png", np.zeros((1100, 1000, 3), np.uint8))[1].tobytes(), "image/png"),
            413,
            "over the limit",
        ),
        (("huge.jpg", b"\xff\xd8" + b"\0" * 1_200_000, "image/jpeg"), 413, "per image"),
    ],
)
def test_bad_uploads_get_a_4xx_with_a_message(client, upload, status: int, message: str) -> None:
    response = client.post("/predict", files=[("files", upload)], headers=AUTH)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"] and upload[0] in response.json()["detail"]


def test_request_limits(client) -> None:
    too_big = [("files", (f"{i}.bin", b"x" * 900_000, "image/jpeg")) for i in range(4)]
    response = client.post("/predict", files=too_big, headers=AUTH)
    assert response.status_code == 413 and "request body" in response.json()["detail"]

    def chunks():
        for _ in range(40):
            yield b"y" * 100_000

    response = client.post(  # no Content-Length: the body is counted as it streams in
        "/predict", content=chunks(), headers={**AUTH, "content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413
    many = [("files", (f"{i}.jpg", _jpeg(i), "image/jpeg")) for i in range(9)]
    assert client.post("/predict", files=many, headers=AUTH).status_code == 413
    assert client.post("/predict", headers=AUTH).status_code == 422  # no files at all


def test_pytorch_backend_matches_onnx(runs: Path, demo_root: Path) -> None:
    from pstage.deploy.serve import Limits, load_served, read_image

    onnx, torch_ = load_served("a", runs=runs), load_served("a", runs=runs, backend="pytorch")
    assert torch_.backend == "pytorch"
    name, data = _eval_image(demo_root, 5)
    image = read_image(data, name, onnx.preprocess, Limits())[None]
    np.testing.assert_allclose(onnx.predict(image), torch_.predict(image), atol=1e-4)


def test_schemathesis_finds_no_server_error(app) -> None:
    """Requests generated from the OpenAPI schema (odd multipart bodies, odd headers) never get a 5xx.

    Driven through hypothesis directly: schemathesis' pytest plugin does not run on this pytest.
    """
    from hypothesis import given

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == {"GET /health", "GET /model", "POST /predict"}
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        def check(case) -> None:
            statuses.append(case.call_and_validate(headers=AUTH, checks=[not_a_server_error]).status_code)

        check()
    assert statuses and max(statuses) < 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_concurrent_load_on_a_real_server(app, runs: Path) -> None:
    """200 requests from 8 client threads over loopback: every one answered 200 with its own image's result."""
    import httpx
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    images = [_jpeg(i) for i in range(10)]
    from pstage.deploy.serve import Limits, read_image

    served = app.state.served
    expected = served.predict(np.stack([read_image(b, "x", served.preprocess, Limits()) for b in images])).argmax(1)
    batches_before = app.state.batcher.batches
    started = time.time()

    def one(i: int) -> tuple[int, int, str, int]:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            r = http.post("/predict", files=[("files", (f"img{i}.jpg", images[i % 10], "image/jpeg"))], headers=AUTH)
            p = r.json()["predictions"][0] if r.status_code == 200 else {"filename": "", "class_id": -1}
            return i, r.status_code, p["filename"], p["class_id"]

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(200)))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    elapsed = time.time() - started
    assert len(results) == 200 and all(status == 200 for _, status, _, _ in results)
    assert all(name == f"img{i}.jpg" and cls == expected[i % 10] for i, _, name, cls in results)
    assert elapsed < 60
    assert app.state.batcher.batches - batches_before <= 200


def test_cli_serve_binds_loopback_and_answers(runs: Path) -> None:
    import httpx

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pstage", "serve", "a", "--runs", str(runs), "--port", str(port), "--api-key", KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert f"on http://127.0.0.1:{port}" in line, line
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        r = httpx.post(
            f"http://127.0.0.1:{port}/predict", files=[("files", ("x.jpg", _jpeg(), "image/jpeg"))], headers=AUTH
        )
        assert r.status_code == 200 and len(r.json()["predictions"][0]["probabilities"]) == 18
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    busy = subprocess.run(
        [sys.executable, "-m", "pstage", "serve", "nope", "--runs", str(runs)], capture_output=True, text=True
    )
    assert busy.returncode == 2 and "not found" in busy.stderr and "Traceback" not in busy.stderr
