"""The Flask layer: routes, error-to-JSON mapping, the proxied response.

What lives here is HTTP (who may talk to the broker is access.py's): which
path a request names (an escaped ``/upstream/`` prefix that leaves
no single reading is refused here) and whether it is a GPU job (the
consumer's config says; this module asks it), turning the WSGI request
into an upstream call, and the upstream answer into a WSGI response whose
``close()`` ends the GPU job, whether the client read it all or went away.
Everything about the GPU (queue, room, release) is job.py's. The OpenAI
door's views are in openai_door.py, the GPU leases' in leases.py: both on
this blueprint.
"""

from __future__ import annotations

import calendar
import json
import logging
import sys
import time
from typing import Callable
from urllib.parse import quote, unquote

from flask import (Blueprint, Response, current_app, jsonify, redirect, render_template, request,
                   url_for)
from prometheus_client import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from ..access import (LOGIN_MAX_BYTES, TOKEN_COOKIE, check_host_and_origin, given_token,
                      token_matches, without_broker_credential)
from ..broker import Broker, Job
from ..client_body import SpooledBody, client_gone, drain_body, request_body, spool_body
from ..errors import (BadRequest, BrokerError, Forbidden, MethodNotAllowed, NotFound,
                      PayloadTooLarge, RequestTimeout, TooManyStreams, Unauthorized,
                      UpstreamBadResponse)
from ..headers import request_headers, response_headers, status_line
from ..lease import Exchange
from ..metrics import render as render_metrics
from ..models import is_openai_path
from ..proxy import StreamedBody

log = logging.getLogger("mgpumanager.web")
bp = Blueprint("mgpumanager", __name__)
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class RestConverter(PathConverter):
    """The rest of the path as sent, slashes and all (``//prompt`` too): an
    upstream path is the service's to interpret, not the router's."""
    regex = ".*"
    part_isolating = False


def broker() -> Broker:
    return current_app.extensions["mgpumanager"]


# environ keys of this layer
BODY_DONE = "mgpumanager.body_done"          # the body was read (or failed): never drain it
STREAMED = "mgpumanager.streamed"            # the proxied body, until the server owns it


class PassthroughResponse(Response):
    """Status, headers and body exactly as the upstream sent them.

    Werkzeug's own ``__call__`` would work on the headers on the way out
    (a default Content-Type, Content-Length handling for bodyless answers);
    a proxy must pass them byte for byte. And the server may still refuse
    what it is handed (gunicorn raises from ``start_response`` on a header
    it will not send): the GPU job must end then too, and the client get a
    502 instead of the server's own error page.
    """
    default_mimetype = None

    def __init__(self, body: StreamedBody, status: str, headers: list[tuple[str, str]]):
        super().__init__(status=status)
        self.headers = Headers(headers)
        self.body = body

    def __call__(self, environ, start_response):
        try:
            start_response(self.status, self.headers.to_wsgi_list())
        except Exception as e:
            self.body.close()
            log.warning("the server refused the upstream's answer: %s", e)
            err = UpstreamBadResponse(f"the answer could not be forwarded: {type(e).__name__}")
            data = json.dumps(err.to_json()).encode()
            start_response(f"{err.status} Bad Gateway",
                           [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data)))], sys.exc_info())
            return [data]
        self.body.handed_over = True
        return self.body


@bp.before_app_request
def guard() -> Response | None:
    """Who may talk to the broker, checked before anything else runs
    (access.py decides): Host and Origin, then, with server.auth_token set,
    the token on every route but /healthz and the login form."""
    if request.path == "/healthz":
        return None
    server = broker().config.server
    check_host_and_origin(server, request.environ, request.method, request.scheme)
    if server.auth_token is not None and request.endpoint not in ("mgpumanager.login", "static"):
        given = given_token(request.environ, request.cookies.get(TOKEN_COOKIE))
        if not token_matches(server.auth_token, given):
            if request.path == "/" and request.method == "GET":
                return Response(render_template("login.html", failed=False), 401,
                                mimetype="text/html")
            raise Unauthorized("this broker wants a token: Authorization: Bearer <token>")
    return None


