"""The agent's local API on D-Bus (``org.swarmota.Agent1``), the one module that
imports jeepney.

    bus name   org.swarmota.Agent1
    object     /org/swarmota/Agent1
    interface  org.swarmota.Agent1   (docs/DBUS.md describes every member)

Properties (readable by anyone on the bus; ``PropertiesChanged`` on change, Progress
at most once per ``progress_interval_s``): ``State``, ``Progress``, ``LastResult``,
``CurrentVersion``, ``OfferedVersion``, ``DeferredReason``, ``PostponedUntil``.
Methods (root and the ``swarmota`` group only, by the bus policy
``peer/dbus/org.swarmota.Agent1.conf``): ``CheckNow``, ``InstallNow``, ``Postpone``,
``MarkGood``, ``RollBack``. Signals: ``ProgressChanged`` (rate-limited),
``UpdateFinished``. Requests are carried out by :class:`peer.control.AgentControl`;
a request that does not apply gets the error ``org.swarmota.Agent1.Error.NotApplicable``
(or ``.NothingOffered``) and changes nothing.

Errors: :class:`DBusUnavailable` (a :class:`~peer.errors.ConfigError`) when the bus
cannot be reached or the name is owned by another process; jeepney's and the socket's
exceptions are translated into it here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from importlib import resources
from typing import Any

import trio
from jeepney import (
    DBusAddress,
    HeaderFields,
    MatchRule,
    Message,
    MessageType,
    new_error,
    new_method_return,
    new_signal,
)
from jeepney.auth import AuthenticationError
from jeepney.bus_messages import DBusNameFlags, message_bus
from jeepney.io.common import RouterClosed
from jeepney.io.trio import DBusRouter, open_dbus_connection

from swarmota.peer.control import AgentControl, NotApplicable, NothingOffered
from swarmota.peer.errors import ConfigError

__all__ = ["BUS_NAME", "INTERFACE", "OBJECT_PATH", "DBusUnavailable", "bus_address",
           "policy_file", "serve_dbus"]

log = logging.getLogger(__name__)

BUS_NAME = "org.swarmota.Agent1"
OBJECT_PATH = "/org/swarmota/Agent1"
INTERFACE = "org.swarmota.Agent1"
ERROR_NOT_APPLICABLE = f"{INTERFACE}.Error.NotApplicable"
ERROR_NOTHING_OFFERED = f"{INTERFACE}.Error.NothingOffered"
PROPERTIES = "org.freedesktop.DBus.Properties"
_INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
_PEER = "org.freedesktop.DBus.Peer"
_ERR = "org.freedesktop.DBus.Error"
_RESULT_REPLY_PRIMARY_OWNER = 1
_REPLY_ALREADY_OWNER = 4

_INTROSPECTION = f"""<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
 <interface name="{INTERFACE}">
  <property name="State" type="s" access="read"/>
  <property name="Progress" type="a{{sv}}" access="read"/>
  <property name="LastResult" type="a{{sv}}" access="read"/>
  <property name="CurrentVersion" type="s" access="read"/>
  <property name="OfferedVersion" type="s" access="read"/>
  <property name="DeferredReason" type="s" access="read"/>
  <property name="PostponedUntil" type="t" access="read"/>
  <method name="CheckNow"/>
  <method name="InstallNow">
   <arg name="version" type="s" direction="in"/>
   <arg name="installing" type="s" direction="out"/>
  </method>
  <method name="Postpone">
   <arg name="seconds" type="t" direction="in"/>
   <arg name="until" type="t" direction="out"/>
  </method>
  <method name="MarkGood"><arg name="target" type="s" direction="out"/></method>
  <method name="RollBack"><arg name="target" type="s" direction="out"/></method>
  <signal name="ProgressChanged"><arg name="progress" type="a{{sv}}"/></signal>
  <signal name="UpdateFinished">
   <arg name="status" type="i"/><arg name="message" type="s"/>
   <arg name="from_version" type="s"/><arg name="to_version" type="s"/>
  </signal>
 </interface>
 <interface name="{PROPERTIES}">
  <method name="Get"><arg type="s" direction="in"/><arg type="s" direction="in"/>
   <arg type="v" direction="out"/></method>
  <method name="GetAll"><arg type="s" direction="in"/><arg type="a{{sv}}" direction="out"/>
  </method>
  <method name="Set"><arg type="s" direction="in"/><arg type="s" direction="in"/>
   <arg type="v" direction="in"/></method>
  <signal name="PropertiesChanged"><arg type="s"/><arg type="a{{sv}}"/><arg type="as"/>
  </signal>
 </interface>
 <interface name="{_INTROSPECTABLE}">
  <method name="Introspect"><arg type="s" direction="out"/></method>
 </interface>
 <interface name="{_PEER}"><method name="Ping"/></interface>
