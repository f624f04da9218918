"""Metadata benchmark: what one update costs a device in TUF metadata as history grows.

Publishes a history of releases into a fresh repository, round-robin over
``--products`` products (``--releases`` in all; by default 1,000 releases of 20
products), with :func:`seeder.publish.publish_release`, exactly as ``swarmota seeder
publish`` does (small generated images: the payload's size does not change the
metadata). The origin server (:class:`seeder.origin.OriginApp`, on loopback) serves
the repository. At each checkpoint (``--checkpoints`` history sizes), a device of the
first product that followed every earlier update (its trust directory holds the
metadata of the previous release) takes one more update: the agent's metadata step
(:func:`peer.trust.fetch_release_manifest`, compact manifest as the agent reads it),
and the benchmark records the TUF metadata bytes it downloaded, the manifest's bytes,
and the sizes of timestamp, snapshot, top-level targets and the product's delegated
role (its release list) on the origin. A device that starts from its provisioned root
alone is measured too (first contact).

Target (issue 20): per-device metadata bytes for one update in a repository of 1,000
releases of 20 products <= 16 KiB.

Run: ``.venv/bin/python -m bench.metadata [--releases N] [--products P] [--out DIR]``.
Results go to ``metadata.json`` and ``metadata.md`` in ``--out`` (``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from bench.delta import machine_info
from swarmota.infra.fsio import atomic_write_bytes
from swarmota.infra.http_serve import ListenConfig
from swarmota.manifest import release_target_name
from swarmota.peer.trust import fetch_release_manifest
from swarmota.seeder.origin import OriginApp, OriginConfig
from swarmota.seeder.publish import publish_release
from swarmota.seeder.repository import Repository
from swarmota.seeder.server import serve_origin
from swarmota.seeder.staging import delegated_role

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
TARGET_BYTES = 16 * 1024
_IMAGE_BYTES = 16 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """One update taken by a device when the repository held ``releases`` releases."""

    releases: int
    metadata_bytes: int  # TUF metadata the device downloaded for this update
    manifest_bytes: int  # the release manifest it downloaded (compact form)
    first_contact_metadata_bytes: int  # the same update, from the provisioned root
    timestamp_bytes: int
    snapshot_bytes: int
    targets_bytes: int  # top-level targets metadata on the origin
    product_list_bytes: int  # the device's product's delegated role (0: none)
    publish_s: float  # wall time of the last publish


def product_name(index: int) -> str:
    return f"product-{index:02d}"


def version_name(release: int) -> str:
    return f"1.{release}.0"


def _image(path: Path, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(_IMAGE_BYTES))
    return path


def _publish(repo: Repository, work: Path, product: int, release: int) -> float:
    started = time.monotonic()
    publish_release(repo, _image(work / "image.img", product * 1_000_003 + release),
                    product=product_name(product), version=version_name(release),
                    release_counter=release, compatibility=[f"{product_name(product)}-hw"],
                    zstd_level=1)
    return time.monotonic() - started


def _device_update(trust: Path, url: str, target: str, scratch: Path) -> tuple[int, int]:
    """One metadata step of the agent: ``(TUF metadata bytes, manifest bytes)`` (the
    agent counts both as its metadata; here they are apart)."""
    manifest, received = fetch_release_manifest(trust, url, target, timeout_s=30.0,
                                                scratch_dir=scratch, compact=True)
    return received - len(manifest), len(manifest)


def _metadata_size(repo: Repository, role: str) -> int:
    """Bytes of ``role``'s committed metadata on the origin (0: no such role)."""
    if role == "timestamp":
        return len((repo.metadata_dir / "timestamp.json").read_bytes())
    version = repo.versions().get(role)
    return 0 if version is None else len(
        (repo.metadata_dir / f"{version}.{role}.json").read_bytes())