@bp.before_app_request
def bound_client_io() -> None:
    """Every read from and write to the client has a deadline.

    A client that stops sending its body, or stops reading its answer, for
    proxy.client_timeout_s gets its connection cut instead of keeping a
    thread (and, for a GPU job, the GPU). gunicorn resets the socket to
    blocking between requests, so this covers exactly this request.
    """
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        try:
            sock.settimeout(broker().config.proxy.client_timeout_s)
        except OSError:
            pass


@bp.teardown_app_request
def end_unsent_answer(exc) -> None:
    """The safety net: a proxied answer the server never took (an error
    after the view returned) must still end its job."""
    streamed = request.environ.pop(STREAMED, None)
    if streamed is not None and not streamed.handed_over:
        streamed.close()


def raw_path(environ) -> str:
    """The request path as the client sent it (percent-escapes untouched)."""
    uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if uri:
        return uri.split("?", 1)[0]
    return quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))


def upstream_path(sent: str, name: str) -> str:
    """What follows ``/upstream/<name>`` in the path as sent, byte for byte,
    also where the client escaped part of the prefix (``/upstream/%63omfyui/``)."""
    prefix = f"/upstream/{name}"
    if sent == prefix or sent.startswith(prefix + "/"):
        return sent[len(prefix):] or "/"
    for i, ch in enumerate(sent):
        if ch == "/" and unquote(sent[:i]) == prefix:
            return sent[i:]
    if unquote(sent) == prefix:
        return "/"
    raise BadRequest("the path's /upstream/<name>/ prefix is escaped in a way that leaves "
                     "no unambiguous rest to forward")


def proxy(name: str, kind: str | None, upstream_path: str, *, gpu: bool) -> Response:
    """Forward this request to consumer ``name``; as a GPU job if ``gpu``.

    A GPU job's body is received whole first (a stalled upload never holds
    the GPU, and a client that leaves meanwhile never queues).
    """
    b = broker()
    environ = request.environ
    query = environ.get("QUERY_STRING")
    target = upstream_path + (f"?{query}" if query else "")
    if not target.isascii():
        raise BadRequest("the request target must be ASCII (percent-encode other bytes)")
    if gpu:
        return forward(name, kind, target, spooled_body(name, kind), gpu=True)
    b.check_healthy(name, kind)
    if not b.streams.acquire(blocking=False):
        limit = b.config.server.stream_limit(b.config.scheduler.max_queue)
        raise TooManyStreams(f"{limit} requests that are no GPU job are streaming already "
                             "(server.max_streams)", consumer=name, kind=kind, retry_after=1)
    return forward(name, kind, target, request_body(environ), done=b.streams.release)


def spooled_body(name: str | None, kind: str | None) -> SpooledBody | None:
    """The client's whole body, received before its job queues."""
    b = broker()
    environ = request.environ
    try:
        body = spool_body(environ, b.config.proxy.max_body_bytes)
    except BrokerError as e:
        b.client_error(e, name, kind)
        raise
    finally:
        environ[BODY_DONE] = True
    return body


