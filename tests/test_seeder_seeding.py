"""The seeder seeds every published payload over BitTorrent: real libtorrent on loopback.

A :class:`PayloadSeeder` on 127.0.0.2 seeds the origin tree of a :class:`ReleaseEnv`; a
leecher session on 127.0.0.3 (TCP only, DHT/LSD/UPnP/NAT-PMP off, no web seed, no
tracker) is pointed at the seeder with ``connect_peer`` and must end up with the
payload's exact bytes; with ``announce_urls``, a leecher finds the seeder through the
real tracker alone. Failure modes covered: a release published while the seeder runs
(picked up by the rescan), a payload that disappears (dropped, its upload counted), and
torrent files that are corrupt, too large, or name another file or size than their
payload (logged once, skipped; the others still seed). ``swarmota seeder serve``
itself is driven as a subprocess.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from swarmota.demo import mutate_image
from swarmota.peer.swarm import SwarmConfig, SwarmSession, make_torrent
from swarmota.seeder import cli
from swarmota.seeder.errors import SeederError
from swarmota.seeder.seeding import MAX_TORRENT_BYTES, PayloadSeeder, SeedingConfig
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.registry import SwarmRegistry
from swarmota.tracker.server import serve_tracker
from tests.release_env import ReleaseEnv, publish

TIMEOUT_S = 20
SEEDER_HOST = "127.0.0.2"
LEECHER_HOST = "127.0.0.3"
ROOT = Path(__file__).resolve().parent.parent


def seeding_config(*, rescan_interval_s: float = 10.0,
                   max_torrent_bytes: int = MAX_TORRENT_BYTES) -> SeedingConfig:
    return SeedingConfig(swarm=SwarmConfig(listen_host=SEEDER_HOST),
                         rescan_interval_s=rescan_interval_s,
                         max_torrent_bytes=max_torrent_bytes)


async def leech(torrent: bytes, leech_dir: Path, seeder: tuple[str, int]) -> bytes:
    """Download ``torrent`` from the peer at ``seeder`` only; return the file's bytes."""
    leech_dir.mkdir(parents=True, exist_ok=True)
    with SwarmSession(SwarmConfig(listen_host=LEECHER_HOST)) as leecher:
        ref = leecher.add_payload(torrent, leech_dir)
        leecher.connect_peer(ref, *seeder)
        await leecher.wait_complete(ref, timeout_s=TIMEOUT_S)
        stats = leecher.statistics(ref)
        data = ref.path.read_bytes()
        await trio.to_thread.run_sync(leecher.close)  # may wait for "stopped" announces
        assert stats.num_web_seeds == 0
        assert stats.bytes_downloaded_payload >= len(data)
        return data


def payload_file(env: ReleaseEnv, path: str) -> Path:
    return env.repo.origin_dir / path


async def test_seeder_seeds_every_published_payload_to_a_libtorrent_leecher(
        env: ReleaseEnv, tmp_path: Path) -> None:
    seeder = PayloadSeeder(env.repo.origin_dir, seeding_config())
    async with trio.open_nursery() as nursery:
        await nursery.start(seeder.run)
        names = {p.path.removeprefix("payloads/") for p in (env.m1.full_payload,
                                                            env.m2.full_payload)}
        assert set(seeder.seeded_payloads) == names
        host, port = seeder.listen_address
        assert host == SEEDER_HOST and port > 0

        payload = env.m2.full_payload
        torrent = payload_file(env, payload.torrent_path).read_bytes()
        data = await leech(torrent, tmp_path / "leech", seeder.listen_address)
        assert data == payload_file(env, payload.path).read_bytes()
        assert env.origin.statistics().requests == 0  # nothing came over HTTP

        live = seeder.statistics()
        assert live.torrents_seeded == 2 and live.torrents_skipped == 0
        assert live.bytes_uploaded_payload >= payload.size
        nursery.cancel_scope.cancel()

    final = seeder.statistics()  # run() closed the seeder; the counters stay readable
    assert final.bytes_uploaded_payload >= payload.size
    assert final.bytes_uploaded_total >= final.bytes_uploaded_payload
    assert final.torrents_added == 2 and final.rescans >= 1
    with pytest.raises(RuntimeError):
        seeder.rescan()


