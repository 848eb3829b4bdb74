"""The kronfluence half of ``benchmarks/kronfluence_ekfac.py`` (runs in ``.venv-kronfluence``).

Not part of ``tda_jax`` and never imports it: it only needs torch, numpy and kronfluence 1.0.1. The
top-level benchmark writes the trained MLP's weights and the data to ``--problem`` (an ``.npz``),
launches this script as a subprocess, and reads back ``--result`` (an ``.npz`` with the score matrix
and a JSON string of timings).

What is computed (kronfluence 1.0.1 semantics, read from its documentation and source):

* factors: ``Analyzer.fit_all_factors`` with ``FactorArguments(strategy="ekfac",
  use_empirical_fisher=True)``: activation and pre-activation-gradient covariances averaged over the
  training examples (``nn.Linear`` bias handled by appending a constant 1 to the activations),
  float64 eigendecompositions (the default ``eigendecomposition_dtype``), then the eigenvalue
  corrections (lambda) averaged over the training examples. The training loss is the per-example
  cross-entropy *summed* over the batch, as kronfluence's documentation asks.
* scores: ``Analyzer.compute_pairwise_scores`` with ``ScoreArguments(damping_factor=<absolute>)``,
  which adds the given number to every lambda entry (``None`` would instead pick 0.1 x mean
  lambda). kronfluence's pairwise score is ``grad f_q^T (G_ekfac + damping I)^{-1} grad L_i``, the
  plain dot product of the preconditioned query measurement gradient and the training loss
  gradient, with no minus sign.

Timings are wall-clock seconds of each call, including kronfluence's own saving of factors and
scores to ``--workdir`` (that is how its pipeline works). The first repeat is a warm-up and is
reported separately.

``--mode memory`` fits the factors once, restarts the process's peak-RSS counter
(:func:`_common.reset_peak_rss`) and scores the problem's queries once: the reported peak is the
query-side (scoring) peak, measured in this fresh process only.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from _common import (  # benchmarks/ is on sys.path when run as a script
    current_rss_mb,
    peak_rss_mb,
    reset_peak_rss,
)
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.utils.data import TensorDataset

_peak_rss_mb = peak_rss_mb


def _margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_y - logsumexp_{c != y} z_c`` per example, ``[B]``."""
    correct = logits.gather(1, labels[:, None])[:, 0]
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


class ClassificationTask(Task):
    """Summed cross-entropy training loss; query measurement = summed margin or summed loss."""

    def __init__(self, measurement: str) -> None:
        super().__init__()
        if measurement not in ("margin", "loss"):
            raise ValueError(f"measurement must be 'margin' or 'loss', got {measurement!r}")
        self.measurement = measurement

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            # Only the empirical Fisher is benchmarked; sampling would break determinism.
            raise NotImplementedError("this benchmark uses use_empirical_fisher=True")
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        inputs, labels = batch
        logits = model(inputs)
        if self.measurement == "margin":
            return _margin(logits, labels).sum()
        return F.cross_entropy(logits, labels, reduction="sum")


