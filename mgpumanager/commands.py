"""Load and unload commands (``{command: [systemctl, stop, whisper-server]}``):
run without a shell, bounded in time and in the memory their output may
take, and killed whole, descendants included, at their timeout."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile

log = logging.getLogger("mgpumanager.consumers")


def run_command(name: str, argv: tuple[str, ...], timeout_s: float) -> str | None:
    """Run a load or unload command without a shell; None if it exited 0.

    Its output goes to a temporary file (a chatty command cannot fill the
    broker's memory) and the last of it is logged with the exit status. It
    runs in a process group of its own, killed whole at the timeout, so a
    child it started cannot outlive it.
    """
    what = " ".join(argv)
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            log.warning("%s: %s could not run: %s", name, what, e)
            return f"{what}: {e.strerror or e}"
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            # Its descendants first: one that called setsid has left the
            # process group, but not the tree.
            for pid in descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
            log.warning("%s: %s did not finish within %g s; killed", name, what, timeout_s)
            return f"{what}: no exit within {timeout_s:g} s"
        size = out.seek(0, os.SEEK_END)
        out.seek(max(0, size - 2000))
        tail = out.read().decode("utf-8", "replace").strip()[-300:]
    # Quoted: a command's output must not be able to forge log lines.
    log.info("%s: %s exited %d%s", name, what, code, f": {tail!r}" if tail else "")
    if code != 0:
        return f"{what} exited {code}: {tail[-200:]!r}"
    return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(stat[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found
