"""What a browser could be tricked into, refused for every request, token or not.

A ``Host`` edgevl does not answer to (DNS rebinding: a page of the attacker's
whose name now points at the appliance), a write from another origin (CSRF: a
form on another site posting to the appliance), framing by another page.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import falcon

from edgevl.config import HttpSettings

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _host_name(authority: str) -> str:
    """The host of ``host[:port]`` (IPv6 in brackets), lower case."""
    if authority.startswith("["):
        return authority[1 : authority.find("]")].lower() if "]" in authority else ""
    return authority.rsplit(":", 1)[0].lower() if authority.count(":") == 1 else authority.lower()


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """Host and origin checks and the headers that keep the API and page out of other sites' reach."""

    def __init__(self, settings: HttpSettings) -> None:
        listen = settings.address[0].lower()
        if settings.allowed_hosts:
            self.names = {h.lower() for h in settings.allowed_hosts} | {listen}
            self.any_ip = False
        else:
            # A rebinding attack needs a DNS name of the attacker's; an address, loopback names and
            # this machine's own name are safe to answer to.
            host = socket.gethostname().lower()
            self.names = {"localhost", "localhost.localdomain", listen, host, f"{host}.local"}
            self.any_ip = True

    def _host_ok(self, name: str) -> bool:
        return name in self.names or (self.any_ip and _is_ip(name))

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("X-Frame-Options", "DENY")
        resp.set_header("Referrer-Policy", "no-referrer")
        authority = req.get_header("Host") or ""
        if not self._host_ok(_host_name(authority)):
            raise ApiError(400, "bad_host", f"this API does not answer to the host {authority!r} "
                                            "(http.allowed_hosts)")
        if req.method in SAFE_METHODS:
            return
        if (req.get_header("Sec-Fetch-Site") or "").lower() == "cross-site":
            raise ApiError(403, "cross_origin", "requests from other sites are refused")
        origin = req.get_header("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() != authority.lower():
            raise ApiError(403, "cross_origin", f"requests from {origin} are refused")