</node>
"""

# Progress keys and their D-Bus types: always all present (zero when not applicable)
_PROGRESS_TYPES = {
    "phase": "s", "mode": "s", "payload": "s", "kind": "s", "size": "t",
    "chunks_total": "u", "chunks_done": "u", "bytes_origin": "t", "bytes_peers": "t",
    "peers": "u", "download_rate_bytes_per_s": "t", "upload_rate_bytes_per_s": "t",
    "bytes_uploaded": "t", "seconds_left": "d",
}
_RESULT_TYPES = {
    "status": "i", "message": "s", "attempted": "b", "updated": "b",
    "from_version": "s", "to_version": "s", "deferred": "s", "reboot_pending": "b",
    "reported": "b", "bytes_origin": "t", "bytes_peers": "t", "finished_at": "d",
}
_ZERO: dict[str, Any] = {"s": "", "t": 0, "u": 0, "i": 0, "d": 0.0, "b": False}


class DBusUnavailable(ConfigError):
    """The bus cannot be reached, refused us, or another process owns the name."""


def bus_address(choice: str) -> str | None:
    """``--dbus`` to jeepney's bus argument: ``system``, ``session``, ``none`` (None) or
    a D-Bus address (``unix:path=...`` / ``unix:abstract=...``).

    Raises:
        ConfigError: anything else.
    """
    if choice == "none":
        return None
    if choice in ("system", "session"):
        return choice.upper()
    if choice.startswith("unix:") and "=" in choice:
        return choice
    raise ConfigError(f"--dbus must be system, session, none or a unix: bus address, "
                      f"not {choice!r}")


def policy_file() -> str:
    """The shipped bus policy (install it as /etc/dbus-1/system.d/org.swarmota.Agent1.conf)."""
    return resources.files("swarmota.peer").joinpath("dbus", f"{BUS_NAME}.conf").read_text()


def _typed(value: Any, signature: str) -> Any:
    """``value`` coerced to what jeepney serialises for ``signature`` (zero if unusable)."""
    try:
        if signature == "s":
            return "" if value is None else str(value)
        if signature == "b":
            return bool(value)
        if signature == "d":
            number = float(value)
            return number if math.isfinite(number) else 0.0
        number = int(value)
        if signature in ("t", "u"):
            return max(0, min(number, 2**32 - 1 if signature == "u" else 2**64 - 1))
        return max(-(2**31), min(number, 2**31 - 1))
    except (TypeError, ValueError, OverflowError):
        return _ZERO[signature]


def _variant_dict(raw: dict[str, Any], types: dict[str, str]) -> dict[str, tuple[str, Any]]:
    return {key: (sig, _typed(raw.get(key, _ZERO[sig]), sig)) for key, sig in types.items()}


def _progress(raw: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    raw = dict(raw)
    if "chunks_done" not in raw and "chunks_done_this_run" in raw:
        raw["chunks_done"] = raw["chunks_done_this_run"]
    return _variant_dict(raw, _PROGRESS_TYPES)


class _Service:
    """The object on the bus; owned by :func:`serve_dbus`."""

    def __init__(self, control: AgentControl, router: DBusRouter,
                 progress_interval_s: float) -> None:
        self.control = control
        self.board = control.board
        self.router = router
        self.progress_interval_s = progress_interval_s
        self.emitter = DBusAddress(OBJECT_PATH, interface=INTERFACE)

    def properties(self) -> dict[str, tuple[str, Any]]:
        board = self.board
        offered, reason = board.offered
        return {
            "State": ("s", board.state),
            "Progress": ("a{sv}", _progress(board.progress)),
            "LastResult": ("a{sv}", _variant_dict(board.last_result, _RESULT_TYPES)),
            "CurrentVersion": ("s", board.current_version),
            "OfferedVersion": ("s", offered),
            "DeferredReason": ("s", reason),
            "PostponedUntil": ("t", _typed(board.postponed_until_s, "t")),
        }

    # --- calls ------------------------------------------------------------------

    async def handle(self, msg: Message) -> None:
        fields = msg.header.fields
        interface = fields.get(HeaderFields.interface)
        member = fields.get(HeaderFields.member)
        signature = fields.get(HeaderFields.signature, "")
        try:
            if fields.get(HeaderFields.path) != OBJECT_PATH:
                raise _Refusal(f"{_ERR}.UnknownObject",
                               f"no object at {fields.get(HeaderFields.path)}")
            reply = await self._dispatch(msg, interface, member, signature)
        except _Refusal as refusal:
            reply = new_error(msg, refusal.name, "s", (refusal.text,))
        except NothingOffered as exc:
            reply = new_error(msg, ERROR_NOTHING_OFFERED, "s", (str(exc),))
        except NotApplicable as exc:
            reply = new_error(msg, ERROR_NOT_APPLICABLE, "s", (str(exc),))
        except Exception as exc:  # a bug, or the state directory became unreadable
            log.exception("D-Bus: %s.%s failed", interface, member)
            reply = new_error(msg, f"{_ERR}.Failed", "s", (f"{type(exc).__name__}: {exc}",))
        await self.router.send(reply)

    async def _dispatch(self, msg: Message, interface: str | None, member: str | None,
                        signature: str) -> Message:
        def expect(wanted: str) -> None:
            if signature != wanted:
                raise _Refusal(f"{_ERR}.InvalidArgs",
                               f"{member} takes ({wanted}), not ({signature})")

        if interface == PROPERTIES:
            if member == "Get":
                expect("ss")
                iface, name = msg.body
                props = self._properties_of(iface)
                if name not in props:
                    raise _Refusal(f"{_ERR}.UnknownProperty", f"no property {name}")
                return new_method_return(msg, "v", (props[name],))
            if member == "GetAll":
                expect("s")
                return new_method_return(msg, "a{sv}", (self._properties_of(msg.body[0]),))
            if member == "Set":
                raise _Refusal(f"{_ERR}.PropertyReadOnly", "the properties are read-only")
        elif interface == _INTROSPECTABLE and member == "Introspect":
            return new_method_return(msg, "s", (_INTROSPECTION,))
        elif interface == _PEER and member == "Ping":
            return new_method_return(msg)
        elif interface in (INTERFACE, None):
            return await self._method(msg, member, expect)
        raise _Refusal(f"{_ERR}.UnknownMethod", f"no method {interface}.{member}")

    def _properties_of(self, interface: str) -> dict[str, tuple[str, Any]]:
        if interface not in (INTERFACE, ""):
            raise _Refusal(f"{_ERR}.UnknownInterface", f"no interface {interface}")
        return self.properties()

    async def _method(self, msg: Message, member: str | None, expect: Any) -> Message:
        control = self.control
        if member == "CheckNow":
            expect("")
            control.check_now()
            log.info("D-Bus: check now (%s)", await self._who(msg))
            return new_method_return(msg)
        if member == "InstallNow":
            expect("s")
            version = control.install_now(msg.body[0])
            log.warning("D-Bus: install %s now (%s)", version, await self._who(msg))
            return new_method_return(msg, "s", (version,))
        if member == "Postpone":
            expect("t")
            try:
                until = await control.postpone(msg.body[0])
            except ValueError as exc:
                raise _Refusal(f"{_ERR}.InvalidArgs", str(exc)) from None
            log.warning("D-Bus: installs postponed by %d s (%s)", msg.body[0],
                        await self._who(msg))
            return new_method_return(msg, "t", (_typed(until, "t"),))
        if member in ("MarkGood", "RollBack"):
            expect("")
            who = await self._who(msg)
            act = control.mark_good if member == "MarkGood" else control.roll_back
            target = await act(who)
            log.warning("D-Bus: %s of %s (%s)", member, target, who)
            return new_method_return(msg, "s", (target,))
        raise _Refusal(f"{_ERR}.UnknownMethod", f"no method {INTERFACE}.{member}")

    async def _who(self, msg: Message) -> str:
        """The caller's uid, for logs and reports."""
        sender = msg.header.fields.get(HeaderFields.sender)
        try:
            reply = await self.router.send_and_get_reply(
                message_bus.GetConnectionUnixUser(sender))
            if reply.header.message_type is MessageType.method_return:
                return f"uid {reply.body[0]} over D-Bus"
        except (trio.BrokenResourceError, ValueError, TypeError):
            pass
        return f"{sender} over D-Bus"

    # --- signals ----------------------------------------------------------------

    async def publish(self) -> None:
        """Emit ``PropertiesChanged`` for every change (Progress rate-limited, together
        with ``ProgressChanged``) and ``UpdateFinished`` once per attempted pass."""
        sent = self.properties()
        seen = self.board.version
        results_seen = self.board.results
        next_progress_at = -math.inf
        progress_waiting = False
        while True:
            with trio.move_on_at(next_progress_at if progress_waiting else math.inf):
                seen = await self.board.wait_changed(seen)
            now = trio.current_time()
            current = self.properties()
            changed = {k: v for k, v in current.items() if sent.get(k) != v}
            progress_waiting = False
            if "Progress" in changed:
                if now < next_progress_at:
                    del changed["Progress"]
                    progress_waiting = True
                else:
                    next_progress_at = now + self.progress_interval_s
                    await self._signal("ProgressChanged", "a{sv}", (current["Progress"][1],))
            if changed:
                sent.update(changed)
                await self.router.send(new_signal(
                    DBusAddress(OBJECT_PATH, interface=PROPERTIES), "PropertiesChanged",
                    "sa{sv}as", (INTERFACE, changed, [])))
            if self.board.results != results_seen:
                results_seen = self.board.results
                result = self.board.last_result
                if result.get("attempted"):
                    await self._signal("UpdateFinished", "isss", (
                        _typed(result.get("status"), "i"), _typed(result.get("message"), "s"),
                        _typed(result.get("from_version"), "s"),
                        _typed(result.get("to_version"), "s")))

    async def _signal(self, name: str, signature: str, body: tuple[Any, ...]) -> None:
        await self.router.send(new_signal(self.emitter, name, signature, body))