def build_model(problem: dict) -> nn.Sequential:
    """The torch twin of flax MLP: ``nn.Linear.weight`` is the flax kernel, transposed."""
    num_layers = int(problem["num_layers"])
    layers: list[nn.Module] = []
    for i in range(num_layers):
        kernel = torch.from_numpy(np.asarray(problem[f"kernel_{i}"], np.float32))
        bias = torch.from_numpy(np.asarray(problem[f"bias_{i}"], np.float32))
        linear = nn.Linear(kernel.shape[0], kernel.shape[1], bias=True)
        with torch.no_grad():
            linear.weight.copy_(kernel.T)
            linear.bias.copy_(bias)
        layers.append(linear)
        if i < num_layers - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", required=True, help=".npz written by kronfluence_ekfac.py")
    parser.add_argument("--result", required=True, help=".npz to write scores and timings to")
    parser.add_argument("--workdir", required=True, help="kronfluence's output_dir (scratch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=("timing", "memory"), default="timing",
                        help="timing: repeats of fit + scores; memory: one fit, then the peak RSS "
                             "of one scoring call")
    args = parser.parse_args(argv)

    logging.disable(logging.WARNING)
    # kronfluence 1.0.1 builds a (disabled) torch.cuda.amp.GradScaler, which warns on torch 2.13.
    warnings.filterwarnings("ignore", category=FutureWarning)
    rss_start = _peak_rss_mb()
    problem = dict(np.load(args.problem))
    settings = json.loads(str(problem["settings"]))
    damping = float(settings["damping"])
    train = TensorDataset(torch.from_numpy(problem["train_x"].astype(np.float32)),
                          torch.from_numpy(problem["train_y"].astype(np.int64)))
    query = TensorDataset(torch.from_numpy(problem["query_x"].astype(np.float32)),
                          torch.from_numpy(problem["query_y"].astype(np.int64)))

    task = ClassificationTask(settings["measurement"])
    model = prepare_model(build_model(problem), task=task)
    analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True,
                        disable_tqdm=True, output_dir=args.workdir, log_level=logging.WARNING)
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        covariance_max_examples=None,
        lambda_max_examples=None,
        eigendecomposition_dtype=torch.float64,
    )
    score_args = ScoreArguments(damping_factor=damping)
    rss_ready = _peak_rss_mb()

    def fit(factors_name: str) -> None:
        analyzer.fit_all_factors(
            factors_name=factors_name,
            dataset=train,
            per_device_batch_size=int(settings["train_batch_size"]),
            factor_args=factor_args,
            overwrite_output_dir=True,
        )

    def score(scores_name: str, factors_name: str) -> None:
        analyzer.compute_pairwise_scores(
            scores_name=scores_name,
            factors_name=factors_name,
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=int(settings["query_batch_size"]),
            per_device_train_batch_size=int(settings["train_batch_size"]),
            score_args=score_args,
            overwrite_output_dir=True,
        )

    if args.mode == "memory":
        start = time.perf_counter()
        fit("ekfac_memory")
        fit_s = time.perf_counter() - start
        peak_through_fit = _peak_rss_mb()
        reset = reset_peak_rss()
        rss_score_start = current_rss_mb()
        start = time.perf_counter()
        score("pairwise_memory", "ekfac_memory")
        score_s = time.perf_counter() - start
        num_scored = analyzer.load_pairwise_scores(scores_name="pairwise_memory")[
            "all_modules"].shape
        timings = {
            "num_queries": int(num_scored[0]),
            "num_train": int(num_scored[1]),
            "fit_s": fit_s,
            "score_s": score_s,
            "peak_rss_through_fit_mb": peak_through_fit,
            "rss_score_start_mb": rss_score_start,
            "peak_rss_scoring_mb": _peak_rss_mb(),
            "peak_reset": reset,
            "rss_after_import_mb": rss_start,
        }
        np.savez(args.result, timings=json.dumps(timings))
        return

    fit_times, score_times, cpu_times, scores = [], [], [], None
    for rep in range(args.repeats + 1):  # repeat 0 is the warm-up
        factors_name, scores_name = f"ekfac_{rep}", f"pairwise_{rep}"
        start, cpu_start = time.perf_counter(), time.process_time()
        fit(factors_name)
        fit_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        score(scores_name, factors_name)
        score_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        scores = analyzer.load_pairwise_scores(scores_name=scores_name)["all_modules"]
        scores = scores.to(torch.float64).numpy()
        # Keep the scratch directory small between repeats.
        shutil.rmtree(analyzer.factors_output_dir(factors_name), ignore_errors=True)
        shutil.rmtree(analyzer.scores_output_dir(scores_name), ignore_errors=True)

    timings = {
        "fit_s": statistics.median(fit_times[1:]),
        "score_s": statistics.median(score_times[1:]),
        "fit_all_s": fit_times,
        "score_all_s": score_times,
        # CPU seconds (all threads, user + sys) of fit + scores: less sensitive to a busy machine.
        "cpu_s": statistics.median(cpu_times[1:]),
        "cpu_all_s": cpu_times,
        "first_fit_s": fit_times[0],
        "first_score_s": score_times[0],
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_import_mb": rss_start,
        "rss_ready_mb": rss_ready,
        "versions": {"torch": torch.__version__, "kronfluence": _kronfluence_version(),
                     "python": sys.version.split()[0]},
        "torch_threads": torch.get_num_threads(),
    }
    np.savez(args.result, scores=scores, timings=json.dumps(timings))


def _kronfluence_version() -> str:
    from importlib.metadata import version

    return version("kronfluence")


if __name__ == "__main__":
    main()
