"""The OpenAI door's routing: which consumer serves a model, and the model a
request names.

``ModelDirectory`` merges each consumer's configured ``models`` (names and
globs) with the names the service itself lists (``models_from``: ollama's
``/api/tags``, an OpenAI server's ``/v1/models``), refreshed after health
probes. ``model_of`` reads the ``model`` of a spooled request body without
a second copy of it: a JSON body is parsed where it lies, a multipart
upload is scanned part by part for its ``model`` field.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import re
import threading
from typing import Callable, Iterator

from .admin import ConsumerActions
from .clock import Clock
from .config import Config
from .errors import BadRequest, BrokerError, ModelNotFound

log = logging.getLogger("mgpumanager.models")

# A service's list changes when someone pulls or removes a model: minutes
# apart. An unknown name asks again at once, at most this often.
REFRESH_S = 30.0
REFRESH_ON_MISS_S = 2.0
# The routes of the door (POST /v1/<route>), and every path whose errors are OpenAI's.
OPENAI_ROUTES = ("chat/completions", "completions", "embeddings", "audio/speech",
                 "audio/transcriptions", "audio/translations", "images/generations")
OPENAI_PATHS = frozenset({*(f"/v1/{r}" for r in OPENAI_ROUTES), "/v1/models"})
# What a multipart part's value may hold to be a model name.
MODEL_FIELD_MAX = 1024
PART_HEAD_MAX = 16 * 1024


class ModelDirectory:
    def __init__(self, config: Config, actions: ConsumerActions, clock: Clock,
                 timeout_s: float):
        self.config = config
        self.actions = actions
        self.clock = clock
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._listed: dict[str, tuple[str, ...]] = {}     # consumer -> what it listed last
        self._asked_at: dict[str, float] = {}
        self._asked_all_at = float("-inf")
        self._failed: dict[str, str] = {}                   # consumer -> why its list failed
        # Exact names first (configured before listed), then globs, longest first.
        self._exact = {m: n for n, c in config.consumers.items() for m in c.models
                       if not _is_glob(m)}
        self._globs = sorted(((m, n) for n, c in config.consumers.items() for m in c.models
                              if _is_glob(m)), key=lambda mn: -len(mn[0]))

    @property
    def serves_any(self) -> bool:
        return any(c.models or c.models_from for c in self.config.consumers.values())

    def probed(self, name: str, ok: bool) -> None:
        """After a health probe: a healthy service that lists its models is
        asked for the list once it is older than REFRESH_S."""
        c = self.config.consumers[name]
        if ok and c.models_from is not None:
            last = self._asked_at.get(name)
            if last is None or self.clock.now() - last >= REFRESH_S:
                self.refresh(name)

    def refresh(self, name: str) -> None:
        c = self.config.consumers[name]
        self._asked_at[name] = self.clock.now()
        try:
            found = self.actions.models(c, c.models_from, self.timeout_s)
        except BrokerError as e:
            if self._failed.get(name) != e.message:        # said once, not every REFRESH_S
                log.info("%s: could not list its models: %s", name, e.message)
            self._failed[name] = e.message
            return
        self._failed.pop(name, None)
        key = c.models_from.name
        names = tuple(str(m[key]) if isinstance(m, dict) else str(m)
                      for m in found if not isinstance(m, dict) or m.get(key) is not None)
        with self._lock:
            self._listed[name] = names

    def consumer_for(self, model: str) -> str:
        """The consumer that serves ``model``, or ModelNotFound naming the
        close ones. An unknown name asks the services again first (a model
        pulled a moment ago), at most every REFRESH_ON_MISS_S."""
        found = self._lookup(model)
        if found is None and self.clock.now() - self._asked_all_at >= REFRESH_ON_MISS_S:
            self._asked_all_at = self.clock.now()
            for name, c in self.config.consumers.items():
                if c.models_from is not None:
                    self.refresh(name)
            found = self._lookup(model)
        if found is not None:
            return found
        # Bounded: difflib's work grows with the product of the lengths.
        close = (difflib.get_close_matches(model, [m for m, _ in self.listing()], n=3,
                                           cutoff=0.5) if len(model) <= 256 else [])
        hint = f"; close: {', '.join(close)}" if close else ""
        shown = model if len(model) <= 200 else model[:200] + "..."
        raise ModelNotFound(f"no consumer serves the model {shown!r}{hint} "
                            "(GET /v1/models lists them)", param="model")

    def _lookup(self, model: str) -> str | None:
        if model in self._exact:
            return self._exact[model]
        with self._lock:
            listed = list(self._listed.items())
        for name, names in listed:
            if model in names:
                return name
        for pattern, name in self._globs:
            if fnmatch.fnmatchcase(model, pattern):
                return name
        return None

    def listing(self) -> list[tuple[str, str]]:
        """(model, consumer) for every concrete name: configured, then listed."""
        out, seen = [], set()
        with self._lock:
            listed = dict(self._listed)
        for name, c in self.config.consumers.items():
            for model in (*(m for m in c.models if not _is_glob(m)), *listed.get(name, ())):
                if model not in seen and self._lookup(model) == name:
                    seen.add(model)
                    out.append((model, name))
        return out


def _is_glob(name: str) -> bool:
    return any(ch in name for ch in "*?[")


# -- the model a request names ---------------------------------------------------------

def model_of(read: Callable[[], Iterator[bytes]], size: int, content_type: str) -> str:
    """The ``model`` of a request body, read through ``read`` (chunks from
    the start of the spooled body). BadRequest when it has none."""
    if size == 0:
        raise BadRequest("the request has no body; it must name its model", param="model")
    if content_type.split(";", 1)[0].strip().lower() == "multipart/form-data":
        boundary = _boundary(content_type)
        model = _multipart_field(read(), boundary, b"model")
    else:
        try:
            body = json.loads(b"".join(read()))
        except (ValueError, RecursionError):      # UnicodeDecodeError is a ValueError
            raise BadRequest("the request body is not JSON (or a multipart form for an "
                             "upload)", param=None) from None
        model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        raise BadRequest("the request names no model (a \"model\" string)", param="model")
    return model


def _boundary(content_type: str) -> bytes:
    found = re.search(r'boundary="?([^";]{1,200})"?', content_type)
    if not found:
        raise BadRequest("a multipart/form-data body without a boundary", param=None)
    return found.group(1).encode("latin-1")


_NAME_RE = re.compile(rb'(?i)content-disposition:[^\r\n]*;\s*name="?([^";\r\n]*)"?')


def _multipart_field(chunks: Iterator[bytes], boundary: bytes, field: bytes) -> str | None:
    """The value of one small form field, scanning part heads as they come
    and holding at most one chunk plus one part head in memory; a file
    part's data is skipped, never collected. A delimiter is the boundary
    line followed by CRLF (another part) or ``--`` (the end), RFC 2046."""
    delimiter = b"\r\n--" + boundary
    buf = bytearray(b"\r\n")             # the first delimiter has no CRLF before it
    pos = 0                                # where the next search starts in buf
    state = "seek"                         # seek a delimiter, read a part head, read the value
    for chunk in chunks:
        buf += chunk
        while True:
            if state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > PART_HEAD_MAX:
                        return None        # no form's part head is this long
                    break
                found = _NAME_RE.search(bytes(buf[:end]))
                del buf[:end + 4]
                pos = 0
                state = "value" if found and found.group(1) == field else "seek"
                continue
            at = buf.find(delimiter, pos)
            if at < 0:
                if state == "value":
                    if len(buf) > MODEL_FIELD_MAX + len(delimiter):
                        return None        # too long to be a model's name
                    pos = max(0, len(buf) - len(delimiter))
                else:                      # keep only what may be a split delimiter
                    del buf[:max(0, len(buf) - len(delimiter))]
                    pos = 0
                break
            after = bytes(buf[at + len(delimiter):at + len(delimiter) + 2])
            if len(after) < 2:             # cannot tell yet: wait for more
                if state == "seek":
                    del buf[:at]
                    at = 0
                pos = at
                break
            if after != b"\r\n" and after != b"--" and after[:1] not in (b" ", b"\t"):
                pos = at + 1               # the boundary's text inside data, not a delimiter
                continue
            if state == "value":
                return bytes(buf[:at]).decode("utf-8", "replace").strip()
            if after == b"--":
                return None                # the closing delimiter: no such field
            del buf[:at + len(delimiter)]
            pos = 0
            state = "head"
    return None
