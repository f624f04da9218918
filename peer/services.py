"""Hot-update recipes from the device configuration: services and their dependency
graph, and how each component is installed. Pure: values in, values out.

``device.json``::

    "services": {
      "db":  {"restart": ["systemctl", "restart", "db"]},
      "api": {"stop": ["systemctl", "stop", "api"], "start": ["systemctl", "start", "api"],
              "after": ["db"], "timeout_s": 20}
    },
    "components": {
      "ui-app": {"services": ["api"], "payload_hooks": true,
                 "health_command": ["/usr/bin/ui-check"], "health_timeout_s": 30},
      "net-config": {"pre_install": ["/usr/lib/acme/validate"], "services": ["db"]}
    }

A service has a ``restart`` command, or ``start`` (and optionally ``stop``); ``after``
names the services it depends on (started after them, stopped before them), as systemd's
``After=``. Restarting a set of services restarts their dependents too (transitively),
stopping in reverse topological order and starting in topological order (ties by name);
a cycle, an unknown name or an unknown key is a :class:`~peer.errors.ConfigError`.

A component's recipe: ``services`` to restart after its switch; hooks either named here
(``pre_install``, ``post_install``: commands on the device) or shipped inside its signed
payload (``payload_hooks``: the content is a tar archive whose ``.swarmota/pre-install``
and ``.swarmota/post-install`` members are the hooks; see ``peer.hooks``);
``health_command`` / ``health_timeout_s`` (default: the device's); ``hook_timeout_s``.
A component without a recipe is installed as before: switch, health check.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from swarmota.peer.errors import ConfigError

__all__ = ["ComponentRecipe", "HotConfig", "ServiceSpec", "parse_hot_config"]

_SERVICE_KEYS = ("restart", "start", "stop", "after", "timeout_s")
_RECIPE_KEYS = ("services", "payload_hooks", "pre_install", "post_install",
                "health_command", "health_timeout_s", "hook_timeout_s")
DEFAULT_SERVICE_TIMEOUT_S = 30.0
DEFAULT_HOOK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    restart: tuple[str, ...] = ()
    start: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    timeout_s: float = DEFAULT_SERVICE_TIMEOUT_S


@dataclass(frozen=True)
class ComponentRecipe:
    services: tuple[str, ...] = ()
    payload_hooks: bool = False
    pre_install: tuple[str, ...] = ()
    post_install: tuple[str, ...] = ()
    health_command: tuple[str, ...] | None = None  # None: the device's
    health_timeout_s: float | None = None
    hook_timeout_s: float = DEFAULT_HOOK_TIMEOUT_S


@dataclass(frozen=True)
class HotConfig:
    services: Mapping[str, ServiceSpec]
    components: Mapping[str, ComponentRecipe]

    def recipe(self, component: str) -> ComponentRecipe:
        return self.components.get(component, ComponentRecipe())

    def restart_order(self, names: Iterable[str]) -> list[ServiceSpec]:
        """``names`` and every service that depends on them (transitively), in
        topological order: a service after all it depends on; ties by name."""
        dependents: dict[str, set[str]] = {n: set() for n in self.services}
        for spec in self.services.values():
            for dep in spec.after:
                dependents[dep].add(spec.name)
        wanted: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.extend(dependents[name])
        return [self.services[n] for n in _topological(self.services, wanted)]


def _topological(services: Mapping[str, ServiceSpec], subset: set[str]) -> list[str]:
    """Kahn's algorithm over ``subset`` (edges outside it ignored); raises ConfigError
    naming the services on a cycle."""
    waiting = {n: {d for d in services[n].after if d in subset} for n in subset}
    ready = [n for n, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for other, deps in waiting.items():
            if name in deps:
                deps.discard(name)
                if not deps:
                    heapq.heappush(ready, other)
    if len(order) != len(subset):
        stuck = sorted(n for n in subset if n not in order)
        raise ConfigError(f"services: dependency cycle among {', '.join(stuck)} "
                          "(through their 'after' lists)")
    return order


def _command(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a non-empty list of strings (a command)")
    return tuple(value)


def _seconds(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and 0 < value <= 86400):
        raise ConfigError(f"{where} must be a number of seconds within (0, 86400]")
    return float(value)


def _table(where: str, value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object")
    extra = sorted(set(value) - set(keys))
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(keys)})")
    return value


def _service(name: str, raw: Any) -> ServiceSpec:
    where = f"services.{name}"
    table = _table(where, raw, _SERVICE_KEYS)
    spec = ServiceSpec(
        name,
        restart=_command(f"{where}.restart", table["restart"]) if "restart" in table else (),
        start=_command(f"{where}.start", table["start"]) if "start" in table else (),
        stop=_command(f"{where}.stop", table["stop"]) if "stop" in table else (),
        after=tuple(_names(f"{where}.after", table.get("after", []))),
        timeout_s=_seconds(f"{where}.timeout_s", table.get("timeout_s",
                                                           DEFAULT_SERVICE_TIMEOUT_S)))
    if not spec.restart and not spec.start:
        raise ConfigError(f"{where} needs a 'restart' command, or 'start' (and 'stop')")
    if spec.restart and (spec.start or spec.stop):
        raise ConfigError(f"{where}: 'restart', or 'start'/'stop', not both")
    return spec


def _names(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of service names")
    return list(value)


def _recipe(name: str, raw: Any, services: Mapping[str, ServiceSpec]) -> ComponentRecipe:
    where = f"components.{name}"
    table = _table(where, raw, _RECIPE_KEYS)
    wanted = _names(f"{where}.services", table.get("services", []))
    for service in wanted:
        if service not in services:
            raise ConfigError(f"{where}.services: no service {service!r} in 'services'")
    payload_hooks = table.get("payload_hooks", False)
    if not isinstance(payload_hooks, bool):
        raise ConfigError(f"{where}.payload_hooks must be true or false")
    recipe = ComponentRecipe(
        services=tuple(wanted), payload_hooks=payload_hooks,
        pre_install=(_command(f"{where}.pre_install", table["pre_install"])
                     if "pre_install" in table else ()),
        post_install=(_command(f"{where}.post_install", table["post_install"])
                      if "post_install" in table else ()),
        health_command=(_command(f"{where}.health_command", table["health_command"])
                        if "health_command" in table else None),
        health_timeout_s=(_seconds(f"{where}.health_timeout_s", table["health_timeout_s"])
                          if "health_timeout_s" in table else None),
        hook_timeout_s=_seconds(f"{where}.hook_timeout_s",
                                table.get("hook_timeout_s", DEFAULT_HOOK_TIMEOUT_S)))
    if recipe.payload_hooks and (recipe.pre_install or recipe.post_install):
        raise ConfigError(f"{where}: hooks come from the payload (payload_hooks) or from "
                          "pre_install/post_install, not both")
    return recipe


def parse_hot_config(services: Any, components: Any) -> HotConfig:
    """The ``services`` and ``components`` sections of ``device.json``, checked.

    Raises:
        ConfigError: naming the key: unknown keys, wrong types, a dependency on an
            unknown service, a component naming an unknown service, a cycle.
    """
    raw_services = _table("services", services, tuple(services) if isinstance(
        services, dict) else ())
    specs = {name: _service(name, raw) for name, raw in sorted(raw_services.items())}
    for spec in specs.values():
        for dep in spec.after:
            if dep not in specs:
                raise ConfigError(f"services.{spec.name}.after: no service {dep!r}")
    _topological(specs, set(specs))  # refuse a cycle now, not during an update
    raw_components = _table("components", components, tuple(components) if isinstance(
        components, dict) else ())
    recipes = {name: _recipe(name, raw, specs) for name, raw in raw_components.items()}
    return HotConfig(specs, recipes)
