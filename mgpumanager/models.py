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
from typing import Iterator

from .admin import ConsumerActions
from .clock import Clock
from .client_body import SpooledBody
from .config import Config
from .config_reader import MODEL_NAME_RE
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
_OPENAI_PREFIXES = ("/v1/models/", "/v1/chat/", "/v1/audio/", "/v1/images/",
                    "/v1/completions/", "/v1/embeddings/")
# What a multipart part's value may hold to be a model name.
MODEL_FIELD_MAX = 1024
PART_HEAD_MAX = 16 * 1024
# A service's list, and the names the close-name hint compares against.
LISTED_MAX = 10_000
CLOSE_NAMES_FROM = 2_000


def is_openai_path(path: str) -> bool:
    """Whether the broker's own errors on this path take OpenAI's shape:
    the door's routes and their neighbours (a trailing slash, a model's id)."""
    return path in OPENAI_PATHS or path.startswith(_OPENAI_PREFIXES)


class ModelDirectory:
    def __init__(self, config: Config, actions: ConsumerActions, clock: Clock,
                 timeout_s: float):
        self.config = config
        self.actions = actions
        self.clock = clock
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._listed: dict[str, tuple[str, ...]] = {}     # consumer -> what it listed last
        # Every listed name -> its consumer (the first that lists it), kept
        # with _listed: a lookup is one dict read, whatever the lists hold.
        self._listed_by_name: dict[str, str] = {}
        self._asked_at: dict[str, float] = {}
        self._asked_all_at = float("-inf")
        self._asking_all = threading.Lock()               # one refresh on a miss at a time
        self._failed: dict[str, str] = {}                   # consumer -> why its list failed
        # Exact names first (configured before listed), then globs, longest first.
        self._exact = {m: n for n, c in config.consumers.items() for m in c.models
                       if not _is_glob(m)}
        self._globs = sorted(((m, n) for n, c in config.consumers.items() for m in c.models
                              if _is_glob(m)), key=lambda mn: -len(mn[0]))

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
        names = []
        for m in found[:LISTED_MAX]:
            value = m.get(key) if isinstance(m, dict) else m
            if isinstance(value, str) and MODEL_NAME_RE.fullmatch(value):
                names.append(value)
        if len(found) > LISTED_MAX:
            log.warning("%s lists %d models; the first %d are served", name, len(found),
                        LISTED_MAX)
        with self._lock:
            self._listed[name] = tuple(names)
            by_name: dict[str, str] = {}
            for consumer in self.config.consumers:          # config order decides a tie
                for model in self._listed.get(consumer, ()):
                    by_name.setdefault(model, consumer)
            self._listed_by_name = by_name

    def _refresh_all(self) -> None:
        """Every service that lists its models, asked at once, the whole
        bounded by one timeout; one such round at a time, the others skip."""
        if not self._asking_all.acquire(blocking=False):
            return
        try:
            threads = [threading.Thread(target=self._refresh_on_own_thread, args=(name,),
                                        daemon=True, name=f"models-{name}")
                       for name, c in self.config.consumers.items() if c.models_from is not None]
            for t in threads:
                t.start()
            deadline = self.clock.now() + self.timeout_s
            for t in threads:
                t.join(max(0.0, deadline - self.clock.now()))
        finally:
            self._asking_all.release()

    def _refresh_on_own_thread(self, name: str) -> None:
        try:
            self.refresh(name)
        finally:
            close = getattr(self.actions, "close_thread_session", None)
            if close is not None:
                close()

    def consumer_for(self, model: str) -> str:
        """The consumer that serves ``model``, or ModelNotFound naming the
        close ones. An unknown name asks the services again first (a model
        pulled a moment ago), at most every REFRESH_ON_MISS_S."""
        found = self._lookup(model)
        if found is None and self.clock.now() - self._asked_all_at >= REFRESH_ON_MISS_S:
            self._asked_all_at = self.clock.now()
            self._refresh_all()
            found = self._lookup(model)
        if found is not None:
            return found
        # Bounded: difflib's work grows with the number of names and their lengths.
        names = [m for m, _ in self.listing()[:CLOSE_NAMES_FROM]]
        close = difflib.get_close_matches(model, names, n=3, cutoff=0.5) \
            if len(model) <= 256 else []
        hint = f"; close: {', '.join(close)}" if close else ""
        shown = model if len(model) <= 200 else model[:200] + "..."
        raise ModelNotFound(f"no consumer serves the model {shown!r}{hint} "
                            "(GET /v1/models lists them)", param="model")

    def _lookup(self, model: str) -> str | None:
        found = self._exact.get(model) or self._listed_by_name.get(model)
        if found is not None:
            return found
        for pattern, name in self._globs:
            if fnmatch.fnmatchcase(model, pattern):
                return name
        return None

    def listing(self) -> list[tuple[str, str]]:
        """(model, consumer) for every concrete name: configured, then listed."""
        out = list(self._exact.items())
        seen = set(self._exact)
        with self._lock:
            by_name = self._listed_by_name
        out += [(m, n) for m, n in by_name.items() if m not in seen]
        return out


def _is_glob(name: str) -> bool:
    return any(ch in name for ch in "*?[")


# -- the model a request names ---------------------------------------------------------