async def test_release_published_while_seeding_is_picked_up_and_a_gone_payload_dropped(
        env: ReleaseEnv, tmp_path: Path) -> None:
    seeder = PayloadSeeder(env.repo.origin_dir, seeding_config(rescan_interval_s=0.05))
    async with trio.open_nursery() as nursery:
        await nursery.start(seeder.run)
        assert seeder.statistics().torrents_seeded == 2

        v3 = mutate_image(env.v2, seed=13)
        m3 = await trio.to_thread.run_sync(publish, env.repo, env.workdir, v3, "3.0.0", 3)
        payload = m3.full_payload
        name = payload.path.removeprefix("payloads/")
        with trio.fail_after(TIMEOUT_S):
            while name not in seeder.seeded_payloads:
                await trio.sleep(0.02)
        torrent = payload_file(env, payload.torrent_path).read_bytes()
        data = await leech(torrent, tmp_path / "leech", seeder.listen_address)
        assert data == payload_file(env, payload.path).read_bytes()

        # The payload goes away: the torrent is dropped, what it uploaded still counts.
        payload_file(env, payload.path).unlink()
        with trio.fail_after(TIMEOUT_S):
            while name in seeder.seeded_payloads:
                await trio.sleep(0.02)
        stats = seeder.statistics()
        assert stats.torrents_seeded == 2
        assert stats.torrents_added == 3 and stats.torrents_removed == 1
        assert stats.bytes_uploaded_payload >= payload.size
        nursery.cancel_scope.cancel()


