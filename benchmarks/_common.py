"""Small stdlib-only helpers shared by the benchmark scripts (importable from every venv)."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    ``VmHWM`` from ``/proc/self/status`` (Linux) restarts at ``execve``; ``ru_maxrss`` does not (a
    child started by ``subprocess`` would report its parent's peak), so it is only the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
