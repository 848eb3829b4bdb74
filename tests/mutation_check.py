"""Plants known bugs one at a time in a copy of the repository and checks that the tests catch them.

Run from the repository root (takes a few minutes; not part of the pytest suite)::

    python tests/mutation_check.py            # every mutation
    python tests/mutation_check.py kfac_a_summed_over_positions   # some of them

For each mutation the repository is copied to a temporary directory (the working tree is never
touched), one exact snippet of source is replaced (the original must occur exactly once, so the
script fails loudly when the code moves), and the named test files are run with ``pytest -x``. A
mutation is *caught* when pytest fails. The script exits non-zero if any mutation survives.
``tests/test_mutation_check.py`` checks, quickly and inside the suite, that every snippet still
matches the code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Mutation(NamedTuple):
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


ORACLES = ("tests/test_curvature_oracles.py",)
LM = ("tests/test_lm_attribution.py",)

MUTATIONS = (
    Mutation("kfac_a_summed_over_positions", "tda_jax/curvature/blocks/kfac.py",
             '"A_count": jnp.sum(mask),',
             '"A_count": jnp.sum(mask[:, 0]),', ORACLES),
    Mutation("kfac_g_averaged_over_positions", "tda_jax/curvature/blocks/kfac.py",
             '"G": jnp.einsum("kbto,kbtp->op", masked_g, g)}',
             '"G": jnp.einsum("kbto,kbtp->op", masked_g, g) / g.shape[2]}', ORACLES),
    Mutation("squares_per_position_in_diagonal_and_lambda", "tda_jax/curvature/blocks/base.py",
             '    grads = jnp.einsum("bti,kbto->kbio", a, g)\n'
             '    return jnp.sum(jnp.square(grads), axis=(0, 1))',
             '    grads = jnp.einsum("bti,kbto->kbtio", a, g)\n'
             '    return jnp.sum(jnp.square(grads), axis=(0, 1, 2))',
             ORACLES),
    Mutation("self_influence_times_4_with_positions", "tda_jax/curvature/blocks/base.py",
             '    return jnp.einsum("bio,io->b", jnp.square(grads), weights)',
             '    return 4.0 * jnp.einsum("bio,io->b", jnp.square(grads), weights)', ORACLES),
    Mutation("positions_reversed_in_factored_scores", "tda_jax/attribution/influence.py",
             '    return jnp.einsum("btqo,bto->qbt", rotated, g)',
             '    return jnp.einsum("btqo,bto->qbt", rotated, g[:, ::-1])', ORACLES),
    Mutation("tied_embedding_attend_use_dropped", "tda_jax/capture/statistics.py",
             "                a_part = jnp.reshape(grad[0], (batch, -1, spec.in_dim))",
             "                a_part = 0.0 * jnp.reshape(grad[0], (batch, -1, spec.in_dim))",
             LM),
    Mutation("padding_positions_in_kfac_covariances", "tda_jax/curvature/blocks/kfac.py",
             "    masked_a = a * mask[:, :, None].astype(a.dtype)",
             "    masked_a = a", LM),
    Mutation("ignored_targets_in_fisher", "tda_jax/curvature/fisher.py",
             "        mask = mask[:, None] * token_positions(targets)",
             "        mask = mask[:, None] * jnp.ones_like(token_positions(targets))", LM),
    Mutation("token_scores_shifted_by_one", "tda_jax/attribution/influence.py",
             "        blocks.append(np.eye(length, dtype=np.float32)[rows])",
             "        blocks.append(np.roll(np.eye(length, dtype=np.float32), 1, axis=1)[rows])", LM),
    Mutation("low_rank_query_left_in_eigenbasis", "tda_jax/attribution/influence.py",
             '        u, w = (u if qa is None else qa @ u), (w if qg is None else qg @ w)',
             '        u, w = u, (w if qg is None else qg @ w)', LM),
    Mutation("trimmed_scores_left_in_length_order", "tda_jax/attribution/influence.py",
             "            scores[q0:q1, order] = computed",
             "            scores[q0:q1] = computed", LM),
    Mutation("truncated_rank_keeps_the_smallest_directions", "tda_jax/attribution/influence.py",
             "        e = vecs[..., ::-1][..., :r]  # eigh sorts ascending",
             "        e = vecs[..., :r]  # eigh sorts ascending", LM),
    Mutation("csmc_sorted_multinomial_resampling", "tda_jax/probability/csmc.py",
             "    return jax.random.categorical(key, logits, shape=(num_samples,)).astype(jnp.int32)",
             "    return jnp.sort(jax.random.categorical(key, logits, shape=(num_samples,))"
             ".astype(jnp.int32))", ("tests/test_smc.py",)),
    Mutation("saved_data_order_shifted_by_one_epoch", "tda_jax/training/train.py",
             '"epochs": [] if orders is None else orders.tolist()})',
             '"epochs": [] if orders is None else np.roll(orders, 1, axis=0).tolist()})',
             ("tests/test_training.py",)),
    Mutation("contiguous_rows_read_one_past_the_start", "tda_jax/data/dataset.py",
             "        values = np.array(array[int(rows[0]):int(rows[-1]) + 1])",
             "        values = np.array(array[int(rows[0]) + 1:int(rows[-1]) + 2])",
             ("tests/test_data_source.py",)),
    Mutation("memmap_pages_never_released", "tda_jax/data/dataset.py",
             '    handle = getattr(array, "_mmap", None)\n',
             '    handle = None\n',
             ("tests/test_data_source.py",)),
    Mutation("label_check_blocks_lose_their_offset", "tda_jax/losses.py",
             'shown += [f"row {int(i) + start}: {int(block[i])}" for i in bad[:5 - len(shown)]]',
             'shown += [f"row {int(i)}: {int(block[i])}" for i in bad[:5 - len(shown)]]',
             ("tests/test_data_source.py",)),
    Mutation("self_store_chunk_reads_from_row_zero", "tda_jax/attribution/influence.py",
             "        for number, batch in enumerate(batches_in_order(train, np.arange(rows.start, "
             "rows.stop),",
             "        for number, batch in enumerate(batches_in_order(train, np.arange(0, "
             "rows.stop - rows.start),",
             ("tests/test_store.py",)),
    Mutation("ifcomp_boltzmann_gradient_times_temperature", "tda_jax/complexity/ifcomp.py",
             "    return (probs[:, None, :] - one_hot[None, :, :]) / temperature",
             "    return (probs[:, None, :] - one_hot[None, :, :]) * temperature",
             ("tests/test_ifcomp.py",)),
    Mutation("ifcomp_kernel_training_side_not_rotated", "tda_jax/complexity/ifcomp.py",
             '            rotated = jnp.einsum("bti,dbio->dbto", a_score[s.name], precond[s.name])',
             '            rotated = jnp.einsum("bti,dbio->dbto", a[s.name], precond[s.name])',
             ("tests/test_ifcomp.py",)),
    Mutation("bf16_statistics_accumulated_in_bf16", "tda_jax/capture/statistics.py",
             "        g_by_call = {k: v.astype(jnp.float32) for k, v in g_by_call.items()}\n"
             "        call_inputs = jax.tree.map(lambda v: _cast_floating(v, jnp.float32), call_inputs)",
             "        pass", ("tests/test_precision.py",)),
    Mutation("compute_dtype_ignored_by_fit", "tda_jax/curvature/fit.py",
             ' ' * 58 + 'batch.get("input_mask"), compute_dtype)',
             ' ' * 58 + 'batch.get("input_mask"))',
             ("tests/test_precision.py",)),
    Mutation("laftr_gate_second_moment_mu_squared_on_diagonal", "tda_jax/fsd/laftr.py",
             "zz = jnp.outer(mu, mu) + jnp.diag(mu - mu * mu)",
             "zz = jnp.outer(mu, mu)", ("tests/test_laftr.py",)),
    Mutation("laftr_delta_s_without_delta_a", "tda_jax/fsd/network.py",
             "delta_s = a @ (w1 - w0) + delta_a @ w1 + (b1 - b0)",
             "delta_s = a @ (w1 - w0) + (b1 - b0)", ("tests/test_laftr.py",)),
    Mutation("laftr_sq_distance_without_half", "tda_jax/fsd/laftr.py",
             "per_group = 0.5 * jnp.trace(second, axis1=1, axis2=2)",
             "per_group = jnp.trace(second, axis1=1, axis2=2)", ("tests/test_laftr.py",)),
    Mutation("laftr_summary_covariance_not_centred", "tda_jax/fsd/laftr.py",
             "cov = total[\"xx\"] / safe[:, None, None] - mean[:, :, None] * mean[:, None, :]",
             "cov = total[\"xx\"] / safe[:, None, None]", ("tests/test_laftr.py",)),
    Mutation("twisted_weight_without_previous_twist", "tda_jax/twisted/smc.py",
             "w = jnp.where(dead, -jnp.inf, log_zt - jnp.where(dead, 0.0, prev.log_psi))",
             "w = jnp.where(dead, -jnp.inf, log_zt)", ("tests/test_twisted_smc.py",)),
    Mutation("twisted_optimal_twist_not_conditional", "tda_jax/twisted/enumeration.py",
             "            log_psi = (lse(joint.reshape(v ** t, -1), axis=1)\n"
             "                       - lse(target.log_p0.reshape(v ** t, -1), axis=1))",
             "            log_psi = lse(joint.reshape(v ** t, -1), axis=1)",
             ("tests/test_twisted_smc.py",)),
    Mutation("kv_cache_attention_unscaled", "tda_jax/twisted/kv_cache.py",
             "            q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)\n",
             "", ("tests/test_twisted_kv.py",)),
)


def apply_mutation(root: Path, mutation: Mutation) -> None:
    """Replaces the mutation's snippet in ``root``; raises if it does not occur exactly once."""
    path = root / mutation.path
    text = path.read_text()
    count = text.count(mutation.original)
    if count != 1:
        raise RuntimeError(f"{mutation.name}: the original snippet occurs {count} times in "
                           f"{mutation.path}; update tests/mutation_check.py.")
    path.write_text(text.replace(mutation.original, mutation.mutated))


