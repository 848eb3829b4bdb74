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


def current_rss_mb() -> float:
    """This process's resident set size now (``VmRSS``) in MB, or -1 where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return -1.0


def reset_peak_rss() -> bool:
    """Restarts ``VmHWM`` at the current RSS (Linux >= 4.0, ``clear_refs`` value 5).

    Lets one process measure the peak of one phase (e.g. scoring after the factors are fitted).
    Returns False where the kernel refuses, in which case :func:`peak_rss_mb` keeps the whole
    process's peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``), or [] where unavailable."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except (OSError, ValueError):
        return []


def machine_description() -> str:
    """The CPU model name (``/proc/cpuinfo``) and the number of logical CPUs."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def reflow_markdown(markdown: str, width: int = 100) -> str:
    """Re-wraps the prose paragraphs of ``markdown`` to ``width`` columns.

    Tables, code blocks and headings are kept as they are; bullet lists (``* ``) are wrapped item
    by item with a hanging indent.
    """
    import textwrap

    blocks = []
    for block in markdown.strip().split("\n\n"):
        if block.startswith(("|", "#", "```")):
            blocks.append(block)
        elif block.startswith("* "):
            blocks.append("\n".join(
                textwrap.fill(" ".join(item.split()), width=width, subsequent_indent="  ",
                              break_on_hyphens=False, break_long_words=False)
                for item in ("* " + i for i in block[2:].split("\n* "))))
        else:
            blocks.append(textwrap.fill(" ".join(block.split()), width=width,
                                        break_on_hyphens=False, break_long_words=False))
    return "\n\n".join(blocks) + "\n"
