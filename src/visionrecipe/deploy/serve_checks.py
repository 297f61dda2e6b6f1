"""What the HTTP service refuses before it does any work: foreign hosts and origins, big bodies, big images.

    app.add_middleware(UploadLimit, max_bytes=10 * 2**20)
    app.add_middleware(ClientGuard, loopback=is_loopback("127.0.0.1"), allow_origins=("http://localhost:3000",))
    pixels = image_pixels(data, "a.png", max_pixels=40_000_000)   # from the header alone; HTTPException if refused

Every refusal is an HTTPException (or, in middleware, a JSON response) with a one-line "detail":
421 a Host that is not this machine while bound to loopback (DNS rebinding), 403 a POST from a
page on another origin, 413 a body or image over the limits, 415 a file that is not an image in
one of ACCEPTED_FORMATS, 400 an empty or damaged one.
"""

from __future__ import annotations

import io
import ipaddress
import warnings

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers


# What the service decodes; PIL knows ~40 more formats (EPS runs Ghostscript), each more code an
# upload could reach. The page and /metadata show this list.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


# ---------------------------------------------------------------- host and origin

def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: is_loopback("::1") and is_loopback("localhost")."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def host_name(host: str) -> str:
    """The name in a Host header, without its port: host_name("[::1]:8000") == "[::1]"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0]


class ClientGuard:
    """ASGI middleware: refuse a foreign Host while bound to loopback (421), and a POST whose Origin
    is neither this server nor allowed (403).

    The Host check stops DNS rebinding: a page on evil.example whose name is re-pointed at
    127.0.0.1 reaches the server with `Host: evil.example`. Any port is accepted with a local name,
    so an ssh tunnel (`-L 9000:localhost:8000`) still works. The Origin check stops a page on
    another site from posting a form here: browsers send Origin with every POST, other clients
    (curl, scripts) send none and are not browsers' victims.
    """

    def __init__(self, app, loopback: bool, allow_origins=()):
        self.app, self.loopback, self.allow_origins = app, loopback, frozenset(allow_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        refusal = None
        if self.loopback and host_name(host) not in LOCAL_NAMES:
            refusal = (421, f"host {host!r} is not this machine: a server bound to loopback answers only "
                            f"localhost, 127.0.0.1 and [::1] (serve --host to serve a network)")
        origin = headers.get("origin")
        if refusal is None and scope["method"] in UNSAFE_METHODS and origin is not None \
                and origin.lower() != f"{scope['scheme']}://{host.lower()}" and origin not in self.allow_origins:
            refusal = (403, f"cross-origin request from {origin!r} refused (serve --allow-origin {origin} "
                            f"lets that site's pages post here)")
        if refusal is None:
            return await self.app(scope, receive, send)
        response = JSONResponse({"detail": refusal[1]}, status_code=refusal[0])
        return await response(scope, receive, send)


# ---------------------------------------------------------------- request body

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


# ---------------------------------------------------------------- images

def image_pixels(data: bytes, name: str, max_pixels: int) -> int:
    """Width × height of an upload, read from its header only (PIL decodes nothing in open()).

    Refuses what is empty (400), damaged (400), not one of ACCEPTED_FORMATS (415) or over
    max_pixels (413). PIL's own guard (Image.MAX_IMAGE_PIXELS, which create_app sets to
    max_pixels) raises beyond twice that; below it, our check gives the better message.
    """
    if not data:
        raise HTTPException(400, f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below words it
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        raise HTTPException(413, f"{name}: image has over twice the limit of {max_pixels / 1e6:g} megapixels "
                                 f"(a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise HTTPException(415, f"{name}: not an image in an accepted format "
                                 f"({', '.join(ACCEPTED_FORMATS)})") from None
    except Exception as exc:  # a damaged header: PIL raises many types
        raise HTTPException(400, f"{name}: unreadable image ({' '.join(str(exc).split())[:200]})") from None
    if width * height > max_pixels:
        raise HTTPException(413, f"{name}: image is {width}x{height} = {width * height / 1e6:.1f} megapixels, "
                                 f"over the limit of {max_pixels / 1e6:g} (--max-megapixels)")
    return width * height
