"""``swarmota seeder ...``: what an operator types and reads."""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from swarmota.infra.devca import create_ca, issue_device_cert
from swarmota.infra.http_serve import parse_listen
from swarmota.seeder import Repository, cli

MiB = 1024 * 1024
_RUN_CLI = (
    "import argparse, sys\n"
    "from seeder import cli\n"
    "parser = argparse.ArgumentParser(prog='swarmota')\n"
    "cli.add_parser(parser.add_subparsers(required=True))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="swarmota")
    cli.add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    rc: int = args.func(args)
    return rc


def make_image(path: Path, size: int) -> Path:
    rng = random.Random(5)
    path.write_bytes((rng.randbytes(2048) + b"\0" * 2048) * (size // 4096))
    return path


def test_init_says_where_keys_are_and_that_root_goes_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    assert run("seeder", "init", str(repo), "--timestamp-expiry-s", "7200") == 0
    out = capsys.readouterr().out
    assert str(repo / "offline" / "root.pem") in out
    assert "OFFLINE" in out
    assert str(repo / "keys") in out
    assert str(repo / "origin" / "metadata" / "root.json") in out
    assert Repository.open(repo).expiry.timestamp_s == 7200


def test_init_over_an_existing_repository_fails_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("seeder", "init", str(tmp_path / "repo")) == 0
    capsys.readouterr()
    assert run("seeder", "init", str(tmp_path / "repo")) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_publish_prints_a_summary_and_refuses_a_rollback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    image = make_image(tmp_path / "image.img", MiB)
    assert run("seeder", "init", str(repo)) == 0
    capsys.readouterr()
    assert run("seeder", "publish", str(repo), str(image), "--product", "acme-router",
               "--version", "2.0.0", "--counter", "2", "--hardware-id", "hw1",
               "--hardware-id", "hw2", "--zstd-level", "3") == 0
    out = capsys.readouterr().out
    assert f"{MiB} bytes" in out
    assert "releases/acme-router/2.0.0.json" in out
    assert "chunks:" in out
    manifest_path = Repository.open(repo).target_file_path(
        Repository.open(repo).targets()["releases/acme-router/2.0.0.json"])
    assert str(manifest_path) in out

    assert run("seeder", "publish", str(repo), str(image), "--product", "acme-router",
               "--version", "2.0.1", "--counter", "1", "--hardware-id", "hw1") == 2
    assert "not higher than 2" in capsys.readouterr().err
    assert run("seeder", "publish", str(repo), str(tmp_path / "missing.img"), "--product",
               "acme-router", "--version", "3", "--counter", "3", "--hardware-id", "hw1") == 2
    assert "does not exist" in capsys.readouterr().err


def test_publish_into_a_missing_repository_fails_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_image(tmp_path / "image.img", 64 * 1024)
    assert run("seeder", "publish", str(tmp_path / "nope"), str(image), "--product", "p",
               "--version", "1", "--counter", "1", "--hardware-id", "h") == 2
    assert "not an initialised" in capsys.readouterr().err


def test_timestamp_re_signs_and_only_accepts_positive_lifetimes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    run("seeder", "init", str(repo))
    assert run("seeder", "timestamp", str(repo), "--expires-in-s", "600") == 0
    assert Repository.open(repo).versions()["timestamp"] == 2
    with pytest.raises(SystemExit) as exit_info:
        run("seeder", "timestamp", str(repo), "--expires-in-s", "-5")
    assert exit_info.value.code == 2


def test_serve_refuses_a_directory_without_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("seeder", "serve", str(tmp_path)) == 2
    assert "neither a repository nor an origin" in capsys.readouterr().err


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8460") == ("127.0.0.1", 8460)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8460", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_help_describes_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run("seeder", "--help")
    out = capsys.readouterr().out
    for name in ("init", "publish", "timestamp", "serve"):
        assert name in out


def test_serve_a_repository_then_stop_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo")
    process = subprocess.Popen(
        [sys.executable, "-c", _RUN_CLI, "seeder", "serve", str(repo.path), "--listen",
         "127.0.0.1:0", "--seed-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert str(repo.origin_dir) in line
        url = line.split(" at ", 1)[1].split("/ ", 1)[0]
        assert url.startswith("http://127.0.0.1:")
        response = httpx.get(f"{url}/metadata/root.json", timeout=10)
        assert response.content == repo.root_bytes()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopped after 1 requests" in out
    assert "seeded 0 payloads, 0 bytes uploaded over BitTorrent" in out


def test_timestamp_warns_when_snapshot_is_about_to_expire(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The cron job only renews timestamp: the operator must hear that snapshot (renewed
    # only by publishing) is about to expire, or devices will stop updating.
    repo = tmp_path / "repo"
    run("seeder", "init", str(repo), "--snapshot-expiry-s", "3600")
    capsys.readouterr()
    assert run("seeder", "timestamp", str(repo)) == 0
    captured = capsys.readouterr()
    assert "valid until" in captured.out
    assert "warning: snapshot metadata expires" in captured.err
    assert "targets" not in captured.err


def test_serve_refuses_half_an_identity_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = Repository.create(tmp_path / "repo")
    create_ca(tmp_path / "fleet")
    issue_device_cert(tmp_path / "fleet", tmp_path / "seed-id", "seeder-1", role="seed")
    cases = [
        (["--tracker-pin", "sha256/" + "A" * 43 + "="], "need --identity"),
        (["--identity", str(tmp_path / "seed-id")], "exactly one --announce-url"),
        (["--identity", str(tmp_path / "seed-id"), "--announce-url", "https://a/announce",
          "--announce-url", "https://b/announce"], "exactly one --announce-url"),
        (["--identity", str(tmp_path / "missing"), "--announce-url", "https://a/announce"],
         "cannot read the device identity"),
        (["--identity", str(tmp_path / "seed-id"), "--announce-url", "http://a/announce",
          "--tracker-pin", "sha256/" + "A" * 43 + "=", "--tracker-pin",
          "sha256/" + "Q" * 43 + "="], "--announce-url must be https://"),
        (["--identity", str(tmp_path / "seed-id"), "--announce-url", "https://a/announce",
          "--tracker-pin", "sha256/" + "A" * 43 + "="], "at least two distinct pins"),
    ]
    for extra, message in cases:
        assert run("seeder", "serve", str(repo.path), "--listen", "127.0.0.1:0", *extra) == 2
        assert message in capsys.readouterr().err, extra
