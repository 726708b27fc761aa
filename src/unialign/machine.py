"""What a figure was measured on: every benchmark and report prints this next to its numbers."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, whether it is a VM, GPU, versions, and the 1-minute load average
    (other work skews timings)."""
    cpu = platform.processor() or "unknown"
    vm = False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                vm = "hypervisor" in line.split()
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": cores, "vm": vm, "gpu": gpu, "torch": torch.__version__,
            "cuda": torch.version.cuda if gpu else None, "python": platform.python_version(),
            "loadavg_1m": load}
