"""`unialign serve`: a FastAPI app (JSON API + OpenAPI spec + a static search page) over a Searcher.

The server only ever opens files that are in the index, looked up by item id in SQLite; no
request parameter is ever used as a path. Uploads are capped in bytes and pixels and must
decode as one of a few raster formats, so a client cannot make the server hold a huge body,
decode a decompression bomb or run a risky PIL plugin (EPS, for one, shells out to Ghostscript).

Memory: images (thumbnails, uploads and the hits a re-ranked search reads again) are decoded at
reduced size (JPEG DCT scaling via ``Image.draft``, then ``reduce``), never above a pixel cap, and
at most ``Limits.max_concurrent_decodes`` at a time; concurrent requests for one thumbnail wait for
the first decode and reuse its cached result; `serve` has the memory that a decode frees go back
to the OS (``return_freed_images_to_the_os``).
"""

import io
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path as FilePath
from typing import Annotated, Literal

from fastapi import FastAPI, File, HTTPException, Path, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..data.images import ImageLoadError
from .images import (
    DecodeSlots,
    ThumbnailCache,
    TooManyPixels,
    decode_reduced,
    return_freed_images_to_the_os,
    upload_box,
)
from .query import Hit, Searcher

log = logging.getLogger(__name__)

UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
MULTIPART_OVERHEAD = 16 * 1024  # boundaries and part headers around the uploaded file
THUMB_SIZE = 256
INT64_MAX = (1 << 63) - 1  # SQLite integers; a larger id would overflow the lookup
THUMB_CACHE_SIZE = 2048  # thumbnails kept in memory (each a few KB of JPEG)
ECHO_CHARS = 100  # a 422 body echoes at most this much of the offending input
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000  # an upload with more pixels (full size) is refused with 413
    max_query_chars: int = 512
    max_k: int = 100
    query_image_pixels: int = 1024 * 1024  # an upload is reduced to at most this many pixels before the model
    max_decode_pixels: int = 64_000_000  # no image is decoded at more pixels (after JPEG draft scaling) than this
    max_concurrent_decodes: int = 2  # thumbnail, upload and re-rank decodes running at once (others wait)


class Result(BaseModel):
    rank: int = Field(ge=1)
    id: int = Field(description="item id; GET /api/thumb/{id} returns its thumbnail")
    score: float = Field(description="cosine similarity of the query and the image (or caption)")
    name: str = Field(description="file name of the indexed image (the server path is not disclosed)")
    caption: str | None = Field(description="the matched caption (caption search) or the image's first caption")
    thumb_url: str


class SearchResponse(BaseModel):
    mode: Literal["text", "captions", "image"]
    query: str | None = Field(description="the text query; null for an image query")
    k: int
    results: list[Result]


class Health(BaseModel):
    status: Literal["ok"]
    items: int
    captions: int
    image_index: str
    caption_index: str | None
    dim: int
    query_bank: int  # queries behind the text search's normalisation; 0: plain cosine
    max_upload_bytes: int
    max_query_chars: int
    max_k: int


class ErrorBody(BaseModel):
    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, object]]:
    return {code: {"model": ErrorBody} for code in codes}


