"""The NVML reader against a real card, for a machine with an NVIDIA GPU.

Compares mgpumanager's NVML reading with nvidia-smi's, then allocates about
2 GiB with torch and checks that the reader's free memory drops by about
that much, and that per-process attribution (pids_from: {port: ...}) gives
a process listening on a port the memory it allocated. Prints a short
report; exits 1 if a check fails.

    python bench/nvml_check.py [--index 0] [--mib 2048]
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mgpumanager.gpu import NvmlReader, parse_nvidia_smi  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--mib", type=int, default=2048)
    a = p.parse_args()
    ok = True
    nvml = NvmlReader(a.index)
    r = nvml.read()
    smi = parse_nvidia_smi(subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,memory.used,memory.free,utilization.gpu",
         "--format=csv,noheader,nounits", f"--id={a.index}"], capture_output=True, text=True).stdout)
    print(f"NVML:       {r.name}: total {r.total_mib} used {r.used_mib} free {r.free_mib} MiB, util {r.util_pct}%")
    print(f"nvidia-smi: {smi.name}: total {smi.total_mib} used {smi.used_mib} free {smi.free_mib} MiB, util {smi.util_pct}%")
    for field in ("total_mib", "used_mib", "free_mib"):
        diff = abs(getattr(r, field) - getattr(smi, field))
        good = diff <= (0 if field == "total_mib" else 64)
        ok &= good
        print(f"  {field}: differ by {diff} MiB {'ok' if good else 'MISMATCH'}")
    try:
        import torch
    except ImportError:
        print("torch missing: allocation check skipped")
        return 0 if ok else 1
    before = nvml.read().free_mib
    x = torch.empty(a.mib * 1024 * 1024, dtype=torch.uint8, device=f"cuda:{a.index}")
    torch.cuda.synchronize()
    time.sleep(0.2)
    during = nvml.read().free_mib
    del x
    torch.cuda.empty_cache()
    time.sleep(0.2)
    after = nvml.read().free_mib
    drop = before - during
    good = a.mib * 0.95 <= drop <= a.mib + 600     # + the CUDA context, on first use
    ok &= good
    print(f"allocating {a.mib} MiB: free {before} -> {during} -> {after} MiB "
          f"(drop {drop} MiB) {'ok' if good else 'UNEXPECTED'}")
    procs = nvml.read().processes
    print(f"compute processes seen by NVML: {procs}")
    ok &= check_attribution(nvml, a.index, a.mib)
    return 0 if ok else 1


ALLOCATOR = """
import socket, sys, time, torch
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
x = torch.empty({mib} * 1024 * 1024, dtype=torch.uint8, device="cuda:{index}")
torch.cuda.synchronize()
print(s.getsockname()[1], flush=True)
time.sleep(30)
"""


def check_attribution(nvml, index: int, mib: int) -> bool:
    """A process listening on a port allocates a known amount: attribution
    by that port must give it that much (plus its CUDA context)."""
    from mgpumanager.procs import Attribution, PidsFrom
    proc = subprocess.Popen([sys.executable, "-c", ALLOCATOR.format(mib=mib, index=index)],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        time.sleep(0.5)
        reading = nvml.read()
        measured = Attribution({"svc": PidsFrom(port=port)}).measure(reading.processes or ())
        m = measured["svc"]
        good = m.mib is not None and mib <= m.mib <= mib + 1024
        print(f"attribution by port {port}: pids {m.pids}, {m.mib} MiB "
              f"(allocated {mib} MiB + context) {'ok' if good else 'UNEXPECTED: ' + str(m.note)}")
        return good
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    sys.exit(main())
