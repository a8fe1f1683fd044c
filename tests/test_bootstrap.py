"""Distributed bootstrap: launcher variables, groups and RNG streams."""
from __future__ import annotations

import pytest
import torch

from megatron_senseflow.distributed import expand_nodelist, launch_env, slurm_port
from tests.dist_helpers import run_distributed


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]


def test_launch_env_from_slurm():
    env = launch_env(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[3-4]", "SLURM_JOB_ID": "4242"}
    )
    assert env == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "n3", "MASTER_PORT": str(slurm_port(4242))}


def test_launch_env_torchrun_wins_over_slurm():
    env = launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234", "SLURM_PROCID": "9", "SLURM_NTASKS": "10"})
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "h"


def test_single_process_defaults():
    env = launch_env({})
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1"


def _groups_and_noise(env):
    from megatron_senseflow.rng import BatchRandom, sample_ids

    noise = BatchRandom(7, 0, 3, sample_ids(3, 2 * env.dp, env.dp_rank, 2)).randn(4)
    init = torch.randn(3)  # global RNG: weight init stream
    return {"tp_rank": env.tp_rank, "dp_rank": env.dp_rank, "noise": noise, "init": init, "backend": env.backend}


@pytest.mark.slow
def test_tp2_dp2_groups_and_rng_streams():
    res = run_distributed(_groups_and_noise, 4, tp=2)
    assert sorted((r["dp_rank"], r["tp_rank"]) for r in res) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["backend"] == "gloo" for r in res)
    by = {(r["dp_rank"], r["tp_rank"]): r for r in res}
    # the same noise inside a replica (both TP ranks), different noise across replicas
    assert torch.equal(by[(0, 0)]["noise"], by[(0, 1)]["noise"])
    assert torch.equal(by[(1, 0)]["noise"], by[(1, 1)]["noise"])
    assert not torch.equal(by[(0, 0)]["noise"], by[(1, 0)]["noise"])
    # weight init draws agree everywhere (same seed across DP and TP)
    assert all(torch.equal(r["init"], res[0]["init"]) for r in res)


def test_per_sample_streams_do_not_depend_on_layout():
    from megatron_senseflow.rng import BatchRandom, sample_ids

    whole = BatchRandom(5, 0, 9, sample_ids(9, 4, 0, 4)).randn(3)
    halves = [BatchRandom(5, 0, 9, sample_ids(9, 4, r, 2)).randn(3) for r in range(2)]
    assert torch.equal(whole, torch.cat(halves))
    rnd = BatchRandom(5, 0, 9, sample_ids(9, 4, 0, 4))
    a = torch.cat([rnd.sub(slice(0, 2)).randn(3), rnd.sub(slice(2, 4)).randn(3)])
    assert torch.equal(a, whole)  # microbatch slices draw what the whole batch draws
    assert not torch.equal(whole, BatchRandom(5, 0, 10, sample_ids(10, 4, 0, 4)).randn(3))
