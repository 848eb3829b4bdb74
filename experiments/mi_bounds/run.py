"""MI bounds on a linear-Gaussian sweep and on small VAEs (Brekelmans et al., 2022, in miniature).

``train_and_evaluate(config, workdir)`` runs two parts and writes ``workdir/results.json`` plus PNG
figures:

(a) ``gaussian``: for each requested MI level, a ``z_dim``-dimensional linear-Gaussian model
    ``x = W z + sigma eps`` with ``W`` scaled to that MI (closed form). On ``num_samples`` joint
    samples it evaluates BA (learned diagonal encoder), IWAE lower/upper (that encoder as proposal),
    InfoNCE (optimal critic ``log p(x|z)``, ``K`` negatives; capped at ``log K``), GIWAE (learned
    critic), Multi-Sample AIS lower/upper (HMC, pilot-tuned frozen step sizes), MINE-DV, MINE-F and
    MINE-AIS (energy-based critic trained with HMC negatives, evaluated with Multi-Sample AIS).
    Each level is a resumable stage (``workdir/gaussian/mi_<level>``).
(b) ``vae``: Gaussian VAEs trained on ``config.vae.data`` (MNIST-1D by default, scikit-learn digits
    in the tiny config; latent sizes from the config); bounds on ``I(x;z)``
    under each VAE's generative model: AIS lower/upper, IWAE lower/upper (encoder proposal), BA,
    GIWAE, InfoNCE and MINE-AIS. Each latent size is a resumable stage.

Every number in the JSON is a mean over the evaluation samples; ``stderr`` holds standard errors.
Every config value is checked first (:func:`validate_config`), so a typo fails in seconds.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.tree_util import Partial

from experiments import config_checks as check
from tda_jax import io as tio
from tda_jax import mi
from tda_jax.mcmc import geometric_schedule
from tda_jax.mi.bounds import check_finite
from tda_jax.progress import progress
from tda_jax.sharding import is_main_process

Array = jax.Array
BOUND_NAMES = (
    "ba",
    "infonce",
    "iwae_lower",
    "iwae_upper",
    "giwae",
    "ais_lower",
    "ais_upper",
    "mine_dv",
    "mine_f",
    "mine_ais",
)


DATA_NAMES = ("mnist1d", "digits")
DATA_LABELS = {"mnist1d": "MNIST-1D", "digits": "scikit-learn digits (8x8)"}
_FIT_FIELDS = ("num_steps", "batch_size", "learning_rate")
_AIS_FIELDS = ("num_steps", "num_chains", "schedule_start", "num_integration_steps",
               "num_pilot_steps", "num_anchors", "num_tuning_examples", "num_pilot_chains")
_BOUNDS_FIELDS = ("num_samples", "iwae_num_samples", "infonce_num_samples", "encoder", "giwae",
                  "ais", "mine")


def _check_fit(config, field: str, extra: tuple[str, ...] = ()) -> None:
    check.known_fields(config, field, _FIT_FIELDS + extra)
    check.positive_int(config, f"{field}.num_steps")
    check.positive_int(config, f"{field}.batch_size")
    check.real(config, f"{field}.learning_rate", minimum=0.0, strict=True)


def _check_ais(config, field: str, num_samples: int) -> None:
    check.known_fields(config, field, _AIS_FIELDS, optional=("steps_per_nat", "min_steps"))
    num_steps = check.positive_int(config, f"{field}.num_steps")
    check.positive_int(config, f"{field}.num_chains")
    check.fraction(config, f"{field}.schedule_start")  # geometric schedule from start to 1
    check.positive_int(config, f"{field}.num_integration_steps")
    check.positive_int(config, f"{field}.num_pilot_steps")
    check.positive_int(config, f"{field}.num_anchors")
    check.integer(config, f"{field}.num_tuning_examples", minimum=1, maximum=num_samples)
    check.positive_int(config, f"{field}.num_pilot_chains")
    # T = steps_per_nat * level, clipped to [min_steps, num_steps] (see ais_num_steps).
    if check.get(config, field).get("steps_per_nat") is not None:
        check.real(config, f"{field}.steps_per_nat", minimum=0.0, strict=True)
        check.integer(config, f"{field}.min_steps", minimum=1, maximum=num_steps)


def _check_bounds(config, field: str, extra: tuple[str, ...] = ()) -> None:
    """The bound settings shared by the Gaussian sweep and the VAE evaluation."""
    check.known_fields(config, field, _BOUNDS_FIELDS + extra)
    num_samples = check.positive_int(config, f"{field}.num_samples")
    check.positive_int(config, f"{field}.iwae_num_samples")
    check.positive_int(config, f"{field}.infonce_num_samples")
    _check_fit(config, f"{field}.encoder")
    _check_fit(config, f"{field}.giwae", ("num_samples",))
    check.positive_int(config, f"{field}.giwae.num_samples")
    _check_ais(config, f"{field}.ais", num_samples)
    _check_fit(config, f"{field}.mine", ("num_hmc_steps", "num_integration_steps", "run_dv_f",
                                         "ais"))
    check.positive_int(config, f"{field}.mine.num_hmc_steps")
    check.positive_int(config, f"{field}.mine.num_integration_steps")
    check.boolean(config, f"{field}.mine.run_dv_f")
    _check_ais(config, f"{field}.mine.ais", num_samples)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every value of the experiment's config before any stage runs.

    Raises:
      ValueError: naming the first offending field (``config.vae.data.name``), its value and
        what it must be.
    """
    check.known_fields(config, "", ("fast_compile", "gaussian", "vae"))
    check.boolean(config, "fast_compile")
    _check_bounds(config, "gaussian", ("z_dim", "x_dim", "mi_levels", "noise_std", "base",
                                       "spectrum_ratio", "seed"))
    z_dim = check.positive_int(config, "gaussian.z_dim")
    check.integer(config, "gaussian.x_dim", minimum=1)
    levels = check.get(config, "gaussian.mi_levels")
    if not isinstance(levels, list | tuple) or not levels or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in levels):
        check.fail("gaussian.mi_levels", levels, "it must be a non-empty list of finite MI "
                   "values > 0 (nats)")
    check.real(config, "gaussian.noise_std", minimum=0.0, strict=True)
    base = check.choice(config, "gaussian.base", ("orthogonal", "gaussian"))
    if base == "orthogonal":
        check.integer(config, "gaussian.x_dim", minimum=z_dim)  # W = U diag(s) V^T, U [x, z]
    check.real(config, "gaussian.spectrum_ratio", minimum=1.0)
    check.integer(config, "gaussian.seed")

    check.known_fields(config, "vae", ("latent_dims", "hidden", "train", "data", "min_std",
                                       "learn_std", "seed", "bounds"))
    check.int_sequence(config, "vae.latent_dims")
    check.int_sequence(config, "vae.hidden")
    _check_fit(config, "vae.train")
    check.known_fields(config, "vae.data", ("name", "num_examples", "seed"))
    check.choice(config, "vae.data.name", DATA_NAMES)
    check.positive_int(config, "vae.data.num_examples")
    check.integer(config, "vae.data.seed")
    check.real(config, "vae.min_std", minimum=0.0, strict=True)
    check.boolean(config, "vae.learn_std")
    check.integer(config, "vae.seed")
    _check_bounds(config, "vae.bounds", ("critic_hidden",))
    check.int_sequence(config, "vae.bounds.critic_hidden")


