"""Which headers pass between a client and a service, both ways.

End-to-end headers pass unchanged; hop-by-hop ones (RFC 9110 7.6.1, and
those a ``Connection`` field names) stop here; X-Forwarded-* are added on
the way up; on the way down, what gunicorn could not send, or a framing
that would mislead the next hop, is an UpstreamBadResponse (502) while it
still can be one.
"""

from __future__ import annotations

import re

from urllib3.util import SKIP_HEADER

from .errors import UpstreamBadResponse


# RFC 9110 7.6.1, plus the pre-standard ones proxies still meet.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"})
# Not hop-by-hop, but answered or set by this hop: gunicorn already sent
# "100 Continue", and Host names the upstream, not the broker.
NOT_FORWARDED = frozenset({"expect", "host", "content-length"})


def connection_tokens(value: str | None) -> frozenset[str]:
    """Header names a ``Connection`` field marks as hop-by-hop."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def is_hop_by_hop(name: str, named_by_connection: frozenset[str] = frozenset()) -> bool:
    lname = name.lower()
    return lname in HOP_BY_HOP or lname in named_by_connection


def request_headers(environ: dict) -> dict[str, str]:
    """The client's end-to-end headers, from a WSGI environ, plus X-Forwarded-*."""
    dropped = connection_tokens(environ.get("HTTP_CONNECTION"))
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if not key.startswith("HTTP_") or key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            continue
        name = key[5:].replace("_", "-").title()
        lname = name.lower()
        if lname in NOT_FORWARDED or is_hop_by_hop(lname, dropped):
            continue
        headers[name] = value
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    remote = environ.get("REMOTE_ADDR")
    if remote:
        prior = headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
    if "HTTP_HOST" in environ and "X-Forwarded-Host" not in headers:
        headers["X-Forwarded-Host"] = environ["HTTP_HOST"]
    headers.setdefault("X-Forwarded-Proto", environ.get("wsgi.url_scheme", "http"))
    # urllib3 adds a User-Agent and requests an Accept-Encoding of its own;
    # the upstream must see the client's, or none.
    headers.setdefault("User-Agent", SKIP_HEADER)
    headers.setdefault("Accept-Encoding", SKIP_HEADER)
    return headers


# RFC 9110 5.1 and 5.5: what a header name and value may be. gunicorn
# refuses to send anything else, so it is checked here, where it can still
# become a 502 instead of an exception inside the WSGI server.
FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")
_REASON = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")


def response_headers(raw_headers) -> list[tuple[str, str]]:
    """The upstream's end-to-end headers, repeated fields (Set-Cookie) kept apart.

    Raises UpstreamBadResponse for a header that cannot be forwarded as it
    is: a bad name or value, or a Content-Length that is not one whole
    number. A Content-Length beside Transfer-Encoding is dropped (RFC 9112
    6.3: the body was framed by the chunking, and forwarding both would
    let the next hop cut the body short).
    """
    dropped = connection_tokens(raw_headers.get("Connection"))
    coding = raw_headers.get("Transfer-Encoding")
    framed_by_chunks = coding is not None
    if coding is not None and coding.strip().lower() != "chunked":
        # http.client decodes only plain chunked; anything else would reach
        # the client as raw framing.
        raise UpstreamBadResponse(f"the answer's Transfer-Encoding {coding[:40]!r} is not "
                                  "plain chunked")
    out: list[tuple[str, str]] = []
    length: str | None = None
    for name, value in raw_headers.items():
        if not FIELD_NAME.fullmatch(name):
            raise UpstreamBadResponse(f"the answer has a malformed header name {name[:40]!r}")
        if not _FIELD_VALUE.fullmatch(value):
            raise UpstreamBadResponse(f"the answer's {name[:40]} header has a malformed value")
        lname = name.lower()
        if is_hop_by_hop(lname, dropped):
            continue
        if lname == "content-length":
            if framed_by_chunks:
                continue
            for part in value.split(","):
                part = part.strip(" \t")
                if not part.isdigit() or (length is not None and int(part) != int(length)):
                    raise UpstreamBadResponse(f"the answer's Content-Length {value[:40]!r} is "
                                              "not one whole number")
                if length is None:
                    length = part
                    out.append((name, part))
            continue
        out.append((name, value))
    return out


def status_line(status: int, reason: str | None) -> str:
    """'200 OK', without a reason phrase gunicorn would refuse to send."""
    reason = (reason or "").strip()
    return f"{status} {reason}" if reason and _REASON.fullmatch(reason) else str(status)
