"""Search service hardening (issue 13): bounded image decodes (thumbnails and uploads), reduced
JPEG decoding, Host header check, JSON 413s, short 422 bodies, HEAD /, no CDN docs, empty CLI query."""

from __future__ import annotations

import argparse
import io
import platform
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image, JpegImagePlugin, PngImagePlugin
from test_search import TEST_HOSTS, build_tiny, draw, make_images

from unialign.search import app as app_module
from unialign.search.app import Limits, create_app, served_hosts
from unialign.search.build import entries_from_folder
from unialign.search.cli import register
from unialign.search.query import Searcher

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
BIG = (4096, 3072)  # 12.6 Mpixel


def big_jpeg(path: Path, size: tuple[int, int] = BIG) -> Path:
    image = Image.new("RGB", size, (30, 90, 200))
    image.paste(draw("red", size=min(size) // 2), (size[0] // 4, size[1] // 4))
    image.save(path, format="JPEG", quality=80)
    return path


@pytest.fixture(scope="module")
def searcher(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    make_images(root / "imgs", COLOURS)
    big_jpeg(root / "imgs" / "zz_big.jpg")
    build_tiny(tiny_checkpoint, root / "index", entries_from_folder(root / "imgs"))
    s = Searcher(root / "index", device="cpu")
    yield s
    s.close()


def item_id(searcher: Searcher, name: str) -> int:
    for i in range(1, searcher.size + 1):
        path = searcher.path_of(i)
        if path is not None and path.endswith(name):
            return i
    raise KeyError(name)


class DecodeSpy:
    """Wraps app.decode_reduced: counts calls per source, the most running at once, and slows each
    down so that concurrent requests overlap."""

    def __init__(self, delay: float = 0.3) -> None:
        self.real = app_module.decode_reduced
        self.delay = delay
        self.calls: list[str] = []
        self.active = 0
        self.most = 0
        self.lock = threading.Lock()

    def __call__(self, source, *args, **kwargs):
        with self.lock:
            self.calls.append(source if isinstance(source, str) else "<upload>")
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(self.delay)
            return self.real(source, *args, **kwargs)
        finally:
            with self.lock:
                self.active -= 1


def concurrently(fn, n: int) -> list:
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# --- 6: thumbnails ------------------------------------------------------------------------------

def test_concurrent_requests_for_one_thumbnail_decode_it_once(searcher, monkeypatch):
    spy = DecodeSpy()
    monkeypatch.setattr(app_module, "decode_reduced", spy)
    big = item_id(searcher, "zz_big.jpg")
    with TestClient(create_app(searcher, allowed_hosts=TEST_HOSTS)) as client:
        responses = concurrently(lambda i: client.get(f"/api/thumb/{big}"), 6)
    assert [r.status_code for r in responses] == [200] * 6
    assert len({r.content for r in responses}) == 1
    assert len(spy.calls) == 1, spy.calls  # the other five waited and reused the cached thumbnail


def test_thumbnail_decodes_are_bounded(searcher, monkeypatch):
    spy = DecodeSpy()
    monkeypatch.setattr(app_module, "decode_reduced", spy)
    ids = [item_id(searcher, f"{c}_square.png") for c in COLOURS]
    with TestClient(create_app(searcher, Limits(max_concurrent_decodes=2), allowed_hosts=TEST_HOSTS)) as client:
        responses = concurrently(lambda i: client.get(f"/api/thumb/{ids[i]}"), 6)
    assert [r.status_code for r in responses] == [200] * 6
    assert len(spy.calls) == 6 and spy.most == 2, (spy.calls, spy.most)


def test_large_jpeg_thumbnail_is_decoded_reduced(searcher, monkeypatch):
    loaded: list[tuple[int, int]] = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def load(self):
        loaded.append(self.size)  # the size after draft(): what is actually decoded
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    with TestClient(create_app(searcher, allowed_hosts=TEST_HOSTS)) as client:
        r = client.get(f"/api/thumb/{item_id(searcher, 'zz_big.jpg')}")
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (256, 192)
    assert loaded and loaded[0] == (BIG[0] // 8, BIG[1] // 8), loaded  # DCT-scaled to 1/8, not 12.6 Mpixel


def test_thumbnail_pixel_cap(searcher):
    # 512x384 after 1/8 draft scaling fits the cap; the 32x32 PNGs cannot be draft-scaled and do not.
    with TestClient(create_app(searcher, Limits(max_decode_pixels=600), allowed_hosts=TEST_HOSTS)) as client:
        assert client.get(f"/api/thumb/{item_id(searcher, 'zz_big.jpg')}").status_code == 404
    with TestClient(create_app(searcher, Limits(max_decode_pixels=512 * 384), allowed_hosts=TEST_HOSTS)) as client:
        assert client.get(f"/api/thumb/{item_id(searcher, 'zz_big.jpg')}").status_code == 200
        r = client.get(f"/api/thumb/{item_id(searcher, 'red_square.png')}")
        assert r.status_code == 200
    with TestClient(create_app(searcher, Limits(max_decode_pixels=31 * 31), allowed_hosts=TEST_HOSTS)) as client:
        r = client.get(f"/api/thumb/{item_id(searcher, 'red_square.png')}")
        assert r.status_code == 404 and "too many pixels" in r.json()["detail"]


def test_transparent_thumbnail_is_composited_on_white(tiny_checkpoint, tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGBA", (600, 400), (255, 0, 0, 0)).save(tmp_path / "imgs" / "clear.png")
    build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
    s = Searcher(tmp_path / "index", device="cpu")
    try:
        with TestClient(create_app(s, allowed_hosts=TEST_HOSTS)) as client:
            thumb = Image.open(io.BytesIO(client.get("/api/thumb/1").content))
        assert thumb.size == (256, 171) and min(thumb.getpixel((128, 85))) > 245
    finally:
        s.close()


# --- 7: uploads ---------------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_uploaded_image_reaches_the_model_reduced(searcher, monkeypatch, fmt):
    seen: list[tuple[int, int]] = []
    real = searcher.search_image
    monkeypatch.setattr(searcher, "search_image", lambda image, k: seen.append(image.size) or real(image, k))
    data = encode(Image.new("RGB", (3000, 2000), (40, 60, 220)), fmt)
    for limits in (Limits(), Limits(query_image_pixels=64 * 64)):
        with TestClient(create_app(searcher, limits, allowed_hosts=TEST_HOSTS)) as client:
            r = client.post("/api/search/image", files={"file": (f"q.{fmt.lower()}", data, "image/png")})
        assert r.status_code == 200, r.text
        width, height = seen[-1]
        assert width * height <= limits.query_image_pixels and abs(width / height - 1.5) < 0.05, seen
    # a small image is passed on as it is
    with TestClient(create_app(searcher, allowed_hosts=TEST_HOSTS)) as client:
        assert client.post("/api/search/image", files={"file": ("s.png", encode(draw("red"), "PNG"))}).is_success
    assert seen[-1] == (32, 32)


def test_upload_is_never_decoded_above_the_decode_cap(searcher, monkeypatch):
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("decoded above the cap"))
    data = encode(Image.new("RGB", (2000, 1000), (40, 60, 220)), "PNG")  # a PNG cannot be decoded reduced
    with TestClient(create_app(searcher, Limits(max_decode_pixels=1000 * 1000), allowed_hosts=TEST_HOSTS)) as client:
        r = client.post("/api/search/image", files={"file": ("wide.png", data, "image/png")})
    assert r.status_code == 413 and "wide.png: 2000x1000 pixels" in r.json()["detail"], r.text
    assert "more than the 1,000,000 pixels allowed" in r.json()["detail"]


def test_jpeg_upload_is_decoded_with_draft(searcher, monkeypatch):
    loaded: list[tuple[int, int]] = []
    real_load = JpegImagePlugin.JpegImageFile.load
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", lambda self: loaded.append(self.size) or real_load(self))
    data = encode(Image.new("RGB", (4000, 3000), (40, 60, 220)), "JPEG")
    with TestClient(create_app(searcher, allowed_hosts=TEST_HOSTS)) as client:
        assert client.post("/api/search/image", files={"file": ("q.jpg", data, "image/jpeg")}).is_success
    # 1 Mpixel cap -> box 1182x886; the smallest DCT scale still covering it is 1/2 (not 4000x3000)
    assert loaded and loaded[0] == (2000, 1500) and max(w * h for w, h in loaded) == 2000 * 1500, loaded


def test_upload_decodes_are_bounded(searcher, monkeypatch):
    spy = DecodeSpy()
    monkeypatch.setattr(app_module, "decode_reduced", spy)
    data = encode(Image.new("RGB", (1200, 900), (40, 60, 220)), "PNG")
    with TestClient(create_app(searcher, Limits(max_concurrent_decodes=2), allowed_hosts=TEST_HOSTS)) as client:
        responses = concurrently(
            lambda i: client.post("/api/search/image", files={"file": (f"q{i}.png", data, "image/png")}), 6)
    assert [r.status_code for r in responses] == [200] * 6
    assert len(spy.calls) == 6 and spy.most == 2, (spy.calls, spy.most)


FREED_MEMORY_PROBE = '''
import io, threading
from PIL import Image
from unialign.search.images import decode_reduced, return_freed_images_to_the_os

def rss_mib():
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))

assert return_freed_images_to_the_os()
out = io.BytesIO()
Image.new("RGB", (4000, 3000), (30, 90, 200)).save(out, "PNG")
before, slots = rss_mib(), threading.Semaphore(2)

def request():
    for _ in range(3):
        with slots:
            small = decode_reduced(io.BytesIO(out.getvalue()), (1000, 750), 10**9, "probe")
        objects = [bytearray(1000) for _ in range(2000)]  # the small allocations of the rest of a request
        del small, objects

threads = [threading.Thread(target=request) for _ in range(12)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(rss_mib() - before)
'''


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="measures RSS through /proc; the setting is glibc's")
def test_memory_freed_after_decodes_goes_back_to_the_os():
    # Decodes in 12 threads, 2 at a time, of a 12-Mpixel PNG (46 MiB decoded): with glibc's
    # default dynamic mmap threshold the process kept 66-126 MiB more afterwards, 9-13 MiB with it fixed.
    grown = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE], capture_output=True, text=True, check=True)
    assert int(grown.stdout) < 40, grown.stdout


# --- 8: Host header -----------------------------------------------------------------------------

def test_host_header_is_checked(searcher):
    app = create_app(searcher, allowed_hosts=served_hosts("127.0.0.1"))
    with TestClient(app, base_url="http://localhost:8000") as client:
        assert client.get("/api/health").status_code == 200
        for good in ("localhost", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST:8000"):
            assert client.get("/api/health", headers={"host": good}).status_code == 200, good
        for evil in ("evil.example.com", "evil.example.com:8000", "localhost.evil.example.com", "10.0.0.5"):
            r = client.get("/api/thumb/1", headers={"host": evil})
            assert r.status_code == 400 and r.json() == {"detail": "Invalid host header"}, evil
            assert client.get("/", headers={"host": evil}).status_code == 400


def test_create_app_answers_only_loopback_hosts_by_default(searcher):
    with TestClient(create_app(searcher), base_url="http://127.0.0.1:8000") as client:
        for good in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
            assert client.get("/api/health", headers={"host": good}).status_code == 200, good
        for evil in ("evil.example.com", "testserver"):
            r = client.get("/api/health", headers={"host": evil})
            assert r.status_code == 400 and r.json() == {"detail": "Invalid host header"}, evil
    with TestClient(create_app(searcher, allowed_hosts=["*"])) as client:
        assert client.get("/api/health", headers={"host": "evil.example.com"}).status_code == 200


def test_served_hosts():
    assert served_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "::1", "[::1]"]
    assert served_hosts("0.0.0.0", ["photos.lan", "192.168.1.5"]) == [
        "localhost", "127.0.0.1", "::1", "[::1]", "photos.lan", "192.168.1.5"]
    assert "fd00::5" in served_hosts("fd00::5") and "[fd00::5]" in served_hosts("fd00::5")


def test_serve_and_cli_pass_allowed_hosts(monkeypatch):
    apps = []
    released = []
    monkeypatch.setattr(app_module, "return_freed_images_to_the_os", lambda: released.append(1) or True)
    monkeypatch.setattr(app_module, "Searcher", lambda *args, **kwargs: object())
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: apps.append(app))
    app_module.serve("unused", host="0.0.0.0", port=8002, allowed_hosts=["photos.lan"])
    assert released == [1]
    client = TestClient(apps[0], base_url="http://photos.lan:8002")
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/openapi.json", headers={"host": "127.0.0.1:8002"}).status_code == 200
    assert client.get("/openapi.json", headers={"host": "0.0.0.0:8002"}).status_code == 400
    assert client.get("/openapi.json", headers={"host": "evil.example.com"}).status_code == 400

    calls = []
    monkeypatch.setattr(app_module, "serve", lambda *args, **kwargs: calls.append(kwargs["allowed_hosts"]))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for argv, hosts in ([[], []], [["--allowed-host", "a.lan,b.lan", "--allowed-host", "c"], ["a.lan", "b.lan", "c"]]):
        args = parser.parse_args(["serve", "--index", "x", *argv])
        args.func(args)
        assert calls[-1] == hosts


