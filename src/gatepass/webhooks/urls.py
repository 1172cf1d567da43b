"""Outbound URL safety for webhooks and the blocking hook (server-side request forgery).

By default a receiver must be https:// and every address its host resolves to must be public:
no loopback, private (RFC 1918, fc00::/7), link-local (169.254/16, cloud metadata), multicast,
reserved or unspecified address. `webhooks.allow_insecure_urls` lifts both rules for tests
and on-premise receivers. The check runs when an endpoint is created and again before each
delivery (DNS may change in between).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from gatepass.errors import InvalidInput

MAX_URL_LENGTH = 2000


def check_syntax(url: str, *, allow_insecure: bool, field: str = "url") -> tuple[str, int]:
    """(host, port) of a well-formed webhook URL; InvalidInput otherwise."""
    if not isinstance(url, str) or not url.strip() or len(url) > MAX_URL_LENGTH:
        raise InvalidInput(f"The URL must be an absolute https:// URL of at most "
                           f"{MAX_URL_LENGTH} characters.", field=field)
    parts = urlsplit(url.strip())
    allowed = ("https", "http") if allow_insecure else ("https",)
    if parts.scheme not in allowed or not parts.hostname:
        if parts.scheme == "http" and not allow_insecure:
            raise InvalidInput("The URL must use https:// (http:// needs the site setting "
                               "webhooks.allow_insecure_urls).", field=field)
        raise InvalidInput("The URL must be an absolute https:// URL.", field=field)
    if parts.username or parts.password:
        raise InvalidInput("The URL must not carry a user name or password.", field=field)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidInput("The URL has a port that is not a number.", field=field) from None
    return parts.hostname, port


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified or not ip.is_global)


def check_addresses(host: str, addresses: list[str], *, field: str = "url") -> None:
    for address in addresses:
        if not is_public(address):
            raise InvalidInput(
                f"The URL's host {host} resolves to the non-public address {address}; "
                "only public addresses are allowed unless the site setting "
                "webhooks.allow_insecure_urls is on.", field=field)


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidInput(f"The URL's host {host} cannot be resolved.", field="url") from None
    return sorted({str(info[4][0]) for info in infos})


def check_url(url: str, *, allow_insecure: bool, field: str = "url") -> str:
    """The URL, stripped, if it is safe to send to; InvalidInput with one sentence otherwise."""
    host, port = check_syntax(url, allow_insecure=allow_insecure, field=field)
    if not allow_insecure:
        check_addresses(host, resolve(host, port), field=field)
    return url.strip()