def _copy_repository(destination: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "workdirs", ".pytest_cache",
                                    "*.egg-info", "results")
    for name in ("tda_jax", "tests", "experiments", "pyproject.toml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        else:
            shutil.copy2(source, destination / name)


def run(mutation: Mutation) -> tuple[bool, float, str]:
    """``(caught, seconds, last line of pytest's output)`` for one mutation."""
    with tempfile.TemporaryDirectory(prefix=f"mutation-{mutation.name}-") as tmp:
        root = Path(tmp)
        _copy_repository(root)
        apply_mutation(root, mutation)
        env = dict(os.environ, PYTHONPATH=str(root), TDA_JAX_PROGRESS="0")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:xdist",
                               "-p", "no:cacheprovider", *mutation.tests], cwd=root, env=env,
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        return proc.returncode == 1, time.perf_counter() - start, lines[-1] if lines else ""


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    unknown = set(names) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"unknown mutation(s) {sorted(unknown)}; known: {[m.name for m in MUTATIONS]}")
        return 2
    survived = 0
    for mutation in chosen:
        caught, seconds, last = run(mutation)
        survived += not caught
        print(f"{'CAUGHT  ' if caught else 'SURVIVED'} {mutation.name:45s} {seconds:6.1f} s  {last}",
              flush=True)
    print(f"{len(chosen) - survived}/{len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
