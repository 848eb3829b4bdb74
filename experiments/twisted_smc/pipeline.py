"""The twisted-SMC experiment: KL table (tasks x methods, seeds) and log Z bounds vs particles.

``run(config, workdir, overwrite=False)`` validates the config, then per (task, method, seed) a
resumable stage trains the twist (:func:`tda_jax.twisted.train_twist`) and evaluates it:

* exact ``KL(sigma || q)`` and ``KL(q || sigma)`` of the twist-induced proposal by enumeration;
* their sample estimates (Zhao et al., 2024, Sec. 5): ``KL(sigma || q) = E_sigma[log sigma~ -
  log q] - log Z`` with ``log Z`` replaced by the mean SMC lower bound (so the estimate is an upper
  bound in expectation), from exact target draws; ``KL(q || sigma) = log Z - E_q[log sigma~ -
  log q]`` with the mean conditional-SMC upper bound; ``+inf`` when ``q`` puts mass where
  ``phi = 0`` (Boolean potentials);
* for the methods in ``bounds.methods`` and seed 0: mean SMC lower and cSMC upper bounds with 95%
  CIs for each number of particles, the fraction of SMC runs where every particle died and the
  mean over the finite runs.

Infilling averages everything over ``infilling.num_eval`` observed continuations. Outputs
``results.json`` (contract in the README) and ``bounds.png``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import stats

from experiments import config_checks as cc
from experiments.twisted_smc.configs.default import METHODS, TASKS
from tda_jax import io as tio
from tda_jax.progress import progress
from tda_jax.twisted import enumeration as en
from tda_jax.twisted import tasks as task_lib
from tda_jax.twisted.learning import (
    TwistTrainConfig,
    _twist_tables_impl,
    link_for,
    sample_proposal,
    train_twist,
)
from tda_jax.twisted.models import TinyLM
from tda_jax.twisted.smc import TwistedProblem, log_z_estimates
from tda_jax.twisted.twists import HeadTwist, SeparateTwist


def _check_train(config, field):
    cc.known_fields(config, field, ("num_steps", "num_groups", "positives_per_group",
                                    "negatives_per_group", "learning_rate", "rl_log_phi_floor"))
    cc.integer(config, f"{field}.num_steps", minimum=0)
    for name in ("num_groups", "positives_per_group", "negatives_per_group"):
        cc.positive_int(config, f"{field}.{name}")
    cc.real(config, f"{field}.learning_rate", minimum=0.0, strict=True)
    cc.real(config, f"{field}.rl_log_phi_floor")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first bad field (before any stage runs)."""
    cc.integer(config, "seed", minimum=0)
    v = cc.integer(config, "lm.vocab_size", minimum=2, maximum=12)
    t = cc.integer(config, "lm.horizon", minimum=1, maximum=6)
    cc.positive_int(config, "lm.hidden")
    cc.real(config, "lm.sharpness", minimum=0.0, strict=True)
    for field, allowed in (("tasks", TASKS), ("methods", METHODS)):
        value = list(cc.get(config, field))
        if not value or any(x not in allowed for x in value) or len(set(value)) != len(value):
            cc.fail(field, value, f"it must be a non-empty list of distinct names from {allowed}")
    cc.fraction(config, "rare_event.rate")
    cc.real(config, "soft.scale", minimum=0.0, strict=True)
    cc.real(config, "soft.offset")
    ti = cc.integer(config, "infilling.horizon", minimum=1, maximum=6)
    cc.integer(config, "infilling.cond_length", minimum=1)
    cc.positive_int(config, "infilling.num_eval")
    if v ** max(t, ti) > en.MAX_SEQUENCES:
        cc.fail("lm.vocab_size", v, f"vocab_size ** horizon must be <= {en.MAX_SEQUENCES}")
    cc.choice(config, "twist.kind", ("head", "separate"))
    cc.positive_int(config, "twist.hidden")
    cc.positive_int(config, "twist.width")
    _check_train(config, "train")
    _check_train(config, "train_infilling")
    if config.train_infilling.positives_per_group != 1:
        cc.fail("train_infilling.positives_per_group", config.train_infilling.positives_per_group,
                "infilling draws one exact sample per observed continuation; use 1")
    cc.integer(config, "num_seeds", minimum=2)
    cc.positive_int(config, "eval.num_samples")
    cc.positive_int(config, "eval.num_particles")
    cc.integer(config, "eval.num_runs", minimum=2)
    cc.int_sequence(config, "bounds.num_particles", allow_empty=False)
    cc.integer(config, "bounds.num_runs", minimum=2)
    bad = [m for m in config.bounds.methods if m not in config.methods]
    if bad:
        cc.fail("bounds.methods", list(config.bounds.methods),
                f"every entry must be one of config.methods {list(config.methods)}")


