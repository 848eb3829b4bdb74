"""tda_jax.mi (filled in by its issue)."""
