"""The kronfluence half of ``benchmarks/kronfluence_lm.py`` (runs in ``.venv-kronfluence``).

Not part of ``tda_jax`` and never imports it: it needs torch, numpy and kronfluence 1.0.1 only. The
top-level benchmark writes the trained ``tda_jax.models.TransformerLM``'s parameters (flax names and
shapes), the token data and reference logits to ``--problem`` (an ``.npz``), launches this script
as a subprocess and reads back ``--result`` (an ``.npz`` with the score matrices and a JSON string
of timings).

The torch model (:class:`TorchTransformerLM`) re-implements the flax forward with ``nn.Linear``
layers only where flax has a Dense or DenseGeneral, so that kronfluence tracks the same layers:

* token embedding (``nn.Embedding``, untracked) plus a learned positional table (a parameter);
* per block, pre-LayerNorm (eps 1e-6 as flax's default) causal self-attention with ``nn.Linear``
  query / key / value / out projections: the flax DenseGeneral kernels ``[d_model, heads, d_head]``
  become ``weight = kernel.reshape(d_model, heads * d_head).T`` (bias flattened), the out kernel
  ``[heads, d_head, d_model]`` becomes ``weight = kernel.reshape(heads * d_head, d_model).T``;
  queries scaled by ``1 / sqrt(d_head)``, masked logits set to the float32 minimum (flax's
  ``dot_product_attention_weights``), softmax over keys;
* pre-LayerNorm MLP ``fc2(gelu_tanh(fc1(x)))`` (flax's ``nn.gelu`` is the tanh approximation);
* final LayerNorm and an untied ``head`` ``nn.Linear``.

Before anything is timed the logits of the problem's check inputs are compared with the JAX
logits stored in the problem; the maximum absolute difference is reported and a difference above
``--logit-tolerance`` aborts the run.

What kronfluence computes (1.0.1 semantics, from its documentation and source):

* factors: ``Analyzer.fit_all_factors`` with ``FactorArguments(strategy="ekfac",
  use_empirical_fisher=True)``, float64 eigendecompositions, all examples. The training loss is the
  summed token NLL of every sequence (targets ``-1`` ignored), summed over the batch.
  ``Task.get_attention_mask`` returns the input mask, so padding positions are left out of the
  activation covariances (their output gradients are zero anyway: right padding under a causal
  mask carries no loss).
* scores: ``Analyzer.compute_pairwise_scores`` with ``ScoreArguments(damping_factor=...)``;
  ``None`` is kronfluence's heuristic ``0.1 x mean(lambda)`` per module, a number is absolute.
  The measurement is the completion log-probability (summed over the completion tokens, the only
  non-ignored targets of a query). ``compute_per_token_scores=True`` gives ``[Q, N, T]``;
  ``query_gradient_low_rank=r`` is its query batching (``torch.svd_lowrank`` unless
  ``use_full_svd``). kronfluence's score is ``+grad f^T (G + damping)^-1 grad L`` (no minus).

Timings are wall-clock seconds of each call, including kronfluence's saving of factors and scores
to ``--workdir``. Run 0 of each call is the cold first call, reported separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from _common import load_average, peak_rss_mb  # benchmarks/ is on sys.path when run as a script
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.utils.data import TensorDataset

IGNORE = -1


class Attention(nn.Module):
    """Causal multi-head self-attention with four ``nn.Linear`` projections."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        d_head = width // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, d_head)

        q = heads(self.query(x)) / math.sqrt(d_head)
        k, v = heads(self.key(x)), heads(self.value(x))
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        logits = logits.masked_fill(~causal, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=-1)
        mixed = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        return self.out(mixed)


class Block(nn.Module):
    """Pre-LayerNorm decoder block: attention then a gelu MLP, each with a residual."""

    def __init__(self, d_model: int, num_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model, eps=1e-6)
        self.attn = Attention(d_model, num_heads)
        self.ln_mlp = nn.LayerNorm(d_model, eps=1e-6)
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln_mlp(x)), approximate="tanh"))