class _Setup:
    """The LM and the tasks (with their exact targets), built once per run."""

    def __init__(self, config):
        c = config
        self.lm = TinyLM(c.lm.vocab_size, c.lm.hidden, c.lm.sharpness)
        self.params = self.lm.init(jax.random.key(c.lm.seed))
        self.prompt = jnp.zeros((0,), jnp.int32)
        keys = jax.random.split(jax.random.key(c.seed), 3)
        self.tasks, self.exacts, self.conds, self.horizons = {}, {}, {}, {}
        for name in c.tasks:
            if name == "rare_event":
                task, exact = task_lib.rare_event_task(self.lm, self.params, keys[0], c.lm.horizon,
                                                       c.rare_event.rate,
                                                       hidden=c.rare_event.classifier_hidden)
                exacts, conds, horizon = [exact], [None], c.lm.horizon
            elif name == "soft":
                task, exact = task_lib.soft_task(self.lm, self.params, keys[1], c.lm.horizon,
                                                 c.soft.scale, c.soft.offset,
                                                 hidden=c.soft.classifier_hidden)
                exacts, conds, horizon = [exact], [None], c.lm.horizon
            else:
                horizon = c.infilling.horizon
                task, exacts = task_lib.infilling_task(self.lm, self.params, keys[2], horizon,
                                                       c.infilling.cond_length,
                                                       c.infilling.num_eval)
                conds = list(task.eval_conds)
            self.tasks[name], self.exacts[name] = task, exacts
            self.conds[name], self.horizons[name] = conds, horizon

    def problem(self, config, name, method, twist_params=None, cond=None, key=None):
        task, horizon, v = self.tasks[name], self.horizons[name], self.lm.vocab_size
        if config.twist.kind == "head":
            twist = HeadTwist(v, self.lm.hidden, horizon, task.cond_length, config.twist.hidden,
                              link_for(method))
        else:
            twist = SeparateTwist(v, horizon, task.cond_length, config.twist.width,
                                  config.twist.hidden, link_for(method))
        if twist_params is None:
            # bootstrap: the heads' zero output layer gives log psi = 0 exactly (q = p0), and
            # sharing the twist type with the learned methods shares their compiled programs.
            twist_params = twist.init(key)
        return TwistedProblem(self.lm, twist, task.potential, horizon, self.params, twist_params,
                              self.prompt, cond)


def _finite_mean_ci(values):
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    if finite.size < 2:
        return float(np.mean(finite)) if finite.size else None, None
    half = stats.t.ppf(0.975, finite.size - 1) * finite.std(ddof=1) / math.sqrt(finite.size)
    return float(finite.mean()), float(half)


def _log_targets(problem, task, tokens, cond):
    """``log sigma~ - log q`` for sequences ``[N, T]`` (teacher forced, jitted)."""
    return np.asarray(_log_targets_jit(problem, task.potential, tokens, cond), np.float64)


@partial(jax.jit, static_argnums=(1,))
def _log_targets_jit(problem, potential, tokens, cond):
    n = tokens.shape[0]
    c = None if cond is None else jnp.broadcast_to(cond, (n,) + cond.shape)
    lp, lpsi = _twist_tables_impl(problem, tokens, c)
    idx = tokens[..., None]
    l = jnp.take_along_axis(lp, idx, 2)[..., 0]  # noqa: E741
    g = jnp.take_along_axis(lpsi, idx, 2)[..., 0]
    z = jax.scipy.special.logsumexp(lp + lpsi, axis=2)
    log_q = jnp.sum(l + g - z, axis=1)
    return jnp.sum(l, axis=1) + potential(tokens, c) - log_q


