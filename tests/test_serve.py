"""serve: a real server process on loopback, a real HTTP client, good and bad uploads, and a browser."""

from __future__ import annotations

import io
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
UPLOAD_LIMIT_MB = 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(model, *flags, log: Path):
    """`python -m visionrecipe serve MODEL --port FREE ...` until /health answers; stopped afterwards."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "visionrecipe", "serve", str(model), "--port", str(port),
                                 *map(str, flags)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not answer /health:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width×height pixels in a few dozen bytes: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def digits():
    """Ten test digits as PNG bytes with their labels."""
    from visionrecipe.data.digits import load_digits_tensors

    _, _, (images, labels) = load_digits_tensors()
    return [(png_bytes(images[i, 0].numpy()), str(int(labels[i]))) for i in range(10)]


@pytest.fixture(scope="module")
def server(digits_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serving(digits_run, "--max-upload-mb", UPLOAD_LIMIT_MB, "--max-wait-ms", 10, log=log) as url:
        yield url


def test_predict_health_metadata_docs_page(server, digits):
    with httpx.Client(base_url=server, timeout=30) as client:
        assert client.get("/health").json()["status"] == "ok"
        meta = client.get("/metadata").json()
        assert meta["classes"] == [str(i) for i in range(10)] and meta["input_size"] == [1, 8, 8]
        assert meta["model"] == "seedcnn" and meta["backend"] == "pytorch"

        png, label = digits[0]
        one = client.post("/predict", files={"files": ("zero.png", png, "image/png")})
        assert one.status_code == 200
        top = one.json()["predictions"][0]["top"]
        assert len(top) == 5 and top[0]["class"] == label and top[0]["probability"] > 0.5

        many = client.post("/predict", params={"topk": 2}, files=[("files", (f"{i}.png", p)) for i, (p, _) in
                                                                 enumerate(digits)])
        predictions = many.json()["predictions"]
        assert [p["filename"] for p in predictions] == [f"{i}.png" for i in range(10)]
        assert all(len(p["top"]) == 2 for p in predictions)
        assert sum(p["top"][0]["class"] == label for p, (_, label) in zip(predictions, digits)) >= 8

        single = client.post("/predict", files={"file": ("one.png", png)})
        assert single.json()["predictions"][0]["top"] == top

        assert "openapi" in client.get("/openapi.json").json() and client.get("/docs").status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and "<script>" in page.text
        assert "http://" not in page.text and "https://" not in page.text  # self-contained


def _chunked_multipart(size: int):
    """A multipart body sent without Content-Length, so only counting the bytes can stop it."""
    boundary = "visionrecipe-test"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(size // 65536):
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    return {"content": body(), "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


BAD_REQUESTS = {
    "not an image": (415, lambda png: {"files": {"files": ("notes.txt", b"just some text", "text/plain")}}),
    "truncated image": (400, lambda png: {"files": {"files": ("cut.png", png[: len(png) // 2], "image/png")}}),
    "zero bytes": (400, lambda png: {"files": {"files": ("empty.png", b"", "image/png")}}),
    "upload too large": (413, lambda png: {"files": {"files": ("big.png", b"\0" * (UPLOAD_LIMIT_MB * 2**20 + 4096))}}),
    "too large, chunked": (413, lambda png: _chunked_multipart(2 * UPLOAD_LIMIT_MB * 2**20)),
    "49 megapixels": (413, lambda png: {"files": {"files": ("huge.png", png_header(7000, 7000), "image/png")}}),
    "decompression bomb": (413, lambda png: {"files": {"files": ("bomb.png", png_header(30000, 30000))}}),
    "missing field": (422, lambda png: {"files": {"image": ("a.png", png)}}),
    "no body": (422, lambda png: {}),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, digits, case):
    status, build = BAD_REQUESTS[case]
    png, label = digits[1]
    with httpx.Client(base_url=server, timeout=30) as client:
        response = client.post("/predict", **build(png))
        assert response.status_code == status, response.text
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]
        after = client.post("/predict", files={"files": ("ok.png", png)})
        assert after.status_code == 200 and after.json()["predictions"][0]["top"][0]["class"] == label


def test_concurrent_requests_share_batches(server, digits):
    def one(i):
        png, label = digits[i % len(digits)]
        with httpx.Client(base_url=server, timeout=60) as client:
            return client.post("/predict", files={"files": (f"{i}.png", png)}).json(), label

    before = httpx.get(f"{server}/health").json()
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(48)))
    after = httpx.get(f"{server}/health").json()
    assert sum(r["predictions"][0]["top"][0]["class"] == label for r, label in results) >= 40
    assert after["images"] - before["images"] == 48
    assert after["batches"] - before["batches"] < 48  # some forwards served several requests


def test_onnx_model_without_batching(digits_run, digits, server, tmp_path):
    from visionrecipe.export import export_model

    onnx_path = export_model(digits_run, out=tmp_path / "digits.onnx")["path"]
    files = [("files", (f"{i}.png", p)) for i, (p, _) in enumerate(digits)]
    with serving(onnx_path, "--no-batching", log=tmp_path / "server.log") as url:
        meta = httpx.get(f"{url}/metadata").json()
        assert meta["backend"] == "onnxruntime" and meta["batching"]["enabled"] is False
        from_onnx = httpx.post(f"{url}/predict", files=files, timeout=30).json()["predictions"]
    from_torch = httpx.post(f"{server}/predict", files=files, timeout=30).json()["predictions"]
    assert [p["top"][0]["class"] for p in from_onnx] == [p["top"][0]["class"] for p in from_torch]


def test_busy_port_is_a_one_line_error(digits_run, capsys):
    from visionrecipe.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(digits_run), "--port", str(taken.getsockname()[1])]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: address 127.0.0.1:") and "already in use" in error and error.count("\n") == 1
    assert main(["serve", str(digits_run), "--max-batch", "0"]) == 2
    assert "max_batch must be a positive integer" in capsys.readouterr().err


def test_web_page_in_headless_chromium(server, digits, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (make browser)")
    png, label = digits[2]
    image = tmp_path / "digit.png"
    image.write_bytes(png)
    expected = httpx.post(f"{server}/predict", files={"files": ("digit.png", png)}).json()
    expected_top = expected["predictions"][0]["top"][0]["class"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('seedcnn')")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#results .row .label", timeout=30000)
            labels = page.locator("#results .row .label").all_inner_texts()
            assert len(labels) == 5 and labels[0] == expected_top == label
            assert page.locator("#preview").get_attribute("src").startswith("blob:")
            assert not page.locator("#error").is_visible()
        finally:
            browser.close()