class _HTTPMiddleware:
    """An ASGI middleware that acts on HTTP requests only (lifespan and websocket pass through)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        else:
            await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class SecurityHeaders(_HTTPMiddleware):
    """Headers on every response: no MIME sniffing, no referrer leaks, and a CSP that allows
    only the page's own files (the page has no inline script)."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        page = not scope["path"].startswith(("/api/", "/docs", "/redoc", "/openapi"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if page:
                    headers.append((b"content-security-policy",
                                    (b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                     b"base-uri 'none'; frame-ancestors 'none'")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class JSONErrors(_HTTPMiddleware):
    """Turns the plain-text error responses that Starlette's middleware sends on its own (413 from
    the body limits, 400 from the Host check) into JSON ``{"detail": ...}`` like every other error.
    Wraps the whole middleware stack, so it also sees the app-wide body limit's answer."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Message | None = None
        chunks: list[bytes] = []

        async def send_json(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"text/plain"):
                    start = message  # hold it until the whole (short) text body is in
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                text = b"".join(chunks).decode("utf-8", "replace")
                limit = scope.get("starlette.max_body_size")
                if start["status"] == 413 and limit is not None:
                    text = f"request body larger than {limit:,} bytes"
                body = json.dumps({"detail": text}).encode()
                headers = [(k, v) for k, v in start.get("headers", [])
                           if k.lower() not in (b"content-type", b"content-length")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({**start, "headers": headers})
                if scope.get("method") == "HEAD":
                    body = b""
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_json)


class _App(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        return JSONErrors(super().build_middleware_stack())


def host_patterns(hosts: Iterable[str]) -> list[str]:
    """Host header values to accept: each name as given, IPv6 addresses also in brackets
    (``Host: [::1]:8000``); ``*`` accepts any host."""
    patterns: list[str] = []
    for host in hosts:
        host = host.strip().lower()
        if not host:
            continue
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            forms = [bare, f"[{bare}]"] if ipaddress.ip_address(bare).version == 6 else [bare]
        except ValueError:
            forms = [host]
        patterns += [f for f in forms if f not in patterns]
    return patterns


def served_hosts(host: str, extra: Iterable[str] = ()) -> list[str]:
    """What `serve` accepts in the Host header: the loopback names, the bind address unless it is
    a wildcard (0.0.0.0 / ::), and ``extra`` (``--allowed-host``)."""
    wildcard = host in ("0.0.0.0", "::", "")
    return host_patterns([*LOOPBACK_HOSTS, *([] if wildcard else [host]), *extra])


def _short(value: object) -> object:
    """An echoed request value, cut to ECHO_CHARS characters."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + f"... ({len(value):,} characters)"
    encoded = jsonable_encoder(value)
    text = json.dumps(encoded, ensure_ascii=False)
    return encoded if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + f"... ({len(text):,} characters)"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        error = dict(error)
        if "input" in error:
            error["input"] = _short(error["input"])
        if "ctx" in error:
            error["ctx"] = {k: _short(v) if isinstance(v, (str, bytes)) else v for k, v in error["ctx"].items()}
        errors.append(error)
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def decode_upload(data: bytes, name: str, max_pixels: int, limits: Limits | None = None,
                  slots: DecodeSlots | None = None) -> Image.Image:
    """RGB image from uploaded bytes, reduced to at most ``limits.query_image_pixels``, or an
    HTTPException saying what is wrong with them."""
    limits = limits or Limits(max_pixels=max_pixels)
    label = (name or "upload")[:200]
    if not data:
        raise HTTPException(400, f"{label}: the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as probe:
            width, height = probe.size
    except Image.DecompressionBombError:
        raise HTTPException(413, f"{label}: more pixels than PIL's decompression-bomb limit "
                                 f"({2 * (Image.MAX_IMAGE_PIXELS or 0):,}), and more than the {max_pixels:,} allowed"
                            ) from None
    except (OSError, SyntaxError, ValueError):
        raise HTTPException(415, f"{label}: not an image in an accepted format ({', '.join(UPLOAD_FORMATS)})") from None
    if width * height > max_pixels:
        raise HTTPException(413, f"{label}: {width}x{height} pixels is more than the {max_pixels:,} allowed")
    box = upload_box(width, height, limits.query_image_pixels)
    try:
        with slots or DecodeSlots(1):
            return decode_reduced(io.BytesIO(data), box, limits.max_decode_pixels, label, formats=UPLOAD_FORMATS)
    except TooManyPixels as err:
        raise HTTPException(413, str(err)) from None
    except ImageLoadError as err:
        raise HTTPException(400, str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise HTTPException(400, f"{label}: cannot decode image ({type(err).__name__}: {err})") from None


def _result(hit: Hit) -> Result:
    return Result(rank=hit.rank, id=hit.id, score=hit.score, name=os.path.basename(hit.path), caption=hit.caption,
                  thumb_url=f"/api/thumb/{hit.id}")


def create_app(searcher: Searcher, limits: Limits = Limits(),
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS) -> FastAPI:
    """The API and page over an opened ``searcher`` (tests pass their own; `serve` builds one).

    ``allowed_hosts``: Host header values answered (others get 400, against DNS rebinding); by
    default only the loopback names, so an app served by other means than `serve` is protected
    too. ``["*"]`` answers any host."""
    app = _App(title="unialign search", version="1",
               description="Text-to-image, image-to-image and caption search over a unialign index.",
               docs_url=None, redoc_url=None,  # Swagger UI / ReDoc load from a CDN: blank offline
               max_body_size=64 * 1024)  # GET endpoints take no body; the upload route raises this
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=host_patterns(allowed_hosts), www_redirect=False)
    slots = DecodeSlots(limits.max_concurrent_decodes)
    thumbs = ThumbnailCache(THUMB_CACHE_SIZE)
    static = resources.files("unialign.search") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    K = Annotated[int, Query(ge=1, le=limits.max_k, description="number of results")]
    # Re-ranking needs the model's ITM head: without one the schema itself allows only 0.
    max_rerank = limits.max_k if getattr(getattr(searcher, "model", None), "itm_head", None) is not None else 0

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    @app.get("/api/health", response_model=Health, tags=["service"])
    def health() -> Health:
        counts = searcher.store.counts()
        return Health(status="ok", items=searcher.size, captions=counts["captions"],
                      image_index=searcher.image_params.describe(),
                      caption_index=searcher.caption_params.describe() if searcher.caption_params else None,
                      dim=searcher.model.width, query_bank=searcher.query_bank,
                      max_upload_bytes=limits.max_upload_bytes, max_query_chars=limits.max_query_chars,
                      max_k=limits.max_k)

    @app.get("/api/search", response_model=SearchResponse, responses=_errors(400), tags=["search"])
    def search(q: Annotated[str, Query(min_length=1, max_length=limits.max_query_chars, pattern=r"\S",
                                       description="text query (not blank)")],
               k: K = 10,
               captions: Annotated[bool, Query(description="match the query against indexed captions")] = False,
               rerank: Annotated[int, Query(ge=0, le=max_rerank,
                                            description="re-order the top max(k, rerank) images with the model's "
                                                        "ITM head (0: the dual encoder's order; the maximum is 0 "
                                                        "when the model has no ITM head)")] = 0,
               ) -> SearchResponse:
        """Images matching a text query (or, with captions=true, images whose captions match it)."""
        query = q.strip()
        if captions and searcher.caption_index is None:
            raise HTTPException(400, "captions=true: this index holds no captions (build it from a manifest)")
        if rerank and captions:
            raise HTTPException(400, "rerank applies to image search; it cannot be combined with captions=true")
        hits = (searcher.search_captions(query, k) if captions
                else searcher.search_text(query, k, rerank=rerank, read_image=reread))
        return SearchResponse(mode="captions" if captions else "text", query=query, k=k,
                              results=[_result(h) for h in hits])

    @app.post("/api/search/image", response_model=SearchResponse, responses=_errors(400, 413, 415),
              tags=["search"], max_body_size=limits.max_upload_bytes + MULTIPART_OVERHEAD)
    def search_image(file: Annotated[UploadFile, File(description=f"{'/'.join(UPLOAD_FORMATS)} image, at most "
                                                                  f"{limits.max_upload_bytes:,} bytes")],
                     k: K = 10) -> SearchResponse:
        """Indexed images most similar to an uploaded image."""
        data = file.file.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise HTTPException(413, f"{file.filename}: larger than {limits.max_upload_bytes:,} bytes")
        image = decode_upload(data, file.filename or "upload", limits.max_pixels, limits, slots)
        hits = searcher.search_image(image, k)
        return SearchResponse(mode="image", query=None, k=k, results=[_result(h) for h in hits])

    def reread(path: str) -> Image.Image:
        """A hit's file for re-ranking, decoded as an upload is: reduced to `query_image_pixels`,
        within `max_decode_pixels`, in one of the decode slots (it raises rather than exceed them)."""
        with Image.open(path) as probe:
            box = upload_box(*probe.size, limits.query_image_pixels)
        with slots:
            return decode_reduced(path, box, limits.max_decode_pixels, os.path.basename(path))

    def thumbnail(path: str) -> bytes:
        with slots:
            image = decode_reduced(path, (THUMB_SIZE, THUMB_SIZE), limits.max_decode_pixels, os.path.basename(path))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()

    @app.get("/api/thumb/{item_id}", response_class=Response, tags=["images"],
             responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"}, **_errors(404)})
    def thumb(item_id: Annotated[int, Path(ge=1, le=INT64_MAX, description="item id from a search result")],
              ) -> Response:
        """Thumbnail (at most 256 px) of an indexed image, looked up by id: never by path."""
        path = searcher.path_of(item_id)
        if path is None:
            raise HTTPException(404, f"no indexed image has id {item_id}")
        try:
            st = os.stat(path)
            # mtime and size are part of the key, so a replaced file is never served stale
            data = thumbs.get((path, st.st_mtime_ns, st.st_size), lambda: thumbnail(path))
        except (TooManyPixels, Image.DecompressionBombError):
            raise HTTPException(404, f"image {item_id} has too many pixels to make a thumbnail of") from None
        except (OSError, SyntaxError, ValueError, ImageLoadError):
            raise HTTPException(404, f"the file of image {item_id} is no longer readable") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(index_dir: FilePath | str, host: str = "127.0.0.1", port: int = 8000, checkpoint: str | None = None,
          device: str | None = None, limits: Limits = Limits(), nprobe: int | None = None,
          ef_search: int | None = None, log_level: str = "info", allowed_hosts: Sequence[str] = ()) -> None:
    """Open the index (failing before the socket opens if anything is wrong) and run uvicorn.

    Requests are answered only when their Host header is a loopback name, ``host`` or one of
    ``allowed_hosts`` (``*``: any)."""
    import uvicorn

    hosts = served_hosts(host, allowed_hosts)
    if not is_loopback(host):
        banner = (f"WARNING: serving on {host}:{port}: every indexed image and the search API will be reachable, "
                  f"without authentication, by anyone who can connect to this address. Use --host 127.0.0.1 "
                  f"unless this is intended. Requests are answered only for Host: {', '.join(hosts)} "
                  f"(add the names clients use with --allowed-host).")
        print("\n" + "!" * 80 + f"\n{banner}\n" + "!" * 80 + "\n", file=sys.stderr, flush=True)
        log.warning(banner)
    searcher = Searcher(index_dir, checkpoint=checkpoint, device=device, nprobe=nprobe, ef_search=ef_search)
    if not return_freed_images_to_the_os():
        log.warning("not glibc: memory freed after large image decodes may stay resident")
    log.info("answering requests for Host: %s", ", ".join(hosts))
    uvicorn.run(create_app(searcher, limits, allowed_hosts=hosts), host=host, port=port, log_level=log_level)
