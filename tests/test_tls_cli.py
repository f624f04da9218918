"""``swarmota tls ...`` and ``peer init --tls-pin/--tls-ca-file``: what an operator types."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from swarmota.cli import main
from swarmota.infra.tlspin import pin_of_pem
from swarmota.peer.config import load_config
from swarmota.seeder import Repository
from tests.release_env import HARDWARE_ID, PRODUCT
from tests.test_seeder_cli import run as run_seeder


def test_ca_cert_key_and_pin_commands(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tls", "ca", str(tmp_path / "ca")]) == 0
    assert "--tls-ca-file" in capsys.readouterr().out
    assert main(["tls", "ca", str(tmp_path / "ca")]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err

    assert main(["tls", "cert", str(tmp_path / "srv"), "--ca", str(tmp_path / "ca"),
                 "--name", "127.0.0.1", "--name", "origin.local", "--backup"]) == 0
    out = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()
               if not line.startswith("backup"))
    assert out["pin"] == pin_of_pem((tmp_path / "srv" / "cert.pem").read_bytes())
    assert stat.S_IMODE((tmp_path / "srv" / "backup-key.pem").stat().st_mode) == 0o600

    assert main(["tls", "pin", str(tmp_path / "srv" / "key.pem")]) == 0
    assert capsys.readouterr().out.strip() == out["pin"]

    assert main(["tls", "key", str(tmp_path / "spare.pem")]) == 0
    spare_pin = capsys.readouterr().out.strip()
    assert main(["tls", "cert", str(tmp_path / "rotated"), "--ca", str(tmp_path / "ca"),
                 "--name", "127.0.0.1", "--key", str(tmp_path / "spare.pem")]) == 0
    assert f"pin         {spare_pin}" in capsys.readouterr().out

    assert main(["tls", "pin", str(tmp_path / "ca" / "nothing.pem")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["tls", "cert", str(tmp_path / "x"), "--ca", str(tmp_path / "ca"),
                 "--name", "not a name"]) == 1
    assert "neither an IP address nor a DNS name" in capsys.readouterr().err


def test_help_explains_what_pins_are_for(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["tls", "pin", "--help"])
    assert "backup" in capsys.readouterr().out


def test_peer_init_stores_pins_and_ca_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert run_seeder("seeder", "init", str(tmp_path / "repo")) == 0
    root = tmp_path / "root.json"
    root.write_bytes(Repository.open(tmp_path / "repo").root_bytes())
    main(["tls", "ca", str(tmp_path / "ca")])
    image = tmp_path / "factory.img"
    image.write_bytes(b"\0" * 4096)
    pins = ["sha256/" + base64.b64encode(bytes([i]) * 32).decode() for i in (1, 2)]
    common = ["peer", "init", str(tmp_path / "dev"), "--root", str(root),
              "--image", str(image), "--version", "1.0.0", "--device-id", "d1",
              "--product", PRODUCT, "--hardware-id", HARDWARE_ID,
              "--tracker", "https://127.0.0.1:8470"]
    assert main([*common, "--origin", "http://127.0.0.1:8460", "--tls-pin", pins[0],
                 "--tls-pin", pins[1]]) == 2
    assert "origin_url must be https" in capsys.readouterr().err
    assert main([*common, "--origin", "https://127.0.0.1:8460", "--tls-pin", pins[0]]) == 2
    assert "at least two distinct pins" in capsys.readouterr().err
    assert main([*common, "--origin", "https://127.0.0.1:8460", "--tls-pin", pins[0],
                 "--tls-pin", pins[1], "--tls-ca-file", str(tmp_path / "ca" / "ca.pem")]) == 0
    config = load_config(tmp_path / "dev" / "device.json")
    assert config.tls_pins == tuple(pins)
    assert config.tls_ca_file == str((tmp_path / "ca" / "ca.pem").resolve())
    assert json.loads((tmp_path / "dev" / "device.json").read_text())["tls_pins"] == pins
