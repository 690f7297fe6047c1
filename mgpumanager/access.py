"""Who may talk to the broker: Host, Origin and token, checked before any
route runs (``guard``), and the broker's own credential kept from the
services (``without_broker_credential``).
"""

from __future__ import annotations

import hmac
import socket

from flask import Response, current_app, render_template, request

from .errors import BadRequest, Forbidden, Unauthorized

TOKEN_COOKIE = "mgpumanager_token"
# The broker's token may come in a header of its own, so that Authorization
# can carry a service's own API key.
TOKEN_HEADER = "X-Mgpumanager-Token"
LOGIN_MAX_BYTES = 4096
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def token_matches(given: str | None) -> bool:
    expected = current_app.extensions["mgpumanager"].config.server.auth_token
    return expected is None or (given is not None and
                                hmac.compare_digest(given.encode(), expected.encode()))


def without_broker_credential(headers: dict[str, str]) -> dict[str, str]:
    """The headers a service may see: never the broker's own token (in its
    header, in Authorization, or in its cookie), which would let any service,
    its logs or plugins drive the whole broker."""
    headers.pop(TOKEN_HEADER, None)
    token = current_app.extensions["mgpumanager"].config.server.auth_token
    auth = headers.get("Authorization", "").split(None, 1)
    # Any form the guard may have taken it in (spaces, quotes).
    if token is not None and len(auth) == 2 and auth[0].lower() == "bearer" \
            and token_matches(auth[1].strip()):
        del headers["Authorization"]
    if "Cookie" in headers:
        def ours(part: str) -> bool:
            name, _, value = part.partition("=")
            return name.strip() == TOKEN_COOKIE or (
                token is not None and token_matches(value.strip().strip('"')))
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


def guard() -> Response | None:
    """Who may talk to the broker, checked before anything else runs.

    - Host: the bound address, localhost, or one in server.allowed_hosts
      (a browser tricked by DNS rebinding sends its attacker's name).
    - Origin: a state-changing request from a browser page must come from
      the broker's own origin or one in server.allowed_origins (a form on
      any web site can POST here without a preflight).
    - Token: with server.auth_token set, every route but /healthz wants it,
      as a bearer token or the status page's cookie.
    """
    if request.path == "/healthz":
        return None
    server = current_app.extensions["mgpumanager"].config.server
    environ = request.environ
    host = environ.get("HTTP_HOST")
    if host is not None and "*" not in server.allowed_hosts:
        name = host_name(host)
        if name not in LOCAL_NAMES and name != bound_address(environ) \
                and name not in server.allowed_hosts and host.lower() not in server.allowed_hosts:
            raise BadRequest(f"Host {host[:60]!r} is not one this broker answers to; list it "
                             "in server.allowed_hosts")
    if request.method not in SAFE_METHODS:
        origin = environ.get("HTTP_ORIGIN")
        own = f"{request.scheme}://{host}".lower() if host else None
        if origin is not None and origin.lower().rstrip("/") not in (own, *server.allowed_origins):
            raise Forbidden(f"a cross-site request from {origin[:60]!r} may not change state; "
                            "list the origin in server.allowed_origins")
        if origin is None and environ.get("HTTP_SEC_FETCH_SITE") == "cross-site":
            raise Forbidden("a cross-site browser request may not change state")
    if server.auth_token is not None and request.endpoint not in ("mgpumanager.login", "static"):
        header = environ.get("HTTP_AUTHORIZATION", "")
        given = environ.get("HTTP_X_MGPUMANAGER_TOKEN") or (
            header[7:] if header[:7].lower() == "bearer " else request.cookies.get(TOKEN_COOKIE))
        if not token_matches(given):
            if request.path == "/" and request.method == "GET":
                return Response(render_template("login.html", failed=False), 401,
                                mimetype="text/html")
            raise Unauthorized("this broker wants a token: Authorization: Bearer <token>")
    return None
