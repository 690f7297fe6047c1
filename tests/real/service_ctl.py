"""Start and stop a server by pid file: the broker's load and unload commands
for whisper.cpp in `make test-real` (where a real box has `systemctl start
whisper-server`).

    service_ctl.py start PIDFILE LOG [--health URL] -- ARGV...
    service_ctl.py stop PIDFILE

``start`` runs ARGV detached (its own session, output to LOG), writes its
pid to PIDFILE and, with --health, waits until URL answers 2xx (at most
60 s), so the command returns once the server serves. It does nothing if
the pid in PIDFILE is alive. ``stop`` sends SIGTERM, waits for the process
to end (SIGKILL after 10 s) and removes PIDFILE; a server not running is
already stopped. Standard library only: the broker runs it with its own
python.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                        # a zombie (our own child, not yet reaped) is not alive
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def start(pidfile: Path, log: Path, argv: list[str], health: str | None) -> int:
    pid = read_pid(pidfile)
    if pid is None or not alive(pid):
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        pid = proc.pid
        pidfile.write_text(f"{pid}\n")
    if health:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not alive(pid):
                print(f"{argv[0]} exited; see {log}", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen(health, timeout=2) as r:
                    if 200 <= r.status < 300:
                        print(f"started pid {pid}")
                        return 0
            except OSError:
                pass
            time.sleep(0.1)
        print(f"{health} did not answer within 60 s", file=sys.stderr)
        return 1
    print(f"started pid {pid}")
    return 0


def stop(pidfile: Path) -> int:
    pid = read_pid(pidfile)
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.05)
        print(f"stopped pid {pid}")
    pidfile.unlink(missing_ok=True)
    return 0


def main(args: list[str]) -> int:
    if len(args) >= 2 and args[0] == "stop":
        return stop(Path(args[1]))
    if len(args) >= 5 and args[0] == "start" and "--" in args:
        rest = args[1:args.index("--")]
        argv = args[args.index("--") + 1:]
        health = None
        if "--health" in rest:
            i = rest.index("--health")
            health = rest[i + 1]
            del rest[i:i + 2]
        if len(rest) == 2 and argv:
            return start(Path(rest[0]), Path(rest[1]), argv, health)
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
