"""Distributed bootstrap: torch.distributed + megatron-core parallel_state from torchrun or Slurm.

One entry point, `init_distributed`, used by every launcher (plain python,
`torchrun`, `srun`, `senseflow train --nproc N`). It reads the launcher's
environment, picks NCCL on CUDA and gloo on CPU, builds megatron-core's
TP/PP/CP/DP groups and seeds the RNGs.

Seeds. Weight init uses `seed + 100 * pp_rank` on every rank (identical across
DP and TP, as megatron does; TP-split weights draw from the model-parallel RNG
tracker). Training noise does not come from these global generators at all:
it is drawn per global sample (rng.py), so every TP/PP rank of one replica
draws the same noise for the same sample, replicas draw different noise, and
the draws do not depend on the layout.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .errors import ConfigError
from .procs import free_port  # noqa: F401  (tests and launch_env use it from here)

if TYPE_CHECKING:
    from .config import ParallelConfig

DEFAULT_TIMEOUT_MIN = 30


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def sum_over_model_parallel(self, value: float) -> float:
        """A per-shard float summed over this replica's TP and PP ranks."""
        from megatron.core import parallel_state as ps

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=ps.get_model_parallel_group())
        return float(t.item())


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: 'gpu[01-03,07],login1' -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


# Below Linux's ephemeral range (ip_local_port_range starts at 32768 by default), where outgoing
# connections take their local ports and could already hold the one a job derives.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 20000


def slurm_port(job_id: str | int) -> int:
    """A port every task of one job derives alike and that differs between concurrent jobs (10000-29999)."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def resolve_ipv4(host: str) -> str:
    """The IPv4 address of a host name (an address is returned as is); ConfigError when it does not resolve."""
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError, UnicodeError):
        raise ConfigError(
            f"the first node of this Slurm step, {host!r}, does not resolve to an address here; run the job "
            "through `senseflow slurm` (its job script reads the node's NodeAddr from Slurm), or set "
            "SENSEFLOW_MASTER_ADDR to that node's IP address."
        ) from None


def launch_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT of this process.

    In order: a launcher that set them (torchrun, `senseflow train --nproc`); a task of a Slurm
    step (srun), whose values come from Slurm alone: a RANK or MASTER_ADDR inherited from a login
    profile or an interactive allocation (sbatch exports the submitting environment) would hang a
    multi-node job until the init timeout; explicit RANK / WORLD_SIZE (a launcher of one's own);
    else a single process. SLURM_STEP_ID tells a task of a step from a batch shell or an salloc
    shell, which carry SLURM_PROCID / SLURM_NTASKS too but run one process.
    """
    env = dict(os.environ if environ is None else environ)
    launched = "TORCHELASTIC_RUN_ID" in env or "SENSEFLOW_LAUNCHER" in env
    if not launched and "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        # rank 0, which hosts the rendezvous store, runs on the step's first node (block distribution);
        # job.sh passes that node's NodeAddr, since node names need not resolve (cloud clusters)
        addr = env.get("SENSEFLOW_MASTER_ADDR") or resolve_ipv4(expand_nodelist(nodelist)[0])
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": addr,
            "MASTER_PORT": str(slurm_port(env.get("SLURM_JOB_ID", "0"))),
        }
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "RANK": env["RANK"],
            "WORLD_SIZE": env["WORLD_SIZE"],
            "LOCAL_RANK": env.get("LOCAL_RANK", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": env.get("MASTER_PORT", str(free_port())),
    }


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda was asked for, but this process sees no CUDA device.")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(
    parallel: ParallelConfig,
    seed: int = 1234,
    device: str = "auto",
    timeout_min: int = DEFAULT_TIMEOUT_MIN,
) -> DistEnv:
    """Initialise torch.distributed and megatron-core parallel_state; idempotent within a process."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    lenv = launch_env()
    os.environ.update(lenv)
    rank, world, local_rank = int(lenv["RANK"]), int(lenv["WORLD_SIZE"]), int(lenv["LOCAL_RANK"])
    dev = resolve_device(device, local_rank)
    if dev.type == "cpu":
        from . import cpu_megatron  # CPU runs only: lets megatron-core run without CUDA (see its docstring)

        cpu_megatron.install()
    else:
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"

    from megatron_senseflow.models.arch_base import LayoutError, check_world

    try:
        check_world(world, parallel.tp, parallel.pp, parallel.cp)
    except LayoutError as e:
        raise ConfigError(f"{str(e)[:-1]}; launch a multiple of {parallel.tp * parallel.pp * parallel.cp} processes "
                          "or change the parallel sizes.") from None
    if not dist.is_initialized():
        kwargs = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{lenv['MASTER_ADDR']}:{lenv['MASTER_PORT']}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_min),
            **kwargs,
        )
    if dev.type == "cuda":
        check_device_binding(_gather_devices(dev, local_rank))
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        distributed_timeout_minutes=timeout_min,
        create_gloo_process_groups=dev.type == "cpu" or parallel.distributed_optimizer,
    )
    env = current_env(dev, backend)
    torch.manual_seed(seed + 100 * env.pp_rank)
    tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * env.pp_rank)
    return env


def _gather_devices(dev: torch.device, local_rank: int) -> list[dict]:
    props = torch.cuda.get_device_properties(dev)
    mine = {"rank": dist.get_rank(), "host": socket.gethostname(), "gpu": str(getattr(props, "uuid", dev.index)),
            "local_rank": local_rank, "index": dev.index, "visible": torch.cuda.device_count(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "all")}
    everyone: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def check_device_binding(records: list[dict]) -> None:
    """Refuse two ranks on one GPU (ConfigError). Each rank takes `local_rank % visible GPUs`: right when a
    task sees every GPU of its node or exactly its own, wrong when Slurm binds GPUs to tasks in groups
    (a task sees its socket's 4 GPUs, and two tasks of that socket, say local ranks 0 and 4 under a
    cyclic distribution, both take the first)."""
    first: dict[tuple[str, str], dict] = {}
    for r in records:
        other = first.setdefault((r["host"], r["gpu"]), r)
        if other is not r:
            raise ConfigError(
                f"ranks {other['rank']} and {r['rank']} on {r['host']} would share one GPU (cuda:{r['index']} of the "
                f"{r['visible']} this task sees, CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']}): the GPUs are "
                "bound to tasks in groups. Bind one GPU per task (`senseflow slurm ... --srun-arg=--gpus-per-task=1`) "
                "or none (`--srun-arg=--gpu-bind=none`)."
            )


def current_env(device: torch.device | None = None, backend: str | None = None) -> DistEnv:
    from megatron.core import parallel_state as ps

    if device is None:
        device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda", torch.cuda.current_device())
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        device=device,
        backend=backend or dist.get_backend(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
