"""`unialign serve`: a FastAPI app (JSON API + OpenAPI spec + a static search page) over a Searcher.

The server only ever opens files that are in the index, looked up by item id in SQLite; no
request parameter is ever used as a path. Uploads are capped in bytes and pixels and must
decode as one of a few raster formats, so a client cannot make the server hold a huge body,
decode a decompression bomb or run a risky PIL plugin (EPS, for one, shells out to Ghostscript).
"""

import functools
import io
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path as FilePath
from typing import Annotated, Literal

from fastapi import FastAPI, File, HTTPException, Path, Query, UploadFile
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..data.images import ImageLoadError, load_image
from .query import Hit, Searcher

log = logging.getLogger(__name__)

UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
MULTIPART_OVERHEAD = 16 * 1024  # boundaries and part headers around the uploaded file
THUMB_SIZE = 256
INT64_MAX = (1 << 63) - 1  # SQLite integers; a larger id would overflow the lookup


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_query_chars: int = 512
    max_k: int = 100


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
    max_upload_bytes: int
    max_query_chars: int
    max_k: int


class ErrorBody(BaseModel):
    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, object]]:
    return {code: {"model": ErrorBody} for code in codes}


class SecurityHeaders:
    """Headers on every response: no MIME sniffing, no referrer leaks, and a CSP that allows
    only the page's own files (the page has no inline script)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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


def decode_upload(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """RGB image from uploaded bytes, or an HTTPException saying what is wrong with them."""
    label = (name or "upload")[:200]
    if not data:
        raise HTTPException(400, f"{label}: the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as probe:
            width, height = probe.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise HTTPException(415, f"{label}: not an image in an accepted format ({', '.join(UPLOAD_FORMATS)})") from None
    if width * height > max_pixels:
        raise HTTPException(413, f"{label}: {width}x{height} pixels is more than the {max_pixels:,} allowed")
    try:
        return load_image(data, name=label)
    except ImageLoadError as err:
        raise HTTPException(400, str(err)) from None


def _result(hit: Hit) -> Result:
    return Result(rank=hit.rank, id=hit.id, score=hit.score, name=os.path.basename(hit.path), caption=hit.caption,
                  thumb_url=f"/api/thumb/{hit.id}")


def create_app(searcher: Searcher, limits: Limits = Limits()) -> FastAPI:
    """The API and page over an opened ``searcher`` (tests pass their own; `serve` builds one)."""
    app = FastAPI(title="unialign search", version="1",
                  description="Text-to-image, image-to-image and caption search over a unialign index.",
                  max_body_size=64 * 1024)  # GET endpoints take no body; the upload route raises this
    app.add_middleware(SecurityHeaders)
    static = resources.files("unialign.search") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    K = Annotated[int, Query(ge=1, le=limits.max_k, description="number of results")]

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    @app.get("/api/health", response_model=Health, tags=["service"])
    def health() -> Health:
        counts = searcher.store.counts()
        return Health(status="ok", items=searcher.size, captions=counts["captions"],
                      image_index=searcher.image_params.describe(),
                      caption_index=searcher.caption_params.describe() if searcher.caption_params else None,
                      dim=searcher.model.width, max_upload_bytes=limits.max_upload_bytes,
                      max_query_chars=limits.max_query_chars, max_k=limits.max_k)

    @app.get("/api/search", response_model=SearchResponse, responses=_errors(400), tags=["search"])
    def search(q: Annotated[str, Query(min_length=1, max_length=limits.max_query_chars, pattern=r"\S",
                                       description="text query (not blank)")],
               k: K = 10,
               captions: Annotated[bool, Query(description="match the query against indexed captions")] = False,
               ) -> SearchResponse:
        """Images matching a text query (or, with captions=true, images whose captions match it)."""
        query = q.strip()
        if captions and searcher.caption_index is None:
            raise HTTPException(400, "captions=true: this index holds no captions (build it from a manifest)")
        hits = searcher.search_captions(query, k) if captions else searcher.search_text(query, k)
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
        image = decode_upload(data, file.filename or "upload", limits.max_pixels)
        hits = searcher.search_image(image, k)
        return SearchResponse(mode="image", query=None, k=k, results=[_result(h) for h in hits])

    @functools.lru_cache(maxsize=2048)
    def thumbnail(path: str, mtime_ns: int, size: int) -> bytes:
        # mtime and size are part of the key, so a replaced file is never served stale
        image = load_image(path)
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
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
            data = thumbnail(path, st.st_mtime_ns, st.st_size)
        except (OSError, ImageLoadError):
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
          ef_search: int | None = None, log_level: str = "info") -> None:
    """Open the index (failing before the socket opens if anything is wrong) and run uvicorn."""
    import uvicorn

    if not is_loopback(host):
        banner = (f"WARNING: serving on {host}:{port}: every indexed image and the search API will be reachable, "
                  f"without authentication, by anyone who can connect to this address. Use --host 127.0.0.1 "
                  f"unless this is intended.")
        print("\n" + "!" * 80 + f"\n{banner}\n" + "!" * 80 + "\n", file=sys.stderr, flush=True)
        log.warning(banner)
    searcher = Searcher(index_dir, checkpoint=checkpoint, device=device, nprobe=nprobe, ef_search=ef_search)
    uvicorn.run(create_app(searcher, limits), host=host, port=port, log_level=log_level)
