"""An operator runs a fleet with the command line (docs/OPERATIONS-CLI.md): a real
repository and origin, a real tracker that verifies every release against the
repository's signed metadata, devices checking in and reporting over HTTP, and
``swarmota ...`` driven as an operator types it (in-process, and the tracker as its own
process over HTTPS)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from swarmota.cli import build_parser, main
from swarmota.infra.devca import create_ca, issue_device_cert, issue_server_cert
from swarmota.infra.http_serve import ListenConfig
from swarmota.manifest import ReleaseManifest
from swarmota.seeder.origin import OriginApp, OriginConfig
from swarmota.seeder.repository import KeySetup, Repository, RoleKeys
from swarmota.seeder.server import serve_origin
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.watch import END_PHASES
from tests.release_env import HARDWARE_ID, PRODUCT, REPO_ROOT, publish

ROLES = ("viewer", "operator", "admin")


@pytest.fixture(autouse=True)
def _clean_client_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No client settings leak in from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("SWARMOTA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@dataclass
class Ops:
    """What an operator works with: a repository with v1 and v2 published, its origin,
    a tracker verifying releases against it, tokens of every role."""

    workdir: Path
    repo: Repository
    origin_url: str
    tracker_url: str
    db: Path
    m1: ReleaseManifest
    m2: ReleaseManifest
    capsys: pytest.CaptureFixture[str]
    tokens: dict[str, str] = field(default_factory=dict)
    verify: Any = True

    def manifest_path(self, m: ReleaseManifest) -> Path:
        return self.repo.target_file_path(self.repo.targets()[m.target_name])

    def manifest_url(self, m: ReleaseManifest) -> str:
        return f"{self.origin_url}/{self.manifest_path(m).relative_to(self.repo.origin_dir)}"

    async def cli(self, *argv: str, role: str | None = "operator") -> tuple[int, str, str]:
        """``swarmota ARGV`` (the tracker's URL from $SWARMOTA_TRACKER_URL, the role's
        token appended as --token); exit code, stdout, stderr."""
        self.capsys.readouterr()
        token = [] if role is None else ["--token", self.tokens[role]]
        rc = await trio.to_thread.run_sync(main, [*argv, *token])
        out, err = self.capsys.readouterr()
        return rc, out, err

    async def checkin(self, device: str, **extra: Any) -> str | None:
        async with httpx.AsyncClient(verify=self.verify, timeout=10) as client:
            answer = (await client.post(f"{self.tracker_url}/v1/checkin", json={
                "device_id": device, "product": PRODUCT, "hardware_id": HARDWARE_ID,
                "version": "1.0.0", "release_counter": 1, **extra})).json()
        return None if answer["release"] is None else str(answer["release"]["version"])

    async def report(self, device: str, status: int, message: str = "",
                     log_tail: str = "", version: str = "2.0.0") -> None:
        async with httpx.AsyncClient(verify=self.verify, timeout=10) as client:
            response = await client.post(f"{self.tracker_url}/v1/report", json={
                "device_id": device, "product": PRODUCT, "from_version": "1.0.0",
                "to_version": version, "status": status, "message": message,
                "bytes_origin": 3 << 20, "bytes_peers": 5 << 20, "timings_s": {},
                "log_tail": log_tail})
        assert response.status_code == 200, response.text


def bootstrap_tokens(db: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``tracker admin token create --db`` for each role: the offline bootstrap."""
    tokens = {}
    for role in ROLES:
        capsys.readouterr()
        assert main(["tracker", "admin", "token", "create", "--db", str(db), "--role", role,
                     "--name", f"{role}-alice"]) == 0
        tokens[role] = capsys.readouterr().out.strip()
    return tokens


