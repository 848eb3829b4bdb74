"""The one command-line entry point of the experiments: absl flags ``--config`` (an ml_collections
config file, ``path.py[:arg]``), ``--workdir`` and ``--overwrite``.

Each ``experiments/<name>/main.py`` is::

    from experiments.launcher import launch
    from experiments.<name>.pipeline import run

    if __name__ == "__main__":
        launch(run)

where ``run(config, workdir, overwrite=False)`` validates the config before any stage and writes
``workdir/results.json``. ``launch`` also

* turns on XLA's unoptimised backend for configs with ``fast_compile = True`` (tiny runs are
  dominated by compile time; XLA reads the flag before its first computation);
* joins the other processes of a multi-process job started by ``launch/local.py``,
  ``launch/slurm.py`` or ``launch/tpu_vm.py`` (``tda_jax.sharding.initialize_from_env``; a no-op in
  a plain run), so every experiment runs on one global device mesh unchanged.

A rerun reuses finished stages; a stage whose finished work was made with other settings is
refused (naming them) unless ``--overwrite`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from tda_jax import sharding


def launch(run: Callable[..., Any]) -> None:
    """Defines the flags, parses the command line and calls ``run(config, workdir, overwrite=...)``."""
    config = config_flags.DEFINE_config_file("config", None, "experiment configuration file")
    workdir = flags.DEFINE_string("workdir", None,
                                  "directory for stages, results.json and figures")
    overwrite = flags.DEFINE_bool(
        "overwrite", False,
        "recompute stages whose finished work was made with other settings (deleting it) "
        "instead of refusing; stages with the same settings are still reused")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if config.value.get("fast_compile"):
            os.environ["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
            ).strip()
        sharding.initialize_from_env()
        run(config.value, workdir.value, overwrite=overwrite.value)

    app.run(main)
