"""Simulated consumers sharing one simulated GPU with real accounting.

Each speaks enough of its real service's API for the broker, the tests and
the demo: an mvoice-like TTS server, a whisper.cpp-server-like STT server,
an ollama-like LLM server and a ComfyUI-like image server. Loading a model
allocates its VRAM on the ``SimGpu``; an allocation that does not fit is a
simulated CUDA out-of-memory (HTTP 500 with the usual message) and counted.
Every job is recorded as an interval, so tests can show that no two jobs
overlapped.
"""

from __future__ import annotations

import io
import itertools
import json
import struct
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

from .http import Reply, Request, SimServer

MIB = 1024 * 1024


class SimOom(Exception):
    pass


@dataclass
class Interval:
    consumer: str
    kind: str
    start: float
    end: float | None = None


class SimGpu:
    """One GPU's memory, really accounted; every change under one lock."""

    def __init__(self, total_mib: int = 24576, name: str = "Simulated GPU 24 GiB"):
        self.total_mib = total_mib
        self.name = name
        self._lock = threading.Lock()
        self.allocations: dict[str, int] = {}     # owner -> MiB; guarded by _lock
        self.ooms = 0
        self.oom_log: list[str] = []
        self.jobs: list[Interval] = []
        self.max_concurrent = 0
        self._running = 0

    @property
    def used_mib(self) -> int:
        with self._lock:
            return sum(self.allocations.values())

    def allocate(self, owner: str, mib: int) -> None:
        with self._lock:
            used = sum(self.allocations.values())
            if used + mib > self.total_mib:
                self.ooms += 1
                msg = (f"CUDA out of memory. Tried to allocate {mib / 1024:.2f} GiB. GPU 0 has a "
                       f"total capacity of {self.total_mib / 1024:.2f} GiB of which "
                       f"{(self.total_mib - used) / 1024:.2f} GiB is free. ({owner})")
                self.oom_log.append(msg)
                raise SimOom(msg)
            self.allocations[owner] = self.allocations.get(owner, 0) + mib

    def free(self, owner: str) -> int:
        with self._lock:
            return self.allocations.pop(owner, 0)

    def holds(self, owner: str) -> bool:
        with self._lock:
            return owner in self.allocations

    @contextmanager
    def job(self, consumer: str, kind: str):
        iv = Interval(consumer, kind, time.monotonic())
        with self._lock:
            self._running += 1
            self.max_concurrent = max(self.max_concurrent, self._running)
            self.jobs.append(iv)
        try:
            yield iv
        finally:
            iv.end = time.monotonic()
            with self._lock:
                self._running -= 1

    def overlaps(self) -> list[tuple[Interval, Interval]]:
        with self._lock:
            done = sorted((j for j in self.jobs if j.end is not None), key=lambda j: j.start)
        return [(a, b) for a, b in zip(done, done[1:]) if b.start < a.end]

    def reading(self) -> dict:
        with self._lock:
            used = sum(self.allocations.values())
            return {"name": self.name, "total_mib": self.total_mib, "used_mib": used,
                    "free_mib": self.total_mib - used,
                    "util_pct": 100 if self._running else 0,
                    "allocations": dict(self.allocations), "ooms": self.ooms,
                    "running_jobs": self._running, "max_concurrent_jobs": self.max_concurrent}

    def reset_counters(self) -> None:
        with self._lock:
            self.ooms = 0
            self.oom_log.clear()
            self.jobs.clear()
            self.max_concurrent = self._running


class GpuServer(SimServer):
    """``GET /gpu``: the simulated GPU's reading, for the broker's sim
    backend; ``GET /gpu/N``: GPU N's, on a simulated box with several."""
    name = "gpu"

    def __init__(self, gpu: SimGpu, *, more: list[SimGpu] = (), **kw):
        self.gpus = [gpu, *more]
        super().__init__(**kw)

    @property
    def gpu(self) -> SimGpu:
        return self.gpus[0]

    def register(self):
        self.route("GET", "/gpu", lambda r: Reply.json(self.gpu.reading()))
        self.route("GET", r"/gpu/(?P<index>[0-9]+)", self._device)

    def _device(self, req: Request) -> Reply:
        index = int(req.params["index"])
        if index >= len(self.gpus):
            return Reply.json({"error": f"no GPU {index}"}, 404)
        return Reply.json(self.gpus[index].reading())


