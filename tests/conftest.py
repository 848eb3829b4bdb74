"""Test set-up: four forced CPU devices, quiet progress bars, strict dtype promotion, and a
persistent compilation cache.

The XLA flag must be set before JAX initialises its backend, so it is set here at import time.
Single-device tests build a mesh of one device explicitly.

* Strict dtype promotion (as equinox's tests do): implicit promotion between array dtypes (e.g.
  ``int32 + float32``, ``float32 + float64``) raises inside every test, so the library cannot
  silently upcast or mix precisions. Python scalars stay weakly typed and are allowed. A test that
  checks behaviour under the default promotion marks itself ``@pytest.mark.standard_promotion``.
* The persistent compilation cache (``TDA_JAX_TEST_CACHE``, default ``.pytest_cache/jax``) lets
  pytest-xdist workers and reruns reuse compiled programs instead of compiling them again.
"""

import os
from pathlib import Path

# (XLA's unoptimised backend, --xla_backend_optimization_level=0, would cut the suite's CPU time by
# ~20%, but it changes numerics: the tuned-AIS accuracy test moved from < 0.2 to 0.31 nats.)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TDA_JAX_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402  (after the XLA flags above)
import pytest  # noqa: E402

_CACHE = os.environ.get("TDA_JAX_TEST_CACHE",
                        str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "standard_promotion: run with JAX's default dtype promotion")


@pytest.fixture(autouse=True)
def strict_dtype_promotion(request):
    if request.node.get_closest_marker("standard_promotion"):
        yield
        return
    with jax.numpy_dtype_promotion("strict"):
        yield