class TorchTransformerLM(nn.Module):
    """The torch twin of ``tda_jax.models.TransformerLM(tie_embeddings=False)``."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int, num_heads: int,
                 num_layers: int, d_mlp: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embedding = nn.Parameter(torch.zeros(max_len, d_model))
        self.blocks = nn.ModuleList(Block(d_model, num_heads, d_mlp) for _ in range(num_layers))
        self.ln_final = nn.LayerNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos_embedding[: tokens.shape[1]][None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))


def build_model(problem: dict, arch: dict) -> TorchTransformerLM:
    """A :class:`TorchTransformerLM` holding the flax parameters stored as ``param/<path>``."""
    model = TorchTransformerLM(arch["vocab_size"], arch["max_len"], arch["d_model"],
                               arch["num_heads"], arch["num_layers"], arch["d_mlp"])

    def get(path: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(problem[f"param/{path}"], np.float32))

    def linear(layer: nn.Linear, prefix: str, in_features: int) -> None:
        # Any flax kernel [*in_axes, *out_axes] read as the matrix [in, out]; Linear is [out, in].
        kernel = get(f"{prefix}/kernel").reshape(in_features, -1)
        layer.weight.copy_(kernel.T)
        layer.bias.copy_(get(f"{prefix}/bias").reshape(-1))

    def layer_norm(layer: nn.LayerNorm, prefix: str) -> None:
        layer.weight.copy_(get(f"{prefix}/scale"))
        layer.bias.copy_(get(f"{prefix}/bias"))

    d_model = arch["d_model"]
    with torch.no_grad():
        model.embed.weight.copy_(get("embed/embedding"))
        model.pos_embedding.copy_(get("pos_embedding"))
        for i, block in enumerate(model.blocks):
            p = f"block_{i}"
            layer_norm(block.ln_attn, f"{p}/ln_attn")
            layer_norm(block.ln_mlp, f"{p}/ln_mlp")
            for name in ("query", "key", "value", "out"):
                linear(getattr(block.attn, name), f"{p}/attn/{name}", d_model)
            linear(block.fc1, f"{p}/mlp/fc1", d_model)
            linear(block.fc2, f"{p}/mlp/fc2", arch["d_mlp"])
        layer_norm(model.ln_final, "ln_final")
        linear(model.head, "head", d_model)
    return model.eval()


def _summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of every sequence's summed token NLL (``-1`` targets ignored)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


class LanguageModelTask(Task):
    """Training loss: summed token NLL; measurement: summed completion log-probability."""

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        tokens, targets, _ = batch
        if sample:
            # Only the empirical Fisher is benchmarked; sampling would break determinism.
            raise NotImplementedError("this benchmark uses use_empirical_fisher=True")
        return _summed_nll(model(tokens), targets)

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        tokens, targets, _ = batch
        return -_summed_nll(model(tokens), targets)  # log p(completion | prompt), summed

    def get_attention_mask(self, batch) -> torch.Tensor:
        return batch[2]


def _dataset(problem: dict, prefix: str) -> TensorDataset:
    return TensorDataset(torch.from_numpy(problem[f"{prefix}_inputs"].astype(np.int64)),
                         torch.from_numpy(problem[f"{prefix}_targets"].astype(np.int64)),
                         # kronfluence counts tokens with the mask: it must be an integer tensor.
                         torch.from_numpy(problem[f"{prefix}_mask"].astype(np.int64)))


def check_forward(model: nn.Module, problem: dict) -> dict:
    """Max |logit difference| between this model and the JAX model on the check inputs."""
    with torch.no_grad():
        logits = model(torch.from_numpy(problem["check_inputs"].astype(np.int64))).numpy()
    reference = problem["check_logits"]
    mask = problem["check_mask"] > 0  # padding positions' logits are never used
    diff = np.abs(logits - reference)[mask]
    return {"max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "max_abs_logit": float(np.abs(reference[mask]).max()),
            "positions_checked": int(mask.sum())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", required=True, help=".npz written by kronfluence_lm.py")
    parser.add_argument("--result", required=True, help=".npz to write scores and timings to")
    parser.add_argument("--workdir", required=True, help="kronfluence's output_dir (scratch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logit-tolerance", type=float, default=1e-3)
    args = parser.parse_args(argv)

    load_start = load_average()
    logging.disable(logging.WARNING)
    # kronfluence 1.0.1 builds a (disabled) torch.cuda.amp.GradScaler, which warns on torch 2.13.
    warnings.filterwarnings("ignore", category=FutureWarning)
    rss_start = peak_rss_mb()
    problem = dict(np.load(args.problem))
    settings = json.loads(str(problem["settings"]))
    arch = settings["model"]
    train = _dataset(problem, "train")
    query = _dataset(problem, "query")
    # Per-token scores are computed for the first token_queries queries only (their cost).
    token_query = TensorDataset(*(t[: int(settings["token_queries"])] for t in query.tensors))

    model = build_model(problem, arch)
    forward_check = check_forward(model, problem)
    print(f"forward check: {forward_check}", flush=True)
    if not forward_check["max_abs_logit_diff"] <= args.logit_tolerance:
        raise SystemExit(f"torch and JAX logits differ by {forward_check['max_abs_logit_diff']:.3g} "
                         f"> --logit-tolerance {args.logit_tolerance}; the twin model is wrong")

    task = LanguageModelTask()
    model = prepare_model(model, task=task)
    tracked = sorted(name for name, module in model.named_modules()
                     if type(module).__name__ == "TrackedLinear")
    analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True,
                        disable_tqdm=True, output_dir=args.workdir, log_level=logging.WARNING)
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        covariance_max_examples=None,
        lambda_max_examples=None,
        eigendecomposition_dtype=torch.float64,
    )
    damping = settings["damping"]  # None: kronfluence's heuristic 0.1 x mean(lambda) per module
    train_batch = int(settings["train_batch_size"])
    query_batch = int(settings["query_batch_size"])
    rank = int(settings["query_rank"])
    score_variants = {
        "sequence": ScoreArguments(damping_factor=damping),
        "token": ScoreArguments(damping_factor=damping, compute_per_token_scores=True),
        "sequence_lowrank": ScoreArguments(damping_factor=damping, query_gradient_low_rank=rank),
        "token_lowrank": ScoreArguments(damping_factor=damping, compute_per_token_scores=True,
                                        query_gradient_low_rank=rank),
        "sequence_lowrank_fullsvd": ScoreArguments(damping_factor=damping,
                                                   query_gradient_low_rank=rank,
                                                   use_full_svd=True),
    }
    runs = [r for r in settings["kronfluence_runs"] if r in score_variants]
    rss_ready = peak_rss_mb()

    def fit(factors_name: str) -> None:
        analyzer.fit_all_factors(factors_name=factors_name, dataset=train,
                                 per_device_batch_size=train_batch, factor_args=factor_args,
                                 overwrite_output_dir=True)

    def score(scores_name: str, factors_name: str, variant: str) -> np.ndarray:
        analyzer.compute_pairwise_scores(
            scores_name=scores_name, factors_name=factors_name,
            query_dataset=token_query if variant.startswith("token") else query,
            train_dataset=train, per_device_query_batch_size=query_batch,
            per_device_train_batch_size=train_batch, score_args=score_variants[variant],
            overwrite_output_dir=True)
        return analyzer.load_pairwise_scores(scores_name=scores_name)["all_modules"]

    def timed(call):
        start, cpu = time.perf_counter(), time.process_time()
        out = call()
        return out, time.perf_counter() - start, time.process_time() - cpu

    timings: dict = {"fit": {"wall": [], "cpu": []}}
    for rep in range(args.repeats + 1):  # rep 0: the cold first call
        _, wall, cpu = timed(lambda rep=rep: fit(f"ekfac_{rep}"))
        timings["fit"]["wall"].append(wall)
        timings["fit"]["cpu"].append(cpu)
        if rep < args.repeats:  # keep the last factors for the score runs
            shutil.rmtree(analyzer.factors_output_dir(f"ekfac_{rep}"), ignore_errors=True)
        print(f"fit {rep}: {wall:.2f} s", flush=True)
    factors_name = f"ekfac_{args.repeats}"

    scores: dict[str, np.ndarray] = {}
    for variant in runs:
        timings[variant] = {"wall": [], "cpu": []}
        for rep in range(args.repeats + 1):
            name = f"{variant}_{rep}"
            out, wall, cpu = timed(lambda name=name, variant=variant:
                                   score(name, factors_name, variant))
            timings[variant]["wall"].append(wall)
            timings[variant]["cpu"].append(cpu)
            scores[variant] = out.to(torch.float64).numpy().astype(np.float32)
            shutil.rmtree(analyzer.scores_output_dir(name), ignore_errors=True)
            print(f"{variant} {rep}: {wall:.2f} s", flush=True)

    summary = {
        name: {"median_s": statistics.median(t["wall"][1:]) if len(t["wall"]) > 1 else t["wall"][0],
               "first_s": t["wall"][0],
               "cpu_median_s": statistics.median(t["cpu"][1:]) if len(t["cpu"]) > 1 else t["cpu"][0],
               "all_s": t["wall"], "cpu_all_s": t["cpu"]}
        for name, t in timings.items()
    }
    result = {
        "timings": summary,
        "forward_check": forward_check,
        "tracked_modules": tracked,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_import_mb": rss_start,
        "rss_ready_mb": rss_ready,
        "load": [load_start, load_average()],
        "versions": {"torch": torch.__version__, "kronfluence": _kronfluence_version(),
                     "python": sys.version.split()[0]},
        "torch_threads": torch.get_num_threads(),
    }
    np.savez(args.result, timings=json.dumps(result), **{f"scores_{k}": v for k, v in scores.items()})


def _kronfluence_version() -> str:
    from importlib.metadata import version

    return version("kronfluence")


if __name__ == "__main__":
    main()
