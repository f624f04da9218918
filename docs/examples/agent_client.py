#!/usr/bin/env python3
"""A small client of the swarmota agent's D-Bus API (docs/DBUS.md), with jeepney.

    agent_client.py status                 # every property, as JSON
    agent_client.py check                  # CheckNow
    agent_client.py install [VERSION]      # InstallNow (the deferred release)
    agent_client.py postpone SECONDS       # Postpone (0 lifts it)
    agent_client.py mark-good | roll-back  # decide the health check in progress
    agent_client.py watch [--count N]      # print progress and results as they come

A device UI would call these from its buttons and draw the signals; an MDM agent would
forward them. ``--address unix:path=...`` picks a bus (default: the system bus).
Exit code 1 when the agent refuses (the reason goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jeepney import DBusAddress, HeaderFields, MatchRule, Properties, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
from jeepney.wrappers import DBusErrorResponse, unwrap_msg

AGENT = DBusAddress("/org/swarmota/Agent1", bus_name="org.swarmota.Agent1",
                    interface="org.swarmota.Agent1")


def plain(value: Any) -> Any:
    """Variants ``(signature, value)`` to plain values, recursively."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return plain(value[1])
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def describe(member: str, body: tuple[Any, ...]) -> str:
    if member == "ProgressChanged":
        p = plain(body[0])
        return (f"{p['phase']}: chunks {p['chunks_done']}/{p['chunks_total']}, bytes from "
                f"origin {p['bytes_origin']}, from peers {p['bytes_peers']} "
                f"({p['peers']} peers)")
    if member == "UpdateFinished":
        status, message, old, new = body
        return f"finished {old} -> {new}: status {status}: {message}"
    changed = plain(body[1])
    return "changed: " + ", ".join(f"{k}={v!r}" for k, v in changed.items() if k != "Progress")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="SYSTEM", help="D-Bus address (default: system)")
    parser.add_argument("command", choices=("status", "check", "install", "postpone",
                                            "mark-good", "roll-back", "watch"))
    parser.add_argument("argument", nargs="?", default="")
    parser.add_argument("--count", type=int, default=0, help="watch: stop after N signals")
    args = parser.parse_args()
    with open_dbus_connection(args.address) as conn:
        try:
            if args.command == "status":
                reply = conn.send_and_get_reply(Properties(AGENT).get_all(), timeout=10)
                print(json.dumps(plain(unwrap_msg(reply)[0]), indent=1, sort_keys=True))
            elif args.command == "watch":
                rule = MatchRule(type="signal", path=AGENT.object_path)
                conn.send_and_get_reply(message_bus.AddMatch(rule), timeout=10)
                seen = 0
                with conn.filter(rule, bufsize=100) as queue:
                    while not args.count or seen < args.count:
                        msg = conn.recv_until_filtered(queue, timeout=3600)
                        member = msg.header.fields[HeaderFields.member]
                        print(describe(member, msg.body), flush=True)
                        seen += member != "PropertiesChanged"
            else:
                method, signature, body = {
                    "check": ("CheckNow", None, ()),
                    "install": ("InstallNow", "s", (args.argument,)),
                    "postpone": ("Postpone", "t", (int(args.argument or 0),)),
                    "mark-good": ("MarkGood", None, ()),
                    "roll-back": ("RollBack", None, ()),
                }[args.command]
                reply = conn.send_and_get_reply(new_method_call(AGENT, method, signature,
                                                                body), timeout=10)
                answer = unwrap_msg(reply)
                if args.command == "postpone":
                    print(f"postponed until {answer[0]} (seconds since the epoch; 0: not)")
                elif answer:
                    print(f"{method}: {answer[0]}")
                else:
                    print(f"{method}: done")
        except DBusErrorResponse as exc:
            print(f"refused: {exc.name}: {' '.join(map(str, exc.data))}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
