"""The guard against server-side request forgery for every network destination.

A destination's address is chosen by whoever configures it, and Refinery's server can reach what
an outsider cannot: its own loopback, the private network, the cloud's metadata service (which
hands out the machine's credentials). So before any connection:

1. the host is resolved once, and every address it resolves to is checked: loopback, private,
   link-local, reserved, multicast, unspecified, otherwise not globally routable, and cloud
   metadata addresses are refused, unless the setting `activation_allowed_networks` lets them
   through (a CIDR such as `127.0.0.1/32`, or the host name itself);
2. the connection goes to the address that was checked, never to the name again: a second DNS
   lookup could answer differently (DNS rebinding). Host header, TLS SNI and certificate checks
   still use the name, because only the socket's target changes;
3. redirects are followed by hand (a few at most), each new URL checked the same way.

Cloud metadata addresses are refused even inside an allowed network: only an entry naming exactly
that address (`169.254.169.254/32`) or the metadata host name lets one through.

`NetworkGuard.resolve()` is what the Redis and PostgreSQL destinations use (they then connect to
the returned address); `guarded_client()` is an httpx client whose every connection goes through
the guard, and `send()` follows redirects through it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpcore
import httpx

from refinery.errors import ConfigurationError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]

SETTING = "activation_allowed_networks"
MAX_REDIRECTS = 3
MAX_ANSWER_BYTES = 64 * 1024  # of a receiver's answer body that is read
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

#: Instance metadata services: AWS (IPv4, IPv6, ECS task credentials), GCP, Azure and OpenStack
#: (169.254.169.254), Alibaba Cloud (100.100.100.200), Oracle Cloud (192.0.0.192).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UnresolvableHost(OSError):
    """The host name did not resolve (now): a transient failure, unlike a refusal."""


class AddressRefused(ConfigurationError):
    """A destination's address is one the SSRF guard does not let the server reach."""

    code = "address_refused"


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _unmapped(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address; judge and reach it as one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _embedded(ip: IPAddress) -> list[IPAddress]:
    """Any IPv4 address an IPv6 one carries (mapped, 6to4, NAT64), then the address itself."""
    found: list[IPAddress] = []
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            found.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            found.append(ip.sixtofour)
        if ip in _NAT64:
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [*found, ip]


def refusal_reason(ip: IPAddress) -> str | None:
    """Why the server should not reach `ip` by default, or None when it is a public address."""
    for candidate in _embedded(ip):
        if candidate in METADATA_ADDRESSES:
            return "cloud metadata"
        for test, reason in (
            (candidate.is_loopback, "loopback"),
            (candidate.is_unspecified, "unspecified"),
            (candidate.is_link_local, "link-local"),
            (candidate.is_multicast, "multicast"),
            (candidate.is_private, "private"),
            (candidate.is_reserved, "reserved"),
            (not candidate.is_global, "not globally routable"),
        ):
            if test:
                return reason
    return None


def _host_key(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def redact_url(url: str | httpx.URL) -> str:
    """The URL without user info, query or fragment (they may carry tokens), for messages."""
    try:
        u = httpx.URL(str(url))
    except (httpx.InvalidURL, TypeError):
        return "<unparseable URL>"
    return str(u.copy_with(username=None, password=None, query=None, fragment=None))


class NetworkGuard:
    """The SSRF policy of one destination: `allowed` holds the allow-list entries (CIDRs or host
    names), `field` names the destination's config field the messages point at, and `resolver`
    is the one DNS lookup (the system's by default)."""

    def __init__(self, allowed: Iterable[str] = (), *, field: str = "url", resolver: Resolver | None = None):
        self.field = field
        self.resolver: Resolver = resolver or _system_resolver
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for entry in allowed:
            text = entry.strip()
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            key = _host_key(text)
            if not key or any(ch in key for ch in "/ :@"):
                raise ConfigurationError(
                    f"The entry {entry!r} of {SETTING} is neither a network nor a host name.",
                    field=SETTING,
                    fix="Write a CIDR such as 10.1.0.0/16 or 127.0.0.1/32, or a bare host name such as crm.internal.",
                )
            hosts.add(key)
        self._networks = tuple(networks)
        self._hosts = frozenset(hosts)

    # -- policy ---------------------------------------------------------------------------------

    def _allows(self, host: str, ip: IPAddress) -> bool:
        key = _host_key(host)
        if refusal_reason(ip) == "cloud metadata":
            # Only the metadata host name itself, or an entry naming exactly this address.
            return (key in METADATA_HOSTS and key in self._hosts) or any(
                net.num_addresses == 1 and ip in net for net in self._networks if net.version == ip.version
            )
        if key in self._hosts:
            return True
        return any(ip in net for net in self._networks if net.version == ip.version)

    def _refuse(self, where: str, ip: IPAddress | None, reason: str, host: str) -> AddressRefused:
        if reason == "cloud metadata":
            fix = (
                "Point the destination elsewhere: metadata services hand out the server's own credentials. "
                f"Only an entry naming exactly this address in {SETTING} would allow it."
            )
        else:
            target = f"{ip}/{ip.max_prefixlen}" if ip is not None else host
            fix = (
                f"Use a public address, or, if this receiver is yours, add {target} "
                f"(or the host name {host}) to the setting {SETTING}."
            )
        shown = f" resolves to {ip}, a {reason} address" if ip is not None else f" is a {reason} host"
        return AddressRefused(
            f"The destination's {self.field} {where}{shown}, which destinations may not reach "
            "by default (server-side request forgery).",
            field=self.field,
            fix=fix,
        )

    def check_host_name(self, host: str, where: str) -> None:
        """Refuse well-known metadata host names before any lookup."""
        key = _host_key(host)
        if key in METADATA_HOSTS and key not in self._hosts:
            raise self._refuse(where, None, "cloud metadata", host)

    def resolve(self, host: str, port: int, where: str | None = None) -> list[IPAddress]:
        """Resolve `host` once and return its addresses, all checked; refuse the host when any
        address it resolves to is refused (a name must not mix a public and a private answer)."""
        where = where or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self.check_host_name(host, where)
        literal: IPAddress | None
        try:
            literal = ipaddress.ip_address(_host_key(host))
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [_unmapped(literal)]
        else:
            try:
                answers = self.resolver(_host_key(host), port)
            except (OSError, UnicodeError) as exc:
                raise UnresolvableHost(f"Cannot resolve {host!r}: {exc}") from exc
            addresses = []
            for answer in answers:
                ip = _unmapped(ipaddress.ip_address(answer))
                if ip not in addresses:
                    addresses.append(ip)
            if not addresses:
                raise UnresolvableHost(f"Cannot resolve {host!r}: no address.")
        for ip in addresses:
            reason = refusal_reason(ip)
            if reason is not None and not self._allows(host, ip):
                raise self._refuse(where, ip, reason, host)
        return addresses

    def check_url(self, url: str | httpx.URL) -> httpx.URL:
        """Check a URL's form (http/https, a host, no credentials in it) without resolving it."""
        try:
            u = httpx.URL(str(url))
        except (httpx.InvalidURL, TypeError) as exc:
            raise ConfigurationError(
                f"The destination's {self.field} is not a valid URL ({exc}).",
                field=self.field,
                fix="Write a full URL such as https://hooks.example.com/refinery.",
            ) from exc
        if u.scheme not in ("http", "https") or not u.host:
            raise ConfigurationError(
                f"The destination's {self.field} {redact_url(u)} is not an http(s) URL with a host.",
                field=self.field,
                fix="Write a full URL such as https://hooks.example.com/refinery.",
            )
        if u.userinfo:
            raise ConfigurationError(
                f"The destination's {self.field} {redact_url(u)} carries credentials in the URL.",
                field=self.field,
                fix="Remove user:password@ from the URL; secrets belong in the destination's secret fields.",
            )
        self.check_host_name(u.host, redact_url(u))
        return u


class GuardedBackend(httpcore.NetworkBackend):
    """An httpcore network backend that connects only to addresses the guard checked, by address."""

    def __init__(self, guard: NetworkGuard) -> None:
        self._guard = guard
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        last: Exception | None = None
        try:
            addresses = self._guard.resolve(host, port)
        except UnresolvableHost as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        for ip in addresses:
            try:
                return self._inner.connect_tcp(
                    str(ip), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("Destinations connect over TCP only.")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport with its connection pool built on the guarded backend.

    httpx has no public hook for a network backend, so the pool it builds is replaced; a test
    (tests/activation/test_dest_netguard.py, the pinned-address test) fails if that stops working.
    """

    def __init__(self, guard: NetworkGuard, *, max_connections: int = 4) -> None:
        super().__init__(trust_env=False)
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
            network_backend=GuardedBackend(guard),
        )


def guarded_client(guard: NetworkGuard, timeout_seconds: float, **kw: Any) -> httpx.Client:
    """An httpx client that never resolves names itself, never uses proxies from the environment
    and never follows redirects on its own (use `send()`)."""
    return httpx.Client(
        transport=GuardedTransport(guard),
        timeout=httpx.Timeout(timeout_seconds),
        follow_redirects=False,
        trust_env=False,
        **kw,
    )


def send(client: httpx.Client, guard: NetworkGuard, request: httpx.Request) -> httpx.Response:
    """Send `request`, following up to MAX_REDIRECTS method-preserving redirects (307, 308), each
    target checked by the guard before and at connection. A 301/302/303, which would turn the
    request into a GET without its body, is returned as it is for the caller to refuse. The
    answer comes back closed: status and headers only, its body read (up to 64 KiB) and dropped."""
    guard.check_url(request.url)
    for _ in range(MAX_REDIRECTS + 1):
        response = client.send(request, stream=True)
        _read_some(response)
        if response.status_code not in (307, 308):
            return response
        location = response.headers.get("location")
        if not location:
            return response
        target = guard.check_url(request.url.join(location))
        request = httpx.Request(request.method, target, headers=_same_headers(request, target), content=request.content)
    raise ConfigurationError(
        f"The destination's {guard.field} {redact_url(request.url)} redirected more than {MAX_REDIRECTS} times.",
        field=guard.field,
        fix="Set the destination's URL to the final address.",
    )


def _read_some(response: httpx.Response, limit: int = MAX_ANSWER_BYTES) -> None:
    """Read at most `limit` bytes of the answer and drop them (only status and headers count;
    a receiver cannot fill our memory), then close it."""
    seen = 0
    try:
        for chunk in response.iter_raw():
            seen += len(chunk)
            if seen >= limit:
                break
    finally:
        response.close()


def _same_headers(request: httpx.Request, target: httpx.URL) -> httpx.Headers:
    headers = httpx.Headers(request.headers)
    headers["host"] = target.netloc.decode("ascii")
    return headers
