"""Per-service defaults (``consumers.<name>.type``), from each service's own
documentation. A preset fills in the keys a consumer leaves out; any key the
config sets replaces the preset's whole (a ``load``, ``unload`` or ``busy``
mapping is taken as given, not merged).

- ollama: its loaded models and their VRAM come from ``GET /api/ps``
  (``models[].size_vram``); unloading is a request per model listed there,
  ``{"model": <name>, "keep_alive": 0}``, confirmed by polling ``/api/ps``
  until it is empty. Only generate, chat and embed(dings) are GPU jobs
  (an ``ollama pull`` through /upstream/ is a download, not a GPU job).
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
  /models/load`` and ``/models/unload``. With a single model it has no
  unload: use ``generic`` and commands, as for whisper.cpp.
- vllm: sleep mode (``--enable-sleep-mode``): ``POST /sleep?level=1`` frees
  the weights' VRAM, ``POST /wake_up`` brings it back.
- openai: any OpenAI-compatible server: health ``/v1/models``, GPU jobs
  are the completion, embedding, audio and image routes.
"""

from __future__ import annotations

from typing import Any

TYPES = ("generic", "ollama", "comfyui", "whisper.cpp", "llama.cpp", "vllm", "openai")

OPENAI_GPU_ROUTES = ["POST /v1/chat/completions", "POST /v1/completions",
                     "POST /v1/embeddings", "POST /v1/audio/*", "POST /v1/images/*",
                     "POST /v1/responses"]

PRESETS: dict[str, dict[str, Any]] = {
    "generic": {},
    "ollama": {
        "health": "/api/version",
        "loaded_from": {"path": "/api/ps", "list": "models", "name": "name",
                        "vram_bytes": "size_vram"},
        "unload": {"method": "POST", "path": "/api/generate",
                   "json": {"model": "{model}", "keep_alive": 0},
                   "for_each": {"path": "/api/ps", "list": "models", "name": "name"},
                   "until_empty": True},
        "gpu_routes": ["POST /api/generate", "POST /api/chat", "POST /api/embed",
                       "POST /api/embeddings", *OPENAI_GPU_ROUTES],
    },
    "comfyui": {
        "health": "/system_stats",
        "unload": {"method": "POST", "path": "/free",
                   "json": {"unload_models": True, "free_memory": True},
                   "until_freed": {"path": "/system_stats", "key": "devices.0.vram_free",
                                   "held_key": "devices.0.torch_vram_total"}},
        "busy": {"path": "/queue", "keys": ["queue_running", "queue_pending"]},
        "gpu_routes": ["POST /prompt", "POST /api/prompt"],
    },
    "whisper.cpp": {
        "health": "/health",
        "gpu_routes": ["POST /inference", "POST /load"],
    },
    "llama.cpp": {
        "health": "/health",
        "unload": {"method": "POST", "path": "/models/unload", "json": {"model": "{model}"},
                   "for_each": {"path": "/models", "list": "data", "name": "id"}},
        "gpu_routes": ["POST /completion", "POST /completions", "POST /infill",
                       "POST /embedding", "POST /embeddings", "POST /rerank",
                       *OPENAI_GPU_ROUTES],
    },
    "vllm": {
        "health": "/health",
        "load": {"method": "POST", "path": "/wake_up"},
        "unload": {"method": "POST", "path": "/sleep?level=1"},
        "gpu_routes": OPENAI_GPU_ROUTES,
    },
    "openai": {
        "health": "/v1/models",
        "gpu_routes": OPENAI_GPU_ROUTES,
    },
}


def with_preset(node: dict) -> dict:
    """The consumer's settings with its type's defaults under them."""
    preset = PRESETS.get(node.get("type") or "generic", {})
    return {**preset, **{k: v for k, v in node.items() if v is not None or k not in preset}}
