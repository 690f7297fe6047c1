"""The Flask layer: routes, error-to-JSON mapping, the proxied response.

Kept thin: every decision is the broker's. What lives here is HTTP: turning
the WSGI request into an upstream call and the upstream answer into a WSGI
response whose ``close()`` ends the GPU job, whether the client read it all
or went away.
"""

from __future__ import annotations

import calendar
import logging
import socket
import time
from urllib.parse import quote

from flask import Blueprint, Response, current_app, jsonify, render_template, request
from prometheus_client import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from .broker import Broker, Job
from .errors import BadRequest, BrokerError, MethodNotAllowed, NotFound
from .metrics import render as render_metrics
from .proxy import (StreamedBody, client_gone, drain_body, request_body, request_headers,
                    response_headers)

log = logging.getLogger("mgpumanager.web")
bp = Blueprint("mgpumanager", __name__)
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def broker() -> Broker:
    return current_app.extensions["mgpumanager"]


class PassthroughResponse(Response):
    """Status, headers and body exactly as given; ``body.close()`` always runs.

    Werkzeug would add a default Content-Type, and for HEAD, 1xx, 204 and
    304 it swaps the body for an empty tuple without closing the original,
    which would leave the GPU lock held; so this bypasses that machinery.
    """
    default_mimetype = None

    def __init__(self, body, status: str, headers: list[tuple[str, str]]):
        super().__init__(status=status)
        self.headers = Headers(headers)
        self.body = body

    def __call__(self, environ, start_response):
        start_response(self.status, self.headers.to_wsgi_list())
        return self.body


@bp.before_app_request
def send_without_delay() -> None:
    """Turn Nagle's algorithm off on the client connection.

    gunicorn sends a response's headers and its body in separate writes;
    with Nagle on, a small write waits until the client has acknowledged
    the previous one, so against a client that delays its ACKs (up to 40 ms
    on a LAN) the body can wait for the headers' ACK, and each streamed
    token line for the one before it.
    """
    sock = request.environ.get("gunicorn.socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def raw_path(environ) -> str:
    """The request path as the client sent it (percent-escapes untouched)."""
    uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if uri:
        return uri.split("?", 1)[0]
    return quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))


def proxy(name: str, kind: str | None, upstream_path: str, *, gpu: bool) -> Response:
    b = broker()
    environ = request.environ
    consumer = b.config.consumers[name]
    method = environ["REQUEST_METHOD"]
    job: Job | None = None
    if gpu:
        job = b.start_job(name, kind, cancelled=client_gone(environ))
    else:
        b.check_healthy(name, kind)
    query = environ.get("QUERY_STRING")
    body = request_body(environ)
    try:
        upstream = b.upstream.open(method, consumer.url,
                                   upstream_path + (f"?{query}" if query else ""),
                                   headers=request_headers(environ), body=body,
                                   read_timeout_s=consumer.read_timeout_s, consumer=name)
    except BaseException as e:
        if isinstance(e, BrokerError):
            e.kind = kind
        if job is not None:
            job.finish(ok=False, status=getattr(e, "status", None),
                       bytes_in=getattr(body, "bytes_read", 0),
                       error=getattr(e, "message", "the request to the upstream failed"))
        raise

    status = upstream.status
    bodyless = method == "HEAD" or status in (204, 304) or 100 <= status < 200

    guard_key = None

    def on_close(streamed: StreamedBody) -> None:
        if guard_key is not None:
            b.stream_guard.unwatch(guard_key)
        if job is None:
            return
        error = streamed.error or (None if streamed.complete else "the client went away")
        job.finish(ok=streamed.complete and status < 500, status=status,
                   bytes_in=getattr(body, "bytes_read", 0), bytes_out=streamed.bytes_out,
                   error=error)

    streamed = StreamedBody(upstream, on_close, bodyless=bodyless)
    try:
        if job is not None and not bodyless:
            guard_key = b.stream_guard.watch(environ.get("gunicorn.socket"),
                                             job.started + b.config.scheduler.job_timeout_s,
                                             streamed.cut)
        return PassthroughResponse(streamed, f"{status} {upstream.reason or ''}".strip(),
                                   response_headers(upstream.headers))
    except BaseException:
        streamed.close()          # until the server holds the body, nobody else will
        raise


@bp.post("/v1/<kind>")
def facade(kind: str):
    b = broker()
    name = b.consumer_for_kind(kind)
    return proxy(name, kind, b.config.consumers[name].paths[kind], gpu=True)


@bp.route("/upstream/<name>", defaults={"path": ""}, methods=ALL_METHODS,
          provide_automatic_options=False)
@bp.route("/upstream/<name>/<path:path>", methods=ALL_METHODS, provide_automatic_options=False)
def upstream(name: str, path: str):
    b = broker()
    b.check_consumer(name)
    prefix, sent = f"/upstream/{name}", raw_path(request.environ)
    upath = (sent[len(prefix):] if sent.startswith(prefix) else "/" + quote(path)) or "/"
    gpu = b.config.consumers[name].is_gpu_route(request.method, upath)
    return proxy(name, None, upath, gpu=gpu)


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
    return jsonify({"ok": True})


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
    resp = jsonify(e.to_json())
    resp.status_code = e.status
    if e.retry_after is not None:
        resp.headers["Retry-After"] = str(e.retry_after)
    return resp


@bp.app_errorhandler(BrokerError)
def on_broker_error(e: BrokerError):
    # A body left unread makes gunicorn close the connection under the
    # client's next request (it drains only 64 KiB itself): read it first.
    drain_body(request.environ)
    return error_response(e)


@bp.app_errorhandler(HTTPException)
def on_http_error(e: HTTPException):
    drain_body(request.environ)
    if e.code == 405:
        resp = error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.path}"))
        resp.headers["Allow"] = ", ".join(e.valid_methods or ())
        return resp
    if e.code == 404:
        return error_response(NotFound(f"no route {request.path}"))
    err = BrokerError(e.description or e.name)
    err.status, err.code = e.code or 500, e.name.lower().replace(" ", "_")
    return error_response(err)


@bp.app_errorhandler(Exception)
def on_unexpected(e: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(BrokerError(f"internal error: {type(e).__name__}"))

