"""experiments/twisted_smc: the :tiny config once (module fixture) and the results.json contract."""

import json
import math

import pytest
from experiment_runs import run_main

from experiments.twisted_smc.configs.default import get_config
from experiments.twisted_smc.pipeline import run, validate_config

TASKS = ("rare_event", "soft", "infilling")
METHODS = ("ctl", "rl", "sixo", "fudge", "dpg", "bootstrap")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("twisted_tiny")
    run_main("twisted_smc", workdir)  # a fresh process, where the config's fast_compile applies
    with open(workdir / "results.json") as f:
        return json.load(f), workdir


def test_contract(results):
    res, workdir = results
    assert set(res) >= {"kl_table", "exact", "bounds", "settings"}
    for task in TASKS:
        assert set(res["kl_table"][task]) == set(METHODS)
        for method in METHODS:
            for kl in ("kl_sigma_q", "kl_q_sigma"):
                entry = res["kl_table"][task][method][kl]
                assert {"mean", "ci95"} <= set(entry)
                if entry["infinite"]:
                    assert entry["mean"] is None
                else:
                    assert math.isfinite(entry["mean"]) and entry["ci95"] >= 0
        assert "log_z" in res["exact"][task]
    # an indicator potential makes KL(q || sigma) infinite for full-support proposals
    assert res["kl_table"]["rare_event"]["ctl"]["kl_q_sigma"]["exact_infinite"]
    # exact KLs are non-negative; the bootstrap's KL(sigma || p0) matches enumeration of p0
    soft = res["kl_table"]["soft"]
    assert all(soft[m]["kl_sigma_q"]["exact_mean"] >= 0 for m in METHODS)
    assert soft["ctl"]["kl_sigma_q"]["exact_mean"] < soft["bootstrap"]["kl_sigma_q"]["exact_mean"]
    bounds = res["bounds"]
    assert {b["num_particles"] for b in bounds} == {2, 8}
    for b in bounds:
        assert {"num_particles", "smc_lower", "csmc_upper", "task", "method"} <= set(b)
    ctl_soft = [b for b in bounds if b["task"] == "soft" and b["method"] == "ctl"]
    assert all(b["smc_lower"] <= b["exact_log_z"] + 0.1 for b in ctl_soft)
    assert (workdir / "bounds.png").stat().st_size > 0


def test_rerun_reuses_stages(results):
    res, workdir = results
    again = run(get_config("tiny"), workdir)
    assert again["kl_table"]["soft"]["ctl"] == res["kl_table"]["soft"]["ctl"]


def test_bad_config():
    c = get_config("tiny")
    c.methods = ["ctl", "ppo"]
    with pytest.raises(ValueError, match="config.methods"):
        validate_config(c)
    c = get_config("tiny")
    c.lm.vocab_size = 13
    with pytest.raises(ValueError, match="config.lm.vocab_size"):
        validate_config(c)
    c = get_config("tiny")
    c.bounds.methods = ["sixo"]
    c.methods = ["ctl"]
    with pytest.raises(ValueError, match="config.bounds.methods"):
        validate_config(c)