def forward(name: str, kind: str | None, target: str, body, *, gpu: bool = False,
            done: Callable[[], None] | None = None) -> Response:
    """Send the request upstream, as a GPU job if ``gpu``; the answer, or a
    typed error, comes back.

    A GPU job queues and makes room first (its life is job.py's: it watches
    the client socket until the answer is done); then every way out of here
    ends it, or hands it to the response. ``done`` is called once, when the
    exchange is over."""
    b = broker()
    environ = request.environ
    client_sock = environ.get("gunicorn.socket")
    job: Job | None = None
    if gpu:
        try:
            job = b.start_job(name, kind, cancelled=client_gone(environ), client_sock=client_sock)
        except BaseException:
            if body is not None:
                body.close()
            raise
        exchange: Exchange = job.lease
    else:
        exchange = Exchange()
        if client_sock is not None:
            exchange.attach(client_sock)      # an upstream that breaks off cuts the answer
    consumer = b.config.consumers[name]
    bytes_in = body.size if isinstance(body, SpooledBody) else 0
    try:
        headers = without_broker_credential(request_headers(environ),
                                            b.config.server.auth_token)
        upstream = b.upstream.open(environ["REQUEST_METHOD"], consumer.url, target,
                                   headers=headers, body=body,
                                   read_timeout_s=consumer.read_timeout_s, consumer=name,
                                   exchange=exchange)
    except BaseException as e:
        if isinstance(e, BrokerError):
            e.kind = kind
        if isinstance(e, (BadRequest, RequestTimeout)):
            environ[BODY_DONE] = True
            b.client_error(e, name, kind)
        if job is not None:
            job.finish(ok=False, reached=getattr(e, "reached", None),
                       status=getattr(e, "status", None), bytes_in=bytes_in,
                       error=getattr(e, "message", f"the request failed: {type(e).__name__}"))
        if done is not None:
            done()
        raise
    finally:
        if isinstance(body, SpooledBody):
            body.close()

    status = upstream.status
    bodyless = environ["REQUEST_METHOD"] == "HEAD" or status in (204, 304) or status < 200

    def on_close(streamed: StreamedBody) -> None:
        if done is not None:
            done()
        if job is not None:
            job.finish(ok=streamed.complete and status < 500, reached=True, status=status,
                       bytes_in=bytes_in, bytes_out=streamed.bytes_out,
                       error=streamed.error or (None if streamed.complete
                                                else "the client went away or stopped reading"))

    streamed = StreamedBody(upstream, exchange, on_close, bodyless=bodyless,
                            cut_hold_s=b.config.proxy.cut_hold_s if job is not None else 0.0)
    try:
        if status == 101:
            raise UpstreamBadResponse(f"{name} switched protocols (101); the broker forwards "
                                      "HTTP only")
        headers = response_headers(upstream.headers)
        response = PassthroughResponse(streamed, status_line(status, upstream.reason), headers)
        environ[STREAMED] = streamed
        return response
    except BaseException as e:
        if isinstance(e, BrokerError):
            e.consumer, e.kind = name, kind
            streamed.error = e.message
        streamed.close()          # until the server holds the body, nobody else will
        raise


@bp.post("/v1/<kind>")
def facade(kind: str):
    b = broker()
    name = b.consumer_for_kind(kind)
    return proxy(name, kind, b.config.consumers[name].paths[kind], gpu=True)


@bp.route("/upstream/<name>", defaults={"path": ""}, methods=ALL_METHODS,
          provide_automatic_options=False, strict_slashes=False)
@bp.route("/upstream/<name>/<rest:path>", methods=ALL_METHODS, provide_automatic_options=False,
          strict_slashes=False)
def upstream(name: str, path: str):
    b = broker()
    b.check_consumer(name)
    upath = upstream_path(raw_path(request.environ), name)
    if "#" in upath:
        # A fragment never belongs in a request target (RFC 9112 3.2); a
        # service might read what follows it differently from the checks here.
        raise BadRequest("the request target has a '#' fragment; send the path without it")
    consumer = b.config.consumers[name]
    if not consumer.upstream_allows(request.method, upath):
        raise Forbidden(f"{name}'s upstream_allow does not let {request.method} {upath} "
                        "through /upstream/", consumer=name)
    return proxy(name, None, upath, gpu=consumer.is_gpu_route(request.method, upath))


@bp.route("/audio/<path:path>", methods=["GET", "HEAD"])
def audio(path: str):
    b = broker()
    if b.config.audio_proxy is None:
        raise NotFound("no audio_proxy consumer is configured")
    return proxy(b.config.audio_proxy, None, raw_path(request.environ), gpu=False)


@bp.post("/v1/consumers/<name>/<action>")
def consumer_action(name: str, action: str):
    b = broker()
    b.check_consumer(name)
    if action not in ("load", "unload"):
        raise NotFound(f"no action {action!r}: use load or unload", consumer=name)
    drain_body(request.environ)           # received before the job queues, like any GPU job's
    request.environ[BODY_DONE] = True
    gone = client_gone(request.environ)
    result = b.load(name, cancelled=gone) if action == "load" else b.unload(name, cancelled=gone)
    return jsonify(result)


@bp.get("/v1/status")
def status():
    return jsonify(broker().status())


