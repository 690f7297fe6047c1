"""GPU readers without a GPU: nvidia-smi's output, the ledger, auto's fallback."""

import stat
import sys

from mgpumanager.config import GpuConfig
from mgpumanager.gpu import (GpuSampler, LedgerReader, NvidiaSmiReader, make_reader,
                             parse_nvidia_smi)


def test_nvidia_smi_csv_is_parsed():
    r = parse_nvidia_smi("NVIDIA GeForce RTX 4090, 24564, 16000, 8564, 37\n")
    assert (r.name, r.total_mib, r.used_mib, r.free_mib, r.util_pct) == \
        ("NVIDIA GeForce RTX 4090", 24564, 16000, 8564, 37)
    assert r.error is None


def test_nvidia_smi_unsupported_fields_and_garbage():
    r = parse_nvidia_smi("Tesla T4, 15360, [N/A], 15000, [Not Supported]")
    assert r.used_mib == 360 and r.util_pct is None and r.error is None
    assert parse_nvidia_smi("No devices were found").error.startswith("nvidia-smi: unexpected")
    assert parse_nvidia_smi("").error


def fake_nvidia_smi(tmp_path, output: str, code: int = 0):
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!/bin/sh\necho '{output}'\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_the_nvidia_smi_reader_runs_the_command(tmp_path):
    reader = NvidiaSmiReader(0, fake_nvidia_smi(tmp_path, "Fake GPU, 8192, 1024, 7168, 5"))
    r = reader.read()
    assert r.source == "nvidia-smi" and r.free_mib == 7168 and r.name == "Fake GPU"


def test_a_failing_reading_is_an_error_not_an_exception(tmp_path):
    cmd = fake_nvidia_smi(tmp_path, "Fake GPU, 8192, 1024, 7168, 5")
    reader = NvidiaSmiReader(0, cmd)
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU is lost' >&2\nexit 15\n")
    r = reader.read()
    assert r.free_mib is None and "exited 15" in r.error and "GPU is lost" in r.error


def test_auto_falls_back_to_the_ledger_and_says_why(tmp_path, monkeypatch):
    held = [3000]
    # No NVIDIA library, whatever this machine has: NVML cannot load, nvidia-smi is absent.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    reader = make_reader(GpuConfig(backend="auto", total_mib=24576,
                                   nvidia_smi=str(tmp_path / "absent")), lambda: held[0], 999)
    assert reader.source == "ledger" and reader.live is False
    r = reader.read()
    assert (r.total_mib, r.used_mib, r.free_mib) == (24576, 3000, 21576)
    held[0] = 0
    assert reader.read().free_mib == 24576


def test_auto_without_a_total_accounts_nothing_but_keeps_working(tmp_path):
    reader = make_reader(GpuConfig(backend="auto", nvidia_smi=str(tmp_path / "absent")),
                         lambda: 5000, 30000)
    r = reader.read()
    assert r.total_mib == 30000 and "gpu.total_mib is unset" in r.error


def test_auto_prefers_nvidia_smi_when_nvml_is_missing(tmp_path):
    reader = make_reader(GpuConfig(backend="auto", nvidia_smi=fake_nvidia_smi(
        tmp_path, "Fake GPU, 8192, 1024, 7168, 5")), lambda: 0, 1)
    assert reader.source == "nvidia-smi" and reader.read().total_mib == 8192


def test_a_named_backend_that_fails_reports_it_on_every_reading(tmp_path):
    reader = make_reader(GpuConfig(backend="nvidia-smi", nvidia_smi=str(tmp_path / "absent")),
                         lambda: 0, 1)
    r = reader.read()
    assert r.source == "nvidia-smi" and r.free_mib is None and "not on PATH" in r.error


def test_the_sampler_keeps_the_latest_reading():
    held = [1]
    sampler = GpuSampler(LedgerReader(100, lambda: held[0]), 0.01)
    sampler.start()
    try:
        held[0] = 40
        import time
        deadline = time.monotonic() + 2
        while sampler.latest().used_mib != 40:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        sampler.stop()
