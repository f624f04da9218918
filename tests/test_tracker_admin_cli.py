"""The control plane end to end: the real tracker on loopback, driven by the real CLI
(``swarmota tracker admin ...`` over httpx) and by devices checking in."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import httpx
import pytest
import trio

from infra.http_serve import ListenConfig
from manifest import MIN_CHUNK_SIZE_BYTES, ImageInfo, Payload, ReleaseManifest, sha256_hex
from tests.tracker_cli import run_cli
from tracker.config import TrackerConfig
from tracker.server import serve_tracker
from tracker.sqlite_store import SqliteStore

PRODUCT = "acme-router"


def manifest_file(tmp_path: Path) -> Path:
    data = b"\x5a" * MIN_CHUNK_SIZE_BYTES
    manifest = ReleaseManifest(
        product=PRODUCT, version="2.0.0", release_counter=2,
        compatibility=("acme-router-hw1",), update_type="image",
        image=ImageInfo(size=len(data), sha256=sha256_hex(data)),
        payloads=(Payload(kind="full", encoding="zstd", size=len(data),
                          sha256=sha256_hex(data), chunk_size=MIN_CHUNK_SIZE_BYTES,
                          chunks=(sha256_hex(data),)),))
    path = tmp_path / "release.json"
    path.write_bytes(manifest.to_bytes())
    return path


async def test_operators_steer_a_rollout_through_the_cli_and_devices_follow(
        tmp_path: Path, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "tracker.db"
    config = TrackerConfig(db_path=db, listen=ListenConfig(host="127.0.0.1", port=0))
    url = await nursery.start(functools.partial(serve_tracker, config))

    assert run_cli("release", "add", "--db", str(db), "--rollout", "none",
                   str(manifest_file(tmp_path))) == 0
    assert "offered to nobody" in capsys.readouterr().out
    tokens = {}
    for role in ("viewer", "operator", "admin"):
        assert run_cli("admin", "token", "create", "--db", str(db), "--role", role,
                       "--name", f"{role}-1") == 0
        tokens[role] = capsys.readouterr().out.strip()
        assert tokens[role].startswith("sot_")
    with SqliteStore(db) as store:  # only the hash is stored
        assert all(tokens[r] not in json.dumps([e.detail for e in store.audit()])
                   for r in tokens)

    async def admin(role: str | None, *argv: str) -> tuple[int, str, str]:
        token = ["--token", tokens[role]] if role else []
        rc = await trio.to_thread.run_sync(
            lambda: run_cli("admin", "--url", url, *token, *argv))
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, _ = await admin("operator", "rollout", "create", PRODUCT, "2.0.0",
                             "--canary", "dev-1", "--soak-s", "0")
    assert rc == 0 and json.loads(out)["stage"] == "canary"

    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        async def offered(device: str) -> bool:
            answer = (await client.post("/v1/checkin", json={
                "device_id": device, "product": PRODUCT, "hardware_id": "acme-router-hw1",
                "version": "1.0.0", "release_counter": 1})).json()
            return answer["release"] is not None

        assert await offered("dev-1") and not await offered("dev-2")

        rc, _, err = await admin("viewer", "rollout", "pause", PRODUCT, "2.0.0")
        assert rc == 1 and "HTTP 403" in err
        rc, _, err = await admin(None, "rollout", "pause", PRODUCT, "2.0.0")
        assert rc == 2 and "no token" in err
        rc, out, _ = await admin("operator", "rollout", "pause", PRODUCT, "2.0.0")
        assert rc == 0 and json.loads(out)["phase"] == "paused"
        rc, _, err = await admin("operator", "rollout", "revoke", PRODUCT, "2.0.0")
        assert rc == 1 and "HTTP 403" in err
        rc, _, err = await admin("operator", "rollout", "pause", PRODUCT, "2.0.0")
        assert rc == 1 and "HTTP 409" in err
        rc, out, _ = await admin("operator", "rollout", "force", PRODUCT, "2.0.0")
        assert rc == 0 and json.loads(out)["phase"] == "forced"
        assert await offered("dev-2")  # emergency: every device now

        rc, out, _ = await admin("viewer", "rollout", "show", PRODUCT, "2.0.0")
        shown = json.loads(out)
        assert shown["totals"]["offered"] == 2 and shown["stage"] == "100%"
        rc, out, _ = await admin("viewer", "releases")
        assert json.loads(out)["releases"][0]["phase"] == "forced"
        rc, out, _ = await admin("viewer", "fleet")
        assert json.loads(out)["devices"] == 2
        rc, out, _ = await admin("admin", "audit")
        entries = json.loads(out)["audit"]
        assert [(e["action"], e["outcome"]) for e in entries if e["actor"] != "cli"] == [
            ("rollout.create", "ok"), ("POST /v1/admin/rollouts/acme-router/2.0.0/pause",
                                       "refused"),
            ("rollout.pause", "ok"), ("POST /v1/admin/rollouts/acme-router/2.0.0/revoke",
                                      "refused"),
            ("rollout.pause", "refused"), ("rollout.force", "ok")]

        metrics = (await client.get("/metrics")).text.splitlines()
        assert "swarmota_tracker_checkins_total 3" in metrics
        assert "swarmota_tracker_admin_refused_total 2" in metrics
        assert 'swarmota_tracker_rollout_decisions_total{kind="forced"} 1' in metrics


def test_release_add_starts_a_staged_rollout_by_default(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "tracker.db"
    manifest = manifest_file(tmp_path)
    assert run_cli("release", "add", "--db", str(db), "--canary", "dev-1",
                   "--canary-label", "beta", "--stages", "5,100", str(manifest)) == 0
    out = capsys.readouterr().out
    assert "active at stage canary of canary, 5%, 100%" in out
    with SqliteStore(db) as store:
        state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None
    assert state.plan.canary_devices == ("dev-1",) and state.plan.canary_label == "beta"
    assert state.plan.soak_s == 3600 and state.plan.stages_percent == (5.0, 100.0)
    # Adding it again keeps the rollout it has.
    assert run_cli("release", "add", "--db", str(db), "--rollout", "all", str(manifest)) == 0
    assert "already registered" in capsys.readouterr().out
    with SqliteStore(db) as store:
        again = store.rollout_of(PRODUCT, "2.0.0")
    assert again is not None and again.rollout_id == state.rollout_id


def test_release_add_refuses_bad_stages(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli("release", "add", "--db", str(tmp_path / "t.db"), "--stages", "10,5",
                str(manifest_file(tmp_path)))
    assert exc.value.code == 2
    assert "bad stages" in capsys.readouterr().err


async def test_the_admin_cli_talks_https_and_checks_the_certificate(
        tmp_path: Path, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_origin_tls import make_self_signed_cert

    cert, key = make_self_signed_cert(tmp_path)
    db = tmp_path / "tracker.db"
    config = TrackerConfig(db_path=db, listen=ListenConfig(
        host="127.0.0.1", port=0, certfile=str(cert), keyfile=str(key)))
    url = await nursery.start(functools.partial(serve_tracker, config))
    assert url.startswith("https://127.0.0.1:")
    assert run_cli("admin", "token", "create", "--db", str(db), "--role", "viewer",
                   "--name", "v") == 0
    token = capsys.readouterr().out.strip()

    def admin(*extra: str) -> int:
        return run_cli("admin", "--url", url, "--token", token, *extra, "releases")

    assert await trio.to_thread.run_sync(admin, "--ca-file", str(cert)) == 0
    assert json.loads(capsys.readouterr().out) == {"releases": []}
    assert await trio.to_thread.run_sync(admin) == 1  # not trusted by the system
    assert "certificate" in capsys.readouterr().err.lower()


def test_serve_refuses_half_a_tls_configuration(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("serve", "--db", str(tmp_path / "t.db"), "--tls-cert",
                   str(tmp_path / "cert.pem"), "--allow-unauthenticated-devices") == 2
    assert "go together" in capsys.readouterr().err
