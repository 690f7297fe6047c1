"""bench/overhead.py's report: the ratios paired per repetition, and the
stack's floors beside the goal, from the figures of one run."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_overhead():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("overhead_under_test", ROOT / "bench/overhead.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


def figures(cpu_us, p50_ms, rps):
    return {"cpu_us_8": cpu_us, "p50_1_ms": p50_ms, "rps_8": rps}


def a_run():
    one = {"direct": figures(None, 0.2, 5000),
           "handwritten": figures(1500, 1.2, 600),
           "broker": figures(1350, 1.0, 660),
           "answer": figures(600, 0.6, 1500),
           "raw_proxy": figures(750, 0.8, 1200),
           "urllib3_proxy": figures(1050, 1.0, 900)}
    other = {name: dict(f) for name, f in one.items()}
    other["broker"] = figures(1650, 1.2, 540)
    return {"reps": [one, other, one], "requests": 300}


def test_ratios_are_paired_per_repetition_and_their_median_reported():
    overhead = load_overhead()
    q = overhead.ratios(a_run()["reps"])
    assert q["cpu"]["each"] == [0.9, 1.1, 0.9]
    assert q["cpu"]["median"] == 0.9
    assert q["latency"]["each"] == [0.8, 1.0, 0.8]
    assert q["rps"]["median"] == 1.1


def test_the_report_sets_the_floors_beside_the_goal_and_splits_the_cost():
    overhead = load_overhead()
    text = overhead.report(a_run(), "python bench/overhead.py --reps 3")
    assert "| CPU at 8 clients | 1500 µs | 1350 µs | **0.90x** (0.90, 1.10, 0.90) |" in text
    assert "| CPU at 8 clients | 600 µs | 750 µs | 1050 µs | 0.50x (0.50, 0.50, 0.50) | 900 µs |" in text
    assert "960 (1.6x)" in text
    assert ("the server and Flask 600 µs; the lock and the upstream call on a bare socket "
            "150 µs more; urllib3's pool and http.client in its place 300 µs more; "
            "the broker's own work") in text
    assert "300 µs more." in text
