"""An HTTP service for a trained model: FastAPI, dynamic micro-batching, and a web page.

    from visionrecipe.predict import load_classifier
    from visionrecipe.serve import ServeSettings, create_app

    app = create_app(load_classifier("runs/digits"), ServeSettings(max_batch=32, max_wait_ms=5))
    # uvicorn.run(app, host="127.0.0.1", port=8000)     -- or `visionrecipe serve runs/digits`

    POST /predict?topk=5   multipart field `files` (one or more) or `file` → top-k per image
    GET  /health           {"status": "ok", ...counters}
    GET  /metadata         classes, input size, model name, normalisation
    GET  /                 a page: drop an image, see the top-5 classes as bars
    GET  /docs             OpenAPI

Concurrent requests share forward passes: each image joins an asyncio queue, and one worker
takes up to max_batch images (waiting at most max_wait_ms for the batch to fill) and runs them
as one forward in a thread, so the event loop keeps accepting requests meanwhile and throughput
grows with load. Every bad upload is a 4xx JSON {"detail": ...} and the server keeps serving:
empty or truncated file 400, not an image 415, body over max_upload_mb or image over
max_megapixels (decompression bombs) 413, no file field 422.
"""

from __future__ import annotations

import asyncio
import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import VisionRecipeError
from .predict import answers


@dataclass
class ServeSettings:
    max_batch: int = 32  # images per forward pass
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    max_upload_mb: float = 10.0  # whole request body, MiB
    max_megapixels: float = 40.0  # per image, checked from the header before decoding
    batching: bool = True

    def __post_init__(self):
        if not (isinstance(self.max_batch, int) and self.max_batch >= 1):
            raise VisionRecipeError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        checks = {"max_wait_ms": (self.max_wait_ms >= 0, "non-negative"),  # NaN fails every comparison
                  "max_upload_mb": (self.max_upload_mb > 0, "positive"),
                  "max_megapixels": (self.max_megapixels > 0, "positive")}
        for name, (ok, what) in checks.items():
            if not ok:
                raise VisionRecipeError(f"{name} must be {what}, got {getattr(self, name)!r}")


# ---------------------------------------------------------------- micro-batching

