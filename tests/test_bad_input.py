"""Named bad inputs against the HTTP API and the index: each gets its status and a message to act on.

tests/test_api.py already covers the plainer ones (a text file named .jpg, an empty upload, bodies
over the limit by Content-Length, PNG decompression bombs, k=0/-3/1001/"ten", unknown filter values
on similar/search/feed/image search, broken JSON in POST /events, events for unknown products, event
ids re-sent in a second batch); this file adds the rest, without repeating those.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from index import EdgeStore, Record, SchemaMismatchError
from serving.api import MAX_EVENTS_BODY_BYTES, MAX_QUERY_CHARS, ApiSettings, create_app
from serving.uploads import MAX_PIXELS, MAX_UPLOAD_BYTES
from tests.serving_fixtures import API_KEY, local_backend, serving_data_copy, tiny_ids
from tests.test_api import assert_error, assert_recommendation, ok

AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON_AUTH = {**AUTH, "content-type": "application/json"}
MB = 1024 * 1024
SENTINEL = b"SENTINEL-outside-the-catalog-images"  # must never come back in a response


@dataclass
class Served:
    client: TestClient
    app: FastAPI
    recommender: object
    data_dir: Path
    jpeg: bytes  # a real catalog photo (product 101)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    data_dir = serving_data_copy(tmp_path_factory, "bad-input")
    recommender, backend = local_backend(data_dir)
    app = create_app(backend, ApiSettings(api_key=API_KEY))
    catalog = Path(recommender.manifest["catalog"])
    # A file next to the catalog's photos: a traversal that worked would serve it.
    (catalog / "sentinel.jpg").write_bytes(b"\xff\xd8\xff" + SENTINEL)
    client = TestClient(app, raise_server_exceptions=False)  # a 5xx must be a response, not a raise
    yield Served(client, app, recommender, data_dir, (catalog / "images" / "101.jpg").read_bytes())
    client.close()
    recommender.close()


@pytest.fixture(scope="module")
def client(served: Served) -> TestClient:
    return served.client


def _no_file_leaked(response) -> None:
    assert SENTINEL not in response.content and b"root:" not in response.content, response.text[:200]


# ---- photos ---------------------------------------------------------------------------------------------
def _png(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, "PNG")
    return buffer.getvalue()


def _patch(data: bytes, marker: bytes, offset: int, replacement: bytes) -> bytes:
    """`data` with `replacement` written `offset` bytes after the first `marker` (a JPEG segment)."""
    at = data.index(marker) + offset
    return data[:at] + replacement + data[at + len(replacement) :]


CORRUPT = {
    # name -> (bytes from the real JPEG, status, words the message must hold)
    "huffman-table-smashed.jpg": (lambda j: _patch(j, b"\xff\xc4", 4, b"\xff" * 36), 422, "header"),
    "zero-size.jpg": (lambda j: _patch(j, b"\xff\xc0", 5, bytes(4)), 422, "header"),
    "truncated-at-60pct.jpg": (lambda j: j[: len(j) * 6 // 10], 422, "truncated"),
    "no-image-data.jpg": (lambda j: j[: j.index(b"\xff\xda")] + b"\xff\xd9", 422, "corrupt"),
    "truncated-at-50pct.png": (lambda j: _png(j)[: len(_png(j)) // 2], 422, "truncated"),
    "header-crc-broken.png": (lambda j: _png(j)[:40] + bytes(20) + _png(j)[60:], 422, "header"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_and_truncated_photos_are_refused_with_what_to_do(
    client: TestClient, served: Served, name: str
) -> None:
    make, status, words = CORRUPT[name]
    response = client.post("/search/image", files={"image": (name, make(served.jpeg), "image/jpeg")})
    body = assert_error(response, status, "corrupt or truncated")
    assert words in body["detail"] and "re-send" in body["detail"], body
    assert "_io.BytesIO" not in body["detail"]  # no internals (Pillow names its buffer object)


def test_photos_a_decoder_can_recover_are_searched(client: TestClient, served: Served) -> None:
    """A few corrupt bytes inside the image data (libjpeg fills in), or a PNG without its end marker,
    still show the product: searching with them beats refusing a photo the shopper sees fine."""
    middle = len(served.jpeg) // 2
    noisy = served.jpeg[:middle] + b"\xff" * 50 + served.jpeg[middle + 50 :]
    for name, data in (("scan-noise.jpg", noisy), ("no-iend.png", _png(served.jpeg)[:-12])):
        body = ok(client.post("/search/image", params={"k": 3}, files={"image": (name, data, "image/jpeg")}))
        assert_recommendation(body, 3)


def _jpeg_claiming(jpeg: bytes, side: int) -> bytes:
    # The frame header (SOF0) says how big the image is; the data stays that of a 96x128 photo.
    return _patch(jpeg, b"\xff\xc0", 5, side.to_bytes(2, "big") * 2)


def _gif_claiming(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (1, 1)).save(buffer, "GIF")
    data = buffer.getvalue()
    return data[:6] + side.to_bytes(2, "little") * 2 + data[10:]  # the logical screen size


@pytest.mark.parametrize(
    ("name", "make"),
    [("bomb.jpg", lambda j: _jpeg_claiming(j, 65000)), ("bomb.gif", lambda j: _gif_claiming(65535))],
)
def test_decompression_bombs_in_jpeg_and_gif_headers_are_refused(
    client: TestClient, served: Served, name: str, make
) -> None:
    data = make(served.jpeg)
    assert len(data) < 5000  # a few KB on the wire claiming 4 gigapixels
    body = assert_error(client.post("/search/image", files={"image": (name, data, "image/jpeg")}), 413)
    assert "decompression bomb" in body["detail"] and f"{MAX_PIXELS:,} pixels" in body["detail"]


# ---- 50 MB uploads: refused before they are read ------------------------------------------------------
def _asgi_request(
    app: FastAPI, method: str, path: str, headers: dict[str, str], chunks: Iterator[bytes]
) -> tuple[int, dict, int]:
    """Call the ASGI app directly with a body streamed from `chunks`, as a server hands it over.

    Returns (status, JSON body, bytes the app pulled from the stream): how much of the body the app
    read before answering, which a client library cannot tell (it sends everything first)."""
    pulled = 0
    done = False
    messages: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled, done
        chunk = None if done else next(chunks, None)
        if chunk is None:
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled


def _multipart_chunks(total: int, boundary: str = "sgboundary") -> Iterator[bytes]:
    """A multipart photo upload of `total` bytes, 1 MB at a time (never held in memory at once)."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + b"\xff\xd8\xff"
    block = bytes(MB)
    for _ in range(total // MB):
        yield block
    yield f"\r\n--{boundary}--\r\n".encode()


MULTIPART = {"content-type": "multipart/form-data; boundary=sgboundary"}


def test_a_streamed_50_mb_upload_is_cut_off_after_the_limit(served: Served) -> None:
    status, body, pulled = _asgi_request(
        served.app, "POST", "/search/image", MULTIPART, _multipart_chunks(50 * MB)
    )
    assert status == 413 and "limit" in body["detail"], body
    assert pulled <= MAX_UPLOAD_BYTES + 2 * MB, f"read {pulled:,} bytes of a 50 MB upload"


def test_a_declared_50_mb_upload_is_refused_before_any_byte_is_read(served: Served) -> None:
    headers = {**MULTIPART, "content-length": str(50 * MB)}
    status, body, pulled = _asgi_request(
        served.app, "POST", "/search/image", headers, _multipart_chunks(50 * MB)
    )
    assert status == 413 and f"{50 * MB:,} bytes" in body["detail"] and "limit" in body["detail"]
    assert pulled == 0


def test_chunked_event_and_product_bodies_over_their_limit_are_cut_off(served: Served) -> None:
    """Without a Content-Length the limits are counted while the body streams in."""

    def json_chunks(total: int) -> Iterator[bytes]:
        yield b'{"events": [{"event_id": "'
        for _ in range(total // MB):
            yield b"x" * MB
        yield b'"}]}'

    status, body, pulled = _asgi_request(served.app, "POST", "/events", {**JSON_AUTH}, json_chunks(50 * MB))
    assert status == 413 and "limit of 2,097,152 bytes" in body["detail"], body
    assert pulled <= MAX_EVENTS_BODY_BYTES + MB
    status, body, pulled = _asgi_request(
        served.app, "PATCH", "/products/101", {**JSON_AUTH}, json_chunks(5 * MB)
    )
    assert status == 413 and "limit of 16,384 bytes" in body["detail"], body
    assert pulled <= MB + 100


@contextmanager
def _live_server(app: FastAPI) -> Iterator[int]:
    """The app on a real uvicorn server on a free loopback port, in a thread."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_real_server_answers_413_while_a_50_mb_upload_is_still_being_sent(served: Served) -> None:
    """Over a socket: the answer arrives while the client is still sending, long before 50 MB."""
    sent = 0
    with _live_server(served.app) as port, socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=sgboundary\r\n\r\n"
        )
        sock.setblocking(False)
        answer = b""
        for chunk in _multipart_chunks(50 * MB):
            framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
            view = memoryview(framed)
            while view and b"\r\n\r\n" not in answer:
                try:
                    answer += sock.recv(65536)  # the server's answer, as soon as there is one
                except BlockingIOError:
                    pass
                try:
                    n = sock.send(view[: 256 * 1024])
                    sent += n
                    view = view[n:]
                except BlockingIOError:
                    time.sleep(0.002)
                except OSError:  # the server closed the connection after answering
                    view = view[:0]
            if b"\r\n\r\n" in answer:
                break
        sock.settimeout(10)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:  # the rest of the JSON body
            more = sock.recv(65536)
            if not more:
                break
            body += more
    assert head.startswith(b"HTTP/1.1 413"), head
    assert "limit" in json.loads(body)["detail"]
    assert sent < 20 * MB, f"the client sent {sent:,} bytes before the server answered"


# ---- text queries --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "filters"),
    [
        ("red handbag 👜", {"baseColour": ["Red"], "articleType": ["Handbags"]}),
        (
            "🔴 women's handbags under 100",
            {"gender": ["Women"], "articleType": ["Handbags"], "max_price": 100.0},
        ),
        ("\u202ered handbag\u202c", {"baseColour": ["Red"], "articleType": ["Handbags"]}),  # RTL override
        ("red\u200bhandbag", {"baseColour": ["Red"], "articleType": ["Handbags"]}),  # zero-width space
        ("blue תיק watch", {"baseColour": ["Blue"], "articleType": ["Watches"]}),  # Hebrew in between
        (
            "ｒｅｄ ｈａｎｄｂａｇ under １００",
            {"baseColour": ["Red"], "articleType": ["Handbags"], "max_price": 100.0},
        ),
    ],
)
def test_emoji_and_right_to_left_text_in_queries_are_understood(
    client: TestClient, query: str, filters: dict
) -> None:
    body = ok(client.get("/search", params={"q": query, "k": 4}))
    assert_recommendation(body, 4)
    assert body["understood"]["filters"] == filters
    colour, gender = (filters.get(key, [None])[0] for key in ("baseColour", "gender"))
    allowed = set(tiny_ids(colour, filters["articleType"][0], gender))
    assert {item["product_id"] for item in body["items"]} <= allowed


@pytest.mark.parametrize("query", ["حقيبة يد حمراء", "תיק אדום לנשים", "👜👜👜", "مرحبا 👋 שלום"])
def test_queries_without_a_known_word_still_get_k_results(client: TestClient, query: str) -> None:
    body = ok(client.get("/search", params={"q": query, "k": 5}))
    assert_recommendation(body, 5)
    assert body["understood"]["filters"] == {}


def test_an_emoji_shopper_id_works_end_to_end(client: TestClient) -> None:
    user = "🛍️ shopper ✨ مرحبا"
    events = [
        {"event_id": f"emoji-{pid}", "user_id": user, "product_id": pid, "type": "view"}
        for pid in tiny_ids("Green", "Watches")[:3]
    ]
    assert ok(client.post("/events", json={"events": events}, headers=AUTH))["accepted"] == 3
    feed = ok(client.get(f"/users/{user}/feed", params={"k": 4}))
    assert feed["user_id"] == user and feed["personalized"] is True
    assert ok(client.delete(f"/users/{user}", headers=AUTH))["deleted_events"] == 3


def test_a_10000_character_query_is_refused_with_the_limit(client: TestClient) -> None:
    """Refused, not truncated: the part of a question that matters ("... under 50") is often at its
    end, and a silently shortened query would answer another question. The limit is 1,000
    characters (MAX_QUERY_CHARS), counted in characters, not bytes."""
    words = "do you have a red handbag for women "
    response = client.get("/search", params={"q": (words * 300)[:10_000]})
    body = assert_error(response, 422, "query.q")
    assert f"at most {MAX_QUERY_CHARS} characters" in body["detail"][0]
    at_limit = (words * 30)[: MAX_QUERY_CHARS - 9] + " under 90"  # exactly 1,000 characters
    assert len(at_limit) == MAX_QUERY_CHARS
    body = ok(client.get("/search", params={"q": at_limit, "k": 3}))
    assert body["understood"]["filters"]["max_price"] == 90.0  # the end of the question was read
    assert ok(client.get("/search", params={"q": "👜" * MAX_QUERY_CHARS, "k": 2}))["items"]


# ---- k and filters ---------------------------------------------------------------------------------------
K_CASES = [
    (path, name, k, bound)
    for path, name, upper in [
        ("/products/101/similar", "k", 1000),
        ("/search?q=bag", "k", 1000),
        ("/users/u/feed", "k", 1000),
        ("/catalog/popular", "k", 1000),
        ("/products/101/page", "k", 100),
        ("/users/u/events", "limit", 10_000),
    ]
    for k, bound in [
        (0, "greater than or equal to 1"),
        (-1, "greater than or equal to 1"),
        (10**9, f"less than or equal to {upper}"),
    ]
    # already in tests/test_api.py: k=0 on similar/search/feed, limit=0
    if not (
        k == 0
        and (name == "limit" or path.split("?")[0] in ("/products/101/similar", "/search", "/users/u/feed"))
    )
]


@pytest.mark.parametrize(("path", "name", "k", "bound"), K_CASES)
def test_k_of_0_minus_1_and_a_billion_are_refused_with_the_range(
    client: TestClient, path: str, name: str, k: int, bound: str
) -> None:
    body = assert_error(client.get(path, params={name: k}), 422, f"query.{name}")
    assert bound in body["detail"][0]


def test_k_out_of_range_on_image_search(client: TestClient, served: Served) -> None:
    for k, bound in [(-1, "greater than or equal to 1"), (10**9, "less than or equal to 1000")]:
        files = {"image": ("a.jpg", served.jpeg, "image/jpeg")}
        body = assert_error(client.post("/search/image", params={"k": k}, files=files), 422, "query.k")
        assert bound in body["detail"][0]


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"gender": "Robots"}, "unknown gender 'Robots'; known values: Men, Women"),
        ({"baseColour": "red"}, "unknown baseColour 'red'; known values: Blue, Green, Red"),  # exact case
        ({"baseColour": ""}, "unknown baseColour ''"),
        ({"baseColour": ["Red", "Mauve"]}, "unknown baseColour 'Mauve'"),
        ({"articleType": "Handbags\u202e"}, "unknown articleType"),
    ],
)
def test_unknown_filter_values_on_browse_name_the_known_ones(client: TestClient, params, detail) -> None:
    assert_error(client.get("/catalog/popular", params=params), 422, detail)


# ---- JSON bodies -----------------------------------------------------------------------------------------
NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "detail"),
    [
        ("PATCH", "/products/101", b'{"price": ', JSON_AUTH, 400, "JSON decode error"),
        ("PATCH", "/products/101", b'{"price": 5} trailing', JSON_AUTH, 400, "JSON decode error"),
        ("PATCH", "/products/101", NESTED[:16_000], JSON_AUTH, 400, "nested too deeply"),
        ("POST", "/events", NESTED, JSON_AUTH, 400, "nested too deeply"),
        ("POST", "/events", b'{"events": [{"event_id": "\xff\xfe"}]}', JSON_AUTH, 400, "UTF-8"),
        ("POST", "/events", b'{"events": []}', {**AUTH, "content-type": "text/plain"}, 422, "Content-Type"),
        ("POST", "/events", b"null", JSON_AUTH, 422, "body"),
        ("PATCH", "/products/101", b"{}", JSON_AUTH, 422, "price"),
        ("PATCH", "/products/101", b'{"price": 1}' + b" " * 20_000, JSON_AUTH, 413, "16,384"),
    ],
)
def test_malformed_json_bodies_get_a_4xx_that_says_what_to_send(
    client: TestClient, method, path, body: bytes, headers, status, detail
) -> None:
    response = client.request(method, path, content=body, headers=headers)
    assert_error(response, status, detail)
    assert ok(client.get("/products/101"))["price"] != 5  # nothing was applied


# ---- path traversal --------------------------------------------------------------------------------------
TRAVERSALS = [
    ("GET", "/products/..%2F..%2Fetc%2Fpasswd"),
    ("GET", "/products/%2e%2e%2f%2e%2e%2fetc%2fpasswd/image"),
    ("GET", "/products/..%2Fsentinel/image"),
    ("GET", "/products/..%2F..%2Fetc%2Fpasswd/similar"),
    ("GET", "/products/..%2F..%2Fetc%2Fpasswd/page"),
    ("GET", "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd"),
    ("GET", "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd"),
    ("GET", "/users/..%2F..%2Fetc%2Fpasswd/feed"),
    ("GET", "/users/..%2F..%2Fetc%2Fpasswd/events"),
    ("DELETE", "/users/..%2F..%2Fetc%2Fpasswd"),
    ("PATCH", "/products/..%2F..%2Fetc%2Fpasswd"),
]


@pytest.mark.parametrize(("method", "path"), TRAVERSALS)
def test_url_encoded_traversal_in_ids_is_404_and_reads_no_file(client: TestClient, method, path) -> None:
    response = client.request(method, path, headers=AUTH, json={"price": 1} if method == "PATCH" else None)
    assert response.status_code in (404, 422), response.text
    assert_error(response, response.status_code)
    _no_file_leaked(response)


@pytest.mark.parametrize(
    "path",
    [
        "/products/../../etc/passwd",
        "/products/../../etc/passwd/image",
        "/products/../sentinel.jpg",
        "/static/../../../../../../etc/passwd",
        "/static/../../sentinel.jpg",
        "/users/../../etc/passwd/feed",
        "/users/../../etc/passwd/events",
    ],
)
def test_raw_traversal_in_ids_is_404_and_reads_no_file(served: Served, path: str) -> None:
    """Sent as is (a client that does not normalize the path, and uvicorn does not either)."""
    status, body, _ = _asgi_request(served.app, "GET", path, {}, iter(()))
    assert status == 404 and set(body) == {"error", "detail"}, body
    assert "root:" not in json.dumps(body) and SENTINEL.decode() not in json.dumps(body)


@pytest.mark.parametrize(
    ("request_kwargs", "status", "detail"),
    [
        (
            {"method": "GET", "url": "/search", "params": {"q": "bag", "like": "../../etc/passwd"}},
            404,
            "not in the catalog",
        ),
        (
            {"method": "GET", "url": "/products/101/page", "params": {"user_id": "../../etc/passwd"}},
            422,
            "no '/'",
        ),
        ({"method": "GET", "url": "/products/101/page", "params": {"user_id": ".."}}, 422, "not '.' or '..'"),
        (
            {
                "method": "POST",
                "url": "/events",
                "json": {
                    "events": [
                        {"event_id": "t1", "user_id": "../../etc/passwd", "product_id": "101", "type": "view"}
                    ]
                },
            },
            422,
            "cannot be used in /users/{id} URLs",
        ),
        (
            {
                "method": "POST",
                "url": "/events",
                "json": {
                    "events": [
                        {"event_id": "t2", "user_id": "u", "product_id": "../../etc/passwd", "type": "view"}
                    ]
                },
            },
            422,
            "unknown product id(s) ['../../etc/passwd']",
        ),
    ],
)
def test_traversal_in_ids_inside_queries_and_bodies_is_refused(
    client: TestClient, request_kwargs: dict, status: int, detail: str
) -> None:
    response = client.request(headers=AUTH, **request_kwargs)
    assert_error(response, status, detail)
    _no_file_leaked(response)


def test_a_shopper_id_with_a_slash_is_refused_because_it_could_never_be_deleted(client: TestClient) -> None:
    """DELETE /users/{id} cannot address "a/b" (a %2F arrives as a "/"): such an id is not stored."""
    event = {"event_id": "slash-1", "user_id": "shop/42", "product_id": "101", "type": "view"}
    assert_error(client.post("/events", json={"events": [event]}, headers=AUTH), 422, "choose another id")
    assert_error(client.delete("/users/shop%2F42", headers=AUTH), 404)


# ---- events ----------------------------------------------------------------------------------------------
def test_duplicate_event_ids_inside_one_batch_keep_the_first(client: TestClient) -> None:
    batch = [
        {"event_id": "dup-1", "user_id": "dup-user", "product_id": "101", "type": "view"},
        {"event_id": "dup-1", "user_id": "dup-user", "product_id": "102", "type": "cart"},
        {"event_id": "dup-2", "user_id": "dup-user", "product_id": "103", "type": "view"},
    ]
    assert ok(client.post("/events", json={"events": batch}, headers=AUTH)) == {
        "accepted": 2,
        "duplicates": 1,
    }
    stored = ok(client.get("/users/dup-user/events"))["events"]
    assert [(e["event_id"], e["product_id"], e["type"]) for e in stored] == [
        ("dup-2", "103", "view"),
        ("dup-1", "101", "view"),
    ]
    # An id another shopper already used is a duplicate too: events are facts, the first one stands.
    other = {"event_id": "dup-1", "user_id": "other-user", "product_id": "104", "type": "view"}
    assert ok(client.post("/events", json={"events": [other]}, headers=AUTH)) == {
        "accepted": 0,
        "duplicates": 1,
    }
    assert ok(client.get("/users/other-user/events"))["events"] == []


# ---- the index through the Python API ------------------------------------------------------------------
def test_the_index_refuses_vectors_of_the_wrong_dimension(served: Served) -> None:
    index = served.recommender.index
    space = index.spaces["fused"]
    wrong = np.full(space.dim // 2, 1 / np.sqrt(space.dim // 2), dtype=np.float32)  # unit norm, half the dim
    with pytest.raises(SchemaMismatchError) as err:
        index.upsert([Record("101", {"fused": wrong})])
    message = str(err.value)
    assert f"expects dim={space.dim}" in message and f"dim={space.dim // 2} was given" in message
    assert space.encoder in message  # names the encoder the space was built with
    with pytest.raises(SchemaMismatchError, match=f"expects dim={space.dim}"):
        index.search("fused", wrong)
    assert ok(served.client.get("/products/101/similar", params={"k": 2}))["items"]  # nothing changed


def test_the_index_refuses_query_heads_of_another_encoder_version(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Vectors of the collection were built with one version of the alignment heads; heads of another
    version (here: one weight changed) must never embed its queries."""
    import torch

    from encoders.alignment import AlignmentHeads
    from serving.search import ProductSearch, load_heads_for
    from training.vectors import versioned_heads_path

    data_dir = serving_data_copy(tmp_path_factory, "heads-version")
    store = EdgeStore(data_dir / "index")
    try:
        search = ProductSearch(data_dir, store)
        version = search.heads.version
        search.index.check_spaces(search.index.spaces)  # matching spaces: no error
        path = versioned_heads_path(data_dir, version)
        heads = AlignmentHeads.load(path)
        with torch.no_grad():
            next(heads.parameters()).add_(0.01)
        heads.save(path)
        with pytest.raises(SchemaMismatchError) as err:  # what ProductSearch (and the server) load
            load_heads_for(data_dir, search.index.spaces["image"].encoder)
        assert version in str(err.value) and heads.version in str(err.value)
        image = search.index.spaces["image"]
        other = type(image)(image.name, image.dim, image.encoder.rsplit("/", 1)[0] + "/other")
        with pytest.raises(SchemaMismatchError, match="new collection"):
            search.index.check_spaces({"image": other})
    finally:
        store.close()
