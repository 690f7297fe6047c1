"""Per-service defaults (``consumers.<name>.type``), from each service's own
documentation. A preset fills in the keys a consumer leaves out; any key the
config sets replaces the preset's whole (a ``load``, ``unload`` or ``busy``
mapping is taken as given, not merged).

- ollama: its loaded models and their VRAM come from ``GET /api/ps``
  (``models[].size_vram``); unloading is a request per model listed there,
  ``{"model": <name>, "keep_alive": 0}``, confirmed by polling ``/api/ps``
  until it is empty. A pull, push, create, copy or show through /upstream/
  is no GPU job (a download, a file).
- comfyui: ``POST /free`` with ``{"unload_models": true, "free_memory":
  true}`` (it answers at once and frees later: the broker waits until its
  own ``/system_stats`` shows the memory back, as well as the reading);
  after ``/prompt`` it renders, so the
  GPU is held until ``/queue`` is empty; every route is served under
  ``/api/`` too.
- whisper.cpp: its server has no unload route. Freeing its VRAM means
  stopping the process: set ``unload: {command: [systemctl, stop,
  whisper-server]}`` and ``load: {command: [systemctl, start,
  whisper-server]}`` (run without a shell, with a timeout; the broker waits
  for the health probe after a start).
- llama.cpp: ``llama-server`` in router mode (``--models-dir``) lists its
  models at ``GET /models`` and loads and unloads them at ``POST
  /models/load`` and ``/models/unload`` (only those it lists as
  ``status.value: loaded``: it refuses to unload one not running). With a
  single model it has no
  unload: use ``generic`` and commands, as for whisper.cpp.
- vllm: sleep mode (``--enable-sleep-mode``): ``POST /sleep?level=1`` frees
  the weights' VRAM, ``POST /wake_up`` brings it back.
- openai: any OpenAI-compatible server: health ``/v1/models``; every
  write is a GPU job.
"""

from __future__ import annotations

from typing import Any

TYPES = ("generic", "ollama", "comfyui", "whisper.cpp", "llama.cpp", "vllm", "openai")

# Every preset fails closed: a request that writes (POST, PUT, PATCH) is a
# GPU job unless the service's own documentation says the route does no GPU
# work (a download, a tokenizer, an upload, a queue or history edit). An
# allow-list misses routes each release adds (llama.cpp's /v1/messages,
# /reranking, /responses, ...), and a missed route runs beside another's job.
def _both(*routes: str) -> list[str]:
    """Each route, and the same under ``/api`` (ComfyUI serves both)."""
    return [*routes, *(f"{m} /api{p}" for m, p in (r.split() for r in routes))]

PRESETS: dict[str, dict[str, Any]] = {
    "generic": {},
    "ollama": {
        "health": "/api/version",
        "models_from": {"path": "/api/tags", "list": "models", "name": "name"},
        "loaded_from": {"path": "/api/ps", "list": "models", "name": "name",
                        "vram_bytes": "size_vram"},
        "unload": {"method": "POST", "path": "/api/generate",
                   "json": {"model": "{model}", "keep_alive": 0},
                   "for_each": {"path": "/api/ps", "list": "models", "name": "name"},
                   "until_empty": True},
        "not_gpu_routes": ["POST /api/pull", "POST /api/push", "POST /api/create",
                           "POST /api/copy", "POST /api/show", "POST /api/blobs/*"],
    },
    "comfyui": {
        "health": "/system_stats",
        "unload": {"method": "POST", "path": "/free",
                   "json": {"unload_models": True, "free_memory": True},
                   "until_freed": {"path": "/system_stats", "key": "devices.0.vram_free",
                                   "held_key": "devices.0.torch_vram_total"}},
        "busy": {"path": "/queue", "keys": ["queue_running", "queue_pending"]},
        "not_gpu_routes": _both("POST /upload/*", "POST /interrupt", "POST /queue",
                                "POST /history", "POST /free", "POST /userdata/*",
                                "POST /settings", "POST /settings/*", "POST /users"),
    },
    "whisper.cpp": {
        "health": "/health",
    },
    "llama.cpp": {
        "health": "/health",
        "models_from": {"path": "/v1/models", "list": "data", "name": "id"},
        "unload": {"method": "POST", "path": "/models/unload", "json": {"model": "{model}"},
                   "for_each": {"path": "/models", "list": "data", "name": "id",
                                "where": "status.value", "equals": "loaded"}},
        "not_gpu_routes": ["POST /tokenize", "POST /detokenize", "POST /apply-template"],
    },
    "vllm": {
        "health": "/health",
        "models_from": {"path": "/v1/models", "list": "data", "name": "id"},
        "load": {"method": "POST", "path": "/wake_up"},
        "unload": {"method": "POST", "path": "/sleep?level=1"},
        "not_gpu_routes": ["POST /tokenize", "POST /detokenize"],
    },
    "openai": {
        "health": "/v1/models",
        "models_from": {"path": "/v1/models", "list": "data", "name": "id"},
    },
}


def with_preset(node: dict) -> dict:
    """The consumer's settings with its type's defaults under them."""
    preset = PRESETS.get(node.get("type") or "generic", {})
    return {**preset, **{k: v for k, v in node.items() if v is not None or k not in preset}}
