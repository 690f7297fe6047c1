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

import json
import os
import re
import signal
import subprocess
import sys
import threading

import requests

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
        wait_max_s: float | None, grace_s: float, token: str | None) -> int:
    # Its own pid: the command is its child, and the tree's memory is the lease's.
    label = re.sub(r"[^A-Za-z0-9._ -]", "-", label or os.path.basename(cmd[0]))[:64] or "lease"
    body: dict = {"vram_mib": vram_mib, "label": label, "stream": True, "pid": os.getpid()}
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    session = requests.Session()
    session.trust_env = False             # an environment proxy must not divert loopback calls
    try:
        answer = session.post(url.rstrip("/") + "/v1/leases", json=body, headers=headers,
                              stream=True, timeout=(5, wait_max_s))
    except requests.Timeout:
        say(f"no GPU lease within --wait-max {wait_max_s:g} s")
        return EXIT_TRY_LATER
    except requests.RequestException as e:
        say(f"no broker answered at {url}: {e}")
        return EXIT_TRY_LATER
    if answer.status_code != 200:
        return _refused(answer)
    lines = answer.iter_lines()
    try:
        lease = json.loads(next(lines))
    except (StopIteration, ValueError, requests.RequestException) as e:
        say(f"the broker's answer broke off: {e}")
        return EXIT_TRY_LATER
    ended = threading.Event()
    why: list[str] = []

    def follow() -> None:
        """Until the stream ends: the lease is over, whoever ended it."""
        try:
            for line in lines:
                if line.strip():
                    why.append(json.loads(line).get("ended", "ended"))
        except (requests.RequestException, ValueError, AttributeError):
            pass
        ended.set()

    env = dict(os.environ, **{LEASE_ID_ENV: lease["id"]})
    try:
        child = subprocess.Popen(cmd, env=env)
    except FileNotFoundError:
        say(f"{cmd[0]}: command not found")
        answer.close()
        return EXIT_NOT_FOUND
    except PermissionError:
        say(f"{cmd[0]}: permission denied")
        answer.close()
        return EXIT_CANNOT_RUN
    forwarded = {sig: signal.signal(sig, lambda s, _f: child.send_signal(s))
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
        answer.close()                    # the broker ends the lease as the connection closes
        session.close()


def _refused(answer: requests.Response) -> int:
    try:
        err = answer.json().get("error", {})
    except ValueError:
        err = {}
    say(answer.text.strip()[:2000] or f"HTTP {answer.status_code}")
    code = err.get("code")
    if code in TRY_LATER_CODES or (code is None and answer.status_code in (429, 502, 503, 504)):
        return EXIT_TRY_LATER
    return EXIT_REFUSED


def _stop(child: subprocess.Popen, grace_s: float) -> None:
    child.terminate()
    try:
        child.wait(grace_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
