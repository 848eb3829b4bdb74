"""MI bounds vs. closed-form MI (linear Gaussian) and on MNIST-1D VAEs.

Reproduces, in miniature, the central result of Brekelmans et al. (2022), "Improving Mutual
Information Estimation with Annealed and Energy-Based Bounds" (ICLR): Multi-Sample AIS sandwiches
large MI (here up to 100 nats) tightly, while InfoNCE is capped at log K and single-proposal
variational bounds degrade as MI grows; MINE-AIS trains an energy-based critic (HMC negatives) and
is evaluated with Multi-Sample AIS.

Command (from the repository root)::

    python -m experiments.mi_bounds.main --config=experiments/mi_bounds/configs/default.py \
        --workdir=workdirs/mi_bounds

Tiny run (< 1 minute; used by tests/test_mi_experiment.py)::

    python -m experiments.mi_bounds.main --config=experiments/mi_bounds/configs/default.py:tiny \
        --workdir=workdirs/mi_bounds_tiny

Last default run (2-core shared CPU, about 12.5 minutes fresh; details in
experiments/mi_bounds/README.md)::

    linear Gaussian, z_dim 20, N 256, K 16, T = 40/nat (nats; true_mi_sample -> AIS sandwich):
      50 nats:  50.164 in [50.052, 50.260], width 0.208, AIS 15.5 s
      100 nats: 100.155 in [100.024, 100.229], width 0.205, AIS 29.2 s
      InfoNCE (K = 128) <= 4.852 at every level; MINE-AIS 50.12 (50 nats), 96.44 (100 nats)
    MNIST-1D VAE (latent 2 / latent 10): AIS [7.78, 8.50] / [28.89, 29.32];
      IWAE (K = 1000) [-304.5, 155.2] / [-25.5, 49.8]; BA -311.3 / -32.4; GIWAE -307.9 / -29.0;
      InfoNCE 4.80 / 4.85; MINE-AIS 6.51 / 23.25

Tiny run: about 40 s on the same machine.
"""

from __future__ import annotations

import ml_collections


def _ais(num_steps: int, num_chains: int, num_pilot_steps: int = 100, num_anchors: int = 10,
         num_tuning_examples: int = 2, num_pilot_chains: int = 16) -> ml_collections.ConfigDict:
    """Multi-Sample AIS settings: geometric schedule, HMC, pilot-tuned frozen step sizes."""
    return ml_collections.ConfigDict(
        {
            "num_steps": num_steps,
            "num_chains": num_chains,
            "schedule_start": 1e-6,
            "num_integration_steps": 10,
            "num_pilot_steps": num_pilot_steps,
            "num_anchors": num_anchors,
            "num_tuning_examples": num_tuning_examples,
            "num_pilot_chains": num_pilot_chains,
        }
    )


def _fit(num_steps: int, batch_size: int, learning_rate: float, **extra) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"num_steps": num_steps, "batch_size": batch_size, "learning_rate": learning_rate, **extra}
    )


def _bounds(num_samples: int, ais: ml_collections.ConfigDict, mine_ais: ml_collections.ConfigDict,
            fit_steps: int, mine_steps: int, run_dv_f: bool) -> ml_collections.ConfigDict:
    """Settings shared by the Gaussian sweep and the VAE evaluation."""
    return ml_collections.ConfigDict(
        {
            "num_samples": num_samples,  # joint samples every bound is evaluated on
            "iwae_num_samples": 1000,
            "infonce_num_samples": 128,
            "encoder": _fit(fit_steps, 256, 1e-2),
            "giwae": _fit(fit_steps, 128, 1e-2, num_samples=100),
            "ais": ais,
            "mine": _fit(
                mine_steps, 128, 2e-2, num_hmc_steps=5, num_integration_steps=10,
                run_dv_f=run_dv_f, ais=mine_ais,
            ),
        }
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default experiment, or a run under a minute with ``arg == "tiny"``."""
    tiny = arg == "tiny"
    if arg not in (None, "", "tiny"):
        raise ValueError(f"Unknown config argument {arg!r}; use nothing or 'tiny'.")
    config = ml_collections.ConfigDict()
    # Unoptimized XLA backend for the tiny run: it is dominated by compile time (main.py sets the
    # flag before JAX's first computation).
    config.fast_compile = tiny

    if tiny:
        gaussian = _bounds(16, _ais(100, 4, 20, 3, 1, 4), _ais(50, 4, 20, 3, 1, 4), 100, 100, False)
        gaussian.iwae_num_samples = 32
        gaussian.infonce_num_samples = 16
        gaussian.giwae.num_samples = 8
        gaussian.update({"z_dim": 4, "x_dim": 4, "mi_levels": (4.0,)})
    else:
        gaussian = _bounds(256, _ais(5000, 16), _ais(2000, 16), 1500, 2000, True)
        # T = 40 steps per nat of the level, clipped to [500, 5000]: the sandwich is then about
        # 0.2 nats wide at 50 nats, so its bias exceeds the Monte Carlo noise of N = 256 samples.
        gaussian.ais.update({"steps_per_nat": 40.0, "min_steps": 500})
        gaussian.giwae.num_samples = 32
        gaussian.update({"z_dim": 20, "x_dim": 20, "mi_levels": (5.0, 10.0, 25.0, 50.0, 75.0, 100.0)})
    gaussian.update({"noise_std": 1.0, "base": "orthogonal", "spectrum_ratio": 3.0, "seed": 0})
    config.gaussian = gaussian

    if tiny:
        vae_bounds = _bounds(8, _ais(50, 4, 20, 3, 1, 4), _ais(50, 4, 20, 3, 1, 4), 50, 50, False)
        vae_bounds.iwae_num_samples = 16
        vae_bounds.infonce_num_samples = 16
        vae_bounds.giwae.num_samples = 8
        vae_bounds.critic_hidden = (16,)
        vae = {"latent_dims": (2,), "hidden": (32,), "train": _fit(100, 64, 2e-3),
               "data": {"name": "digits", "num_examples": 500, "seed": 0}}
    else:
        vae_bounds = _bounds(64, _ais(5000, 16), _ais(2000, 16), 1500, 2000, False)
        vae_bounds.giwae.num_samples = 32
        vae_bounds.critic_hidden = (128, 128)
        vae = {"latent_dims": (2, 10), "hidden": (128, 128), "train": _fit(6000, 128, 2e-3),
               "data": {"name": "mnist1d", "num_examples": 4000, "seed": 0}}
    config.vae = ml_collections.ConfigDict(
        # Fixed decoder noise 0.1 (standardized data): a sharp likelihood, hence high MI, where the
        # encoder-based bounds break down (as in the paper's VAE experiments).
        {**vae, "min_std": 0.1, "learn_std": False, "seed": 0, "bounds": vae_bounds}
    )
    config.vae.data = ml_collections.ConfigDict(vae["data"])
    return config
