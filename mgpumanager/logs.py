"""Logging set-up: into gunicorn's error log when under gunicorn (so systemd's
journal gets every line), as text or one JSON object per line.

The line per job (on ``mgpumanager.jobs``) is formatted and written by a
thread of its own, from a queue: a job's thread only hands the record over,
and its client's next request on the same connection does not wait for the
line. It can come a moment after a warning logged just after it; the time
it carries is when it was logged. Everything else, evictions included, is
written at once (a warning must not be lost to a crash)."""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import queue
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a record's ``fields`` extra is merged in."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def setup_logging(log_format: str = "text") -> None:
    logger = logging.getLogger("mgpumanager")
    gunicorn_log = logging.getLogger("gunicorn.error")
    handlers = list(gunicorn_log.handlers)
    if not handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers = [handler]
    if log_format == "json":
        json_handlers = []
        for h in handlers:
            # A handler of our own on the same stream: gunicorn's keeps its format.
            j = logging.StreamHandler(getattr(h, "stream", None))
            j.setFormatter(JsonFormatter())
            json_handlers.append(j)
        handlers = json_handlers
    logger.handlers[:] = handlers
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _log_jobs_from_a_queue(logger)


class _RecordQueueHandler(logging.handlers.QueueHandler):
    """Hands the record over as it is: the stock ``prepare`` formats it in
    the caller's thread, the work this queue is for. Its arguments are
    strings and numbers, and a job's fields are not changed once logged."""

    def __init__(self, records: queue.SimpleQueue, parent: logging.Logger):
        super().__init__(records)
        self.parent = parent

    def emit(self, record: logging.LogRecord) -> None:
        # Only the line per job is queued: an eviction's comes mid-job,
        # among warnings it must not be written after.
        if (getattr(record, "fields", None) or {}).get("event") == "job":
            super().emit(record)
        else:
            self.parent.handle(record)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # An exception too: the stock prepare would fold its traceback into
        # the message (and out of JsonFormatter's "exception").
        return record


_job_listener: logging.handlers.QueueListener | None = None
_job_listener_pid: int | None = None      # the process whose thread it is


def _log_jobs_at_once() -> None:
    """The job log written by whoever logs it, as every other line is: in
    a child forked from the listener's process (its thread did not come
    along), and after the exit's drain (a daemon thread's late line)."""
    jobs = logging.getLogger("mgpumanager.jobs")
    jobs.handlers[:] = []
    jobs.propagate = True


def _log_jobs_from_a_queue(parent: logging.Logger) -> None:
    """One listener per process (started again if it was stopped). It hands
    each record to ``parent``, the logger it would have propagated to, so
    that it goes wherever that logger's handlers are at the time."""
    global _job_listener, _job_listener_pid
    if _job_listener is None or _job_listener_pid != os.getpid():
        records: queue.SimpleQueue = queue.SimpleQueue()
        _job_listener = logging.handlers.QueueListener(records, parent)  # a Logger handles too
        _job_listener_pid = os.getpid()
    if _job_listener._thread is None:
        _job_listener.start()
    jobs = logging.getLogger("mgpumanager.jobs")
    jobs.handlers[:] = [_RecordQueueHandler(_job_listener.queue, parent)]
    jobs.propagate = False


@atexit.register
def _drain_job_log() -> None:
    """At exit (a worker's end, SIGTERM included) the lines still queued are written."""
    if _job_listener is not None and _job_listener_pid == os.getpid() \
            and _job_listener._thread is not None:
        _job_listener.stop()
    _log_jobs_at_once()


os.register_at_fork(after_in_child=_log_jobs_at_once)
