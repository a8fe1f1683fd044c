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

import torch
import torch.distributed as dist

from .config import ConfigError, ParallelConfig

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


def slurm_port(job_id: str | int) -> int:
    """A port every task of one job derives alike and that differs between concurrent jobs."""
    return 15000 + int(job_id) % 20000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from torchrun, Slurm, or a single process."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or an explicit launch)
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE") if k in env}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        out["MASTER_PORT"] = env.get("MASTER_PORT", "29500")
        return out
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, one task per GPU
        hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1"))
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", hosts[0]),
            "MASTER_PORT": env.get("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0")))),
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

    from megatron_senseflow.models.configs import LayoutError, check_world

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
