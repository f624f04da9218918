"""Who a request really came from, behind a reverse proxy (nginx, an L7 balancer). Pure.

Behind a proxy every connection comes from the proxy's address, so the swarm would hand
every peer out at that address. :class:`TrustedProxies` takes the client's address from
the ``Forwarded`` header (RFC 7239, ``for=``) or, without one, ``X-Forwarded-For``,
and only when the connection comes from a configured trusted proxy: anyone else could
write those headers and be handed out at any address it liked. With several proxies
in a chain, the rightmost address that is not itself a trusted proxy is the client's
(each proxy appends the address it saw). No trusted proxies (the default): the
headers are ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from swarmota.tracker.errors import ConfigError

__all__ = ["TrustedProxies"]

_IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAX_HOPS = 16


class TrustedProxies:
    """Addresses (CIDR blocks, e.g. ``127.0.0.1/32``, ``10.0.0.0/8``) whose forwarding
    headers are believed.

    Raises:
        ConfigError: a block that does not parse.
    """

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        networks: list[_IpNetwork] = []
        for cidr in cidrs:
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as exc:
                raise ConfigError(f"trusted proxy {cidr!r:.60}: {exc}") from None
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: str) -> bool:
        address = _address(ip)
        return address is not None and any(address in n for n in self.networks)

    def client_ip(self, peer_ip: str, headers: Sequence[tuple[bytes, bytes]]) -> str:
        """The client's address for a connection from ``peer_ip`` with ``headers``
        (lower-case names): ``peer_ip`` itself unless it is a trusted proxy that says
        whom it forwards for."""
        if not self.networks or not self.trusts(peer_ip):
            return peer_ip
        chain = _forwarded_for(headers) or _x_forwarded_for(headers)
        for hop in reversed(chain[-_MAX_HOPS:]):
            address = _address(hop)
            if address is None:
                return peer_ip  # a hop we cannot read: believe nothing before it
            if not any(address in n for n in self.networks):
                return str(address)
        return peer_ip


def _address(text: str) -> _IpAddress | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _values(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in headers if key.lower() == name]


def _x_forwarded_for(headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
    return [part.strip() for value in _values(headers, b"x-forwarded-for")
            for part in value.split(",") if part.strip()]


def _forwarded_for(headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """The ``for=`` of every element of every ``Forwarded`` header, in order; a port
    and the brackets of an IPv6 address are dropped; ``unknown`` and obfuscated
    identifiers stay (and read as no address)."""
    out = []
    for value in _values(headers, b"forwarded"):
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, raw = pair.strip().partition("=")
                if name.strip().lower() != "for":
                    continue
                node = raw.strip().strip('"')
                if node.startswith("["):
                    node = node[1:node.find("]")] if "]" in node else node[1:]
                elif node.count(":") == 1:
                    node = node.split(":", 1)[0]
                out.append(node)
    return out
