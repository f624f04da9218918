"""``swarmota seeder serve`` with TLS and a rate limit: what an operator types and reads."""

from __future__ import annotations

import argparse
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from swarmota.seeder import Repository, cli
from tests.test_origin_tls import make_self_signed_cert

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


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.create(tmp_path / "repo")


@pytest.mark.parametrize("flag", ["--tls-cert", "--tls-key"])
def test_one_tls_flag_without_the_other_is_refused(
    repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    cert, key = make_self_signed_cert(tmp_path)
    given = cert if flag == "--tls-cert" else key
    assert run("seeder", "serve", str(repo.path), "--listen", "127.0.0.1:0",
               flag, str(given)) == 2
    err = capsys.readouterr().err
    assert "--tls-cert and --tls-key go together" in err


def test_missing_or_bad_tls_files_are_refused(
    repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = make_self_signed_cert(tmp_path)
    missing = tmp_path / "missing.pem"
    assert run("seeder", "serve", str(repo.path), "--tls-cert", str(missing),
               "--tls-key", str(key)) == 2
    err = capsys.readouterr().err
    assert f"--tls-cert {missing}: cannot read" in err
    assert run("seeder", "serve", str(repo.path), "--tls-cert", str(cert),
               "--tls-key", str(missing)) == 2
    assert f"--tls-key {missing}: cannot read" in capsys.readouterr().err
    # Swapped: the key file is no certificate.
    assert run("seeder", "serve", str(repo.path), "--tls-cert", str(key),
               "--tls-key", str(cert)) == 2
    assert "not a PEM certificate and its private key" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [
    ("262144", 262144), ("2.5M", 2_500_000), ("20Mi", 20 * 1024 * 1024), ("64k", 64_000),
    ("1Gi", 1024**3),
])
def test_rate_limit_argument(text: str, value: int) -> None:
    parser = argparse.ArgumentParser(prog="swarmota")
    cli.add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["seeder", "serve", "x", "--rate-limit-bytes-per-s", text])
    assert args.rate_limit_bytes_per_s == value


@pytest.mark.parametrize("text", ["0", "-5", "fast", "20X", "1e6", ""])
def test_bad_rate_limit_is_refused(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("seeder", "serve", "x", "--rate-limit-bytes-per-s", text)
    assert exit_info.value.code == 2
    assert "--rate-limit-bytes-per-s" in capsys.readouterr().err


def test_serve_over_https_with_a_rate_limit(repo: Repository, tmp_path: Path) -> None:
    cert, key = make_self_signed_cert(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-c", _RUN_CLI, "seeder", "serve", str(repo.path), "--listen",
         "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key),
         "--rate-limit-bytes-per-s", "1Mi", "--no-seed"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.split(" at ", 1)[1].split("/ ", 1)[0]
        assert url.startswith("https://127.0.0.1:")
        assert "rate limit: 1048576 bytes/s" in process.stdout.readline()
        context = ssl.create_default_context(cafile=str(cert))
        response = httpx.get(f"{url}/metadata/root.json", verify=context, timeout=10)
        assert response.content == repo.root_bytes()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopped after 1 requests" in out