def _evaluate(key, setup, config, name, problem):
    """Exact and estimated KLs, averaged over the task's conditioning inputs."""
    task = setup.tasks[name]
    rows = []
    for i, (cond, exact) in enumerate(zip(setup.conds[name], setup.exacts[name], strict=True)):
        k = jax.random.fold_in(key, i)
        k1, k2, k3, k4 = jax.random.split(k, 4)
        p = dataclasses.replace(problem, cond=cond)
        lq = en.sequence_log_probs(p.lm, p.lm_params, p.prompt, p.horizon, p.twist,
                                   p.twist_params, cond)
        n, e = config.eval.num_samples, config.eval
        pos = en.sample_target(k1, exact, n)
        neg = sample_proposal(k2, p, n)
        lower = np.asarray(log_z_estimates(k3, p, e.num_particles, e.num_runs), np.float64)
        refs = en.sample_target(k4, exact, e.num_runs)
        upper = np.asarray(log_z_estimates(k4, p, e.num_particles, e.num_runs, references=refs),
                           np.float64)
        lower_mean = _finite_mean_ci(lower)[0]
        sigma_terms = _log_targets(p, task, pos, cond)
        q_terms = _log_targets(p, task, neg, cond)
        est_sq = (float(sigma_terms.mean() - lower_mean) if lower_mean is not None
                  else float("inf"))
        est_qs = float(upper.mean() - q_terms.mean())  # +inf when a q draw has phi = 0
        rows.append({"kl_sigma_q": est_sq, "kl_q_sigma": est_qs,
                     "exact_kl_sigma_q": en.kl_divergence(exact.log_sigma, lq),
                     "exact_kl_q_sigma": en.kl_divergence(lq, exact.log_sigma),
                     "exact_log_z": float(exact.log_z),
                     "frac_all_dead": float(np.mean(np.isneginf(lower)))})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _bounds(key, setup, config, name, problem):
    out = []
    cond, exact = setup.conds[name][0], setup.exacts[name][0]
    p = dataclasses.replace(problem, cond=cond)
    runs = config.bounds.num_runs
    for j, k in enumerate(config.bounds.num_particles):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, j), 3)
        lower = np.asarray(log_z_estimates(k1, p, k, runs), np.float64)
        refs = en.sample_target(k2, exact, runs)
        upper = np.asarray(log_z_estimates(k3, p, k, runs, references=refs), np.float64)
        lo, lo_ci = _finite_mean_ci(lower)
        up, up_ci = _finite_mean_ci(upper)
        out.append({"task": name, "num_particles": int(k), "smc_lower": lo,
                    "smc_lower_ci95": lo_ci, "csmc_upper": up, "csmc_upper_ci95": up_ci,
                    "gap": None if lo is None or up is None else up - lo,
                    "exact_log_z": float(exact.log_z),
                    "frac_all_dead": float(np.mean(np.isneginf(lower))), "num_runs": runs})
    return out


def _run_one(setup, config, name, method, seed, workdir):
    train_cfg = config.train_infilling if name == "infilling" else config.train
    arguments = {"lm": config.lm, "task": config.get(name, {}), "twist": config.twist,
                 "train": train_cfg, "eval": config.eval, "bounds": config.bounds,
                 "seed": config.seed, "run_seed": seed, "method": method, "task_name": name}
    stage = tio.Stage(Path(workdir) / "runs" / name / method / f"seed_{seed}", arguments)
    if stage.is_complete():
        return stage.load_json("result.json")
    key = jax.random.fold_in(jax.random.key(config.seed + 1000), seed)
    k_init, k_train, k_eval, k_bounds = jax.random.split(key, 4)
    problem = setup.problem(config, name, method, key=k_init)
    start = time.time()
    params, losses = train_twist(k_train, method, problem, setup.tasks[name],
                                 TwistTrainConfig(**train_cfg.to_dict()))
    seconds = time.time() - start
    problem = dataclasses.replace(problem, twist_params=params)
    result = _evaluate(k_eval, setup, config, name, problem)
    result.update({"train_seconds": seconds,
                   "final_loss": float(np.mean(losses[-20:])) if losses.size else None})
    if seed == 0 and method in config.bounds.methods:
        result["bounds"] = _bounds(k_bounds, setup, config, name, problem)
        for row in result["bounds"]:
            row["method"] = method
    tio.write_json(stage.path("result.json"), result)
    stage.mark_complete()
    return result


