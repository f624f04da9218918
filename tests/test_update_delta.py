"""Delta updates end to end: the device picks the delta for its active slot, verifies
base and result, and falls back to the full payload when anything about the delta fails."""

from __future__ import annotations

from swarmota.demo import mutate_image
from swarmota.manifest import ReleaseManifest
from swarmota.peer.agent import update_once
from swarmota.peer.errors import StatusCode
from swarmota.seeder.publish import publish_release
from tests.release_env import HARDWARE_ID, PRODUCT, ReleaseEnv, flip_byte


def publish_v3_with_deltas(env: ReleaseEnv) -> tuple[bytes, ReleaseManifest]:
    v3 = mutate_image(env.v2, seed=13, fraction=0.02)
    bases = [env.image_path("base-v1.img", env.v1), env.image_path("base-v2.img", env.v2)]
    m3 = publish_release(env.repo, env.image_path("v3.img", v3), product=PRODUCT,
                         version="3.0.0", release_counter=3, compatibility=[HARDWARE_ID],
                         zstd_level=3, bases=bases)
    env.register(m3)
    return v3, m3


async def test_device_on_v1_installs_v3_from_the_delta_for_v1(env: ReleaseEnv) -> None:
    v3, m3 = publish_v3_with_deltas(env)
    delta = m3.delta_for(m3.payloads[0].sha256)  # no delta from the full payload itself
    assert delta is None
    from_v1 = m3.delta_for(env.m1.image.sha256)
    assert from_v1 is not None and from_v1.size < m3.full_payload.size
    dev = env.device("dev-1")
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert result.payload_kind == "delta" and result.delta_fallback is None
    assert result.bytes_origin == env.origin_bytes(from_v1)
    assert dev.slot_path("b").read_bytes() == v3
    assert not list(dev.downloads_dir.iterdir())


async def test_delta_refused_when_active_slot_is_not_its_base_then_full_payload(
        env: ReleaseEnv) -> None:
    v3, _ = publish_v3_with_deltas(env)
    dev = env.device("dev-1")
    flip_byte(dev.slot_path("a"), 5000)  # the slot no longer matches its record
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert result.payload_kind == "full"
    assert result.delta_fallback and "not the base" in result.delta_fallback
    assert dev.slot_path("b").read_bytes() == v3


async def test_corrupt_delta_on_origin_falls_back_to_full_payload(env: ReleaseEnv) -> None:
    v3, m3 = publish_v3_with_deltas(env)
    from_v1 = m3.delta_for(env.m1.image.sha256)
    assert from_v1 is not None
    flip_byte(env.repo.origin_dir / from_v1.path, from_v1.size // 2)
    dev = env.device("dev-1")
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert result.payload_kind == "full" and result.delta_fallback
    assert dev.slot_path("b").read_bytes() == v3
    assert [r.status for r in env.reports()] == [0]