# --- 9: small ones ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher, allowed_hosts=TEST_HOSTS)) as c:
        yield c


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_decompression_bomb_is_413(client):
    r = client.post("/api/search/image", files={"file": ("bomb.png", png_header_only(20_000, 10_000), "image/png")})
    assert r.status_code == 413 and "bomb.png" in r.json()["detail"], r.text
    r = client.post("/api/search/image", files={"file": ("big.png", png_header_only(8_000, 6_000), "image/png")})
    assert r.status_code == 413 and "8000x6000 pixels" in r.json()["detail"], r.text


def test_over_limit_bodies_get_json_413(client):
    body = b"\0" * (10 * 1024 * 1024 + 64 * 1024)  # over the upload route's limit, with a Content-Length
    r = client.post("/api/search/image", files={"file": ("huge.png", body, "image/png")})
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": f"request body larger than {10 * 1024 * 1024 + 16 * 1024:,} bytes"}
    r = client.request("GET", "/api/health", content=b"x" * 100_000)  # over the app-wide 64 KiB
    assert r.status_code == 413 and r.json() == {"detail": "request body larger than 65,536 bytes"}


def test_422_does_not_echo_long_input(client):
    r = client.get("/api/search", params={"q": "x" * 60_000})
    assert r.status_code == 422
    assert len(r.content) < 1000, len(r.content)
    error = r.json()["detail"][0]
    assert error["loc"] == ["query", "q"] and error["input"].startswith("x" * 100) and "60,000" in error["input"]
    r = client.get("/api/search", params={"q": "dog", "k": "many"})  # short inputs are echoed as they are
    assert r.status_code == 422 and r.json()["detail"][0]["input"] == "many"


def test_head_page_and_no_cdn_docs(client):
    head = client.head("/")
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/html") and head.content == b""
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").json()["info"]["title"] == "unialign search"
    page = client.get("/").text
    assert "cdn." not in page and "https://" not in page


@pytest.mark.parametrize("query", ["", "   ", "\t\n"])
def test_cli_rejects_blank_query(query, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["search", query, "--index", "does-not-matter"])
    with pytest.raises(SystemExit) as exit_:
        args.func(args)
    assert exit_.value.code == "unialign search: the text QUERY is empty (give some words, or --image PATH)"
