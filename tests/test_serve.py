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
    with serving_process(model, *flags, log=log) as (url, _):
        yield url


@contextmanager
def serving_process(model, *flags, log: Path):
    """As serving, yielding (url, the server's subprocess.Popen)."""
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
        yield url, proc
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
    from visionrecipe.deploy.export import export_model

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


# ---------------------------------------------------------------- limits per request (issue 14, item 5)

def blank_png(width: int, height: int, mode: str = "L") -> bytes:
    """A real, fully decodable width×height PNG of one colour: megapixels in a few kilobytes."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_png():
    """6300×6300 = 39.7 megapixels, just under the default per-image limit, in about 40 KB."""
    return blank_png(6300, 6300)


def test_files_per_request_are_limited(server, digits):
    limit = 100  # the default
    files = [("files", (f"{i}.png", digits[i % 10][0])) for i in range(limit + 1)]
    with httpx.Client(base_url=server, timeout=60) as client:
        too_many = client.post("/predict", files=files)
        assert too_many.status_code == 413 and "--max-files" in too_many.json()["detail"]
        assert len(client.post("/predict", files=files[:limit]).json()["predictions"]) == limit


def test_pixels_per_request_are_limited_before_anything_is_decoded(server, big_png):
    """8 compressed 40-megapixel PNGs (the issue's 1.1 s of CPU) are refused from their headers:
    a truncated first image, which decoding would answer with 400, still gets the 413."""
    truncated = big_png[: len(big_png) // 2]  # the header is intact, the pixel data is cut
    with httpx.Client(base_url=server, timeout=60) as client:
        eight = client.post("/predict", files=[("files", (f"{i}.png", big_png)) for i in range(8)])
        assert eight.status_code == 413 and "--max-request-megapixels" in eight.json()["detail"]
        first_cut = [("files", ("cut.png", truncated)), *[("files", (f"{i}.png", big_png)) for i in range(2)]]
        assert client.post("/predict", files=first_cut).status_code == 413  # 119 MP: no decode happened
        under_limit = client.post("/predict", files=first_cut[:2])  # 79 MP: decoded, and the cut one fails
        assert under_limit.status_code == 400 and "cut.png: unreadable image" in under_limit.json()["detail"]
        assert client.post("/predict", files=[("files", ("big.png", big_png))]).status_code == 200


def _image_in(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "ICO", "SGI"])
def test_formats_the_service_does_not_list_get_415(server, fmt):
    response = httpx.post(f"{server}/predict", files={"files": (f"image.{fmt.lower()}", _image_in(fmt))})
    assert response.status_code == 415, response.text
    assert "not an image in an accepted format (PNG, JPEG" in response.json()["detail"]


def test_every_listed_format_is_accepted(server):
    listed = httpx.get(f"{server}/metadata").json()["limits"]["formats"]
    assert listed == ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]
    files = [("files", (f"image.{fmt.lower()}", _image_in(fmt))) for fmt in listed]
    response = httpx.post(f"{server}/predict", files=files, timeout=30)
    assert response.status_code == 200 and len(response.json()["predictions"]) == len(listed)


@pytest.fixture(scope="module")
def roomy_server(digits_run, tmp_path_factory):
    """Limits above PIL's own default of 89.5 megapixels, and one other site allowed to post."""
    log = tmp_path_factory.mktemp("serve") / "roomy.log"
    with serving(digits_run, "--max-megapixels", 120, "--allow-origin", "http://localhost:3000/", log=log) as url:
        yield url


def test_max_megapixels_above_pils_default_admits_the_image(roomy_server):
    """100 megapixels: over PIL's default guard (which refused it as a 'decompression bomb'), under ours."""
    hundred = blank_png(10_000, 10_000, mode="1")  # 1 bit per pixel: ~12 KB, 100 MB once decoded
    response = httpx.post(f"{roomy_server}/predict", files={"files": ("wide.png", hundred)}, timeout=60)
    assert response.status_code == 200, response.text
    over = httpx.post(f"{roomy_server}/predict", files={"files": ("wider.png", png_header(11_000, 11_000))})
    assert over.status_code == 413 and "121.0 megapixels, over the limit of 120" in over.json()["detail"]


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for peak memory")
def test_decoding_is_bounded_across_concurrent_requests(digits_run, big_png, tmp_path):
    """Six requests of two 40-megapixel images at once: one decode thread holds one image (40 MB)
    at a time, where a thread per request held six."""
    files = [("files", (f"{i}.png", big_png)) for i in range(2)]
    with serving_process(digits_run, "--decode-threads", 1, log=tmp_path / "server.log") as (url, proc):
        before = _peak_rss_mb(proc.pid)
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{url}/predict", files=files, timeout=120).status_code,
                                  range(6)))
        grown = _peak_rss_mb(proc.pid) - before
    assert codes == [200] * 6
    assert grown < 130, f"peak memory grew by {grown:.0f} MB"


