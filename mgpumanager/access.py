"""Who may talk to the broker: Host, Origin and token, decided here from the
request's WSGI environ and the server config; and the broker's own
credential kept from the services. No Flask: web's ``guard`` asks these
before any route runs.
"""

from __future__ import annotations

import hmac
import socket

from .config import ServerConfig
from .errors import BadRequest, Forbidden

TOKEN_COOKIE = "mgpumanager_token"
# The broker's token may come in a header of its own, so that Authorization
# can carry a service's own API key.
TOKEN_HEADER = "X-Mgpumanager-Token"
LOGIN_MAX_BYTES = 4096
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def token_matches(expected: str | None, given: str | None) -> bool:
    return expected is None or (given is not None and
                                hmac.compare_digest(given.encode(), expected.encode()))


def given_token(environ, cookie: str | None) -> str | None:
    """The token a request carries: its own header, a bearer token, or the page's cookie."""
    header = environ.get("HTTP_AUTHORIZATION", "")
    return environ.get("HTTP_X_MGPUMANAGER_TOKEN") or (
        header[7:] if header[:7].lower() == "bearer " else cookie)


def without_broker_credential(headers: dict[str, str], token: str | None) -> dict[str, str]:
    """The headers a service may see: never the broker's own token (in its
    header, in Authorization, or in its cookie), which would let any service,
    its logs or plugins drive the whole broker."""
    headers.pop(TOKEN_HEADER, None)
    auth = headers.get("Authorization", "").split(None, 1)
    # Any form the guard may have taken it in (spaces, quotes).
    if token is not None and len(auth) == 2 and auth[0].lower() == "bearer" \
            and token_matches(token, auth[1].strip()):
        del headers["Authorization"]
    if "Cookie" in headers:
        def ours(part: str) -> bool:
            name, _, value = part.partition("=")
            return name.strip() == TOKEN_COOKIE or (
                token is not None and token_matches(token, value.strip().strip('"')))
        kept = [c for c in headers["Cookie"].split(";") if not ours(c)]
        if kept:
            headers["Cookie"] = ";".join(kept).strip()
        else:
            del headers["Cookie"]
    return headers


def bound_address(environ) -> str | None:
    """The address the client connected to (None on a unix socket, where
    gunicorn fills SERVER_NAME in from the client's own Host header)."""
    sock = environ.get("gunicorn.socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return sock.getsockname()[0].lower()
    except OSError:
        return None


def host_name(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:8770" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def check_host_and_origin(server: ServerConfig, environ, method: str, scheme: str) -> None:
    """- Host: the bound address, localhost, or one in server.allowed_hosts
      (a browser tricked by DNS rebinding sends its attacker's name).
    - Origin: a state-changing request from a browser page must come from
      the broker's own origin or one in server.allowed_origins (a form on
      any web site can POST here without a preflight)."""
    host = environ.get("HTTP_HOST")
    if host is not None and "*" not in server.allowed_hosts:
        name = host_name(host)
        if name not in LOCAL_NAMES and name != bound_address(environ) \
                and name not in server.allowed_hosts and host.lower() not in server.allowed_hosts:
            raise BadRequest(f"Host {host[:60]!r} is not one this broker answers to; list it "
                             "in server.allowed_hosts")
    if method not in SAFE_METHODS:
        origin = environ.get("HTTP_ORIGIN")
        own = f"{scheme}://{host}".lower() if host else None
        if origin is not None and origin.lower().rstrip("/") not in (own, *server.allowed_origins):
            raise Forbidden(f"a cross-site request from {origin[:60]!r} may not change state; "
                            "list the origin in server.allowed_origins")
        if origin is None and environ.get("HTTP_SEC_FETCH_SITE") == "cross-site":
            raise Forbidden("a cross-site browser request may not change state")
