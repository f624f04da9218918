"""Configuration files (swarmota/configfile.py): the services and the device started from
a TOML file, options overriding it, every class of bad file refused naming the file and
the key, ``config check``, the generated reference, and a device provisioned from one
file that updates against a real tracker and origin after its state directory moved."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from swarmota.cli import config_schema, main
from swarmota.configdoc import render
from swarmota.infra.devca import create_ca, issue_device_cert, issue_server_cert
from swarmota.peer.config import load_config
from swarmota.peer.state import DeviceState
from swarmota.seeder.repository import Repository
from swarmota.tracker.sqlite_store import SqliteStore
from tests.release_env import HARDWARE_ID, PRODUCT, Fleet

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
CHECKIN = {"device_id": "dev-1", "product": PRODUCT, "hardware_id": HARDWARE_ID,
           "version": "1.0.0", "release_counter": 1}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def serve_tracker_and_check_in(config: Path, *flags: str) -> dict[str, object]:
    """Start ``tracker serve --config config`` in a process, check in once, stop it."""
    proc = subprocess.Popen([sys.executable, "-m", "swarmota.cli", "tracker", "serve",
                             "--config", str(config), *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "tracker listening on" in line, (line, proc.stderr and proc.stderr.read())
        url = line.split("listening on ", 1)[1].split()[0]
        answer = httpx.post(f"{url}/v1/checkin", json=CHECKIN, timeout=30)
        assert answer.status_code == 200, answer.text
        body: dict[str, object] = answer.json()
        proc.terminate()
        proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return body


def poll_after_s(answer: dict[str, object]) -> int:
    value = answer["poll_after_s"]
    assert isinstance(value, int)
    return value


TRACKER_FILE = """
[tracker]
db = "state/tracker.sqlite"
listen = "127.0.0.1:0"
allow_unauthenticated_devices = true
poll_after_s = 120
"""


def test_a_tracker_started_from_a_config_file_serves_a_check_in_on_loopback(
        tmp_path: Path) -> None:
    config = write(tmp_path / "etc" / "tracker.toml", TRACKER_FILE)
    (tmp_path / "etc" / "state").mkdir()
    assert 100 <= poll_after_s(serve_tracker_and_check_in(config)) <= 140  # 120, jittered
    # the database's relative path is relative to the file's directory, not the cwd
    store = SqliteStore(tmp_path / "etc" / "state" / "tracker.sqlite")
    try:
        device = store.device("dev-1")
    finally:
        store.close()
    assert device is not None and device.version == "1.0.0"


def test_an_option_on_the_command_line_overrides_the_file_key(tmp_path: Path) -> None:
    config = write(tmp_path / "tracker.toml", TRACKER_FILE)
    (tmp_path / "state").mkdir()
    answer = serve_tracker_and_check_in(config, "--poll-after-s", "240")
    assert 200 <= poll_after_s(answer) <= 280  # 240 jittered, not the file's 120


def test_a_lab_flag_on_the_command_line_drops_the_files_key_of_its_exclusive_pair(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the file names a fleet CA; --allow-unauthenticated-devices on the command line wins
    # (the missing CA file is then never read), the database's directory is missing
    config = write(tmp_path / "tracker.toml",
                   '[tracker]\ndb = "no/such/dir/t.sqlite"\ndevice_ca = "missing.pem"\n')
    assert main(["tracker", "serve", "--config", str(config),
                 "--allow-unauthenticated-devices"]) == 2
    err = capsys.readouterr().err
    assert "no/such/dir does not exist" in err and "missing.pem" not in err


BAD_FILES = [
    ("unknown-key", '[tracker]\ndb = "t.sqlite"\npoll_afer_s = 5\n',
     ["unknown key 'tracker.poll_afer_s'", "did you mean tracker.poll_after_s"]),
    ("wrong-type", '[tracker]\ndb = "t.sqlite"\ntls_cert = 5\n',
     ["tracker.tls_cert: expected a path, got the integer 5"]),
    ("wrong-bool", '[tracker]\ndb = "t.sqlite"\nallow_unauthenticated_devices = "yes"\n',
     ["tracker.allow_unauthenticated_devices: expected true or false, got the string 'yes'"]),
    ("wrong-array", '[tracker]\ndb = "t.sqlite"\ntrusted_proxies = "10.0.0.0/8"\n',
     ["tracker.trusted_proxies: expected an array of strings"]),
    ("bad-value", '[tracker]\ndb = "t.sqlite"\npoll_after_s = 1\n',
     ["tracker.poll_after_s: 1 outside", "(as for --poll-after-s)"]),
    ("bad-address", '[tracker]\ndb = "t.sqlite"\nlisten = "::1:80"\n',
     ["tracker.listen:", "(as for --listen)"]),
    ("exclusive", '[tracker]\ndb = "t.sqlite"\ndevice_ca = "ca.pem"\n'
                  'allow_unauthenticated_devices = true\n',
     ["tracker.allow_unauthenticated_devices and tracker.device_ca exclude each other"]),
    ("unknown-table", '[trackr]\ndb = "t.sqlite"\n',
     ["unknown table or key 'trackr'; a tracker configuration file holds [tracker]"]),
    ("not-a-table", 'tracker = "t.sqlite"\n', ["'tracker' must be a table ([tracker])"]),
    ("not-toml", '[tracker\ndb = "t.sqlite"\n', ["not a valid TOML file"]),
]


@pytest.mark.parametrize("name, text, words", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_each_class_of_bad_file_is_refused_naming_the_file_and_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str,
        words: list[str]) -> None:
    config = write(tmp_path / f"{name}.toml", text)
    for argv in (["tracker", "serve", "--config", str(config)],
                 ["config", "check", str(config), "--kind", "tracker"]):
        assert main(argv) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"error: {config}:" in err, err
        for word in words:
            assert word in err, err
    assert not (tmp_path / "t.sqlite").exists()  # nothing started


def test_a_missing_config_file_is_refused(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["seeder", "serve", "--config", str(tmp_path / "nope.toml")]) == 2
    assert f"config file {tmp_path / 'nope.toml'} does not exist" in capsys.readouterr().err


def test_required_options_missing_from_both_file_and_command_line_are_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "tracker.toml", "[tracker]\npoll_after_s = 60\n")
    with pytest.raises(SystemExit) as info:
        main(["tracker", "serve", "--config", str(config)])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--db (as options, or as the keys db in the [tracker] table of {config})" in err


def test_config_check_guesses_the_kind_from_the_tables_or_asks_for_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    origin = write(tmp_path / "origin.toml", '[origin]\ndirectory = "repo"\nseed = false\n')
    assert main(["config", "check", str(origin)]) == 0
    assert "a valid origin configuration file (guessed from its [origin] table" in \
        capsys.readouterr().out
    empty = write(tmp_path / "empty.toml", "# nothing\n")
    mixed = write(tmp_path / "mixed.toml", "[tracker]\n[origin]\n")
    for path, reason in ((empty, "it has none of the tables [tracker], [origin], [device], "
                                 "[agent]"),
                         (mixed, "it has tables of several kinds (origin, tracker)")):
        assert main(["config", "check", str(path)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{path}: cannot tell which kind" in err and reason in err
        assert "give --kind tracker|origin|device" in err
    # a tracker file lacking the database is usable, the database then comes as an option
    tracker = write(tmp_path / "t.toml", "[tracker]\nallow_unauthenticated_devices = true\n")
    assert main(["config", "check", str(tracker), "--kind", "tracker"]) == 0
    assert "'swarmota tracker serve' needs --db on its command line" in capsys.readouterr().out


def test_the_agent_takes_its_state_directory_from_the_device_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "device.toml", '[device]\nstate = "dev"\n[agent]\n'
                                             "seed_time_s = 0\n")
    assert main(["peer", "update", "--config", str(config)]) == 2
    assert f"{tmp_path / 'dev'} is not a device state directory" in capsys.readouterr().err


def test_the_configuration_reference_is_generated_from_the_parsers() -> None:
    schema = config_schema()
    committed = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    assert committed == render(schema), \
        "docs/CONFIGURATION.md is stale: python -m swarmota.configdoc > docs/CONFIGURATION.md"
    for table, keys in schema.keys.items():
        for name, key in keys.items():
            assert key.help, f"[{table}] {name} ({key.flag}) has no help text"
    # every option of the commands is a key (the parsers are the definitions)
    assert {"labels", "network_id", "region", "tls_ca_file", "tls_pins", "identity_cert",
            "policy", "force"} <= set(schema.keys["device"])
    assert {"state", "poll_interval_s", "seed_time_s", "dbus"} <= set(schema.keys["agent"])


def _files_of_the_examples(tmp: Path) -> None:
    """The files the example configurations name, made for real in ``tmp``."""
    Repository.create(tmp / "repo")
    shutil.copyfile(tmp / "repo" / "origin" / "metadata" / "root.json", tmp / "root.json")
    pki = tmp / "pki"
    shutil.copyfile(create_ca(pki / "server-ca"), tmp / "server-ca.pem")
    tracker = issue_server_cert(pki / "server-ca", pki / "tracker", ["tracker.example.net"])
    shutil.copyfile(tracker.cert, tmp / "tracker.pem")
    shutil.copyfile(tracker.key, tmp / "tracker-key.pem")
    shutil.copyfile(create_ca(pki / "fleet-ca"), tmp / "fleet-ca.pem")
    issue_device_cert(pki / "fleet-ca", tmp / "identity", "router-0042")
    write(tmp / "policy.toml", '[schedule]\nwindows = ["02:00-05:00"]\n')
    (tmp / "factory.img").write_bytes(b"\0" * 4096)


def test_the_example_files_pass_config_check(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for kind in ("tracker", "origin", "device"):
        shutil.copyfile(EXAMPLES / f"{kind}.toml", tmp_path / f"{kind}.toml")
    # the command's own checks run: the files the device's example names must exist
    assert main(["config", "check", str(tmp_path / "device.toml")]) == 2
    assert "refused by 'swarmota peer init'" in capsys.readouterr().err
    _files_of_the_examples(tmp_path)
    for kind in ("tracker", "origin", "device"):
        assert main(["config", "check", str(tmp_path / f"{kind}.toml")]) == 0, \
            capsys.readouterr().err
        assert f"a valid {kind} configuration file" in capsys.readouterr().out
    # a fleet CA file that is not one: refused through the tracker's own check
    (tmp_path / "fleet-ca.pem").write_text("not a certificate")
    assert main(["config", "check", str(tmp_path / "tracker.toml")]) == 2
    assert "refused by 'swarmota tracker serve'" in capsys.readouterr().err


async def test_peer_init_from_a_file_makes_a_relocatable_device_that_updates(
        fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = fleet.env
    conf = tmp_path / "provision"
    conf.mkdir()
    shutil.copyfile(fleet.server_ca, conf / "server-ca.pem")
    shutil.copyfile(env.workdir / "root.json", conf / "root.json")
    (conf / "factory.img").write_bytes(env.v1)
    issue_device_cert(fleet.pki / "fleet-ca", conf / "identity", "dev-cfg")
    write(conf / "policy.toml", "[storage]\nreserve_bytes = 0\n")
    pins = ", ".join(f'"{pin}"' for pin in fleet.pins)
    device_toml = write(conf / "device.toml", f"""
