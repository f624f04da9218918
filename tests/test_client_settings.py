"""Where the command line finds the tracker (tracker/client_settings.py): flags over
environment variables over the client config file over defaults; errors naming the
file and key; a token others can read is flagged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from swarmota.tracker.client_settings import (
    DEFAULT_URL,
    default_config_path,
    load_settings,
    read_config_file,
)
from swarmota.tracker.errors import ConfigError

TOKEN = "sot_" + "a" * 43
NO_FLAGS: dict[str, str | None] = {"url": None, "ca_file": None, "token": None}


def write_config(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_settings_come_from_flags_then_env_then_the_config_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "xdg" / "swarmota" / "client.toml", f"""
[tracker]
url = "https://file.example:8470/"
ca_file = "ca.pem"
token = "{TOKEN}"
""")
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    from_file = load_settings(NO_FLAGS, environ)
    assert (from_file.url, from_file.ca_file, from_file.token) == (
        "https://file.example:8470", tmp_path / "xdg" / "swarmota" / "ca.pem", TOKEN)
    assert from_file.sources == {"url": f"{config}: tracker.url",
                                 "ca_file": f"{config}: tracker.ca_file",
                                 "token": f"{config}: tracker.token"}
    assert from_file.warnings == ()

    environ.update(SWARMOTA_TRACKER_URL="https://env.example", SWARMOTA_TRACKER_TOKEN="t2")
    from_env = load_settings(NO_FLAGS, environ)
    assert (from_env.url, from_env.token) == ("https://env.example", "t2")
    assert from_env.sources["url"] == "$SWARMOTA_TRACKER_URL"
    assert from_env.ca_file == from_file.ca_file  # the file still fills the gaps

    from_flags = load_settings({"url": "http://127.0.0.1:1", "ca_file": "/x.pem",
                                "token": "t3"}, environ)
    assert (from_flags.url, from_flags.ca_file, from_flags.token) == (
        "http://127.0.0.1:1", Path("/x.pem"), "t3")
    assert from_flags.sources == {"url": "--url", "ca_file": "--ca-file", "token": "--token"}


def test_without_any_setting_the_defaults_hold(tmp_path: Path) -> None:
    settings = load_settings(NO_FLAGS, {"HOME": str(tmp_path)})
    assert (settings.url, settings.ca_file, settings.token) == (DEFAULT_URL, None, None)
    assert default_config_path({"HOME": str(tmp_path)}) == \
        tmp_path / ".config" / "swarmota" / "client.toml"


def test_a_named_config_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"client config file {missing} does not exist"):
        load_settings(NO_FLAGS, {}, missing)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(NO_FLAGS, {"SWARMOTA_CLIENT_CONFIG": str(missing)})
    explicit = write_config(tmp_path / "ops.toml", '[tracker]\nurl = "http://127.0.0.1:9"\n')
    assert load_settings(NO_FLAGS, {"SWARMOTA_CLIENT_CONFIG": str(explicit)}).url == \
        "http://127.0.0.1:9"


@pytest.mark.parametrize("text, words", [
    ("[tracker]\nurl = 5\n", "c.toml: tracker.url must be a string"),
    ("[tracker]\ntokn = 'x'\n", "c.toml: unknown key 'tracker.tokn'; known: tracker.url, "
                                "tracker.ca_file, tracker.token"),
    ("url = 'http://x'\n", "c.toml: unknown key 'url'; the file holds a [tracker] table"),
    ("tracker = 'x'\n", "c.toml: 'tracker' must be a table"),
    ("[tracker\n", "c.toml: not a valid TOML file"),
    ("[tracker]\nurl = 'ftp://x'\n", "c.toml: tracker.url: 'ftp://x' is not an http:// or "
                                     "https:// URL"),
    ("[tracker]\ntoken = 'two words'\n", "c.toml: tracker.token: not a token"),
])
def test_a_bad_config_file_is_refused_naming_the_file_and_the_key(
        tmp_path: Path, text: str, words: str) -> None:
    path = write_config(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as exc:
        load_settings(NO_FLAGS, {}, path)
    assert str(exc.value).startswith(str(tmp_path)) and words in str(exc.value)


def test_a_bad_environment_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$SWARMOTA_TRACKER_URL: 'tracker:8470' is not"):
        load_settings(NO_FLAGS, {"HOME": str(tmp_path), "SWARMOTA_TRACKER_URL": "tracker:8470"})


def test_a_token_in_a_world_readable_config_file_gets_a_warning(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", f'[tracker]\ntoken = "{TOKEN}"\n', 0o644)
    (warning,) = load_settings(NO_FLAGS, {}, path).warnings
    assert f"{path} holds an admin token and every user of this host may read it " \
           f"(mode 644): run 'chmod 600 {path}'" == warning
    path.chmod(0o600)
    assert load_settings(NO_FLAGS, {}, path).warnings == ()
    # a token from elsewhere does not make the readable file a problem
    path.write_text('[tracker]\nurl = "http://127.0.0.1:1"\n')
    path.chmod(0o644)
    assert load_settings({**NO_FLAGS, "token": TOKEN}, {}, path).warnings == ()
    assert read_config_file(path, required=True).mode == 0o644


def test_a_token_sent_in_clear_to_another_host_gets_a_warning(tmp_path: Path) -> None:
    settings = load_settings({"url": "http://tracker.example:8470", "ca_file": None,
                              "token": TOKEN}, {"HOME": str(tmp_path)})
    assert any("over plain HTTP" in w for w in settings.warnings)
    local = load_settings({"url": "http://[::1]:8470", "ca_file": None, "token": TOKEN},
                          {"HOME": str(tmp_path)})
    assert local.warnings == ()


def test_the_config_file_documented_for_operators_is_valid(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS-CLI.md").read_text()
    found = re.search(r"```toml\n(\[tracker\].*?)```", text, re.S)
    assert found is not None
    path = write_config(tmp_path / "client.toml",
                        found.group(1).replace("sot_...", TOKEN))
    settings = load_settings(NO_FLAGS, {}, path)
    assert settings.url == "https://tracker.example.net:8470"
    assert settings.ca_file == tmp_path / "server-ca.pem" and settings.token == TOKEN
