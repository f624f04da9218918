"""docs/ORIGIN.md's nginx configuration, run as written by a real nginx (Debian's;
.ci/run installs it), in front of a published origin tree: what a server must do
(content types, cache headers, single ranges, no compression, dot-files hidden,
nothing else served) and a device updating through it, over HTTPS (a development CA)
and over the plain-HTTP lab server. It caught a directive Debian 12's nginx 1.22
refuses (``http2 on``) and a lab server that redirected to HTTPS, which devices refuse.

Only paths, addresses and ports are substituted in the documented configuration; a
private main configuration (``nginx -p PREFIX -c nginx.conf``) includes it. Skipped when
nginx is not installed.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from bench.origin_nginx import documented_blocks, main_config, nginx_binary
from swarmota.infra.devca import create_ca, issue_server_cert
from swarmota.peer.agent import update_once
from swarmota.peer.errors import StatusCode
from tests.release_env import ReleaseEnv

NGINX = nginx_binary()
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def nginx(env: ReleaseEnv, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """nginx serving ``env``'s origin with the documented configuration; yields the
    HTTPS URL, the plain-HTTP URL and the CA certificate devices trust."""
    snippet, https_server, lab_server = documented_blocks()
    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    ca = create_ca(tmp_path / "ca")
    cert = issue_server_cert(tmp_path / "ca", tmp_path / "server", ["127.0.0.1"])
    https_port, http_port = free_port(), free_port()
    (prefix / "origin.conf").write_text(
        snippet.replace("/srv/swarmota/REPO/origin", str(env.repo.origin_dir)))
    servers = ""
    for block, port in ((https_server, https_port), (lab_server, http_port)):
        block = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", block)  # no IPv6 needed here
        block = re.sub(r"listen (443|8460)", f"listen 127.0.0.1:{port}", block)
        block = block.replace("/etc/ssl/updates/fullchain.pem", str(cert.cert))
        block = block.replace("/etc/ssl/updates/privkey.pem", str(cert.key))
        servers += block.replace("snippets/swarmota-origin.conf", str(prefix / "origin.conf"))
    (prefix / "nginx.conf").write_text(main_config(prefix, servers, connections=64))
    check = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr  # the documented configuration is valid
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                            stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", http_port), timeout=0.1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                subprocess.run(["sleep", "0.05"], check=True)
        yield f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", ca
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_documented_nginx_serves_what_the_origin_must(
        env: ReleaseEnv, nginx: tuple[str, str, Path]) -> None:
    _https, http, _ca = nginx
    payload = env.m2.full_payload
    data = (env.repo.origin_dir / payload.path).read_bytes()
    (env.repo.origin_dir / "payloads" / ".half-written.zst").write_bytes(b"x")
    async with httpx.AsyncClient(base_url=http) as client:
        timestamp = await client.get("/metadata/timestamp.json")
        assert timestamp.status_code == 200
        assert timestamp.headers["content-type"] == "application/json"
        assert timestamp.headers["cache-control"] == "no-cache"
        numbered = await client.get("/metadata/1.root.json")
        assert "immutable" in numbered.headers["cache-control"]
        ranged = await client.get(f"/{payload.path}", headers={"range": "bytes=100-1123",
                                                         "accept-encoding": "gzip"})
        assert ranged.status_code == 206 and ranged.content == data[100:1124]
        assert "content-encoding" not in ranged.headers, "payload bytes never transformed"
        assert ranged.headers["etag"] and "immutable" in ranged.headers["cache-control"]
        torrent = await client.get(f"/{payload.path}.torrent")
        assert torrent.headers["content-type"] == "application/x-bittorrent"
        for hidden in ("/payloads/.half-written.zst", "/", "/repo.json"):
            assert (await client.get(hidden)).status_code == 404, hidden


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_a_device_updates_through_the_documented_nginx(
        env: ReleaseEnv, nginx: tuple[str, str, Path], scheme: str) -> None:
    https, http, ca = nginx
    dev = env.device(f"dev-{scheme}", mode="direct",
                     origin_url=https if scheme == "https" else http,
                     tls_ca_file=str(ca) if scheme == "https" else None)
    with trio.fail_after(60):
        result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert dev.slot_path(dev.bootctl().committed).read_bytes() == env.v2