async def start_ops(nursery: trio.Nursery, workdir: Path, images: tuple[bytes, bytes],
                    capsys: pytest.CaptureFixture[str], *, keys: KeySetup | None = None,
                    verify_releases: bool = True) -> Ops:
    repo = Repository.create(workdir / "repo", keys=keys or KeySetup())
    m1 = publish(repo, workdir, images[0], "1.0.0", 1)
    m2 = publish(repo, workdir, images[1], "2.0.0", 2)
    origin_url = await nursery.start(serve_origin, OriginApp(repo.origin_dir, OriginConfig()),
                                     ListenConfig())
    root = workdir / "root.json"
    root.write_bytes(repo.root_bytes())
    db = workdir / "tracker.sqlite"
    tokens = bootstrap_tokens(db, capsys)
    tracker_url = await nursery.start(serve_tracker, TrackerConfig(
        db_path=db, listen=ListenConfig(), repository_root=root if verify_releases else None,
        origin_url=origin_url if verify_releases else None))
    return Ops(workdir, repo, origin_url, tracker_url, db, m1, m2, capsys, tokens)


@pytest.fixture
async def ops(tmp_path: Path, nursery: trio.Nursery, images: tuple[bytes, bytes],
              capsys: pytest.CaptureFixture[str],
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Ops]:
    ops = await start_ops(nursery, tmp_path, images, capsys)
    monkeypatch.setenv("SWARMOTA_TRACKER_URL", ops.tracker_url)
    yield ops


def plan_file(path: Path) -> Path:
    path.write_text("""
canary_devices = ["c1", "c2"]
stages_percent = [10, 50, 100]
soak_s = 7200
canary_halt_failure_count = 2
halt_failure_rate = 0.1
halt_min_sample = 20
max_in_flight = 50
advance_windows = ["mon,tue,wed,thu 07:00-15:00"]
""")
    return path


# --- the tracker as its own process, over HTTPS -------------------------------------------


@dataclass
class TrackerProcess:
    url: str
    proc: trio.Process


