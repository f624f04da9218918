"""Validators and conditional requests of the origin server (RFC 9110 sections 8.8, 13).

Threats covered: a client or CDN resuming a download (``If-Range``) from a copy that no
longer matches the file would splice two different files together; it must get the
whole file instead. Revalidation (``If-None-Match``/``If-Modified-Since``) must never
answer 304 for a file that changed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest
import trio

from swarmota.infra.http_serve import ListenConfig
from swarmota.seeder import OriginApp, serve_origin
from swarmota.seeder.origin import (
    Validators,
    content_type_for,
    if_range_matches,
    is_not_modified,
    validators_for,
)

SHA = "ab" * 32
PAYLOAD_NAME = f"payloads/{SHA}.zst"
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
TIMESTAMP_NAME = "metadata/timestamp.json"
MTIME_S = 1_700_000_000


@dataclass
class Origin:
    app: OriginApp
    url: str
    root: Path
    client: httpx.AsyncClient

    async def get(self, path: str, method: str = "GET", **headers: str) -> httpx.Response:
        return await self.client.request(
            method, f"{self.url}/{path}",
            headers={k.replace("_", "-"): v for k, v in headers.items()})


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[Origin]:
    root = tmp_path / "origin"
    files = {
        PAYLOAD_NAME: PAYLOAD,
        TIMESTAMP_NAME: b'{"signed": "timestamp"}\n',
        f"payloads/{SHA}.zst.torrent": b"d4:infod6:lengthi1eee",
        f"payloads/{'cd' * 32}.bsdz": b"BSDIFF",
        f"payloads/{'ef' * 32}.zpatch": b"ZPATCH",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        os.utime(root / name, ns=(MTIME_S * 10**9 + 123, MTIME_S * 10**9 + 123))
    app = OriginApp(root)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_origin, app, ListenConfig())
        async with httpx.AsyncClient(timeout=10.0) as client:
            yield Origin(app=app, url=url, root=root, client=client)
        nursery.cancel_scope.cancel()


LAST_MODIFIED = formatdate(MTIME_S, usegmt=True)


# --- validators on the wire ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_responses_carry_etag_and_last_modified(origin: Origin, method: str) -> None:
    response = await origin.get(PAYLOAD_NAME, method)
    assert response.status_code == 200
    assert response.headers["etag"] == f'"sha256-{SHA}"'
    assert response.headers["last-modified"] == LAST_MODIFIED
    ranged = await origin.get(PAYLOAD_NAME, range="bytes=0-9")
    assert ranged.status_code == 206
    assert ranged.headers["etag"] == f'"sha256-{SHA}"'
    assert ranged.headers["last-modified"] == LAST_MODIFIED


async def test_metadata_etag_changes_when_the_file_is_replaced(origin: Origin) -> None:
    first = (await origin.get(TIMESTAMP_NAME)).headers["etag"]
    assert first.startswith('"') and first.endswith('"') and not first.startswith('W/')
    assert first == (await origin.get(TIMESTAMP_NAME)).headers["etag"]
    path = origin.root / TIMESTAMP_NAME
    path.write_bytes(b'{"signed": "timestamp 2"}\n')
    second = (await origin.get(TIMESTAMP_NAME)).headers["etag"]
    assert second != first
    # Revalidating with the old tag now gets the new file.
    response = await origin.get(TIMESTAMP_NAME, if_none_match=first)
    assert response.status_code == 200
    assert response.content == b'{"signed": "timestamp 2"}\n'


async def test_content_types(origin: Origin) -> None:
    for name, expected in [
        (PAYLOAD_NAME, "application/octet-stream"),
        (f"payloads/{'cd' * 32}.bsdz", "application/octet-stream"),
        (f"payloads/{'ef' * 32}.zpatch", "application/octet-stream"),
        (f"payloads/{SHA}.zst.torrent", "application/x-bittorrent"),
        (TIMESTAMP_NAME, "application/json"),
    ]:
        response = await origin.get(name)
        assert response.status_code == 200, name
        assert response.headers["content-type"] == expected, name
    torrent = await origin.get(f"payloads/{SHA}.zst.torrent")
    # The torrent is named after the payload, not after its own content.
    assert torrent.headers["etag"] != f'"sha256-{SHA}"'
    assert "immutable" in torrent.headers["cache-control"]


# --- 304 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_if_none_match_gives_304_without_body(origin: Origin, method: str) -> None:
    etag = (await origin.get(PAYLOAD_NAME, "HEAD")).headers["etag"]
    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = await origin.get(PAYLOAD_NAME, method, if_none_match=value)
        assert response.status_code == 304, value
        assert response.content == b""
        assert response.headers["etag"] == etag
        assert "immutable" in response.headers["cache-control"]
    response = await origin.get(PAYLOAD_NAME, method, if_none_match='"other"')
    assert response.status_code == 200
    stats = origin.app.statistics()
    assert stats.responses_304 == 4
    assert stats.bytes_payloads == (len(PAYLOAD) if method == "GET" else 0)


async def test_if_modified_since_gives_304(origin: Origin) -> None:
    response = await origin.get(TIMESTAMP_NAME, if_modified_since=LAST_MODIFIED)
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["cache-control"] == "no-cache"
    later = formatdate(MTIME_S + 3600, usegmt=True)
    assert (await origin.get(TIMESTAMP_NAME, if_modified_since=later)).status_code == 304
    earlier = formatdate(MTIME_S - 1, usegmt=True)
    response = await origin.get(TIMESTAMP_NAME, if_modified_since=earlier)
    assert response.status_code == 200
    assert response.content == b'{"signed": "timestamp"}\n'
    garbage = await origin.get(TIMESTAMP_NAME, if_modified_since="yesterday")
    assert garbage.status_code == 200


async def test_if_none_match_takes_precedence_over_if_modified_since(origin: Origin) -> None:
    # RFC 9110 13.1.3: with If-None-Match present, If-Modified-Since is ignored.
    response = await origin.get(TIMESTAMP_NAME, if_none_match='"other"',
                                if_modified_since=LAST_MODIFIED)
    assert response.status_code == 200


async def test_304_takes_precedence_over_an_unsatisfiable_range(origin: Origin) -> None:
    etag = f'"sha256-{SHA}"'
    response = await origin.get(PAYLOAD_NAME, if_none_match=etag, range="bytes=99999999-")
    assert response.status_code == 304


# --- If-Range ----------------------------------------------------------------------------


async def test_if_range_with_the_current_etag_honours_the_range(origin: Origin) -> None:
    response = await origin.get(PAYLOAD_NAME, range="bytes=10-19", if_range=f'"sha256-{SHA}"')
    assert response.status_code == 206
    assert response.content == PAYLOAD[10:20]
    assert origin.app.statistics().responses_206 == 1


async def test_if_range_with_the_current_date_honours_the_range(origin: Origin) -> None:
    response = await origin.get(PAYLOAD_NAME, range="bytes=10-19", if_range=LAST_MODIFIED)
    assert response.status_code == 206
    assert response.content == PAYLOAD[10:20]


@pytest.mark.parametrize("if_range", [
    f'"sha256-{"00" * 32}"',  # another file's tag
    f'W/"sha256-{SHA}"',  # weak tags never match If-Range (strong comparison)
    formatdate(MTIME_S - 60, usegmt=True),  # an older copy
    formatdate(MTIME_S + 60, usegmt=True),  # not exactly Last-Modified
    "not a validator",
])
async def test_stale_if_range_sends_the_whole_file(origin: Origin, if_range: str) -> None:
    response = await origin.get(PAYLOAD_NAME, range="bytes=10-19", if_range=if_range)
    assert response.status_code == 200
    assert response.content == PAYLOAD
    assert origin.app.statistics().responses_206 == 0


async def test_stale_if_range_on_a_replaced_metadata_file(origin: Origin) -> None:
    old_etag = (await origin.get(TIMESTAMP_NAME, "HEAD")).headers["etag"]
    (origin.root / TIMESTAMP_NAME).write_bytes(b'{"signed": "timestamp 3"}\n')
    response = await origin.get(TIMESTAMP_NAME, range="bytes=0-4", if_range=old_etag)
    assert response.status_code == 200
    assert response.content == b'{"signed": "timestamp 3"}\n'


# --- the pure parts ----------------------------------------------------------------------


def test_validators_for() -> None:
    content_addressed = validators_for(("payloads", f"{SHA}.bsdz"), 10, 5 * 10**9 + 7)
    assert content_addressed == Validators(etag=f'"sha256-{SHA}"', last_modified_s=5)
    target = validators_for(("targets", "releases", "acme", f"{SHA}.1.0.json"), 10, 0)
    assert target.etag == f'"sha256-{SHA}"'
    # Not content-addressed: size, mtime and path all change the tag.
    base = validators_for(("metadata", "timestamp.json"), 10, 10**9)
    assert base.etag != validators_for(("metadata", "timestamp.json"), 11, 10**9).etag
    assert base.etag != validators_for(("metadata", "timestamp.json"), 10, 10**9 + 1).etag
    assert base.etag != validators_for(("metadata", "root.json"), 10, 10**9).etag
    torrent = validators_for(("payloads", f"{SHA}.zst.torrent"), 10, 0)
    assert SHA not in torrent.etag
    assert base.last_modified_header == "Thu, 01 Jan 1970 00:00:01 GMT"


def test_conditional_header_tables() -> None:
    v = Validators(etag='"x"', last_modified_s=1000)
    date = formatdate(1000, usegmt=True)
    assert is_not_modified('"x"', None, v)
    assert is_not_modified(' "a" ,W/"x"', None, v)
    assert is_not_modified("*", None, v)
    assert not is_not_modified('"a"', date, v)
    assert not is_not_modified('"x', None, v)  # malformed: never 304
    assert is_not_modified(None, date, v)
    assert not is_not_modified(None, formatdate(999, usegmt=True), v)
    assert not is_not_modified(None, "garbage", v)
    assert not is_not_modified(None, None, v)
    assert if_range_matches('"x"', v)
    assert not if_range_matches('W/"x"', v)
    assert not if_range_matches('"x", "y"', v)
    assert if_range_matches(date, v)
    assert not if_range_matches(formatdate(1001, usegmt=True), v)
    assert not if_range_matches("", v)


def test_content_type_for() -> None:
    assert content_type_for(("payloads", "a.zst")) == "application/octet-stream"
    assert content_type_for(("payloads", "a.bsdz")) == "application/octet-stream"
    assert content_type_for(("payloads", "a.zpatch")) == "application/octet-stream"
    assert content_type_for(("payloads", "a.zst.torrent")) == "application/x-bittorrent"
    assert content_type_for(("metadata", "1.root.json")) == "application/json"
    assert content_type_for(("other", "noext")) == "application/octet-stream"