# ---------------------------------------------------------------- Host and Origin (issue 14, item 14)

def raw_request(url: str, method: str, path: str, headers: dict, files=None):
    """One request through http.client, which sends the Host and Origin we give verbatim."""
    import http.client

    body = None
    if files is not None:
        built = httpx.Request(method, url + path, files=files)
        body = built.read()
        headers = {**headers, "Content-Type": built.headers["content-type"]}
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_loopback_server_answers_only_local_host_names(server):
    """DNS rebinding: evil.example re-pointed at 127.0.0.1 reaches us with its own name as Host."""
    port = server.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", ""):
        status, _, body = raw_request(server, "GET", "/metadata", {"Host": host})
        assert status == 421 and b"not this machine" in body, (host, body)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST:9000", "localhost"):
        status, _, body = raw_request(server, "GET", "/metadata", {"Host": host})
        assert status == 200 and b'"classes"' in body, (host, body)


def test_cross_origin_posts_are_refused(server, digits):
    port = server.rsplit(":", 1)[1]
    upload = {"files": ("a.png", digits[0][0])}
    status, _, body = raw_request(server, "POST", "/predict", {"Origin": "http://evil.example"}, upload)
    assert status == 403 and b"--allow-origin http://evil.example" in body
    assert raw_request(server, "POST", "/predict", {"Origin": "null"}, upload)[0] == 403  # sandboxed or file://
    for same in (f"http://127.0.0.1:{port}", None):  # the server's own page; a client that is no browser
        status, _, body = raw_request(server, "POST", "/predict", {"Origin": same} if same else {}, upload)
        assert status == 200 and b'"predictions"' in body
    status, _, _ = raw_request(server, "POST", "/predict", {"Host": f"localhost:{port}",
                                                            "Origin": f"http://localhost:{port}"}, upload)
    assert status == 200


def test_allow_origin_admits_that_site_only(roomy_server, digits):
    upload = {"files": ("a.png", digits[0][0])}
    status, headers, _ = raw_request(roomy_server, "POST", "/predict", {"Origin": "http://localhost:3000"}, upload)
    assert status == 200 and headers.get("access-control-allow-origin") == "http://localhost:3000"
    assert raw_request(roomy_server, "POST", "/predict", {"Origin": "http://localhost:3001"}, upload)[0] == 403


def test_bad_serve_settings_are_one_line_errors(digits_run, capsys):
    from visionrecipe.cli import main
    from visionrecipe.deploy.serve_checks import is_loopback

    for flags, message in [(["--allow-origin", "*"], "--allow-origin needs an origin such as"),
                           (["--allow-origin", "http://a.example/page"], "--allow-origin needs an origin"),
                           (["--max-files", "0"], "max_files must be a positive integer"),
                           (["--max-request-megapixels", "10"], "max_request_megapixels must be at least"),
                           (["--decode-threads", "0"], "decode_threads must be a positive integer")]:
        assert main(["serve", str(digits_run), *flags]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1, error
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.com"]))
