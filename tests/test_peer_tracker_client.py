"""The device side of LAN-first and swarm gating: what the peer sends the tracker."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio

from swarmota.infra.http_serve import ListenConfig
from swarmota.peer.config import DeviceConfig
from swarmota.peer.errors import ConfigError
from swarmota.peer.http import HttpClient
from swarmota.peer.swarm_fetch import announce_urls
from swarmota.peer.tracker_client import checkin
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore


def device(tracker_url: str, **extra: str) -> DeviceConfig:
    return DeviceConfig(device_id="dev-1", product="acme-router", hardware_id="hw1",
                        origin_url="http://127.0.0.1:1", tracker_url=tracker_url, **extra)


async def test_network_id_and_region_are_declared_at_check_in_only_when_set(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    db = tmp_path / "tracker.db"
    config = TrackerConfig(db_path=db, listen=ListenConfig(host="127.0.0.1", port=0))
    url = await nursery.start(functools.partial(serve_tracker, config))
    async with HttpClient(timeout_s=5) as http:
        config = DeviceConfig(device_id="dev-1", product="acme-router", hardware_id="hw1",
                              origin_url="http://127.0.0.1:1", tracker_url=url,
                              network_id="gw-5f3a", region="eu-west", labels=("beta",))
        with SqliteStore(db) as store:
            register_release(store, Release.create("acme-router", "2.0.0", 2),
                             RolloutPlan(canary_label="beta"))
        offer, _ = await checkin(http, config, version="1.0.0", release_counter=1)
        assert offer is not None and offer.version == "2.0.0"  # a canary by its label
        with SqliteStore(db) as store:
            record = store.device("dev-1")
        assert record is not None and (record.network_id, record.region) == ("gw-5f3a",
                                                                             "eu-west")
        await checkin(http, device(url), version="1.0.0", release_counter=1)
        with SqliteStore(db) as store:
            record = store.device("dev-1")
        assert record is not None and record.network_id is None


def test_bad_network_ids_are_refused_by_the_device_config() -> None:
    with pytest.raises(ConfigError, match="network_id"):
        device("http://127.0.0.1:1", network_id="spaces are not ok")
    with pytest.raises(ConfigError, match="labels"):
        DeviceConfig(device_id="d", product="p", hardware_id="h", origin_url="http://o",
                     tracker_url="http://t", labels=("a/b",))


def test_announce_urls_carry_the_device_id() -> None:
    urls = ("http://t.example/announce", "http://u.example/announce?x=1")
    assert announce_urls(urls, None) == urls
    assert announce_urls(urls, "dev:1") == (
        "http://t.example/announce?device_id=dev%3A1",
        "http://u.example/announce?x=1&device_id=dev%3A1")
