"""A config loader that never crashes, never hangs and never accepts
nonsense: the reproducers that broke it, and a hypothesis mutation of the
shipped config."""

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgpumanager.broker import Broker
from mgpumanager.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = (ROOT / "etc" / "consumers.yaml").read_text()
BASE = yaml.safe_load(SHIPPED)


def load_text(tmp_path, text: str | bytes, name="c.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return load_config(path)


def problems(tmp_path, text) -> list[str]:
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert time.monotonic() - t0 < 2, "the loader took too long"
    for p in info.value.problems:
        assert len(p) < 400, p[:500]
    return info.value.problems


def renamed(old: str, new) -> str:
    """The shipped config with consumer ``old`` called ``new`` (and routed to so)."""
    data = copy.deepcopy(BASE)
    data["consumers"] = {(new if k == old else k): v for k, v in data["consumers"].items()}
    data["routes"] = {k: (new if v == old else v) for k, v in data["routes"].items()}
    return yaml.safe_dump(data)


def mutated(**changes) -> str:
    """The shipped config with `a.b.c: value` changes (None deletes)."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value
    return yaml.safe_dump(data)


BOMB = """
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &bomb [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.mark.parametrize("text,expected", [
    pytest.param(renamed("mvoice", 1), "consumers.1: expected consumer names",
                 id="consumer-name-not-a-string"),
    pytest.param("[" * 2000 + "]" * 2000, "nested too deeply", id="nesting-2000-deep"),
    pytest.param(b"server: {bind: \xff\xfe}\n", "UTF-8", id="not-utf-8"),
    pytest.param(BOMB + "health: {interval_s: *bomb}\n", "alias", id="billion-laughs"),
    pytest.param("health:\n  interval_s: [" + ", ".join(["1"] * 200_000) + "]\n",
                 "health.interval_s", id="a-200000-element-list"),
    pytest.param(mutated(**{"consumers.comfyui.unload": {"path": None}}),
                 "consumers.comfyui.unload.path", id="unload-path-null"),
    pytest.param(mutated(**{"consumers.mvoice.load": {"path": None}}),
                 "consumers.mvoice.load.path", id="load-path-null"),
    pytest.param(mutated(**{"consumers.comfyui.busy": {"path": None}}),
                 "consumers.comfyui.busy.path", id="busy-path-null"),
    pytest.param(SHIPPED + "\nconsumers:\n  x: {url: 'http://127.0.0.1:1', vram_resident_mib: 1}\n",
                 "duplicate key", id="duplicate-top-level-key"),
    pytest.param(re.sub(r"^  comfyui:", "  comfyui: {url: 'http://h:1', vram_resident_mib: 1}"
                        "\n  comfyui:", SHIPPED, count=1, flags=re.M),
                 "duplicate key 'comfyui'", id="duplicate-consumer"),
    pytest.param(mutated(**{"health.timeout_s": float("nan")}), "health.timeout_s", id="nan"),
    pytest.param(mutated(**{"health.timeout_s": float("inf")}), "health.timeout_s", id="inf"),
    pytest.param(mutated(**{"scheduler.queue_timeout_s": 1e300}), "scheduler.queue_timeout_s",
                 id="1e300-seconds"),
    pytest.param(mutated(**{"scheduler.max_queue": 10 ** 20}), "scheduler.max_queue",
                 id="a-huge-queue"),
    pytest.param(mutated(**{"server.bind": "not an address"}), "server.bind", id="bad-bind"),
    pytest.param(mutated(**{"consumers.mvoice.url": "http://exa mple.com:1"}),
                 "consumers.mvoice.url", id="url-with-a-space"),
    pytest.param(mutated(**{"consumers.mvoice.url": "http://host:99999"}),
                 "consumers.mvoice.url", id="url-port-out-of-range"),
    pytest.param(renamed("whisper", ""), "consumer names", id="empty-consumer-name"),
    pytest.param(renamed("whisper", "a/b"), "consumer names", id="consumer-name-with-a-slash"),
    pytest.param(mutated(**{"consumers.whisper.idle_unload_s": 60}),
                 "consumers.whisper.idle_unload_s", id="idle-unload-without-an-unload-route"),
    pytest.param("- a\n- b\n", "(top level)", id="top-level-not-a-mapping"),
    pytest.param(mutated(**{"scheduler.lock_file": "/"}), "scheduler.lock_file",
                 id="lock-file-a-directory"),
    pytest.param(mutated(**{"scheduler.lock_file": "/tmp/x\0y"}), "scheduler.lock_file",
                 id="lock-file-with-a-nul"),
    pytest.param('server: {bind: "' + "x" * 4_000_000 + '"}\n', "1 MiB", id="a-4-MB-document"),
])
def test_a_bad_config_is_refused_with_its_key_path(tmp_path, text, expected):
    found = problems(tmp_path, text)
    assert any(expected in p for p in found), found
    assert all(str(tmp_path / "c.yaml") in p for p in found), found


def test_a_null_sim_url_is_fine_with_backend_auto(tmp_path):
    cfg = load_text(tmp_path, mutated(**{"gpu.sim_url": None}))
    assert cfg.gpu.sim_url is None


def test_a_value_is_shown_in_80_characters_at_most(tmp_path):
    found = problems(tmp_path, mutated(**{"gpu.backend": "x" * 5000}))
    line = next(p for p in found if "gpu.backend" in p)
    assert len(line.split("got ", 1)[1]) <= 84


def test_check_config_exits_1_with_every_problem_and_never_a_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BOMB + "health: {interval_s: *bomb}\nconsumers: {1: {}}\n")
    out = subprocess.run([sys.executable, "-m", "mgpumanager.cli", "check-config", str(path)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert str(path) in out.stderr


# -- the shipped config, mutated at random ------------------------------------

def key_paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from key_paths(v, prefix + (k,))


PATHS = list(key_paths(BASE))
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["http://127.0.0.1:1", "/x", "unix:/tmp/s", "0.0.0.0:1", "*", "POST /x",
                     "é/ü", "", " ", "-1", "1e999"]),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5),
                                                               st.integers(), max_size=2))


@st.composite
def mutations(draw):
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(PATHS))
        node = data
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if not isinstance(node, dict):
            continue
        action = draw(st.sampled_from(["set", "set", "delete", "unknown-key"]))
        if action == "set":
            node[path[-1]] = draw(VALUES)
        elif action == "delete":
            node.pop(path[-1], None)
        else:
            node[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
    return data


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
          derandomize=not os.environ.get("FUZZ_RANDOM"),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations())
def test_a_mutated_config_is_refused_with_key_paths_or_builds_a_broker(tmp_path, data):
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    t0 = time.monotonic()
    try:
        cfg = load_config(path)
    except ConfigError as e:
        assert e.problems
        for p in e.problems:
            prefix = f"{path}: "
            assert p.startswith(prefix) and len(p) > len(prefix) + 3, p
            key = p[len(prefix):].split(":", 1)[0]
            assert key, p                      # every rejection names a key path
        return
    finally:
        assert time.monotonic() - t0 < 1.5
    cfg = cfg.__class__(**{**cfg.__dict__, "scheduler": cfg.scheduler.__class__(
        **{**cfg.scheduler.__dict__, "lock_file": str(tmp_path / "gpu.lock")})})
    broker = Broker(cfg)                      # every accepted config builds a broker
    assert broker.status()["broker"]["config"] == str(path)
    broker.stop()