def _importance_critic_apply(critic_fn, proposal_log_prob, params, x, z):
    """GIWAE critic ``T(x,z) = r_theta(x,z) + alpha (log p(z) - log q(z|x))``.

    The optimal GIWAE critic is ``log p(x|z) + log p(z) - log q(z|x) + c(x)`` (the log importance
    weight), which this family contains at ``alpha = 1``. Starting at ``alpha = 0`` with a
    near-constant ``r_theta`` makes the initial bound equal BA instead of far below it.
    """
    log_ratio = mi.log_prior(z) - proposal_log_prob(x, z)
    return critic_fn(params["critic"], x, z) + params["alpha"] * log_ratio


def _importance_critic(critic_fn, proposal: mi.Proposal) -> Partial:
    return Partial(_importance_critic_apply, critic_fn, proposal.log_prob)


class _Timer:
    """Accumulates wall-clock seconds per named block."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Block:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Block()


def _summaries(values: dict[str, Array]) -> tuple[dict[str, float], dict[str, float]]:
    means, errors = {}, {}
    for name, v in values.items():
        v = jnp.atleast_1d(jnp.asarray(v))
        means[name], errors[name] = mi.mean_and_stderr(v) if v.shape[0] > 1 else (float(v[0]), 0.0)
    return means, errors


# ---------------------------------------------------------------------------------------------
# Jitted evaluators. Callables arrive as jax.tree_util.Partial pytrees whose arrays (model
# parameters, critic parameters) are traced, so one compilation serves every MI level.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("iwae_k", "infonce_k", "giwae_k"))
def _variational_values(key, x, z, log_likelihood_fn, proposal, giwae_critic, prior_sample_fn, *,
                        iwae_k, infonce_k, giwae_k):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "ba": mi.barber_agakov_lower(x, z, proposal.log_prob, mi.log_prior),
        "iwae_lower": mi.iwae_lower(k1, x, z, log_likelihood_fn, mi.log_prior, proposal, iwae_k),
        "iwae_upper": mi.iwae_upper(k2, x, z, log_likelihood_fn, mi.log_prior, proposal, iwae_k),
        "infonce": mi.infonce_lower(k3, x, z, log_likelihood_fn, prior_sample_fn, infonce_k),
        "giwae": mi.giwae_lower(k4, x, z, giwae_critic, mi.log_prior, proposal, giwae_k),
    }


@functools.partial(jax.jit, static_argnames=("num_chains", "num_integration_steps"))
def _ais_values(key, x, z, log_likelihood_fn, betas, step_sizes, prior_sample_fn, *, num_chains,
                num_integration_steps):
    return mi.multi_sample_ais_bounds(
        key, x, z, log_likelihood_fn, mi.log_prior, betas, step_sizes, num_chains,
        prior_sample_fn=prior_sample_fn, num_integration_steps=num_integration_steps,
    )


_score_matrix = jax.jit(mi.critic_score_matrix)


def ais_num_steps(ais_config: ml_collections.ConfigDict, level: float | None = None) -> int:
    """``T``: ``ais_config.num_steps``, or ``steps_per_nat * level`` clipped to
    ``[min_steps, num_steps]`` when the config sets ``steps_per_nat`` and a level is given."""
    steps_per_nat = ais_config.get("steps_per_nat")
    if steps_per_nat is None or level is None:
        return int(ais_config.num_steps)
    steps = int(round(steps_per_nat * level))
    return int(min(max(steps, ais_config.min_steps), ais_config.num_steps))


def _ais_bounds(key, x, z, log_likelihood_fn, prior_sample_fn, ais_config, timer, tag,
                num_steps):
    """Tunes step sizes on a few examples, then runs Multi-Sample AIS on all samples."""
    betas = geometric_schedule(num_steps, start=ais_config.schedule_start)
    key_tune, key_run = jax.random.split(key)
    with timer(f"{tag}_tune"):
        step_sizes = mi.tune_mi_step_sizes(
            key_tune,
            x[: ais_config.num_tuning_examples],
            log_likelihood_fn,
            mi.log_prior,
            betas,
            num_pilot_chains=ais_config.num_pilot_chains,
            prior_sample_fn=prior_sample_fn,
            num_anchors=ais_config.num_anchors,
            num_integration_steps=ais_config.num_integration_steps,
            num_pilot_steps=ais_config.num_pilot_steps,
        )
    with timer(tag):
        result = jax.block_until_ready(
            _ais_values(
                key_run, x, z, log_likelihood_fn, betas, step_sizes, prior_sample_fn,
                num_chains=ais_config.num_chains,
                num_integration_steps=ais_config.num_integration_steps,
            )
        )
    check_finite(result.lower, f"{tag}: AIS lower bound")
    check_finite(result.upper, f"{tag}: AIS upper bound")
    return result, step_sizes


def _fit_encoder(key, sample_joint_fn, x_dim, z_dim, x_mean, x_std, hidden, fit_config):
    """Fits a diagonal Gaussian encoder on standardized ``x`` (Barber-Agakov objective)."""
    module = mi.GaussianEncoder(z_dim, tuple(hidden))
    params = module.init(key, jnp.zeros((x_dim,), jnp.float32))
    encoder_fn = mi.standardized_encoder(module, x_mean, x_std)
    fit = mi.fit_encoder(
        key,
        encoder_fn,
        params,
        sample_joint_fn,
        num_steps=fit_config.num_steps,
        batch_size=fit_config.batch_size,
        learning_rate=fit_config.learning_rate,
    )
    return mi.diagonal_gaussian_proposal(Partial(encoder_fn, fit.params))


class _Problem(NamedTuple):
    """What every bound is evaluated on: joint samples, the model's likelihood and sampler, the
    proposal and the standardization of ``x`` used by learned critics."""

    x: Array
    z: Array
    log_likelihood_fn: Partial
    sample_joint_fn: Partial
    proposal: mi.Proposal
    x_mean: Array
    x_std: Array
    critic_hidden: tuple
    prior_sample_fn: Any


def _variational_stage(keys, problem: _Problem, config, timer: _Timer) -> dict[str, Array]:
    """Fits the GIWAE critic, then BA, IWAE lower/upper, InfoNCE and GIWAE on the samples."""
    x_dim, z_dim = problem.x.shape[1], problem.z.shape[1]
    giwae_module = mi.DecoderCritic(x_dim, problem.critic_hidden, init_log_precision=-5.0)
    giwae_init = {
        "critic": giwae_module.init(keys[3], jnp.zeros((x_dim,)), jnp.zeros((z_dim,))),
        "alpha": jnp.zeros((), jnp.float32),
    }
    giwae_critic = _importance_critic(
        mi.standardized_critic(giwae_module, problem.x_mean, problem.x_std), problem.proposal
    )
    with timer("giwae_train"):
        giwae_fit = mi.fit_giwae_critic(
            keys[4],
            giwae_critic,
            giwae_init,
            problem.proposal,
            mi.log_prior,
            problem.sample_joint_fn,
            config.giwae.num_samples,
            num_steps=config.giwae.num_steps,
            batch_size=config.giwae.batch_size,
            learning_rate=config.giwae.learning_rate,
        )
    with timer("variational_eval"):
        values = dict(
            _variational_values(
                keys[0], problem.x, problem.z, problem.log_likelihood_fn, problem.proposal,
                Partial(giwae_critic, giwae_fit.params), problem.prior_sample_fn,
                iwae_k=config.iwae_num_samples, infonce_k=config.infonce_num_samples,
                giwae_k=config.giwae.num_samples,
            )
        )
    for name, v in values.items():
        check_finite(v, name)
    return values


def _ais_stage(keys, problem: _Problem, config, timer: _Timer, level, values, info) -> None:
    """Multi-Sample AIS lower and upper bounds with the true likelihood."""
    num_steps = ais_num_steps(config.ais, level)
    ais_result, step_sizes = _ais_bounds(
        keys[6], problem.x, problem.z, problem.log_likelihood_fn, problem.prior_sample_fn,
        config.ais, timer, "ais", num_steps,
    )
    info["ais_num_steps"] = num_steps
    values["ais_lower"] = ais_result.lower
    values["ais_upper"] = ais_result.upper
    info["ais_acceptance"] = float(jnp.mean(ais_result.acceptance))
    info["ais_step_size_first_last"] = [float(step_sizes[0]), float(step_sizes[-1])]


def _mine_dv_f_stage(keys, problem: _Problem, config, timer: _Timer, values) -> None:
    """MINE-DV and MINE-F: a critic trained on each batch objective, evaluated on the samples."""
    x_dim, z_dim = problem.x.shape[1], problem.z.shape[1]
    mine_module = mi.DecoderCritic(x_dim, problem.critic_hidden, x_terms=True)
    mine_critic = mi.standardized_critic(mine_module, problem.x_mean, problem.x_std)
    mine_init = mine_module.init(keys[7], jnp.zeros((x_dim,)), jnp.zeros((z_dim,)))
    for objective, estimator in (("dv", mi.mine_dv_lower), ("f", mi.mine_f_lower)):
        with timer(f"mine_{objective}"):
            fit = mi.fit_mine_critic(
                keys[7],
                mine_critic,
                mine_init,
                problem.sample_joint_fn,
                objective=objective,
                num_steps=config.mine.num_steps,
                batch_size=config.mine.batch_size,
                learning_rate=config.mine.learning_rate,
            )
            values[f"mine_{objective}"] = estimator(
                _score_matrix(Partial(mine_critic, fit.params), problem.x, problem.z)
            )


def _mine_ais_stage(keys, problem: _Problem, config, timer: _Timer, values, info) -> None:
    """MINE-AIS: an energy-based critic trained with HMC negatives, bounded by Multi-Sample AIS."""
    x_dim, z_dim = problem.x.shape[1], problem.z.shape[1]
    critic_module = mi.DecoderCritic(x_dim, problem.critic_hidden)
    critic_fn = mi.standardized_critic(critic_module, problem.x_mean, problem.x_std)
    init_critic = critic_module.init(keys[3], jnp.zeros((x_dim,)), jnp.zeros((z_dim,)))
    with timer("mine_ais_train"):
        fit, hmc_step = mi.fit_mine_ais_critic(
            keys[8],
            critic_fn,
            init_critic,
            mi.log_prior,
            problem.sample_joint_fn,
            num_steps=config.mine.num_steps,
            batch_size=config.mine.batch_size,
            learning_rate=config.mine.learning_rate,
            num_hmc_steps=config.mine.num_hmc_steps,
            num_integration_steps=config.mine.num_integration_steps,
        )
    mine_ais_result, _ = _ais_bounds(
        keys[9], problem.x, problem.z, Partial(critic_fn, fit.params), problem.prior_sample_fn,
        config.mine.ais, timer, "mine_ais_eval", ais_num_steps(config.mine.ais),
    )
    values["mine_ais"] = mine_ais_result.lower
    info["mine_ais_training_hmc_step_size"] = hmc_step
    info["mine_ais_forward_estimate"] = float(jnp.mean(mine_ais_result.upper))


def _evaluate_all(
    key: Array,
    x: Array,
    z: Array,
    log_likelihood_fn: Partial,
    sample_joint_fn: Partial,
    proposal: mi.Proposal,
    x_mean: Array,
    x_std: Array,
    critic_hidden,
    config: ml_collections.ConfigDict,
    timer: _Timer,
    level: float | None = None,
) -> tuple[dict[str, Array], dict[str, Any]]:
    """Every bound on the joint samples ``(x, z)``; returns per-example values and diagnostics.

    Stages, each with its own fixed key of ``split(key, 10)``: variational bounds (GIWAE critic
    fitted first), Multi-Sample AIS, MINE-DV/F (if ``config.mine.run_dv_f``), MINE-AIS.
    """
    keys = jax.random.split(key, 10)
    problem = _Problem(x, z, log_likelihood_fn, sample_joint_fn, proposal, x_mean, x_std,
                       tuple(critic_hidden), mi.standard_normal_sampler(z.shape[1]))
    info: dict[str, Any] = {"infonce_log_k": math.log(config.infonce_num_samples)}
    values = _variational_stage(keys, problem, config, timer)
    _ais_stage(keys, problem, config, timer, level, values, info)
    if config.mine.run_dv_f:
        _mine_dv_f_stage(keys, problem, config, timer, values)
    _mine_ais_stage(keys, problem, config, timer, values, info)
    return values, info


# ---------------------------------------------------------------------------------------------
# (a) Linear-Gaussian sweep.
# ---------------------------------------------------------------------------------------------


def run_gaussian_level(config: ml_collections.ConfigDict, level: float, workdir: Path) -> dict:
    """All bounds for one MI level; resumable (a finished level is loaded, not recomputed)."""
    g = config.gaussian
    stage = tio.Stage(workdir / "gaussian" / f"mi_{level:g}", {"gaussian": g, "level": level})
    if stage.is_complete():
        return stage.load_json("result.json")
    timer = _Timer()
    key = jax.random.key(g.seed)
    key_model, key_eval, key_bounds, key_enc = jax.random.split(key, 4)
    model = mi.make_linear_gaussian(
        key_model, g.x_dim, g.z_dim, float(level), g.noise_std, base=g.base,
        spectrum_ratio=g.spectrum_ratio,
    )
    x, z = mi.sample_joint(key_eval, model, g.num_samples)
    x_mean = jnp.zeros((g.x_dim,), jnp.float32)
    x_std = jnp.sqrt(jnp.sum(model.weight**2, axis=1) + model.noise_std**2)

    sample_joint_fn = mi.joint_sampler(model)
    log_likelihood_fn = mi.likelihood_fn(model)
    with timer("encoder"):
        proposal = _fit_encoder(
            key_enc, sample_joint_fn, g.x_dim, g.z_dim, x_mean, x_std, (), g.encoder
        )
    values, info = _evaluate_all(
        key_bounds, x, z, log_likelihood_fn, sample_joint_fn, proposal, x_mean, x_std, (), g, timer,
        level=float(level),
    )
    means, errors = _summaries(values)
    result = {
        "target_mi": float(level),
        "true_mi": float(mi.linear_gaussian_mi(model)),
        "true_mi_sample": float(mi.true_mi_sample(model, x, z)),
        "bounds": means,
        "stderr": errors,
        "ais_width": means["ais_upper"] - means["ais_lower"],
        "info": info,
        "seconds": {k: round(v, 2) for k, v in timer.seconds.items()},
    }
    tio.write_json(stage.path("result.json"), result)
    stage.mark_complete()
    return result


# ---------------------------------------------------------------------------------------------
# (b) VAEs on MNIST-1D.
# ---------------------------------------------------------------------------------------------


def load_data(config: ml_collections.ConfigDict) -> np.ndarray:
    """Standardized training inputs ``[num_examples, x_dim]`` (MNIST-1D, or scikit-learn digits)."""
    if config.name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.seed = config.seed
        data = np.asarray(make_dataset(args)["x"], np.float32)
    elif config.name == "digits":
        from sklearn.datasets import load_digits

        data = load_digits().data.astype(np.float32)
    else:
        raise ValueError(f"config.vae.data.name must be 'mnist1d' or 'digits', got {config.name!r}.")
    data = data[: config.num_examples]
    return (data - data.mean(0)) / (data.std(0) + 1e-6)


def _flatten_params(params) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _unflatten_params(arrays: dict[str, np.ndarray]):
    from flax import traverse_util

    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in arrays.items()}, sep="/")


def run_vae(
    config: ml_collections.ConfigDict, latent_dim: int, data: np.ndarray, workdir: Path
) -> dict:
    """Trains a VAE (resumable stage) and bounds ``I(x;z)`` of its generative model (stage)."""
    v = config.vae
    timer = _Timer()
    module = mi.GaussianVAE(data.shape[1], latent_dim, tuple(v.hidden), v.min_std, v.learn_std)
    model_stage = tio.Stage(
        workdir / "vae" / f"latent_{latent_dim}" / "model",
        {"model": {"hidden": v.hidden, "min_std": v.min_std, "learn_std": v.learn_std,
                   "train": v.train, "data": v.data},
         "latent_dim": latent_dim, "seed": v.seed},
    )
    key = jax.random.key(v.seed + latent_dim)
    key_train, key_eval, key_bounds = jax.random.split(key, 3)
    with timer("train_vae"):
        if model_stage.is_complete():
            params = _unflatten_params(model_stage.load_arrays("params"))
            elbo = float(model_stage.load_arrays("elbo")["elbo"])
        else:
            params, history = mi.train_vae(
                key_train, module, data, v.train.num_steps, v.train.batch_size,
                v.train.learning_rate,
            )
            elbo = float(history[-1])
            model_stage.save_arrays("params", _flatten_params(params))
            model_stage.save_arrays("elbo", {"elbo": np.float32(elbo)})
            model_stage.mark_complete()
    bounds_stage = tio.Stage(
        workdir / "vae" / f"latent_{latent_dim}" / "bounds",
        {"bounds": v.bounds, "latent_dim": latent_dim, "seed": v.seed},
    )
    if bounds_stage.is_complete():
        return bounds_stage.load_json("result.json")

    sample_joint_fn = mi.vae_sample_joint(module, params)
    log_likelihood_fn = mi.vae_log_likelihood(module, params)
    proposal = mi.vae_proposal(module, params)
    x, z = sample_joint_fn(key_eval, v.bounds.num_samples)
    big_x, _ = sample_joint_fn(jax.random.fold_in(key_eval, 1), 4096)
    x_mean, x_std = jnp.mean(big_x, 0), jnp.std(big_x, 0)
    values, info = _evaluate_all(
        key_bounds, x, z, log_likelihood_fn, sample_joint_fn, proposal, x_mean, x_std,
        tuple(v.bounds.critic_hidden), v.bounds, timer,
    )
    means, errors = _summaries(values)
    result = {
        "latent_dim": latent_dim,
        "train_elbo": elbo,
        "decoder_std_mean": float(
            jnp.mean(jnp.exp(module.apply(params, z[:1], method=mi.GaussianVAE.decode)[1]))
        ),
        "bounds": means,
        "stderr": errors,
        "ais_width": means["ais_upper"] - means["ais_lower"],
        "info": info,
        "seconds": {k: round(val, 2) for k, val in timer.seconds.items()},
    }
    tio.write_json(bounds_stage.path("result.json"), result)
    bounds_stage.mark_complete()
    return result


# ---------------------------------------------------------------------------------------------
# Figures and the driver.
# ---------------------------------------------------------------------------------------------

_STYLE = {
    "ba": ("BA", "tab:brown", "v"),
    "infonce": ("InfoNCE", "tab:gray", "x"),
    "iwae_lower": ("IWAE lower", "tab:blue", "v"),
    "iwae_upper": ("IWAE upper", "tab:blue", "^"),
    "giwae": ("GIWAE", "tab:purple", "v"),
    "ais_lower": ("Multi-Sample AIS lower", "tab:red", "v"),
    "ais_upper": ("Multi-Sample AIS upper", "tab:red", "^"),
    "mine_dv": ("MINE-DV", "tab:olive", "<"),
    "mine_f": ("MINE-F", "tab:cyan", ">"),
    "mine_ais": ("MINE-AIS", "tab:green", "o"),
}


def gaussian_figure(results: list[dict], config: ml_collections.ConfigDict):
    """Three panels: every bound vs the true MI (error bars: +-1 standard error over the
    evaluation samples, from ``stderr``), each bound's gap to the truth, the AIS width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = np.array([r["true_mi_sample"] for r in results])
    fig, (ax, ax_gap, ax_width) = plt.subplots(
        1, 3, figsize=(18, 5.5), layout="constrained", gridspec_kw={"width_ratios": [1.3, 1.3, 1]}
    )
    top = truth.max() * 1.15 + 5
    ax.plot(truth, truth, "k-", lw=1, label="true MI (on the samples)")
    ax_gap.axhline(0.0, color="k", lw=1)
    for name, (label, color, marker) in _STYLE.items():
        if name not in results[0]["bounds"]:
            continue
        values = np.array([r["bounds"][name] for r in results])
        errors = np.array([r.get("stderr", {}).get(name, np.nan) for r in results])
        linestyle = "--" if "upper" in name else "-"
        shown = np.where((values > -5) & (values < top), values, np.nan)
        if np.isnan(shown).any():
            label += " (off-scale points omitted)"
        ax.errorbar(truth, shown, yerr=np.where(np.isnan(shown), np.nan, errors),
                    fmt=marker + linestyle, color=color, label=label, ms=5, capsize=3)
        ax_gap.plot(truth, values - truth, linestyle, color=color, marker=marker, ms=5)
    log_k = math.log(config.gaussian.infonce_num_samples)
    ax.axhline(log_k, color="tab:gray", ls=":", lw=1, label=f"log K = {log_k:.2f} (InfoNCE cap)")
    ax.set_xlabel("true MI (nats)")
    ax.set_ylabel("bound (nats; error bars: +-1 standard error)")
    ax.set_ylim(-5, top)
    g = config.gaussian
    steps = "T=" + (
        f"{g.ais.steps_per_nat:g}/nat" if g.ais.get("steps_per_nat") else f"{g.ais.num_steps}"
    )
    ax.set_title(
        f"Linear Gaussian, z_dim={g.z_dim}: N={g.num_samples}, AIS {steps}, K={g.ais.num_chains}",
        wrap=True,
    )
    ax.legend(fontsize=7.5, loc="upper left")
    ax_gap.set_yscale("symlog", linthresh=0.1)
    ax_gap.set_ylim(-200, 200)
    ax_gap.set_xlabel("true MI (nats)")
    ax_gap.set_ylabel("bound - true MI (nats, symlog)")
    ax_gap.set_title("Gap to the truth (same samples)")
    widths = np.array([r["ais_width"] for r in results])
    ax_width.plot(truth, widths, "o-", color="tab:red")
    ax_width.set_xlabel("true MI (nats)")
    ax_width.set_ylabel("AIS upper - lower (nats)")
    ax_width.set_title("Multi-Sample AIS sandwich width")
    return fig


