"""Distributed bootstrap: launcher variables, groups and RNG streams."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from megatron_senseflow.distributed import expand_nodelist, launch_env, slurm_port
from tests.dist_helpers import run_distributed


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]


STEP = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "n[3-4]", "SLURM_JOB_NODELIST": "n[3-4]", "SLURM_JOB_ID": "4242"}


def test_launch_env_from_slurm_uses_the_first_nodes_address():
    env = launch_env({**STEP, "SENSEFLOW_MASTER_ADDR": "10.1.2.3"})  # job.sh: NodeAddr of n3
    assert env == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "10.1.2.3",
                   "MASTER_PORT": str(slurm_port(4242))}
    # without job.sh, the node name is resolved to an IPv4 address here
    env = launch_env({**STEP, "SLURM_STEP_NODELIST": "localhost,n9"})
    assert env["MASTER_ADDR"] == "127.0.0.1"


def test_under_slurm_slurms_values_win_over_inherited_ones():
    # a login profile's MASTER_ADDR=localhost, or RANK/WORLD_SIZE of another run, exported by sbatch
    leaked = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    env = launch_env({**leaked, **STEP, "SENSEFLOW_MASTER_ADDR": "10.1.2.3"})
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("5", "16", "10.1.2.3")
    assert env["MASTER_PORT"] == str(slurm_port(4242))


def test_a_node_name_that_does_not_resolve_is_one_sentence():
    from megatron_senseflow.config import ConfigError

    with pytest.raises(ConfigError, match="does not resolve to an address here; run the job through `senseflow slurm`"):
        launch_env({**STEP, "SLURM_STEP_NODELIST": "no-such-node-7x.invalid"})


def test_slurm_port_stays_below_the_ephemeral_range():
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [slurm_port(j) for j in range(0, 200_000, 7)]
    assert min(ports) >= 1024 and max(ports) < min(low, 32768)


def test_launch_env_torchrun_or_our_launcher_win_over_slurm():
    mine = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    for marker in ("TORCHELASTIC_RUN_ID", "SENSEFLOW_LAUNCHER"):  # e.g. `srun -n1 senseflow train --nproc 2`
        env = launch_env({**STEP, **mine, marker: "1"})
        assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "h", marker


def test_a_batch_or_salloc_shell_is_one_process():
    # SLURM_PROCID / SLURM_NTASKS are set in a batch shell too, but no SLURM_STEP_ID: one process
    shell = {k: v for k, v in STEP.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST")}
    env = launch_env(shell)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1"


def test_two_ranks_on_one_gpu_are_refused():
    from megatron_senseflow.config import ConfigError
    from megatron_senseflow.distributed import check_device_binding

    def rec(rank, host, gpu, local_rank, visible=4):
        return {"rank": rank, "host": host, "gpu": gpu, "local_rank": local_rank, "index": local_rank % visible,
                "visible": visible, "cuda_visible_devices": "0,1,2,3"}

    # one GPU per task, or every GPU visible to every task: distinct devices
    check_device_binding([rec(r, "n1", f"GPU-{r}", r, 8) for r in range(8)] + [rec(8 + r, "n2", f"GPU-{r}", r, 8) for r in range(8)])
    # GPUs bound by socket, tasks distributed cyclically: local ranks 0 and 4 sit on one socket and see its 4 GPUs
    socket_bound = [rec(r, "n1", f"GPU-{r % 4}", r) for r in range(8)]
    with pytest.raises(ConfigError, match=r"ranks 0 and 4 on n1 would share one GPU \(cuda:0 of the 4 this task sees"):
        check_device_binding(socket_bound)


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


def test_a_cpu_process_leaves_megatrons_fused_kernels_uncompiled():
    """cpu_megatron.leave_fusions_uncompiled, as every entry point calls it before megatron-core is imported: the
    decorator returns the function itself (no TorchInductor import) and megatron-core imports; a process that
    imported megatron-core first keeps megatron's own. (Every `senseflow train` of the suite trains this way.)"""
    import subprocess
    import sys

    code = """
import sys
from megatron_senseflow.train_cli import process_start
process_start()
import megatron.core.jit as jit
f = lambda x: x
assert jit.jit_fuser(f) is f, jit.jit_fuser
from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl  # decorated at import: a plain function now
assert "torch._inductor.compile_fx" not in sys.modules
import torch
from megatron_senseflow import cpu_megatron
before = sys.modules["megatron.core.jit"]
cpu_megatron.leave_fusions_uncompiled()  # megatron-core is imported now: nothing changes
assert sys.modules["megatron.core.jit"] is before
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]
    plain = subprocess.run([sys.executable, "-c", "import megatron.core.jit as j, torch; "
                            "print(j.jit_fuser is torch.compile)"], capture_output=True, text=True, timeout=300)
    assert plain.stdout.strip() == "True", plain.stderr[-2000:]  # without the entry point: megatron's own


def test_the_processes_a_rank_forks_die_with_it():
    """procs.children_die_with_me, as every entry point installs it: a rank killed with SIGKILL (its launcher was)
    takes the processes it forked along (megatron-core's checkpoint writer workers), and theirs in turn."""
    import subprocess
    import sys

    code = """
import multiprocessing as mp, os, sys, time
from megatron_senseflow.procs import children_die_with_me
children_die_with_me()
def grandchild():
    time.sleep(60)
def child(q):
    p = mp.get_context("fork").Process(target=grandchild); p.start()
    q.put((os.getpid(), p.pid)); time.sleep(60)
q = mp.get_context("fork").Queue()
mp.get_context("fork").Process(target=child, args=(q,)).start()
print(*q.get(), flush=True)
time.sleep(60)
"""
    rank = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in rank.stdout.readline().split()]
    assert len(pids) == 2 and all(Path(f"/proc/{p}").exists() for p in pids)
    rank.kill()
    rank.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "a forked process outlived its killed parent"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_checkpoint_results_server_is_quiet_light_and_dies_with_its_rank():
    """mcore_compat's server for megatron's checkpoint write results: its stderr is /dev/null from its first
    instruction (a rank killed while it starts leaves no traceback under the launcher's line), it stores pickled
    bytes and never imports torch (2.7 s and a few hundred MB per rank otherwise), the queue gives back what was
    put (an exception too, as a failed writer puts one), and a killed rank takes it along."""
    import subprocess
    import sys

    code = """
import os
from megatron_senseflow.procs import children_die_with_me
children_die_with_me()
import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron_senseflow import mcore_compat
mcore_compat._own_write_results_queue()
q = filesystem_async._results_queue
q.put({0: [torch.Size([2, 3]), torch.zeros(2)]})
got = q.get_nowait()
assert got[0][0] == torch.Size([2, 3]) and torch.equal(got[0][1], torch.zeros(2)), got
q.put(RuntimeError("a writer failed"))
assert str(q.get_nowait()) == "a writer failed"
server = mcore_compat._results_manager._process.pid
print(server, os.readlink(f"/proc/{server}/fd/2"), "torch" in open(f"/proc/{server}/maps").read(), flush=True)
import time; time.sleep(60)
"""
    rank = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = rank.stdout.readline().split()
    assert len(line) == 3, rank.stderr.read()[-3000:] if rank.poll() is not None else line
    server, stderr, has_torch = int(line[0]), line[1], line[2]
    assert stderr == "/dev/null" and has_torch == "False", line
    rank.kill()
    rank.wait()
    # the start itself: a process started inside stderr_to_devnull inherits /dev/null; after it, ours is back
    from megatron_senseflow.procs import stderr_to_devnull

    fd2 = ["sh", "-c", "readlink /proc/$$/fd/2"]
    with stderr_to_devnull():
        inside = subprocess.run(fd2, stdout=subprocess.PIPE, text=True).stdout.strip()
    after = subprocess.run(fd2, stdout=subprocess.PIPE, text=True).stdout.strip()
    assert inside == "/dev/null" != after, (inside, after)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(server):
        time.sleep(0.05)
    assert not _alive(server), "the results server outlived its killed rank"
