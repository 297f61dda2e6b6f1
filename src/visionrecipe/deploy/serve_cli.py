"""`visionrecipe serve`: an HTTP service and web page for a run directory or an exported .onnx.

    visionrecipe serve runs/digits                        # http://127.0.0.1:8000 (page at /, docs at /docs)
    visionrecipe serve runs/digits/model.onnx --port 9000 --max-batch 64 --max-wait-ms 2
    visionrecipe serve runs/digits --no-batching --max-upload-mb 5 --max-files 10
    visionrecipe serve runs/digits --allow-origin http://localhost:3000   # a web app there may post here
    curl -F files=@a.png -F files=@b.png 'http://127.0.0.1:8000/predict?topk=3'

Binds to loopback unless --host says otherwise (e.g. --host 0.0.0.0 to serve a network). On
loopback it answers only requests addressed to localhost, 127.0.0.1 or [::1]; in any case a
browser page from another site may not post to it unless --allow-origin names that site.
"""

from __future__ import annotations

import errno
import socket


def check_port(host: str, port: int) -> None:
    """Fail with one line, before the model loads, when the address cannot be bound."""
    from visionrecipe.errors import VisionRecipeError

    if not 0 <= port <= 65535:
        raise VisionRecipeError(f"invalid port {port} (0–65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise VisionRecipeError(f"unknown host {host!r}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise VisionRecipeError(f"address {host}:{port} {reason}; choose another with --port") from None


def cmd_serve(args) -> int:
    from visionrecipe.errors import VisionRecipeError
    from visionrecipe.deploy.predict import load_classifier
    from visionrecipe.deploy.serve import ServeSettings, create_app

    try:
        import uvicorn
    except ImportError:
        raise VisionRecipeError("serving needs fastapi and uvicorn: pip install 'visionrecipe[serve]'") from None
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_upload_mb=args.max_upload_mb, max_megapixels=args.max_megapixels,
                             max_files=args.max_files, max_request_megapixels=args.max_request_megapixels,
                             decode_threads=args.decode_threads, batching=not args.no_batching,
                             host=args.host, allow_origins=tuple(args.allow_origin))
    check_port(args.host, args.port)
    classifier = load_classifier(args.model, device=args.device)
    app = create_app(classifier, settings)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    batching = (f"batches of up to {settings.max_batch}, {settings.max_wait_ms:g} ms wait" if settings.batching
                else "no batching")
    print(f"serving {classifier.name} ({classifier.backend}, {len(classifier.classes)} classes, {batching}) "
          f"on http://{shown}:{args.port}  (page /, API docs /docs; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over HTTP (JSON API and a web page)")
    p.add_argument("model", help="run directory, or an exported .onnx file (runs on onnxruntime)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its batch (default 5)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MiB (default 10)")
    p.add_argument("--max-megapixels", type=float, default=40.0,
                   help="largest image, refused before decoding (default 40)")
    p.add_argument("--max-files", type=int, default=100, help="most images in one request (default 100)")
    p.add_argument("--max-request-megapixels", type=float, default=None,
                   help="most pixels in one request, all images together (default: 100 or --max-megapixels)")
    p.add_argument("--decode-threads", type=int, default=2,
                   help="images decoded at once over all requests; bounds decoding memory (default 2)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a site whose pages may post here, e.g. http://localhost:3000 (repeatable)")
    p.add_argument("--no-batching", action="store_true", help="one forward pass per request")
    p.add_argument("--device", default="auto", help="for a run directory: cpu, cuda, mps or auto")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)