async def run(workdir: Path, *, releases: int, products: int,
              checkpoints: Sequence[int]) -> list[Checkpoint]:
    """Publish the history and measure a device's update at every checkpoint."""
    if products < 1 or releases < products:
        raise ValueError("need at least one release of every product")
    repo = Repository.create(workdir / "repo")
    work = workdir / "work"
    work.mkdir()
    trust = workdir / "device" / "trust"
    trust.mkdir(parents=True)
    (trust / "root.json").write_bytes(repo.root_bytes())
    wanted = sorted({c for c in checkpoints if products <= c <= releases} | {releases})
    out: list[Checkpoint] = []
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_origin, OriginApp(repo.origin_dir, OriginConfig()),
                                  ListenConfig(host="127.0.0.1"))
        published = 0
        for checkpoint in wanted:
            # the history up to the checkpoint; the device takes product 0's releases
            # as they come, except the last one: that is the update measured
            last_of_product_0 = (checkpoint - 1) // products * products
            seconds = 0.0
            while published < checkpoint:
                product, release = published % products, published // products + 1
                seconds = await trio.to_thread.run_sync(_publish, repo, work, product,
                                                        release)
                if product == 0 and published < last_of_product_0:
                    await trio.to_thread.run_sync(
                        _device_update, trust, url,
                        release_target_name(product_name(0), version_name(release)),
                        workdir / "device" / "scratch")
                published += 1
            # the device's update: product 0's latest release
            latest = release_target_name(product_name(0),
                                         version_name(last_of_product_0 // products + 1))
            metadata, manifest = await trio.to_thread.run_sync(
                _device_update, trust, url, latest, workdir / "device" / "scratch")
            fresh = workdir / f"fresh-{checkpoint}"
            fresh.mkdir()
            (fresh / "root.json").write_bytes(repo.root_bytes())
            first, _ = await trio.to_thread.run_sync(
                _device_update, fresh, url, latest, workdir / "device" / "scratch")
            out.append(Checkpoint(
                releases=checkpoint, metadata_bytes=metadata, manifest_bytes=manifest,
                first_contact_metadata_bytes=first,
                timestamp_bytes=_metadata_size(repo, "timestamp"),
                snapshot_bytes=_metadata_size(repo, "snapshot"),
                targets_bytes=_metadata_size(repo, "targets"),
                product_list_bytes=_metadata_size(repo, delegated_role(latest) or "-"),
                publish_s=seconds))
            print(f"  {checkpoint:5d} releases: {metadata:,} metadata bytes per update "
                  f"(first contact {first:,}), manifest {manifest:,}", flush=True)
        nursery.cancel_scope.cancel()
    return out


def render_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = ["# Metadata benchmark (history of releases)", "",
             f"{cfg['releases']:,} releases of {cfg['products']} products published with "
             "`seeder publish`'s code, round-robin; the origin server on loopback. A device "
             "of one product that took every update takes one more at each history size; "
             "bytes are what it downloaded (TUF metadata through python-tuf, then the "
             "compact release manifest).", "",
             "| releases in the repository | metadata per update | first contact | "
             "release manifest | timestamp | snapshot | top-level targets | the product's "
             "release list | last publish s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["checkpoints"]:
        lines.append(f"| {c['releases']:,} | {c['metadata_bytes']:,} "
                     f"| {c['first_contact_metadata_bytes']:,} | {c['manifest_bytes']:,} "
                     f"| {c['timestamp_bytes']:,} | {c['snapshot_bytes']:,} "
                     f"| {c['targets_bytes']:,} | {c['product_list_bytes']:,} "
                     f"| {c['publish_s']:.2f} |")
    target = result["target"]
    lines += ["", f"Target: per-device metadata bytes for one update with "
                  f"{cfg['releases']:,} releases of {cfg['products']} products <= "
                  f"{target['bytes']:,}: {target['measured']:,} "
                  f"({'met' if target['met'] else 'NOT met'})."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.metadata", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--releases", type=int, default=1000,
                        help="releases in the history (default 1000)")
    parser.add_argument("--products", type=int, default=20,
                        help="products they are spread over (default 20)")
    parser.add_argument("--checkpoints", type=int, nargs="*",
                        default=[20, 100, 250, 500, 1000],
                        help="history sizes at which the device takes an update")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for metadata.json and metadata.md")
    args = parser.parse_args(argv)
    if args.products < 1 or args.releases < args.products:
        parser.error("--releases must be at least --products, which must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-metadata-") as tmp:
        points = trio.run(lambda: run(Path(tmp), releases=args.releases,
                                      products=args.products, checkpoints=args.checkpoints))
    last = points[-1]
    result = {
        "benchmark": "metadata",
        "config": {"releases": args.releases, "products": args.products},
        "checkpoints": [asdict(p) for p in points],
        "target": {"bytes": TARGET_BYTES, "measured": last.metadata_bytes,
                   "met": last.metadata_bytes <= TARGET_BYTES},
        "machine": machine_info({}),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "metadata.json",
                       (json.dumps(result, indent=1) + "\n").encode())
    markdown = render_markdown(result)
    atomic_write_bytes(args.out / "metadata.md", markdown.encode())
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
