"""Search service: API behaviour, limits, path traversal, and schemathesis against the OpenAPI spec."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import schemathesis
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_search import TEST_HOSTS, build_tiny, draw, make_images, make_manifest

from unialign.search.app import Limits, create_app, is_loopback
from unialign.search.build import entries_from_folder, entries_from_manifest
from unialign.search.query import Searcher

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def searcher(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    build_tiny(tiny_checkpoint, root / "index", entries_from_manifest(make_manifest(root, COLOURS)))
    s = Searcher(root / "index", device="cpu")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher, allowed_hosts=TEST_HOSTS)) as c:
        yield c


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_health_and_page(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["items"] == 6 and health["captions"] == 12
    assert health["image_index"] == "Flat (exact)" and health["max_upload_bytes"] == 10 * 1024 * 1024
    assert health["query_bank"] == 0  # built without one
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<label for="q"' in page.text and 'role="search"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert client.get("/static/app.js").status_code == 200


def test_page_explains_the_score_and_the_index_type(client):
    legend = client.get("/").text.split('<details id="legend"', 1)[1].split("</details>", 1)[0]
    for words in ("cosine similarity", "L2-normalised", "from −1 to 1", "higher means closer", "within a query",
                  "Flat (exact)", "every indexed image is compared", "approximate"):
        assert words in " ".join(legend.split()), words
    assert 'score.title = "cosine similarity' in client.get("/static/app.js").text


def test_long_query_echo_wraps(client):
    css = " ".join(client.get("/static/style.css").text.split())
    rule = next(r for r in css.split("}") if "#status," in r)
    assert "overflow-wrap: anywhere" in rule and "#error" in rule


def test_text_search_and_thumbnails(client):
    r = client.get("/api/search", params={"q": "  a red square ", "k": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["mode"] == "text" and body["query"] == "a red square" and body["k"] == 4
    results = body["results"]
    assert [x["rank"] for x in results] == [1, 2, 3, 4]
    assert [x["score"] for x in results] == sorted((x["score"] for x in results), reverse=True)
    assert all(x["name"].endswith("_square.png") and "/" not in x["name"] for x in results)  # no server paths
    thumb = client.get(results[0]["thumb_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256


def test_caption_search(client):
    results = client.get("/api/search", params={"q": "the green box in the middle", "captions": "true"}).json()
    top = results["results"][0]
    assert results["mode"] == "captions" and top["name"] == "green_square.png"
    assert top["caption"] == "the green box in the middle" and top["score"] == pytest.approx(1.0, abs=1e-4)


def test_caption_search_without_captions_is_400(tiny_checkpoint, tmp_path):
    make_images(tmp_path / "imgs", ["red", "blue"])
    build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
    s = Searcher(tmp_path / "index", device="cpu")
    try:
        with TestClient(create_app(s, allowed_hosts=TEST_HOSTS)) as c:
            r = c.get("/api/search", params={"q": "red", "captions": "true"})
            assert r.status_code == 400 and "holds no captions" in r.json()["detail"]
            assert c.get("/api/health").json()["caption_index"] is None
    finally:
        s.close()


def test_image_upload_finds_the_same_image(client):
    r = client.post("/api/search/image", params={"k": 3},
                    files={"file": ("query.png", png(draw("blue")), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "image" and body["query"] is None
    assert body["results"][0]["name"] == "blue_square.png"
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    jpeg = io.BytesIO()
    draw("red").save(jpeg, format="JPEG", quality=95)
    r = client.post("/api/search/image", files={"file": ("q.jpg", jpeg.getvalue(), "image/jpeg")})
    assert r.json()["results"][0]["name"] == "red_square.png"


@pytest.mark.parametrize("name, data, status, words", [
    ("notes.txt", b"hello, I am text", 415, "not an image in an accepted format"),
    ("fake.png", b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "accepted format"),
    ("empty.png", b"", 400, "empty"),
    ("cut.png", None, 400, "cannot decode"),
    ("doc.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "accepted format"),
])
def test_upload_rejects_non_images(client, name, data, status, words):
    if data is None:  # a real PNG header with the pixel data cut off
        data = png(draw("red", size=64))[:60]
    r = client.post("/api/search/image", files={"file": (name, data, "image/png")})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"] and name in r.json()["detail"]


def test_upload_size_and_pixel_limits(client, searcher):
    too_big = b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * 1024 * 1024 - 7)  # one byte over 10 MiB
    r = client.post("/api/search/image", files={"file": ("huge.png", too_big, "image/png")})
    assert r.status_code == 413 and r.json()["detail"] == "huge.png: larger than 10,485,760 bytes"
    assert client.post("/api/search/image", files={"file": ("ok.png", png(draw("red")), "image/png")}).is_success
    with TestClient(create_app(searcher, Limits(max_pixels=31 * 31), allowed_hosts=TEST_HOSTS)) as small:
        r = small.post("/api/search/image", files={"file": ("big.png", png(draw("red", size=32)), "image/png")})
        assert r.status_code == 413 and "32x32 pixels" in r.json()["detail"]
    r = client.post("/api/search/image", content=b"x" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code in (413, 422)


def test_oversize_body_without_content_length_is_refused(client):
    """A chunked upload (no Content-Length to check up front) is cut off by the running byte count."""
    head = (b'--bound\r\nContent-Disposition: form-data; name="file"; filename="stream.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")

    def body():
        yield head
        for _ in range(12):  # 12 MiB
            yield b"\0" * (1 << 20)
        yield b"\r\n--bound--\r\n"

    r = client.post("/api/search/image", content=body(), headers={"content-type": "multipart/form-data; boundary=bound"})
    assert r.status_code == 413 and r.json()["detail"]


@pytest.mark.parametrize("params", [
    {"q": "x" * 513}, {"q": ""}, {"q": "   "}, {"q": "dog", "k": 0}, {"q": "dog", "k": 101}, {"q": "dog", "k": "many"},
    {},
])
def test_query_validation(client, params):
    r = client.get("/api/search", params=params)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]


def test_longest_allowed_query(client):
    assert client.get("/api/search", params={"q": "red " * 128, "k": 100}).status_code == 200


def test_binding_beyond_loopback_warns_loudly(monkeypatch, capsys):
    from unialign.search import app as app_module

    served = []
    monkeypatch.setattr(app_module, "Searcher", lambda *args, **kwargs: object())
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: served.append((host, port)))
    app_module.serve("unused", host="127.0.0.1", port=8001)
    assert capsys.readouterr().err == ""
    app_module.serve("unused", host="0.0.0.0", port=8002)
    assert "WARNING: serving on 0.0.0.0:8002" in capsys.readouterr().err
    assert served == [("127.0.0.1", 8001), ("0.0.0.0", 8002)]
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "192.168.1.5", "example.com")] == [
        True, True, True, False, False, False]


@pytest.mark.parametrize("url", [
    "/api/thumb/../../../../etc/passwd",
    "/api/thumb/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/thumb/%2Fetc%2Fpasswd",
    "/api/thumb/1%2F..%2F..%2Fapp.py",
    "/static/../app.py",
    "/static/%2e%2e/app.py",
    "/static/..%2Fapp.py",
    "/static/%2e%2e%2f%2e%2e%2fstore.py",
    "/static//etc/passwd",
])
def test_path_traversal_is_refused(client, url):
    r = client.get(url)
    assert r.status_code in (404, 422), (url, r.status_code)
    assert b"root:" not in r.content and b"def create_app" not in r.content and b"import" not in r.content


def test_thumbnails_only_by_known_id(client, searcher, tmp_path):
    assert client.get("/api/thumb/999999").status_code == 404
    assert "no indexed image" in client.get("/api/thumb/999999").json()["detail"]
    assert client.get("/api/thumb/0").status_code == 422
    assert client.get("/api/thumb/-1").status_code == 422
    assert client.get(f"/api/thumb/{2 ** 63}").status_code == 422
    # An indexed file that disappeared is a 404, not a 500.
    item = searcher.store.items([1])[1]
    moved = tmp_path / "moved.png"
    Path(item.path).rename(moved)
    try:
        r = client.get("/api/thumb/1")
        assert r.status_code == 404 and "no longer readable" in r.json()["detail"]
    finally:
        moved.rename(item.path)
    assert client.get("/api/thumb/1").status_code == 200


def _conformance_test(operation: schemathesis.APIOperation, calls: dict[str, int]):
    # Random bytes satisfy `format: binary` but are not an image: for the upload the documented
    # 415 is the right answer, so "schema-valid data must be accepted" does not apply there
    # (real images are accepted: test_image_upload_finds_the_same_image).
    excluded = [positive_data_acceptance] if operation.path == "/api/search/image" else []

    @given(case=operation.as_strategy())
    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(excluded_checks=excluded)
        calls[operation.label] = calls.get(operation.label, 0) + 1

    return check


def test_openapi_conformance(searcher):
    """schemathesis, in-process: for every operation, 20 generated requests (valid and invalid)
    get no 5xx, a documented status code and content type, and a body valid against the spec."""
    spec = schemathesis.openapi.from_asgi("/openapi.json", create_app(searcher, allowed_hosts=TEST_HOSTS))
    operations = [result.ok() for result in spec.get_all_operations()]
    assert {op.label for op in operations} == {
        "GET /api/health", "GET /api/search", "POST /api/search/image", "GET /api/thumb/{item_id}"}
    calls: dict[str, int] = {}
    for operation in operations:
        _conformance_test(operation, calls)()
    assert len(calls) == 4 and sum(calls.values()) >= 40, calls