[device]
state = "../devices/dev-cfg"
root = "root.json"
image = "factory.img"
version = "1.0.0"
release_counter = 1
device_id = "dev-cfg"
product = "{PRODUCT}"
hardware_id = "{HARDWARE_ID}"
origin = "{env.origin_url}"
tracker = "{env.tracker_url}"
tls_pins = [{pins}]
tls_ca_file = "server-ca.pem"
identity_cert = "identity/cert.pem"
identity_key = "identity/key.pem"
labels = ["eu-beta", "lab"]
network_id = "net-1"
region = "eu-west"
policy = "policy.toml"
download_mode = "direct"
seed_time_s = 0

[agent]
seed_time_s = 0
""")
    assert await trio.to_thread.run_sync(main, ["peer", "init", "--config",
                                                str(device_toml)]) == 0
    state = tmp_path / "devices" / "dev-cfg"
    assert "device dev-cfg provisioned in" in capsys.readouterr().out
    assert (state / "device.json").is_file()  # relative to the file's directory
    config = load_config(state / "device.json")
    assert (config.labels, config.network_id, config.region) == (("eu-beta", "lab"), "net-1",
                                                                 "eu-west")
    assert (state / "tls-ca.pem").read_bytes() == fleet.server_ca.read_bytes()
    assert (state / "policy.toml").is_file() and (state / "identity" / "cert.pem").is_file()

    # the same file again: refused clearly, the device untouched
    before = (state / "device.json").read_bytes()
    assert await trio.to_thread.run_sync(main, ["peer", "init", "--config",
                                                str(device_toml)]) == 2
    assert "is already a device state directory (use --force)" in capsys.readouterr().err
    assert (state / "device.json").read_bytes() == before

    # nothing outside the state directory is needed: the files beside the config go,
    # the directory moves, and the device updates from its new place over pinned TLS,
    # with its identity, against the real tracker and origin
    shutil.rmtree(conf)
    moved = tmp_path / "elsewhere" / "dev"
    moved.parent.mkdir()
    state.rename(moved)
    rc = await trio.to_thread.run_sync(main, ["peer", "update", str(moved)])
    assert rc == 0, capsys.readouterr()
    assert DeviceState(moved).bootctl().slot(DeviceState(moved).bootctl().primary).version \
        == "2.0.0"
    store = SqliteStore(env.db)
    try:
        seen = store.device("dev-cfg")
    finally:
        store.close()
    assert seen is not None
    assert (seen.labels, seen.network_id, seen.region) == (("eu-beta", "lab"), "net-1",
                                                           "eu-west")
