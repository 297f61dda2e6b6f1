"""An HTTP service for a trained model: FastAPI, dynamic micro-batching, and a web page.

    from visionrecipe.deploy.predict import load_classifier
    from visionrecipe.deploy.serve import ServeSettings, create_app

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
grows with load. Uploads are decoded by a pool of decode_threads shared by all requests, so
decoding's memory and CPU stay bounded however many requests arrive.

Every refusal is a 4xx JSON {"detail": ...} and the server keeps serving (serve_checks.py):
empty or truncated file 400, a POST from another site's page 403, not an image in an accepted
format 415, a foreign Host while bound to loopback 421, no file field 422, and 413 for a body
over max_upload_mb, more than max_files files, an image over max_megapixels or a request over
max_request_megapixels -- the pixel limits read from the headers before anything is decoded.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from importlib import resources

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from visionrecipe.config import ServeSettings
from visionrecipe.errors import VisionRecipeError
from visionrecipe.deploy.predict import answers
from visionrecipe.deploy.serve_checks import ACCEPTED_FORMATS, ClientGuard, UploadLimit, image_pixels, is_loopback


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


# ---------------------------------------------------------------- the app

def create_app(classifier, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app around a predict.TorchClassifier or onnx_runtime.OnnxClassifier."""
    settings = settings or ServeSettings()
    max_pixels = int(settings.max_megapixels * 1e6)
    request_pixels = int(settings.max_request_megapixels * 1e6)
    # PIL's own guard is process-wide and refuses above twice its value whatever we check, so it
    # follows --max-megapixels: higher admits bigger images, lower stops bombs in PIL itself.
    Image.MAX_IMAGE_PIXELS = max_pixels
    counters = {"requests": 0, "images": 0, "rejected": 0}
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # One model thread: forwards never overlap, so the batch is where the parallelism is.
        executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        warmup = np.zeros((1, *classifier.input_size), dtype=np.uint8)
        await asyncio.get_running_loop().run_in_executor(executor, classifier.probabilities, warmup)
        state["executor"] = executor
        state["decoder"] = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        worker = None
        if settings.batching:
            state["batcher"] = MicroBatcher(classifier.probabilities, executor, settings.max_batch,
                                            settings.max_wait_ms)
            worker = asyncio.create_task(state["batcher"].run())
        yield
        if worker is not None:
            worker.cancel()
        executor.shutdown(wait=False, cancel_futures=True)
        state["decoder"].shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="visionrecipe", lifespan=lifespan,
                  description=f"Image classification with {classifier.name} ({len(classifier.classes)} classes).")
    # Each add wraps the app so far: the guard runs first, then CORS, then the body limit.
    app.add_middleware(UploadLimit, max_bytes=int(settings.max_upload_mb * 2**20))
    if settings.allow_origins:  # lets the allowed sites' pages read the answers too
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allow_origins), allow_methods=["GET", "POST"])
    app.add_middleware(ClientGuard, loopback=is_loopback(settings.host), allow_origins=settings.allow_origins)

    @app.exception_handler(StarletteHTTPException)
    async def count_rejections(request, exc: StarletteHTTPException):
        counters["rejected"] += 1
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(VisionRecipeError)
    async def user_error(request, exc: VisionRecipeError):
        counters["rejected"] += 1
        return JSONResponse({"detail": str(exc)}, status_code=400)

    async def read_uploads(uploads: list[UploadFile]) -> list[tuple[str, bytes]]:
        """(name, bytes) of every upload; 413 before anything is decoded when the request asks too much."""
        if len(uploads) > settings.max_files:
            raise HTTPException(413, f"{len(uploads)} files in one request, over the limit of "
                                     f"{settings.max_files} (--max-files)")
        named, total = [], 0
        for upload in uploads:
            name = upload.filename or "upload"
            data = await upload.read()
            total += image_pixels(data, name, max_pixels)
            if total > request_pixels:
                raise HTTPException(413, f"the images of this request add up to over the limit of "
                                         f"{settings.max_request_megapixels:g} megapixels (--max-request-megapixels)")
            named.append((name, data))
        return named

    async def decode(name: str, data: bytes) -> np.ndarray:
        """One upload to uint8 C×H×W on the shared decode pool: classifier.decode (the model's eval
        policy, as predict decodes), only from ACCEPTED_FORMATS."""
        work = partial(classifier.decode, data, formats=ACCEPTED_FORMATS)
        try:
            return await asyncio.get_running_loop().run_in_executor(state["decoder"], work)
        except VisionRecipeError as exc:  # truncated or corrupt pixel data
            reason = str(exc).removeprefix("unreadable image image bytes: ")
            raise HTTPException(400, f"{name}: unreadable image ({reason})") from None

    async def classify(uploads: list[UploadFile]) -> np.ndarray:
        batcher = state.get("batcher")
        if batcher is None:
            images = [await decode(*named) for named in await read_uploads(uploads)]
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(state["executor"], classifier.probabilities, np.stack(images))
        with batcher.arriving():
            images = [await decode(*named) for named in await read_uploads(uploads)]
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
                "limits": {"max_upload_mb": settings.max_upload_mb, "max_megapixels": settings.max_megapixels,
                           "max_files": settings.max_files,
                           "max_request_megapixels": settings.max_request_megapixels,
                           "formats": list(ACCEPTED_FORMATS)}}

    page = resources.files("visionrecipe.deploy").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    return app
