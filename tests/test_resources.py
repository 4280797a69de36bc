"""pipeline/resources.py: what a stage asks of the cluster, decided the same way in every stage."""

from __future__ import annotations

import pytest

from pipeline import resources


def test_float16_needs_a_gpu_and_the_error_names_the_key():
    resources.check_actor_dtype("float16", 1.0, "cache encoders", "cache.num_gpus_per_encoder")
    resources.check_actor_dtype("bfloat16", 0.0, "cache encoders", "cache.num_gpus_per_encoder")
    with pytest.raises(resources.ResourceError, match=r"cache\.num_gpus_per_encoder=0.*give the cache encoders GPUs"):
        resources.check_actor_dtype("float16", 0.0, "cache encoders", "cache.num_gpus_per_encoder")


def test_configured_counts_win_and_cpu_actors_are_one_pool_member():
    assert resources.gpus_per_actor(0.5) == 0.5 and resources.gpus_per_actor(0) == 0
    assert resources.actor_count(3, 1.0) == 3 and resources.actor_count(None, 0.0) == 1
    assert resources.actor_device(0.0) == "cpu" and resources.actor_device(0.25) == "cuda"


def test_every_worker_gets_the_same_environment():
    env = resources.worker_runtime_env()
    assert env == {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}}
    env["env_vars"]["X"] = "1"  # a caller's additions never leak into the next worker's
    assert "X" not in resources.worker_runtime_env()["env_vars"]
