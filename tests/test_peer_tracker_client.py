"""The device side of LAN-first and swarm gating: what the peer sends the tracker."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio

from infra.http_serve import ListenConfig
from peer.config import DeviceConfig
from peer.errors import ConfigError
from peer.http import HttpClient
from peer.swarm_fetch import announce_urls
from peer.tracker_client import checkin
from tracker.config import TrackerConfig
from tracker.server import serve_tracker
from tracker.store import SqliteStore


def device(tracker_url: str, **extra: str) -> DeviceConfig:
    return DeviceConfig(device_id="dev-1", product="acme-router", hardware_id="hw1",
                        origin_url="http://127.0.0.1:1", tracker_url=tracker_url, **extra)


async def test_network_id_and_region_are_declared_at_check_in_only_when_set(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    db = tmp_path / "tracker.db"
    config = TrackerConfig(db_path=db, listen=ListenConfig(host="127.0.0.1", port=0))
    url = await nursery.start(functools.partial(serve_tracker, config))
    async with HttpClient(timeout_s=5) as http:
        offer, _ = await checkin(http, device(url, network_id="gw-5f3a", region="eu-west"),
                                 version="1.0.0", release_counter=1)
        assert offer is None
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


def test_announce_urls_carry_the_device_id() -> None:
    urls = ("http://t.example/announce", "http://u.example/announce?x=1")
    assert announce_urls(urls, None) == urls
    assert announce_urls(urls, "dev:1") == (
        "http://t.example/announce?device_id=dev%3A1",
        "http://u.example/announce?x=1&device_id=dev%3A1")
