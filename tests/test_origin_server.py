"""The origin server against a real hypercorn on loopback: ranges, errors, traversal.

Threats covered: reading files outside the served directory (``..`` plain and
percent-encoded, absolute paths, NUL, symlinks leaving the root, hidden temp files),
and clients that drop a download half way (the server stops reading the file).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from swarmota.infra.http_serve import ListenConfig
from swarmota.seeder import OriginApp, OriginConfig, OriginStats, serve_origin
from swarmota.seeder.origin import (
    UNSATISFIABLE,
    ByteRange,
    cache_control_for,
    parse_range,
    split_request_path,
)

PAYLOAD_NAME = "payloads/" + "ab" * 32 + ".zst"
PAYLOAD_SIZE = 700 * 1024 + 3  # several 256 KiB blocks, odd tail
TARGET_NAME = "targets/releases/acme/" + "cd" * 32 + ".1.0.json"


@dataclass
class Origin:
    app: OriginApp
    url: str
    root: Path
    files: dict[str, bytes]
    client: httpx.AsyncClient

    async def get(self, path: str, **headers: str) -> httpx.Response:
        return await self.client.get(f"{self.url}/{path}",
                                     headers={k.replace("_", "-"): v
                                              for k, v in headers.items()})


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[Origin]:
    root = tmp_path / "origin"
    rng = random.Random(3)
    files = {
        "metadata/1.root.json": b'{"signed": "root"}\n',
        "metadata/timestamp.json": b'{"signed": "timestamp"}\n',
        "metadata/2.snapshot.json": b'{"signed": "snapshot"}\n',
        "metadata/3.releases-acme.json": b'{"signed": "a product\'s releases"}\n',
        TARGET_NAME: b'{"manifest": 1}\n',
        PAYLOAD_NAME: rng.randbytes(PAYLOAD_SIZE),
        "other/empty.bin": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (tmp_path / "secret.txt").write_bytes(b"outside the root")
    app = OriginApp(root)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_origin, app, ListenConfig("127.0.0.1", 0))
        async with httpx.AsyncClient(timeout=10.0) as client:
            yield Origin(app=app, url=url, root=root, files=files, client=client)
        nursery.cancel_scope.cancel()


async def raw_request(url: str, request_line: str, extra: str = "") -> tuple[int, bytes]:
    """Send a request line verbatim (no client-side path normalisation)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            f"{request_line}\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n".encode(
                "latin-1"))
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# --- full responses ------------------------------------------------------------------------


async def test_full_get_streams_the_whole_file(origin: Origin) -> None:
    response = await origin.get(PAYLOAD_NAME)
    assert response.status_code == 200
    assert response.content == origin.files[PAYLOAD_NAME]
    assert response.headers["content-length"] == str(PAYLOAD_SIZE)
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-type"] == "application/octet-stream"
    assert "immutable" in response.headers["cache-control"]
    assert "content-range" not in response.headers


async def test_json_files_are_served_as_json_with_cache_policy(origin: Origin) -> None:
    response = await origin.get("metadata/timestamp.json")
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-cache"
    for numbered in ("metadata/2.snapshot.json", "metadata/3.releases-acme.json"):
        response = await origin.get(numbered)
        assert "immutable" in response.headers["cache-control"]
    response = await origin.get(TARGET_NAME)
    assert response.headers["content-type"] == "application/json"
    assert response.content == origin.files[TARGET_NAME]


async def test_head_sends_headers_only(origin: Origin) -> None:
    response = await origin.client.head(f"{origin.url}/{PAYLOAD_NAME}")
    assert response.status_code == 200
    assert response.headers["content-length"] == str(PAYLOAD_SIZE)
    assert response.headers["accept-ranges"] == "bytes"
    assert response.content == b""
    # Range is defined for GET only: HEAD ignores it.
    response = await origin.client.head(f"{origin.url}/{PAYLOAD_NAME}",
                                        headers={"range": "bytes=0-9"})
    assert response.status_code == 200
    assert response.headers["content-length"] == str(PAYLOAD_SIZE)
    assert origin.app.statistics().bytes_total == 0


async def test_empty_file(origin: Origin) -> None:
    response = await origin.get("other/empty.bin")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == "0"
    response = await origin.get("other/empty.bin", range="bytes=0-")
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */0"


# --- ranges ------------------------------------------------------------------------------


