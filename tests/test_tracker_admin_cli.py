"""The control plane end to end: the real tracker on loopback, driven by the real CLI
(``swarmota tracker rollout|release|fleet|audit ...`` over httpx) and by devices
checking in; roles, refusals and TLS as the command line reports them. (Registration
against a real repository, plans, watch: tests/test_operator_cli.py.)"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import httpx
import pytest
import trio

from swarmota.infra.http_serve import ListenConfig
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.protocol import Release
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore
from tests.tracker_cli import run_cli

PRODUCT = "acme-router"


def tokens_for(db: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    tokens = {}
    for role in ("viewer", "operator", "admin"):
        assert run_cli("admin", "token", "create", "--db", str(db), "--role", role,
                       "--name", f"{role}-1") == 0
        tokens[role] = capsys.readouterr().out.strip()
        assert tokens[role].startswith("sot_")
    return tokens


async def test_operators_steer_a_rollout_through_the_cli_and_devices_follow(
        tmp_path: Path, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "tracker.db"
    with SqliteStore(db) as store:  # registered, offered to nobody
        register_release(store, Release.create(PRODUCT, "2.0.0", 2), None)
    tokens = tokens_for(db, capsys)
    with SqliteStore(db) as store:  # only the hash is stored
        assert all(tokens[r] not in json.dumps([e.detail for e in store.audit()])
                   for r in tokens)
    config = TrackerConfig(db_path=db, listen=ListenConfig(host="127.0.0.1", port=0))
    url = await nursery.start(functools.partial(serve_tracker, config))

    async def admin(role: str | None, *argv: str) -> tuple[int, str, str]:
        token = ["--token", tokens[role]] if role else []
        rc = await trio.to_thread.run_sync(
            lambda: run_cli(*argv, "--url", url, *token, "--json"))
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
        assert rc == 2 and "no admin token: pass --token, set $SWARMOTA_TRACKER_TOKEN" in err
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
        rc, out, _ = await admin("viewer", "rollout", "show", shown["rollout_id"])
        assert json.loads(out) == shown
        rc, out, _ = await admin("viewer", "release", "list")
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
        rc, _, err = await admin("viewer", "rollout", "show", "no-such-rollout")
        assert rc == 1 and "HTTP 404" in err

        metrics = (await client.get("/metrics")).text.splitlines()
        assert "swarmota_tracker_checkins_total 3" in metrics
        assert "swarmota_tracker_admin_refused_total 2" in metrics
        assert 'swarmota_tracker_rollout_decisions_total{kind="forced"} 1' in metrics


async def test_the_admin_cli_talks_https_and_checks_the_certificate(
        tmp_path: Path, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_origin_tls import make_self_signed_cert

    cert, key = make_self_signed_cert(tmp_path)
    db = tmp_path / "tracker.db"
    token = tokens_for(db, capsys)["viewer"]
    config = TrackerConfig(db_path=db, listen=ListenConfig(
        host="127.0.0.1", port=0, certfile=str(cert), keyfile=str(key)))
    url = await nursery.start(functools.partial(serve_tracker, config))
    assert url.startswith("https://127.0.0.1:")

    def releases(*extra: str) -> int:
        return run_cli("release", "list", "--url", url, "--token", token, *extra)

    assert await trio.to_thread.run_sync(releases, "--ca-file", str(cert)) == 0
    assert capsys.readouterr().out == "no releases registered\n"
    assert await trio.to_thread.run_sync(releases) == 1  # not trusted by the system
    assert "certificate" in capsys.readouterr().err.lower()
    assert await trio.to_thread.run_sync(releases, "--ca-file", str(tmp_path / "no.pem")) == 2
    assert f"--ca-file: cannot use {tmp_path / 'no.pem'} as CA file" in \
        capsys.readouterr().err


def test_serve_refuses_half_a_tls_configuration(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("serve", "--db", str(tmp_path / "t.db"), "--tls-cert",
                   str(tmp_path / "cert.pem"), "--allow-unauthenticated-devices") == 2
    assert "go together" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--repository-root", "root.json"], "--repository-root and --origin-url go together"),
    (["--origin-url", "http://127.0.0.1:1"], "--repository-root and --origin-url go "
                                             "together"),
    (["--repository-root", "missing.json", "--origin-url", "http://127.0.0.1:1"],
     "cannot read --repository-root"),
    (["--repository-root", "root.json", "--origin-url", "http://127.0.0.1:1"],
     "is not TUF root metadata"),
    (["--origin-ca-file", "ca.pem"], "--origin-ca-file needs --origin-url"),
])
def test_serve_refuses_an_unusable_release_verification_setting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        argv: list[str], words: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "root.json").write_text('{"signed": {"_type": "targets"}}')
    assert run_cli("serve", "--db", "t.db", "--allow-unauthenticated-devices", *argv) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "t.db").exists()
