"""What every benchmark shares: the machine line and rewriting its own section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    """CPU model, cores, the load when the benchmark started, torch and Python versions."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    load = f", load average {os.getloadavg()[0]:.1f} at the start" if hasattr(os, "getloadavg") else ""
    import torch

    return f"{cpu}, {os.cpu_count()} cores{load}, torch {torch.__version__}, Python {platform.python_version()}"


def write_section(section: str, text: str) -> None:
    """Replace ``section`` of docs/benchmarks.md (up to the next ``## `` heading) with ``text``; append if new."""
    doc = DOCS.read_text()
    if section not in doc:
        doc = doc.rstrip() + "\n\n" + section + "\n"
    start = doc.index(section)
    end = doc.find("\n## ", start + len(section))
    DOCS.write_text(doc[:start] + text.rstrip() + "\n" + (doc[end:] if end != -1 else ""))