class _Refusal(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name, self.text = name, text


async def serve_dbus(control: AgentControl, bus: str, *, progress_interval_s: float = 1.0,
                     retry_s: float = 30.0,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``control`` on ``bus`` (``"SYSTEM"``, ``"SESSION"`` or an address) under
    ``org.swarmota.Agent1`` until cancelled; ``task_status.started(unique_name)`` once
    the name is owned. A connection lost after that is tried again every ``retry_s``
    (the agent goes on updating meanwhile).

    Raises:
        DBusUnavailable: at the start: the bus cannot be reached or authenticated with,
            or the name is owned by someone else (another agent) or the bus policy
            refuses it.
    """
    control.board.bind()
    ready = False

    def started(name: str) -> None:
        nonlocal ready
        if not ready:
            ready = True
            task_status.started(name)

    while True:
        try:
            await _serve_once(control, bus, progress_interval_s, started)
            raise DBusUnavailable("the bus closed the connection")
        except DBusUnavailable as exc:
            if not ready:
                raise
            log.error("D-Bus API unavailable: %s; connecting again in %.0f s", exc, retry_s)
        await trio.sleep(retry_s)


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


_LOST = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel,
         RouterClosed)


async def _serve_once(control: AgentControl, bus: str, progress_interval_s: float,
                      started: Callable[[str], None]) -> None:
    """One connection's life; every way it ends is a ``DBusUnavailable``."""
    try:
        conn = await open_dbus_connection(bus)
    except (OSError, KeyError, RuntimeError, ValueError, AuthenticationError,
            trio.BrokenResourceError) as exc:
        raise DBusUnavailable(f"cannot connect to the D-Bus {bus.lower()} bus: "
                              f"{exc or type(exc).__name__}") from None
    try:
        async with conn, conn.router() as router:
            reply = await router.send_and_get_reply(
                message_bus.RequestName(BUS_NAME, DBusNameFlags.do_not_queue))
            if reply.header.message_type is MessageType.error:
                raise DBusUnavailable(f"the bus refused the name {BUS_NAME}: "
                                      f"{' '.join(map(str, reply.body))} (is the policy "
                                      "file installed?)")
            if reply.body[0] not in (_RESULT_REPLY_PRIMARY_OWNER, _REPLY_ALREADY_OWNER):
                raise DBusUnavailable(f"{BUS_NAME} is owned by another process: another "
                                      "agent is running on this bus")
            service = _Service(control, router, progress_interval_s)
            # left to the router to close when it stops: closing the filter while the
            # router closes it too breaks jeepney's cleanup (it iterates its filters)
            receive = router.filter(MatchRule(type="method_call"), bufsize=64).receive_channel
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service.publish)
                started(router.unique_name)
                log.info("D-Bus: serving %s on %s", BUS_NAME, bus)
                async for msg in receive:
                    await service.handle(msg)
                nursery.cancel_scope.cancel()
    except* DBusUnavailable as group:
        raise _first_leaf(group) from None
    except* _LOST as group:
        raise DBusUnavailable(f"lost the D-Bus connection: {_first_leaf(group)!r}") from None