class MicroBatcher:
    """Groups images from concurrent requests into batches of one forward pass each.

    A forming batch waits (up to max_wait_ms) only while some request is still decoding its
    upload: a lone request runs at once, so batching costs nothing at low load.
    """

    def __init__(self, forward, executor: ThreadPoolExecutor, max_batch: int, max_wait_ms: float):
        self.forward, self.executor = forward, executor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.incoming = 0  # requests between arrival and submit
        self.batches = 0

    @contextmanager
    def arriving(self):
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    def submit(self, images: list[np.ndarray]) -> asyncio.Future:
        """Queue images (synchronously, so no batch sees a request neither arriving nor queued)."""
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            futures.append(loop.create_future())
            self.queue.put_nowait((image, futures[-1]))
        return asyncio.gather(*futures)

    async def _collect(self) -> list:
        items = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(items) < self.max_batch:
            if not self.queue.empty():  # already waiting: take it without a timer
                items.append(self.queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if self.incoming == 0 or remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return items

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [item for item in await self._collect() if not item[1].done()]  # skip cancelled
            if not items:
                continue
            try:
                rows = await loop.run_in_executor(self.executor, self.forward, np.stack([i for i, _ in items]))
            except Exception as exc:  # a failed forward fails its requests, never the worker
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            for (_, future), row in zip(items, rows):
                if not future.done():
                    future.set_result(row)


# ---------------------------------------------------------------- upload checks

class UploadLimit:
    """ASGI middleware: a request body over max_bytes gets 413 before it reaches the parser.

    The body is still read (and dropped) up to a cap, so the client, which sends before it
    reads, sees the 413 instead of a reset connection.
    """

    DRAIN_CAP = 256 * 2**20

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._drain(receive, 0)
            response = JSONResponse({"detail": self._message(int(length))}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if message.get("more_body"):
                        seen = await self._drain(receive, seen)
                    raise HTTPException(413, self._message(seen))
            return message

        return await self.app(scope, limited_receive, send)

    async def _drain(self, receive, seen: int) -> int:
        while seen < self.DRAIN_CAP:
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        return seen

    def _message(self, size: int) -> str:
        return (f"upload of {size / 2**20:.1f} MiB is over the server's limit of "
                f"{self.max_bytes / 2**20:g} MiB (--max-upload-mb)")


def check_image_header(data: bytes, name: str, max_pixels: int) -> None:
    """Reject, before decoding, what is not an image or would decode to too many pixels."""
    if not data:
        raise HTTPException(400, f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HTTPException(413, f"{name}: image has too many pixels (decompression bomb?)") from None
    except UnidentifiedImageError:
        raise HTTPException(415, f"{name}: not an image (expected PNG, JPEG, WebP, BMP, GIF or TIFF)") from None
    except Exception as exc:  # a damaged header: PIL raises many types
        raise HTTPException(400, f"{name}: unreadable image ({' '.join(str(exc).split())[:200]})") from None
    if width * height > max_pixels:
        raise HTTPException(413, f"{name}: image is {width}x{height} = {width * height / 1e6:.1f} megapixels, "
                                 f"over the limit of {max_pixels / 1e6:g} (--max-megapixels)")


# ---------------------------------------------------------------- the app

def create_app(classifier, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app around a predict.TorchClassifier or onnx_runtime.OnnxClassifier."""
    settings = settings or ServeSettings()
    max_pixels = int(settings.max_megapixels * 1e6)
    counters = {"requests": 0, "images": 0, "rejected": 0}
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # One model thread: forwards never overlap, so the batch is where the parallelism is.
        executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        warmup = np.zeros((1, *classifier.input_size), dtype=np.uint8)
        await asyncio.get_running_loop().run_in_executor(executor, classifier.probabilities, warmup)
        state["executor"] = executor
        worker = None
        if settings.batching:
            state["batcher"] = MicroBatcher(classifier.probabilities, executor, settings.max_batch,
                                            settings.max_wait_ms)
            worker = asyncio.create_task(state["batcher"].run())
        yield
        if worker is not None:
            worker.cancel()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="visionrecipe", lifespan=lifespan,
                  description=f"Image classification with {classifier.name} ({len(classifier.classes)} classes).")
    app.add_middleware(UploadLimit, max_bytes=int(settings.max_upload_mb * 2**20))

    @app.exception_handler(StarletteHTTPException)
    async def count_rejections(request, exc: StarletteHTTPException):
        counters["rejected"] += 1
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(VisionRecipeError)
    async def user_error(request, exc: VisionRecipeError):
        counters["rejected"] += 1
        return JSONResponse({"detail": str(exc)}, status_code=400)

    async def decode(upload: UploadFile) -> np.ndarray:
        name = upload.filename or "upload"
        data = await upload.read()
        check_image_header(data, name, max_pixels)
        try:
            return await asyncio.to_thread(classifier.decode, data)
        except VisionRecipeError as exc:  # truncated or corrupt pixel data
            reason = str(exc).removeprefix("unreadable image image bytes: ")
            raise HTTPException(400, f"{name}: unreadable image ({reason})") from None

    async def classify(uploads: list[UploadFile]) -> np.ndarray:
        batcher = state.get("batcher")
        if batcher is None:
            images = [await decode(upload) for upload in uploads]
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(state["executor"], classifier.probabilities, np.stack(images))
        with batcher.arriving():
            images = [await decode(upload) for upload in uploads]
        return np.stack(await batcher.submit(images))

    @app.post("/predict", summary="Top-k classes for one or more uploaded images")
    async def predict(files: list[UploadFile] | None = File(None, description="one or more image files"),
                      file: UploadFile | None = File(None, description="a single image file"),
                      topk: int = Query(5, ge=1, le=1000, description="classes per image")):
        uploads = [*(files or []), *([file] if file is not None else [])]
        if not uploads:
            raise HTTPException(422, "no image: send multipart/form-data with a field 'files' (or 'file')")
        start = time.perf_counter()
        probabilities = await classify(uploads)
        counters["requests"] += 1
        counters["images"] += len(uploads)
        # A multilabel model answers every label above its threshold instead of the top k.
        predictions = [{"filename": upload.filename, "top": top}
                       for upload, top in zip(uploads, answers(classifier, probabilities, topk))]
        return {"model": classifier.name, "predictions": predictions,
                "elapsed_ms": round(1000 * (time.perf_counter() - start), 2)}

    @app.get("/health", summary="Liveness and counters")
    async def health():
        batcher = state.get("batcher")
        return {"status": "ok", **counters, "batches": batcher.batches if batcher else counters["requests"]}

    @app.get("/metadata", summary="What the model expects and predicts")
    async def metadata():
        meta = classifier.meta
        return {"model": classifier.name, "backend": classifier.backend, "classes": classifier.classes,
                "input_size": classifier.input_size, "mean": meta["mean"], "std": meta["std"],
                "tta": bool(meta.get("tta", False)),
                "batching": {"enabled": settings.batching, "max_batch": settings.max_batch,
                             "max_wait_ms": settings.max_wait_ms},
                "limits": {"max_upload_mb": settings.max_upload_mb, "max_megapixels": settings.max_megapixels}}

    page = resources.files("visionrecipe").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    return app
