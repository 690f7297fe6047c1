"""The job log's queue, at its edges: order, exit, fork, exceptions."""

import json
import logging
import os
import time

from mgpumanager import logs

JOB = {"fields": {"event": "job"}}           # the line per job: the one queued


class Recording(logging.Handler):
    def __init__(self, formatter=None):
        super().__init__()
        self.lines = []
        if formatter:
            self.setFormatter(formatter)

    def emit(self, record):
        self.lines.append(self.format(record))


def with_handler(handler, fn, log_format="text"):
    broker_log = logging.getLogger("mgpumanager")
    saved = broker_log.handlers[:]
    logs.setup_logging(log_format)
    broker_log.handlers[:] = [handler]
    try:
        return fn()
    finally:
        broker_log.handlers[:] = saved


def test_an_eviction_line_and_the_warning_after_it_keep_their_order():
    """One thread logs an eviction, then a warning: the log must not show
    the warning first (its timestamp later than the line below it)."""
    rec = Recording()

    def go():
        logging.getLogger("mgpumanager.jobs").info("eviction victim=b")
        logging.getLogger("mgpumanager.room").warning("load of a failed")
        time.sleep(0.2)
    with_handler(rec, go)
    assert rec.lines == ["eviction victim=b", "load of a failed"]


def test_a_job_line_logged_after_the_exit_drain_is_still_written():
    """A daemon thread (a busy hold, a lease ended by the stop) may log its
    job line after atexit drained the queue: it must not vanish."""
    rec = Recording()

    def go():
        logs._drain_job_log()
        try:
            logging.getLogger("mgpumanager.jobs").info("job consumer=late", extra=JOB)
            time.sleep(0.2)
            return list(rec.lines)
        finally:
            if logs._job_listener is not None and logs._job_listener._thread is None:
                logs._job_listener.start()      # for the tests after this one
    assert with_handler(rec, go) == ["job consumer=late"]


def test_a_forked_child_writes_its_job_lines():
    """A process forked after setup_logging (gunicorn --preload, a test that
    forks) inherits a listener whose thread did not come along."""
    logs.setup_logging()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            class ToPipe(logging.Handler):
                def emit(self, record):
                    os.write(w, (record.getMessage() + "\n").encode())
            logging.getLogger("mgpumanager").handlers[:] = [ToPipe()]
            logging.getLogger("mgpumanager.jobs").info("job consumer=child", extra=JOB)
            logs._drain_job_log()           # what its exit does
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        assert f.read() == "job consumer=child\n"


def test_an_exception_on_the_job_log_keeps_its_own_json_field():
    rec = Recording(logs.JsonFormatter())

    def go():
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("mgpumanager.jobs").exception("job consumer=%s", "x", extra=JOB)
        logs._drain_job_log()
        logs._job_listener.start()
    with_handler(rec, go, "json")
    line = json.loads(rec.lines[0])
    assert line["message"] == "job consumer=x"
    assert "ValueError: boom" in line["exception"]