@contextlib.asynccontextmanager
async def tracker_process(argv: list[str], stderr: Path) -> AsyncIterator[TrackerProcess]:
    """``swarmota tracker serve ARGV`` as its own process; stopped with Ctrl-C."""
    with stderr.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "swarmota.cli", "tracker", "serve", *argv],
            stdout=subprocess.PIPE, stderr=err, cwd=REPO_ROOT)
    assert proc.stdout is not None
    seen = b""
    try:
        with trio.fail_after(30):
            while b"\n" not in seen:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, stderr.read_text()
                seen += chunk
        found = re.search(rb"listening on (\S+)", seen)
        assert found, seen
        yield TrackerProcess(found.group(1).decode(), proc)
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_operator_registers_a_signed_release_by_url_over_https_and_starts_a_staged_rollout_from_a_plan_file(  # noqa: E501
        tmp_path: Path, nursery: trio.Nursery, images: tuple[bytes, bytes],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole first day: bootstrap a token on the tracker's host, serve over HTTPS
    with release verification, write the client config once, then every command works
    without repeating --url --ca-file --token; the release is registered by its URL on
    the origin and its rollout takes its thresholds from a plan file and a flag."""
    ops = await start_ops(nursery, tmp_path, images, capsys, verify_releases=False)
    pki = tmp_path / "pki"
    ca = create_ca(pki / "ca")
    server = issue_server_cert(pki / "ca", pki / "tracker", ["127.0.0.1"])
    db = tmp_path / "tracker-https.sqlite"
    token = bootstrap_tokens(db, capsys)["operator"]
    async with tracker_process([
            "--db", str(db), "--listen", "127.0.0.1:0", "--allow-unauthenticated-devices",
            "--tls-cert", str(server.cert), "--tls-key", str(server.key),
            "--repository-root", str(tmp_path / "root.json"), "--origin-url",
            ops.origin_url], tmp_path / "tracker.err") as tracker:
        await first_day(ops, tracker, ca, token, monkeypatch)
    assert tracker.proc.returncode == 0


async def first_day(ops: Ops, tracker: TrackerProcess, ca: Path, token: str,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path = ops.workdir
    assert tracker.url.startswith("https://127.0.0.1:")

    config = tmp_path / "xdg" / "swarmota" / "client.toml"
    config.parent.mkdir(parents=True)
    (config.parent / "tracker-ca.pem").write_bytes(ca.read_bytes())
    config.write_text(f'[tracker]\nurl = "{tracker.url}"\nca_file = "tracker-ca.pem"\n'
                      f'token = "{token}"\n')
    config.chmod(0o600)
    other = ops.tracker_url  # the in-process tracker, plain HTTP
    ops.tracker_url, ops.verify = tracker.url, ssl.create_default_context(cafile=str(ca))

    rc, out, err = await ops.cli("tracker", "whoami", role=None)
    assert (rc, out, err) == (0, f"operator-alice (role operator) on {tracker.url}\n", "")

    rc, out, err = await ops.cli(
        "tracker", "release", "add", ops.manifest_url(ops.m2),
        "--plan-file", str(plan_file(tmp_path / "plan.toml")), "--soak-s", "60", role=None)
    assert rc == 0, err
    assert out.startswith("registered acme-router 2.0.0 (release counter 2, target "
                          "releases/acme-router/2.0.0.json); verified against the "
                          "repository's signed metadata\n")
    assert "phase    ACTIVE at stage canary since" in out
    assert "stages: canary (c1, c2), 10%, 50%, 100%; each soaks 1m" in out
    assert "halts: 2 canary failure(s); a stage over 10% failures once 20 reported" in out
    assert "advances only in mon,tue,wed,thu 07:00-15:00 UTC" in out

    rc, out, _ = await ops.cli("tracker", "rollout", "show", PRODUCT, "2.0.0", "--json",
                               role=None)
    plan = json.loads(out)["plan"]
    assert (plan["soak_s"], plan["canary_devices"], plan["halt_failure_rate"],
            plan["canary_halt_failure_count"], plan["max_in_flight"]) == (
        60, ["c1", "c2"], 0.1, 2, 50)
    assert await ops.checkin("c1") == "2.0.0" and await ops.checkin("d9") is None

    rc, out, _ = await ops.cli("tracker", "release", "list", role=None)
    header, row = out.splitlines()
    assert header.split()[:6] == ["PRODUCT", "VERSION", "COUNTER", "TYPE", "SIZE", "ADDED"]
    assert row.split()[:4] == ["acme-router", "2.0.0", "2", "image"]
    assert re.search(r" image +\d+\.\d KiB ", row)
    assert row.split()[-2:] == ["1", "active"]

    # an operator token in a file others can read works, with a warning
    config.chmod(0o644)
    rc, _, err = await ops.cli("tracker", "whoami", role=None)
    assert rc == 0 and f"warning: {config} holds an admin token" in err
    # the environment wins over the file, a flag over both
    monkeypatch.setenv("SWARMOTA_TRACKER_TOKEN", ops.tokens["viewer"])
    rc, _, err = await ops.cli("tracker", "whoami", role=None)
    assert rc == 1 and "HTTP 401" in err  # the token of the other (in-process) tracker
    monkeypatch.setenv("SWARMOTA_TRACKER_URL", other)
    rc, out, _ = await ops.cli("tracker", "whoami", role=None)
    assert out == f"viewer-alice (role viewer) on {other}\n"
    rc, out, _ = await ops.cli("tracker", "whoami", "--url", tracker.url, "--token", token,
                               role=None)
    assert out == f"operator-alice (role operator) on {tracker.url}\n"


# --- registration refused --------------------------------------------------------------


async def test_an_unsigned_or_altered_manifest_is_refused_with_a_clear_message(
        ops: Ops, nursery: trio.Nursery) -> None:
    altered = ops.workdir / "altered.json"
    altered.write_bytes(dataclasses.replace(
        ops.m2, compatibility=(HARDWARE_ID, "evil-hw")).to_bytes())
    unsigned = ops.workdir / "unsigned.json"
    unsigned.write_bytes(dataclasses.replace(ops.m2, version="3.0.0",
                                             release_counter=3).to_bytes())
    for source, words in (
            (altered, "HTTP 400: the manifest given is not the signed target "
                      "releases/acme-router/2.0.0.json"),
            (unsigned, "HTTP 400: releases/acme-router/3.0.0.json is not in the "
                       "repository's signed targets metadata: not a published release"),
            (f"{ops.origin_url}/metadata/1.root.json",
             f"HTTP 400: url must be a release manifest under {ops.origin_url}/targets/")):
        rc, out, err = await ops.cli("tracker", "release", "add", str(source))
        assert (rc, out) == (1, ""), err
        assert err.startswith("error: the tracker refused the release: ") and words in err
        assert "it registers only a release the repository signed" in err
    rc, _, err = await ops.cli("tracker", "release", "add", str(ops.workdir / "root.json"))
    assert rc == 2 and "is not a valid release manifest" in err
    rc, _, err = await ops.cli("tracker", "release", "add", str(ops.workdir / "nope.json"))
    assert rc == 2 and "cannot read manifest" in err
    rc, _, err = await ops.cli("tracker", "release", "add", str(ops.manifest_path(ops.m2)),
                               role="viewer")
    assert rc == 1 and "HTTP 403" in err
    rc, out, _ = await ops.cli("tracker", "release", "list")
    assert out == "no releases registered\n"

    # a tracker that was not given the repository registers nothing
    blind_db = ops.workdir / "blind.sqlite"
    tokens = bootstrap_tokens(blind_db, ops.capsys)
    blind = await nursery.start(serve_tracker, TrackerConfig(db_path=blind_db))
    rc, _, err = await ops.cli("tracker", "release", "add", "--url", blind,
                               str(ops.manifest_path(ops.m2)), "--token", tokens["operator"],
                               role=None)
    assert rc == 1 and "HTTP 409: this tracker verifies no releases: start it with " \
                       "--repository-root ROOT.json --origin-url URL" in err


async def test_release_add_starts_a_staged_rollout_by_default_and_again_changes_nothing(
        ops: Ops) -> None:
    rc, out, err = await ops.cli("tracker", "release", "add", str(ops.manifest_path(ops.m2)),
                                 "--json")
    assert rc == 0, err
    first = json.loads(out)
    assert first["added"] and first["rollout_detail"]["stage"] == "1%"  # no canaries
    assert first["rollout_detail"]["plan"] == {**first["rollout_detail"]["plan"],
                                               "stages_percent": [1, 10, 50, 100],
                                               "soak_s": 3600, "halt_failure_rate": 0.05}
    rc, out, _ = await ops.cli("tracker", "release", "add", ops.manifest_url(ops.m2),
                               "--everyone")
    assert rc == 0 and out.startswith("already registered: acme-router 2.0.0")
    assert f"rollout {first['rollout']}: acme-router 2.0.0 (counter 2), generation 1" in out


# --- watch, halt, abort, a new generation ----------------------------------------------


async def test_rollout_watch_shows_a_halt_naming_the_device_and_exits_with_the_halted_code(
        ops: Ops) -> None:
    rc, out, err = await ops.cli("tracker", "release", "add", str(ops.manifest_path(ops.m2)),
                                 "--canary", "c1", "--canary", "c2", "--soak-s", "0")
    assert rc == 0, err
    assert await ops.checkin("c1") == "2.0.0" and await ops.checkin("c2") == "2.0.0"

    watching = trio.Event()
    result: list[tuple[int, str, str]] = []

    async def watch() -> None:
        result.append(await ops.cli("tracker", "rollout", "watch", PRODUCT, "2.0.0",
                                    "--interval-s", "0.05", "--max-s", "60", role="viewer"))
        watching.set()

    async def admin_requests() -> int:
        async with httpx.AsyncClient(verify=ops.verify) as client:
            text = (await client.get(f"{ops.tracker_url}/metrics")).text
        found = re.search(r"^swarmota_tracker_admin_requests_total (\d+)$", text, re.M)
        assert found, text
        return int(found.group(1))

    async with trio.open_nursery() as nursery:
        before = await admin_requests()
        nursery.start_soon(watch)
        with trio.fail_after(30):  # a few frames of an active rollout first
            while await admin_requests() < before + 3:
                await trio.sleep(0.05)
        await ops.report("c1", 0)
        await ops.report("c2", 40, "health check: \x1b[2J/data not mounted",
                         "boot: mounting /data\r\nerror: /data not mounted\n")
        with trio.fail_after(30):
            await watching.wait()
    ((rc, out, err),) = result
    assert rc == END_PHASES["halted"] == 3, err
    frames = out.split("--- ")[1:]
    assert "ACTIVE at stage canary" in frames[0] and "HALTED at stage canary" in frames[-1]
    assert ("halted   canary stage: 1 failed of 2 offered (limit 1): c2 (stage canary, "
            "status 40 post-check-failed): health check: \\x1b[2J/data not mounted") \
        in frames[-1]
    assert re.search(r"c2 +canary +40 post-check-failed +\S+ \S+ +health check: "
                     r"\\x1b\[2J/data not mounted", frames[-1])
    assert "\x1b" not in out  # a device's message cannot drive the operator's terminal
    assert re.search(r"\*canary +2 +0 +1 +0 +1 +0 +6.0 MiB +10.0 MiB +62.5%", frames[-1])

    rc, out, _ = await ops.cli("tracker", "device", "show", "c2", role="viewer")
    assert rc == 0
    assert "  message: health check: \\x1b[2J/data not mounted" in out
    assert "      | boot: mounting /data\\r\n      | error: /data not mounted\n" in out
    assert re.search(r"rollouts:\n.*\n\S+ +2.0.0 +1 +canary +rolled back +40 "
                     r"post-check-failed", out)
    # a watch of a rollout that already ended returns at once, with the same code
    rc, _, _ = await ops.cli("tracker", "rollout", "watch", PRODUCT, "2.0.0", "--json",
                             role="viewer")
    assert rc == 3


async def test_abort_then_a_new_rollout_is_generation_2_with_canaries_from_tags(
        ops: Ops) -> None:
    rc, out, _ = await ops.cli("tracker", "release", "add", str(ops.manifest_path(ops.m2)),
                               "--canary", "c1", "--json")
    first = json.loads(out)["rollout_detail"]
    assert await ops.checkin("c3") is None
    rc, out, err = await ops.cli("tracker", "rollout", "create", PRODUCT, "2.0.0")
    assert rc == 1 and "HTTP 409" in err
    rc, out, _ = await ops.cli("tracker", "rollout", "abort", first["rollout_id"])
    assert rc == 0 and "ABORTED" in out

    rc, out, err = await ops.cli("tracker", "device", "tag", "c3", "--add", "canary-eu")
    assert (rc, out) == (0, "c3: tags canary-eu\n"), err
    rc, out, err = await ops.cli("tracker", "rollout", "create", PRODUCT, "2.0.0",
                                 "--canary-label", "canary-eu", "--soak-s", "0")
    assert rc == 0, err
    assert re.search(r"rollout \S+: acme-router 2.0.0 \(counter 2\), generation 2", out)
    assert await ops.checkin("c3") == "2.0.0"  # tagged: a canary of generation 2
    assert await ops.checkin("d4") is None

    rc, out, err = await ops.cli("tracker", "rollout", "pause", first["rollout_id"])
    assert rc == 1 and "is generation 1 of acme-router 2.0.0, no longer its current " \
                       "rollout" in err
    rc, out, _ = await ops.cli("tracker", "rollout", "list", "--history", role="viewer")
    assert [line.split()[3:5] for line in out.splitlines()[1:]] == [
        ["1", "aborted"], ["2", "active"]]
    rc, out, _ = await ops.cli("tracker", "release", "show", PRODUCT, "2.0.0", role="viewer")
    assert re.search(r"swarm [0-9a-f]{64} \(announced as [0-9a-f]{40}\)", out)
    assert "aborted" in out
    rc, out, _ = await ops.cli("tracker", "devices", "--group", "canary-eu", role="viewer")
    assert re.search(r"c3 +acme-router +acme-router-hw1 +1.0.0 +1 .* canary-eu .* 2.0.0 "
                     r"offered", out)
    rc, out, _ = await ops.cli("tracker", "audit", role="admin")
    assert re.search(r"operator-alice +rollout.abort +acme-router 2.0.0 +ok", out)
    assert re.search(r"operator-alice +device.tag +c3 +ok", out)


async def test_tables_show_local_times_readable_bytes_and_escaped_messages(
        ops: Ops, monkeypatch: pytest.MonkeyPatch) -> None:
    await ops.cli("tracker", "release", "add", str(ops.manifest_path(ops.m2)), "--everyone")
    assert await ops.checkin("d1") == "2.0.0"
    await ops.report("d1", 30, "disk full\n[fake] all good")
    with monkeypatch.context() as patch:
        patch.setenv("TZ", "XYZ-05:45")  # UTC+05:45, named XYZ
        time.tzset()
        try:
            _, out, _ = await ops.cli("tracker", "reports", role="viewer")
            _, raw, _ = await ops.cli("tracker", "reports", "--json", role="viewer")
        finally:
            patch.undo()
            time.tzset()
    (report,) = json.loads(raw)["reports"]
    local = time.strftime("%Y-%m-%d %H:%M:%S",
                          time.gmtime(report["received_at"] + 5 * 3600 + 45 * 60))
    header, row = out.splitlines()
    assert "RECEIVED (XYZ)" in header and local in row
    assert "30 install-failed" in row and re.search("3.0 MiB +5.0 MiB", row)
    assert "disk full\\n[fake] all good" in row


# --- --json everywhere -----------------------------------------------------------------


def api_commands() -> set[tuple[str, ...]]:
    """Every ``swarmota tracker`` command that talks to the admin API (has --json)."""
    found: set[tuple[str, ...]] = set()

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, (*path, name))
        if any("--json" in a.option_strings for a in parser._actions):
            found.add(path)

    walk(build_parser(), ())
    return {path for path in found if path[0] == "tracker"}


async def test_json_everywhere_parses_as_json(ops: Ops, tmp_path: Path) -> None:
    fleet_ca = tmp_path / "fleet-ca"
    create_ca(fleet_ca)
    cert = issue_device_cert(fleet_ca, tmp_path / "c1-id", "c1").cert
    release = ("tracker", "release")
    rollout = ("tracker", "rollout")
    ref = (PRODUCT, "2.0.0")
    commands: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
        (("tracker", "release", "add"), (str(ops.manifest_path(ops.m1)), "--no-rollout"),
         "operator"),
        ((*release, "add"), (str(ops.manifest_path(ops.m2)), "--canary", "c1"), "operator"),
        ((*release, "list"), (), "viewer"),
        ((*release, "show"), ref, "viewer"),
        ((*rollout, "create"), (PRODUCT, "1.0.0", "--everyone"), "operator"),
        ((*rollout, "list"), ("--history",), "viewer"),
        ((*rollout, "show"), ref, "viewer"),
        ((*rollout, "devices"), (*ref, "--all"), "viewer"),
        ((*rollout, "watch"), (*ref, "--until-phase", "active"), "viewer"),
        (("tracker", "devices"), ("--all",), "viewer"),
        (("tracker", "device", "show"), ("c1",), "viewer"),
        (("tracker", "device", "tag"), ("c1", "--add", "lab"), "operator"),
        (("tracker", "reports"), ("--device", "c1"), "viewer"),
        (("tracker", "fleet"), (), "viewer"),
        (("tracker", "whoami"), (), "viewer"),
        ((*rollout, "pause"), ref, "operator"),
        ((*rollout, "resume"), ref, "operator"),
        ((*rollout, "advance"), ref, "operator"),
        ((*rollout, "force"), ref, "operator"),
        ((*rollout, "abort"), ref, "operator"),
        ((*rollout, "revoke"), ref, "admin"),
        (("tracker", "device", "revoke"), ("c1", "--cert", str(cert)), "admin"),
        (("tracker", "device", "revocations"), (), "viewer"),
        (("tracker", "audit"), (), "admin"),
    ]
    assert {c[0] for c in commands} == api_commands()
    for command, args, role in commands:
        if command[-1] == "devices" and command[1] == "devices":
            assert await ops.checkin("c1") == "2.0.0"
            await ops.report("c1", 0)
        rc, out, err = await ops.cli(*command, *args, "--json", role=role)
        assert rc == 0, (command, err)
        json.loads(out)  # one JSON document
    rc, out, _ = await ops.cli(*rollout, "show", *ref, "--json", role="viewer")
    assert json.loads(out)["phase"] == "revoked"


# --- the seeder registers what it publishes ----------------------------------------------


async def test_seeder_publish_registers_a_live_release_with_its_rollout(
        ops: Ops, images: tuple[bytes, bytes]) -> None:
    image = ops.workdir / "v3.img"
    image.write_bytes(images[1][::-1])
    rc, out, err = await ops.cli(
        "seeder", "publish", str(ops.repo.path), str(image), "--product", PRODUCT,
        "--version", "3.0.0", "--counter", "3", "--hardware-id", HARDWARE_ID,
        "--register", ops.tracker_url, "--canary", "c1", "--soak-s", "0", role=None)
    assert rc == 2 and "--register: no admin token" in err and "published" not in out
    assert "releases/acme-router/3.0.0.json" not in ops.repo.targets()  # nothing published
    rc, out, err = await ops.cli(
        "seeder", "publish", str(ops.repo.path), str(image), "--product", PRODUCT,
        "--version", "3.0.0", "--counter", "3", "--hardware-id", HARDWARE_ID,
        "--register", ops.tracker_url, "--tracker-token", ops.tokens["operator"],
        "--canary", "c1", "--soak-s", "0", role=None)
    assert rc == 0, err
    assert out.startswith("published acme-router 3.0.0")
    assert "registered acme-router 3.0.0 (release counter 3" in out
    assert "ACTIVE at stage canary" in out
    assert await ops.checkin("c1") == "3.0.0" and await ops.checkin("d2") is None

    # the tracker down when the release goes live: published, not registered, and said how
    image.write_bytes(images[0][::-1])
    rc, out, err = await ops.cli(
        "seeder", "publish", str(ops.repo.path), str(image), "--product", PRODUCT,
        "--version", "4.0.0", "--counter", "4", "--hardware-id", HARDWARE_ID,
        "--register", "http://127.0.0.1:9", "--tracker-token", ops.tokens["operator"],
        role=None)
    assert rc == 1 and out.startswith("published acme-router 4.0.0")
    assert "error: releases/acme-router/4.0.0.json is live, but http://127.0.0.1:9 did not " \
           "register it: cannot reach the tracker" in err
    hint = re.search(r"'swarmota tracker release add --url http://127.0.0.1:9 MANIFEST' "
                     r"with the manifest in (\S+)\n", err)
    assert hint is not None and Path(hint.group(1)).is_file()
    rc, out, _ = await ops.cli("tracker", "release", "add", hint.group(1), "--no-rollout")
    assert rc == 0 and out.startswith("registered acme-router 4.0.0")


async def test_with_offline_targets_keys_the_signature_that_makes_a_release_live_registers_it(
        tmp_path: Path, nursery: trio.Nursery, images: tuple[bytes, bytes],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ops = await start_ops(nursery, tmp_path, images, capsys, keys=KeySetup(
        targets=RoleKeys(2, 2), targets_online=False))
    monkeypatch.setenv("SWARMOTA_TRACKER_TOKEN", ops.tokens["operator"])
    image = tmp_path / "v3.img"
    image.write_bytes(images[1][::-1])
    register = ("--register", ops.tracker_url, "--everyone")
    rc, out, err = await ops.cli(
        "seeder", "publish", str(ops.repo.path), str(image), "--product", PRODUCT,
        "--version", "3.0.0", "--counter", "3", "--hardware-id", HARDWARE_ID, *register,
        role=None)
    assert rc == 0, err
    assert out.startswith("staged acme-router 3.0.0")
    assert f"not registered with {ops.tracker_url}: the release is not live yet" in out
    keys = sorted(ops.repo.offline_dir.glob("targets*.pem"))
    rc, out, err = await ops.cli("seeder", "sign", str(ops.repo.path), "--key", str(keys[0]),
                                 *register, role=None)
    assert rc == 0 and "nothing went live yet" in out, err
    assert await ops.checkin("d1") is None
    # the second signer signs a copy elsewhere; the import that makes it live registers
    request = tmp_path / "request.json"
    assert (await ops.cli("seeder", "export", str(ops.repo.path), str(request),
                          role=None))[0] == 0
    rc, _, err = await ops.cli("seeder", "sign", str(request), "--key", str(keys[1]),
                               *register, role=None)
    assert rc == 2 and "--register needs the repository" in err
    assert (await ops.cli("seeder", "sign", str(request), "--key", str(keys[1]),
                          role=None))[0] == 0
    rc, out, err = await ops.cli("seeder", "import", str(ops.repo.path), str(request),
                                 *register, role=None)
    assert rc == 0, err
    assert "LIVE:" in out and "registered acme-router 3.0.0 (release counter 3" in out
    assert await ops.checkin("d1") == "3.0.0"