@bp.get("/v1/events")
def events():
    try:
        since = int(request.args.get("since", "0"))
        limit = int(request.args.get("limit", "0")) or None
    except ValueError:
        raise BadRequest("since and limit must be whole numbers") from None
    evs = broker().events.since(since, limit)
    return jsonify({"events": evs, "last_id": evs[-1]["id"] if evs else since})


@bp.get("/healthz")
def healthz():
    """200 while the broker can still schedule; 503 with the reasons when it cannot."""
    b = broker()
    problems = b.liveness()
    # It still serves, on its last good config: said, not failed.
    warnings = [f"the last config reload failed; serving the previous config: "
                f"{b.config_error}"] if b.config_error else []
    if problems:
        resp = jsonify({"ok": False, "problems": problems, "warnings": warnings})
        resp.status_code = 503
        return resp
    return jsonify({"ok": True, "warnings": warnings} if warnings else {"ok": True})


@bp.post("/login")
def login():
    """The status page's way in when server.auth_token is set: the token,
    checked, goes into a cookie the page's own requests then carry."""
    # Unauthenticated, so it reads no more than a token needs: a multipart
    # body of any size went into temporary files first (400 MiB, 417 MB of
    # disk, then 401).
    request.max_content_length = LOGIN_MAX_BYTES
    request.max_form_memory_size = LOGIN_MAX_BYTES
    request.max_form_parts = 4
    if request.content_type and not request.content_type.startswith(
            "application/x-www-form-urlencoded"):
        raise BadRequest("the login form is application/x-www-form-urlencoded")
    token = request.form.get("token", "")
    if not token_matches(broker().config.server.auth_token, token):
        return render_template("login.html", failed=True), 401
    resp = redirect(url_for("mgpumanager.index"))
    resp.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict",
                    secure=request.scheme == "https", max_age=30 * 24 * 3600)
    return resp


@bp.get("/metrics")
def metrics():
    registry = current_app.extensions["mgpumanager.metrics"]
    return Response(render_metrics(registry), mimetype=METRICS_CONTENT_TYPE)


@bp.app_template_filter("ago")
def ago(iso: str | None) -> str:
    """'12 s ago' for an ISO time from /v1/status, as the page's script writes it."""
    if not iso:
        return "never"
    seconds = time.time() - calendar.timegm(time.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S"))
    if seconds < 1:
        return "just now"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 5400 else f"{seconds / 3600:.1f} h ago"


@bp.get("/")
def index():
    b = broker()
    return render_template("status.html", status=b.status(), events=b.events.since(0, 50)[::-1])


# -- errors ---------------------------------------------------------------------

def error_response(e: BrokerError) -> Response:
    openai = is_openai_path(request.path)
    resp = jsonify(e.to_openai_json() if openai else e.to_json())
    resp.status_code = e.status
    if e.retry_after is not None:
        resp.headers["Retry-After"] = str(e.retry_after)
    if openai and not e.retry_may_help:
        # The openai SDK retries a 5xx twice; this header says it will not help.
        resp.headers["x-should-retry"] = "false"
    return resp


@bp.app_errorhandler(BrokerError)
def on_broker_error(e: BrokerError):
    # A body left unread makes gunicorn close the connection under the
    # client's next request (it drains only 64 KiB itself): read it first.
    if not request.environ.get(BODY_DONE):
        drain_body(request.environ)
    return error_response(e)


@bp.app_errorhandler(HTTPException)
def on_http_error(e: HTTPException):
    if not request.environ.get(BODY_DONE):
        drain_body(request.environ)
    if e.code == 405:
        resp = error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.path}"))
        resp.headers["Allow"] = ", ".join(e.valid_methods or ())
        return resp
    if e.code == 404:
        return error_response(NotFound(f"no route {request.path}"))
    if e.code == 413:
        return error_response(PayloadTooLarge(e.description or "the request body is too large"))
    err = BrokerError(e.description or e.name)
    err.status, err.code = e.code or 500, e.name.lower().replace(" ", "_")
    return error_response(err)


@bp.app_errorhandler(Exception)
def on_unexpected(e: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(BrokerError(f"internal error: {type(e).__name__}"))

