"""Logging set-up: into gunicorn's error log when under gunicorn (so systemd's
journal gets every line), as text or one JSON object per line."""

from __future__ import annotations

import json
import logging
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