def oom_reply(e: SimOom) -> Reply:
    return Reply.json({"error": str(e)}, 500)


class ModelServer(SimServer):
    """A consumer whose one model is either resident on the SimGpu or not."""

    resident_mib = 1000
    load_s = 0.2
    die_mid_stream = False           # soak faults: a stream that breaks off
    fail_unload = False              # soak faults: an unload route that answers 500

    def __init__(self, gpu: SimGpu, *, time_scale: float = 1.0, **kw):
        self.gpu = gpu
        self.time_scale = time_scale
        self._model_lock = threading.Lock()
        super().__init__(**kw)

    def sleep(self, seconds: float) -> None:
        if seconds * self.time_scale > 0:
            time.sleep(seconds * self.time_scale)

    @property
    def loaded(self) -> bool:
        return self.gpu.holds(self.name)

    def ensure_loaded(self) -> None:
        """Load the model if it is not resident (a cold start); SimOom if it does not fit."""
        with self._model_lock:
            if not self.loaded:
                self.gpu.allocate(self.name, self.resident_mib)
                self.sleep(self.load_s)

    def unload(self) -> int:
        with self._model_lock:
            return self.gpu.free(self.name)

    def health(self, req: Request) -> Reply:
        if not self.healthy:
            return Reply.json({"status": "error"}, 503)
        return Reply.json({"status": "ok", "loaded": self.loaded})


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    frames = int(seconds * rate)
    data = b"\x00\x00" * frames
    buf = io.BytesIO()
    buf.write(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE")
    buf.write(b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16))
    buf.write(b"data" + struct.pack("<I", len(data)) + data)
    return buf.getvalue()


class MvoiceSim(ModelServer):
    """mvoice-like TTS: POST /api/tts -> WAV; admin load/unload; /health with loaded."""
    name = "mvoice"
    resident_mib = 3200
    load_s = 0.3
    tts_s = 0.3

    def register(self):
        self.audio: dict[str, bytes] = {}
        self.route("GET", "/health", self.health)
        self.route("POST", "/api/tts", self.tts)
        self.route("POST", "/api/admin/load", self.admin_load)
        self.route("POST", "/api/admin/unload", self.admin_unload)
        self.route("GET", "/audio/(?P<file>[^/]+)", self.get_audio)

    def tts(self, req: Request) -> Reply:
        try:
            body = req.json()
        except ValueError:
            return Reply.json({"error": "body must be JSON"}, 400)
        text = str(body.get("text", ""))
        if not text:
            return Reply.json({"error": "text is required"}, 400)
        try:
            self.ensure_loaded()
        except SimOom as e:
            return oom_reply(e)
        with self.gpu.job(self.name, "tts"):
            self.sleep(self.tts_s)
            wav = wav_bytes(min(10.0, 0.06 * len(text)))
        file = f"{uuid.uuid4().hex[:12]}.wav"
        self.audio[file] = wav
        return Reply(200, wav, {"X-Audio-Path": f"/audio/{file}"}, "audio/wav")

    def admin_load(self, req: Request) -> Reply:
        try:
            self.ensure_loaded()
        except SimOom as e:
            return oom_reply(e)
        return Reply.json({"loaded": True})

    def admin_unload(self, req: Request) -> Reply:
        if self.fail_unload:
            return Reply.json({"error": "simulated unload failure"}, 500)
        freed = self.unload()
        return Reply.json({"loaded": False, "freed_mib": freed})

    def get_audio(self, req: Request) -> Reply:
        data = self.audio.get(req.params["file"])
        if data is None:
            return Reply.json({"error": "no such file"}, 404)
        size = int(req.query.get("pad_mib", "0")) * MIB    # tests: a large audio file
        if size:
            return Reply(200, _repeat(data, size), {"Content-Length": str(size)}, "audio/wav")
        return Reply(200, data, content_type="audio/wav")