def plot_gaussian(results: list[dict], config: ml_collections.ConfigDict, path: Path) -> None:
    """Saves :func:`gaussian_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = gaussian_figure(results, config)
    fig.savefig(path, dpi=120)
    plt.close(fig)


VAE_TABLE_ROWS = ("ais_lower", "ais_upper", "iwae_lower", "iwae_upper", "ba", "giwae",
                  "infonce", "mine_ais")


def _vae_cells(vae_results: dict) -> tuple[list[str], list[str], list[list[str]]]:
    columns = sorted(vae_results, key=lambda name: vae_results[name]["latent_dim"])
    header = [f"latent {vae_results[c]['latent_dim']}" for c in columns]
    rows = [_STYLE[n][0] for n in VAE_TABLE_ROWS] + ["AIS width (upper - lower)"]
    cells = [[f"{vae_results[c]['bounds'][n]:.3f}" for c in columns] for n in VAE_TABLE_ROWS]
    cells.append([f"{vae_results[c]['ais_width']:.3f}" for c in columns])
    return header, rows, cells


def vae_table_markdown(vae_results: dict) -> str:
    """Markdown table: one row per bound, one column per latent size (nats, same samples)."""
    header, rows, cells = _vae_cells(vae_results)
    lines = ["| bound | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(c) + " |" for row, c in zip(rows, cells, strict=True)]
    return "\n".join(lines) + "\n"


def vae_table_figure(vae_results: dict, data_config: ml_collections.ConfigDict):
    """The VAE table as a figure, titled with the dataset the VAEs were trained on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, rows, cells = _vae_cells(vae_results)
    fig, ax = plt.subplots(figsize=(4.0 + 1.8 * len(header), 0.45 * len(rows) + 1.4),
                           layout="constrained")
    ax.axis("off")
    table = ax.table(cellText=cells, rowLabels=rows, colLabels=header, loc="center")
    table.scale(1.0, 1.4)
    label = DATA_LABELS.get(data_config.name, data_config.name)
    # A figure title (not the axes'): the row labels shift the table's axes to the right, and a
    # title centred on them was clipped at the figure's right edge. wrap=True keeps it inside.
    fig.suptitle(f"Bounds on I(x;z) (nats) under VAE generative models trained on {label} "
                 f"({data_config.num_examples} examples)", fontsize=10, wrap=True)
    return fig


