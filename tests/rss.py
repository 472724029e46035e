"""Peak resident memory of a piece of work (the hostile-file tests: under 50 MB each)."""

from __future__ import annotations

from pathlib import Path


def rss_growth(work) -> int:
    """Peak resident memory growth in bytes while `work()` runs (Linux: the peak is reset through
    /proc/self/clear_refs, then read from VmHWM); the work's exception propagates."""

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    try:
        work()
    finally:
        rss_growth.last = status("VmHWM") - before  # type: ignore[attr-defined]
    return rss_growth.last  # type: ignore[attr-defined]
