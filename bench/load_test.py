"""Load test for `visionrecipe serve`: requests/s and p50/p99 latency, batching on and off, on CPU.

    python bench/load_test.py                          # trains a digits model (32x32) into a temp dir
    python bench/load_test.py --run runs/digits --duration 8 --concurrency 1 8 32 --markdown

For each of batching on / off it starts the server itself as a subprocess on 127.0.0.1 (a free
port; nothing else is ever contacted), then for each concurrency runs that many client
coroutines in a closed loop (send, wait, send again) for `duration` seconds after a one-second
warm-up, and stops. One client process drives all clients, so on a small machine the client
shares the CPU with the server; the numbers compare settings, they are not a capacity figure.

Why 32x32 by default: digits are 8x8, where one forward costs less than parsing the HTTP
request, so batching has nothing to save. Upscaled to 32x32, seedcnn's forward dominates and
sharing it between requests is what the benchmark measures.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

HOST = "127.0.0.1"  # loopback only, whatever the arguments say
MAX_CONCURRENCY = 64
MAX_DURATION_S = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@contextmanager
def server(model: Path, flags: list[str], log: Path):
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "visionrecipe", "serve", str(model), "--host", HOST,
                                 "--port", str(port), *flags], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def raw_request(url: str, image: bytes) -> bytes:
    """One POST /predict as bytes on the wire; httpx builds the multipart body once."""
    request = httpx.Request("POST", f"{url}/predict?topk=1", files={"files": ("digit.png", image, "image/png")})
    body = request.read()
    head = [f"POST /predict?topk=1 HTTP/1.1", f"Host: {request.url.netloc.decode()}",
            f"Content-Type: {request.headers['content-type']}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def closed_loop(url: str, image: bytes, clients: int, seconds: float) -> list[float]:
    """`clients` keep-alive connections, each posting as soon as its previous answer arrives.

    A bare asyncio HTTP/1.1 client rather than httpx: with 32 connections httpx's own
    overhead, on the same two cores as the server, dominated the latencies it measured.
    """
    port = int(url.rsplit(":", 1)[1])
    request = raw_request(url, image)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def one_client():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                writer.write(request)
                status = (await reader.readline()).split()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                if len(status) < 2 or status[1] != b"200":
                    raise SystemExit(f"server answered {b' '.join(status).decode()}")
                latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies


def measure(url: str, image: bytes, clients: int, seconds: float) -> dict:
    asyncio.run(closed_loop(url, image, clients, 1.0))  # warm-up: connections, caches, threads
    before = httpx.get(f"{url}/health").json()
    start = time.perf_counter()
    latencies = np.array(asyncio.run(closed_loop(url, image, clients, seconds)))
    elapsed = time.perf_counter() - start
    after = httpx.get(f"{url}/health").json()
    batches = max(1, after["batches"] - before["batches"])
    return {"clients": clients, "requests": len(latencies), "requests_per_s": len(latencies) / elapsed,
            "p50_ms": 1000 * float(np.percentile(latencies, 50)), "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "mean_batch": (after["images"] - before["images"]) / batches}


def train_model(folder: Path, image_size: int) -> Path:
    from visionrecipe import train

    out = folder / "digits"
    print(f"training seedcnn on digits at {image_size}x{image_size} into {out} ...", file=sys.stderr, flush=True)
    train(data="digits", model="seedcnn", epochs=1, image_size=image_size, out=str(out), progress=False,
          report=False, data_dir=str(folder / "cache"))
    return out


def sample_image(run: Path) -> bytes:
    """A real test digit, as PNG, at the model's input size (so the server's resize is a no-op)."""
    from PIL import Image

    from visionrecipe.data.digits import load_digits_tensors

    meta = json.loads((run / "model.json").read_text())
    _, _, (images, _) = load_digits_tensors()
    size = meta["input_size"][1]
    img = Image.fromarray(images[0, 0].numpy()).resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def markdown(rows: list[dict]) -> str:
    lines = ["| batching | clients | requests/s | p50 ms | p99 ms | mean batch |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batching']} | {r['clients']} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['mean_batch']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run directory or .onnx to serve (default: train digits)")
    parser.add_argument("--image-size", type=int, default=32, help="when training: digits upscaled to this side")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per setting (max 60)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients (max 64)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    if not 0 < args.duration <= MAX_DURATION_S or not all(0 < c <= MAX_CONCURRENCY for c in args.concurrency):
        parser.error(f"duration must be in (0, {MAX_DURATION_S}] s and concurrency in [1, {MAX_CONCURRENCY}]")
    if args.run and not (args.run / "model.json").is_file() and args.run.suffix != ".onnx":
        parser.error(f"{args.run} is neither a run directory nor an .onnx file")

    with tempfile.TemporaryDirectory(prefix="visionrecipe-load-") as tmp:
        tmp = Path(tmp)
        run = args.run or train_model(tmp, args.image_size)
        image = sample_image(run if run.is_dir() else run.parent)
        rows = []
        for batching in (True, False):
            flags = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
            flags += [] if batching else ["--no-batching"]
            with server(run, flags, tmp / "server.log") as url:
                for clients in args.concurrency:
                    row = {"batching": "on" if batching else "off", **measure(url, image, clients, args.duration)}
                    rows.append(row)
                    print(f"batching {row['batching']:>3}  clients {clients:>3}  {row['requests_per_s']:7.1f} req/s  "
                          f"p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  "
                          f"mean batch {row['mean_batch']:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
