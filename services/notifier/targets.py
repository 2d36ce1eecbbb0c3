"""Where a webhook may go: http(s) URLs without credentials, to public addresses only.

A webhook URL comes from whoever requested the notification, so without a guard it could make
the notifier call the metadata service, the broker's management API or anything else on the
private network (server-side request forgery). The guard runs when a connection is opened, on
the addresses the connection will actually use: every address the host resolves to must be
public, or allow-listed (`COURIER_WEBHOOK_ALLOWED_HOSTS`), and the connection then goes to one
of those checked addresses. Checking the name once and letting the HTTP client resolve it again
would let a DNS answer that changes in between (DNS rebinding) through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import httpx

from contracts.envelope import http_url_problem
from services.messaging.errors import PermanentError
from services.messaging.logs import get_logger

log = get_logger("notifier.targets")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]
"""Resolves `(host, port)` to addresses."""

SCHEMES: Final = frozenset({"http", "https"})
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_-]{1,63}$")


class TargetRefused(PermanentError):
    """The webhook URL is not one the notifier may call; retrying cannot change that."""


def check_url(url: str) -> httpx.URL:
    """Parse a webhook URL; refuse what could never be posted to, as a callback URL is (other
    schemes, credentials, no host, spaces, a port out of range): retried, it would only fail
    again until the last delay tier."""
    if problem := http_url_problem(url):
        raise TargetRefused(f"the webhook URL {problem}")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise TargetRefused(f"the webhook URL is not a valid URL: {exc}") from None
    # `raw_host`, not `host`: `host` decodes IDNA labels, and raises for A-labels the idna
    # package refuses (an emoji domain), though DNS and the POST use the ASCII form.
    if parsed.scheme not in SCHEMES or not parsed.raw_host:  # what urlsplit saw; httpx agrees
        raise TargetRefused(f"the webhook URL is not a valid http(s) URL: {url[:100]!r}")
    if parsed.port == 0:
        raise TargetRefused("the webhook URL has port 0, which nothing listens on")
    host = parsed.raw_host.decode("ascii", errors="replace")
    if parse_address(host) is None and not _resolvable_name(host):
        raise TargetRefused(f"the webhook URL's host is not a valid DNS name: {host[:100]!r}")
    return parsed


def _resolvable_name(host: str) -> bool:
    """Whether the resolver can take `host` at all: an empty label (`a..b`, `a.com..`), one over
    63 characters or a name over 253 fails on every try, as `UnicodeError` (retried as a
    transient failure, through every delay tier). Anything else is the resolver's to answer."""
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return len(host.removesuffix(".")) <= 253


def dns_host(host: str | bytes) -> str:
    """A host name as DNS carries it: IDNA A-labels (`bücher.de` is `xn--bcher-kva.de`), lower
    case, without the trailing dot of a fully qualified name; an IP address in its canonical
    form, without brackets. `bytes` are a parsed URL's `raw_host`, in A-labels already; a name
    that does not encode stays as it is."""
    text = host.decode("ascii", errors="replace") if isinstance(host, bytes) else host
    text = text.rstrip(".") or text
    if (address := parse_address(text)) is not None:
        return str(address)
    if isinstance(host, bytes):
        return text.lower()
    try:
        return httpx.URL(f"http://{text}/").raw_host.decode("ascii").lower()
    except (httpx.InvalidURL, UnicodeError):
        pass
    try:  # IDNA 2003, which still encodes what IDNA 2008 refuses (`💩.la`: `xn--ls8h.la`)
        return text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return text.lower()


def is_bare_host(text: str) -> bool:
    """A host name or IP address alone: no scheme, user, port, path or spaces."""
    if not text or any(c in "/@?#" or c.isspace() for c in text):
        return False
    return ":" not in text or parse_address(text) is not None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to (mapped, 6to4, Teredo): checked as well."""
    found = [address.ipv4_mapped, address.sixtofour]
    if address.teredo is not None:
        found.extend(address.teredo)
    return [a for a in found if a is not None]


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address; False for private, loopback, link-local,
    shared (CGNAT), multicast, reserved, unspecified and documentation ranges."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id or address.is_site_local:  # fec0::/10: deprecated, never public
            return False
        if not all(is_public(embedded) for embedded in _embedded_ipv4(address)):
            return False
    return not (
        not address.is_global
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def parse_address(host: str) -> IPAddress | None:
    """The host as an IP address, or None if it is a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and len(sockaddr) == 4 and sockaddr[3]:
            address = ipaddress.IPv6Address(f"{address}%{sockaddr[3]}")  # keep the zone
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True)
class TargetPolicy:
    """Which non-public targets are allowed anyway: host names, addresses and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> TargetPolicy:
        """`entries` are host names, IP addresses or CIDR networks; anything else is an error."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if not _HOSTNAME.match(entry.rstrip(".")):
                raise ValueError(f"{raw!r} is not a host name, an IP address or a CIDR network")
            hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows(self, address: IPAddress) -> bool:
        if is_public(address):
            return True
        plain = ipaddress.ip_address(str(address).split("%", 1)[0])
        return any(plain in network for network in self.networks)

    def check(self, host: str, addresses: Sequence[IPAddress]) -> None:
        """Refuse `host` unless every one of its addresses is allowed."""
        if self.allows_host(host):
            return
        if not addresses:
            raise TargetRefused(f"{host} resolves to no address")
        refused = [str(a) for a in addresses if not self.allows(a)]
        if refused:
            # The addresses go to the operators' log, not into the failure: its text reaches
            # the event's public status and callback, and would tell anyone who may submit an
            # event what the notifier's DNS holds for internal names.
            log.warning("webhook target refused", extra={"host": host, "addresses": refused})
            raise TargetRefused(
                f"{host} resolves to a non-public address; "
                "allow it with COURIER_WEBHOOK_ALLOWED_HOSTS if it is meant"
            )

    async def addresses(
        self, host: str, port: int, resolver: Resolver = resolve
    ) -> list[IPAddress]:
        """The checked addresses to connect to for `host` (a name or an IP literal)."""
        literal = parse_address(host)
        found = [literal] if literal is not None else list(await resolver(host, port))
        self.check(host, found)
        return found
