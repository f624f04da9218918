"""The ``swarmota`` command: one entry point, a subcommand tree per component.

Each component owns its subcommands in ``<component>/cli.py`` through
``add_parser(subparsers)``; every subcommand sets ``func(args) -> int`` (exit code).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

if TYPE_CHECKING:
    from swarmota.configfile import Schema

__all__ = ["EXIT_BROKEN_PIPE", "build_parser", "config_schema", "main"]


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def config_schema() -> Schema:
    """The keys of the configuration files, from the parsers (:mod:`swarmota.configfile`)."""
    return _build()[1]


def _build() -> tuple[argparse.ArgumentParser, Schema]:
    from swarmota import configfile, demo, tlscli, units
    from swarmota.peer import cli as peer_cli
    from swarmota.seeder import cli as seeder_cli
    from swarmota.tracker import cli as tracker_cli

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
    units.add_parser(sub)
    _add_bench_parser(sub)
    schema = configfile.install(parser)  # --config FILE for the services and the device
    configfile.add_parser(sub, schema)
    return parser, schema


BENCHMARKS = ("fleet", "swarm", "swarm_adversaries", "delta", "tracker", "metadata",
              "footprint")


def _add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench", help="run a benchmark from the source checkout (bench/)",
        description="Run a benchmark of bench/ (a source checkout is needed): fleet (a "
                    "shaped network namespace, root), swarm (loopback), swarm_adversaries "
                    "(loopback, with lying and silent peers), delta (needs "
                    "../shared/data), tracker (load on loopback), metadata (TUF metadata "
                    "per update as a repository's history grows) or footprint (the "
                    "agent's memory and CPU, needs ../shared/data). Arguments after the "
                    "name go to the benchmark; 'swarmota bench fleet --help' lists them.")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER,
                       help="arguments for the benchmark")
    bench.set_defaults(func=_run_bench)


def checkout_root() -> Path:
    """The source checkout this ``swarmota`` runs from (an editable install): the folder
    above ``swarmota/``. From a wheel, that is site-packages, with no ``bench/``."""
    return Path(__file__).resolve().parent.parent


def _run_bench(args: argparse.Namespace) -> int:
    """Benchmarks are not part of the installed package: run ``python -m bench.NAME``
    in the checkout this ``swarmota`` was installed from."""
    root = checkout_root()
    if not (root / "bench" / f"{args.name}.py").is_file():
        print("swarmota bench: the benchmarks are not part of the installed package; "
              "they run from a source checkout: clone the repository, then "
              f"'python3 dev.py swarmota bench {args.name}' there (or pip install -e "
              "CHECKOUT into this environment). Some need more: fleet runs as root "
              "(network namespaces), tracker needs wrk, delta needs ../shared/data.",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", f"bench.{args.name}", *args.args],
                           cwd=root)


EXIT_BROKEN_PIPE = 141
"""Exit code when the reader of our output went away (``swarmota ... | head``): what a
shell reports for a process ended by SIGPIPE."""


class _OutputClosed(BaseException):
    """Our stdout's reader went away. A ``BaseException``, so that the ``except OSError``
    of a command (which would report a broken pipe as its own failure) lets it through
    to :func:`main`."""


class _GuardedStdout:
    """stdout, whose broken pipe becomes :class:`_OutputClosed`."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise _OutputClosed from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise _OutputClosed from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; its exit code. A closed output pipe (``swarmota ... | head``) ends
    any command quietly with :data:`EXIT_BROKEN_PIPE`, never with a traceback, whatever
    the command was doing (printing, or serving and logging a line)."""
    stdout = sys.stdout
    sys.stdout = cast(TextIO, _GuardedStdout(stdout))
    try:
        parser = build_parser()
        args = parser.parse_args(argv)  # --help writes here too
        level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
        logging.basicConfig(level=level,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        for handler in logging.getLogger().handlers:  # the console shows what -v asked
            handler.setLevel(level)                   # for, whatever a component records
        try:
            rc: int = args.func(args)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        sys.stdout.flush()  # a pipe closed early shows here at the latest
    except _OutputClosed:
        return _output_closed(stdout)
    except BaseExceptionGroup as group:  # raised inside trio
        _, rest = group.split(_OutputClosed)
        if rest is not None:
            raise
        return _output_closed(stdout)
    finally:
        sys.stdout = stdout
    return rc


def _output_closed(stdout: TextIO) -> int:
    """Point stdout at /dev/null (the interpreter flushes it again at exit, and would
    report the broken pipe a second time); the exit code."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # not a file (tests)
        pass
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
