"""Collects every ``benchmarks/results/*.md`` table into ``BENCHMARKS.md`` at the repository root.

Usage (after running the benchmark scripts; see benchmarks/README.md)::

    python benchmarks/collect.py
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HEADER = """# Benchmarks

Side-by-side runs of tda_jax and the peer libraries people use today, each in one run on the same
CPU, with the peer installed from PyPI in the benchmark's own virtual environment. Each section is
written by its script (`benchmarks/<name>.py`) into `benchmarks/results/<name>.md` and collected
here by `python benchmarks/collect.py`; every section states its command, setting, machine and date.
Timings on this 2-core machine are noisy when other work runs; each section says how it was run.
"""


def collect(results_dir: Path = ROOT / "benchmarks" / "results") -> str:
    sections = []
    for path in sorted(results_dir.glob("*.md")):
        text = path.read_text().strip()
        sections.append(text.replace("\n# ", "\n## ") if text.startswith("#") else text)
    return HEADER + "\n" + "\n\n---\n\n".join(sections) + "\n"


if __name__ == "__main__":
    (ROOT / "BENCHMARKS.md").write_text(collect())
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