def _summary(per_seed, exact_per_seed):
    mean, ci = _finite_mean_ci(per_seed)
    infinite = bool(np.any(np.isposinf(per_seed)))
    exact_infinite = bool(np.any(np.isposinf(exact_per_seed)))
    emean, eci = _finite_mean_ci(exact_per_seed)
    return {"mean": None if infinite else mean, "ci95": None if infinite else ci,
            "infinite": infinite, "exact_mean": None if exact_infinite else emean,
            "exact_ci95": None if exact_infinite else eci, "exact_infinite": exact_infinite,
            "per_seed": [None if not np.isfinite(x) else float(x) for x in per_seed],
            "exact_per_seed": [None if not np.isfinite(x) else float(x) for x in exact_per_seed]}


def plot_bounds(bounds, path):
    """log Z bounds (mean +- 95% CI over runs) against the number of particles, one panel per task."""
    import matplotlib.pyplot as plt

    names = sorted({b["task"] for b in bounds})
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = [b for b in bounds if b["task"] == name]
        for method in sorted({b["method"] for b in rows}):
            rs = [b for b in rows if b["method"] == method]
            for field, style in (("smc_lower", "-o"), ("csmc_upper", "--s")):
                pts = [(b["num_particles"], b[field], b[field + "_ci95"] or 0.0) for b in rs
                       if b[field] is not None]
                if pts:
                    k, m, e = zip(*pts, strict=True)
                    dead = max(b["frac_all_dead"] for b in rs)
                    note = (f" (finite runs; up to {100 * dead:.0f}% all dead)"
                            if field == "smc_lower" and dead > 0 else "")
                    ax.errorbar(k, m, yerr=e, fmt=style, capsize=3,
                                label=f"{method} {field.replace('_', ' ')}{note}")
        ax.axhline(rows[0]["exact_log_z"], color="k", lw=1, label="exact log Z")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of particles K")
        ax.set_ylabel("log Z estimate (nats)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str | Path, overwrite: bool = False) -> dict:
    """Runs every (task, method, seed) stage and writes ``results.json`` and ``bounds.png``."""
    validate_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tio.allow_overwrite(overwrite):
        setup = _Setup(config)
        kl_table, exact, bounds = {}, {}, []
        jobs = [(n, m, s) for n in config.tasks for m in config.methods
                for s in range(config.num_seeds)]
        results = {}
        for name, method, seed in progress(jobs, desc="twist runs"):
            results[(name, method, seed)] = _run_one(setup, config, name, method, seed, workdir)
    for name in config.tasks:
        kl_table[name], exact[name] = {}, {
            "log_z": [float(e.log_z) for e in setup.exacts[name]],
            "kl_sigma_q": {}, "kl_q_sigma": {}, "info": setup.tasks[name].info}
        if name != "infilling":
            exact[name]["log_z"] = exact[name]["log_z"][0]
        for method in config.methods:
            rs = [results[(name, method, s)] for s in range(config.num_seeds)]
            entry = {}
            for kl in ("kl_sigma_q", "kl_q_sigma"):
                entry[kl] = _summary([r[kl] for r in rs], [r["exact_" + kl] for r in rs])
                exact[name][kl][method] = entry[kl]["exact_mean"]
            entry["frac_all_dead"] = float(np.mean([r["frac_all_dead"] for r in rs]))
            entry["train_seconds"] = float(np.mean([r["train_seconds"] for r in rs]))
            entry["final_loss"] = [r["final_loss"] for r in rs]
            kl_table[name][method] = entry
            bounds.extend(rs[0].get("bounds", []))
    results_json = {
        "kl_table": kl_table, "exact": exact, "bounds": bounds,
        "settings": {"config": config.to_dict(), "seconds": time.time() - start,
                     "kl_estimates": "KL(sigma||q): exact-target samples minus the mean SMC "
                     "lower bound; KL(q||sigma): mean cSMC upper bound minus q samples; "
                     "mean +- 95% CI (t) over seeds; null with infinite=true when +inf"}}
    if bounds:
        plot_bounds(bounds, workdir / "bounds.png")
    tio.write_json(workdir / "results.json", results_json)
    return results_json
