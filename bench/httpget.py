"""The fleet benchmark's baseline device: one plain HTTP GET, as fleets download today.

``python -m bench.httpget URL OUT SHA256`` streams ``URL`` into ``OUT`` with the standard
library only (a lean process, like a device's stock downloader), checks the SHA-256 and
prints one JSON line: ``{"ok", "message", "bytes", "seconds"}``. Exit code 0 when the
download is complete and its hash matches, else 1 (2 for bad arguments).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["fetch", "main"]

_BLOCK_BYTES = 256 * 1024
_TIMEOUT_S = 120.0


def fetch(url: str, out: Path, sha256: str) -> dict[str, Any]:
    """Download ``url`` with one GET into ``out``; check its SHA-256."""
    digest = hashlib.sha256()
    size = 0
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, \
                open(out, "wb") as fh:
            while block := response.read(_BLOCK_BYTES):
                digest.update(block)
                fh.write(block)
                size += len(block)
    except OSError as exc:
        return {"ok": False, "message": f"GET {url}: {exc}", "bytes": size,
                "seconds": round(time.monotonic() - started, 3)}
    ok = digest.hexdigest() == sha256
    return {"ok": ok, "message": "" if ok else "SHA-256 mismatch", "bytes": size,
            "seconds": round(time.monotonic() - started, 3)}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m bench.httpget URL OUT SHA256", file=sys.stderr)
        return 2
    result = fetch(argv[0], Path(argv[1]), argv[2])
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