@pytest.mark.parametrize("header, start, end", [
    ("bytes=0-0", 0, 0),
    ("bytes=100-199", 100, 199),
    ("bytes=262100-524300", 262100, 524300),  # spans block boundaries
    ("bytes=500000-", 500000, PAYLOAD_SIZE - 1),
    ("bytes=-1000", PAYLOAD_SIZE - 1000, PAYLOAD_SIZE - 1),
    ("bytes=-99999999", 0, PAYLOAD_SIZE - 1),  # longer suffix than the file: all of it
    ("bytes=700000-99999999", 700000, PAYLOAD_SIZE - 1),  # past the end: clamped
    (f"bytes={PAYLOAD_SIZE - 1}-{PAYLOAD_SIZE - 1}", PAYLOAD_SIZE - 1, PAYLOAD_SIZE - 1),
    ("BYTES=5-9", 5, 9),
])
async def test_single_range_gives_206_with_content_range(origin: Origin, header: str,
                                                         start: int, end: int) -> None:
    response = await origin.get(PAYLOAD_NAME, range=header)
    assert response.status_code == 206
    assert response.content == origin.files[PAYLOAD_NAME][start:end + 1]
    assert response.headers["content-range"] == f"bytes {start}-{end}/{PAYLOAD_SIZE}"
    assert response.headers["content-length"] == str(end - start + 1)
    assert origin.app.statistics().bytes_payloads == end - start + 1


@pytest.mark.parametrize("header", [f"bytes={PAYLOAD_SIZE}-", f"bytes={PAYLOAD_SIZE}-"
                                    f"{PAYLOAD_SIZE + 10}", "bytes=-0"])
async def test_unsatisfiable_range_gives_416(origin: Origin, header: str) -> None:
    response = await origin.get(PAYLOAD_NAME, range=header)
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{PAYLOAD_SIZE}"
    assert origin.app.statistics().bytes_total == 0


@pytest.mark.parametrize("header", [
    "bytes=abc", "bytes=5-2", "items=0-1", "bytes=-", "bytes 0-1", "bytes=0-1x",
    "bytes=0-1,5-6",  # several ranges: we only do one, so the whole file
    "bytes=0-1, 5-6", "", "bytes=--1",
])
async def test_malformed_or_multi_range_is_ignored(origin: Origin, header: str) -> None:
    response = await origin.get(PAYLOAD_NAME, range=header)
    assert response.status_code == 200
    assert response.content == origin.files[PAYLOAD_NAME]


async def test_if_range_with_another_etag_sends_the_whole_file(origin: Origin) -> None:
    # A validator that is not ours: the client's partial copy is stale (RFC 9110 13.1.5).
    response = await origin.get(PAYLOAD_NAME, range="bytes=0-9", if_range='"x"')
    assert response.status_code == 200
    assert len(response.content) == PAYLOAD_SIZE


def test_parse_range_table() -> None:
    assert parse_range("bytes=0-9", 100) == ByteRange(0, 9)
    assert parse_range(" bytes=90- ", 100) == ByteRange(90, 99)
    assert parse_range("bytes=-10", 100) == ByteRange(90, 99)
    assert parse_range("bytes=50-500", 100) == ByteRange(50, 99)
    assert parse_range("bytes=100-", 100) == UNSATISFIABLE
    assert parse_range("bytes=-0", 100) == UNSATISFIABLE
    assert parse_range("bytes=-5", 0) is None
    assert parse_range("bytes=9-0", 100) is None
    assert parse_range("bytes=0-1,2-3", 100) is None
    assert ByteRange(5, 9).length == 5


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["metadata/404.root.json", "nothing", "metadata",
                                  "metadata/", ""])
async def test_missing_files_and_directories_give_404(origin: Origin, path: str) -> None:
    response = await origin.get(path)
    assert response.status_code == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_give_405_with_allow(origin: Origin, method: str) -> None:
    response = await origin.client.request(method, f"{origin.url}/{PAYLOAD_NAME}")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("target", [
    "/../secret.txt",
    "/metadata/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/metadata/%2e%2e/%2e%2e/secret.txt",
    "/metadata%2f..%2f..%2fsecret.txt",
    "//etc/passwd",
    "/%2Fetc%2Fpasswd",
    "/etc/passwd",
    "/metadata/timestamp.json%00",
    "/metadata/..%5c..%5csecret.txt",
    "/./metadata/timestamp.json",
    "/metadata/./timestamp.json",
])
async def test_path_traversal_is_impossible(origin: Origin, target: str) -> None:
    status, body = await raw_request(origin.url, f"GET {target} HTTP/1.1")
    assert status in (400, 404)
    assert b"outside the root" not in body
    assert b"root:" not in body
    assert origin.app.statistics().bytes_total == 0


