"""The OS-level GPU lock file against the other users of the box and the
OS: planted files, files deleted while held, one path for everyone."""

import os
import subprocess
import tempfile

import pytest

from mgpumanager import oslock
from mgpumanager.oslock import LockFileError, OsLock

OTHER_UID, ANOTHER_UID = 2000, 1000
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acts as other users (needs root)")


@pytest.fixture
def shared_tmp():
    """A sticky, world-writable directory, as /tmp is."""
    d = tempfile.mkdtemp(prefix="mgpumanager-test-")
    os.chmod(d, 0o1777)
    yield d
    subprocess.run(["rm", "-rf", d], check=False)


def as_user(uid: int, fn) -> str:
    """fn() run in a child process as another user; what it returns, as text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                            # the child: never back into pytest
        try:
            os.setgid(uid)
            os.setuid(uid)
            out = str(fn())
        except BaseException as e:          # noqa: BLE001 - reported to the parent
            out = f"error: {e!r}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def test_a_planted_symlink_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "precious"
    victim.write_text("keep me")
    (tmp_path / "gpu.lock").symlink_to(victim)
    with pytest.raises(LockFileError, match="symbolic link"):
        OsLock(str(tmp_path / "gpu.lock"))
    assert victim.read_text() == "keep me"


def test_a_directory_or_fifo_in_its_place_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "f")
    for name in ("d", "f"):
        with pytest.raises(LockFileError):
            OsLock(str(tmp_path / name))


@needs_root
def test_another_users_file_is_locked_read_only_and_never_written(shared_tmp):
    """A 0644 file another user made first stopped the worker booting; a
    0666 one was truncated and written."""
    path = os.path.join(shared_tmp, "gpu.lock")
    for mode in (0o644, 0o666):
        with open(path, "w") as f:
            f.write("theirs\n")
        os.chown(path, OTHER_UID, OTHER_UID)
        os.chmod(path, mode)
        assert as_user(ANOTHER_UID, lambda: OsLock(path).try_acquire()) == "True"
        with open(path) as f:
            assert f.read() == "theirs\n"
        os.unlink(path)


def test_a_lock_file_deleted_while_held_is_not_taken_twice(tmp_path):
    """systemd removing its RuntimeDirectory, or tmpfiles ageing /tmp: a new
    broker flocks a fresh file at the path; the old one must see it."""
    path = str(tmp_path / "gpu.lock")
    old = OsLock(path)
    assert old.try_acquire()
    os.unlink(path)
    old.release()
    new = OsLock(path)                     # a broker started now: a fresh file
    assert new.try_acquire()
    assert not old.try_acquire()           # its file was gone: it opens the path's
    assert not old.try_acquire()
    new.release()
    assert old.try_acquire()
    old.close()
    new.close()


def test_the_holder_is_who_the_kernel_says_not_what_the_file_says(tmp_path):
    path = str(tmp_path / "gpu.lock")
    lock = OsLock(path)
    assert lock.holder_pid() is None
    assert lock.try_acquire()
    assert lock.holder_pid() == os.getpid()
    lock.release()
    with open(path, "w") as f:
        f.write("1\n")                     # anyone may write any pid there
    assert lock.holder_pid() is None
    lock.close()


@needs_root
def test_every_user_gets_the_same_default_lock_file(shared_tmp, monkeypatch):
    """$XDG_RUNTIME_DIR for one, /tmp/mgpumanager-<uid> for another: two
    users' brokers ran GPU jobs at once."""
    monkeypatch.delenv(oslock.LOCK_FILE_ENV)
    run = os.path.join(shared_tmp, "run")          # as /run: only root may write there
    os.mkdir(run, 0o755)
    monkeypatch.setattr(oslock, "DEFAULT_DIR", run + "/mgpumanager")
    monkeypatch.setattr(oslock, "FALLBACK_FILE", shared_tmp + "/mgpumanager-gpu.lock")
    paths = {as_user(uid, oslock.default_lock_file) for uid in (OTHER_UID, ANOTHER_UID)}
    assert paths == {shared_tmp + "/mgpumanager-gpu.lock"}


def test_healthz_says_so_when_another_process_holds_the_lock_file_past_the_queue_timeout(
        tmp_path):
    import time
    from mgpumanager.broker import Broker
    from mgpumanager.config import parse_config
    path = str(tmp_path / "gpu.lock")
    config = parse_config({"gpu": {"backend": "ledger", "total_mib": 1000},
                           "scheduler": {"lock_file": path, "queue_timeout_s": 0.2},
                           "routes": {"tts": "t"},
                           "consumers": {"t": {"url": "http://127.0.0.1:1",
                                               "paths": {"tts": "/"}, "vram_resident_mib": 0}}},
                          "t.yaml")
    broker = Broker(config)
    holder = subprocess.Popen(["flock", path, "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while not broker.gpu.oslock.held_elsewhere():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert broker.liveness() == []          # not yet past the queue timeout
        time.sleep(0.3)
        problems = broker.liveness()
        assert len(problems) == 1 and "held the GPU lock file" in problems[0]
        assert "(flock" in problems[0] or "(sleep" in problems[0]
    finally:
        holder.kill()
        holder.wait()
        broker.stop()
