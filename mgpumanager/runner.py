"""``mgpumanager run -- CMD ARGS...``: run a program that is no service of
the broker's under a GPU lease.

The lease is taken with ``"stream": true``: it lives as long as this
process's connection to the broker, so a wrapper killed with SIGKILL frees
the GPU as soon as the kernel closes its socket. CMD starts once the lease
is held (``MGPUMANAGER_LEASE_ID`` in its environment), gets SIGINT, SIGTERM
and SIGHUP forwarded, and its exit status is this one's. If the lease ends
first (its ttl, the broker stopping), CMD is stopped: SIGTERM, then SIGKILL
after ``--grace``.

Exit statuses a shell loop can act on:

- CMD's own status (128 + N when signal N ended it);
- 75 (EX_TEMPFAIL): not now (queue full or timed out, the broker stopping,
  ``--wait-max`` passed, no broker answering): try again later;
- 69 (EX_UNAVAILABLE): refused for good (it can never fit, a bad request,
  no access);
- 124: the lease ended first (its ttl, the broker stopping); CMD was stopped;
- 126 / 127: CMD could not be started / was not found.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.parse

from .procs import ProcessTable

DEFAULT_URL = "http://127.0.0.1:8770"
TOKEN_ENV = "MGPUMANAGER_TOKEN"
LEASE_ID_ENV = "MGPUMANAGER_LEASE_ID"

EXIT_REFUSED = 69        # refused for good: it can never fit, a bad request, no access
EXIT_TRY_LATER = 75      # not now: queue full or timed out, the broker stopping or unreachable
EXIT_LEASE_ENDED = 124   # the lease ended before CMD did (its ttl, the broker stopping)
EXIT_CANNOT_RUN = 126    # CMD is not executable
EXIT_NOT_FOUND = 127     # CMD does not exist


# Codes of refusals that a later try may not meet.
TRY_LATER_CODES = frozenset({"queue_full", "queue_timeout", "shutting_down", "consumer_unhealthy",
                             "consumer_cooling_down", "unload_failed", "client_gone"})


def read_token(token_file: str | None) -> str | None:
    """From a file (first line) or the environment, never from the command
    line, where every local user's ``ps`` would show it."""
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            return f.readline().strip() or None
    return os.environ.get(TOKEN_ENV) or None


def say(message: str) -> None:
    print(f"mgpumanager run: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, url: str, vram_mib: int, label: str | None, ttl_s: float | None,
        wait_max_s: float | None, grace_s: float, token: str | None,
        gpus: list[int] | None = None) -> int:
    # Its own pid: the command is its child, and the tree's memory is the lease's.
    label = re.sub(r"[^A-Za-z0-9._ -]", "-", label or os.path.basename(cmd[0]))[:64] or "lease"
    body: dict = {"vram_mib": vram_mib, "label": label, "stream": True, "pid": os.getpid()}
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    if gpus:
        body["gpu"] = gpus
    try:
        conn, sock, answer = _ask(url, body, token, wait_max_s)
    except TimeoutError:
        say(f"no GPU lease within --wait-max {wait_max_s:g} s")
        return EXIT_TRY_LATER
    except (OSError, http.client.HTTPException, ValueError) as e:
        say(f"no broker answered at {url}: {e}")
        return EXIT_TRY_LATER
    try:
        if answer.status != 200:
            return _refused(answer.status, answer.read(64 * 1024))
        try:
            lease = json.loads(answer.readline())
        except (OSError, http.client.HTTPException, ValueError) as e:
            say(f"the broker's answer broke off: {e}")
            return EXIT_TRY_LATER
        sock.settimeout(None)                 # --wait-max bounds the wait, not the run
        return _run_leased(cmd, lease, answer, grace_s, gpus)
    finally:
        conn.close()                          # the broker ends the lease as it closes


def _ask(url: str, body: dict, token: str | None, wait_max_s: float | None):
    """POST /v1/leases; (connection, its socket, response) once the answer's
    head is in (the socket: http.client hands it to a response that ends
    the connection)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url {url!r}: expected http://HOST:PORT")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, parts.port, timeout=5)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", parts.path.rstrip("/") + "/v1/leases", json.dumps(body), headers)
        # Waiting for the head is waiting in the queue: --wait-max bounds it.
        sock = conn.sock
        sock.settimeout(None if wait_max_s is None else max(0.01, wait_max_s))
        return conn, sock, conn.getresponse()
    except BaseException:
        conn.close()
        raise


def _run_leased(cmd: list[str], lease: dict, answer, grace_s: float,
                gpus: list[int] | None = None) -> int:
    ended = threading.Event()
    why: list[str] = []

    def follow() -> None:
        """Until the broker says the lease ended, or the stream breaks."""
        try:
            while True:
                line = answer.readline()
                if not line:
                    break
                if line.strip():
                    why.append(json.loads(line).get("ended", "ended"))
                    break
        except (OSError, http.client.HTTPException, ValueError):
            pass
        ended.set()

    # The broker's token is no business of the program's.
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env[LEASE_ID_ENV] = lease["id"]
    if gpus:
        # Only the leased cards, numbered as nvidia-smi and NVML number them
        # (CUDA's own default order puts the fastest card first).
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, lease.get("gpus", gpus)))
    try:
        child = subprocess.Popen(cmd, env=env)
    except FileNotFoundError:
        say(f"{cmd[0]}: command not found")
        return EXIT_NOT_FOUND
    except PermissionError:
        say(f"{cmd[0]}: permission denied")
        return EXIT_CANNOT_RUN

    def forward(sig, _frame):
        # A Ctrl-C reaches the whole foreground group, the command included:
        # forwarding it too would make it two.
        if sig == signal.SIGINT and _in_foreground():
            return
        child.send_signal(sig)

    forwarded = {sig: signal.signal(sig, forward)
                 for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    threading.Thread(target=follow, name="lease-stream", daemon=True).start()
    try:
        while child.poll() is None:
            if ended.wait(0.2):
                say(f"the GPU lease ended first ({why[0] if why else 'connection lost'}); "
                    "stopping the command")
                _stop(child, grace_s)
                return EXIT_LEASE_ENDED
        code = child.returncode
        return 128 - code if code < 0 else code
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)


def _in_foreground() -> bool:
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except OSError:
        return False


def _refused(status: int, data: bytes) -> int:
    try:
        err = json.loads(data).get("error", {})
    except (ValueError, AttributeError):
        err = {}
    say(data.decode("utf-8", "replace").strip()[:2000] or f"HTTP {status}")
    code = err.get("code") if isinstance(err, dict) else None
    if code in TRY_LATER_CODES or (code is None and status in (429, 502, 503, 504)):
        return EXIT_TRY_LATER
    return EXIT_REFUSED


def _stop(child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the command and every process it started, then SIGKILL to
    those still there after ``grace_s``: none may stay on the GPU."""
    # Found before the command exits: its children then belong to init.
    tree = _signal_tree({child.pid}, signal.SIGTERM)
    try:
        child.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_tree(tree, signal.SIGKILL)
    child.wait()


def _signal_tree(roots: set[int], sig: int) -> set[int]:
    """Signal ``roots`` and their descendants; the pids signalled."""
    tree = ProcessTable().with_descendants(roots) | roots
    for pid in sorted(tree):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return tree
