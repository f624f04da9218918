"""The ``swarmota`` command: one entry point, a subcommand tree per component.

Each component owns its subcommands in ``<component>/cli.py`` through
``add_parser(subparsers)``; every subcommand sets ``func(args) -> int`` (exit code).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from peer import cli as peer_cli
    from seeder import cli as seeder_cli
    from swarmota import demo, tlscli
    from tracker import cli as tracker_cli

    parser = argparse.ArgumentParser(
        prog="swarmota",
        description="Peer-assisted delivery of signed over-the-air updates.",
        epilog="Run 'swarmota demo' for a full publish, rollout and update on loopback.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="component", metavar="COMMAND", required=True)
    seeder_cli.add_parser(sub)
    tracker_cli.add_parser(sub)
    peer_cli.add_parser(sub)
    demo.add_parser(sub)
    tlscli.add_parser(sub)
    _add_bench_parser(sub)
    return parser


BENCHMARKS = ("fleet", "swarm", "delta", "tracker")


def _add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench", help="run a benchmark from the source checkout (bench/)",
        description="Run a benchmark of bench/ (a source checkout is needed): fleet (a "
                    "shaped network namespace, root), swarm (loopback), delta (needs "
                    "../shared/data) or tracker (load on loopback). Arguments after the "
                    "name go to the benchmark; 'swarmota bench fleet --help' lists them.")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER,
                       help="arguments for the benchmark")
    bench.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    """Benchmarks are not part of the installed package: run ``python -m bench.NAME``
    in the checkout this ``swarmota`` was installed from."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / f"{args.name}.py").is_file():
        print(f"swarmota bench: {root / 'bench'} not found: benchmarks run from a source "
              "checkout (pip install -e .)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", f"bench.{args.name}", *args.args],
                           cwd=root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # the console shows what -v asked for,
        handler.setLevel(level)                   # whatever a component records meanwhile
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. '| head': the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return rc


if __name__ == "__main__":
    sys.exit(main())
