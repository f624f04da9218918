"""The fleet benchmark's start barrier: load a program, wait for "go", then run it.

``python -m bench.launch MODULE[,PRELOAD...] ARGS...`` imports ``MODULE`` (and the
``PRELOAD`` modules it would import later, e.g. ``peer.agent``; a ``module:function``
is imported and called, e.g. to load what a long-running daemon loads once at its
start), prints ``ready``, waits for one line on standard input, and returns
``MODULE.main(ARGS)``. The benchmark starts
every device this way and releases them together once all are loaded, so that a fleet
simulated on one machine does not measure dozens of interpreters starting on two cores.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m bench.launch MODULE[,PRELOAD...] ARGS...", file=sys.stderr)
        return 2
    module_name, *preload = argv[0].split(",")
    module = importlib.import_module(module_name)
    for name in preload:
        module_part, _, function = name.partition(":")
        loaded = importlib.import_module(module_part)
        if function:
            getattr(loaded, function)()
    print("ready", flush=True)
    if not sys.stdin.readline():
        return 2  # the benchmark went away
    rc = module.main(argv[1:])
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