async def test_raw_requests_reach_files_that_exist(origin: Origin) -> None:
    # Positive control for the traversal test: the raw client does reach real files.
    status, body = await raw_request(origin.url, "GET /metadata/timestamp.json HTTP/1.1")
    assert (status, body) == (200, origin.files["metadata/timestamp.json"])
    status, body = await raw_request(origin.url, "GET /metadata/%74imestamp.json HTTP/1.1")
    assert (status, body) == (200, origin.files["metadata/timestamp.json"])


async def test_symlinks_leaving_the_root_are_refused(origin: Origin, tmp_path: Path) -> None:
    (origin.root / "metadata" / "escape.json").symlink_to(tmp_path / "secret.txt")
    (origin.root / "escape-dir").symlink_to(tmp_path)
    (origin.root / "metadata" / "alias.json").symlink_to(origin.root / "metadata" /
                                                          "1.root.json")
    assert (await origin.get("metadata/escape.json")).status_code == 404
    assert (await origin.get("escape-dir/secret.txt")).status_code == 404
    inside = await origin.get("metadata/alias.json")  # a symlink inside the root is fine
    assert inside.status_code == 200
    assert inside.content == origin.files["metadata/1.root.json"]


async def test_hidden_and_temporary_files_are_not_served(origin: Origin) -> None:
    (origin.root / "payloads" / ".incoming-x.tmp").write_bytes(b"half written")
    assert (await origin.get("payloads/.incoming-x.tmp")).status_code == 404


def test_split_request_path_table() -> None:
    assert split_request_path("/metadata/1.root.json") == ("metadata", "1.root.json")
    for bad in ["", "metadata/x", "/", "//x", "/a//b", "/a/", "/../x", "/a/..", "/.x",
                "/a\x00b", "/a\\b", "/x" * 20]:
        assert split_request_path(bad) is None, bad
    assert cache_control_for(("metadata", "root.json")) == "no-cache"
    assert cache_control_for(("metadata", "12.targets.json")) is not None
    assert cache_control_for(("other", "x")) is None


# --- statistics and streaming --------------------------------------------------------------


async def test_statistics_count_body_bytes_per_category(origin: Origin) -> None:
    await origin.get("metadata/timestamp.json")
    await origin.get("metadata/1.root.json")
    await origin.get(TARGET_NAME)
    await origin.get(PAYLOAD_NAME)
    await origin.get(PAYLOAD_NAME, range="bytes=0-99")
    await origin.get("other/empty.bin")
    await origin.get("missing")
    await origin.client.head(f"{origin.url}/{PAYLOAD_NAME}")
    metadata = len(origin.files["metadata/timestamp.json"]) + len(
        origin.files["metadata/1.root.json"])
    assert origin.app.statistics() == OriginStats(
        requests=8,
        bytes_total=metadata + len(origin.files[TARGET_NAME]) + PAYLOAD_SIZE + 100,
        bytes_metadata=metadata,
        bytes_targets=len(origin.files[TARGET_NAME]),
        bytes_payloads=PAYLOAD_SIZE + 100,
        responses_206=1,
    )


async def test_many_parallel_range_requests(origin: Origin) -> None:
    data = origin.files[PAYLOAD_NAME]
    results: dict[int, bytes] = {}

    async def fetch(index: int) -> None:
        start = index * 16384
        response = await origin.get(PAYLOAD_NAME, range=f"bytes={start}-{start + 16383}")
        assert response.status_code == 206
        results[index] = response.content

    async with trio.open_nursery() as nursery:
        for index in range(PAYLOAD_SIZE // 16384):
            nursery.start_soon(fetch, index)
    assert b"".join(results[i] for i in sorted(results)) == data[:len(results) * 16384]


async def test_client_that_disconnects_stops_the_stream(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    (root / "payloads").mkdir(parents=True)
    size = 64 * 1024 * 1024
    with open(root / "payloads" / "big.zst", "wb") as fh:
        fh.truncate(size)  # sparse: cheap to create
    app = OriginApp(root, OriginConfig(block_size_bytes=64 * 1024))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_origin, app, ListenConfig("127.0.0.1", 0))
        host, port = url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET /payloads/big.zst HTTP/1.1\r\nHost: x\r\n\r\n")
        received = 0
        while received < 1024 * 1024:
            received += len(await stream.receive_some(65536))
        await stream.aclose()
        # Wait until the server has noticed and stopped sending.
        last = -1
        with trio.fail_after(5):
            while (sent := app.statistics().bytes_payloads) != last:
                last = sent
                await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert app.statistics().bytes_payloads < size // 2


def test_origin_app_refuses_a_missing_root(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        OriginApp(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        OriginApp(tmp_path / "file")


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        OriginConfig(block_size_bytes=0)
