"""Run ``swarmota tracker ...`` in-process (the argument parsing and the command)."""

from __future__ import annotations

import argparse

from swarmota.tracker import cli


def run_cli(*argv: str) -> int:
    """``swarmota tracker ARGV...``; returns the command's exit code."""
    parser = argparse.ArgumentParser(prog="swarmota")
    cli.add_parser(parser.add_subparsers(dest="component", required=True))
    args = parser.parse_args(["tracker", *argv])
    rc: int = args.func(args)
    return rc