async def test_corrupt_torrent_files_are_logged_once_and_skipped(
        env: ReleaseEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    payloads = env.repo.origin_dir / "payloads"
    # Garbage where a torrent should be, beside an existing payload file.
    (payloads / ("ee" * 32 + ".zst")).write_bytes(b"payload")
    (payloads / ("ee" * 32 + ".zst.torrent")).write_bytes(b"d4:infoi1e")
    # A valid torrent of another payload: it would seed the wrong file.
    m1_torrent = payload_file(env, env.m1.full_payload.torrent_path).read_bytes()
    (payloads / ("ff" * 32 + ".zst")).write_bytes(b"payload")
    (payloads / ("ff" * 32 + ".zst.torrent")).write_bytes(m1_torrent)
    # A torrent without its payload file, and a half-written temporary: ignored quietly.
    (payloads / ("dd" * 32 + ".zst.torrent")).write_bytes(m1_torrent)
    (payloads / (".incoming-x.zst.torrent")).write_bytes(b"partial")
    (payloads / (".incoming-x.zst")).write_bytes(b"partial")

    with caplog.at_level(logging.WARNING, logger="swarmota.seeder.seeding"), \
            PayloadSeeder(env.repo.origin_dir, seeding_config()) as seeder:
        result = seeder.rescan()
        assert sorted(result.skipped) == ["ee" * 32 + ".zst.torrent", "ff" * 32 + ".zst.torrent"]
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 2
        assert any("ee" * 32 in w and "not a valid torrent" in w for w in warnings)
        assert any("ff" * 32 in w and "is for a file named" in w for w in warnings)
        stats = seeder.statistics()
        assert stats.torrents_seeded == 2 and stats.torrents_skipped == 2

        caplog.clear()
        assert seeder.rescan().skipped == ()  # unchanged files: not logged again
        assert caplog.records == []

        payload = env.m1.full_payload
        data = await leech(m1_torrent, tmp_path / "leech", seeder.listen_address)
        assert data == payload_file(env, payload.path).read_bytes()


async def test_torrent_of_another_size_than_its_payload_is_skipped(
        env: ReleaseEnv, caplog: pytest.LogCaptureFixture) -> None:
    payload = env.repo.origin_dir / "payloads" / ("cc" * 32 + ".zst")
    payload.write_bytes(random.Random(1).randbytes(40_000))
    torrent = make_torrent(payload, piece_size_bytes=16 * 1024)
    payload.with_name(payload.name + ".torrent").write_bytes(torrent.data)
    with open(payload, "r+b") as fh:  # truncated after publishing
        fh.truncate(30_000)
    with caplog.at_level(logging.WARNING, logger="swarmota.seeder.seeding"), \
            PayloadSeeder(env.repo.origin_dir, seeding_config()) as seeder:
        assert seeder.rescan().skipped == (payload.name + ".torrent",)
        assert "the torrent is for 40000 bytes" in caplog.text
        assert seeder.statistics().torrents_seeded == 2


async def test_announce_urls_let_a_leecher_find_the_seeder_through_the_tracker(
        env: ReleaseEnv, tmp_path: Path) -> None:
    # The published torrents name no tracker: the seeder adds one; the leecher is given
    # the same announce URL and no peer address.
    registry = SwarmRegistry(interval_s=300)
    async with trio.open_nursery() as nursery:
        tracker_url = await nursery.start(functools.partial(
            serve_tracker, TrackerConfig(db_path=env.db), registry=registry))
        announce = f"{tracker_url}/announce"
        config = SeedingConfig(swarm=SwarmConfig(listen_host=SEEDER_HOST),
                               announce_urls=(announce,))
        seeder = PayloadSeeder(env.repo.origin_dir, config)
        await nursery.start(seeder.run)
        with trio.fail_after(TIMEOUT_S):
            while registry.statistics().seeds < 2:  # m1 and m2, both registered releases
                await trio.sleep(0.02)

        payload = env.m2.full_payload
        torrent = payload_file(env, payload.torrent_path).read_bytes()
        with SwarmSession(SwarmConfig(listen_host=LEECHER_HOST)) as leecher:
            ref = leecher.add_payload(torrent, tmp_path, trackers=[announce])
            await leecher.wait_complete(ref, timeout_s=TIMEOUT_S)
            assert ref.path.read_bytes() == payload_file(env, payload.path).read_bytes()
            await trio.to_thread.run_sync(leecher.close)  # waits for "stopped" announces
        nursery.cancel_scope.cancel()
    assert seeder.statistics().bytes_uploaded_payload >= payload.size


async def test_seeder_announces_to_every_tracker_it_is_given(env: ReleaseEnv) -> None:
    """Two trackers (two processes' registries on one database): the seeder announces
    every payload to both, not to the first that answers with the other kept as a
    fallback (``seeder serve --announce-url`` was only a fallback tier)."""
    registries = [SwarmRegistry(interval_s=300), SwarmRegistry(interval_s=300)]
    async with trio.open_nursery() as nursery:
        urls = [await nursery.start(functools.partial(
            serve_tracker, TrackerConfig(db_path=env.db), registry=registry))
            for registry in registries]
        config = SeedingConfig(swarm=SwarmConfig(listen_host=SEEDER_HOST),
                               announce_urls=tuple(f"{url}/announce" for url in urls))
        seeder = PayloadSeeder(env.repo.origin_dir, config)
        await nursery.start(seeder.run)
        with trio.fail_after(TIMEOUT_S):
            while min(r.statistics().seeds for r in registries) < 2:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def test_oversized_torrent_file_is_skipped(env: ReleaseEnv,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    torrent = payload_file(env, env.m1.full_payload.torrent_path)
    with caplog.at_level(logging.WARNING, logger="swarmota.seeder.seeding"), \
            PayloadSeeder(env.repo.origin_dir,
                          seeding_config(max_torrent_bytes=len(torrent.read_bytes()) - 1)) as s:
        assert len(s.rescan().skipped) == 2
        assert "larger than" in caplog.text


async def test_replaced_torrent_file_is_seeded_again(env: ReleaseEnv) -> None:
    torrent = payload_file(env, env.m1.full_payload.torrent_path)
    with PayloadSeeder(env.repo.origin_dir, seeding_config()) as seeder:
        seeder.rescan()
        replacement = torrent.with_name(".replacement")
        replacement.write_bytes(torrent.read_bytes())
        os.replace(replacement, torrent)
        name = env.m1.full_payload.path.removeprefix("payloads/")
        result = seeder.rescan()
        assert result.removed == result.added == (name,)
        assert seeder.statistics().torrents_seeded == 2


def test_an_address_libtorrent_cannot_listen_on_is_refused(tmp_path: Path) -> None:
    config = SeedingConfig(swarm=SwarmConfig(listen_host="no-such-interface0"))
    with pytest.raises(SeederError, match="cannot listen for BitTorrent peers"):
        PayloadSeeder(tmp_path, config)


def test_missing_payloads_directory_seeds_nothing(tmp_path: Path) -> None:
    with PayloadSeeder(tmp_path, seeding_config()) as seeder:
        assert seeder.rescan().added == ()
        assert seeder.statistics().torrents_seeded == 0


@pytest.mark.parametrize("kwargs", [
    {"announce_urls": ("udp://127.0.0.1:6969/announce",)},
    {"announce_urls": ("http://127.0.0.1:8470/announce?passkey=1",)},
    {"rescan_interval_s": 0},
    {"max_torrent_bytes": 0},
])
def test_seeding_config_refuses_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SeedingConfig(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the CLI


def test_serve_help_describes_seeding(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["seeder", "serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "seed every published payload over BitTorrent" in out
    for flag in ("--no-seed", "--seed-listen", "--seed-upload-limit-bytes-per-s",
                 "--announce-url"):
        assert flag in out
    assert "the --listen host, port 6881" in out


def test_serve_refuses_a_bad_announce_url_before_serving(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metadata").mkdir()
    args = cli_parser().parse_args(["seeder", "serve", str(tmp_path), "--listen", "127.0.0.1:0",
                                    "--announce-url", "udp://127.0.0.1:6969/announce"])
    assert args.func(args) == 2
    assert "error: announce URL must be an http(s) URL" in capsys.readouterr().err


def test_seed_upload_limit_accepts_zero_for_no_limit() -> None:
    parse = cli_parser().parse_args
    assert parse(["seeder", "serve", "x"]).seed_upload_limit_bytes_per_s == 0
    assert parse(["seeder", "serve", "x", "--seed-upload-limit-bytes-per-s", "0"]
                 ).seed_upload_limit_bytes_per_s == 0
    assert parse(["seeder", "serve", "x", "--seed-upload-limit-bytes-per-s", "2Mi"]
                 ).seed_upload_limit_bytes_per_s == 2 * 1024 * 1024


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmota")
    cli.add_parser(parser.add_subparsers(required=True))
    return parser


class ServeProcess:
    """``swarmota seeder serve`` in a subprocess, its stdout read line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    async def read_line(self) -> str:
        assert self.process.stdout is not None
        with trio.fail_after(TIMEOUT_S):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    raise AssertionError(f"serve exited early: {self._buffer!r}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def stop(self) -> tuple[str, str]:
        """Ctrl-C; wait for the exit; the rest of stdout, and stderr."""
        assert self.process.stdout is not None and self.process.stderr is not None
        self.process.send_signal(signal.SIGINT)
        out, err = b"", b""
        with trio.fail_after(TIMEOUT_S):
            while chunk := await self.process.stdout.receive_some():
                out += chunk
            while chunk := await self.process.stderr.receive_some():
                err += chunk
            await self.process.wait()
        return (self._buffer + out).decode(), err.decode()


async def start_serve(env: ReleaseEnv, *flags: str) -> ServeProcess:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "swarmota.cli", "seeder", "serve", str(env.repo.path),
         "--listen", "127.0.0.1:0", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    return ServeProcess(process)


async def test_serve_seeds_published_payloads_by_default(env: ReleaseEnv,
                                                         tmp_path: Path) -> None:
    serve = await start_serve(env, "--seed-listen", f"{SEEDER_HOST}:0",
                              "--seed-upload-limit-bytes-per-s", "50M")
    try:
        assert (await serve.read_line()).startswith("serving ")
        line = await serve.read_line()
        assert line.startswith("seeding 2 payloads over BitTorrent at "), line
        address = line.split(" at ", 1)[1].split(" ", 1)[0]
        host, port = address.rsplit(":", 1)
        assert host == SEEDER_HOST
        assert "upload limit: 50000000 bytes/s" in await serve.read_line()

        payload = env.m2.full_payload
        torrent = payload_file(env, payload.torrent_path).read_bytes()
        data = await leech(torrent, tmp_path / "leech", (host, int(port)))
        assert data == payload_file(env, payload.path).read_bytes()
        out, err = await serve.stop()
    finally:
        if serve.process.returncode is None:
            serve.process.kill()
    assert serve.process.returncode == 0, err
    assert "stopped after 0 requests" in out
    uploaded = int(out.split("seeded 2 payloads, ", 1)[1].split(" ", 1)[0])
    assert uploaded >= payload.size


async def test_serve_no_seed_serves_http_only(env: ReleaseEnv) -> None:
    serve = await start_serve(env, "--no-seed")
    try:
        assert (await serve.read_line()).startswith("serving ")
        out, err = await serve.stop()
    finally:
        if serve.process.returncode is None:
            serve.process.kill()
    assert serve.process.returncode == 0, err
    assert "stopped after 0 requests" in out
    assert "BitTorrent" not in out and "seed" not in out
