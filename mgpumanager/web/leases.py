"""The views of GPU leases for programs the broker does not proxy
(program_leases.py holds their lives): POST to take one, DELETE to give it
back, and a streamed form that holds it while its connection lasts (what
``mgpumanager run`` uses)."""

from __future__ import annotations

import json
import time

from flask import Response, jsonify, request, url_for

from ..client_body import client_gone
from ..errors import BadRequest, NotFound
from ..program_leases import DISCONNECTED, read_lease_request
from . import BODY_DONE, bp, broker

LEASE_BODY_MAX = 64 * 1024
LEASE_HEARTBEAT_S = 5.0


@bp.post("/v1/leases")
def take_lease():
    """Wait for the GPU and make room for a program: 201 with the lease, or,
    with ``"stream": true``, a stream that holds it while the connection lasts."""
    b = broker()
    environ = request.environ
    request.max_content_length = LEASE_BODY_MAX
    try:
        raw = request.get_data(cache=False)
    finally:
        environ[BODY_DONE] = True
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):
        raise BadRequest("the body is not JSON") from None
    asked = read_lease_request(body, job_timeout_s=b.config.scheduler.job_timeout_s,
                               consumers=list(b.config.consumers),
                               gpus=tuple(d.index for d in b.config.devices))
    lease = b.leases.take(vram_mib=asked.vram_mib, label=asked.label, ttl_s=asked.ttl_s,
                          coexist=asked.coexist, pid=asked.pid, stream=asked.stream,
                          gpus=asked.gpus, cancelled=client_gone(environ))
    if not asked.stream:
        resp = jsonify(lease.to_json(b.clock.now()))
        resp.status_code = 201
        resp.headers["Location"] = url_for("mgpumanager.lease", lease_id=lease.id)
        return resp
    client_sock = environ.get("gunicorn.socket")
    if client_sock is not None:
        lease.job.gpu.watch.watch_client(lease.job.lease, client_sock)

    def held_while_connected():
        """The lease, then a heartbeat; when it is asked to end, a last line
        saying why, then nothing until the client closes the connection
        (its program stopped): only then is the GPU free for the next job."""
        def gone() -> bool:
            return lease.job.lease.cut_reason is not None or lease.ended.is_set()
        try:
            yield json.dumps(lease.to_json(b.clock.now())).encode() + b"\n"
            beat = time.monotonic()
            while not lease.ending.wait(0.25):
                if gone():
                    return                      # the client is gone: finally ends it
                if time.monotonic() - beat >= LEASE_HEARTBEAT_S:
                    beat = time.monotonic()
                    yield b"\n"                # a dead broker shows as a dead stream
            yield json.dumps({"ended": lease.end_reason}).encode() + b"\n"
            while not gone():
                lease.ended.wait(0.1)
        finally:
            if not lease.ended.is_set():
                try:
                    b.leases.end(lease.id, DISCONNECTED)
                except NotFound:
                    pass

    return Response(held_while_connected(), 200, mimetype="application/x-ndjson",
                    headers={"Cache-Control": "no-store"})


@bp.get("/v1/leases")
def leases():
    b = broker()
    now = b.clock.now()
    return jsonify({"leases": [lease.to_json(now) for lease in b.leases.held()]})


@bp.route("/v1/leases/<lease_id>", methods=["GET", "DELETE"])
def lease(lease_id: str):
    b = broker()
    if request.method == "GET":
        return jsonify(b.leases.get(lease_id).to_json(b.clock.now()))
    b.leases.end(lease_id)
    return Response(status=204)