def _repeat(data: bytes, size: int):
    block = (data * (MIB // max(1, len(data)) + 1))[:MIB]
    left = size
    while left > 0:
        piece = block[:min(left, len(block))]
        left -= len(piece)
        yield piece


class WhisperSim(ModelServer):
    """whisper.cpp-server-like STT: POST /inference (multipart), JSON text.

    Like the real server (1.9.1) it takes Content-Length and chunked
    uploads alike. It has no unload route; the model stays once loaded.
    """
    name = "whisper"
    resident_mib = 1800
    load_s = 0.2
    stt_s = 0.3

    def register(self):
        self.route("GET", "/health", self.health)
        self.route("POST", "/inference", self.inference)
        # The real server has no unload: these stand for the commands that
        # stop and start its process (systemctl stop|start whisper-server).
        self.route("POST", "/sim/stop", lambda r: Reply.json({"freed_mib": self.unload()}))
        self.route("POST", "/sim/start", self._start)

    def _start(self, req: Request) -> Reply:
        try:
            self.ensure_loaded()
        except SimOom as e:
            return oom_reply(e)
        return Reply.json({"loaded": True})

    def health(self, req: Request) -> Reply:
        if not self.healthy:
            return Reply.json({"status": "error"}, 503)
        return Reply.json({"status": "ok"})

    def inference(self, req: Request) -> Reply:
        if "multipart/form-data" not in (req.headers.get("Content-Type") or ""):
            return Reply.json({"error": "expected multipart/form-data with a file field"}, 400)
        size = sum(len(c) for c in req.iter_body())
        try:
            self.ensure_loaded()
        except SimOom as e:
            return oom_reply(e)
        with self.gpu.job(self.name, "stt"):
            self.sleep(self.stt_s)
        return Reply.json({"text": f" simulated transcript of {size} bytes."})


class OllamaSim(ModelServer):
    """ollama-like LLM server: /api/generate and /api/chat stream NDJSON token
    by token; ``keep_alive`` expires the model by itself; ``keep_alive: 0`` unloads."""
    name = "ollama"
    resident_mib = 8000
    load_s = 0.4
    token_s = 0.05
    tokens = 12
    default_keep_alive_s = 300.0

    def register(self):
        self._expiry: float | None = None
        self._expiry_lock = threading.Lock()
        self.route("GET", "/api/version", self.health)
        self.route("GET", "/", lambda r: Reply(200, b"Ollama is running", content_type="text/plain"))
        self.route("GET", "/api/ps", self.ps)
        self.route("GET", "/api/tags", lambda r: Reply.json({"models": [{"name": "sim:latest"}]}))
        self.route("POST", "/api/generate", self.generate)
        self.route("POST", "/api/chat", self.generate)
        self.route("GET", "/v1/models", lambda r: Reply.json(
            {"object": "list", "data": [{"id": "sim:latest", "object": "model",
                                         "created": 0, "owned_by": "sim"}]}))
        self.route("POST", "/v1/chat/completions", self.openai_chat)
        threading.Thread(target=self._expirer, daemon=True, name="sim-ollama-expiry").start()

    def health(self, req):
        if not self.healthy:
            return Reply.json({"error": "down"}, 503)
        return Reply.json({"version": "0.0.0-sim"})

    def _expirer(self):
        while True:
            time.sleep(0.1)
            with self._expiry_lock:
                due = self._expiry is not None and time.monotonic() >= self._expiry
                if due:
                    self._expiry = None
            if due:
                self.unload()

    def _keep(self, keep_alive) -> None:
        seconds = self.default_keep_alive_s if keep_alive is None else _duration(keep_alive)
        with self._expiry_lock:
            self._expiry = time.monotonic() + seconds * self.time_scale if seconds > 0 else None
        if seconds <= 0:
            self.unload()

    def openai_chat(self, req: Request) -> Reply:
        """OpenAI-compatible chat (ollama serves one at /v1): SSE when streamed,
        with a comment line first, as servers send to keep a stream alive."""
        try:
            body = req.json()
        except ValueError:
            return Reply.json({"error": {"message": "invalid JSON"}}, 400)
        model = body.get("model", "sim:latest")
        try:
            self.ensure_loaded()
        except SimOom as e:
            return oom_reply(e)
        n = int(body.get("max_tokens") or self.tokens)
        if not body.get("stream"):
            with self.gpu.job(self.name, "llm"):
                self.sleep(self.token_s * n)
            return Reply.json({"id": "chatcmpl-sim", "object": "chat.completion",
                               "created": int(time.time()), "model": model,
                               "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                   "role": "assistant",
                                   "content": "".join(f"tok{i} " for i in range(n))}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": n,
                                         "total_tokens": n + 1}})

        def stream():
            yield b": keep-alive\n\n"
            yield from sse_tokens(self, model, n)
            self._keep(None)
        return Reply(200, stream(), content_type="text/event-stream")

    def ps(self, req):
        models = [{"name": "sim:latest", "model": "sim:latest",
                   "size_vram": self.resident_mib * MIB}] if self.loaded else []
        return Reply.json({"models": models})

    def generate(self, req: Request) -> Reply:
        try:
            body = req.json()
        except ValueError:
            return Reply.json({"error": "invalid JSON"}, 400)
        model = body.get("model", "sim:latest")
        chat = req.path.endswith("/chat")
        has_input = body.get("messages") if chat else body.get("prompt")
        if not has_input and "keep_alive" in body and _duration(body["keep_alive"]) <= 0:
            self.unload()
            with self._expiry_lock:
                self._expiry = None
            return Reply.json({"model": model, "response": "", "done": True,
                               "done_reason": "unload"})
        try:
            self.ensure_loaded()
        except SimOom as e:
            return oom_reply(e)
        n = int(body.get("options", {}).get("num_predict", self.tokens))

        def line(i, done):
            obj = {"model": model, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "done": done}
            piece = "" if done else f"tok{i} "
            if chat:
                obj["message"] = {"role": "assistant", "content": piece}
            else:
                obj["response"] = piece
            if done:
                obj.update(done_reason="stop", eval_count=n)
            return (json.dumps(obj) + "\n").encode()

        if body.get("stream", True) is False:
            with self.gpu.job(self.name, "llm"):
                self.sleep(self.token_s * n)
            self._keep(body.get("keep_alive"))
            text = "".join(f"tok{i} " for i in range(n))
            out = {"model": model, "done": True, "done_reason": "stop"}
            out["message" if chat else "response"] = (
                {"role": "assistant", "content": text} if chat else text)
            return Reply.json(out)

        def stream():
            with self.gpu.job(self.name, "llm"):
                for i in range(n):
                    self.sleep(self.token_s)
                    if self.die_mid_stream and i == 2:
                        raise ConnectionAbortedError("the simulated ollama died mid-stream")
                    yield line(i, False)
                yield line(n, True)
            self._keep(body.get("keep_alive"))
        return Reply(200, stream(), content_type="application/x-ndjson")


