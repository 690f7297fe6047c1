"""Client-side traffic for the demo, the tests and the benchmarks: one job of
each kind, as a script would send it, and a storm of them at once."""

from __future__ import annotations

import concurrent.futures as cf
import random
from typing import Callable

import requests

from .consumers import wav_bytes

KINDS = ("tts", "stt", "llm", "image")
BROKER_PATHS = {k: f"/v1/{k}" for k in KINDS}
DIRECT_PATHS = {"tts": "/api/tts", "stt": "/inference", "llm": "/api/generate", "image": "/prompt"}
DIRECT_CONSUMER = {"tts": "mvoice", "stt": "whisper", "llm": "ollama", "image": "comfyui"}
_WAV = wav_bytes(0.5)


def send_job(base: str, kind: str, paths: dict[str, str] = BROKER_PATHS,
             timeout: float = 120) -> requests.Response:
    """One job of ``kind``; the body is read whole (a streamed LLM answer too)."""
    url = base + paths[kind]
    if kind == "tts":
        return requests.post(url, json={"text": "Hello from mgpumanager."}, timeout=timeout)
    if kind == "stt":
        return requests.post(url, files={"file": ("hello.wav", _WAV, "audio/wav")},
                             data={"response_format": "json"}, timeout=timeout)
    if kind == "llm":
        r = requests.post(url, json={"model": "sim", "prompt": "Why is the sky blue?",
                                     "options": {"num_predict": 6}}, stream=True, timeout=timeout)
        r._content = b"".join(r.iter_content(None))
        return r
    return requests.post(url, json={"prompt": {"3": {"class_type": "KSampler"}}}, timeout=timeout)


def storm(send: Callable[[str], requests.Response], n: int = 40,
          seed: int = 7) -> list[requests.Response]:
    """``n`` mixed jobs at once, in a shuffled but repeatable order."""
    kinds = list(KINDS) * (n // len(KINDS))
    random.Random(seed).shuffle(kinds)
    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(send, kinds))