def plot_vae_table(vae_results: dict, data_config: ml_collections.ConfigDict, path: Path) -> None:
    """Saves :func:`vae_table_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = vae_table_figure(vae_results, data_config)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       overwrite: bool = False) -> dict:
    """Runs both parts (resuming finished stages) and writes ``results.json`` and figures.

    Args:
      config: see ``experiments/mi_bounds/configs/default.py``; checked first by
        :func:`validate_config`.
      workdir: the work directory; its finished stages are reused.
      overwrite: recompute stages whose finished work was made with other settings (deleting it;
        each is logged) instead of raising :class:`tda_jax.io.ArgumentMismatchError`.
    """
    validate_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tio.allow_overwrite(overwrite):
        gaussian = []
        for level in progress(list(config.gaussian.mi_levels), desc="gaussian MI levels"):
            gaussian.append(run_gaussian_level(config, level, workdir))
        vae: dict[str, dict] = {}
        if config.vae.latent_dims:
            data = load_data(config.vae.data)
            for latent_dim in progress(list(config.vae.latent_dims), desc="VAE latent sizes"):
                vae[f"latent_{latent_dim}"] = run_vae(config, latent_dim, data, workdir)
    results = {
        "gaussian": gaussian,
        "vae": vae,
        "config": config.to_dict(),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    if not is_main_process():  # several processes (launch/): process 0 writes the outputs
        return results
    tio.write_json(workdir / "results.json", results)
    plot_gaussian(gaussian, config, workdir / "gaussian_bounds.png")
    if vae:
        plot_vae_table(vae, config.vae.data, workdir / "vae_bounds.png")
        tio.atomic_write_text(workdir / "vae_table.md", vae_table_markdown(vae))
    return results
