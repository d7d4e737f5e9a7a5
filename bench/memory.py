"""Peak resident memory of a block of code, for the benchmarks (Linux /proc; ru_maxrss elsewhere).

Used by ``attention.py`` and ``forces.py``; measure in a fresh (spawned) process per case so one
case's allocator caches do not hide the next one's peak.
"""

from __future__ import annotations

import gc
import resource


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakRSS:
    """Peak resident memory added by the enclosed code: VmHWM (reset on entry) - VmRSS on entry."""

    def __enter__(self):
        gc.collect()
        self.baseline_kb = _proc_status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM reset"
        except OSError:
            self.method = "ru_maxrss"
        return self

    def rss_now_mb(self) -> float:
        return (_proc_status_kb("VmRSS") - self.baseline_kb) / 1024.0

    def __exit__(self, *exc):
        if self.method == "VmHWM reset":
            peak_kb = _proc_status_kb("VmHWM")
        else:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.peak_mb = (peak_kb - self.baseline_kb) / 1024.0
        self.baseline_mb = self.baseline_kb / 1024.0
        return False
