"""A simulated OpenAI-compatible server (llama-server, vLLM, LocalAI,
faster-whisper-server, Kokoro-FastAPI all speak this) on the shared SimGpu.

One instance serves a few model names under ``/v1``: chat and completions
(SSE when streamed), embeddings, speech, transcriptions and translations
(multipart uploads), image generations, and its model list. Its whole model
set is one allocation, loaded by the first request and freed by
``POST /sim/unload`` (the broker's unload call), so two instances that do
not fit together show a simulated OOM if the broker ever lets them overlap.
"""

from __future__ import annotations

import base64
import fnmatch
import time

from .consumers import ModelServer, SimGpu, SimOom, oom_reply, sse_tokens, wav_bytes
from .http import Reply, Request


class OpenAISim(ModelServer):
    token_s = 0.03
    tokens = 6
    work_s = 0.1

    def __init__(self, gpu: SimGpu, name: str, models: list[str], *, resident_mib: int,
                 accepts: list[str] | None = None, **kw):
        self.name = name
        self.models = list(models)                     # what /v1/models lists
        self.accepts = list(accepts or models)         # names or globs it serves
        self.resident_mib = resident_mib
        self.asked_for: list[str] = []     # the model of each GPU request, in order
        super().__init__(gpu, **kw)

    def register(self):
        self.route("GET", "/v1/models", lambda r: Reply.json(
            {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                         "owned_by": self.name} for m in self.models]}))
        self.route("POST", "/v1/chat/completions", self.chat)
        self.route("POST", "/v1/completions", self.chat)
        self.route("POST", "/v1/embeddings", self.embeddings)
        self.route("POST", "/v1/audio/speech", self.speech)
        self.route("POST", "/v1/audio/transcriptions", self.transcription)
        self.route("POST", "/v1/audio/translations", self.transcription)
        self.route("POST", "/v1/images/generations", self.image)
        self.route("POST", "/sim/unload", lambda r: Reply.json({"freed_mib": self.unload()}))

    def _start(self, model: str) -> Reply | None:
        """Load if need be; a reply if the request cannot be served."""
        if not any(fnmatch.fnmatchcase(model, pattern) for pattern in self.accepts):
            return Reply.json({"error": {"message": f"model {model!r} not found",
                                         "type": "invalid_request_error", "code": None}}, 404)
        self.asked_for.append(model)
        try:
            self.ensure_loaded()
        except SimOom as e:
            return oom_reply(e)
        return None

    def _served(self, model: str, kind: str) -> Reply | None:
        """Load if need be and do ``kind``'s work on the GPU; a reply if the
        request cannot be served."""
        refused = self._start(model)
        if refused:
            return refused
        with self.gpu.job(self.name, kind):
            self.sleep(self.work_s)
        return None

    def _json(self, req: Request) -> dict:
        try:
            body = req.json()
        except ValueError:
            body = None
        return body if isinstance(body, dict) else {}

    def chat(self, req: Request) -> Reply:
        body = self._json(req)
        model = str(body.get("model"))
        refused = self._start(model)
        if refused:
            return refused
        n = int(body.get("max_tokens") or self.tokens)
        chat = req.path.endswith("/chat/completions")
        if not body.get("stream"):
            with self.gpu.job(self.name, "llm"):
                self.sleep(self.token_s * n)
            text = "".join(f"tok{i} " for i in range(n))
            choice = ({"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": text}} if chat else
                      {"index": 0, "finish_reason": "stop", "text": text})
            return Reply.json({"id": "cmpl-sim", "object": "chat.completion" if chat
                               else "text_completion", "created": int(time.time()),
                               "model": model, "choices": [choice],
                               "usage": {"prompt_tokens": 1, "completion_tokens": n,
                                         "total_tokens": n + 1}})

        return Reply(200, sse_tokens(self, model, n), content_type="text/event-stream")

    def embeddings(self, req: Request) -> Reply:
        body = self._json(req)
        model = str(body.get("model"))
        refused = self._served(model, "embed")
        if refused:
            return refused
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        return Reply.json({"object": "list", "model": model, "data": [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, float(len(str(x)))]}
            for i, x in enumerate(inputs)], "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    def speech(self, req: Request) -> Reply:
        refused = self._served(str(self._json(req).get("model")), "tts")
        return refused or Reply(200, wav_bytes(0.1), content_type="audio/wav")

    def transcription(self, req: Request) -> Reply:
        data = req.body()
        model = _form_field(data, req.headers.get("Content-Type") or "", "model")
        refused = self._served(str(model), "stt")
        return refused or Reply.json({"text": f"simulated transcript of {len(data)} bytes"})

    def image(self, req: Request) -> Reply:
        refused = self._served(str(self._json(req).get("model")), "image")
        return refused or Reply.json({"created": int(time.time()), "data": [
            {"b64_json": base64.b64encode(b"\x89PNG sim").decode()}]})


def _form_field(data: bytes, content_type: str, name: str) -> str | None:
    """A small field of a multipart body (the simulator reads it whole)."""
    boundary = content_type.partition("boundary=")[2].strip('"').encode()
    for part in data.split(b"--" + boundary):
        head, _, value = part.partition(b"\r\n\r\n")
        if f'name="{name}"'.encode() in head:
            return value.rstrip(b"\r\n").decode()
    return None

