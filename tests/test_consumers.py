"""Health probes and admin calls against real HTTP servers of our own."""

import time

import requests

from mgpumanager.config import Call, parse_config
from mgpumanager.consumers import ConsumerRegistry, HealthMonitor, HealthResult, HttpActions


def config_for(urls: dict) -> object:
    return parse_config({
        "routes": {},
        "consumers": {n: {"url": u, "health": "/health", "vram_resident_mib": 1,
                          "unload": {"path": "/slow", "timeout_s": 0.3}}
                      for n, u in urls.items()}})


def test_admin_calls_time_out_and_report_errors_instead_of_raising(echo):
    cfg = config_for({"echo": echo.url})
    actions = HttpActions(1.0, 1.0)
    c = cfg.consumers["echo"]
    t0 = time.monotonic()
    error = actions.call(c, Call("POST", "/slow?s=3", timeout_s=0.3))
    assert "no answer within 0.3 s" in error and time.monotonic() - t0 < 1.5
    assert "answered 500" in actions.call(c, Call("POST", "/status/500"))
    assert actions.call(c, Call("POST", "/small")) is None


def test_health_reads_loaded_from_a_json_body(sim):
    cfg = config_for({"mvoice": sim.mvoice.url})
    actions = HttpActions(1.0, 1.0)
    assert actions.probe_health(cfg.consumers["mvoice"]) == HealthResult(True, None, False)
    sim.mvoice.ensure_loaded()
    assert actions.probe_health(cfg.consumers["mvoice"]).loaded is True
    sim.mvoice.healthy = False
    result = actions.probe_health(cfg.consumers["mvoice"])
    assert not result.ok and "answered 503" in result.error


def test_a_hanging_consumer_does_not_delay_the_others_probes(sim):
    sim.comfyui.delay_s = 5                    # every request to it hangs for 5 s
    cfg = config_for({"mvoice": sim.mvoice.url, "comfyui": sim.comfyui.url})
    registry = ConsumerRegistry(cfg)
    monitor = HealthMonitor(registry, HttpActions(1.0, 0.5), interval_s=0.1)
    monitor.start()
    try:
        time.sleep(1.2)
        probes = len(sim.mvoice.requests_to("/health"))
        assert probes >= 5, f"mvoice was probed {probes} times in 1.2 s"
        healthy, _, error = registry.health("comfyui")
        assert healthy is False and "no answer within 0.5 s" in error
        assert registry.health("mvoice")[0] is True
    finally:
        monitor.stop()
        sim.comfyui.delay_s = 0


def test_busy_probe_reads_the_listed_queues(sim):
    cfg = parse_config({"routes": {}, "consumers": {"comfyui": {
        "url": sim.comfyui.url, "vram_resident_mib": 1,
        "busy": {"path": "/queue", "keys": ["queue_running", "queue_pending"]}}}})
    actions = HttpActions(1.0, 1.0)
    c = cfg.consumers["comfyui"]
    assert actions.is_busy(c) is False
    sim.comfyui.render_s = 5.0                 # 0.5 s at the tests' time scale
    requests.post(sim.comfyui.url + "/prompt", json={"prompt": {"1": {}}})
    assert actions.is_busy(c) is True
    deadline = time.monotonic() + 10
    while actions.is_busy(c):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_busy_probe_that_fails_counts_as_busy_unless_nothing_listens(echo):
    """A /queue slower than health.timeout_s, or one 500, counted as idle:
    the next job started mid-render."""
    from conftest import free_port
    actions = HttpActions(1.0, 0.3)

    def consumer(url, path):
        return parse_config({"routes": {}, "consumers": {"c": {
            "url": url, "vram_resident_mib": 1, "busy": {"path": path}}}}).consumers["c"]
    assert actions.is_busy(consumer(echo.url, "/slow?s=2")) is True
    assert actions.is_busy(consumer(echo.url, "/status/500")) is True
    assert actions.is_busy(consumer(f"http://127.0.0.1:{free_port()}", "/queue")) is False