def model_of(body: SpooledBody | None, content_type: str) -> str:
    """The ``model`` a request body names, read where the spool keeps it.
    BadRequest when it names none, or names two."""
    if body is None or body.size == 0:
        raise BadRequest("the request has no body; it must name its model", param="model")
    if content_type.split(";", 1)[0].strip().lower() == "multipart/form-data":
        models = _multipart_fields(body.chunks(), _boundary(content_type), "model")
    else:
        with body.view() as buf:
            models = _json_models(buf)
    if len(models) > 1 and len(set(models)) > 1:
        # Parsers differ on which one counts (Flask takes the first,
        # FastAPI the last): the broker would route by one, the service run another.
        raise BadRequest(f"the request names {len(models)} different models; send one",
                         param="model")
    if not models or not models[0]:
        raise BadRequest("the request names no model (a \"model\" string)", param="model")
    return models[0]


# Strings (escapes and all) and the structural characters; numbers, true,
# false and null are skipped between matches, unread.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],:]')
_OPEN, _CLOSE = frozenset(b"{["), frozenset(b"}]")
# Tokens a body may have: a long chat is a few per message; a body built to
# make the scan slow stops here (about 0.6 s of CPU on one core).
JSON_TOKENS_MAX = 1_000_000


def _json_models(buf) -> list[str]:
    """The top-level ``model`` strings of a JSON object, found by scanning
    its tokens in ``buf`` (bytes, a memoryview or an mmap): no object is
    built for the rest, so a body costs no memory beyond its spool and
    nothing in it (depth, numbers of any length) can make parsing fail
    where the service's parser would not."""
    at = 0
    size = len(buf)
    if bytes(buf[:3]) == b"\xef\xbb\xbf":
        at = 3
    while at < size and buf[at] in b" \t\r\n":
        at += 1
    if at >= size or buf[at] != ord("{"):
        raise BadRequest("the request body is not a JSON object (or a multipart form for an "
                         "upload)", param=None)
    depth, expect_key, model_key, found = 0, False, False, []
    for count, token in enumerate(_JSON_TOKEN.finditer(buf, at)):
        if count > JSON_TOKENS_MAX:
            raise BadRequest("the JSON body has too many parts to find its model in")
        first = buf[token.start()]
        if first in _OPEN:
            depth += 1
            expect_key = depth == 1
            model_key = False
        elif first in _CLOSE:
            depth -= 1
            if depth == 0:
                return found
        elif first == ord(","):
            expect_key = depth == 1
            model_key = False
        elif first == ord('"') and depth == 1:
            if expect_key:
                expect_key = False
                # A key is compared decoded: "mod\u0065l" is "model" to the service.
                key = bytes(buf[token.start():token.end()]) if token.end() - token.start() <= 64 \
                    else b'""'
                model_key = _decoded(key) == "model"
            elif model_key:
                if token.end() - token.start() > MODEL_FIELD_MAX:
                    raise BadRequest(f"the model name is over {MODEL_FIELD_MAX} bytes",
                                     param="model")
                found.append(_decoded(bytes(buf[token.start():token.end()])) or "")
                model_key = False
    raise BadRequest("the request body is not JSON (it ends inside its object)", param=None)


def _decoded(token: bytes) -> str | None:
    try:
        value = json.loads(token)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


# A header's parameters: ; name=value or ; name="quoted value" (RFC 2045, 7578).
_PARAM_RE = re.compile(rb';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


def _params(value: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, raw in _PARAM_RE.findall(value):
        if raw.startswith(b'"'):
            raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
        out.setdefault(name.decode("latin-1").lower(), raw.decode("utf-8", "replace"))
    return out


def _boundary(content_type: str) -> bytes:
    boundary = _params(b";" + content_type.encode("latin-1", "replace").partition(b";")[2]) \
        .get("boundary")
    if not boundary or len(boundary) > 200:
        raise BadRequest("a multipart/form-data body without a usable boundary", param=None)
    return boundary.encode("latin-1", "replace")


def _field_name(head: bytes) -> str | None:
    """The ``name`` of a part, from its Content-Disposition header line."""
    for line in head.split(b"\r\n"):
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == b"content-disposition":
            return _params(b";" + value.partition(b";")[2]).get("name")
    return None


def _multipart_fields(chunks: Iterator[bytes], boundary: bytes, field: str) -> list[str]:
    """Every value of one small form field, scanning part heads as they
    come and holding at most one chunk plus one part head in memory; a file
    part's data is skipped, never collected. A delimiter is the boundary
    line followed by CRLF (another part) or ``--`` (the end), RFC 2046."""
    delimiter = b"\r\n--" + boundary
    buf = bytearray(b"\r\n")             # the first delimiter has no CRLF before it
    pos = 0                                # where the next search starts in buf
    state = "seek"                         # seek a delimiter, read a part head, read the value
    found: list[str] = []
    for chunk in chunks:
        buf += chunk
        while True:
            if state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > PART_HEAD_MAX:
                        raise BadRequest("a multipart part head is over 16 KiB")
                    break
                name = _field_name(bytes(buf[:end]))
                del buf[:end + 4]
                pos = 0
                state = "value" if name == field else "seek"
                continue
            at = buf.find(delimiter, pos)
            if at < 0:
                if state == "value":
                    if len(buf) > MODEL_FIELD_MAX + len(delimiter):
                        raise BadRequest(f"the {field} field is over {MODEL_FIELD_MAX} bytes",
                                         param=field)
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
                found.append(bytes(buf[:at]).decode("utf-8", "replace").strip())
            if after == b"--":
                return found               # the closing delimiter
            del buf[:at + len(delimiter)]
            pos = 0
            state = "head"
    return found
