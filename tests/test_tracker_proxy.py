"""The tracker behind a reverse proxy: peers are handed out at their own addresses, not
the proxy's, and nobody but a trusted proxy can say where a request came from."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import pytest
import trio

from swarmota.tracker.bittorrent import SwarmInfo
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.errors import ConfigError
from swarmota.tracker.protocol import Release
from swarmota.tracker.proxies import TrustedProxies
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore

INFO_HASH = "cd" * 32
ANNOUNCE_HASH = bytes.fromhex(INFO_HASH)[:20]

XFF = b"x-forwarded-for"


def test_forwarding_headers_are_believed_only_from_a_trusted_proxy() -> None:
    proxies = TrustedProxies(["127.0.0.1/32", "10.0.0.0/8"])
    headers = [(XFF, b"203.0.113.7")]
    assert proxies.client_ip("127.0.0.1", headers) == "203.0.113.7"
    assert proxies.client_ip("198.51.100.9", headers) == "198.51.100.9"  # not a proxy
    assert TrustedProxies().client_ip("127.0.0.1", headers) == "127.0.0.1"  # none trusted


def test_a_chain_of_proxies_gives_the_rightmost_address_that_is_not_a_proxy() -> None:
    proxies = TrustedProxies(["127.0.0.1/32", "10.0.0.0/8"])
    # the client wrote a fake first hop; our proxies appended what they saw
    spoofed = [(XFF, b"6.6.6.6, 203.0.113.7, 10.1.2.3")]
    assert proxies.client_ip("127.0.0.1", spoofed) == "203.0.113.7"
    assert proxies.client_ip("127.0.0.1", [(XFF, b"garbage, 10.1.2.3")]) == "127.0.0.1"
    assert proxies.client_ip("127.0.0.1", [(XFF, b"10.1.2.3")]) == "127.0.0.1"


def test_rfc_7239_forwarded_wins_over_x_forwarded_for() -> None:
    proxies = TrustedProxies(["::1/128", "127.0.0.0/8"])
    headers = [(b"forwarded", b'for="[2001:db8::7]:4711";proto=https, for=127.0.0.2'),
               (XFF, b"198.51.100.1")]
    assert proxies.client_ip("::1", headers) == "2001:db8::7"
    assert proxies.client_ip("127.0.0.1", [(b"forwarded", b"for=192.0.2.60:80")]) \
        == "192.0.2.60"


def test_a_trusted_proxy_block_that_does_not_parse_is_refused() -> None:
    with pytest.raises(ConfigError, match="trusted proxy"):
        TrustedProxies(["127.0.0.1/40"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def tracker_behind_nginx(tmp_path: Path, nursery: trio.Nursery
                               ) -> AsyncIterator[tuple[str, str]]:
    """A tracker trusting 127.0.0.1 (the nginx on this host), and a real nginx in front
    of it; ``(url through nginx, url of the tracker itself)``."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    db = tmp_path / "tracker.sqlite"
    with SqliteStore(db) as store:
        base = Release.create("acme-router", "2.0.0", 2)
        register_release(store, Release(base.product, base.version, base.release_counter,
                                        base.target, (SwarmInfo(INFO_HASH, "acme-router",
                                                                "2.0.0", "full"),)),
                         RolloutPlan.everyone(), now=1.0)
    url = await nursery.start(serve_tracker, TrackerConfig(
        db_path=db, trusted_proxies=("127.0.0.1/32",)))
    port = _free_port()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass {url};
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header Host $host;
        }}
    }}
}}
""")
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                             "-g", "daemon off;"], stderr=subprocess.PIPE)
    try:
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    await stream.aclose()
                    break
                except OSError:
                    if proc.poll() is not None:
                        pytest.fail(f"nginx did not start: {proc.stderr.read()!r:.500}")
                    await trio.sleep(0.05)
        yield f"http://127.0.0.1:{port}", url
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(timeout=10)


async def announce(base: str, source_ip: str, port: int,
                   extra_headers: dict[str, str] | None = None) -> list[str]:
    """An announce from ``source_ip``; the IPs of the peers handed out."""
    query = (f"info_hash={quote_from_bytes(ANNOUNCE_HASH)}&peer_id="
             f"{quote_from_bytes(f'-XX0001-{port:012d}'.encode())}&port={port}"
             "&left=100&compact=1")
    transport = httpx.AsyncHTTPTransport(local_address=source_ip)
    async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
        response = await client.get(f"{base}/announce?{query}", headers=extra_headers)
    body = response.content
    assert b"failure reason" not in body, body
    raw = body.split(b"5:peers", 1)[1]
    length, _, rest = raw.partition(b":")
    peers = rest[: int(length)]
    return [socket.inet_ntoa(peers[i:i + 4]) for i in range(0, len(peers), 6)]


async def test_behind_nginx_peers_are_handed_out_at_their_own_addresses(
        tracker_behind_nginx: tuple[str, str]) -> None:
    """Without trusted proxies, every peer was handed out at the proxy's address."""
    through_nginx, direct = tracker_behind_nginx
    assert await announce(through_nginx, "127.0.0.5", 7001) == []
    assert await announce(through_nginx, "127.0.0.6", 7002) == ["127.0.0.5"]
    # a client that is not a trusted proxy cannot pick the address it is handed out at
    await announce(direct, "127.0.0.7", 7003, {"x-forwarded-for": "10.66.66.66"})
    assert sorted(await announce(through_nginx, "127.0.0.8", 7004)) == [
        "127.0.0.5", "127.0.0.6", "127.0.0.7"]