def sse_tokens(server: ModelServer, model: str, n: int):
    """An OpenAI chat stream of ``n`` tokens, as a job on the simulated GPU."""
    with server.gpu.job(server.name, "llm"):
        for i in range(n):
            server.sleep(server.token_s)
            yield _sse_chunk(model, f"tok{i} ")
        yield _sse_chunk(model, None, "stop")
    yield b"data: [DONE]\n\n"


def _sse_chunk(model: str, content: str | None, finish: str | None = None) -> bytes:
    obj = {"id": "chatcmpl-sim", "object": "chat.completion.chunk", "created": int(time.time()),
           "model": model, "choices": [{"index": 0, "finish_reason": finish,
                                        "delta": {} if content is None else
                                        {"role": "assistant", "content": content}}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _duration(value) -> float:
    """ollama's keep_alive: seconds as a number, or "5m", "30s", "1h"."""
    if isinstance(value, (int, float)):
        return float(value)
    s = str(value).strip()
    for suffix, mult in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
        if s.endswith(suffix):
            try:
                return float(s[:-len(suffix)]) * mult
            except ValueError:
                break
    try:
        return float(s)
    except ValueError:
        return 300.0


class ComfySim(ModelServer):
    """ComfyUI-like: POST /prompt answers at once with a prompt_id and renders
    afterwards on a worker thread; /queue, /history/<id>, /view, /system_stats;
    POST /free frees the models only once the queue is idle, as the real one
    does (its worker handles the flag between prompts)."""
    name = "comfyui"
    resident_mib = 13500
    load_s = 0.5
    render_s = 1.5
    free_delay_s = 0.5           # /free answers at once; the memory comes back this much later
    residue_mib = 512            # and some of it stays, as PyTorch's cache

    def register(self):
        self._queue: list[str] = []
        self._running: str | None = None
        self._qlock = threading.Condition()
        self._free_pending = False
        self.history: dict[str, dict] = {}
        self._numbers = itertools.count(1)
        # Like the real one, every route is also served under /api/.
        for prefix in ("", "/api"):
            self.route("GET", prefix + "/system_stats", self.system_stats)
            self.route("POST", prefix + "/prompt", self.prompt)
            self.route("GET", prefix + "/queue", self.queue)
            self.route("GET", prefix + "/history/(?P<id>[^/]+)", self.get_history)
            self.route("GET", prefix + "/history", lambda r: Reply.json(self.history))
            self.route("GET", prefix + "/view", self.view)
            self.route("POST", prefix + "/free", self.free)
        threading.Thread(target=self._worker, daemon=True, name="sim-comfy-worker").start()

    def system_stats(self, req):
        if not self.healthy:
            return Reply.json({"error": "down"}, 503)
        r = self.gpu.reading()
        # torch_vram_total: what ComfyUI's own torch holds (model and cache).
        own_mib = (self.resident_mib if self.loaded else 0) + (
            self.residue_mib if self.gpu.holds(self.name + "-cache") else 0)
        return Reply.json({"system": {"comfyui_version": "sim"},
                           "devices": [{"name": r["name"], "type": "cuda",
                                        "vram_total": r["total_mib"] * MIB,
                                        "vram_free": r["free_mib"] * MIB,
                                        "torch_vram_total": own_mib * MIB,
                                        "torch_vram_free": 0}]})

    def prompt(self, req: Request) -> Reply:
        try:
            body = req.json()
        except ValueError:
            return Reply.json({"error": "invalid JSON"}, 400)
        if not isinstance(body.get("prompt"), dict):
            return Reply.json({"error": {"type": "no_prompt", "message": "No prompt provided"}}, 400)
        pid = str(uuid.uuid4())
        with self._qlock:
            self._queue.append(pid)
            number = next(self._numbers)
            self._qlock.notify_all()
        return Reply.json({"prompt_id": pid, "number": number, "node_errors": {}})

    def _worker(self):
        while True:
            with self._qlock:
                while not self._queue:
                    if self._free_pending:
                        self._free_pending = False
                        self.unload()
                    self._qlock.wait(0.1)
                self._running = self._queue.pop(0)
            pid = self._running
            try:
                self.ensure_loaded()
                with self.gpu.job(self.name, "image"):
                    self.sleep(self.render_s)
                self.history[pid] = {"outputs": {"9": {"images": [
                    {"filename": f"{pid[:8]}.png", "subfolder": "", "type": "output"}]}},
                    "status": {"status_str": "success", "completed": True}}
            except SimOom as e:
                self.history[pid] = {"outputs": {}, "status": {
                    "status_str": "error", "completed": False, "messages": [["execution_error",
                                                                              {"exception_message": str(e)}]]}}
            finally:
                with self._qlock:
                    self._running = None
                    self._qlock.notify_all()

    @property
    def busy(self) -> bool:
        with self._qlock:
            return bool(self._running or self._queue)

    def queue(self, req):
        with self._qlock:
            running = [[0, self._running, {}, {}, []]] if self._running else []
            pending = [[i + 1, p, {}, {}, []] for i, p in enumerate(self._queue)]
        return Reply.json({"queue_running": running, "queue_pending": pending})

    def get_history(self, req):
        pid = req.params["id"]
        return Reply.json({pid: self.history[pid]} if pid in self.history else {})

    def view(self, req):
        png = (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
        return Reply(200, png, content_type="image/png")

    def free(self, req):
        """Answers at once and frees later, leaving some cache behind, as the
        real one does; without a JSON body it fails (500), as the real one does."""
        try:
            body = req.json()
        except ValueError:
            return Reply.json({"error": "expected a JSON body"}, 500)
        if not isinstance(body, dict) or not body:
            return Reply.json({"error": "expected a JSON body"}, 500)
        if body.get("unload_models") or body.get("free_memory"):
            with self._qlock:
                if self._running or self._queue:
                    self._free_pending = True
                else:
                    threading.Timer(self.free_delay_s * self.time_scale, self.unload).start()
        return Reply(200, b"")

    def unload(self) -> int:
        with self._model_lock:
            freed = self.gpu.free(self.name)
            if freed and self.residue_mib:
                self.gpu.allocate(self.name + "-cache", self.residue_mib)
            return freed

    def ensure_loaded(self) -> None:
        with self._model_lock:
            if not self.loaded:
                self.gpu.free(self.name + "-cache")      # the cache is reused by the model
                self.gpu.allocate(self.name, self.resident_mib)
                self.sleep(self.load_s)


@dataclass
class SimCluster:
    gpu: SimGpu                 # GPU 0
    gpu_server: GpuServer
    mvoice: MvoiceSim
    whisper: WhisperSim
    ollama: OllamaSim
    comfyui: ComfySim
    gpus: list[SimGpu] | None = None    # every GPU, by index

    @property
    def consumers(self) -> dict[str, ModelServer]:
        return {s.name: s for s in (self.mvoice, self.whisper, self.ollama, self.comfyui)}

    def stop(self) -> None:
        # In parallel: each server's shutdown waits out its poll interval.
        threads = [threading.Thread(target=s.stop) for s in (self.gpu_server,
                                                             *self.consumers.values())]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def start_cluster(total_mib: int = 24576, *, time_scale: float = 1.0,
                  ports: dict[str, int] | None = None, host: str = "127.0.0.1",
                  ollama_keep_alive_s: float | None = None,
                  more_gpus_mib: tuple[int, ...] = (),
                  placement: dict[str, int] | None = None) -> SimCluster:
    """Start the simulated GPU and the four consumers; port 0 picks free
    ports. ``more_gpus_mib``: GPUs 1, 2, ... beside GPU 0 (``total_mib``),
    and ``placement`` which consumer runs on which (default GPU 0)."""
    ports = ports or {}
    gpus = [SimGpu(total_mib)] + [SimGpu(mib, name=f"Simulated GPU {i} {mib // 1024} GiB")
                                  for i, mib in enumerate(more_gpus_mib, 1)]
    placement = placement or {}

    def on(name: str) -> SimGpu:
        return gpus[placement.get(name, 0)]
    kw = dict(time_scale=time_scale, host=host)
    ollama = OllamaSim(on("ollama"), port=ports.get("ollama", 0), **kw)
    if ollama_keep_alive_s is not None:
        ollama.default_keep_alive_s = ollama_keep_alive_s
    cluster = SimCluster(
        gpu=gpus[0], gpus=gpus,
        gpu_server=GpuServer(gpus[0], more=gpus[1:], host=host, port=ports.get("gpu", 0)),
        mvoice=MvoiceSim(on("mvoice"), port=ports.get("mvoice", 0), **kw),
        whisper=WhisperSim(on("whisper"), port=ports.get("whisper", 0), **kw),
        ollama=ollama, comfyui=ComfySim(on("comfyui"), port=ports.get("comfyui", 0), **kw))
    for s in (cluster.gpu_server, *cluster.consumers.values()):
        s.start()
    return cluster
