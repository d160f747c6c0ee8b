"""The CPU model the benchmarks record beside their figures."""
from __future__ import annotations

import re
from pathlib import Path


def cpu_model(default: str = "unknown") -> str:
    """The "model name" line of /proc/cpuinfo, else ``default`` (no /proc, or no such line)."""
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.is_file() else None
    return found.group(1).strip() if found else default
