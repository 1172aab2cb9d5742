"""The machine a benchmark number came from: CPU model, cores, ISA flags, library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_info() -> dict:
    """CPU model, core count, AVX/AMX flags and the widest ISA (``amx``/``avx512``/``avx2``)."""
    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "cpu": platform.processor()}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and info["cpu"] == platform.processor():
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    info["isa"] = ("amx" if "amx_tile" in flags else "avx512" if "avx512f" in flags
                   else "avx2" if "avx2" in flags else "other")
    return info


def machine_info() -> dict:
    """:func:`cpu_info` plus memory, torch threads and the versions of torch/transformers/torchao."""
    import torch

    info = cpu_info()
    info["torch_threads"] = torch.get_num_threads()
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions = {"torch": torch.__version__}
    for mod in ("transformers", "torchao"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    info["versions"] = versions
    return info
