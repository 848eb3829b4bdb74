"""Test set-up: four forced CPU devices (for mesh tests) and quiet progress bars.

The XLA flag must be set before JAX initialises its backend, so it is set here at import time.
Single-device tests build a mesh of one device explicitly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TDA_JAX_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
